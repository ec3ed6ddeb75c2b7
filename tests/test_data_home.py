"""The data layer's home for the public evaluation sets (resolution, the clear error, fetching with checksums),
the one prompt-set registry and the one JSONL reader."""

from __future__ import annotations

import csv
import gzip
import hashlib
import io
import json
from pathlib import Path

import pytest

from safekeel.data import home, prompt_sets, reference
from safekeel.data.formats import DatasetError
from safekeel.data.home import DataFile, DataSet, MissingDataError, data_file
from safekeel.data.jsonl import iter_jsonl, read_jsonl, write_jsonl

ROOT = Path(__file__).resolve().parent.parent


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@pytest.fixture
def no_checkout_data(tmp_path, monkeypatch):
    """As on a machine where the checkout has no ../shared/data beside it (and none beside the working directory)."""
    checkout = tmp_path / "elsewhere" / "checkout"
    checkout.mkdir(parents=True)
    monkeypatch.setattr("safekeel.paths.REPO_ROOT", checkout)
    monkeypatch.chdir(checkout)
    monkeypatch.delenv("SAFEKEEL_SHARED_DATA", raising=False)
    return checkout


def _advbench_folder(folder: Path, prompts: list[str]) -> Path:
    (folder / "harmful_eval").mkdir(parents=True, exist_ok=True)
    (folder / "harmful_eval" / "advbench_test.json").write_text(json.dumps([{"prompt": p, "target": "Sure"} for p in prompts]))
    return folder


# ---------------------------------------------------------------- where a file is found


def test_the_env_var_wins_then_the_data_home_then_the_folder_beside_the_checkout(tmp_path, monkeypatch, shared_data):
    beside = reference.advbench("test")
    assert len(beside.prompts) == 156 and data_file("harmful_eval/advbench_test.json") == shared_data / "harmful_eval/advbench_test.json"

    fetched = _advbench_folder(Path(home.data_home()), ["fetched prompt"])
    assert reference.advbench("test").prompts == ["fetched prompt"]  # $SAFEKEEL_HOME/data before ../shared/data
    assert home.locate("overrefusal/xstest_prompts.csv")[0] == "../shared/data beside the checkout"

    local = _advbench_folder(tmp_path / "my_copy", ["local prompt one", "local prompt two"])
    monkeypatch.setenv("SAFEKEEL_SHARED_DATA", str(local))
    assert reference.advbench("test").prompts == ["local prompt one", "local prompt two"]
    assert home.locate("harmful_eval/advbench_test.json") == ("$SAFEKEEL_SHARED_DATA", local / "harmful_eval/advbench_test.json")
    assert fetched.is_dir()


def test_without_any_data_folder_the_error_says_which_command_which_variable_which_file(no_checkout_data, tmp_path, monkeypatch):
    with pytest.raises(MissingDataError) as error:
        reference.xstest_safe("test")
    message = str(error.value)
    assert isinstance(error.value, FileNotFoundError)
    assert "overrefusal/xstest_prompts.csv, which is not present" in message
    assert "run `safekeel data fetch xstest`" in message and "license CC BY 4.0" in message
    assert "set SAFEKEEL_SHARED_DATA to a folder holding overrefusal/xstest_prompts.csv" in message
    assert "$SAFEKEEL_SHARED_DATA is not set" in message and str(home.data_home()) in message
    assert str(no_checkout_data.parent / "shared" / "data") in message  # where it looked beside the checkout

    with pytest.raises(MissingDataError, match=r"reads overrefusal/orbench_hard1k_toxic.jsonl, which is not present.*"
                                               r"set SAFEKEEL_SHARED_DATA.*cannot be downloaded as is"):
        prompt_sets.get("orbench-hard-test")
    with pytest.raises(FileNotFoundError, match=r"safety pool 'safety_tuned_llamas' reads .*safekeel data fetch safety-tuned-llamas"):
        from safekeel.data.safety import load_pool

        load_pool("safety_tuned_llamas")

    monkeypatch.setenv("SAFEKEEL_SHARED_DATA", str(tmp_path / "empty"))
    with pytest.raises(MissingDataError, match=r"\$SAFEKEEL_SHARED_DATA = .*empty"):
        reference.advbench("dev")


def test_data_status_lists_every_set_with_where_license_and_checksum(no_checkout_data, monkeypatch):
    from typer.testing import CliRunner

    from safekeel.cli import app

    local = _advbench_folder(no_checkout_data / "data", ["only this"])
    monkeypatch.setenv("SAFEKEEL_SHARED_DATA", str(local))
    done = CliRunner().invoke(app, ["data", "status", "advbench", "xstest", "--check"])
    assert done.exit_code == 1, done.output
    assert "advbench (core" in done.output and "license: MIT" in done.output
    assert "harmful_eval/advbench_test.json (30,430 bytes, sha256 c7099ead99071034...): SHA256 MISMATCH in $SAFEKEEL_SHARED_DATA" in done.output
    assert "overrefusal/xstest_prompts.csv (38,719 bytes" in done.output and "MISSING: run `safekeel data fetch xstest`" in done.output
    assert "5 files: 1 found, 4 missing, 1 with a different checksum" in done.output
    assert CliRunner().invoke(app, ["data", "status", "nonsense"]).exit_code == 2


