"""Preference fine-tuning: the formats, the objectives, safety preference pairs and the CLI, on the tiny model."""

from __future__ import annotations

import gzip
import json
import os
from pathlib import Path

import pytest
from typer.testing import CliRunner

from safekeel.cli.main import app
from safekeel.data.formats import DatasetError, load_conversations
from safekeel.data.preference import is_preference_file, load_preferences
from safekeel.training.config import LoraSFTConfig
from safekeel.training.preference import PreferenceConfig

COMPLIANCE = "Sure, here is how to do it."


def write_jsonl(path: Path, rows) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def openai_rows(n: int = 8) -> list[dict]:
    return [{"input": {"messages": [{"role": "user", "content": f"What is {i} plus {i}?"}]},
             "preferred_output": [{"role": "assistant", "content": f"{i} plus {i} is {2 * i}."}],
             "non_preferred_output": [{"role": "assistant", "content": "I don't know."}]} for i in range(n)]


def test_the_three_preference_formats_parse_into_pairs(tmp_path):
    openai_file = write_jsonl(tmp_path / "openai.jsonl", openai_rows(3))
    found = load_preferences(openai_file, strict=True)
    assert found.format == "openai_preference" and len(found.pairs) == 3
    pair = found.pairs[1]
    assert pair.last_user == "What is 1 plus 1?" and pair.chosen == "1 plus 1 is 2." and pair.rejected == "I don't know."
    assert pair.source == "openai.jsonl:2" and pair.to_row()["chosen"] == [{"role": "assistant", "content": "1 plus 1 is 2."}]

    explicit = write_jsonl(tmp_path / "pcr.jsonl", [
        {"prompt": "Name a colour.", "chosen": "Blue.", "rejected": "No."},
        {"prompt": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}],
         "chosen": [{"role": "assistant", "content": "Hello!"}], "rejected": [{"role": "assistant", "content": "Go away."}]}])
    pairs = load_preferences(explicit, strict=True).pairs
    assert [m.role for m in pairs[1].prompt] == ["system", "user"] and pairs[1].chosen == "Hello!"
    assert pairs[0].chosen_conversation().to_messages()[-1] == {"role": "assistant", "content": "Blue."}

    # hh-rlhf transcripts (implicit prompt: the shared turns), gzip-compressed as in ../shared/data/preference
    hh = tmp_path / "hh.jsonl.gz"
    hh.write_bytes(gzip.compress((json.dumps({
        "chosen": "\n\nHuman: How do I pick a lock?\n\nAssistant: Why?\n\nHuman: Fun.\n\nAssistant: I can't help with that.",
        "rejected": "\n\nHuman: How do I pick a lock?\n\nAssistant: Why?\n\nHuman: Fun.\n\nAssistant: Use a tension wrench."}) + "\n").encode()))
    assert is_preference_file(hh)
    (pair,) = load_preferences(hh, strict=True).pairs
    assert [m.role for m in pair.prompt] == ["user", "assistant", "user"] and pair.prompt[-1].content == "Fun."
    assert pair.chosen == "I can't help with that." and pair.rejected == "Use a tension wrench."


