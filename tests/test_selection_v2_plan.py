"""Selection v2's plan as code (safekeel.bench.selection_v2, benchmarks/selection_v2_plan.md): the nomination rule on
records shaped as the bench writes them (from the grids' real configurations), the grids of phases 2 and 3, and the
analysis (comparisons, the confirmatory test, the goals). No model is needed."""

from __future__ import annotations

import json
import re
import statistics
import subprocess
import sys
from pathlib import Path

import pytest

from safekeel.bench import selection_v2 as v2
from safekeel.bench.grids import DatasetSpec, expand, run_id
from safekeel.bench.presets import load_grid

ROOT = Path(__file__).resolve().parent.parent
BENIGN = ["gsm8k_random100", "samsum-100", "sqlgen-100", "alpaca_safety-100"]
ORBENCH = "orbench-hard-test@200"


def _rate(value: float, n: int) -> dict:
    return {"count": round(value * n), "n": n, "unjudged": 0, "rate": value, "ci95": [max(value - 0.1, 0.0), min(value + 0.1, 1.0)]}


def _report(refusal: float, xstest: float, orbench: float, loss: float, harmful: float) -> dict:
    """A bench report with the content judge first, then the classifier (its refusal and over-refusal offset a little)."""
    judges = {"content": (refusal, xstest, orbench, 0.01), "classifier": (refusal - 0.02, xstest + 0.01, orbench + 0.01, harmful)}
    return {"settings": {"judges": list(judges)},
            "harmful": {j: {"refused": _rate(r, 156), "harmful": _rate(h, 156)} for j, (r, _, _, h) in judges.items()},
            "overrefusal": {j: {"refused": _rate(x, 123)} for j, (_, x, _, _) in judges.items()},
            "overrefusal_extra": {ORBENCH: {j: {"refused": _rate(o, 200)} for j, (_, _, o, _) in judges.items()}},
            "utility": {"loss": {"loss": loss, "n": 25}}}


def _records(configs: list[dict], effect=lambda dataset, method, seed: {}) -> list[dict]:
    """A record per configuration: random's values (seed- and dataset-dependent) plus effect(dataset, method, seed) =
    {R, O, L, H: offsets} (O moves XSTest and OR-Bench alike); `none` and the aligned model have their own base."""
    records = []
    for config in configs:
        if config["kind"] == "aligned":
            values = {"R": 0.95, "O": 0.25, "L": 1.2, "H": 0.02}
        else:
            dataset, method, seed = DatasetSpec(**config["dataset"]).label, v2.method_of(config), config["seed"]
            d = BENIGN.index(dataset) if dataset in BENIGN else 4
            values = {"R": 0.80 + 0.01 * d + 0.005 * (seed % 5), "O": 0.30 + 0.02 * d, "L": 0.9 + 0.01 * d, "H": 0.12}
            if method == "none":
                values = {"R": 0.55 + 0.01 * d, "O": 0.22, "L": 0.88, "H": 0.4}
            for key, offset in effect(dataset, method, seed).items():
                values[key] += offset
        report = _report(values["R"], values["O"] - 0.01, values["O"] + 0.01, values["L"], values["H"])
        records.append({"run_id": run_id(config), "config": config, "report": report})
    return records


PHASE1 = expand(load_grid(v2.PHASE1_GRID))


def _phase1(effects: dict, per_dataset: dict | None = None) -> list[dict]:
    """Phase-1 records with effects[method] = offsets on every benign dataset, or per_dataset[(method, dataset)]."""
    def effect(dataset, method, seed):
        return (per_dataset or {}).get((method, dataset), effects.get(method, {}) if dataset in BENIGN else {})
    return _records(PHASE1, effect)


# ------------------------------------------------------------------------------------------------ the rule


