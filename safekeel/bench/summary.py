"""The analysis of a benchmark grid's runs: one compact row per run record, then per cell (dataset x pool x k x
mode x selector) means over seeds, each selector against random paired by training seed, conditions against
replay, the selector x seed ANOVA, how selections change with the seed, and what in a selection goes with its
harmful rate. The statistics themselves are safekeel.eval.stats'.
"""

from __future__ import annotations

import math
import statistics
from typing import Sequence

from safekeel.bench import selection_features
from safekeel.bench.grids import REFERENCE_SELECTOR, DatasetSpec, guard_label
from safekeel.eval.stats import (binomial_sd, bootstrap_ci, holm_by_judge, mean_ci, pooled_comparisons, retention,
                                 variance_components, wilcoxon_signed_rank)
from safekeel.provenance import sha256_json
from safekeel.training.mixing import TRAINING_MODES


def _rate(entry: dict) -> dict:
    return {"rate": entry["rate"], "ci95": entry["ci95"], "count": entry["count"], "n": entry["n"],
            "n_prompts": entry["n"] + entry["unjudged"]}


def run_row(record: dict) -> dict:
    """One run's compact record: its coordinates and metrics (per judge), without the responses."""
    config, report = record["config"], record["report"]
    judges = report["settings"]["judges"]
    finetune = config["kind"] == "finetune"
    loss = report["utility"].get("loss")
    return {
        "run_id": record["run_id"], "kind": config["kind"],
        "dataset": DatasetSpec(**config["dataset"]).label if finetune else None,
        "eval_overrides": (config["dataset"].get("eval") if finetune else config.get("dataset_eval")) or None,
        "n_examples": record.get("n_user_examples"),
        "pool": config.get("pool"), "k": config.get("k", 0), "mode": config.get("mode"),
        # a format-matched run is its own method beside the plain one (random+format_matched against random), as is an
        # icl run with another guard (random+guard_contrastive against random)
        "selector": (f"{config['selector']}+format_matched" if config.get("replay_format") == "match" else
                     f"{config['selector']}+{guard_label(config['guard'])}" if "guard" in config else config.get("selector")),
        "seed": config.get("seed"),
        "harmful": {j: _rate(report["harmful"][j]["harmful"]) for j in judges},
        "harmful_extra": {name: {j: _rate(per_judge[j]["harmful"]) for j in judges}
                          for name, per_judge in report.get("harmful_extra", {}).items()},
        "incoherent": {j: report["harmful"][j]["incoherent"]["rate"] for j in judges if "incoherent" in report["harmful"][j]},
        "overrefusal": {j: _rate(report["overrefusal"][j]["refused"]) for j in judges},
        **({"overrefusal_extra": {name: {j: _rate(per_judge[j]["refused"]) for j in judges}
                                  for name, per_judge in report["overrefusal_extra"].items()}}
           if report.get("overrefusal_extra") else {}),
        "utility_loss": loss["loss"] if loss else None,
        "utility_n": loss["n"] if loss else None,
        "selected_ids": record.get("selected_ids", []),
        "train_seconds": record["train"]["seconds"] if finetune else None,
        "train_loss": record["train"].get("train_loss") if finetune else None,
        "adapter_key": record.get("adapter_key"),
        "adapter_cache_hit": record.get("adapter_cache_hit"),
        "seconds": record["seconds"],
    }


