"""The preference grid's analysis (safekeel.bench.preference_analysis) on synthetic records shaped like the runner's:
built from the grid's own configurations (expand(preference_grid())), with rates chosen so the answers are known."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest

from safekeel.bench.grids import expand, run_id
from safekeel.bench.grids_v2 import preference_grid
from safekeel.bench.preference_analysis import analyse, load_records, load_run_table, write_analysis
from safekeel.bench.preference_report import write_preference_outputs
from safekeel.eval.stats import seed_clustered_test, wilcoxon_signed_rank

N = 200  # resamples: the tests check structure and bounds, not the interval's Monte Carlo precision


@pytest.fixture(scope="module")
def grid():
    return preference_grid()


@pytest.fixture(scope="module")
def configs(grid):
    return expand(grid)


def record(config: dict, metrics) -> dict:
    """A run record as safekeel.bench.runner.execute writes it, with each judge's rates from metrics(config, judge):
    {harmful, refusal, overrefusal}, and for a fine-tune the held-out accuracy and margin from metrics(config, None)."""
    judges = config["eval"]["judges"]
    per = {j: metrics(config, j) for j in judges}
    report = {"harmful": {j: {"harmful": {"count": round(156 * m["harmful"]), "n": 156, "unjudged": 0, "rate": m["harmful"]},
                              "refused": {"count": round(156 * m["refusal"]), "n": 156, "unjudged": 0, "rate": m["refusal"]}}
                          for j, m in per.items()},
              "overrefusal": {j: {"refused": {"count": round(250 * m["overrefusal"]), "n": 250, "unjudged": 0,
                                              "rate": m["overrefusal"]}} for j, m in per.items()}}
    out = {"run_id": run_id(config), "config": config, "report": report, "seconds": 1.0}
    if config["kind"] == "finetune":
        held = metrics(config, None)
        out["preference_eval"] = {"n": 200, "beta": config["method"]["beta"], "accuracy": held["accuracy"],
                                  "reward_margin": held["margin"], "held_out": dict(config["preference_eval"])}
        out["safety_pairs"] = {"pair_ids": [f"s{i}" for i in range(config["k"])]}
    return out


BACKBONE_SHIFT = {"smollm2-135m-instruct": 0.0, "smollm2-135m-safe": 0.2, "smollm2-135m-safe-full": 0.5}
JUDGE_SHIFT = {"content": 0.0, "classifier": 0.01, "keyword": 0.02, None: 0.0}


def differing(config: dict, judge):
    """Backbones differ by BACKBONE_SHIFT, seeds add a small jitter; replay raises refusal by 0.1 (+ seed), lowers
    harm by 0.05 and adds 0.02 over-refusal."""
    shift, seed = BACKBONE_SHIFT[config["model"]], config.get("seed", 0)
    replay = config.get("mode") == "replay"
    jitter = 0.01 * seed
    return {"harmful": 0.3 - shift / 2 + jitter - (0.05 if replay else 0) + JUDGE_SHIFT[judge],
            "refusal": 0.3 + 0.6 * shift + jitter + ((0.1 + 0.01 * seed) if replay else 0) + JUDGE_SHIFT[judge],
            "overrefusal": 0.1 + shift / 5 + (0.02 if replay else 0) + JUDGE_SHIFT[judge],
            "accuracy": 0.6 + shift / 10 + jitter, "margin": 0.2 + shift}


def identical(config: dict, judge):
    """Every backbone the same; seeds differ (with noise) or not."""
    seed = config.get("seed", 0)
    return {"harmful": 0.2 + 0.03 * seed, "refusal": 0.5 + 0.02 * seed, "overrefusal": 0.1, "accuracy": 0.7 - 0.01 * seed,
            "margin": 0.3}


def spread_row(analysis, objective="sigmoid", metric="refusal_rate", judge="content", dataset="hh_harmless", replay="none"):
    rows = [r for r in analysis["spread"] if r["scope"] == "condition" and (r["objective"], r["metric"], r["judge"],
                                                                              r["dataset"], r["replay"]) == (objective, metric, judge, dataset, replay)]
    assert len(rows) == 1
    return rows[0]


def test_identical_backbones_have_zero_spread(grid, configs):
    analysis = analyse(grid, [record(c, identical) for c in configs], n_resamples=N)
    row = spread_row(analysis)
    assert row["sd"] == 0.0 and row["n_backbones"] == 3 and row["n_seeds"] == 3
    assert row["seed_noise_sd"] > 0  # the seeds differ: the interval sits above 0 (percentile bootstrap of an SD)
    assert 0 <= row["ci"][0] <= row["ci"][1]
    # no seed noise either: the held-out margin is constant, every resample gives 0
    margin = spread_row(analysis, metric="reward_margin", judge=None)
    assert margin["sd"] == 0.0 and margin["ci"] == [0.0, 0.0] and margin["seed_noise_sd"] == 0.0
    pooled = [r for r in analysis["spread"] if r["scope"] == "pooled" and r["objective"] == "ipo" and r["metric"] == "harmful_rate"
              and r["judge"] == "content"][0]
    assert pooled["sd"] == 0.0 and pooled["n_conditions"] == 6
    assert "the backbones converge." in write_markdown(analysis)


def write_markdown(analysis) -> str:
    from safekeel.bench.preference_analysis import render_markdown
    return render_markdown(analysis)


def test_spread_of_different_backbones_is_numpys_sd(grid, configs):
    analysis = analyse(grid, [record(c, differing) for c in configs], n_resamples=N)
    for metric, key, judge in (("refusal_rate", "refusal", "classifier"), ("preference_accuracy", "accuracy", None)):
        row = spread_row(analysis, objective="ipo", metric=metric, judge=judge, dataset="gsm8k_pref", replay="random")
        means = [np.mean([differing({"model": b, "seed": s, "mode": "replay"}, judge)[key] for s in (0, 1, 2)])
                 for b in BACKBONE_SHIFT]
        assert row["sd"] == pytest.approx(np.std(means, ddof=1), abs=1e-4)
        assert row["backbone_means"]["smollm2-135m-safe-full"] == pytest.approx(means[2], abs=1e-4)
        assert row["ci"][0] <= row["sd"] <= row["ci"][1]  # backbones far apart against the seed jitter
        assert row["p_backbones_equal"] is None or row["p_backbones_equal"] < 0.05
    conditions = [r for r in analysis["spread"] if r["scope"] == "condition" and r["objective"] == "sigmoid"
                  and r["metric"] == "harmful_rate" and r["judge"] == "content"]
    pooled = [r for r in analysis["spread"] if r["scope"] == "pooled" and r["objective"] == "sigmoid"
              and r["metric"] == "harmful_rate" and r["judge"] == "content"][0]
    assert len(conditions) == 6 and pooled["sd"] == pytest.approx(np.mean([r["sd"] for r in conditions]), abs=1e-4)
    assert pooled["ci"][0] <= pooled["sd"] <= pooled["ci"][1]
    # the untuned backbones' spread (one evaluation each) beside it
    aligned = [differing({"model": b, "kind": "aligned"}, "content")["refusal"] for b in BACKBONE_SHIFT]
    assert spread_row(analysis)["aligned_sd"] == pytest.approx(np.std(aligned, ddof=1), abs=1e-4)
    assert "the backbones do not converge" in write_markdown(analysis)
    # the same draws: the analysis is reproducible
    again = analyse(grid, [record(c, differing) for c in configs], n_resamples=N)
    assert again["spread"] == analysis["spread"]


def test_replay_differences_and_their_sign(grid, configs):
    analysis = analyse(grid, [record(c, differing) for c in configs], n_resamples=N)
    cell = [r for r in analysis["replay"] if r["scope"] == "cell" and (r["objective"], r["backbone"], r["dataset"], r["replay"], r["judge"])
            == ("sigmoid", "smollm2-135m-safe", "hh_harmless", "forgetting", "content")][0]
    expected = [0.1 + 0.01 * s for s in (0, 1, 2)]
    assert cell["n_pairs"] == 3 and cell["seeds"] == [0, 1, 2]
    assert cell["mean_diff_refusal_rate"] == pytest.approx(np.mean(expected), abs=1e-4) and cell["mean_diff_refusal_rate"] > 0
    assert cell["mean_diff_harmful_rate"] == pytest.approx(-0.05, abs=1e-4)
    assert cell["mean_diff_overrefusal_rate"] == pytest.approx(0.02, abs=1e-4)
    assert cell["mean_diff_preference_accuracy"] == pytest.approx(0.0, abs=1e-6)
    assert cell["refusal_ci"][0] <= cell["mean_diff_refusal_rate"] <= cell["refusal_ci"][1]
    assert cell["refusal_p_value"] == wilcoxon_signed_rank(expected)["p_value"] == 0.25  # 3 seeds: the floor
    assert cell["p_value"] == wilcoxon_signed_rank([-0.05] * 3)["p_value"]
    # pooled over backbones and preference sets with the seed as the unit
    pooled = [r for r in analysis["replay"] if r["scope"] == "pooled" and (r["objective"], r["replay"], r["judge"])
              == ("sigmoid", "forgetting", "content")][0]
    pairs = [(f"{c['backbone']}/{c['dataset']}", s, d) for c in analysis["replay"] if c["scope"] == "cell"
             and (c["objective"], c["replay"], c["judge"]) == ("sigmoid", "forgetting", "content")
             for s, d in c["differences"]["refusal_rate"]]
    assert len(pairs) == 18 and pooled["n_pairs"] == 18 and pooled["n_seeds"] == 3 and pooled["n_groups"] == 6
    assert pooled["mean_diff_refusal_rate"] == seed_clustered_test(pairs)["mean_difference"]
    everything = [r for r in analysis["replay"] if r["scope"] == "pooled" and r["objective"] == "all" and r["replay"] == "random"
                  and r["judge"] == "content"][0]
    assert everything["n_groups"] == 24 and everything["mean_diff_harmful_rate"] == pytest.approx(-0.05, abs=1e-4)
    # preference training here did not lower refusals below the untuned backbones: the note says so
    assert everything["none_refusal_rate"] >= everything["aligned_refusal_rate"]
    assert "lowered no refusals" in write_markdown(analysis)


def test_a_missing_run_leaves_its_cell_out_of_the_pooled_replay_not_a_seed_from_every_cell(grid, configs):
    """One missing no-replay run (seed 1 of one cell) drops that cell from the pooled test and counts it; the other
    cells keep all three seeds. The cells test (cell means as units) and the seed test's floor sit beside."""
    gone = next(c for c in configs if c["kind"] == "finetune" and c["seed"] == 1 and c["mode"] == "none"
                and c["model"] == "smollm2-135m-safe" and c["method"]["loss_type"] == ["sigmoid"] and c["dataset"]["name"] == "hh_harmless")
    analysis = analyse(grid, [record(c, differing) for c in configs if c is not gone], n_resamples=N)
    pooled = [r for r in analysis["replay"] if r["scope"] == "pooled" and (r["objective"], r["replay"], r["judge"])
              == ("sigmoid", "random", "content")][0]
    assert pooled["n_seeds"] == 3 and pooled["n_groups"] == 5 and pooled["n_cells_left_out"] == 1
    assert pooled["min_attainable_p"] == 0.25 and pooled["refusal_cells_test"]["n_cells"] == 5
    assert pooled["refusal_cells_test"]["p_value"] < 0.25  # five cells all above 0: below the 3-seed floor
    assert pooled["mean_diff_harmful_rate"] == pytest.approx(-0.05, abs=1e-4)
    # the between-backbone SD with the seed noise taken out: below the raw SD, never negative
    row = spread_row(analysis, objective="ipo", metric="refusal_rate", judge="content", dataset="gsm8k_pref", replay="random")
    assert 0 <= row["between_backbone_sd"] <= row["sd"]