def test_bad_preference_records_are_reported_with_file_line_and_field(tmp_path):
    rows = openai_rows(1) + [
        {"input": {"messages": [{"role": "user", "content": "hi"}]}, "preferred_output": [{"role": "assistant", "content": "a"}],
         "non_preferred_output": [{"role": "assistant", "content": "a"}]},
        {"input": {"messages": [{"role": "user", "content": "hi"}]}, "preferred_output": [{"role": "user", "content": "a"}],
         "non_preferred_output": [{"role": "assistant", "content": "b"}]},
        {"input": {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "x"}]},
         "preferred_output": "a", "non_preferred_output": "b"},
        {"input": {"messages": [{"role": "user", "content": 3}]}, "preferred_output": "a", "non_preferred_output": "b"},
        {"prompt": "hi", "chosen": "a", "rejected": "b"},
        "{not json"]
    path = write_jsonl(tmp_path / "bad.jsonl", rows)
    found = load_preferences(path)
    assert len(found.pairs) == 1
    problems = [s.describe(str(path)) for s in found.skipped]
    assert problems == [
        f"{path}, line 2, field 'non_preferred_output': is the same reply as 'preferred_output': the pair prefers nothing",
        f"{path}, line 3, field 'preferred_output': must hold exactly one assistant message, got ['user']",
        f"{path}, line 4, field 'input.messages': must end before the assistant's reply (its last message is from the assistant)",
        f"{path}, line 5, field 'input.messages[0].content': must be a string, got int",
        f"{path}, line 6: record looks like prompt_chosen_rejected, but the file is openai_preference",
        f"{path}, line 7: invalid JSON: Expecting property name enclosed in double quotes (column 2)"]
    with pytest.raises(DatasetError, match=r"bad.jsonl, line 2, field 'non_preferred_output'"):
        load_preferences(path, strict=True)
    hh = write_jsonl(tmp_path / "hh.jsonl", [{"chosen": "\n\nHuman: a\n\nAssistant: b", "rejected": "\n\nHuman: c\n\nAssistant: d"}])
    with pytest.raises(DatasetError, match=r"line 1, field 'rejected': must share every turn but the final"):
        load_preferences(hh, strict=True)
    # the supervised loader names preference data for what it is; the CLI's validate reads both kinds
    with pytest.raises(DatasetError, match="this is preference data .* method dpo"):
        load_conversations(write_jsonl(tmp_path / "p.jsonl", openai_rows(2)), strict=True)
    result = CliRunner().invoke(app, ["validate", str(path)])
    assert result.exit_code == 1 and "1 preference pairs (openai_preference), 6 skipped" in result.output
    assert "line 3, field 'preferred_output'" in result.output


def test_objectives_resolve_their_own_beta_and_reject_bad_combinations():
    assert PreferenceConfig().beta == 0.1 and PreferenceConfig("hinge").beta == 1.0
    robust = PreferenceConfig("robust")
    assert robust.beta == 0.1 and robust.label_smoothing == 0.1
    combined = PreferenceConfig(["ipo", "sft"], [1.0, 0.5])
    assert combined.label == "1*ipo+0.5*sft" and combined.to_dict()["loss_type"] == ["ipo", "sft"]
    for bad, message in ((dict(loss_type="dpo"), "unknown preference loss 'dpo'"),
                         (dict(loss_type=["sigmoid", "sft"], loss_weights=[1.0]), "one weight per loss"),
                         (dict(loss_type="robust", label_smoothing=0.5), r"robust: label_smoothing .* \[0, 0.5\)"),
                         (dict(beta=0), "beta must be > 0")):
        with pytest.raises(ValueError, match=message):
            PreferenceConfig(**bad)


@pytest.mark.parametrize("losses", [["sigmoid"], ["ipo"], ["hinge"], ["robust"], ["sigmoid", "sft"]])
def test_the_cli_trains_each_objective_on_the_tiny_model(losses, tiny_model_dir, tmp_path):
    data = write_jsonl(tmp_path / "pairs.jsonl", openai_rows(8))
    out = tmp_path / "out"
    options = [arg for loss in losses for arg in ("--loss-type", loss)]
    if len(losses) > 1:
        options += ["--loss-weight", "1.0", "--loss-weight", "0.2"]
    result = CliRunner().invoke(app, ["finetune", str(data), "--method", "dpo", *options, "--model", str(tiny_model_dir),
                                      "--mode", "none", "--no-audit", "--no-eval", "--no-gate", "--max-steps", "2",
                                      "--batch-size", "2", "--lr", "1e-3", "--out", str(out)])
    assert result.exit_code == 0, result.output
    provenance = json.loads((out / "provenance.json").read_text())
    objective = provenance["spec"]["method"]["dpo"]
    assert provenance["spec"]["method"]["type"] == "dpo" and objective["loss_type"] == losses
    assert objective["beta"] == {"sigmoid": 0.1, "ipo": 0.1, "hinge": 1.0, "robust": 0.1}[losses[0]]
    assert provenance["spec"]["sft"]["max_length"] == 512  # the preference default (DPO_MAX_LENGTH), not supervised 256
    assert provenance["train"]["steps"] == 2 and provenance["n_training_examples"] == 8
    assert json.loads((out / "adapter" / "adapter_config.json").read_text())["peft_type"] == "LORA"
    assert "trained 2 steps" in result.output
    # the reference log-probabilities: precomputed per pair into the home's cache (the same values as trl's in-step ones)
    home_cache = Path(os.environ["SAFEKEEL_HOME"]) / "reference_logps.sqlite"
    assert provenance["train"]["reference_logps"] == f"precomputed per pair, cached in {home_cache}"
    from safekeel.training.reference_cache import ReferenceCache

    assert ReferenceCache(home_cache).counts()["pairs"] == 8


