"""Every statistic of safekeel: proportions with Wilson 95% intervals and the paired interval of the gate;
for the benchmark (safekeel.bench) the bootstrap interval over seeds, the Wilcoxon signed-rank test, Holm's
correction, the seed-clustered and pooled tests, the selector x seed ANOVA, safety retention and the
within-seed permutation association. scipy, statsmodels and numpy are imported inside the functions that
use them (deferred on purpose: `Rate`, which every evaluation imports, needs none of them)."""

from __future__ import annotations

import math
import statistics
from dataclasses import asdict, dataclass
from typing import Callable, Sequence

N_RESAMPLES = 10_000
"""Bootstrap resamples for every confidence interval over seeds."""


@dataclass(frozen=True)
class Rate:
    """count / n with a Wilson 95% interval. n excludes unjudged items, which are reported apart."""

    count: int
    n: int
    unjudged: int = 0

    @property
    def value(self) -> float | None:
        return self.count / self.n if self.n else None

    @property
    def ci(self) -> tuple[float, float] | None:
        return wilson_interval(self.count, self.n) if self.n else None

    def to_dict(self) -> dict:
        return {**asdict(self), "rate": self.value, "ci95": self.ci}

    def __str__(self) -> str:
        if not self.n:
            return f"n/a (0 judged, {self.unjudged} unjudged)"
        low, high = self.ci
        text = f"{self.value:.3f} [{low:.3f}, {high:.3f}] ({self.count}/{self.n})"
        return text + (f", {self.unjudged} unjudged" if self.unjudged else "")


def wilson_interval(count: int, n: int, alpha: float = 0.05) -> tuple[float, float]:
    low, high = _wilson(count, n, alpha)
    return (round(low, 4), round(high, 4))


def paired_difference_interval(first: list[bool], second: list[bool], alpha: float = 0.05,
                               sided: str = "upper") -> dict:
    """Difference of two proportions measured on the same items (first - second), with Newcombe's hybrid
    score interval for paired data (Newcombe 1998, method 10: Wilson limits of each proportion combined with
    the correlation of the pairs). `sided`: 'upper' gives a one-sided (1 - alpha) upper bound (the lower limit
    at the same confidence comes with it), 'two' a two-sided (1 - alpha) interval. Items are pairs (a_i, b_i)."""
    from scipy.stats import norm  # deferred on purpose (module docstring)

    if len(first) != len(second):
        raise ValueError(f"paired proportions need as many first as second items ({len(first)} != {len(second)})")
    n = len(first)
    if n == 0:
        raise ValueError("paired proportions need at least one pair")
    if sided not in ("upper", "two"):
        raise ValueError(f"sided must be 'upper' or 'two', not {sided!r}")
    both = sum(a and b for a, b in zip(first, second))
    only_first = sum(a and not b for a, b in zip(first, second))
    only_second = sum(b and not a for a, b in zip(first, second))
    neither = n - both - only_first - only_second
    p1, p2 = (both + only_first) / n, (both + only_second) / n
    confidence_alpha = 2 * alpha if sided == "upper" else alpha
    l1, u1 = _wilson(both + only_first, n, confidence_alpha)
    l2, u2 = _wilson(both + only_second, n, confidence_alpha)
    denominator = (both + only_first) * (only_second + neither) * (both + only_second) * (only_first + neither)
    # the correlation of the pairs, with Newcombe's continuity correction (as in Fagerland, Lydersen & Laake,
    # Statistical Analysis of Contingency Tables, ch. 8): a positive cross product is reduced by n/2
    cross = both * neither - only_first * only_second
    if not denominator or 0 <= cross <= n / 2:
        phi = 0.0
    else:
        phi = (cross - n / 2 if cross > n / 2 else cross) / math.sqrt(denominator)
    delta = p1 - p2
    low = delta - math.sqrt(max((p1 - l1) ** 2 - 2 * phi * (p1 - l1) * (u2 - p2) + (u2 - p2) ** 2, 0.0))
    high = delta + math.sqrt(max((u1 - p1) ** 2 - 2 * phi * (u1 - p1) * (p2 - l2) + (p2 - l2) ** 2, 0.0))
    return {"n": n, "difference": delta, "low": max(low, -1.0), "high": min(high, 1.0), "alpha": alpha, "sided": sided,
            "first_rate": p1, "second_rate": p2, "discordant": {"first_only": only_first, "second_only": only_second},
            "z": float(norm.ppf(1 - confidence_alpha / 2))}


