"""Why the pooled and confirmatory tests make the training seed the unit, and how wide a 6-seed bootstrap
interval really is: two small simulations under the null (normal data, seeded; ~15 s on 2 cores).

1. 8 seeds x 3 datasets, pairs of a seed correlated rho: the rejection rate at alpha 0.05 of the one-sided
   Wilcoxon test on all 24 pairs (benchmarks/confirm_plan.md's primary test) against the same test on the
   8 seed means (safekeel.eval.stats.seed_clustered_test).
2. The coverage of the 95% percentile bootstrap interval of a mean over 6 values (safekeel.eval.stats.bootstrap_ci).

    python benchmarks/pairing_simulation.py
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
from scipy.stats import wilcoxon

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from safekeel.eval.stats import bootstrap_ci  # noqa: E402


def rejection_rates(rho: float, draws: int, rng: np.random.Generator, seeds: int = 8, datasets: int = 3) -> tuple[float, float]:
    pairs = seed_means = 0
    for _ in range(draws):
        table = rng.normal(size=(seeds, 1)) * np.sqrt(rho) + rng.normal(size=(seeds, datasets)) * np.sqrt(1 - rho)
        pairs += wilcoxon(table.ravel(), alternative="less").pvalue < 0.05
        seed_means += wilcoxon(table.mean(axis=1), alternative="less").pvalue < 0.05
    return pairs / draws, seed_means / draws


def bootstrap_coverage(n: int, draws: int, rng: np.random.Generator, resamples: int = 2000) -> float:
    """How often stats.bootstrap_ci (the grid's interval) over n normal values contains the true mean 0."""
    covered = 0
    for draw in range(draws):
        low, high = bootstrap_ci(rng.normal(size=n).tolist(), n_resamples=resamples, seed=draw)
        covered += low <= 0 <= high
    return covered / draws


def main() -> None:
    rng = np.random.default_rng(1)
    print("| seed correlation | rejects, 24 pairs | rejects, 8 seed means |\n| --- | --- | --- |")
    for rho in (0.0, 0.3, 0.5):
        pairs, means = rejection_rates(rho, 4000, rng)
        print(f"| {rho} | {pairs:.3f} | {means:.3f} |")
    print(f"\n95% percentile bootstrap of a mean over 6 normal values covers the true mean in "
          f"{bootstrap_coverage(6, 3000, rng):.3f} of 3,000 draws")


if __name__ == "__main__":
    main()