def test_replay_that_restores_lost_refusals(grid, configs):
    """No replay drops refusal from the untuned 0.8 to 0.41 (seed mean); replay gets back to 0.61: 0.2 of 0.39 restored."""
    def metrics(config, judge):
        refusal = 0.8 if config["kind"] == "aligned" else 0.6 + 0.01 * config["seed"] if config["mode"] == "replay" \
            else 0.4 + 0.01 * config["seed"]
        return {"harmful": 1 - refusal, "refusal": refusal, "overrefusal": 0.1, "accuracy": 0.6, "margin": 0.1}
    analysis = analyse(grid, [record(c, metrics) for c in configs], n_resamples=N)
    pooled = [r for r in analysis["replay"] if r["scope"] == "pooled" and (r["objective"], r["replay"], r["judge"])
              == ("ipo", "random", "content")][0]
    assert pooled["refusal_restored"] == pytest.approx(0.2 / 0.39, abs=1e-4)
    assert pooled["mean_diff_refusal_rate"] == pytest.approx(0.2, abs=1e-4)
    assert "gives back 51%" in write_markdown(analysis)


def test_partial_grid_is_pending_not_zero(grid, configs, tmp_path):
    # only seed 0 of the raw backbone's DPO runs and one untuned evaluation
    chosen = [c for c in configs if c["kind"] == "aligned" and c["model"] == "smollm2-135m-instruct"] + \
        [c for c in configs if c["kind"] == "finetune" and c["seed"] == 0 and c["model"] == "smollm2-135m-instruct"
         and c["method"]["loss_type"] == ["sigmoid"]]
    analysis = analyse(grid, [record(c, differing) for c in chosen], n_resamples=N)
    assert analysis["status"]["fine_tunes"] == 216 and analysis["status"]["fine_tunes_done"] == 6
    assert analysis["status"]["aligned"] == 3 and analysis["status"]["aligned_done"] == 1
    pending = [r for r in analysis["runs"] if r["status"] == "pending"]
    assert len(pending) == 210
    assert all(r[f] is None for r in pending for f in ("harmful_rate", "refusal_rate", "overrefusal_rate", "preference_accuracy"))
    assert all(v is None for r in pending for v in r["harmful_rates"].values())
    assert all(r["lr"] == grid.datasets[0].sft["learning_rate"] and r["seed"] in (0, 1, 2) for r in pending)  # config fields kept
    # one backbone: no spread anywhere, pending, not 0
    assert all(r["sd"] is None and r["status"] == "pending" for r in analysis["spread"])
    # one seed per cell: a difference but no interval, no test
    cell = [r for r in analysis["replay"] if r["scope"] == "cell" and r["status"] == "done"]
    assert len(cell) == 2 * 2 * 3 and all(r["n_pairs"] == 1 and r["ci"] is None and r["p_value"] is None for r in cell)
    assert all(r["status"] == "pending" and r["mean_diff_harmful_rate"] is None for r in analysis["replay"]
               if r["objective"] == "ipo")
    paths = write_analysis(analysis, tmp_path)
    text = paths[1].read_text()
    assert "6 of 216 fine-tunes" in text and "**IPO** (0 of 54 fine-tunes done): pending" in text
    # nothing measured at all still writes both files
    empty = analyse(grid, [], n_resamples=N)
    assert empty["status"]["fine_tunes_done"] == 0 and all(r["status"] == "pending" for r in empty["replay"])
    assert "pending" in write_analysis(empty, tmp_path / "empty")[1].read_text()


