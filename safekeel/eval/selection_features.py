"""What in a selection goes with its harmful rate.

The selectors benchmark says how much of the harmful rate's spread the selector explains (the two-way
ANOVA of `bench.variance_components`) but not what in the selected examples does it. This module
describes each run's selection by a few properties of the chosen safety examples and measures, within
each training seed, how they go with the run's harmful rate:

- `n_categories`: how many harm categories the selection covers (stratified covers min(k, categories);
  a selector that clusters around the user data may cover two);
- `refusal_words`: the mean length of the selected refusals, in whitespace words (brief refusals teach
  a different reply than explained ones);
- `request_words`: the mean length of the selected harmful requests.

The association is read within seed, because the seed moves every selector's rate together (same
training order and user data): per (dataset, pool, k, mode) block, the harmful rate and the feature
are centred on their means over the runs of the same seed, and the Pearson correlation and the slope
(change in harmful rate per unit of the feature) are computed on the centred values; this is the
fixed-effects regression of rate on feature with seed as the block. The p-value comes from a
permutation test that shuffles the feature among the runs of each seed (the seed blocks stay intact),
two-sided on |correlation|. It is descriptive: the features were chosen after the runs were seen,
the runs of one selector share their features across seeds, and a feature can stand in for another
property of the same selection. A clear association is a hypothesis for a new selector, to be tested
on fresh seeds and dev data, not a result.
"""

from __future__ import annotations

import logging
import statistics
from collections.abc import Mapping, Sequence
from pathlib import Path

from safekeel.data.conversation import SafetyExample

log = logging.getLogger(__name__)

FEATURES = ("n_categories", "refusal_words", "request_words")
N_PERMUTATIONS = 10_000


def features_of(ids: Sequence[str], examples: Mapping[str, SafetyExample]) -> dict | None:
    """The selection's features, or None when it selected nothing or an id is not in the pool."""
    if not ids or any(i not in examples for i in ids):
        return None
    chosen = [examples[i] for i in ids]
    return {"n_categories": len({e.category for e in chosen}),
            "refusal_words": round(statistics.mean(len(e.refusal.split()) for e in chosen), 3),
            "request_words": round(statistics.mean(len(e.request.split()) for e in chosen), 3)}


def attach_features(rows: Sequence[dict], pools: Mapping[str, Sequence[SafetyExample]] | None = None) -> None:
    """Sets row["selection_features"] (None where nothing was selected or the pool cannot be read) in place.
    Pools are loaded by name (`load_pool`) unless given."""
    from safekeel.data.formats import DatasetError
    from safekeel.data.safety import load_pool

    by_pool: dict[str, dict[str, SafetyExample] | None] = {}
    for row in rows:
        pool = row.get("pool")
        if pool is not None and pool not in by_pool:
            try:
                examples = pools[pool] if pools is not None and pool in pools else load_pool(pool)
                by_pool[pool] = {e.id: e for e in examples}
            except (DatasetError, OSError) as error:
                log.warning("no selection features for pool %r: %s", pool, error)
                by_pool[pool] = None
        examples_by_id = by_pool.get(pool) if pool is not None else None
        row["selection_features"] = features_of(row.get("selected_ids") or [], examples_by_id) if examples_by_id else None