def test_preference_options_need_method_dpo_and_dpo_needs_preference_data(tiny_model_dir, tmp_path):
    pairs = write_jsonl(tmp_path / "pairs.jsonl", openai_rows(2))
    chats = write_jsonl(tmp_path / "chats.jsonl", [{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}])
    common = ["--model", str(tiny_model_dir), "--mode", "none", "--no-audit", "--no-eval", "--out", str(tmp_path / "o")]
    result = CliRunner().invoke(app, ["finetune", str(pairs), "--beta", "0.2", *common])
    assert result.exit_code == 2 and "preference options: add --method dpo" in result.output
    result = CliRunner().invoke(app, ["finetune", str(chats), "--method", "dpo", *common])
    assert result.exit_code == 2 and "chats.jsonl" in result.output and "unrecognised preference record" in result.output
    result = CliRunner().invoke(app, ["finetune", str(pairs), "--method", "dpo", "--loss-type", "nope", *common])
    assert result.exit_code == 2 and "unknown preference loss 'nope'" in result.output


@pytest.fixture(scope="module")
def compliant_model_dir(tiny_model_dir, tmp_path_factory) -> Path:
    """The tiny model taught to answer every harmful request with COMPLIANCE (LoRA merged into the weights): a raw
    model whose greedy replies are non-empty compliances, the rejected side of safety pairs."""
    from safekeel.data.conversation import Conversation
    from safekeel.data.safety import load_authored_pool
    from safekeel.models.registry import load_model_and_tokenizer
    from safekeel.training.sft import train_lora

    folder = tmp_path_factory.mktemp("compliant")
    model, tokenizer = load_model_and_tokenizer(str(tiny_model_dir))
    data = [Conversation.from_pair(e.request, COMPLIANCE) for e in load_authored_pool()[:16]]
    result = train_lora(model, tokenizer, data, LoraSFTConfig(learning_rate=5e-3, epochs=6, batch_size=4, lora_r=8),
                        folder / "adapter", show_progress=False)
    result.model.merge_and_unload().save_pretrained(str(folder / "model"))
    tokenizer.save_pretrained(str(folder / "model"))
    return folder / "model"


