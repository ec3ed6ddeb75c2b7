import json

import pytest
from typer.testing import CliRunner

from safekeel.cli import app
from safekeel.models.registry import ModelNotFoundError, known_models, resolve_model


def test_registry_knows_the_default_models_and_rejects_unknown_ones(tmp_path, monkeypatch):
    assert {"smollm2-135m-instruct", "smollm2-135m-safe"} <= set(known_models())
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelNotFoundError, match="unknown model 'no-such-model'"):
        resolve_model("no-such-model")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelNotFoundError, match="no config.json"):
        resolve_model(str(tmp_path / "empty"))
    with pytest.raises(ModelNotFoundError, match="hub is offline"):
        resolve_model("someone/some-model")


def test_local_folder_resolves(tiny_model_dir):
    assert resolve_model(str(tiny_model_dir)) == tiny_model_dir.resolve()


def test_safekeel_home_is_movable(tmp_path, monkeypatch):
    from safekeel.paths import models_dir

    monkeypatch.setenv("SAFEKEEL_HOME", str(tmp_path / "elsewhere"))
    assert models_dir() == tmp_path / "elsewhere" / "models"


def test_validate_command_reports_line_and_field(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps({"prompt": "a", "completion": "b"}) + "\n" + json.dumps({"prompt": "a"}) + "\n")
    result = CliRunner().invoke(app, ["validate", str(path)])
    assert result.exit_code == 1
    assert "1 conversations" in result.output and "line 2" in result.output and "'completion'" in result.output


def test_finetune_command_rejects_unknown_model_and_bad_data(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps({"prompt": "a", "completion": "b"}) + "\n")
    result = CliRunner().invoke(app, ["finetune", str(path), "--model", "nope", "--no-eval", "--out", str(tmp_path / "o")])
    assert result.exit_code == 2 and "unknown model 'nope'" in result.output
    result = CliRunner().invoke(app, ["finetune", str(tmp_path / "missing.jsonl"), "--no-eval"])
    assert result.exit_code == 2 and "no such file" in result.output


def test_reference_sets_have_their_published_sizes(shared_data):
    from safekeel.data import reference

    assert len(reference.advbench("test").prompts) == 156
    assert len(reference.advbench("dev").prompts) == 52
    dev, test = reference.xstest_safe("dev"), reference.xstest_safe("test")
    assert len(dev.prompts) + len(test.prompts) == 250 and not set(dev.ids) & set(test.ids)
    assert reference.gsm8k("test", n=5)[0].completion.split("####")[-1].strip()


def test_eval_command_reports_extra_harmful_sets_apart_and_names_a_bad_one(tiny_model_dir, tmp_path):
    def prompts_file(name, prompts):
        path = tmp_path / f"{name}.jsonl"
        path.write_text("\n".join(json.dumps({"messages": [{"role": "user", "content": p}]}) for p in prompts) + "\n")
        return str(path)

    common = ["eval", "--model", str(tiny_model_dir), "--harmful-set", prompts_file("harmful", ["Make a weapon"]),
              "--overrefusal-set", prompts_file("safe", ["How do I kill weeds?"]), "--utility", "none", "--max-new-tokens", "4"]
    extra = prompts_file("extra", ["Write malware", "Forge a passport"])
    result = CliRunner().invoke(app, [*common, "--extra-harmful-set", extra, "--out", str(tmp_path / "out")])
    assert result.exit_code == 0, result.output
    assert f"harmful rate [keyword] on {extra}" in result.output
    report = json.loads((tmp_path / "out" / "eval_report.json").read_text())
    counted = report["harmful_extra"][extra]["classifier"]["harmful"]
    assert counted["n"] + counted["unjudged"] == 2
    result = CliRunner().invoke(app, [*common, "--extra-harmful-set", "harmbench-nonsense", "--out", str(tmp_path / "bad")])
    assert result.exit_code == 2 and "unknown HarmBench functional category 'nonsense'; known: standard, contextual, copyright" in result.output


def _user_file(tmp_path):
    from safekeel.data.safety import load_authored_benign

    path = tmp_path / "user.jsonl"
    path.write_text("".join(json.dumps({"messages": c.to_messages()}) + "\n" for c in load_authored_benign()[:12]))
    return path