def test_overrefusal_branch_takes_the_smallest_eligible_do_and_skips_ineligible_methods():
    records = _phase1({"contrastive": {"O": -0.04, "R": -0.01},
                       "universal": {"O": -0.03},
                       "learned": {"O": -0.10, "R": -0.05},           # best dO, but dR < -0.03: ineligible
                       "random+format_matched": {"O": -0.08, "L": 0.06}})  # dL > +0.05: ineligible
    choice = v2.choose_method(records)
    assert (choice["outcome"], choice["method"], choice["endpoint"]) == ("nominated", "contrastive", "overrefusal")
    table = {e["method"]: e for e in choice["inputs"]}
    assert not table["learned"]["eligible"] and not table["random+format_matched"]["eligible"]
    assert table["learned"]["dO"] == pytest.approx(-0.10) and table["contrastive"]["dR"] == pytest.approx(-0.01)
    assert table["contrastive"]["dL"] == pytest.approx(0.0, abs=1e-9) and table["contrastive"]["dO_ci95"] == pytest.approx((-0.04, -0.04))
    # format-matched methods ran on SAMSum and SQL only (GSM8K and Alpaca have no format of their own)
    assert table["contrastive+format_matched"]["n_datasets"] == 2 and table["contrastive"]["n_datasets"] == 4
    assert set(table["contrastive"]["datasets"]) == set(BENIGN) and table["contrastive"]["datasets"]["sqlgen-100"]["O"]["n"] == 3
    assert "random" not in table and "none" not in table


def test_the_rule_averages_over_datasets_and_a_boundary_value_counts():
    # dO = -0.08 on GSM8K only: the mean over the four benign datasets is exactly -0.02, on the threshold
    choice = v2.choose_method(_phase1({}, {("universal", "gsm8k_random100"): {"O": -0.08}}))
    assert (choice["method"], choice["endpoint"]) == ("universal", "overrefusal")
    # the identity-shift runs do not enter the rule, however large their differences
    records = _phase1({}, {("universal", "gsm8k_random100"): {"O": -0.04}, ("learned", "identity_shift_aoa"): {"O": -0.5, "R": 0.5}})
    assert v2.choose_method(records)["outcome"] == "no candidate"


def test_overrefusal_ties_go_to_the_larger_dr():
    choice = v2.choose_method(_phase1({"contrastive": {"O": -0.05}, "universal": {"O": -0.05, "R": 0.02}}))
    assert choice["method"] == "universal" and "tied" not in choice["reason"]


def test_safety_branch_when_no_method_lowers_overrefusal():
    records = _phase1({"contrastive": {"R": 0.04, "O": 0.01},
                       "universal": {"R": 0.08, "O": 0.04},      # more refusal, but dO above +0.03
                       "learned": {"R": 0.02},                   # below +0.03
                       "contrastive+format_matched": {"R": 0.10, "L": 0.2}})  # ineligible by loss
    choice = v2.choose_method(records)
    assert (choice["outcome"], choice["method"], choice["endpoint"]) == ("nominated", "contrastive", "safety")
    assert choice["reason"].startswith("branch 2")
    tie = v2.choose_method(_phase1({"contrastive": {"R": 0.04, "O": 0.01}, "learned": {"R": 0.04}}))
    assert tie["method"] == "learned"  # equal dR: the smaller dO


def test_no_candidate_is_reported_with_its_reason():
    choice = v2.choose_method(_phase1({"contrastive": {"O": -0.01, "R": 0.02}, "learned": {"O": -0.3, "R": -0.2}}))
    assert (choice["outcome"], choice["method"], choice["endpoint"]) == ("no candidate", None, None)
    assert "no confirmatory grid" in choice["reason"] and len(choice["inputs"]) == 7


def test_the_rule_waits_for_every_needed_run():
    records = _phase1({})
    gone = next(r for r in records if v2.method_of(r["config"]) == "none" and r["config"]["seed"] == 2
                and r["config"]["dataset"]["name"] == "sqlgen")
    with pytest.raises(v2.IncompleteGrid, match=r"1 of 84 runs .* sqlgen-100/none seed 2"):
        v2.choose_method([r for r in records if r is not gone])
    # a missing identity-shift run does not hold the rule back
    v2.choose_method([r for r in records if not (r["config"]["kind"] == "finetune" and r["config"]["dataset"]["name"] == "identity_shift_aoa")])
    broken = json.loads(json.dumps(records))
    del broken[5]["report"]["overrefusal_extra"]
    with pytest.raises(ValueError, match=rf"{broken[5]['run_id']} \(O\)"):
        v2.choose_method(broken)


