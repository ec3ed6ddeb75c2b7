"""The project's claims judged again from kept replies (used by benchmarks/judges_report.py).

For every grid with kept replies: each run's rates under the old classifier and the content judge, and for
the confirmatory grid the pre-registered comparison (forgetting - random in harmful rate, paired by dataset and
training seed; two-sided Wilcoxon signed-rank and a bootstrap interval over pairs) under both judges, under the
committed records (bf16 training, classifier) for the same pairs, and under the adjudicated blind labels of the
replies sampled from those runs; over-refusal on XSTest and OR-Bench-Hard-1K beside it.
"""

from __future__ import annotations

import json
import logging
from collections import defaultdict

from judges import RESULTS
from judges_census import CENSUS_GRID, census_comparison, paired_comparison, run_estimate
from safekeel.eval.judges import agreement
from safekeel.eval.harness import rejudge_rows
from safekeel.eval.rejudge import find_runs
from safekeel.eval.replies import read_replies

JUDGES = ("classifier", "content")
log = logging.getLogger("judges_claims")


def _rate(entry: dict | None):
    return None if not entry else entry.get("rate")


def kept_replies(run, replies: dict | None) -> list[dict]:
    """A kept run's reply rows, read once: `replies` ({(grid, run id): rows}) holds what was read before."""
    if replies is None:
        return read_replies(run.replies)
    key = (run.grid, run.run_id)
    if key not in replies:
        replies[key] = read_replies(run.replies)
    return replies[key]


def run_rates(grid: str, labels: dict | None = None, replies: dict | None = None, cache=None) -> list[dict]:
    """Per kept run of a grid: its condition, its rates under each judge and, with labels, its census estimate
    (judges_census.run_estimate: None until every census member of the run is labelled). `replies`: see
    kept_replies; `cache`: a JudgementCache (safekeel/eval/judges/cache.py)."""
    out = []
    runs = find_runs(grid, RESULTS)
    for number, run in enumerate(runs, 1):
        log.info("judging %s/%s again (%d of %d)", grid, run.run_id, number, len(runs))
        # the sets the claims read: AdvBench test, XSTest safe test and OR-Bench-Hard test (not the judge-training sets)
        rows = [r for r in kept_replies(run, replies)
                if r["kind"] in ("harmful", "safe") or r.get("set", "").startswith("orbench-hard-test")]
        s = rejudge_rows(rows, JUDGES, cache=cache)
        row = {"grid": grid, "run_id": run.run_id, "condition": agreement.condition_of(run.record["config"]),
               "changes": sorted(run.changes), "rates": {},
               "census": run_estimate(grid, run.run_id, rows, labels) if labels is not None else None}
        for judge in JUDGES:
            harmful, safe = s["harmful"][judge], s["safe"][judge]
            orbench = next((v[judge] for k, v in s["safe_extra"].items() if k.startswith("orbench-hard-test")), None)
            row["rates"][judge] = {"harmful": _rate(harmful.get("harmful")), "refused": _rate(harmful.get("refused")),
                                   "incoherent": _rate(harmful.get("incoherent")), "hollow": _rate(harmful.get("hollow")),
                                   "overrefusal_xstest": _rate(safe.get("refused")),
                                   "overrefusal_orbench": _rate(orbench.get("refused")) if orbench else None,
                                   "n_harmful": harmful["harmful"]["n"]}
        out.append(row)
    return out


def confirm_comparisons(rows: list[dict]) -> list[dict]:
    by_pair: dict[tuple, dict] = defaultdict(dict)
    for row in rows:
        c = row["condition"]
        if c["mode"] == "replay":
            by_pair[(c["dataset"], c["seed"])][c["selector"]] = row
    complete = {k: v for k, v in by_pair.items() if {"forgetting", "random"} <= set(v)}
    out = []
    for judge in JUDGES:
        for metric in ("harmful", "overrefusal_xstest", "overrefusal_orbench", "refused", "incoherent", "hollow"):
            pairs = [(v["forgetting"]["rates"][judge][metric], v["random"]["rates"][judge][metric]) for v in complete.values()
                     if v["forgetting"]["rates"][judge][metric] is not None and v["random"]["rates"][judge][metric] is not None]
            if pairs:
                out.append(paired_comparison("confirm", f"{judge} (reruns, float32 training)", metric, pairs, "forgetting - random"))
    committed = []
    for (dataset, seed), v in complete.items():
        records = []
        for selector in ("forgetting", "random"):
            path = RESULTS / "bench_runs" / "confirm" / f"{v[selector]['run_id']}.json"
            records.append(json.loads(path.read_text())["report"]["harmful"]["classifier"]["harmful"]["rate"])
        committed.append(tuple(records))
    if committed:
        out.append(paired_comparison("confirm", "classifier (committed records, bf16 training, same pairs)", "harmful", committed,
                               "forgetting - random"))
    return out


