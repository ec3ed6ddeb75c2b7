"""Proportions with Wilson 95% intervals."""

from __future__ import annotations

from dataclasses import asdict, dataclass


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
    import math

    from scipy.stats import norm

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
    from statsmodels.stats.proportion import proportion_confint

    low, high = proportion_confint(count, n, alpha=alpha, method="wilson")
    return float(low), float(high)


def paired_gate_sample_size(discordance: float, margin: float, alpha: float = 0.05, power: float = 0.8,
                            true_difference: float = 0.0) -> int:
    """Pairs needed so that a one-sided (1 - alpha) upper bound on a paired difference falls within `margin`
    with probability `power` when the true difference is `true_difference`: the normal approximation
    n = ((z_(1-alpha) + z_power) * sd / (margin - true_difference))^2 with sd^2 = discordance - difference^2
    (discordance: the share of pairs whose two verdicts differ, from the judge's error rates and the models)."""
    import math

    from scipy.stats import norm

    if not margin > true_difference:
        raise ValueError("the margin must exceed the true difference")
    variance = max(discordance - true_difference ** 2, 1e-12)
    return math.ceil(((norm.ppf(1 - alpha) + norm.ppf(power)) ** 2) * variance / (margin - true_difference) ** 2)