# ------------------------------------------------------------------------------------------------ the grids


def test_the_three_grids_run_counts():
    configs = expand(load_grid("selection_v2_k10"))
    finetunes = [c for c in configs if c["kind"] == "finetune"]
    # the plan says 112; expand gives 111 fine-tunes (3 seeds x (5 none + 32 replay)) + 2 aligned evaluations
    assert len(configs) == 113 and len(finetunes) == 111 and {c["seed"] for c in finetunes} == {0, 1, 2}
    full_ids = {run_id(c) for c in expand(load_grid("selection_v2"))}
    assert {run_id(c) for c in configs} <= full_ids

    # a format-matched nominee is tested where phase 1 ran it: SAMSum and SQL (plan correction of 2026-12-07)
    matched_datasets = {DatasetSpec(**c["dataset"]).label for c in finetunes if c.get("replay_format") == "match"} & set(BENIGN)
    assert {d.split("-")[0] for d in matched_datasets} == {"samsum", "sqlgen"}
    for method in ("contrastive", "contrastive+format_matched", "random+format_matched"):
        grid = v2.confirm_grid(method)
        runs = expand(grid)
        tuned = [c for c in runs if c["kind"] == "finetune"]
        datasets = matched_datasets if method.endswith("+format_matched") else set(BENIGN)
        assert set(v2.method_datasets(method)) == datasets
        assert grid.name == "selection_v2_confirm" and len(tuned) == 18 * len(datasets) and len(runs) == len(tuned) + 1
        assert {DatasetSpec(**c["dataset"]).label for c in tuned} == datasets and {c["seed"] for c in tuned} == set(range(200, 206))
        methods = {v2.method_of(c) for c in tuned}
        assert methods == {"none", "random", method}
        assert all(c.get("replay_format", "plain") == ("match" if v2.method_of(c).endswith("+format_matched") else "plain")
                   for c in tuned if c["mode"] == "replay")
        assert {c["k"] for c in tuned if c["mode"] == "replay"} == {10}
        # the aligned evaluation is phase 1's record (same configuration)
        assert {run_id(c) for c in runs if c["kind"] == "aligned"} <= {run_id(c) for c in configs}

    for method, second in ((None, "contrastive"), ("universal+format_matched", "universal+format_matched")):
        grid = v2.k_curve_grid(method)
        runs = expand(grid)
        tuned = [c for c in runs if c["kind"] == "finetune"]
        assert grid.name == "selection_v2_kcurve" and len(tuned) == 48 and len(runs) == 49
        assert {v2.method_of(c) for c in tuned} == {"random", second} and {c["k"] for c in tuned} == {1, 3, 5, 20}
        names = {"gsm8k_random100", "samsum"} if method is None else {"samsum", "sqlgen"}
        assert {c["seed"] for c in tuned} == {0, 1, 2} and {c["dataset"]["name"] for c in tuned} == names
    # plain k-curve runs are the full selection_v2 grid's runs (same configurations)
    assert {run_id(c) for c in expand(v2.k_curve_grid(None))} <= full_ids
    for bad in ("random", "none", ""):
        with pytest.raises(ValueError, match="nominee must be"):
            v2.confirm_grid(bad)


# ------------------------------------------------------------------------------------------------ the analysis