def associations(rows: Sequence[dict], judge: str, n_permutations: int = N_PERMUTATIONS, seed: int = 0) -> list[dict]:
    """Per (dataset, pool, k, mode) block and feature: the within-seed correlation and slope of the harmful
    rate (`judge`) on the feature, over the runs with a selection, and the permutation p-value (feature
    shuffled within seeds). Seeds with a single run carry no within-seed information and are left out."""
    import numpy as np

    blocks: dict[tuple, list[dict]] = {}
    for row in rows:
        if row.get("selector") is None or not row.get("selection_features") or row["harmful"][judge]["rate"] is None:
            continue
        blocks.setdefault((row["dataset"], row["pool"], row["k"], row["mode"]), []).append(row)
    out = []
    for (dataset, pool, k, mode), members in sorted(blocks.items(), key=lambda item: str(item[0])):
        groups = _seed_groups(members)
        if not groups:
            continue
        y = [np.array([r["harmful"][judge]["rate"] for r in g], dtype=float) for g in groups]
        y_centred = np.concatenate([v - v.mean() for v in y])
        for feature in FEATURES:
            x = [np.array([r["selection_features"][feature] for r in g], dtype=float) for g in groups]
            x_centred = [v - v.mean() for v in x]
            flat = np.concatenate(x_centred)
            sxx, syy = float(flat @ flat), float(y_centred @ y_centred)
            entry = {"dataset": dataset, "pool": pool, "k": k, "mode": mode, "judge": judge, "feature": feature,
                     "n_runs": int(flat.size), "seeds": [g[0]["seed"] for g in groups],
                     "range": [float(min(v.min() for v in x)), float(max(v.max() for v in x))],
                     "correlation": None, "slope": None, "p_permutation": None}
            if sxx <= 1e-12 or syy <= 1e-12:
                entry["note"] = "no within-seed variation in the " + ("feature" if sxx <= 1e-12 else "harmful rate")
                out.append(entry)
                continue
            observed = float(flat @ y_centred)
            # within-seed shuffles of the centred feature keep its per-seed values, so sxx is unchanged and
            # |sum x*y| ranks the permutations exactly as |correlation| does
            rng = np.random.default_rng(seed)
            total = np.zeros(n_permutations)
            offset = 0
            for values in x_centred:
                shuffled = rng.permuted(np.tile(values, (n_permutations, 1)), axis=1)
                total += shuffled @ y_centred[offset:offset + values.size]
                offset += values.size
            exceed = int(np.sum(np.abs(total) >= abs(observed) - 1e-12))
            entry.update(correlation=round(observed / float(np.sqrt(sxx * syy)), 4), slope=round(observed / sxx, 6),
                         p_permutation=round((1 + exceed) / (1 + n_permutations), 6))
            out.append(entry)
    return out


def _seed_groups(rows: Sequence[dict]) -> list[list[dict]]:
    """The runs of each training seed (in seed order, each seed's runs by selector), leaving out seeds with a
    single run: centred on its own mean a lone run is zero and says nothing within seed. The fixed order makes
    the permutation p-values depend on the runs, not on the order they were read in."""
    by_seed: dict[int, list[dict]] = {}
    for row in sorted(rows, key=lambda r: (str(r["selector"]), r["run_id"])):
        by_seed.setdefault(row["seed"], []).append(row)
    return [group for _, group in sorted(by_seed.items()) if len(group) >= 2]


def cell_means(members: Sequence[dict]) -> dict | None:
    """Mean of each feature over a cell's runs (None when no run has features)."""
    present = [r["selection_features"] for r in members if r.get("selection_features")]
    if not present:
        return None
    return {f: round(statistics.mean(p[f] for p in present), 3) for f in FEATURES}


def _centred_rates(rows: Sequence[dict], judge: str) -> list[tuple[dict, float]]:
    """(row, harmful rate minus the mean of its seed's runs) for the runs of one block with a selection."""
    out = []
    for members in _seed_groups(rows):
        mean = statistics.mean(r["harmful"][judge]["rate"] for r in members)
        out += [(r, r["harmful"][judge]["rate"] - mean) for r in members]
    return out


LABELS = {"n_categories": "harm categories covered", "refusal_words": "mean refusal length (words)",
          "request_words": "mean request length (words)"}