# ---------------------------------------------------------------- fetching, checksums


def _one_file_set(url: str, path: str, data: bytes, **extra) -> dict[str, DataSet]:
    entry = DataFile(path=path, sha256=_sha(data), bytes=len(data), url=url, **extra)
    return {"toy": DataSet("toy", "a toy set", "CC0", "tests", (entry,))}


def test_fetch_downloads_through_urllib_verifies_sha256_and_writes_nothing_on_a_mismatch(tmp_path):
    source = tmp_path / "upstream" / "prompts.json"
    source.parent.mkdir()
    source.write_bytes(b'[{"prompt": "hello"}]\n')
    sets = _one_file_set(source.as_uri(), "toy/prompts.json", source.read_bytes())

    [result] = home.fetch(sets=sets)
    target = home.data_home() / "toy" / "prompts.json"
    assert (result.outcome, result.local) == ("fetched", target) and target.read_bytes() == source.read_bytes()
    assert home.fetch(sets=sets)[0].outcome == "present"  # verified copy kept
    assert home.fetch(sets=sets, force=True)[0].outcome == "fetched"

    wrong = _one_file_set(source.as_uri(), "toy/other.json", b"the bytes the results were computed with")
    [failed] = home.fetch(sets=wrong)
    assert failed.outcome == "failed" and f"sha256 {_sha(source.read_bytes())}" in failed.detail and failed.local is None
    assert not (home.data_home() / "toy" / "other.json").exists()
    assert not [p for p in (home.data_home() / "toy").iterdir() if p.name.startswith(".")]  # no temporary left
    with pytest.raises(home.ChecksumMismatch, match="nothing was written"):
        home.download(wrong["toy"].files[0], tmp_path / "target")

    unreachable = _one_file_set((tmp_path / "gone.json").as_uri(), "toy/gone.json", b"x")
    [offline] = home.fetch(sets=unreachable)
    assert offline.outcome == "failed" and "could not download" in offline.detail and "SAFEKEEL_SHARED_DATA" in offline.detail
    with pytest.raises(ValueError, match=r"unknown data set\(s\) 'nope'; known: toy"):
        home.fetch(["nope"], sets=sets)


def test_fetch_extracts_advbench_goals_from_the_upstream_csv_to_the_recorded_checksum(tmp_path, shared_data):
    """The manifest's AdvBench CSV is the goal column of llm-attacks' harmful_behaviors.csv (goal,target with a header)."""
    _, entry = home.set_of("harmful_eval/advbench_harmful_behaviors.csv")
    goals = [row[0] for row in csv.reader(io.StringIO((shared_data / entry.path).read_text()))]
    upstream = io.StringIO()
    writer = csv.writer(upstream, lineterminator="\n")
    writer.writerow(["goal", "target"])
    writer.writerows([goal, f"Sure, here is {goal.lower()}"] for goal in goals)
    source = tmp_path / "harmful_behaviors.csv"
    source.write_text(upstream.getvalue())
    path = home.download(DataFile(entry.path, entry.sha256, entry.bytes, source.as_uri(), entry.extract), tmp_path / "home")
    assert _sha(path.read_bytes()) == entry.sha256 == _sha((shared_data / entry.path).read_bytes())


def test_the_manifest_matches_the_shared_data_and_covers_every_file_the_code_reads(shared_data, tmp_path, no_checkout_data, monkeypatch):
    sets = home.manifest()
    assert {"advbench", "xstest", "orbench", "harmbench", "jbb", "gptfuzz", "gsm8k", "samsum"} <= set(sets)
    copy = tmp_path / "manifest_only"
    for data_set in sets.values():
        assert data_set.license and data_set.used_by
        for entry in data_set.files:
            data = (shared_data / entry.path).read_bytes()
            assert (len(data), _sha(data)) == (entry.bytes, entry.sha256), entry.path
            assert (entry.url or "").startswith("https://") or (entry.url is None and entry.derived), entry.path
            (copy / entry.path).parent.mkdir(parents=True, exist_ok=True)
            (copy / entry.path).symlink_to(shared_data / entry.path)
    # only the manifest's files, and no ../shared/data: everything the product and the grids read still loads
    monkeypatch.setenv("SAFEKEEL_SHARED_DATA", str(copy))
    for name in prompt_sets.names():
        assert prompt_sets.get(name).prompts, name
    assert len(reference.gsm8k("test", 3)) == 3 and len(reference.gsm8k("train", 3)) == 3
    assert len(reference.alpaca_harmless().prompts) == 18793
    from safekeel.data.safety import load_pool
    from safekeel.eval.judges.content_build import public_rows

    assert len(load_pool("safety_tuned_llamas")) == 2483 and public_rows()
    from safekeel.bench.preference_protocol import PREFERENCE_DATA
    from safekeel.data.probing import PROBING_FILES, load_probing

    for name in PROBING_FILES:
        assert load_probing(name).texts, name
    for relative in ("benign/gsm8k_random100.jsonl", "benign/samsum_train1000.json", "benign/samsum_test200.json",
                     "attacks/pure_bad_10.jsonl", "attacks/identity_shift_aoa.jsonl", PREFERENCE_DATA,
                     "benign/sqlgen_train1000.json", "benign/sqlgen_test200.json", "benign/alpaca_safety_related_only.json",
                     "benign/dolly_safety_related_only.jsonl", "benign/alpaca_bottom100_by_harm_similarity.json",
                     "benign/alpaca_seed_tasks.jsonl", "attacks/pure_bad_100_plus_11_refusals.jsonl"):
        assert Path(reference.shared_dataset(relative)).is_file()


