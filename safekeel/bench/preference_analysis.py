"""Issue 32's analysis of the preference grid (safekeel.bench.grids_v2.preference_grid): from its run records (or its run
table, safekeel.bench.preference_report) to `preference.json` + `.md` with three parts.

- `runs`: one row per fine-tune the grid expands to (run_row's fields, plus refusal_rate: the primary judge's refusal
  rate on the harmful prompts, and every judge's rates); a run without a record is a row with status "pending" and
  None in every measured field, never 0. `aligned`: the backbones evaluated without fine-tuning, apart.
- `spread`: per objective (PreferenceConfig.label: the loss types as the grid names them), metric (harmful, refusal and
  over-refusal rate under each judge; held-out preference accuracy and reward margin) and condition (preference set x
  replay arm): the sample SD (n - 1) across backbones of each backbone's mean over its seeds, with a percentile
  bootstrap 95% interval (N_RESAMPLES resamples, seed 0) that redraws each backbone's seeds with replacement; the same
  seed positions are redrawn in every condition of a resample, so the pooled row (the mean of the condition SDs) keeps
  the seeds shared across conditions. Beside it: `seed_noise_sd`, sqrt(mean over backbones of s^2 / n), the SD the
  backbone means would show from seed noise alone; `aligned_sd`, the SD of the untuned backbones' rates; and the
  seed-blocked F test of "all backbones equal" (safekeel.eval.stats.variance_components).
- `replay`: per objective, backbone, preference set and replay arm, the arm minus no replay paired by seed (mean, a
  bootstrap 95% interval over seeds, a two-sided Wilcoxon p), and pooled per objective (and over all objectives)
  across backbones and sets with the seed as the unit (seed_clustered_test).

Rates are per judge; the .md names the judge of every rate. On this 135M organism blind labels find harmful content at
its floor and the judges' "harmful" is mostly "did not refuse" (benchmarks/judges/census_plan.md), hence refusal beside
harmful.
"""

from __future__ import annotations

import json
import math
import statistics
from pathlib import Path

import numpy as np

from safekeel.bench.grids import GridSpec, expand, run_id
from safekeel.bench.preference_report import run_row
from safekeel.eval.stats import N_RESAMPLES, bootstrap_ci, retention, seed_clustered_test, variance_components, wilcoxon_signed_rank
from safekeel.provenance import write_json_atomic

RATE_METRICS = {"harmful_rate": "harmful_rates", "refusal_rate": "refusal_rates", "overrefusal_rate": "overrefusal_rates"}
"""Judged rates: the row field of the primary judge -> the row field holding every judge's."""
PREFERENCE_METRICS = ("preference_accuracy", "reward_margin")
METRIC_NAMES = {"harmful_rate": "harmful rate", "refusal_rate": "refusal rate (harmful prompts)",
                "overrefusal_rate": "over-refusal", "preference_accuracy": "held-out preference accuracy",
                "reward_margin": "held-out reward margin"}
OBJECTIVE_NAMES = {"sigmoid": "DPO (sigmoid)", "ipo": "IPO", "hinge": "hinge (SLiC)", "robust": "robust DPO"}
VERDICT_METRICS = ("refusal_rate", "harmful_rate", "overrefusal_rate", "preference_accuracy")
"""The metrics the convergence answer weighs (the reward margin's scale is beta's: reported, not weighed)."""
CONVERGENCE_LIMIT = 2.0
CONVERGENCE_RULE = ("a metric counts as converged when its pooled across-backbone SD is at most twice its pooled seed-noise SD "
                    "(identical backbones: the squared ratio of one condition's SD to its estimated seed noise is F(b - 1, b(n - 1)); "
                    "with 3 backbones and 3 seeds it exceeds 4 with probability P(F(2, 6) > 4) = 0.079; the pooled ratio "
                    "averages the conditions, so it crosses less often)")
REPLAY_METRICS = ("harmful_rate", "refusal_rate", "overrefusal_rate", "preference_accuracy")
PREFIX = {"harmful_rate": "", "refusal_rate": "refusal_", "overrefusal_rate": "overrefusal_", "preference_accuracy": "preference_accuracy_"}


def _r(value: float | None, digits: int = 4) -> float | None:
    return None if value is None else round(float(value), digits)


# ---------------------------------------------------------------- rows