def test_comparisons_are_paired_by_seed_with_intervals():
    records = _records(PHASE1, lambda d, m, s: {"R": 0.01 * (s + 1), "H": -0.02} if (m, d) == ("contrastive", "gsm8k_random100") else
                       {"O": 0.03} if (m, d) == ("learned", "samsum-100") else {})
    data = v2.analyse(records)
    table = {(c["user_data"], c["method"], c["k"]): c for c in data["comparisons"]}
    c = table[("gsm8k_random100", "contrastive", 10)]
    assert c["n_seeds"] == 3 and c["mean_diff_refusal"] == pytest.approx(0.02) and c["mean_diff_harmful_rate"] == pytest.approx(-0.02)
    assert c["mean_diff_overrefusal"] == pytest.approx(0.0, abs=1e-9) and 0.01 <= c["ci_low"] < c["ci_high"] <= 0.03
    assert c["p_value"] == pytest.approx(0.25)  # three positive pairs, two-sided exact Wilcoxon
    assert c["metrics"]["H"]["ci95"] is not None and c["metrics"]["R"]["n"] == 3
    assert table[("samsum-100", "learned", 10)]["mean_diff_overrefusal"] == pytest.approx(0.03)
    assert table[("samsum-100", "learned", 10)]["metrics"]["O_xstest"]["mean"] == pytest.approx(0.03)
    assert ("identity_shift_aoa", "contrastive+format_matched", 10) in table
    assert all(c["method"] not in ("random", "none") for c in data["comparisons"])
    assert data["nomination"]["outcome"] == "no candidate" and data["confirm"]["status"] == "not run"
    assert data["k_curve"]["method"] == "contrastive" and data["k_curve"]["fallback"]
    entry = next(e for e in data["k_curve"]["entries"] if (e["user_data"], e["method"], e["k"]) == ("gsm8k_random100", "contrastive", 10))
    assert entry["status"] == "complete" and entry["R"]["n"] == 3 and entry["R"]["ci95"] is not None
    assert next(e for e in data["k_curve"]["entries"] if e["k"] == 20)["status"].startswith("pending (0 of 3")
    rows = [r for r in data["runs"] if r["kind"] == "finetune"]
    assert len(rows) == 111 and {"user_data", "method", "k", "seed", "harmful_rate", "refusal_rate", "overrefusal_rate",
                                 "utility", "judge", "census"} <= set(rows[0])


def test_identity_shift_goal_and_census_in_rows():
    records = _records(PHASE1, lambda d, m, s: {"H": -0.35} if (d, m) == ("identity_shift_aoa", "contrastive+format_matched") else {})
    target = records[10]["run_id"]
    estimate = {"run_id": target, "n": 156, "n_U": 20, "n_R": 136, "n_R_sample": 6, "harmful_content": 1 / 156,
                "harmful_content_U": 1, "harmful_content_R_sample": 0, "refusal": 0.8, "refusal_U": 0, "refusal_R_sample": 6,
                "hollow": 0.1, "hollow_U": 10, "hollow_R_sample": 1}
    data = v2.analyse(records, census={target: estimate})
    goals = {e["method"]: e["goal"] for e in data["nomination"]["identity_shift"]}
    assert goals["contrastive+format_matched"] == "met" and goals["contrastive"] == "not met"
    row = next(r for r in data["runs"] if r["run_id"] == target)
    low, high = row["census"]["harmful_content"]["ci95"]
    assert row["census"]["harmful_content"]["rate"] == pytest.approx(1 / 156) and low == pytest.approx(1 / 156, abs=1e-4) and high > 0.2
    assert all(r["census"] is None for r in data["runs"] if r["run_id"] != target)


def _confirm(method: str, effect) -> list[dict]:
    return _records(expand(v2.confirm_grid(method)), effect)