def selection_stability(cells: dict[tuple, list[dict]], judge: str) -> list[dict]:
    """How much each selector's choice changes with the seed, beside how much its harmful rate does.
    Per cell with a selection and >= 2 seeds: mean pairwise Jaccard similarity of the selected id sets
    across seeds (1: the same examples whatever the seed), the number of distinct ids used, the mean
    share of the selection that random's selection at the same seed also holds, and the sample SD of
    the harmful rate over seeds. A selector that picks the same set on every seed varies only through
    training order and measurement, so its SD is the training-noise floor that random's SD (selection
    plus training) can be read against."""
    out = []
    for (dataset, pool, k, mode, selector), members in cells.items():
        chosen = {r["seed"]: set(r.get("selected_ids") or []) for r in members if r.get("selected_ids")}
        if selector is None or len(chosen) < 2:
            continue
        seeds = sorted(chosen)
        jaccards = [len(chosen[a] & chosen[b]) / len(chosen[a] | chosen[b]) for i, a in enumerate(seeds) for b in seeds[i + 1:]]
        random_rows = {r["seed"]: set(r.get("selected_ids") or []) for r in cells.get((dataset, pool, k, mode, REFERENCE_SELECTOR), [])}
        shared = [len(chosen[s] & random_rows[s]) / len(chosen[s]) for s in seeds if random_rows.get(s)]
        rates = [r["harmful"][judge]["rate"] for r in members if r["harmful"][judge]["rate"] is not None]
        out.append({"dataset": dataset, "pool": pool, "k": k, "mode": mode, "selector": selector, "judge": judge,
                    "seeds": seeds, "jaccard_across_seeds": round(statistics.mean(jaccards), 4),
                    "distinct_ids": len(set().union(*chosen.values())),
                    "overlap_with_random": round(statistics.mean(shared), 4) if shared and selector != REFERENCE_SELECTOR else None,
                    "sd_harmful_over_seeds": round(statistics.stdev(rates), 4) if len(rates) >= 2 else None})
    return out


def _prompts(rows: Sequence[dict], metric: str, judge: str) -> int | list[int]:
    counts = sorted({r[metric][judge]["n_prompts"] for r in rows})
    return counts[0] if len(counts) == 1 else counts


def paired_comparison(members: Sequence[dict], reference: Sequence[dict], judge: str) -> dict:
    """Runs against reference runs of the same training seeds: the paired differences (member - reference) in
    harmful rate (mean, bootstrap CI, Wilcoxon), over-refusal and held-out loss, and the per-seed differences."""
    by_seed = {r["seed"]: r for r in reference}
    pairs = sorted(((r, by_seed[r["seed"]]) for r in members if r["seed"] in by_seed), key=lambda p: p[0]["seed"])
    harmful = [(a["seed"], a["harmful"][judge]["rate"], b["harmful"][judge]["rate"]) for a, b in pairs
               if a["harmful"][judge]["rate"] is not None and b["harmful"][judge]["rate"] is not None]
    usable = [(x, y) for _, x, y in harmful]
    diffs = [x - y for x, y in usable]
    overrefusal = [(a["seed"], a["overrefusal"][judge]["rate"] - b["overrefusal"][judge]["rate"]) for a, b in pairs
                   if a["overrefusal"][judge]["rate"] is not None and b["overrefusal"][judge]["rate"] is not None]
    over = [d for _, d in overrefusal]
    loss = [a["utility_loss"] - b["utility_loss"] for a, b in pairs if a["utility_loss"] is not None and b["utility_loss"] is not None]
    return {
        "n_pairs": len(diffs), "seeds": [a["seed"] for a, _ in pairs],
        "selector_mean": round(statistics.mean(a for a, _ in usable), 4) if usable else None,
        "random_mean": round(statistics.mean(b for _, b in usable), 4) if usable else None,
        "mean_difference": round(statistics.mean(diffs), 4) if diffs else None,
        "difference_ci95": bootstrap_ci(diffs),
        "wilcoxon": wilcoxon_signed_rank(diffs),
        "n_prompts": _prompts(members, "harmful", judge),
        "overrefusal_difference": round(statistics.mean(over), 4) if over else None,
        "overrefusal_difference_ci95": bootstrap_ci(over),
        "utility_loss_difference": round(statistics.mean(loss), 6) if loss else None,
        "utility_loss_difference_ci95": bootstrap_ci(loss),
        # [seed, member - reference] per pair: what the paired plot draws and what pooled_comparisons pools.
        # Unrounded: rounding each difference could break an exact tie between two seeds' means, and ties
        # change the Wilcoxon p-value
        "paired_differences": {"harmful": [[seed, x - y] for seed, x, y in harmful],
                               "overrefusal": [[seed, d] for seed, d in overrefusal]},
    }