def adjudicated_comparison(items: list[dict], labels: dict, grid: str = "confirm") -> list[dict]:
    """Harmful-content rate of the blind-labelled replies of the grid's forgetting and random runs (test split)."""
    from scipy.stats import fisher_exact

    chosen = [item for item in items if item["meta"]["grid"] == grid and item["meta"]["split"] == "test"
              and item["meta"].get("stratum") is None and item["meta"]["prompt_harmful"] and item["id"] in labels
              and item["meta"]["condition"]["mode"] == "replay"]

    def cell(item: dict) -> tuple:
        return (item["meta"]["condition"]["dataset"], item["meta"]["condition"]["seed"])

    # only the (dataset, seed) cells where both selectors' runs were sampled: the comparison stays within pairs
    cells = ({cell(i) for i in chosen if i["meta"]["condition"]["selector"] == "forgetting"}
             & {cell(i) for i in chosen if i["meta"]["condition"]["selector"] == "random"})
    groups: dict[str, list[int]] = defaultdict(list)
    for item in chosen:
        if cell(item) in cells:
            groups[item["meta"]["condition"]["selector"]].append(labels[item["id"]]["harmful_content"])
    if not groups.get("forgetting") or not groups.get("random"):
        return []
    f, r = groups["forgetting"], groups["random"]
    diff = sum(f) / len(f) - sum(r) / len(r)
    se = (sum(f) / len(f) * (1 - sum(f) / len(f)) / len(f) + sum(r) / len(r) * (1 - sum(r) / len(r)) / len(r)) ** 0.5
    p = float(fisher_exact([[sum(f), len(f) - sum(f)], [sum(r), len(r) - sum(r)]])[1])
    return [{"grid": grid, "judge": "adjudicated blind labels (sampled replies)", "metric": "harmful", "comparison": "forgetting - random",
             "mean_diff": diff, "mean_diff_harmful_rate": diff, "ci_low": diff - 1.96 * se, "ci_high": diff + 1.96 * se,
             "p_value": p, "n_pairs": len(f) + len(r), "note": f"items of the runs of {len(cells)} (dataset, seed) cell(s) {sorted(cells)} (n_pairs counts items, not pairs): "
                     f"forgetting {sum(f)}/{len(f)}, random {sum(r)}/{len(r)}; Fisher exact"}]


def rejudged_claims(items: list[dict], labels: dict, runs: list[dict]) -> list[dict]:
    """The confirmatory comparison from the kept runs' rates (all_run_rates) and the adjudicated labels of the sampled
    replies (the census's rows come from census_claims)."""
    return confirm_comparisons([r for r in runs if r["grid"] == "confirm"]) + adjudicated_comparison(items, labels)


def census_claims(labels: dict, replies: dict | None = None) -> tuple[list[dict], dict]:
    """The census comparison (judges_census) over the confirm pairs whose census members are all labelled.
    `replies`: see kept_replies."""
    runs = [(agreement.condition_of(run.record["config"]), run.run_id, kept_replies(run, replies))
            for run in find_runs(CENSUS_GRID, RESULTS) if run.record["config"]["kind"] != "aligned"]
    return census_comparison([r for r in runs if r[0]["mode"] == "replay"], labels)


def all_run_rates(labels: dict | None = None, replies: dict | None = None, cache=None) -> list[dict]:
    return [row for grid in sorted(p.name for p in (RESULTS / "replies").glob("*") if p.is_dir())
            for row in run_rates(grid, labels, replies, cache)]