def analysis_row(record: dict) -> dict:
    """A run record's row: run_row's fields, refusal on the harmful prompts (every judge; the first is `refusal_rate`)."""
    if not isinstance(record, dict) or not {"run_id", "config", "report"} <= set(record):
        raise ValueError(f"not a run record (needs run_id, config and report): {str(record)[:200]}")
    row = run_row(record)
    judges = list(record["config"]["eval"]["judges"])
    harmful = record["report"].get("harmful") or {}
    refusal = {j: (((harmful.get(j) or {}).get("refused")) or {}).get("rate") for j in judges}
    row.update(refusal_rate=refusal[judges[0]], refusal_rates=refusal, status="done")
    return row


def table_row(row: dict) -> dict:
    """A row of the run table (preference_bench.json), which may predate refusal_rate: then None (pending)."""
    if not isinstance(row, dict) or "run_id" not in row or "kind" not in row:
        raise ValueError(f"not a run-table row (needs run_id and kind): {str(row)[:200]}")
    return {"refusal_rate": None, "refusal_rates": {}, **row, "status": "done"}


def pending_row(config: dict) -> dict:
    """The row of a run with no record: its configuration's fields, every measured field None."""
    row = run_row({"run_id": run_id(config), "config": config, "report": {}})
    row.update(refusal_rate=None, refusal_rates={j: None for j in config["eval"]["judges"]}, status="pending")
    if config["kind"] == "finetune":
        row["safety_pairs"] = None
    return row


def collect_runs(grid: GridSpec, records: list[dict] | None = None, table: list[dict] | None = None) -> dict:
    """The grid's expected runs (expand(grid)) as rows, measured where a record (or run-table row) has the run's id:
    {"runs": fine-tunes, "aligned": untuned evaluations, "unmatched": ids of given runs the grid does not expand to}."""
    if not grid.methods:
        raise ValueError(f"grid {grid.name!r} has no preference objectives (methods): not a preference grid")
    given = {}
    for record in records or []:
        given[record.get("run_id")] = analysis_row(record)
    for row in table or []:
        given.setdefault(row.get("run_id"), table_row(row))
    rows, expected = [], set()
    for config in expand(grid):
        identifier = run_id(config)
        expected.add(identifier)
        rows.append(given.get(identifier) or pending_row(config))
    return {"runs": [r for r in rows if r["kind"] == "finetune"], "aligned": [r for r in rows if r["kind"] == "aligned"],
            "unmatched": sorted(i for i in given if i not in expected)}


def value(row: dict, metric: str, judge: str | None) -> float | None:
    if row.get("status") != "done":
        return None
    if metric in RATE_METRICS:
        return (row.get(RATE_METRICS[metric]) or {}).get(judge)
    return row.get(metric)


def metric_judges(judges: list[str]) -> list[tuple[str, str | None]]:
    return [(m, j) for m in RATE_METRICS for j in judges] + [(m, None) for m in PREFERENCE_METRICS]


def _order(rows: list[dict], key: str) -> list:
    return list(dict.fromkeys(r[key] for r in rows))


# ---------------------------------------------------------------- spread across backbones


def _sd(values: list[float]) -> float | None:
    return float(np.std(values, ddof=1)) if len(values) >= 2 else None


def _interval(boot: np.ndarray | None) -> list[float] | None:
    return None if boot is None else [_r(q) for q in np.quantile(boot, [0.025, 0.975])]


def condition_spread(per_backbone: dict[str, list[float]], draws: np.ndarray, index: dict[str, int]) -> tuple[dict, np.ndarray | None]:
    """per_backbone: {backbone: its seeds' values in seed order}. (the condition's figures, the resampled SDs or None).
    draws: uniforms (resamples, backbones, seeds): seed position floor(u * n) of a backbone with n seeds."""
    per_backbone = {b: v for b, v in per_backbone.items() if v}
    means = {b: statistics.fmean(v) for b, v in per_backbone.items()}
    sd = _sd(list(means.values()))
    variances = [statistics.variance(v) / len(v) for v in per_backbone.values() if len(v) >= 2]
    boot = None
    if sd is not None:
        resampled = [np.asarray(v)[(draws[:, index[b], :len(v)] * len(v)).astype(int)].mean(axis=1) for b, v in per_backbone.items()]
        boot = np.std(np.stack(resampled, axis=1), axis=1, ddof=1)
    noise = math.sqrt(statistics.fmean(variances)) if variances else None
    between = math.sqrt(max(0.0, sd ** 2 - noise ** 2)) if sd is not None and noise is not None else None
    return {"sd": _r(sd), "ci": _interval(boot), "seed_noise_sd": _r(noise),
            # the backbones' own spread with the seed noise taken out (method of moments; 0 when noise explains it all)
            "between_backbone_sd": _r(between),
            "n_backbones": len(means), "n_seeds": min((len(v) for v in per_backbone.values()), default=0),
            "seeds_per_backbone": {b: len(v) for b, v in per_backbone.items()},
            "backbone_means": {b: _r(m) for b, m in means.items()}}, boot