def _wilson(count: int, n: int, alpha: float) -> tuple[float, float]:
    from statsmodels.stats.proportion import proportion_confint  # deferred on purpose (module docstring)

    low, high = proportion_confint(count, n, alpha=alpha, method="wilson")
    return float(low), float(high)


def paired_gate_sample_size(discordance: float, margin: float, alpha: float = 0.05, power: float = 0.8,
                            true_difference: float = 0.0) -> int:
    """Pairs needed so that a one-sided (1 - alpha) upper bound on a paired difference falls within `margin`
    with probability `power` when the true difference is `true_difference`: the normal approximation
    n = ((z_(1-alpha) + z_power) * sd / (margin - true_difference))^2 with sd^2 = discordance - difference^2
    (discordance: the share of pairs whose two verdicts differ, from the judge's error rates and the models)."""
    from scipy.stats import norm  # deferred on purpose (module docstring)

    if not margin > true_difference:
        raise ValueError("the margin must exceed the true difference")
    variance = max(discordance - true_difference ** 2, 1e-12)
    return math.ceil(((norm.ppf(1 - alpha) + norm.ppf(power)) ** 2) * variance / (margin - true_difference) ** 2)


# ---------------------------------------------------------------- over seeds (the benchmark)


def bootstrap_ci(values: Sequence[float], n_resamples: int = N_RESAMPLES, seed: int = 0,
                 level: float = 0.95) -> tuple[float, float] | None:
    """Percentile bootstrap interval of the mean (seeded); None with fewer than 2 values."""
    import numpy as np  # deferred on purpose (module docstring)

    if len(values) < 2:
        return None
    data = np.asarray(values, dtype=float)
    means = data[np.random.default_rng(seed).integers(0, len(data), size=(n_resamples, len(data)))].mean(axis=1)
    low, high = np.quantile(means, [(1 - level) / 2, 1 - (1 - level) / 2])
    return (round(float(low), 4), round(float(high), 4))


def seed_clustered_test(pairs: Sequence[tuple], alternative: str = "two-sided") -> dict:
    """A paired difference pooled over user datasets with the training seed as the unit: pairs are
    (dataset, seed, difference). Pairs that share a seed are not independent (random draws the same
    examples at a seed on every dataset, and the training seed is shared), so the test runs on the seeds
    every dataset has: each seed's mean difference over the datasets (each dataset weighs the same) is one
    observation; its mean, a bootstrap CI resampling seeds (all of a seed's datasets together), the
    Wilcoxon signed-rank test on the seed means, and seed_icc: how alike a seed's differences are across
    datasets (ICC(3,1) of the seed x dataset table, dataset means removed; 0: independent)."""
    by_dataset: dict[str, dict[int, float]] = {}
    for dataset, seed, difference in pairs:
        by_dataset.setdefault(dataset, {})[seed] = difference
    seeds = sorted(set.intersection(*(set(v) for v in by_dataset.values()))) if by_dataset else []
    seed_means = [statistics.mean(by_dataset[d][s] for d in by_dataset) for s in seeds]
    components = variance_components(by_dataset) if len(by_dataset) >= 2 else None
    icc = None
    if components and components["df"][1] > 0:
        m, df_seed = len(by_dataset), len(seeds) - 1
        ms_seed, ms_residual = components["ss"]["seed"] / df_seed, components["ss"]["residual"] / components["df"][1]
        icc = round((ms_seed - ms_residual) / (ms_seed + (m - 1) * ms_residual), 4) if ms_seed + ms_residual > 0 else None
    return {"n_seeds": len(seeds), "n_pairs": len(seeds) * len(by_dataset), "datasets": list(by_dataset),
            "mean_difference": round(statistics.mean(seed_means), 4) if seed_means else None,
            "ci95": bootstrap_ci(seed_means), "wilcoxon": wilcoxon_signed_rank(seed_means, alternative=alternative),
            "seed_icc": icc, "seed_means": [[s, round(v, 6)] for s, v in zip(seeds, seed_means)]}