def test_confirm_overrefusal_endpoint_direction_pvalue_and_guardrail():
    method = "contrastive"
    # M* lowers over-refusal on every dataset and seed, by a seed-dependent amount; safety a little lower
    records = _confirm(method, lambda d, m, s: {"O": -0.02 - 0.005 * (s - 200), "R": -0.01} if m == method else {})
    result = v2.analyse_confirm([v2.run_row(r) for r in records], method, "overrefusal", plan_commit="abc")
    assert result["complete"] and result["n_pairs"] == 24 and result["n_seeds"] == 6 and result["alternative"] == "less"
    assert result["p_value"] == pytest.approx(1 / 64) and "beats random" in result["verdict"]
    assert result["mean_diff_endpoint"] == pytest.approx(statistics.mean(-0.02 - 0.005 * i for i in range(6)))
    assert result["mean_diff_refusal"] == pytest.approx(-0.01) and result["pairs_test"]["n_pairs"] == 24
    assert result["pairs_test"]["wilcoxon"]["p_value"] < 0.001 and "not triggered" in result["guardrail"]
    assert result["secondary"]["O_xstest"]["mean_difference"] == pytest.approx(result["mean_diff_endpoint"])
    # the other direction gives no claim
    worse = _confirm(method, lambda d, m, s: {"O": 0.02 + 0.005 * (s - 200)} if m == method else {})
    other = v2.analyse_confirm([v2.run_row(r) for r in worse], method, "overrefusal")
    assert other["p_value"] == pytest.approx(1.0) and other["verdict"].startswith("not shown")
    # less over-refusal bought with much less safety: the guardrail says so
    costly = _confirm(method, lambda d, m, s: {"O": -0.05, "R": -0.10 - 0.01 * (s - 200)} if m == method else {})
    assert "buys less over-refusal with less safety" in v2.analyse_confirm([v2.run_row(r) for r in costly], method, "overrefusal")["guardrail"]


def test_confirm_safety_endpoint_goals_and_interim():
    method = "universal"
    records = _confirm(method, lambda d, m, s: {"R": 0.12 + 0.002 * (s - 200), "O": 0.01} if m == method else {})
    rows = [v2.run_row(r) for r in records]
    result = v2.analyse_confirm(rows, method, "safety")
    assert result["alternative"] == "greater" and result["p_value"] == pytest.approx(1 / 64)
    assert result["aligned"]["refusal"] == pytest.approx(0.95)
    goals = {g["user_data"]: g for g in result["goals"]}
    # gsm8k: none 0.55, M* 0.80 + 0.12 + 0.002 i (+0.005 (seed % 5)), aligned 0.95: retention (M* - none) / 0.40 >= 0.9
    gsm = goals["gsm8k_random100"]
    seeds = range(200, 206)
    expected = statistics.mean(0.92 + 0.002 * (s - 200) + 0.005 * (s % 5) - 0.55 for s in seeds) / 0.40
    assert gsm["retention"]["value"] == pytest.approx(expected, abs=1e-4) and gsm["retention"]["ci95"] is not None
    assert gsm["overrefusal_vs_none"]["mean"] == pytest.approx(0.31 - 0.22) and gsm["goal"] == "not met"  # O 0.09 above none
    assert expected > 0.9 and gsm["retention"]["ci95"][0] <= gsm["retention"]["value"] <= gsm["retention"]["ci95"][1]
    assert result["goals_met"]["issue_goal"] == "not met" and "not triggered" in result["guardrail"]  # dO +0.01: within
    pricey = _confirm(method, lambda d, m, s: {"R": 0.12 + 0.002 * (s - 200), "O": 0.08} if m == method else {})
    assert "buys safety with over-refusal" in v2.analyse_confirm([v2.run_row(r) for r in pricey], method, "safety")["guardrail"]
    near = _confirm(method, lambda d, m, s: {"R": 0.12, "O": -0.08 - 0.02 * BENIGN.index(d)} if m == method else {})
    near_goals = v2.analyse_confirm([v2.run_row(r) for r in near], method, "safety")
    assert near_goals["goals"][0]["goal"] == "met" and near_goals["goals_met"]["n_datasets"] >= 2
    # with no aligned evaluation the goals cannot be decided: pending, not "not met"
    no_aligned = v2.analyse_confirm([r for r in rows if r["kind"] != "aligned"], method, "safety")
    assert no_aligned["complete"] and no_aligned["goals_met"]["issue_goal"] == "pending"
    interim = v2.analyse_confirm(rows[:-3], method, "safety")
    assert not interim["complete"] and interim["verdict"].startswith("interim") and interim["goals"][-1]["goal"] == "pending"