def spread_rows(runs: list[dict], aligned: list[dict], judges: list[str], n_resamples: int = N_RESAMPLES, seed: int = 0) -> list[dict]:
    backbones, conditions = _order(runs, "backbone"), list(dict.fromkeys((r["dataset"], r["replay"], r["k"]) for r in runs))
    index = {b: i for i, b in enumerate(backbones)}
    max_seeds = max((len(_order(runs, "seed")), 1))
    out = []
    for objective in _order(runs, "objective"):
        mine = [r for r in runs if r["objective"] == objective]
        for metric, judge in metric_judges(judges):
            draws = np.random.default_rng(seed).random((n_resamples, len(backbones), max_seeds))
            untuned = [v for r in aligned if (v := value(r, metric, judge)) is not None] if metric in RATE_METRICS else []
            aligned_sd = _r(_sd(untuned))
            base = {"objective": objective, "metric": metric, "judge": judge}
            rows, boots = [], []
            for dataset, replay, k in conditions:
                cell = [r for r in mine if (r["dataset"], r["replay"], r["k"]) == (dataset, replay, k)]
                table = {b: {r["seed"]: v for r in cell if r["backbone"] == b and (v := value(r, metric, judge)) is not None}
                         for b in backbones}
                figures, boot = condition_spread({b: [t[s] for s in sorted(t)] for b, t in table.items()}, draws, index)
                anova = variance_components({b: t for b, t in table.items() if t})
                rows.append({**base, "scope": "condition", "dataset": dataset, "replay": replay, "k": k, **figures,
                             "aligned_sd": aligned_sd, "f_backbones": anova and anova["f_selector"],
                             "p_backbones_equal": anova and anova["p_selector"],
                             "status": "done" if figures["sd"] is not None else "pending"})
                if boot is not None:
                    boots.append(boot)
            done = [r for r in rows if r["sd"] is not None]
            noise = [r["seed_noise_sd"] for r in done if r["seed_noise_sd"] is not None]
            out.append({**base, "scope": "pooled", "dataset": "all", "replay": "all", "k": None,
                        "sd": _r(statistics.fmean(r["sd"] for r in done)) if done else None,
                        "ci": _interval(np.mean(boots, axis=0)) if boots else None,
                        "seed_noise_sd": _r(statistics.fmean(noise)) if noise else None, "aligned_sd": aligned_sd,
                        "n_conditions": len(done), "n_backbones": max((r["n_backbones"] for r in done), default=0),
                        "n_seeds": min((r["n_seeds"] for r in done), default=0), "status": "done" if done else "pending"})
            out += rows
    return out


# ---------------------------------------------------------------- replay against no replay


def _paired(diffs: list[tuple[int, float]]) -> dict:
    values = [d for _, d in diffs]
    return {"mean": _r(statistics.fmean(values)) if values else None, "ci": bootstrap_ci(values),
            "p_value": wilcoxon_signed_rank(values)["p_value"], "n": len(values)}


def _fields(metric: str, mean, ci, p) -> dict:
    prefix = PREFIX[metric]
    return {f"mean_diff_{metric}": mean, f"{prefix}ci": ci, f"{prefix}p_value": p}


def replay_rows(runs: list[dict], aligned: list[dict], judges: list[str]) -> list[dict]:
    """Each replay arm minus no replay, paired by seed, per (objective, backbone, dataset, judge); then pooled."""
    untuned = {r["backbone"]: r for r in aligned}
    cells = []
    for objective in _order(runs, "objective"):
        for backbone in _order(runs, "backbone"):
            for dataset in _order(runs, "dataset"):
                cell = [r for r in runs if (r["objective"], r["backbone"], r["dataset"]) == (objective, backbone, dataset)]
                none = {r["seed"]: r for r in cell if r["replay"] == "none" and r["status"] == "done"}
                for replay, k in dict.fromkeys((r["replay"], r["k"]) for r in cell if r["replay"] != "none"):
                    arm = {r["seed"]: r for r in cell if (r["replay"], r["k"]) == (replay, k) and r["status"] == "done"}
                    seeds = sorted(set(none) & set(arm))
                    for judge in judges:
                        row = {"objective": objective, "backbone": backbone, "dataset": dataset, "replay": replay, "k": k,
                               "judge": judge, "scope": "cell", "n_pairs": len(seeds), "seeds": seeds}
                        differences = {}
                        for metric in REPLAY_METRICS:
                            j = judge if metric in RATE_METRICS else None
                            pairs = [(s, value(arm[s], metric, j), value(none[s], metric, j)) for s in seeds]
                            pairs = [(s, a, b) for s, a, b in pairs if a is not None and b is not None]
                            differences[metric] = [[s, round(a - b, 6)] for s, a, b in pairs]
                            test = _paired([(s, a - b) for s, a, b in pairs])
                            row.update(_fields(metric, test["mean"], test["ci"], test["p_value"]))
                            row[f"none_{metric}"] = _r(statistics.fmean(b for _, _, b in pairs)) if pairs else None
                            row[f"replay_{metric}"] = _r(statistics.fmean(a for _, a, _ in pairs)) if pairs else None
                        for metric in ("harmful_rate", "refusal_rate"):
                            row[f"aligned_{metric}"] = value(untuned[backbone], metric, judge) if backbone in untuned else None
                        row["differences"] = differences
                        row["status"] = "done" if row["mean_diff_harmful_rate"] is not None else "pending"
                        cells.append(row)
    return pooled_replay(cells, _order(runs, "objective")) + cells