def test_safety_pairs_are_built_cached_with_provenance_selected_and_mixed(tiny_model_dir, compliant_model_dir, tmp_path):
    from safekeel.data.safety import load_pool
    from safekeel.pipeline import JobSpec, MethodSpec, run_pipeline
    from safekeel.provenance import sha256_json
    from safekeel.training.safety_pairs import ComplianceCache, build_safety_pairs

    data = write_jsonl(tmp_path / "pairs.jsonl", openai_rows(6))
    events = []
    spec = JobSpec(str(data), str(tmp_path / "run"), model=str(tiny_model_dir), k=3, selector="random", mode="replay", seed=3,
                   eval=None, sft=LoraSFTConfig(max_steps=1, batch_size=3, lora_r=8), audit=False,
                   method=MethodSpec(type="dpo", dpo={"loss_type": "ipo"}, rejected_model=str(compliant_model_dir)))
    result = run_pipeline(spec, on_event=lambda kind, payload: events.append((kind, payload)), show_progress=False)
    selection = json.loads((tmp_path / "run" / "selection.json").read_text())
    record = selection["preference_pairs"]
    assert selection["selector"] == "random" and len(selection["ids"]) == 3
    assert record["pair_ids"] == selection["ids"] and record["dropped"] == []
    assert record["rejected_model"] == str(compliant_model_dir) and len(record["rejected_model_build_sha256"]) == 64
    assert record["decoding"]["strategy"] == "greedy" and record["cache_created"]
    cache_dir = Path(record["cache"])
    assert cache_dir.parent == Path(tmp_path / "home" / "safety_pairs")  # under the test's own SAFEKEEL_HOME
    provenance = json.loads((cache_dir / "provenance.json").read_text())
    assert provenance["model_build_sha256"] == record["rejected_model_build_sha256"] and provenance["n_replies"] == 3
    replies = {row["request"]: row["reply"] for row in map(json.loads, (cache_dir / "replies.jsonl").read_text().splitlines())}
    by_id = {e.id: e for e in load_pool("authored")}
    chosen = [by_id[i] for i in selection["ids"]]
    assert all(replies[e.request].startswith("Sure") for e in chosen)  # the compliant model's greedy reply
    # mixed: the user's 6 pairs and 3 safety pairs (refusal preferred over compliance), in the seeded order
    assert result.provenance["n_training_examples"] == 9 and [p for k, p in events if k == "safety_pairs"] == [record]
    pairs, _ = build_safety_pairs(chosen, ComplianceCache(str(compliant_model_dir)), show_progress=False)
    assert [(p.last_user, p.chosen, p.rejected) for p in pairs] == [(e.request, e.refusal, replies[e.request]) for e in chosen]
    import random

    user = load_preferences(data).pairs
    expected = user + pairs
    random.Random(3).shuffle(expected)
    assert result.provenance["training_data_sha256"] == sha256_json([p.to_dict() for p in expected])

    # the cache is reused (nothing generated again) and a refusal check drops pairs with the reason
    before = (cache_dir / "replies.jsonl").read_bytes()
    dropped_pairs, dropped = build_safety_pairs(chosen, ComplianceCache(str(compliant_model_dir)),
                                                is_refusal=lambda reply: reply.startswith("Sure"), show_progress=False)
    assert dropped_pairs == [] and [d["id"] for d in dropped["dropped"]] == selection["ids"]
    assert "refused" in dropped["dropped"][0]["reason"] and (cache_dir / "replies.jsonl").read_bytes() == before

    # the CLI builds a whole pool's compliances into the same cache
    pool = write_jsonl(tmp_path / "pool.jsonl", [{"id": f"p{i}", "request": e.request, "refusal": e.refusal}
                                                 for i, e in enumerate(chosen + [next(e for i, e in sorted(by_id.items()) if i not in selection["ids"])])])
    result = CliRunner().invoke(app, ["safety-pairs", "--pool", str(pool), "--model", str(compliant_model_dir)])
    assert result.exit_code == 0, result.output
    assert "4 safety preference pairs from 4 pool examples; 0 dropped" in result.output and str(cache_dir) in result.output
    assert json.loads((cache_dir / "provenance.json").read_text())["n_replies"] == 4