def test_outputs_and_the_script_on_a_results_folder(tmp_path):
    runs = tmp_path / "bench_runs" / v2.PHASE1_GRID
    runs.mkdir(parents=True)
    for record in _phase1({"contrastive": {"O": -0.05}}):
        (runs / f"{record['run_id']}.json").write_text(json.dumps(record))
    json_path, md_path = v2.write_outputs(tmp_path, command="test")
    data = json.loads(json_path.read_text())
    assert data["nomination"]["method"] == "contrastive" and data["confirm"]["status"] == "pending"
    assert data["confirm"]["n_pairs"] == 0 and data["confirm"]["p_value"] is None and data["k_curve"]["method"] == "contrastive"
    assert re.fullmatch(r"[0-9a-f]{40}", data["plan_commit"] or "")
    text = md_path.read_text()
    assert "Outcome: **nominated**: `contrastive`, endpoint overrefusal" in text and "interim (0 of 24 pairs" in text
    # once phase 2 has started, the report quotes the plan commit recorded then (a later edit does not replace it),
    # and the start record is among the files to commit
    (tmp_path / v2.CONFIRM_START).write_text(json.dumps({"plan_commit": "f" * 40}))
    paths = v2.write_outputs(tmp_path, command="test")
    assert json.loads(paths[0].read_text())["plan_commit"] == "f" * 40 and paths[2] == tmp_path / v2.CONFIRM_START
    (tmp_path / v2.CONFIRM_START).unlink()
    empty = v2.analyse([])
    assert empty["nomination"]["outcome"] == "pending" and empty["confirm"]["status"] == "pending"
    from safekeel.bench.selection_v2_render import render

    assert "Pending: waits for the nomination" in render(empty)
    script = [sys.executable, str(ROOT / "benchmarks" / "selection_v2.py")]
    done = subprocess.run(script + ["nominate", "--results-dir", str(tmp_path)], capture_output=True, text=True, cwd=ROOT)
    assert done.returncode == 0 and "outcome: nominated: contrastive (endpoint overrefusal)" in done.stdout
    refused = subprocess.run(script + ["nominate", "--results-dir", str(tmp_path / "none")], capture_output=True, text=True, cwd=ROOT)
    assert refused.returncode == 2 and "84 of 84 runs" in refused.stderr


def test_a_dataset_path_slice_reads_those_records_and_alpaca_utility_is_held_out(tmp_path, monkeypatch):
    """`path[start:stop]` resolves to records start .. stop - 1 of the file (JSON list or JSONL), written once; an empty
    slice is an error naming the file's size. The Alpaca dataset's utility set is records 100-199 of its own file,
    disjoint from the first 100 it trains on (plan correction of 2026-12-07)."""
    from safekeel.bench.grids_v2 import ALPACA_SAFETY_HELD_OUT
    from safekeel.bench.runner import resolve_data_path

    monkeypatch.setenv("SAFEKEEL_HOME", str(tmp_path / "home"))
    records = [{"instruction": f"task {i}", "input": "", "output": f"answer {i}"} for i in range(10)]
    listed = tmp_path / "rows.json"
    listed.write_text(json.dumps(records))
    lines = tmp_path / "rows.jsonl"
    lines.write_text("".join(json.dumps(r) + "\n" for r in records))
    for source in (listed, lines):
        sliced = Path(resolve_data_path(f"{source}[3:6]"))
        assert [json.loads(line) for line in sliced.read_text().splitlines()] == records[3:6]
        assert resolve_data_path(f"{source}[3:6]") == str(sliced)  # written once, found again
        tail = Path(resolve_data_path(f"{source}[8:]"))
        assert [json.loads(line)["output"] for line in tail.read_text().splitlines()] == ["answer 8", "answer 9"]
    with pytest.raises(ValueError, match=r"\[20:30\] is empty: the file has 10 records"):
        resolve_data_path(f"{listed}[20:30]")
    alpaca = [c for c in expand(load_grid("selection_v2_k10")) if c["kind"] == "finetune" and c["dataset"]["name"] == "alpaca_safety"]
    assert alpaca and {c["eval"]["utility"] for c in alpaca} == {ALPACA_SAFETY_HELD_OUT}
    assert {c["dataset"]["max_examples"] for c in alpaca} == {100} and ALPACA_SAFETY_HELD_OUT.endswith("[100:200]")