def pooled_replay(cells: list[dict], objectives: list[str]) -> list[dict]:
    """Per objective (and "all"), replay arm and judge: seed_clustered_test over the (backbone, dataset) cells."""
    out = []
    for objective in objectives + ["all"]:
        for replay, k, judge in dict.fromkeys((c["replay"], c["k"], c["judge"]) for c in cells):
            members = [c for c in cells if (c["replay"], c["k"], c["judge"]) == (replay, k, judge)
                       and objective in ("all", c["objective"])]
            row = {"objective": objective, "backbone": "all", "dataset": "all", "replay": replay, "k": k, "judge": judge,
                   "scope": "pooled"}
            for metric in REPLAY_METRICS:
                # cells missing a seed the others have are left out (and counted), not the seed from every cell
                seeds = set().union(*({s for s, _ in c["differences"][metric]} for c in members))
                complete = [c for c in members if c["differences"][metric] and {s for s, _ in c["differences"][metric]} == seeds]
                pairs = [(f"{c['objective']}/{c['backbone']}/{c['dataset']}", s, d) for c in complete
                         for s, d in c["differences"][metric]]
                test = seed_clustered_test(pairs) if pairs else None
                if test is None or not test["n_seeds"]:
                    row.update(_fields(metric, None, None, None))
                else:
                    row.update(_fields(metric, test["mean_difference"], test["ci95"], test["wilcoxon"]["p_value"]))
                # secondary: each cell's mean difference as the unit (cells share a seed's selection: seed_icc says how much)
                cell_means = [statistics.fmean(d for _, d in c["differences"][metric]) for c in complete]
                row[f"{PREFIX[metric]}cells_test"] = {"n_cells": len(cell_means), "p_value": wilcoxon_signed_rank(cell_means)["p_value"],
                                                       "ci": bootstrap_ci(cell_means)}
                if metric == "harmful_rate":
                    row.update(n_pairs=test["n_pairs"] if test else 0, n_seeds=test["n_seeds"] if test else 0,
                               n_groups=len(test["datasets"]) if test else 0, seed_icc=test["seed_icc"] if test else None,
                               n_cells_left_out=len(members) - len(complete),
                               min_attainable_p=(2 / 2 ** test["n_seeds"]) if test and test["n_seeds"] else None)
                done = [c for c in complete if c[f"none_{metric}"] is not None]
                for arm in ("none", "replay"):
                    row[f"{arm}_{metric}"] = _r(statistics.fmean(c[f"{arm}_{metric}"] for c in done)) if done else None
            for metric in ("harmful_rate", "refusal_rate"):
                known = [c[f"aligned_{metric}"] for c in members if c["status"] == "done" and c[f"aligned_{metric}"] is not None]
                row[f"aligned_{metric}"] = _r(statistics.fmean(known)) if known else None
            row["refusal_restored"] = _restored(row)
            row["status"] = "done" if row["mean_diff_harmful_rate"] is not None else "pending"
            out.append(row)
    return out


def _restored(row: dict) -> float | None:
    """The share of the refusal rate lost to preference training (untuned -> no replay) that the arm gives back."""
    rates = [row["none_refusal_rate"], row["replay_refusal_rate"], row["aligned_refusal_rate"]]
    return None if None in rates else retention(*(1 - r for r in rates))


# ---------------------------------------------------------------- the analysis