def test_json_has_the_issue_keys(grid, configs, tmp_path):
    records = [record(c, differing) for c in configs]
    analysis = analyse(grid, records, command="python benchmarks/preference_analysis.py", n_resamples=N)
    json_path, md_path = write_analysis(analysis, tmp_path)
    data = json.loads(json_path.read_text())
    assert {"runs", "spread", "replay", "aligned"} <= set(data)
    assert len(data["runs"]) == 216 and len(data["aligned"]) == 3
    for row in data["runs"]:
        assert {"backbone", "objective", "replay", "k", "seed", "lr", "batch_size", "harmful_rate", "overrefusal_rate",
                "preference_accuracy", "judge", "refusal_rate", "harmful_rates", "refusal_rates", "overrefusal_rates"} <= set(row)
    assert {r["objective"] for r in data["runs"]} == {"sigmoid", "ipo", "hinge", "robust"}
    assert {r["replay"] for r in data["runs"]} == {"none", "random", "forgetting"}
    for row in data["spread"]:
        assert {"objective", "metric", "judge", "sd", "ci", "n_backbones", "n_seeds", "dataset", "replay"} <= set(row)
    for row in data["replay"]:
        assert {"objective", "backbone", "dataset", "replay", "mean_diff_harmful_rate", "mean_diff_refusal_rate",
                "mean_diff_overrefusal_rate", "ci", "p_value", "n_pairs"} <= set(row)
    text = md_path.read_text()
    assert "refusal rate (harmful prompts) (content)" in text and "**DPO (sigmoid)**" in text and "**IPO**" in text
    assert "What the SD is of: sd: the sample standard deviation" in text


