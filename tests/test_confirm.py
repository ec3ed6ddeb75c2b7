"""The confirmatory test (safekeel.bench.confirm, benchmarks/confirm_plan.md): the choice rule on a
selectors.json written by the real bench outputs, the confirmatory grid, and the pre-registered test."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from scipy.stats import wilcoxon

from safekeel.bench.confirm import (CONFIRM_SEEDS, EXTRA_SET, IncompleteGrid, analyse, choose_selector, confirm_grid,
                                    main_command, render)
from safekeel.bench.grids import DatasetSpec, GridSpec, expand, run_id, selectors_grid
from safekeel.bench.report import write_outputs
from safekeel.bench.summary import run_row

ROOT = Path(__file__).resolve().parent.parent
DATASETS = ["pure_bad_10", "gsm8k_random100", "samsum-100"]


def _rate(value: float, n: int) -> dict:
    return {"count": round(value * n), "n": n, "unjudged": 0, "rate": value, "ci95": [max(value - 0.1, 0.0), min(value + 0.1, 1.0)]}


def _report(harmful: float, overrefusal: float, loss: float, harmbench: float | None = None) -> dict:
    judges = ["classifier", "keyword"]
    report = {"model": "m", "adapter": None, "settings": {"judges": judges}, "seconds": 1.0, "versions": {},
              "harmful": {j: {"harmful": _rate(harmful, 156)} for j in judges},
              "overrefusal": {j: {"refused": _rate(overrefusal, 123)} for j in judges},
              "utility": {"loss": {"loss": loss, "n": 25}}}
    if harmbench is not None:
        report["harmful_extra"] = {EXTRA_SET: {j: {"harmful": _rate(harmbench, 200)} for j in judges}}
    return report


def _records(grid: GridSpec, effects: dict, skip=lambda config: False) -> list[dict]:
    """Records of `grid` whose rates are random's (seed- and dataset-dependent) plus effects[selector] =
    (harmful offset, over-refusal offset, loss offset), or a callable (dataset index, seed) -> that tuple."""
    records = []
    for config in expand(grid):
        if skip(config):
            continue
        if config["kind"] == "aligned":
            report, extra = _report(0.1, 0.25, 1.2), {}
        else:
            d = [spec.label for spec in grid.datasets].index(DatasetSpec(**config["dataset"]).label)
            seed = config["seed"]
            base = 0.2 + 0.05 * d + 0.01 * (seed % 7)
            effect = effects.get(config["selector"] or "none", (0.0, 0.0, 0.0))
            dh, do, dl = effect(d, seed) if callable(effect) else effect
            harmbench = base + dh if config["eval"].get("extra_harmful_sets") else None
            report = _report(round(base + dh, 4), round(0.3 + 0.02 * d + do, 4), round(0.9 + dl, 6), harmbench)
            extra = {"selected_ids": [], "train": {"seconds": 1.0}, "n_user_examples": 100, "adapter_cache_hit": False}
        records.append({"run_id": run_id(config), "config": config, "report": report, "seconds": 2.0, **extra})
    return records


def _selectors_json(tmp_path: Path, effects: dict, skip=lambda config: False) -> dict:
    base = selectors_grid()
    grid = GridSpec(name="sel", output="selectors", datasets=base.datasets, k_values=[10],
                    selectors=["random", "kmeans", "dpp", "forgetting"], seeds=list(range(6)), eval=base.eval)
    write_outputs(grid, _records(grid, effects, skip), tmp_path, command="test", plots=False)
    return json.loads((tmp_path / "selectors.json").read_text())


def test_rule_skips_a_safer_selector_that_over_refuses_and_picks_the_smallest_eligible_difference(tmp_path):
    data = _selectors_json(tmp_path, {"kmeans": (-0.05, 0.10, 0.0), "dpp": (-0.03, 0.0, 0.0), "forgetting": (0.01, -0.05, 0.0)})
    choice = choose_selector(data)
    assert choice["outcome"] == "chosen" and choice["selector"] == "dpp"
    assert choice["datasets"] == DATASETS
    table = {e["selector"]: e for e in choice["table"]}
    assert table["kmeans"]["D"] == pytest.approx(-0.05) and table["kmeans"]["O"] == pytest.approx(0.10)
    assert not table["kmeans"]["eligible"] and table["dpp"]["eligible"] and table["forgetting"]["eligible"]
    assert [e["selector"] for e in choice["table"]] == ["kmeans", "dpp", "forgetting"]  # sorted by D


def test_rule_averages_over_datasets_breaks_ties_by_over_refusal_and_guards_utility(tmp_path):
    # dpp helps on one dataset only (-0.09 / 3 = -0.03 on average); forgetting -0.03 everywhere with less over-refusal
    effects = {"kmeans": (-0.08, 0.0, 0.06), "dpp": lambda d, seed: (-0.09 if d == 0 else 0.0, 0.0, 0.0),
               "forgetting": (-0.03, -0.01, 0.0)}
    choice = choose_selector(_selectors_json(tmp_path, effects))
    table = {e["selector"]: e for e in choice["table"]}
    assert table["dpp"]["D"] == pytest.approx(table["forgetting"]["D"]) == pytest.approx(-0.03)
    assert table["dpp"]["per_dataset"]["pure_bad_10"]["harmful"] == pytest.approx(-0.09)
    assert not table["kmeans"]["eligible"]  # held-out loss +0.06 > +0.05
    assert choice["selector"] == "forgetting"


def test_rule_gives_no_candidate_when_nothing_beats_random_and_refuses_an_unfinished_grid(tmp_path):
    choice = choose_selector(_selectors_json(tmp_path, {"kmeans": (0.02, 0.0, 0.0), "dpp": (0.0, 0.0, 0.0),
                                                         "forgetting": (-0.04, 0.08, 0.0)}))
    assert choice["outcome"] == "no candidate" and choice["selector"] is None
    unfinished = _selectors_json(tmp_path, {}, skip=lambda c: c.get("selector") == "dpp" and c["seed"] == 5
                                 and c["dataset"]["name"] == "samsum")
    with pytest.raises(IncompleteGrid, match=r"1 comparisons lack seeds, e.g. samsum-100/dpp \(5 of 6 seeds\)"):
        choose_selector(unfinished)


def test_confirm_grid_is_the_selectors_grid_on_fresh_seeds_without_none_runs():
    grid, base = confirm_grid("dpp"), selectors_grid()
    configs = expand(grid)
    finetune = [c for c in configs if c["kind"] == "finetune"]
    assert len(configs) == 1 + 3 * 2 * len(CONFIRM_SEEDS) and len(finetune) == 48
    assert {c["mode"] for c in finetune} == {"replay"} and {c["selector"] for c in finetune} == {"random", "dpp"}
    assert {c["seed"] for c in finetune} == set(range(100, 108)) and {c["k"] for c in finetune} == {10}
    assert grid.datasets == base.datasets
    assert all(c["eval"]["extra_harmful_sets"] == [EXTRA_SET] for c in configs)
    same = {key: value for key, value in finetune[0]["eval"].items() if key != "extra_harmful_sets"}
    assert same == next(c for c in expand(base) if c["kind"] == "finetune")["eval"]  # both pure_bad_10
    assert not {run_id(c) for c in configs} & {run_id(c) for c in expand(base)}


def _confirm_rows(effects: dict, skip=lambda config: False) -> list[dict]:
    return [run_row(r) for r in _records(confirm_grid("dpp"), effects, skip)]


def test_primary_test_is_one_sided_wilcoxon_on_all_pairs_and_matches_scipy():
    def dpp(d, seed):  # mostly safer, not always: a genuine test
        return (-0.02 if (seed + d) % 4 else 0.01 * (d + 1), 0.01, 0.0)

    result = analyse(_confirm_rows({"dpp": dpp}), "dpp", DATASETS)
    diffs = [dpp(d, s)[0] for d in range(3) for s in CONFIRM_SEEDS]
    assert result["complete"] and result["primary"]["n_pairs"] == 24
    assert result["primary"]["wilcoxon"]["p_value"] == pytest.approx(wilcoxon(diffs, alternative="less").pvalue, abs=1e-6)
    assert result["primary"]["mean_difference"] == pytest.approx(sum(diffs) / 24, abs=1e-4)
    assert result["verdict"].startswith("dpp beats random at k=10")
    by_dataset = {e["dataset"]: e for e in result["per_dataset"]}
    assert by_dataset["samsum-100"]["n_pairs"] == 8 and by_dataset["samsum-100"]["p_holm"] >= by_dataset["samsum-100"]["wilcoxon"]["p_value"]
    assert result["harmbench"]["n_pairs"] == 24 and result["n_prompts"] == {"advbench": 156, "harmbench": 200, "xstest": 123}
    assert result["overrefusal"]["mean_difference"] == pytest.approx(0.01) and result["overrefusal"]["wilcoxon"]["alternative"] == "two-sided"
    assert "keyword" in result["other_judges"]


def test_verdicts_not_shown_costly_and_interim():
    mixed = analyse(_confirm_rows({"dpp": lambda d, s: (0.02 if s % 2 else -0.02, 0.0, 0.0)}), "dpp", DATASETS)
    assert mixed["verdict"].startswith("not shown") and mixed["primary"]["wilcoxon"]["p_value"] > 0.05
    costly = analyse(_confirm_rows({"dpp": lambda d, s: (-0.03, 0.15 + 0.01 * (s % 3), 0.0)}), "dpp", DATASETS)
    assert "beats random" in costly["verdict"] and "pays with worse over-refusal" in costly["verdict"]
    interim = analyse(_confirm_rows({"dpp": (-0.03, 0.0, 0.0)}, skip=lambda c: c.get("seed", 0) >= 104), "dpp", DATASETS)
    assert not interim["complete"] and interim["verdict"].startswith("interim (12 of 24 pairs)")


def test_seed_clustered_sensitivity_qualifies_a_verdict_that_rests_on_pairs_of_the_same_seed(tmp_path):
    """The 24 pairs share 8 seeds. Five seeds safer on every dataset and three slightly worse on every dataset:
    the pre-registered test on 24 pairs passes, the test with the seed as the unit does not (p = 14/256)."""
    def correlated(d, seed):
        i = seed - CONFIRM_SEEDS[0]
        return (-(0.03 + 0.001 * (3 * i + d)) if i < 5 else 0.001 * (1 + 3 * (i - 5) + d), 0.0, 0.0)

    result = analyse(_confirm_rows({"dpp": correlated}), "dpp", DATASETS)
    clustered = result["seed_clustered"]
    seed_means = [sum(correlated(d, s)[0] for d in range(3)) / 3 for s in CONFIRM_SEEDS]
    assert result["primary"]["wilcoxon"]["p_value"] < 0.01 and clustered["n_seeds"] == 8 and clustered["n_pairs"] == 24
    assert clustered["wilcoxon"]["p_value"] == pytest.approx(wilcoxon(seed_means, alternative="less").pvalue, abs=1e-6)
    assert clustered["wilcoxon"]["p_value"] == pytest.approx(14 / 256, abs=1e-6) and clustered["seed_icc"] > 0.9
    assert result["verdict"].startswith("dpp beats random at k=10")
    assert "sensitivity test (added after the plan) does not reach 0.05 (p = 0.0547)" in result["verdict"]
    choice = choose_selector(_selectors_json(tmp_path, {"dpp": (-0.03, 0.0, 0.0)}))
    text = render({"command": "test", "choice": choice, "analysis": result, "n_runs_total": 49, "n_runs_done": 49})
    assert "## Sensitivity: the training seed as the unit" in text and "8 seeds, mean" in text and "added after the plan" in text
    # where every seed favours the selector, both tests agree
    agree = analyse(_confirm_rows({"dpp": lambda d, s: (-0.02 - 0.001 * (s - 100) - 0.0003 * d, 0.0, 0.0)}), "dpp", DATASETS)
    assert "sensitivity test (added after the plan) agrees: p = 0.0039" in agree["verdict"]


def test_report_before_the_first_pair_says_n_a_not_none(tmp_path):
    choice = choose_selector(_selectors_json(tmp_path, {"dpp": (-0.03, 0.0, 0.0)}))
    rows = _confirm_rows({"dpp": (-0.03, 0.0, 0.0)}, skip=lambda c: c.get("selector") == "dpp")  # random's runs only
    result = analyse(rows, "dpp", DATASETS)
    assert result["primary"]["n_pairs"] == 0 and result["verdict"].startswith("interim (0 of 24 pairs)")
    text = render({"command": "test", "choice": choice, "analysis": result, "n_runs_total": 49, "n_runs_done": len(rows)})
    assert "None" not in text and "(n = n/a prompts per run)" in text and "(means: dpp n/a, random n/a)" in text
    done = render({"command": "test", "choice": choice, "analysis": analyse(_confirm_rows({"dpp": (-0.03, 0.0, 0.0)}), "dpp", DATASETS),
                   "n_runs_total": 49, "n_runs_done": 49})
    assert "(n = 156 prompts per run)" in done and "(n = 200, one-sided)" in done and "None" not in done


def test_main_writes_no_candidate_without_running_anything(tmp_path):
    _selectors_json(tmp_path, {"kmeans": (0.01, 0.0, 0.0), "dpp": (0.02, 0.0, 0.0), "forgetting": (0.0, 0.0, 0.0)})
    markdown = main_command(tmp_path, tmp_path / "cache", command="test")
    data = json.loads((tmp_path / "confirm.json").read_text())
    assert data["choice"]["outcome"] == "no candidate" and data["runs"] == [] and data["analysis"] is None
    assert "no confirmatory grid is run" in markdown.read_text() and not (tmp_path / "bench_runs").exists()


def test_script_refuses_an_unfinished_grid_with_exit_code_2(tmp_path):
    _selectors_json(tmp_path, {}, skip=lambda c: c.get("seed") == 5)
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "confirm.py"), "--results-dir", str(tmp_path),
                           "--cache-dir", str(tmp_path / "cache")], capture_output=True, text=True, timeout=300)
    assert done.returncode == 2 and "the k=10 part of the selectors grid is not finished" in done.stderr


def test_named_prompt_sets_include_the_unseen_harmful_benchmarks(shared_data):
    from safekeel.eval.harness import load_prompt_set

    name, prompts = load_prompt_set("harmbench-standard")
    assert name == "harmbench-standard" and len(prompts) == 200 and len(set(prompts)) == 200
    assert len(load_prompt_set("jbb-harmful")[1]) == 100
    _, unseen = load_prompt_set("advbench-unseen")
    seen = set(load_prompt_set("advbench-train")[1]) | set(load_prompt_set("advbench-dev")[1])
    assert len(unseen) == 52 and not set(unseen) & seen
    with pytest.raises(ValueError, match="unknown HarmBench functional category 'nonsense'; known: standard, contextual, copyright"):
        load_prompt_set("harmbench-nonsense")


def test_committed_selectors_records_keep_their_run_ids():
    """EvalSettings fields added after the grid started are hashed only when set: every committed record of
    the selectors grid must still be one of the grid's runs, or a restarted grid would redo them."""
    committed = {path.stem for path in (ROOT / "benchmarks" / "results" / "bench_runs" / "selectors").glob("*.json")}
    assert committed, "no committed selectors records"
    assert committed <= {run_id(c) for c in expand(selectors_grid())}
    assert all("extra_harmful_sets" not in c["eval"] for c in expand(selectors_grid()))