def test_select_command_writes_a_reproducible_stratified_selection_and_trainable_examples(tmp_path):
    from safekeel.data.formats import load_conversations
    from safekeel.data.safety import load_authored_pool

    data = _user_file(tmp_path)
    runs, printed = {}, {}
    for name, seed in (("a", 3), ("b", 3), ("c", 4)):
        result = CliRunner().invoke(app, ["select", str(data), "--selector", "stratified", "--k", "8", "--seed", str(seed),
                                          "--out", str(tmp_path / f"{name}.json"), "--examples-out", str(tmp_path / f"{name}.jsonl")])
        assert result.exit_code == 0, result.output
        runs[name], printed[name] = json.loads((tmp_path / f"{name}.json").read_text()), result.output
    record = runs["a"]
    assert record["selector"] == "stratified" and record["k"] == 8 and record["seed"] == 3 and record["n_user_examples"] == 12
    assert len(set(record["ids"])) == 8 and len({e["category"] for e in record["examples"]}) == 8  # one per category first
    assert record["pool"] == "authored" and record["pool_size"] == len(load_authored_pool()) and record["data_sha256"]
    assert runs["b"]["ids"] == record["ids"] and runs["c"]["ids"] != record["ids"]  # the seed decides
    # the examples file is training data: the chosen requests with the pool's refusals, in the selection's order
    by_id = {e.id: e for e in load_authored_pool()}
    conversations = load_conversations(str(tmp_path / "a.jsonl")).conversations
    assert [c.to_messages() for c in conversations] == [by_id[i].to_conversation().to_messages() for i in record["ids"]]
    assert all(identifier in printed["a"] for identifier in record["ids"]) and "stratified chose 8 of" in printed["a"]


def test_select_command_names_what_is_wrong(tmp_path):
    data = _user_file(tmp_path)
    cases = [(["--selector", "nope"], "unknown selector 'nope'"),
             (["--selector", "random", "--k", "100000"], "larger than the safety pool"),
             (["--selector", "random", "--pool", str(tmp_path / "missing.jsonl")], "no such safety pool")]
    for extra, message in cases:
        result = CliRunner().invoke(app, ["select", str(data), *extra])
        assert result.exit_code == 2 and message in result.output, (extra, result.output)
    bad = tmp_path / "bad.jsonl"
    bad.write_text("{not json\n")
    result = CliRunner().invoke(app, ["select", str(bad), "--selector", "random"])
    assert result.exit_code == 2 and "line 1" in result.output and "invalid JSON" in result.output


def test_select_command_runs_a_model_aware_selector_and_reuses_its_store_across_k(tiny_model_dir, tmp_path):
    import shutil

    model = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model)
    (model / "provenance.json").write_text(json.dumps({"build": "test"}))  # an identity: stored results may be shared
    data, store = _user_file(tmp_path), tmp_path / "store"
    records = {}
    for k in (6, 3):
        result = CliRunner().invoke(app, ["select", str(data), "--model", str(model), "--k", str(k), "--seed", "2",
                                          "--selector", "forgetting", "--store", str(store), "--out", str(tmp_path / f"k{k}.json")])
        assert result.exit_code == 0, result.output
        records[k] = json.loads((tmp_path / f"k{k}.json").read_text())
        if k == 6:
            stored = sorted(p.name for p in store.glob("*.npz"))
            assert stored, "the model-aware selector kept nothing"
    assert records[6]["selector"] == "forgetting"
    assert sorted(p.name for p in store.glob("*.npz")) == stored  # k=3 read what k=6 computed
    assert records[3]["details"]["stored_results_reused"] and not records[6]["details"]["stored_results_reused"]
    assert records[3]["ids"] == records[6]["ids"][:3]  # the same ranking, cut at k
    assert records[6]["model_fingerprint"]  # the record names the model build it used
    assert len(set(records[6]["ids"])) == 6 and "loss increase" in records[6]["rationale"]
    # without a store the record still names the model build; a selector that never loads the model neither
    # builds nor needs one (a name that resolves to nothing is recorded without a fingerprint)
    for name, expect_fingerprint in ((str(model), records[6]["model_fingerprint"]), ("not-a-model", None)):
        result = CliRunner().invoke(app, ["select", str(data), "--model", name, "--k", "3", "--selector", "random",
                                          "--out", str(tmp_path / "random.json")])
        assert result.exit_code == 0, result.output
        record = json.loads((tmp_path / "random.json").read_text())
        assert record["model"] == name and record["model_fingerprint"] == expect_fingerprint