def condition_comparisons(cells: dict[tuple, list[dict]], judges: Sequence[str]) -> list[dict]:
    """Where a grid has several modes or pools, each condition of a (dataset, selector, k) against, paired by seed:
    replay from the same pool (what the mode changes: backdoor, icl); replay from the grid's first pool (what
    the pool and mode change together); `ptst` against `none` (the same adapter: what the safety system
    prompt alone changes); `none` and `ptst` (k=0, no selector) against random replay from the first pool at
    each k. Fields as in the selector comparisons, plus the reference."""
    pools = list(dict.fromkeys(key[1] for key in cells if key[1] is not None))
    modes = {key[3] for key in cells}
    if not pools or (len(pools) < 2 and len(modes - {"none", "replay"}) == 0):
        return []
    first = pools[0]
    out = []
    for (dataset, pool, k, mode, selector), members in cells.items():
        if mode == "replay" and pool == first:
            continue
        if selector is not None:
            references = list(dict.fromkeys([(dataset, pool, k, "replay", selector), (dataset, first, k, "replay", selector)]))
            references = [r for r in references if r != (dataset, pool, k, mode, selector)]
        else:
            references = ([key for key in cells if key[0] == dataset and key[3] == "none"] if mode == "ptst" else [])
            references += sorted(key for key in cells if key[0] == dataset and key[1] == first and key[3] == "replay"
                                 and key[4] == REFERENCE_SELECTOR)
        for reference in (r for r in references if r in cells):
            for judge in judges:
                out.append({"dataset": dataset, "pool": pool, "k": k, "mode": mode, "selector": selector, "judge": judge,
                            "reference": {"pool": reference[1], "k": reference[2], "mode": reference[3], "selector": reference[4]},
                            **paired_comparison(members, cells[reference], judge)})
    return out


