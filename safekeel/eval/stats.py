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
    from statsmodels.stats.proportion import proportion_confint

    low, high = proportion_confint(count, n, alpha=alpha, method="wilson")
    return (round(float(low), 4), round(float(high), 4))
