"""What in a selection goes with its harmful rate.

The selectors benchmark says how much of the harmful rate's spread the selector explains (the two-way
ANOVA of `safekeel.eval.stats.variance_components`) but not what in the selected examples does it. This
module describes each run's selection by a few properties of the chosen safety examples and measures, within
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
on fresh seeds and dev data, not a result. The report's section and plot of it are in
safekeel.bench.report and safekeel.bench.plots.
"""

from __future__ import annotations

import logging
import statistics
from collections.abc import Mapping, Sequence

from safekeel.data.conversation import SafetyExample
from safekeel.data.formats import DatasetError
from safekeel.data.safety import load_pool
from safekeel.eval.stats import within_block_association

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
    shuffled within seeds; safekeel.eval.stats.within_block_association). Seeds with a single run carry no
    within-seed information and are left out."""
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
        y = [[r["harmful"][judge]["rate"] for r in g] for g in groups]
        for feature in FEATURES:
            x = [[float(r["selection_features"][feature]) for r in g] for g in groups]
            association = within_block_association(x, y, n_permutations, seed)
            entry = {"dataset": dataset, "pool": pool, "k": k, "mode": mode, "judge": judge, "feature": feature,
                     "n_runs": sum(map(len, x)), "seeds": [g[0]["seed"] for g in groups],
                     "range": [min(min(v) for v in x), max(max(v) for v in x)],
                     "correlation": association["correlation"], "slope": association["slope"],
                     "p_permutation": association["p_permutation"]}
            if association["constant"]:
                entry["note"] = "no within-seed variation in the " + ("feature" if association["constant"] == "x" else "harmful rate")
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


def centred_rates(rows: Sequence[dict], judge: str) -> list[tuple[dict, float]]:
    """(row, harmful rate minus the mean of its seed's runs) for the runs of one block with a selection."""
    out = []
    for members in _seed_groups(rows):
        mean = statistics.mean(r["harmful"][judge]["rate"] for r in members)
        out += [(r, r["harmful"][judge]["rate"] - mean) for r in members]
    return out
