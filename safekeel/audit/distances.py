"""How far one set of vectors sits from another: Frechet distance, MMD with a permutation test, an LDA direction.

The audit compares a user dataset's embeddings with a harmful and a safe reference set. Each statistic here
works on plain arrays (rows are examples) and is checked against closed forms in tests/test_audit_distances.py.

- `frechet_distance`: the Frechet (2-Wasserstein) distance between Gaussians fitted to the two sets,
  ||mu_a - mu_b||^2 + Tr(S_a + S_b - 2 (S_a S_b)^(1/2)) (as in FID); with fewer examples than dimensions the
  covariances are singular, so `eps` is added to their diagonals when the square root is not finite.
- `frechet_size_null`: the Frechet distance a set of n rows drawn from the reference itself shows against the
  rest of it (mean over seeded draws): the distance's finite-sample floor at that n. With fewer rows than
  dimensions the estimate is biased upwards (two 100-row draws of one distribution are far from 0 in MiniLM's 384
  dimensions), so sets of different sizes compare only after subtracting it (`frechet_excess` in the report).
- `mmd`: the unbiased squared maximum mean discrepancy with a Gaussian kernel k(x, y) = exp(-||x - y||^2 /
  (2 h^2)), bandwidth h by the median heuristic (the median of the positive pairwise distances of the pooled
  sample) unless given, and a permutation p-value (the share of label permutations with MMD^2 at least the observed one,
  counting the observed labelling: (1 + hits) / (1 + permutations)).
- `lda_side`: Fisher's linear discriminant between a harmful and a safe set (shrunk pooled covariance), and where
  a third set falls on it: the share on the harmful side of the midpoint, and the mean projection scaled so the
  safe mean is 0 and the harmful mean is 1.
"""

from __future__ import annotations

import numpy as np
from scipy import linalg

BANDWIDTH_RULE = "median pairwise Euclidean distance of the pooled sample (median heuristic)"
REFERENCE_BANDWIDTH_RULE = ("median positive pairwise Euclidean distance of the harmful and safe references pooled (median "
                            "heuristic; the same kernel for every user set)")