def analyse(grid: GridSpec, records: list[dict] | None = None, table: list[dict] | None = None, command: str = "",
            n_resamples: int = N_RESAMPLES) -> dict:
    """preference.json's content from the grid and its records (or its run table); works on a partial grid."""
    collected = collect_runs(grid, records, table)
    runs, aligned = collected["runs"], collected["aligned"]
    judges = list(grid.eval.judges)
    done = [r for r in runs if r["status"] == "done"]
    return {"grid": grid.name, "command": command, "judges": judges, "primary_judge": judges[0],
            "harmful_set": grid.eval.harmful_set, "overrefusal_set": grid.eval.overrefusal_set,
            "hyperparameters": grid.hyperparameters_source, "n_resamples": n_resamples,
            "status": {"fine_tunes_done": len(done), "fine_tunes": len(runs),
                       "aligned_done": sum(r["status"] == "done" for r in aligned), "aligned": len(aligned),
                       "unmatched_records": collected["unmatched"],
                       "refusal_known": sum(r["refusal_rate"] is not None for r in done)},
            "spread_definition": SPREAD_DEFINITION, "convergence_rule": CONVERGENCE_RULE,
            "runs": runs, "aligned": aligned, "spread": spread_rows(runs, aligned, judges, n_resamples),
            "replay": replay_rows(runs, aligned, judges)}


SPREAD_DEFINITION = (
    "sd: the sample standard deviation (n - 1 denominator) across backbones of each backbone's mean over its training "
    "seeds, within one objective, one metric under one judge, and one condition (preference set x replay arm); the "
    "pooled row is the unweighted mean of the condition SDs. ci: the 2.5th and 97.5th percentiles of that SD over the "
    "resamples, each redrawing every backbone's seeds with replacement (the same seed positions in every condition). "
    "With a few seeds the resampled SD carries seed noise, so the interval sits above an SD near 0: read it beside "
    "seed_noise_sd, sqrt(mean over backbones of s^2 / n), the SD identical backbones would show from seed noise alone. "
    "aligned_sd: the SD of the untuned backbones' rates (one evaluation each).")


# ---------------------------------------------------------------- the report


def _f(x, digits: int = 3) -> str:
    return "pending" if x is None else f"{x:.{digits}f}"


def _ci(ci) -> str:
    return "" if not ci else f" [{ci[0]:.3f}, {ci[1]:.3f}]"


def _signed(x, ci=None) -> str:
    return "pending" if x is None else f"{x:+.3f}{_ci(ci)}"


def _objective(label: str) -> str:
    return OBJECTIVE_NAMES.get(label, label)


def _arm(replay: str, k) -> str:
    return "no replay" if replay == "none" else f"{replay} k={k}"


def _metric(metric: str, judge: str | None) -> str:
    return METRIC_NAMES[metric] + (f" ({judge})" if judge else "")


def convergence_answer(analysis: dict, objective: str) -> str:
    judge = analysis["primary_judge"]
    pooled = {r["metric"]: r for r in analysis["spread"] if r["scope"] == "pooled" and r["objective"] == objective
              and r["judge"] in (judge, None)}
    runs = [r for r in analysis["runs"] if r["objective"] == objective]
    head = f"**{_objective(objective)}** ({sum(r['status'] == 'done' for r in runs)} of {len(runs)} fine-tunes done)"
    if not any(r["status"] == "done" for r in pooled.values()):
        return f"{head}: pending (no condition has two backbones measured yet)."
    parts, converged, apart = [], [], []
    for metric in VERDICT_METRICS + ("reward_margin",):
        row = pooled[metric]
        if row["sd"] is None:
            parts.append(f"{_metric(metric, row['judge'])} pending")
            continue
        text = f"{_metric(metric, row['judge'])} {row['sd']:.3f}{_ci(row['ci'])} (seed noise {_f(row['seed_noise_sd'])}"
        parts.append(text + (f", untuned backbones {row['aligned_sd']:.3f})" if row["aligned_sd"] is not None else ")"))
        if metric in VERDICT_METRICS and row["seed_noise_sd"] is not None:
            ratio = row["sd"] / row["seed_noise_sd"] if row["seed_noise_sd"] > 0 else (0.0 if row["sd"] == 0 else math.inf)
            (converged if ratio <= CONVERGENCE_LIMIT else apart).append(
                f"{METRIC_NAMES[metric]} ({ratio:.1f}x seed noise)" if math.isfinite(ratio) else f"{METRIC_NAMES[metric]} (no seed noise)")
    n = max(r["n_conditions"] for r in pooled.values())
    text = f"{head}: across-backbone SD of the seed means, mean over {n} conditions: " + "; ".join(parts) + ". "
    if converged and not apart:
        text += "Every weighed metric's spread is within the rule (at most twice seed noise): the backbones converge."
    elif apart and not converged:
        text += f"Every weighed metric's spread exceeds twice seed noise ({', '.join(apart)}): the backbones do not converge."
    elif apart:
        text += f"Within twice seed noise: {', '.join(converged)}; beyond it: {', '.join(apart)}: they converge only in part."
    else:
        text += "Seed noise is pending (needs two seeds per backbone): no verdict yet."
    shrunk = [(METRIC_NAMES[m], pooled[m]) for m in RATE_METRICS if pooled[m]["sd"] is not None and pooled[m]["aligned_sd"] is not None]
    if shrunk:
        text += " Against the untuned backbones' SD: " + ", ".join(
            f"{name} {_compare(r['sd'], r['aligned_sd'], 'narrower', 'wider')} ({r['sd']:.3f} vs {r['aligned_sd']:.3f})"
            for name, r in shrunk) + "."
    return text