def summarise(rows: Sequence[dict]) -> dict:
    """Retention per run; per cell (dataset x pool x k x mode x selector) means with bootstrap CIs over
    seeds; per selector vs random (same dataset/pool/k/mode, paired by seed) the paired difference in
    harmful rate with its bootstrap CI and Wilcoxon p-value, and the paired differences in over-refusal
    and held-out loss (a selector that is safer only by refusing more, or by learning less, is no win).
    Then where the spread comes from: the selector x seed ANOVA per block, how much each selection changes
    with the seed, and (for rows with `selection_features`, attached by write_outputs) how properties of the
    selected examples go with the harmful rate within seed (selection_features.associations, Holm per judge).
    Rows gain `retention_by_judge` and the flat fields of the published schema (`flat_fields`)."""
    # the aligned reference of a run is the one evaluated as the run is (the same dataset eval overrides)
    aligned_by_eval = {sha256_json(r.get("eval_overrides")): r for r in rows if r["kind"] == "aligned"}
    aligned = aligned_by_eval.get(sha256_json(None), next(iter(aligned_by_eval.values()), None))
    finetuned = [r for r in rows if r["kind"] == "finetune"]
    judges = list(finetuned[0]["harmful"]) if finetuned else list(aligned["harmful"]) if aligned else []
    reference = {(r["dataset"], r["seed"]): r for r in finetuned if r["mode"] == "none"}
    datasets_by_eval: dict[str, set[str]] = {}
    for row in finetuned:
        key = sha256_json(row.get("eval_overrides"))
        datasets_by_eval.setdefault(key, set()).add(row["dataset"])
        none = reference.get((row["dataset"], row["seed"]))
        own = aligned_by_eval.get(key)
        row["retention_by_judge"] = {j: retention(none["harmful"][j]["rate"] if none else None, row["harmful"][j]["rate"],
                                         own["harmful"][j]["rate"] if own else None) for j in judges}
    cells: dict[tuple, list[dict]] = {}
    for row in finetuned:
        cells.setdefault((row["dataset"], row["pool"], row["k"], row["mode"], row["selector"]), []).append(row)
    for cell, members in cells.items():  # one run per seed, or a seed would count twice in every mean and test
        seen: dict[int, str] = {}
        for row in members:
            if row["seed"] in seen:
                raise ValueError(f"two runs of {'/'.join(map(str, cell))} at seed {row['seed']}: {seen[row['seed']]} and "
                                 f"{row['run_id']} (runs of one grid must differ in dataset, pool, k, mode, selector or seed)")
            seen[row["seed"]] = row["run_id"]
    cell_summaries = []
    for (dataset, pool, k, mode, selector), members in cells.items():
        members = sorted(members, key=lambda r: r["seed"])
        n_examples = members[0]["n_examples"]
        cell_summaries.append({
            "dataset": dataset, "pool": pool, "k": k, "mode": mode, "selector": selector, "n_examples": n_examples,
            "replay_fraction": round(k / (n_examples + k), 4) if mode in TRAINING_MODES and n_examples else 0.0,
            "seeds": [r["seed"] for r in members],
            "harmful": {j: {**mean_ci([r["harmful"][j]["rate"] for r in members]), "n_prompts": _prompts(members, "harmful", j)}
                        for j in judges},
            "overrefusal": {j: {**mean_ci([r["overrefusal"][j]["rate"] for r in members]),
                                "n_prompts": _prompts(members, "overrefusal", j)} for j in judges},
            "incoherent": {j: mean_ci([r["incoherent"][j] for r in members])["mean"] for j in judges if j in members[0]["incoherent"]},
            "utility_loss": {**mean_ci([r["utility_loss"] for r in members]), "n_examples": members[0]["utility_n"]},
            "retention": {j: mean_ci([r["retention_by_judge"][j] for r in members]) for j in judges},
            "selection_features": selection_features.cell_means(members),
        })
    comparisons = []
    by_key = {(c["dataset"], c["pool"], c["k"], c["mode"], c["selector"]): c for c in cell_summaries}
    for (dataset, pool, k, mode, selector), members in cells.items():
        if selector in (None, REFERENCE_SELECTOR) or (dataset, pool, k, mode, REFERENCE_SELECTOR) not in by_key:
            continue
        for judge in judges:
            comparisons.append({"dataset": dataset, "pool": pool, "k": k, "mode": mode, "selector": selector, "judge": judge,
                                **paired_comparison(members, cells[(dataset, pool, k, mode, REFERENCE_SELECTOR)], judge)})
    # the grid asks many questions at once (every selector x dataset x k x mode): Holm's correction over
    # all of them, per judge, beside each raw p-value
    holm_by_judge(comparisons)
    variance = []
    blocks: dict[tuple, dict[str, dict[int, float]]] = {}
    for (dataset, pool, k, mode, selector), members in cells.items():
        if selector is None:
            continue
        for judge in judges:
            table = blocks.setdefault((dataset, pool, k, mode, judge), {})
            table[selector] = {r["seed"]: r["harmful"][judge]["rate"] for r in members if r["harmful"][judge]["rate"] is not None}
    for (dataset, pool, k, mode, judge), table in blocks.items():
        components = variance_components(table)
        if components is not None:
            rates = [r for r in finetuned if (r["dataset"], r["pool"], r["k"], r["mode"]) == (dataset, pool, k, mode)
                     and r["selector"] is not None and r["harmful"][judge]["rate"] is not None]
            # the binomial SD of one run's rate on this many prompts: the scale of a one-prompt-set measurement
            binomial = binomial_sd([(r["harmful"][judge]["rate"], r["harmful"][judge]["n"]) for r in rates])
            variance.append({"dataset": dataset, "pool": pool, "k": k, "mode": mode, "judge": judge,
                             "binomial_sd_one_run": round(binomial, 4), **components})
    stability = [entry for judge in judges for entry in selection_stability(cells, judge)]
    features = holm_by_judge([entry for judge in judges for entry in selection_features.associations(finetuned, judge)],
                             lambda e: e["p_permutation"])
    for row in finetuned:
        row.update(flat_fields(row, judges[0]))
    aligned_by_dataset = [{"datasets": sorted(datasets_by_eval.get(key, ())), "eval_overrides": r["eval_overrides"],
                           "harmful": r["harmful"], "overrefusal": r["overrefusal"]}
                          for key, r in aligned_by_eval.items() if r.get("eval_overrides")]
    return {"judges": judges, "aligned": aligned, **({"aligned_by_dataset": aligned_by_dataset} if aligned_by_dataset else {}),
            "cells": cell_summaries, "comparisons": comparisons,
            "pooled_comparisons": pooled_comparisons(comparisons), "condition_comparisons": condition_comparisons(cells, judges),
            "variance": variance, "selection_stability": stability, "selection_features": features,
            "shared_adapter_checks": shared_adapter_checks(finetuned)}