def markdown(summary: dict, judge: str) -> list[str]:
    """The report's section: each selector's mean features per cell, then the within-seed associations."""
    entries = [e for e in summary.get("selection_features", []) if e["judge"] == judge]
    cells = [c for c in summary["cells"] if c.get("selection_features")]
    if not entries or not cells:
        return []
    lines = ["", f"## What in a selection goes with its harmful rate (exploratory, `{judge}` judge)", "",
             "Features of the selected safety examples: harm categories covered, mean refusal and request length "
             "in words. Per (dataset, pool, k, mode), the harmful rate and the feature are centred within each "
             "training seed; r = their correlation, slope = change in harmful rate per unit of the feature; "
             f"p = permutation test shuffling the feature within seeds ({N_PERMUTATIONS:,} shuffles, two-sided), "
             "Holm over the table. Chosen after the runs were seen and confounded with everything else a selector "
             "does: hypotheses for new selectors, not results.", "",
             "| dataset | pool | k | mode | selector | seeds | categories | refusal words | request words | "
             f"harmful ({judge}) |", "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for c in cells:
        f, harm = c["selection_features"], c["harmful"][judge]["mean"]
        lines.append(f"| {c['dataset']} | {c['pool']} | {c['k']} | {c['mode']} | {c['selector']} | {len(c['seeds'])} | "
                     f"{f['n_categories']:.1f} | {f['refusal_words']:.1f} | {f['request_words']:.1f} | "
                     + ("n/a" if harm is None else f"{harm:.3f}") + " |")
    from safekeel.eval.bench import _f as number  # "n/a" for a missing value, as in the rest of the report

    lines += ["", "| dataset | pool | k | mode | feature | runs | seeds | range | r within seed | slope | p (permutation) | Holm p |",
              "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for e in entries:
        lines.append(f"| {e['dataset']} | {e['pool']} | {e['k']} | {e['mode']} | {e['feature']} | {e['n_runs']} | {len(e['seeds'])} | "
                     f"{e['range'][0]:g}-{e['range'][1]:g} | {number(e['correlation'], 3)} | {number(e['slope'], 4)} | "
                     f"{number(e['p_permutation'], 4)} | {number(e.get('p_holm'), 4)} |")
    return lines


def plot(data: dict, folder: Path, stem: str) -> Path | None:
    """<stem>_features.png: per block (columns) and feature (rows), each run's seed-centred harmful rate
    against the feature, coloured by selector; None when no run has features."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    judge = data["summary"]["judges"][0] if data["summary"]["judges"] else None
    runs = [r for r in data["runs"] if r.get("selector") is not None and r.get("selection_features")
            and judge and r["harmful"][judge]["rate"] is not None]
    blocks = sorted({(r["dataset"], r["pool"], r["k"], r["mode"]) for r in runs}, key=str)
    if not blocks:
        return None
    selectors = sorted({r["selector"] for r in runs})
    palette = plt.get_cmap("tab10" if len(selectors) <= 10 else "tab20")
    colours = {s: palette(i % palette.N) for i, s in enumerate(selectors)}
    figure, axes = plt.subplots(len(FEATURES), len(blocks), figsize=(4.8 * len(blocks), 3.6 * len(FEATURES)), squeeze=False)
    for column, block in enumerate(blocks):
        points = _centred_rates([r for r in runs if (r["dataset"], r["pool"], r["k"], r["mode"]) == block], judge)
        for row, feature in enumerate(FEATURES):
            ax = axes[row][column]
            for selector in selectors:
                chosen = [(r["selection_features"][feature], y) for r, y in points if r["selector"] == selector]
                if chosen:
                    xs, ys = zip(*chosen)
                    ax.scatter(xs, ys, color=colours[selector], s=16, alpha=0.8, label=selector)
            ax.axhline(0, color="grey", linewidth=0.8)
            ax.set_xlabel(LABELS[feature], fontsize=8)
            ax.set_ylabel(f"harmful rate - seed mean ({judge})", fontsize=8)
            if row == 0:
                ax.set_title(f"{block[0]} / {block[1]} / k={block[2]} / {block[3]}", fontsize=9)
    axes[0][0].legend(fontsize=6, ncol=2)
    figure.suptitle("each dot a run; exploratory: features chosen after the runs were seen", fontsize=9)
    figure.tight_layout(rect=(0, 0, 1, 0.97))
    path = folder / f"{stem}_features.png"
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path