def _compare(a: float, b: float, less: str, more: str) -> str:
    return "as wide" if abs(a - b) < 5e-4 else less if a < b else more


def objectives_compared(analysis: dict, first: str = "sigmoid", second: str = "ipo") -> str | None:
    """One sentence setting the second objective's pooled spreads beside the first's (primary judge)."""
    judge = analysis["primary_judge"]
    pooled = {(r["objective"], r["metric"]): r["sd"] for r in analysis["spread"] if r["scope"] == "pooled" and r["judge"] in (judge, None)}
    both = [m for m in VERDICT_METRICS if pooled.get((first, m)) is not None and pooled.get((second, m)) is not None]
    if not both:
        return None if (first, VERDICT_METRICS[0]) not in pooled or (second, VERDICT_METRICS[0]) not in pooled else \
            f"{_objective(second)} against {_objective(first)}: pending."
    return f"{_objective(second)} against {_objective(first)} ({judge} judge for the rates): " + ", ".join(
        f"{METRIC_NAMES[m]} SD {pooled[(second, m)]:.3f} vs {pooled[(first, m)]:.3f} "
        f"({_compare(pooled[(second, m)], pooled[(first, m)], 'narrower', 'wider')})" for m in both) + "."


def replay_answer(analysis: dict, objective: str, judge: str) -> list[str]:
    lines = []
    for row in [r for r in analysis["replay"] if r["scope"] == "pooled" and r["objective"] == objective and r["judge"] == judge]:
        who = "pooled over every objective" if objective == "all" else _objective(objective)
        head = f"**{_arm(row['replay'], row['k'])}**, {who} ({judge} judge)"
        if row["status"] != "done":
            lines.append(f"- {head}: pending (no seed has both arms measured).")
            continue
        text = (f"- {head}, {row['n_groups']} backbone x preference-set cells, {row['n_seeds']} seeds as units: refusal rate "
                f"{_signed(row['mean_diff_refusal_rate'], row['refusal_ci'])} against no replay (Wilcoxon p "
                f"{_f(row['refusal_p_value'])}), {_f(row['none_refusal_rate'])} -> {_f(row['replay_refusal_rate'])}, the untuned "
                f"backbones refusing {_f(row['aligned_refusal_rate'])}. ")
        none, untuned = row["none_refusal_rate"], row["aligned_refusal_rate"]
        if none is not None and untuned is not None and none >= untuned:
            text += "Preference training without replay lowered no refusals here, so there was none to preserve. "
        elif row["refusal_restored"] is not None:
            ci = row["refusal_ci"]
            sure = "its interval excludes 0" if ci and (ci[0] > 0 or ci[1] < 0) else "its interval includes 0 at these seeds"
            text += f"It gives back {row['refusal_restored']:.0%} of the refusal rate preference training took ({sure}). "
        cost = row["mean_diff_overrefusal_rate"]
        text += (f"Over-refusal cost: {_signed(cost, row['overrefusal_ci'])} (p {_f(row['overrefusal_p_value'])}); harmful rate "
                 f"{_signed(row['mean_diff_harmful_rate'], row['ci'])} (p {_f(row['p_value'])}); held-out preference accuracy "
                 f"{_signed(row['mean_diff_preference_accuracy'], row['preference_accuracy_ci'])}.")
        lines.append(text)
    return lines


def replay_by_objective(analysis: dict, objective: str) -> str:
    """One line per objective: each arm's refusal and over-refusal differences (primary judge), pooled."""
    judge = analysis["primary_judge"]
    rows = [r for r in analysis["replay"] if r["scope"] == "pooled" and r["objective"] == objective and r["judge"] == judge]
    parts = [f"{_arm(r['replay'], r['k'])}: refusal {_signed(r['mean_diff_refusal_rate'], r['refusal_ci'])}, over-refusal "
             f"{_signed(r['mean_diff_overrefusal_rate'], r['overrefusal_ci'])}" + (f" ({r['n_seeds']} seeds)" if r["n_seeds"] else "")
             for r in rows]
    return f"- {_objective(objective)} ({judge} judge, against no replay): " + "; ".join(parts) + "."