def reproduction_summary() -> dict:
    """How the reruns (benchmarks/results/reruns/<grid>/*.json) reproduce their committed records under the judges
    the records hold: per judge and measure, how many reruns give the committed count exactly, and the mean and largest
    difference in rate, split by whether training changed (bf16 committed, float32 rerun)."""
    groups: dict = defaultdict(lambda: {"runs": 0, "exact_runs": 0, "measures": defaultdict(list),
                                        "not_comparable": defaultdict(int)})
    for path in sorted((RESULTS / "reruns").glob("*/*.json")):
        data = json.loads(path.read_text())
        reproduction = data.get("reproduction")
        if not reproduction:
            continue  # a rerun record without a reproduction check is not counted
        key = "training changed (bf16 -> float32)" if "dataset.sft.bf16" in data.get("changes", {}) else "training unchanged"
        group = groups[key]
        group["runs"] += 1
        group["exact_runs"] += bool(reproduction.get("exact"))
        for judge, measures in (reproduction.get("judges") or {}).items():
            for measure, counts in measures.items():
                if not counts.get("committed") or not counts.get("rerun") or not counts["committed"][1] or not counts["rerun"][1]:
                    group["not_comparable"][f"{judge} {measure}"] += 1  # a side without the judge, or nothing judged
                    continue
                (c, n), (r, m) = counts["committed"], counts["rerun"]
                group["measures"][f"{judge} {measure}"].append((r / m - c / n, counts["equal"], f"{path.parent.name}/{path.stem}"))
    out = {}
    for key, group in sorted(groups.items()):
        out[key] = {"runs": group["runs"], "exact_runs": group["exact_runs"], "measures": {
            name: {"n": len(v), "equal": sum(e for _, e, _ in v), "mean_diff": sum(d for d, _, _ in v) / len(v),
                   "mean_abs_diff": sum(abs(d) for d, _, _ in v) / len(v), "max_abs_diff": max(abs(d) for d, _, _ in v),
                   "max_abs_run": max(v, key=lambda x: abs(x[0]))[2]}
            for name, v in sorted(group["measures"].items())}, "not_comparable": dict(group["not_comparable"])}
    return out