def pooled_comparisons(comparisons: Sequence[dict]) -> list[dict]:
    """Each selector vs random pooled over the user datasets (same pool, k, mode, judge), with the training
    seed as the unit (`seed_clustered_test`): per seed the mean difference over the datasets, then the
    mean, bootstrap CI and two-sided Wilcoxon test over seeds; the same for over-refusal. Holm over the
    pooled family of each judge (far fewer questions than per dataset)."""
    groups: dict[tuple, list[dict]] = {}
    for c in comparisons:
        groups.setdefault((c["pool"], c["k"], c["mode"], c["selector"], c["judge"]), []).append(c)
    pooled = []
    for (pool, k, mode, selector, judge), members in groups.items():
        if len(members) < 2:
            continue
        test = seed_clustered_test([(c["dataset"], seed, d) for c in members for seed, d in c["paired_differences"]["harmful"]])
        if test["n_seeds"] < 2:
            continue
        over_test = seed_clustered_test([(c["dataset"], seed, d) for c in members for seed, d in c["paired_differences"]["overrefusal"]])
        pooled.append({
            "pool": pool, "k": k, "mode": mode, "selector": selector, "judge": judge,
            "datasets": [c["dataset"] for c in members], "n_pairs": test["n_pairs"], "n_seeds": test["n_seeds"],
            "mean_difference": test["mean_difference"], "difference_ci95": test["ci95"], "wilcoxon": test["wilcoxon"],
            "seed_icc": test["seed_icc"],
            "overrefusal_difference": over_test["mean_difference"] if over_test["n_seeds"] >= 2 else None,
            "overrefusal_difference_ci95": over_test["ci95"] if over_test["n_seeds"] >= 2 else None,
        })
    return holm_by_judge(pooled)


def wilcoxon_signed_rank(differences: Sequence[float], alternative: str = "two-sided") -> dict:
    """Wilcoxon signed-rank test of paired differences (scipy; zero differences dropped), two-sided or
    one-sided ('less': the differences tend below zero): {p_value, statistic, note, min_attainable_p};
    p_value None with the reason when the test is undefined."""
    from scipy.stats import wilcoxon  # deferred on purpose (module docstring)

    diffs = [round(float(d), 10) for d in differences]  # exact ties stay ties despite float error
    if len(diffs) < 2:
        return {"p_value": None, "statistic": None, "note": f"needs >= 2 pairs (have {len(diffs)})"}
    if all(d == 0 for d in diffs):
        return {"p_value": None, "statistic": None, "note": "all paired differences are zero"}
    result = wilcoxon(diffs, alternative=alternative)
    nonzero = sum(d != 0 for d in diffs)
    # the smallest p any outcome can give with this many non-zero pairs under the exact null distribution
    # (no ties): 2 / 2^n two-sided, 1 / 2^n one-sided. With 5 seeds two-sided it is 0.0625: five pairs never
    # reach p < 0.05. (With ties and more than 13 pairs scipy uses the normal approximation, whose floor is higher.)
    return {"p_value": round(float(result.pvalue), 6), "statistic": float(result.statistic), "note": None,
            "alternative": alternative,
            "min_attainable_p": (2.0 if alternative == "two-sided" else 1.0) / 2 ** nonzero}