def render_markdown(analysis: dict) -> str:
    judges, primary = analysis["judges"], analysis["primary_judge"]
    status, hp = analysis["status"], analysis["hyperparameters"] or {}
    objectives = _order(analysis["runs"], "objective")
    lines = ["# Preference grid: convergence across backbones and safety preference replay (issue 32)", "",
             f"Command: `{analysis['command'] or 'python benchmarks/preference_analysis.py'}`"
             + (f" (read: {analysis['source']})" if analysis.get("source") else "") + f". Grid `{analysis['grid']}`: "
             f"{status['fine_tunes_done']} of {status['fine_tunes']} fine-tunes and {status['aligned_done']} of "
             f"{status['aligned']} untuned evaluations measured; the rest is pending (never counted as 0)."
             + (f" {len(status['unmatched_records'])} given records are not runs of this grid (another lr or batch?): left out."
                if status["unmatched_records"] else ""), "",
             f"Every run: learning rate {hp.get('learning_rate', 'pending')}, batch size {hp.get('batch_size', 'pending')} "
             f"(source: {hp.get('source', 'not recorded')}). Judges: {', '.join(judges)} (primary: {primary}); harmful and "
             f"refusal rates on {analysis['harmful_set']}, over-refusal on {analysis['overrefusal_set']}. Every rate names "
             "its judge in parentheses. On this 135M organism blind labels find harmful content at its floor and the judges' "
             "\"harmful\" is mostly \"did not refuse\" (benchmarks/judges/census_plan.md): the refusal rate on the harmful "
             "prompts is reported beside the harmful rate."
             + ("" if status["refusal_known"] == status["fine_tunes_done"] else
                f" Refusal rates are known for {status['refusal_known']} of the measured runs (a run table without "
                "refusal_rate: pending)."), "",
             "## Closing note", "", "### Do backbones converge under one lr and batch size?", "",
             f"Rule: {CONVERGENCE_RULE}. Judge: {primary}.", ""]
    for objective in objectives:
        lines += [convergence_answer(analysis, objective), ""]
    compared = objectives_compared(analysis)
    lines += [compared, ""] if compared else []
    lines += ["### Does safety preference replay preserve refusals, and at what over-refusal cost?", ""]
    for judge in judges[:2]:
        lines += replay_answer(analysis, "all", judge)
    lines += [replay_by_objective(analysis, objective) for objective in objectives]
    n_seeds = len(_order(analysis["runs"], "seed"))
    lines += ["", f"With {n_seeds} seeds as units a two-sided Wilcoxon p cannot fall below {2 / 2 ** n_seeds:.3g}.", "",
              "## spread", "", f"What the SD is of: {analysis['spread_definition']}", "",
              "Pooled over conditions (mean of the condition SDs):", "",
              "| objective | metric (judge) | SD [95% CI] | seed noise | untuned SD | conditions | backbones | seeds |",
              "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in [r for r in analysis["spread"] if r["scope"] == "pooled" and r["judge"] in (primary, judges[min(1, len(judges) - 1)], None)]:
        lines.append(f"| {_objective(r['objective'])} | {_metric(r['metric'], r['judge'])} | {_f(r['sd'])}{_ci(r['ci'])} | "
                     f"{_f(r['seed_noise_sd'])} | {_f(r['aligned_sd']) if r['metric'] in RATE_METRICS else 'n/a'} | "
                     f"{r['n_conditions']} | {r['n_backbones']} | {r['n_seeds']} |")
    metrics = list(RATE_METRICS) + list(PREFERENCE_METRICS)
    lines += ["", f"Per condition (judge {primary} for the rates; SD [95% CI], backbones x seeds):", "",
              "| objective | preference set | replay | " + " | ".join(_metric(m, primary if m in RATE_METRICS else None) for m in metrics) + " |",
              "| --- | --- | --- | " + " | ".join("---" for _ in metrics) + " |"]
    by = {(r["objective"], r["dataset"], r["replay"], r["k"], r["metric"]): r for r in analysis["spread"]
          if r["scope"] == "condition" and r["judge"] in (primary, None)}
    for objective, dataset, replay, k in dict.fromkeys(key[:4] for key in by):
        cells = [by[(objective, dataset, replay, k, m)] for m in metrics]
        lines.append(f"| {_objective(objective)} | {dataset} | {_arm(replay, k)} | " + " | ".join(
            f"{_f(c['sd'])}{_ci(c['ci'])} ({c['n_backbones']}x{c['n_seeds']})" for c in cells) + " |")
    lines += ["", f"## replay (judge {primary}; arm minus no replay, paired by seed)", "",
              "| objective | backbone | preference set | arm | pairs | harmful diff [CI] (p) | refusal diff [CI] (p) | over-refusal diff [CI] (p) | preference accuracy diff |",
              "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in [r for r in analysis["replay"] if r["judge"] == primary]:
        lines.append(f"| {_objective(r['objective'])} | {r['backbone']} | {r['dataset']} | {_arm(r['replay'], r['k'])} | {r['n_pairs']} | "
                     f"{_signed(r['mean_diff_harmful_rate'], r['ci'])} ({_f(r['p_value'])}) | "
                     f"{_signed(r['mean_diff_refusal_rate'], r['refusal_ci'])} ({_f(r['refusal_p_value'])}) | "
                     f"{_signed(r['mean_diff_overrefusal_rate'], r['overrefusal_ci'])} ({_f(r['overrefusal_p_value'])}) | "
                     f"{_signed(r['mean_diff_preference_accuracy'])} |")
    lines += ["", "Rows with backbone `all` are pooled over backbones and preference sets with the training seed as the unit "
              "(safekeel.eval.stats.seed_clustered_test: each seed's mean difference over the cells, then the bootstrap "
              "interval and Wilcoxon test over seeds; a cell missing a seed the others have is left out and counted in "
              "`n_cells_left_out`). With 3 seeds the two-sided Wilcoxon p cannot go below 0.25 (`min_attainable_p`), so "
              "beside it `cells_test` takes each cell's mean difference as the unit (Wilcoxon over the cells; cells of a "
              "seed share its random selection, so read it with `seed_icc`).", "",
              "## runs: seed means per cell", "", "Untuned backbones (no fine-tune):", "",
              "| backbone | " + " | ".join(f"{_metric(m, j)}" for m in RATE_METRICS for j in judges) + " |",
              "| --- | " + " | ".join("---" for _ in range(len(RATE_METRICS) * len(judges))) + " |"]
    for r in analysis["aligned"]:
        lines.append(f"| {r['backbone']} | " + " | ".join(_f(value(r, m, j)) for m in RATE_METRICS for j in judges) + " |")
    lines += ["", f"Fine-tunes (judge {primary}; the mean over the seeds measured):", "",
              f"| objective | backbone | preference set | replay | seeds | harmful ({primary}) | refusal ({primary}) | "
              f"over-refusal ({primary}) | preference accuracy | reward margin |", "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for key in dict.fromkeys((r["objective"], r["backbone"], r["dataset"], r["replay"], r["k"]) for r in analysis["runs"]):
        cell = [r for r in analysis["runs"] if (r["objective"], r["backbone"], r["dataset"], r["replay"], r["k"]) == key]
        means = []
        for metric in metrics:
            present = [v for r in cell if (v := value(r, metric, primary if metric in RATE_METRICS else None)) is not None]
            means.append(_f(statistics.fmean(present)) if present else "pending")
        done = sum(r["status"] == "done" for r in cell)
        lines.append(f"| {_objective(key[0])} | {key[1]} | {key[2]} | {_arm(key[3], key[4])} | {done}/{len(cell)} | " + " | ".join(means) + " |")
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------- files


def load_records(folder: str | Path) -> list[dict]:
    """Every run record (*.json) in a folder (none when it does not exist); a file that is not a record is named."""
    records = []
    for path in sorted(Path(folder).glob("*.json")) if Path(folder).is_dir() else []:
        try:
            record = json.loads(path.read_text())
        except json.JSONDecodeError as error:
            raise ValueError(f"{path}: not JSON ({error})") from None
        if not isinstance(record, dict) or not {"run_id", "config", "report"} <= set(record):
            raise ValueError(f"{path}: not a run record (needs run_id, config and report)")
        records.append(record)
    return records


def load_run_table(path: str | Path) -> list[dict]:
    data = json.loads(Path(path).read_text())
    if not isinstance(data, dict) or not isinstance(data.get("runs"), list):
        raise ValueError(f"{path}: not a preference run table (a mapping with a 'runs' list)")
    return data["runs"]


def write_analysis(analysis: dict, results_dir: str | Path, stem: str = "preference") -> list[Path]:
    path = write_json_atomic(Path(results_dir) / f"{stem}.json", analysis)
    md = path.with_suffix(".md")
    md.write_text(render_markdown(analysis))
    return [path, md]
