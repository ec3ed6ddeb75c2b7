"""The benchmark's report: bench_<grid>.json (compact runs, summary, flat comparisons) written where the
caller says, and bench_<grid>.md (with the plots of safekeel.bench.plots) rendered from that JSON alone.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

from safekeel.bench import selection_features
from safekeel.bench.grids import GridSpec, expand
from safekeel.bench.plots import render_plots
from safekeel.bench.summary import flat_comparisons, run_row, summarise
from safekeel.eval.stats import N_RESAMPLES
from safekeel.provenance import library_versions, write_json_atomic


def write_outputs(grid: GridSpec, records: Sequence[dict], results_dir: str | Path, command: str = "",
                  plots: bool = True) -> list[Path]:
    """results_dir/bench_<grid>.json (compact runs + summary), then the markdown (and plots) rendered from it."""
    rows = [run_row(r) for r in records]
    selection_features.attach_features(rows)
    summary = summarise(rows)
    grid_dict = {**grid.to_dict(), "selectors": grid.resolved_selectors()}
    path = write_json_atomic(Path(results_dir) / f"{grid.output_stem}.json", {
        "command": command, "grid": grid_dict, "n_runs_total": len(expand(grid)), "n_runs_done": len(rows),
        "runs": rows, "comparisons": flat_comparisons(summary), "summary": summary, "versions": library_versions(),
    })
    return [path, *render(path, plots=plots)]


def reanalyse(json_path: str | Path) -> Path:
    """Recompute the summary and comparisons of bench_<grid>.json from the runs it holds (no run is executed),
    so a change to the analysis reaches the published numbers without rerunning the grid."""
    json_path = Path(json_path)
    data = json.loads(json_path.read_text())
    summary = summarise(data["runs"])
    return write_json_atomic(json_path, {**data, "comparisons": flat_comparisons(summary), "summary": summary})


def number(value: float | None, digits: int = 3) -> str:
    """A value to `digits` decimals, or "n/a" when it is missing."""
    return "n/a" if value is None else f"{value:.{digits}f}"


def _with_ci(value: float | None, ci: Sequence[float] | None, digits: int = 3) -> str:
    return number(value, digits) + (f" [{ci[0]:.{digits}f}, {ci[1]:.{digits}f}]" if ci else "")


def _stat(entry: dict, digits: int = 3) -> str:
    return _with_ci(entry["mean"], entry.get("ci95"), digits)


def _p_text(test: dict) -> str:
    return number(test["p_value"], 4) if test["p_value"] is not None else f"n/a ({test['note']})"


def _holm_text(comparison: dict) -> str:
    return f"{number(comparison['p_holm'], 4)} ({comparison['n_tests']} tests)" if comparison.get("p_holm") is not None else "n/a"


def _wilson(rate: dict) -> str:
    ci = f" [{rate['ci95'][0]:.3f}, {rate['ci95'][1]:.3f}]" if rate["ci95"] else ""
    return f"{number(rate['rate'])}{ci} ({rate['n_prompts']})"


def _shared_adapter_text(checks: Sequence[dict]) -> str:
    own = [c for c in checks if not c["same_adapter"]]
    text = (f"icl and ptst reuse `none`'s adapter: {len(checks) - len(own)} of {len(checks)} runs used the adapter recorded "
            "for `none` at their (dataset, seed).")
    if own:
        differ = [c for c in own if not c["same_train_loss"]]
        text += (f" {len(own)} retrained it from the same training inputs; {len(own) - len(differ)} of them reached `none`'s "
                 "training loss (to a relative 1e-6)")
        text += "." if not differ else (", these did not (read their comparisons with `none` with care): " + "; ".join(
            f"{c['dataset']} seed {c['seed']} {c['mode']} {number(c['train_loss'], 6)} vs {number(c['none_train_loss'], 6)}" for c in differ) + ".")
    return text


def _reference_text(reference: dict) -> str:
    if reference["mode"] == "none":
        return "none"
    return f"{reference['mode']} {reference['pool']} {reference['selector']} k={reference['k']}"


def render(json_path: str | Path, plots: bool = True) -> list[Path]:
    """bench_<grid>.md (and with `plots` the PNGs) from bench_<grid>.json alone."""
    json_path = Path(json_path)
    data = json.loads(json_path.read_text())
    grid, summary = data["grid"], data["summary"]
    judges, aligned = summary["judges"], summary["aligned"]
    primary = judges[0] if judges else "classifier"
    stem = json_path.stem
    pngs = render_plots(data, json_path.parent, stem) if plots else sorted(json_path.parent.glob(f"{stem}_*.png"))
    ev = grid["eval"]
    lines = [
        f"# Selector benchmark: grid `{grid['name']}`", "",
        f"Command: `{data['command']}`", "",
        f"Runs: {data['n_runs_done']} of {data['n_runs_total']}. Model {grid['model']}; datasets "
        + ", ".join(f"{d['name']} ({d['path']}" + (f", first {d['max_examples']}" if d["max_examples"] else "") + f", sft {json.dumps(d['sft'])})"
                    for d in grid["datasets"])
        + f"; pools {', '.join(grid['pools'])}; k {grid['k_values']}; modes {grid['modes']}; selectors {', '.join(grid['selectors'])}; "
        f"training seeds {grid['seeds']} (shared by every selector).", "",
        f"Evaluation: harmful prompts {ev['harmful_set']}" + (f" (first {ev['n_harmful']})" if ev["n_harmful"] else "")
        + f", over-refusal {ev['overrefusal_set']}" + (f" (first {ev['n_overrefusal']})" if ev["n_overrefusal"] else "")
        + f"; greedy, {ev['max_new_tokens']} new tokens; judges {', '.join(judges)} (`{primary}` primary); "
        f"utility = held-out loss ({ev['utility']}). Intervals over seeds: percentile bootstrap of the mean, "
        f"{N_RESAMPLES:,} resamples (over few seeds such an interval is narrower than its name: over 6 it covered the "
        "true mean in 87% of 3,000 simulated normal draws, `python benchmarks/pairing_simulation.py`); per-run rates carry "
        "Wilson intervals in the JSON. "
        "Retention = (HR_none - HR) / (HR_none - HR_aligned) per (dataset, seed): 1 keeps all the safety "
        "fine-tuning took, 0 none of it (undefined where fine-tuning lost none).", "",
    ]
    if aligned:
        lines += ["## Aligned model (no fine-tuning)", "",
                  "| judge | harmful rate [Wilson 95% CI] (n prompts) | over-refusal [Wilson 95% CI] (n prompts) |", "| --- | --- | --- |"]
        for j in judges:
            lines.append(f"| {j} | {_wilson(aligned['harmful'][j])} | {_wilson(aligned['overrefusal'][j])} |")
        lines.append("")
    for other in summary.get("aligned_by_dataset", []):
        if other["eval_overrides"] == aligned.get("eval_overrides"):  # the table above already
            continue
        served = (f"Served as the runs on {', '.join(other['datasets'])} are" if other["datasets"]
                  else "Served as the runs under these overrides will be (none has run yet)")
        lines += [f"{served} (the reference of their retention; evaluation overrides {json.dumps(other['eval_overrides'])}):", "",
                  "| judge | harmful rate [Wilson 95% CI] (n prompts) | over-refusal [Wilson 95% CI] (n prompts) |", "| --- | --- | --- |"]
        for j in judges:
            lines.append(f"| {j} | {_wilson(other['harmful'][j])} | {_wilson(other['overrefusal'][j])} |")
        lines.append("")
    lines += ["## Cells (mean over seeds [bootstrap 95% CI])", "",
              "| dataset | pool | k | mode | selector | seeds | " + " | ".join(f"harmful ({j})" for j in judges)
              + f" | over-refusal ({primary}) | held-out loss | retention ({primary}) |",
              "| --- | --- | --- | --- | --- | --- | " + " | ".join("---" for _ in judges) + " | --- | --- | --- |"]
    for c in summary["cells"]:
        harm = " | ".join(f"{_stat(c['harmful'][j])} (n={c['harmful'][j]['n_prompts']})" for j in judges)
        over = c["overrefusal"][primary]
        lines.append(f"| {c['dataset']} | {c['pool'] or '-'} | {c['k']} | {c['mode']} | {c['selector'] or '-'} | {len(c['seeds'])} | "
                     f"{harm} | {_stat(over)} (n={over['n_prompts']}) | {_stat(c['utility_loss'])} | {_stat(c['retention'][primary])} |")
    pooled = summary.get("pooled_comparisons", [])
    if pooled:
        lines += ["", "## Each selector vs random, pooled over the user datasets", "",
                  "The training seed is the unit: pairs that share a seed are not independent (random draws the same "
                  "examples at a seed on every dataset, and the training seed is shared; seed ICC = how alike a seed's "
                  "differences are across datasets, dataset means removed, 0 = independent). Difference = the mean over "
                  "seeds of each seed's mean paired difference over the datasets (each dataset weighs the same) "
                  "[bootstrap 95% CI resampling seeds]; Wilcoxon = two-sided signed-rank test on those seed means (with "
                  "n seeds it cannot go below 2/2^n: 0.031 with 6); Holm over this table's comparisons of the judge. Exploratory: the "
                  "pre-registered test is benchmarks/confirm_plan.md (whose rule ranks selectors by this table's k=10 "
                  "differences).", "",
                  "| pool | k | mode | selector | judge | datasets | seeds (pairs) | harmful difference [95% CI] | Wilcoxon p | Holm p | "
                  "seed ICC | over-refusal difference [95% CI] |", "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
        for c in sorted(pooled, key=lambda c: (judges.index(c["judge"]) if c["judge"] in judges else len(judges), c["k"])):
            lines.append(f"| {c['pool']} | {c['k']} | {c['mode']} | {c['selector']} | {c['judge']} | {len(c['datasets'])} | "
                         f"{number(c.get('n_seeds'), 0)} ({c['n_pairs']}) | "
                         f"{_with_ci(c['mean_difference'], c['difference_ci95'])} | {_p_text(c['wilcoxon'])} | {_holm_text(c)} | "
                         f"{number(c.get('seed_icc'), 2)} | {_with_ci(c['overrefusal_difference'], c['overrefusal_difference_ci95'])} |")
    lines += ["", "## Each selector vs random (same dataset, pool, k, mode; paired by training seed)", "",
              "Difference = selector's harmful rate - random's (negative: the selector is safer). The two-sided "
              "Wilcoxon signed-rank test on n pairs cannot give p below 2/2^n (0.0625 with 5 seeds, 0.031 with 6). "
              "Holm p = the p-value after Holm's correction over every comparison of that judge in the grid (the "
              "family-wise error of asking them all at once); a raw p below 0.05 is one comparison's evidence only.", "",
              "| dataset | pool | k | mode | selector | judge | pairs | selector | random | difference [bootstrap 95% CI] | Wilcoxon p | Holm p | n prompts |",
              "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for c in summary["comparisons"]:
        lines.append(f"| {c['dataset']} | {c['pool']} | {c['k']} | {c['mode']} | {c['selector']} | {c['judge']} | {c['n_pairs']} | "
                     f"{number(c['selector_mean'])} | {number(c['random_mean'])} | {_with_ci(c['mean_difference'], c['difference_ci95'])} | "
                     f"{_p_text(c['wilcoxon'])} | {_holm_text(c)} | {c['n_prompts']} |")
    conditions = summary.get("condition_comparisons", [])
    if conditions:
        lines += ["", "## Modes and pools against replay (paired by training seed)", "",
                  "Each condition against replay from the same pool and from the grid's first pool, with the same "
                  "selector and k; `ptst` against `none` (the same adapter: the safety system prompt alone); `none` and "
                  "`ptst` against random replay at each k. Utility is measured as each condition is served (with its "
                  "system prompt and demonstrations). Difference = condition - reference "
                  "(negative harmful: the condition is safer); two-sided Wilcoxon; no correction across this table.", "",
                  "| dataset | pool | k | mode | selector | judge | reference | pairs | condition | reference | harmful difference "
                  "[95% CI] | Wilcoxon p | over-refusal difference [95% CI] | held-out loss difference |",
                  "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
        for c in sorted(conditions, key=lambda c: (judges.index(c["judge"]) if c["judge"] in judges else len(judges))):
            ref = c["reference"]
            lines.append(f"| {c['dataset']} | {c['pool'] or '-'} | {c['k']} | {c['mode']} | {c['selector'] or '-'} | {c['judge']} | "
                         f"{_reference_text(ref)} | {c['n_pairs']} | {number(c['selector_mean'])} | "
                         f"{number(c['random_mean'])} | {_with_ci(c['mean_difference'], c['difference_ci95'])} | {_p_text(c['wilcoxon'])} | "
                         f"{_with_ci(c['overrefusal_difference'], c['overrefusal_difference_ci95'])} | {number(c['utility_loss_difference'], 4)} |")
    checks = summary.get("shared_adapter_checks", [])
    if checks:
        lines += ["", _shared_adapter_text(checks)]
    variance = [v for v in summary.get("variance", []) if v["judge"] == primary]
    if variance:
        lines += ["", f"## Where the variance comes from (harmful rate, `{primary}` judge)", "",
                  "Two-way ANOVA over the complete selector x training-seed table of each (dataset, pool, k, mode): "
                  "share of the sum of squares due to the selector, to the training seed, and left over "
                  "(interaction and noise); SD of the selector means and of the seed means; the F test that all "
                  "selectors are equal with seed as a block. For scale, the binomial SD of one run's rate on its prompts.", "",
                  "| dataset | pool | k | mode | selectors | seeds | share selector | share seed | share residual | "
                  "SD selector means | SD seed means | residual SD | F (df) | p | binomial SD, one run |",
                  "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
        for v in variance:
            f_text = f"{number(v['f_selector'], 2)} ({v['df'][0]}, {v['df'][1]})"
            lines.append(f"| {v['dataset']} | {v['pool']} | {v['k']} | {v['mode']} | {len(v['selectors'])} | {len(v['seeds'])} | "
                         f"{number(v['share']['selector'])} | {number(v['share']['seed'])} | {number(v['share']['residual'])} | "
                         f"{number(v['sd_selector_means'])} | {number(v['sd_seed_means'])} | {number(v['residual_sd'])} | {f_text} | "
                         f"{number(v['p_selector'], 4)} | {number(v['binomial_sd_one_run'])} |")
    stability = [v for v in summary.get("selection_stability", []) if v["judge"] == primary]
    if stability:
        lines += ["", "## How much each selection changes with the seed", "",
                  "Jaccard = mean pairwise overlap of the selected id sets across training seeds (1: the same "
                  "examples on every seed); shared with random = the share of the selection that random's at the "
                  "same seed also holds; SD = sample SD of the harmful rate over seeds. A selector that keeps its "
                  "examples across seeds varies only through training order and measurement: its SD is the "
                  "training-noise floor against which random's SD (selection and training) can be read.", "",
                  "| dataset | pool | k | mode | selector | seeds | Jaccard across seeds | distinct ids | shared with random | "
                  f"SD harmful ({primary}) |", "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
        for v in stability:
            lines.append(f"| {v['dataset']} | {v['pool']} | {v['k']} | {v['mode']} | {v['selector']} | {len(v['seeds'])} | "
                         f"{number(v['jaccard_across_seeds'])} | {v['distinct_ids']} | {number(v['overlap_with_random'])} | "
                         f"{number(v['sd_harmful_over_seeds'])} |")
    lines += features_markdown(summary, primary)
    if pngs:
        lines += ["", "## Plots", ""] + [f"![{p.stem}]({p.name})" for p in pngs]
    md = json_path.with_suffix(".md")
    md.write_text("\n".join(lines) + "\n")
    return [md, *pngs]


def features_markdown(summary: dict, judge: str) -> list[str]:
    """The report's section: each selector's mean features per cell, then the within-seed associations."""
    entries = [e for e in summary.get("selection_features", []) if e["judge"] == judge]
    cells = [c for c in summary["cells"] if c.get("selection_features")]
    if not entries or not cells:
        return []
    lines = ["", f"## What in a selection goes with its harmful rate (exploratory, `{judge}` judge)", "",
             "Features of the selected safety examples: harm categories covered, mean refusal and request length "
             "in words. Per (dataset, pool, k, mode), the harmful rate and the feature are centred within each "
             "training seed; r = their correlation, slope = change in harmful rate per unit of the feature; "
             f"p = permutation test shuffling the feature within seeds ({selection_features.N_PERMUTATIONS:,} shuffles, two-sided), "
             "Holm over the table. Chosen after the runs were seen and confounded with everything else a selector "
             "does: hypotheses for new selectors, not results.", "",
             "| dataset | pool | k | mode | selector | seeds | categories | refusal words | request words | "
             f"harmful ({judge}) |", "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for c in cells:
        f, harm = c["selection_features"], c["harmful"][judge]["mean"]
        lines.append(f"| {c['dataset']} | {c['pool']} | {c['k']} | {c['mode']} | {c['selector']} | {len(c['seeds'])} | "
                     f"{f['n_categories']:.1f} | {f['refusal_words']:.1f} | {f['request_words']:.1f} | "
                     + ("n/a" if harm is None else f"{harm:.3f}") + " |")
    lines += ["", "| dataset | pool | k | mode | feature | runs | seeds | range | r within seed | slope | p (permutation) | Holm p |",
              "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for e in entries:
        lines.append(f"| {e['dataset']} | {e['pool']} | {e['k']} | {e['mode']} | {e['feature']} | {e['n_runs']} | {len(e['seeds'])} | "
                     f"{e['range'][0]:g}-{e['range'][1]:g} | {number(e['correlation'], 3)} | {number(e['slope'], 4)} | "
                     f"{number(e['p_permutation'], 4)} | {number(e.get('p_holm'), 4)} |")
    return lines