def holm_adjust(p_values: Sequence[float | None]) -> list[float | None]:
    """Holm-Bonferroni adjusted p-values (family-wise error) over the defined ones; None stays None.
    The i-th smallest of m p-values becomes max over j <= i of min(1, (m - j + 1) p_(j))."""
    defined = sorted((p, i) for i, p in enumerate(p_values) if p is not None)
    m, running = len(defined), 0.0
    adjusted: list[float | None] = [None] * len(p_values)
    for rank, (p, index) in enumerate(defined):
        running = max(running, min(1.0, (m - rank) * p))
        adjusted[index] = round(running, 6)
    return adjusted


def holm_by_judge(comparisons: list[dict], p_value: Callable[[dict], float | None] = lambda c: c["wilcoxon"]["p_value"]) -> list[dict]:
    """Adds p_holm (Holm over every comparison of the same judge) and n_tests to each comparison, in place;
    `p_value` reads an entry's raw p (default: its Wilcoxon test)."""
    for judge in dict.fromkeys(c["judge"] for c in comparisons):
        family = [c for c in comparisons if c["judge"] == judge]
        p_values = [p_value(c) for c in family]
        n_tests = sum(p is not None for p in p_values)
        for comparison, adjusted in zip(family, holm_adjust(p_values)):
            comparison.update(p_holm=adjusted, n_tests=n_tests)
    return comparisons


def variance_components(table: dict[str, dict[int, float]]) -> dict | None:
    """Where the spread of a rate comes from, over a complete selector x seed table (only seeds every
    selector has): the two-way ANOVA without replication. Sums of squares for selector (rows), training
    seed (columns) and the residual (selector x seed interaction plus noise), the standard deviation of
    the selector means and of the seed means, and the F test of "all selectors equal" (seed as a block,
    as the paired design intends). None when fewer than 2 selectors or 2 shared seeds."""
    from scipy.stats import f as f_distribution  # deferred on purpose (module docstring)

    seeds = sorted(set.intersection(*(set(v) for v in table.values()))) if table else []
    selectors = sorted(table)
    if len(selectors) < 2 or len(seeds) < 2:
        return None
    values = [[table[s][seed] for seed in seeds] for s in selectors]
    a, b = len(selectors), len(seeds)
    grand = sum(map(sum, values)) / (a * b)
    row_means = [sum(row) / b for row in values]
    column_means = [sum(values[i][j] for i in range(a)) / a for j in range(b)]
    ss_selector = b * sum((m - grand) ** 2 for m in row_means)
    ss_seed = a * sum((m - grand) ** 2 for m in column_means)
    ss_total = sum((v - grand) ** 2 for row in values for v in row)
    ss_residual = max(ss_total - ss_selector - ss_seed, 0.0)
    df_selector, df_seed, df_residual = a - 1, b - 1, (a - 1) * (b - 1)
    ms_residual = ss_residual / df_residual
    exact = ms_residual <= 1e-12 * max(ss_total, 1e-12)  # an additive table: no residual to test against
    f_value = None if exact else (ss_selector / df_selector) / ms_residual
    p_value = float(f_distribution.sf(f_value, df_selector, df_residual)) if f_value is not None else None
    return {"selectors": selectors, "seeds": seeds, "grand_mean": round(grand, 4),
            "ss": {"selector": round(ss_selector, 6), "seed": round(ss_seed, 6), "residual": round(ss_residual, 6),
                   "total": round(ss_total, 6)},
            "share": {k: (round(v / ss_total, 4) if ss_total > 0 else None)
                      for k, v in (("selector", ss_selector), ("seed", ss_seed), ("residual", ss_residual))},
            "sd_selector_means": round(statistics.pstdev(row_means), 4),
            "sd_seed_means": round(statistics.pstdev(column_means), 4),
            "residual_sd": round(math.sqrt(ms_residual), 4),
            "f_selector": round(f_value, 4) if f_value is not None else None,
            "p_selector": round(p_value, 6) if p_value is not None else None,
            "df": [df_selector, df_residual]}



def retention(hr_none: float | None, hr_method: float | None, hr_aligned: float | None) -> float | None:
    """Share of the safety lost to fine-tuning that the method keeps: (HR_none - HR_method) /
    (HR_none - HR_aligned). None when a rate is missing or fine-tuning lost no safety (HR_none <= HR_aligned)."""
    if hr_none is None or hr_method is None or hr_aligned is None or hr_none - hr_aligned <= 0:
        return None
    return round((hr_none - hr_method) / (hr_none - hr_aligned), 4)