def test_run_table_input_matches_records(grid, configs, tmp_path):
    """The run table the bench writes (preference_report) gives the same rates as the records, refusal included."""
    records = [record(c, differing) for c in configs]
    [table_path] = write_preference_outputs(grid, records, tmp_path)
    from_table = analyse(grid, table=load_run_table(table_path), n_resamples=N)
    from_records = analyse(grid, records, n_resamples=N)
    assert spread_row(from_table, metric="harmful_rate") == spread_row(from_records, metric="harmful_rate")
    assert spread_row(from_table) == spread_row(from_records)
    assert from_table["status"]["refusal_known"] == from_records["status"]["refusal_known"] == 216


def test_records_of_another_protocol_are_left_out(grid, configs, tmp_path):
    config = next(c for c in configs if c["kind"] == "finetune")
    other = json.loads(json.dumps(config))
    other["dataset"]["sft"]["learning_rate"] = 1e-3  # a run made under another lr: another id, not this grid's
    analysis = analyse(grid, [record(other, differing)], n_resamples=N)
    assert analysis["status"]["fine_tunes_done"] == 0 and analysis["status"]["unmatched_records"] == [run_id(other)]
    folder = tmp_path / "runs"
    folder.mkdir()
    (folder / "a.json").write_text(json.dumps(record(config, differing)))
    assert [r["run_id"] for r in load_records(folder)] == [run_id(config)]
    (folder / "b.json").write_text(json.dumps({"run_id": "x"}))
    with pytest.raises(ValueError, match="b.json: not a run record"):
        load_records(folder)
    with pytest.raises(ValueError, match="not a preference run table"):
        (tmp_path / "t.json").write_text("[]")
        load_run_table(tmp_path / "t.json")


def test_the_script_reads_records_or_falls_back_to_the_run_table(grid, configs, tmp_path):
    spec = importlib.util.spec_from_file_location("_preference_analysis_script",
                                                  Path(__file__).resolve().parents[1] / "benchmarks" / "preference_analysis.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    chosen = [c for c in configs if c["kind"] == "aligned" or c["seed"] == 0]
    records = [record(c, differing) for c in chosen]
    write_preference_outputs(grid, records, tmp_path)  # the run table only: no records folder yet
    json_path, md_path = script.main(["--results-dir", str(tmp_path)])
    data = json.loads(json_path.read_text())
    assert data["source"] == str(tmp_path / "preference_bench.json") and data["status"]["fine_tunes_done"] == 72
    assert data["status"]["refusal_known"] == 72
    folder = tmp_path / "bench_runs" / "preference"
    folder.mkdir(parents=True)
    for r in records:
        (folder / f"{r['run_id']}.json").write_text(json.dumps(r))
    data = json.loads(script.main(["--results-dir", str(tmp_path)])[0].read_text())
    assert data["source"].startswith("75 records") and data["status"]["refusal_known"] == 72
    assert md_path.read_text().startswith("# Preference grid")