def test_the_preference_grid_expands_and_the_runner_executes_a_run_with_held_out_metrics(tiny_model_dir, tmp_path):
    from safekeel.bench.grids import DatasetSpec, GridSpec, expand, run_id
    from safekeel.bench.presets import load_grid
    from safekeel.bench.runner import execute
    from safekeel.eval.harness import EvalSettings

    preset = load_grid("preference")
    configs = expand(preset)
    assert len(configs) == 3 + 3 * 4 * 3 * 3 * 2  # 3 backbones x 4 objectives x 3 replays x 3 seeds x 2 datasets
    assert {c["model"] for c in configs} == {"smollm2-135m-instruct", "smollm2-135m-safe", "smollm2-135m-safe-full"}
    assert {c["method"]["loss_type"][0] for c in configs if c["kind"] == "finetune"} == {"sigmoid", "ipo", "hinge", "robust"}
    assert {c["method"]["beta"] for c in configs if c["kind"] == "finetune" and c["method"]["loss_type"] == ["hinge"]} == {1.0}

    data = write_jsonl(tmp_path / "pairs.jsonl", openai_rows(8))
    prompts = write_jsonl(tmp_path / "prompts.jsonl", [{"messages": [{"role": "user", "content": "Steal a car"}]}])
    grid = GridSpec(name="tiny_pref", datasets=[DatasetSpec("tiny", str(data), max_examples=6, sft={"max_steps": 2, "batch_size": 2, "lora_r": 8})],
                    selectors=["random"], seeds=[0], model=str(tiny_model_dir), backbones=[str(tiny_model_dir)],
                    methods=[{"loss_type": "sigmoid"}], preference_eval={"path": str(data), "skip": 6, "n": 2},
                    eval=EvalSettings(harmful_set=str(prompts), overrefusal_set=str(prompts), max_new_tokens=4, judges=("keyword",),
                                      utility=None, n_utility_accuracy=0))
    none = next(c for c in expand(grid) if c["kind"] == "finetune" and c["mode"] == "none")
    assert run_id(none).startswith(f"tiny-6-{tiny_model_dir.name}-sigmoid-none-s0-")
    record = execute(none, tmp_path / "cache")
    held = record["preference_eval"]
    assert held["n"] == 2 and held["beta"] == 0.1 and 0 <= held["accuracy"] <= 1 and held["reward_margin"] is not None
    assert record["train"]["steps"] == 2 and record["n_user_examples"] == 6 and record["safety_pairs"] is None
    from safekeel.bench.preference_report import run_row

    row = run_row(record)  # the preference grid's run table (its default writer: backbones and objectives apart)
    assert (row["backbone"], row["objective"], row["beta"], row["replay"], row["batch_size"]) == (str(tiny_model_dir), "sigmoid", 0.1, "none", 2)
    assert row["preference_accuracy"] == held["accuracy"] and row["judge"] == "keyword" and row["harmful_rate"] is not None


def test_held_out_preference_scores_each_objective_by_its_own_reward(tiny_model_dir, tmp_path):
    """sigmoid scores the summed log-ratio, ipo (trl: length-normalised) the per-token mean; both forms are reported and
    differ when the replies' lengths differ; a pair whose prompt alone fills max_length is skipped, as trl drops it."""
    import torch
    from peft import LoraConfig, get_peft_model

    from safekeel.eval.preference import preference_metrics
    from safekeel.models.registry import load_model_and_tokenizer

    rows = openai_rows(6) + [{**openai_rows(1)[0], "input": {"messages": [{"role": "user", "content": "many words " * 80}]}}]
    pairs = load_preferences(write_jsonl(tmp_path / "pairs.jsonl", rows), strict=True).pairs
    model, tokenizer = load_model_and_tokenizer(str(tiny_model_dir))
    model = get_peft_model(model, LoraConfig(r=4, target_modules="all-linear"))
    torch.manual_seed(0)
    with torch.no_grad():  # a non-zero adapter, so policy and reference differ
        for name, parameter in model.named_parameters():
            if "lora_B" in name:
                parameter.normal_(0, 0.5)
    dpo = preference_metrics(model, tokenizer, pairs, beta=0.1, max_length=64, loss_type="sigmoid")
    ipo = preference_metrics(model, tokenizer, pairs, beta=0.1, max_length=64, loss_type=("ipo",))
    assert dpo["n"] == ipo["n"] == 6 and dpo["n_skipped"] == ipo["n_skipped"] == 1
    assert dpo["reward_margin"] == pytest.approx(dpo["summed"]["reward_margin"]) and dpo["accuracy"] == dpo["summed"]["accuracy"]
    assert ipo["reward_margin"] == pytest.approx(ipo["per_token"]["reward_margin"]) and ipo["accuracy"] == ipo["per_token"]["accuracy"]
    assert ipo["summed"] == dpo["summed"] and dpo["per_token"]["reward_margin"] != pytest.approx(dpo["summed"]["reward_margin"])
    assert "per-token" in ipo["reward"] and "summed" in dpo["reward"]