def mean_ci(values: Sequence[float | None], seed: int = 0) -> dict:
    """Mean of the values present (None skipped) with its bootstrap 95% interval, their count and a note."""
    present = [v for v in values if v is not None]
    if not present:
        return {"mean": None, "ci95": None, "n": 0, "note": "no value"}
    ci = bootstrap_ci(present, seed=seed)
    return {"mean": round(statistics.mean(present), 4), "ci95": ci, "n": len(present),
            "note": None if ci else "one value: no interval"}


def paired_test(pairs: Sequence[tuple], alternative: str) -> dict:
    """pairs: (dataset, seed, first value, second value). The mean paired difference (first - second), its
    bootstrap CI and the Wilcoxon signed-rank test (`alternative`), the two means (named `selector_mean` and
    `random_mean`, as the benchmark's records name them) and every (dataset, seed, difference)."""
    diffs = [a - b for _, _, a, b in pairs]
    return {"n_pairs": len(diffs), "mean_difference": round(statistics.mean(diffs), 4) if diffs else None,
            "ci95": bootstrap_ci(diffs), "wilcoxon": wilcoxon_signed_rank(diffs, alternative=alternative),
            "selector_mean": round(statistics.mean(a for _, _, a, _ in pairs), 4) if pairs else None,
            "random_mean": round(statistics.mean(b for _, _, _, b in pairs), 4) if pairs else None,
            "differences": [[d, s, round(a - b, 6)] for d, s, a, b in pairs]}


def binomial_sd(rates: Sequence[tuple[float, int]]) -> float:
    """The binomial SD of one measured rate, over (rate, n) pairs: sqrt of the mean of p (1 - p) / n."""
    return math.sqrt(statistics.mean(p * (1 - p) / max(n, 1) for p, n in rates))


def within_block_association(x_blocks: Sequence[Sequence[float]], y_blocks: Sequence[Sequence[float]],
                             n_permutations: int = 10_000, seed: int = 0) -> dict:
    """How x goes with y within blocks (the fixed-effects regression of y on x with the block as a factor):
    x and y are centred on their block means, then the Pearson correlation and the slope of y on x are
    computed on the centred values; the p-value is a permutation test shuffling x within each block (blocks
    stay intact), two-sided on |correlation|. {correlation, slope, p_permutation, constant}: all None, and
    `constant` 'x' or 'y', when that variable does not vary within the blocks."""
    import numpy as np  # deferred on purpose (module docstring)

    y_centred = np.concatenate([v - v.mean() for v in (np.array(b, dtype=float) for b in y_blocks)])
    x_centred = [v - v.mean() for v in (np.array(b, dtype=float) for b in x_blocks)]
    flat = np.concatenate(x_centred)
    sxx, syy = float(flat @ flat), float(y_centred @ y_centred)
    if sxx <= 1e-12 or syy <= 1e-12:
        return {"correlation": None, "slope": None, "p_permutation": None, "constant": "x" if sxx <= 1e-12 else "y"}
    observed = float(flat @ y_centred)
    # within-block shuffles of the centred x keep its per-block values, so sxx is unchanged and |sum x*y|
    # ranks the permutations exactly as |correlation| does
    rng = np.random.default_rng(seed)
    total = np.zeros(n_permutations)
    offset = 0
    for values in x_centred:
        shuffled = rng.permuted(np.tile(values, (n_permutations, 1)), axis=1)
        total += shuffled @ y_centred[offset:offset + values.size]
        offset += values.size
    exceed = int(np.sum(np.abs(total) >= abs(observed) - 1e-12))
    return {"correlation": round(observed / float(np.sqrt(sxx * syy)), 4), "slope": round(observed / sxx, 6),
            "p_permutation": round((1 + exceed) / (1 + n_permutations), 6), "constant": None}