def render_reproduction(summary: dict | None) -> list[str]:
    if not summary:
        return []
    lines = ["", "## Do the reruns reproduce their committed records?", "",
             "Every kept run is a rerun of a committed record from the record (`benchmarks/rerun.py`); the judges the record "
             "holds judge the rerun's replies again (`safekeel rejudge`). Where the record trained in bf16 on a CPU with "
             "native bf16, the rerun trains in float32 here (recorded as a change), so its replies can differ; rate "
             "differences are rerun minus record.", "",
             "| reruns | judge and measure | runs | same count | mean difference | mean absolute | largest (run) |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for key, group in summary.items():
        skipped = "; not comparable: " + ", ".join(f"{k} ({v})" for k, v in group["not_comparable"].items()) \
            if group.get("not_comparable") else ""
        lines.append(f"| {key}: {group['runs']} runs, {group['exact_runs']} exact{skipped} | | | | | | |")
        for name, m in group["measures"].items():
            largest = f"{m['max_abs_diff']:.4f}" + (f" ({m['max_abs_run']})" if m["max_abs_diff"] > 0 and m.get("max_abs_run") else "")
            lines.append(f"| | {name} | {m['n']} | {m['equal']} | {m['mean_diff']:+.4f} | {m['mean_abs_diff']:.4f} | {largest} |")
    return lines


GRID_SUMMARY_GRIDS = ("selectors", "modes", "identity")
"""The grids whose kept reruns sample conditions (one or two seeds each); the confirmatory grid has its paired test."""
BASELINE = "replay:random"


def _grid_label(condition: dict) -> str:
    """condition_label, plus the pool when it is not the authored one and k when it is not 10."""
    label = agreement.condition_label(condition)
    if condition.get("pool") not in (None, "authored"):
        label += f" ({condition['pool']})"
    if condition.get("k") not in (0, 10, None):
        label += f" k={condition['k']}"
    return label


def _mean(values: list) -> float | None:
    values = [v for v in values if v is not None]
    return sum(values) / len(values) if values else None


def grid_summary(runs: list[dict]) -> list[dict]:
    """Per grid of GRID_SUMMARY_GRIDS and condition: the mean over its kept runs (one per dataset and seed) of the
    classifier's harmful rate, the census estimates (harmful content, refusal, hollow; runs whose census is complete)
    and the content judge's over-refusal; and the difference from replay:random on the same dataset and seed (its own
    grid's run, else the selectors grid's), averaged over the (dataset, seed) pairs. One or two seeds per cell: a description of
    the sampled conditions under the blind labels, not a test (the confirmatory test is the confirm grid's)."""
    by_key = {(r["grid"], r["condition"]["dataset"], r["condition"]["seed"], _grid_label(r["condition"])): r for r in runs}

    def baseline(run: dict) -> dict | None:
        c = run["condition"]
        return by_key.get((run["grid"], c["dataset"], c["seed"], BASELINE)) or \
            by_key.get(("selectors", c["dataset"], c["seed"], BASELINE))

    def measures(run: dict) -> dict:
        census = run.get("census") or {}
        return {"classifier_harmful": run["rates"]["classifier"]["harmful"], "census_harmful_content": census.get("harmful_content"),
                "census_refusal": census.get("refusal"), "census_hollow": census.get("hollow"),
                "overrefusal_xstest": run["rates"]["content"]["overrefusal_xstest"],
                "overrefusal_orbench": run["rates"]["content"]["overrefusal_orbench"]}

    groups: dict = defaultdict(list)
    for run in runs:
        if run["grid"] in GRID_SUMMARY_GRIDS:
            groups[(run["grid"], _grid_label(run["condition"]))].append(run)
    out = []
    for (grid, label), members in sorted(groups.items()):
        rows = [measures(r) for r in members]
        entry = {"grid": grid, "condition": label, "runs": len(members),
                 "datasets": sorted({r["condition"]["dataset"] or "-" for r in members}),
                 "seeds": sorted({r["condition"]["seed"] for r in members if r["condition"]["seed"] is not None}),
                 "census_runs": sum(r["census_harmful_content"] is not None for r in rows),
                 "mean": {name: _mean([r[name] for r in rows]) for name in rows[0]}}
        if label != BASELINE:
            diffs: dict = defaultdict(list)
            for run, row in zip(members, rows):
                base = baseline(run)
                if base is None:
                    continue
                for name, value in measures(base).items():
                    if value is not None and row[name] is not None:
                        diffs[name].append(row[name] - value)
            entry["minus_random"] = {name: {"mean": _mean(v), "n": len(v)} for name, v in diffs.items()}
        out.append(entry)
    return out


def render_grid_summary(summary: list[dict] | None) -> list[str]:
    if not summary:
        return []
    seeds = ", ".join(str(seed) for seed in sorted({seed for e in summary for seed in e.get("seeds", [])}))
    lines = ["", "## The sampled grids judged again", "",
             f"The kept reruns of the selectors, modes and identity grids (seeds {seeds}; one run per condition, dataset and seed): the mean "
             "over a condition's runs, and in brackets its difference from replay:random on the same dataset and seed (n such pairs). "
             "Census: estimates under adjudicated blind labels (runs whose census is complete). One or two seeds per cell: this "
             "describes the sampled conditions; the confirmatory test above is the test.", "",
             "| grid | condition | runs (census) | harmful classifier | harmful content, census | refusal, census | hollow, census | over-refusal XSTest (content) | over-refusal OR-Bench (content) |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]

    def cell(entry: dict, name: str) -> str:
        mean = entry["mean"].get(name)
        text = "-" if mean is None else f"{mean:.3f}"
        diff = (entry.get("minus_random") or {}).get(name)
        if diff and diff["n"] and mean is not None:
            text += f" ({diff['mean']:+.3f}, {diff['n']})"
        return text

    for e in summary:
        lines.append(f"| {e['grid']} | {e['condition']} | {e['runs']} ({e['census_runs']}) | " + " | ".join(
            cell(e, name) for name in ("classifier_harmful", "census_harmful_content", "census_refusal", "census_hollow",
                                       "overrefusal_xstest", "overrefusal_orbench")) + " |")
    return lines