def _moments(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    x = np.asarray(x, dtype=np.float64)
    if x.ndim != 2 or len(x) < 2:
        raise ValueError(f"need a 2-D array of at least 2 rows, got shape {x.shape}")
    return x.mean(axis=0), np.cov(x, rowvar=False)


def frechet_from_moments(mu_a: np.ndarray, cov_a: np.ndarray, mu_b: np.ndarray, cov_b: np.ndarray,
                         eps: float = 1e-6) -> float:
    """The Frechet distance between N(mu_a, cov_a) and N(mu_b, cov_b)."""
    cov_a, cov_b = np.atleast_2d(cov_a), np.atleast_2d(cov_b)
    root = linalg.sqrtm(cov_a @ cov_b)
    if not np.isfinite(root).all():
        offset = np.eye(len(cov_a)) * eps
        root = linalg.sqrtm((cov_a + offset) @ (cov_b + offset))
    root = np.asarray(root).real
    value = float(np.sum((np.asarray(mu_a) - np.asarray(mu_b)) ** 2) + np.trace(cov_a) + np.trace(cov_b) - 2 * np.trace(root))
    return max(value, 0.0)


def frechet_distance(a: np.ndarray, b: np.ndarray, eps: float = 1e-6) -> float:
    """Frechet distance between Gaussians fitted to the rows of a and of b."""
    return frechet_from_moments(*_moments(a), *_moments(b), eps=eps)


def frechet_size_null(reference: np.ndarray, n: int, draws: int = 10, seed: int = 0, eps: float = 1e-6) -> float:
    """Mean Frechet distance between n rows drawn (seeded, without replacement) from `reference` and its other rows;
    n is capped so at least 2 rows stay on each side."""
    reference = np.asarray(reference, dtype=np.float64)
    n = max(2, min(int(n), len(reference) - 2))
    rng = np.random.default_rng(seed)
    values = []
    for _ in range(draws):
        chosen = np.zeros(len(reference), dtype=bool)
        chosen[rng.choice(len(reference), n, replace=False)] = True
        values.append(frechet_distance(reference[chosen], reference[~chosen], eps=eps))
    return float(np.mean(values))


def _squared_distances(x: np.ndarray) -> np.ndarray:
    norms = (x * x).sum(axis=1)
    return np.maximum(norms[:, None] + norms[None, :] - 2 * x @ x.T, 0.0)


def median_bandwidth(x: np.ndarray) -> float:
    distances = np.sqrt(_squared_distances(np.asarray(x, dtype=np.float64)))
    upper = distances[np.triu_indices(len(distances), k=1)]
    positive = upper[upper > 0]
    return float(np.median(positive)) if len(positive) else 1.0


def _mmd2_unbiased(kernel: np.ndarray, first: np.ndarray) -> float:
    """Unbiased MMD^2 from the pooled kernel matrix and a boolean mask of the first sample's rows."""
    second = ~first
    m, n = int(first.sum()), int(second.sum())
    kxx = kernel[np.ix_(first, first)]
    kyy = kernel[np.ix_(second, second)]
    kxy = kernel[np.ix_(first, second)]
    return float((kxx.sum() - np.trace(kxx)) / (m * (m - 1)) + (kyy.sum() - np.trace(kyy)) / (n * (n - 1)) - 2 * kxy.mean())


def mmd(a: np.ndarray, b: np.ndarray, bandwidth: float | None = None, n_permutations: int = 1000,
        seed: int = 0) -> dict:
    """{"mmd2", "p_value", "bandwidth", "n_permutations"}: unbiased MMD^2 (Gaussian kernel) and its permutation
    p-value (seeded)."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if len(a) < 2 or len(b) < 2:
        raise ValueError("MMD needs at least 2 examples in each set")
    pooled = np.vstack([a, b])
    h = float(bandwidth) if bandwidth else median_bandwidth(pooled)
    kernel = np.exp(-_squared_distances(pooled) / (2 * h * h))
    first = np.zeros(len(pooled), dtype=bool)
    first[: len(a)] = True
    observed = _mmd2_unbiased(kernel, first)
    rng = np.random.default_rng(seed)
    hits = sum(_mmd2_unbiased(kernel, rng.permutation(first)) >= observed for _ in range(n_permutations))
    return {"mmd2": observed, "p_value": (1 + hits) / (1 + n_permutations), "bandwidth": h,
            "n_permutations": n_permutations}


def _lda_direction(harmful: np.ndarray, safe: np.ndarray, shrinkage: float):
    """(direction, projection of the safe mean, of the harmful mean) of Fisher's discriminant."""
    mu_h, cov_h = _moments(harmful)
    mu_s, cov_s = _moments(safe)
    pooled = (cov_h + cov_s) / 2
    pooled = (1 - shrinkage) * pooled + shrinkage * np.eye(len(pooled)) * np.trace(pooled) / len(pooled)
    direction = linalg.solve(pooled, mu_h - mu_s, assume_a="pos")
    return direction, float(mu_s @ direction), float(mu_h @ direction)


def lda_projections(x: np.ndarray, harmful: np.ndarray, safe: np.ndarray, shrinkage: float = 0.1) -> np.ndarray:
    """Each row of x on Fisher's discriminant between harmful and safe, scaled: 0 = the safe mean, 1 = the harmful mean."""
    direction, at_safe, at_harmful = _lda_direction(harmful, safe, shrinkage)
    return (np.asarray(x, dtype=np.float64) @ direction - at_safe) / (at_harmful - at_safe)


def lda_side(x: np.ndarray, harmful: np.ndarray, safe: np.ndarray, shrinkage: float = 0.1) -> dict:
    """Where the rows of x fall on Fisher's discriminant between harmful and safe: {"harmful_side_share",
    "mean_projection" (0 = the safe mean, 1 = the harmful mean), "reference_accuracy"} (the direction's accuracy
    on the two reference sets themselves: how separable they are)."""
    direction, at_safe, at_harmful = _lda_direction(harmful, safe, shrinkage)
    scale = at_harmful - at_safe

    def scaled(rows: np.ndarray) -> np.ndarray:
        return (np.asarray(rows, dtype=np.float64) @ direction - at_safe) / scale

    projection = scaled(x)
    accuracy = (np.sum(scaled(harmful) > 0.5) + np.sum(scaled(safe) <= 0.5)) / (len(harmful) + len(safe))
    return {"harmful_side_share": float(np.mean(projection > 0.5)), "mean_projection": float(projection.mean()),
            "reference_accuracy": float(accuracy), "shrinkage": shrinkage}


def distance_report(user: np.ndarray, harmful: np.ndarray, safe: np.ndarray, n_permutations: int = 1000,
                    seed: int = 0) -> dict:
    """Every distance of the user set to the harmful and to the safe reference, and the LDA side. MMD's bandwidth is
    the median heuristic over the two references together (REFERENCE_BANDWIDTH_RULE): one kernel for both references
    and for every user set, so MMD^2 values compare across datasets. Frechet comes with its size floor at the user
    set's n (frechet_size_null) and the excess over it."""
    out: dict = {"bandwidth_rule": REFERENCE_BANDWIDTH_RULE}
    bandwidth = median_bandwidth(np.vstack([np.asarray(harmful, dtype=np.float64), np.asarray(safe, dtype=np.float64)]))
    for name, reference in (("harmful", harmful), ("safe", safe)):
        tested = mmd(user, reference, bandwidth=bandwidth, n_permutations=n_permutations, seed=seed)
        frechet, floor = frechet_distance(user, reference), frechet_size_null(reference, len(user), seed=seed)
        out[name] = {"frechet": round(frechet, 4), "frechet_size_null": round(floor, 4),
                     "frechet_excess": round(frechet - floor, 4), "mmd2": round(tested["mmd2"], 5),
                     "mmd_p_value": round(tested["p_value"], 4), "mmd_bandwidth": round(tested["bandwidth"], 4)}
    out["lda"] = {k: round(v, 4) for k, v in lda_side(user, harmful, safe).items()}
    return out