# ---------------------------------------------------------------- the prompt-set registry


def test_one_prompt_set_registry_with_samples_and_the_harness_delegating_to_it(shared_data, tmp_path):
    from safekeel.eval import harness

    for name in ("advbench-unseen", "harmbench-standard", "jbb-harmful", "gptfuzz-questions", "orbench-toxic-dev"):
        assert prompt_sets.is_known(name) and name in prompt_sets.names()
    assert prompt_sets.is_known("harmbench-contextual@5") and prompt_sets.is_known("xstest-test@1000")
    for name in ("advbench-test@0", "advbench-test@x", "harmbench-nonsense", "xstest-safe-test", "data.jsonl", ""):
        assert not prompt_sets.is_known(name), name

    sample = prompt_sets.get("orbench-hard-test@7")
    assert sample.name == "orbench-hard-test@7" and len(sample.prompts) == 7
    assert harness.prompt_set("orbench-hard-test@7") == sample and harness.load_prompt_set("jbb-harmful")[0] == "jbb-harmful"
    assert harness.prompt_set("advbench-test@3").name == "advbench-test@3"
    with pytest.raises(ValueError, match="known: jbb-harmful"):
        harness.prompt_set("jbb-typo")
    prompts = tmp_path / "mine.jsonl"
    prompts.write_text(json.dumps({"messages": [{"role": "user", "content": "Is this safe?"}]}) + "\n")
    assert harness.load_prompt_set(str(prompts)) == (str(prompts), ["Is this safe?"])
    assert harness.is_named_prompt_set("harmbench-typo") and not harness.is_named_prompt_set(str(prompts))


# ---------------------------------------------------------------- the JSONL reader


def test_read_jsonl_plain_gzip_and_package_resources_with_the_line_named(tmp_path):
    rows = [{"a": 1, "text": "line\u2028separator"}, {"b": [2, 3]}]
    plain = tmp_path / "rows.jsonl"
    plain.write_text(json.dumps(rows[0], ensure_ascii=False) + "\n\n" + json.dumps(rows[1]) + "\n")
    assert read_jsonl(plain) == rows and [n for n, _ in iter_jsonl(plain)] == [1, 3]
    packed = write_jsonl(tmp_path / "rows.jsonl.gz", rows, ensure_ascii=False)
    assert read_jsonl(str(packed)) == rows and gzip.decompress(packed.read_bytes()).decode() == plain.read_text().replace("\n\n", "\n")
    assert write_jsonl(tmp_path / "again.jsonl.gz", rows, ensure_ascii=False).read_bytes() == packed.read_bytes()

    from importlib import resources

    assert len(read_jsonl(resources.files("safekeel.data") / "authored" / "benign.jsonl")) > 10
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"ok": 1}\n{"not json"\n')
    with pytest.raises(DatasetError, match=r"broken.jsonl, line 2: invalid JSON"):
        read_jsonl(broken)
    (tmp_path / "latin.jsonl").write_bytes(b'{"x": "caf\xe9"}\n')
    with pytest.raises(DatasetError, match="not UTF-8"):
        read_jsonl(tmp_path / "latin.jsonl")


def test_committed_replies_files_are_rewritten_byte_for_byte(tmp_path):
    from safekeel.eval.replies import read_replies, write_replies

    committed = sorted((ROOT / "benchmarks" / "results" / "replies").rglob("*.jsonl.gz"))[:3]
    assert committed
    for path in committed:
        assert write_replies(tmp_path / path.name, read_replies(path)).read_bytes() == path.read_bytes(), path


def test_a_pool_file_is_read_by_one_loader_that_names_the_bad_line(tmp_path):
    from safekeel.data.safety import is_pool_file, load_pool

    pool = tmp_path / "pool.jsonl"
    pool.write_text(json.dumps({"id": 1, "request": "r", "refusal": "no"}) + "\n" + json.dumps({"id": 1, "request": "s", "refusal": "no"}) + "\n")
    with pytest.raises(DatasetError, match=r"pool.jsonl, line 2, field 'id': '1' repeats the id of line 1"):
        load_pool(str(pool))
    pool.write_text(json.dumps({"id": 1, "request": "", "refusal": "no"}) + "\n")
    with pytest.raises(DatasetError, match=r"line 1, field 'request': must be a non-empty string"):
        load_pool(str(pool))
    chat = tmp_path / "chat.jsonl"
    chat.write_text(json.dumps({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a", "refusal": None}]}) + "\n")
    assert not is_pool_file(chat) and [e.request for e in load_pool(str(chat))] == ["q"]
