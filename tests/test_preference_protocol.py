"""Issue 32 items 4-5: the full-fine-tuned organism's build path, the benign preference set, the shared lr / batch
protocol and its search (--smoke), on the tiny model."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from safekeel.bench.preference_protocol import (PREFERENCE_SFT_FALLBACK, SEARCH_DEV, SEARCH_TRAIN, GRID_HELD_OUT, GRID_TRAIN,
                                                check_splits, choose, shared_hyperparameters)
from safekeel.cli.main import app
from safekeel.data.benign_preference import DEV, GSM8K_PREFERENCE, HELD_OUT, TRAIN, build_gsm8k_preference, derived_dataset
from safekeel.data.preference import load_preferences
from safekeel.models.registry import RegisteredModel, _build_into, cached_model_dir, is_built, known_models
from safekeel.training.align import FULL_ALIGNED, align_base, build_aligned_full, full_align_config
from safekeel.training.sft import TrainingCancelled

ROOT = Path(__file__).resolve().parent.parent


def _tiny_full_config():
    from dataclasses import replace

    return replace(full_align_config(), max_steps=2, batch_size=2, bf16=False, max_length=64, logging_steps=1)


def test_the_full_fine_tuned_organism_builds_once_into_the_cache_with_its_provenance(tiny_model_dir):
    assert FULL_ALIGNED in known_models() and not is_built(FULL_ALIGNED)
    recipe = full_align_config()
    assert (recipe.learning_rate, recipe.refusal_fraction, recipe.epochs, recipe.batch_size) == (5e-5, 0.75, 1.0, 8)  # v9's

    target = align_base(variant="full", config=_tiny_full_config(), base=str(tiny_model_dir), show_progress=False)
    assert target == cached_model_dir(FULL_ALIGNED) and is_built(FULL_ALIGNED)
    provenance = json.loads((target / "provenance.json").read_text())
    assert provenance["name"] == FULL_ALIGNED and provenance["full"] and provenance["steps"] == 2
    assert provenance["config"]["refusal_fraction"] == 0.75 and provenance["base_model"] == str(tiny_model_dir)
    assert len(provenance["refusal_ids"]) > 0 and provenance["weights_sha256"] and "v9" in provenance["how"]
    assert not (target / "trainer").exists() and not (target / "adapter_config.json").exists()  # a whole model, no adapter
    assert [p.name for p in target.parent.iterdir() if p.name.startswith(".")] == []  # no temporary build folder left

    from safekeel.models.registry import load_model_and_tokenizer

    model, _ = load_model_and_tokenizer(FULL_ALIGNED, build=False)  # addressable by name, not rebuilt
    assert model.config.num_hidden_layers == 2
    again = align_base(variant="full")  # built already: returned as is (the real recipe would train 18 minutes)
    assert json.loads((again / "provenance.json").read_text()) == provenance

    with pytest.raises(ValueError, match="unknown organism variant 'qlora'"):
        align_base(variant="qlora")
    result = CliRunner().invoke(app, ["align-base", "--variant", "qlora"])
    assert result.exit_code != 0 and "known variants are lora, full" in result.output


def test_a_stopped_full_build_leaves_nothing_that_looks_built(tiny_model_dir):
    entry = RegisteredModel(FULL_ALIGNED, "test", lambda t: build_aligned_full(t, _tiny_full_config(), base=str(tiny_model_dir),
                                                                             show_progress=False, should_stop=lambda: True))
    with pytest.raises(TrainingCancelled):
        _build_into(entry, cached_model_dir(FULL_ALIGNED))
    assert not is_built(FULL_ALIGNED) and not cached_model_dir(FULL_ALIGNED).exists()
    assert list(cached_model_dir(FULL_ALIGNED).parent.iterdir()) == []


def test_the_benign_preference_set_is_deterministic_loadable_and_disjoint_from_evaluation(shared_data, tmp_path):
    from safekeel.data import prompt_sets
    from safekeel.data.reference import gsm8k
    from safekeel.data.safety import load_authored_benign, load_authored_pool

    built = derived_dataset(GSM8K_PREFERENCE)
    assert built is not None and built.is_file() and derived_dataset("benign/gsm8k_train.jsonl") is None
    again = build_gsm8k_preference(tmp_path / "again.jsonl")
    assert again.read_bytes() == built.read_bytes()  # same source, same bytes
    provenance = json.loads((tmp_path / "again.jsonl.provenance.json").read_text())
    assert provenance["n_pairs"] == 600 and provenance["rejected_kinds"] == {"mismatched": 300, "wrong_answer": 300}

    loaded = load_preferences(built, strict=True)
    assert loaded.format == "prompt_chosen_rejected" and len(loaded.pairs) == 600
    rows = [json.loads(line) for line in built.read_text().splitlines()]
    assert len({r["id"] for r in rows}) == 600 and TRAIN[1] <= HELD_OUT[0] and HELD_OUT[0] + HELD_OUT[1] <= 600
    for row in rows:
        assert row["chosen"] != row["rejected"] and "<<" not in row["chosen"] and row["chosen"].rsplit("\n", 1)[-1].startswith("####")
        if row["rejected_kind"] == "wrong_answer":
            assert row["rejected"].rsplit("\n", 1)[0] == row["chosen"].rsplit("\n", 1)[0]  # only the final answer differs
        else:
            assert row["rejected_from"] != row["id"]
    # no text crosses splits: every mismatched donor is a problem of the pair's own split
    split_of = {}
    for number, (skip, n) in enumerate((TRAIN, DEV, HELD_OUT)):
        split_of.update({r["id"]: number for r in rows[skip:skip + n]})
    assert all(split_of[r["rejected_from"]] == split_of[r["id"]] for r in rows)
    held_texts = {t for r in rows[HELD_OUT[0]:HELD_OUT[0] + HELD_OUT[1]] for t in (r["chosen"], r["rejected"])}
    assert not held_texts & {t for r in rows[TRAIN[0]:TRAIN[0] + TRAIN[1]] for t in (r["chosen"], r["rejected"])}
    prompts = {r["prompt"].strip().lower() for r in rows}
    evaluated = {p.strip().lower() for name in prompt_sets.names() for p in prompt_sets.get(name).prompts}
    evaluated |= {c.to_messages()[0]["content"].strip().lower() for c in gsm8k("test")}
    authored = {e.request.strip().lower() for e in load_authored_pool()} | \
        {m["content"].strip().lower() for c in load_authored_benign() for m in c.to_messages() if m["role"] == "user"}
    assert evaluated and not prompts & evaluated and not prompts & authored
    refusals = ("I'm sorry", "I cannot", "I can't", "As an AI", "I apologize")
    assert not [r["id"] for r in rows if any(s in r["chosen"] or s in r["rejected"] for s in refusals)]


def test_the_protocol_splits_rule_and_the_grid_reading_the_committed_search(tmp_path):
    check_splits()
    assert SEARCH_TRAIN[0] >= GRID_TRAIN[1] and SEARCH_DEV[0] + SEARCH_DEV[1] <= GRID_HELD_OUT[0]
    rows = [{"learning_rate": 5e-6, "batch_size": 4, "preference_accuracy": 0.55, "reward_margin": 0.01, "harmful_rate": 0.06},
            {"learning_rate": 1e-4, "batch_size": 4, "preference_accuracy": 0.80, "reward_margin": 0.90, "harmful_rate": 0.30},
            {"learning_rate": 5e-5, "batch_size": 8, "preference_accuracy": 0.70, "reward_margin": 0.40, "harmful_rate": 0.15},
            {"learning_rate": 2e-5, "batch_size": 8, "preference_accuracy": 0.70, "reward_margin": 0.20, "harmful_rate": 0.10}]
    chosen = choose(rows, baseline_harmful_rate=0.06)  # 1e-4 is the most accurate but fails the harm check (0.30 > 0.16)
    assert (chosen["learning_rate"], chosen["batch_size"], chosen["passed_harm_check"]) == (5e-5, 8, True)
    assert "3 of 4 settings" in chosen["rule"]
    fallback = choose(rows[1:3], baseline_harmful_rate=0.0)
    assert (fallback["learning_rate"], fallback["passed_harm_check"]) == (5e-5, False) and "least harmful" in fallback["rule"]
    unmeasured = choose([{**rows[2], "harmful_rate": None}, rows[1]], baseline_harmful_rate=0.0)
    assert unmeasured["learning_rate"] == 1e-4  # the setting with no harm measurement is not the least harmful

    sft, source = shared_hyperparameters(tmp_path / "absent.json")
    assert sft == PREFERENCE_SFT_FALLBACK and source["source"].startswith("fallback")
    committed = tmp_path / "preference_search.json"
    committed.write_text(json.dumps({"backbone": "smollm2-135m-safe", "smoke": False, "objective": {"loss_type": ["sigmoid"]},
                                     "chosen": {"learning_rate": 2e-5, "batch_size": 8}}))
    sft, source = shared_hyperparameters(committed)
    assert (sft["learning_rate"], sft["batch_size"], sft["max_length"]) == (2e-5, 8, 512) and source["source"] == str(committed)
    committed.write_text(json.dumps({"smoke": True, "chosen": {"learning_rate": 1e-3, "batch_size": 2}}))
    with pytest.raises(ValueError, match="--smoke result"):
        shared_hyperparameters(committed)
    # a search run with its own settings (here two learning rates only) is not the protocol either
    plan = {"backbone": "smollm2-135m-safe", "train": [200, 200], "dev": [1000, 200], "learning_rates": [5e-6, 2e-5],
            "batch_sizes": [4, 8], "objective": {"loss_type": ["sigmoid"]}}
    committed.write_text(json.dumps({"smoke": False, "plan": plan, "chosen": {"learning_rate": 2e-5, "batch_size": 8}}))
    with pytest.raises(ValueError, match="other settings than the protocol's .*learning_rates"):
        shared_hyperparameters(committed)
    committed.write_text(json.dumps({"smoke": False, "plan": {**plan, "learning_rates": [5e-6, 2e-5, 5e-5, 1e-4]},
                                     "chosen": {"learning_rate": 2e-5, "batch_size": 8}}))
    assert shared_hyperparameters(committed)[0]["learning_rate"] == 2e-5

    from safekeel.bench.grids import expand
    from safekeel.bench.presets import load_grid

    grid = load_grid("preference")
    expected, _ = shared_hyperparameters()
    runs = [c for c in expand(grid) if c["kind"] == "finetune"]
    assert {c["dataset"]["name"] for c in runs} == {"hh_harmless", "gsm8k_pref"}
    assert all(c["dataset"]["sft"] == expected and c["hyperparameters_source"] == grid.hyperparameters_source for c in runs)
    assert {json.dumps(c["preference_eval"], sort_keys=True) for c in runs if c["dataset"]["name"] == "gsm8k_pref"} == \
        {json.dumps({"path": GSM8K_PREFERENCE, "skip": HELD_OUT[0], "n": HELD_OUT[1]}, sort_keys=True)}
    assert {c["preference_eval"]["skip"] for c in runs if c["dataset"]["name"] == "hh_harmless"} == {GRID_HELD_OUT[0]}
    assert all("preference_eval" not in c["dataset"] for c in runs)  # a run's dataset config stays as it was

    # preference_core is the DPO and IPO part of the same grid: the same configurations (so the same run ids and records)
    from safekeel.bench.grids import run_id

    core = expand(load_grid("preference_core"))
    full = {run_id(c): c for c in expand(grid)}
    assert {run_id(c) for c in core} <= set(full)
    assert {"+".join(c["method"]["loss_type"]) for c in core if c["kind"] == "finetune"} == {"sigmoid", "ipo"}
    assert len([c for c in core if c["kind"] == "finetune"]) * 2 == len(runs)
    assert {run_id(c) for c in full.values() if c["kind"] == "finetune" and c["method"]["loss_type"] in (["sigmoid"], ["ipo"])} \
        == {run_id(c) for c in core if c["kind"] == "finetune"}


def test_the_search_smoke_runs_records_resumes_and_writes_its_choice(tiny_model_dir, tmp_path, shared_data):
    command = [sys.executable, str(ROOT / "benchmarks" / "preference_search.py"), "--smoke", "--backbone", str(tiny_model_dir),
               "--cache-dir", str(tmp_path / "cache"), "--results-dir", str(tmp_path / "results")]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    done = subprocess.run(command, capture_output=True, text=True, timeout=600, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads((tmp_path / "results" / "preference_search.json").read_text())
    assert result["smoke"] and len(result["runs"]) == 2 and result["baseline"]["harmful_rate"] is not None
    assert {(r["learning_rate"], r["batch_size"]) for r in result["runs"]} == {(1e-4, 2), (1e-3, 2)}
    assert (result["chosen"]["learning_rate"], result["chosen"]["batch_size"]) in {(1e-4, 2), (1e-3, 2)}
    assert all(r["steps"] == 2 and r["preference_accuracy"] is not None for r in result["runs"])
    assert f"chosen: lr {result['chosen']['learning_rate']:g}, batch 2" in done.stdout
    assert len(list((tmp_path / "results" / "preference_search_runs").glob("*.json"))) == 3
    assert "SMOKE" in (tmp_path / "results" / "preference_search.md").read_text()

    resumed = subprocess.run(command, capture_output=True, text=True, timeout=600, env=env)
    assert resumed.returncode == 0 and resumed.stdout.count("recorded already") == 3
    refused = subprocess.run(command[:2] + ["--smoke", "--results-dir", str(ROOT / "benchmarks" / "results")],
                             capture_output=True, text=True, timeout=300, env=env)
    assert refused.returncode == 2 and "--smoke never writes into benchmarks/results" in refused.stderr