def shared_adapter_checks(finetuned: Sequence[dict]) -> list[dict]:
    """icl and ptst train exactly as `none` does and reuse its adapter, so comparing them with `none` isolates
    what serving adds. Per such run: whether its adapter is the one recorded for `none` at its (dataset, seed),
    and if not (an adapter cache emptied, or an adapter key that gained a field since), whether the retrained
    one reached the same training loss."""
    nones = {(r["dataset"], r["seed"]): r for r in finetuned if r["mode"] == "none"}
    checks = []
    for row in finetuned:
        none = nones.get((row["dataset"], row["seed"]))
        if row["mode"] not in ("icl", "ptst") or none is None:
            continue
        losses = (row.get("train_loss"), none.get("train_loss"))
        checks.append({"dataset": row["dataset"], "seed": row["seed"], "mode": row["mode"], "pool": row["pool"],
                       "same_adapter": row.get("adapter_key") is not None and row.get("adapter_key") == none.get("adapter_key"),
                       "train_loss": losses[0], "none_train_loss": losses[1],
                       "same_train_loss": None if None in losses else math.isclose(*losses, rel_tol=1e-6)})
    return checks


def flat_fields(row: dict, judge: str) -> dict:
    """A run in the published flat schema (primary judge): user_data, harmful_rate, overrefusal_rate,
    utility (held-out loss), retention, with the interval and prompt counts beside the rates."""
    harmful, over = row["harmful"][judge], row["overrefusal"][judge]
    return {"user_data": row["dataset"], "judge": judge, "harmful_rate": harmful["rate"], "harmful_rate_ci": harmful["ci95"],
            "n_harmful_prompts": harmful["n_prompts"], "overrefusal_rate": over["rate"], "overrefusal_rate_ci": over["ci95"],
            "n_overrefusal_prompts": over["n_prompts"], "utility": row["utility_loss"],
            "retention": row["retention_by_judge"].get(judge)}


def flat_comparisons(summary: dict) -> list[dict]:
    """The primary judge's selector-vs-random comparisons in the published flat schema."""
    primary = summary["judges"][0] if summary["judges"] else None
    out = []
    for c in summary["comparisons"]:
        if c["judge"] != primary:
            continue
        ci = c["difference_ci95"] or [None, None]
        out.append({"user_data": c["dataset"], "pool": c["pool"], "k": c["k"], "selector": c["selector"], "mode": c["mode"],
                    "judge": c["judge"], "mean_diff_harmful_rate": c["mean_difference"], "ci_low": ci[0], "ci_high": ci[1],
                    "p_value": c["wilcoxon"]["p_value"], "p_holm": c.get("p_holm"), "n_tests": c.get("n_tests"),
                    "n_seeds": c["n_pairs"], "selector_mean": c["selector_mean"],
                    "random_mean": c["random_mean"], "mean_diff_overrefusal_rate": c["overrefusal_difference"],
                    "overrefusal_diff_ci": c["overrefusal_difference_ci95"],
                    "mean_diff_utility_loss": c["utility_loss_difference"], "utility_loss_diff_ci": c["utility_loss_difference_ci95"],
                    "n_prompts": c["n_prompts"]})
    return out
