"""Seed statistics: means with t-intervals, and Welch intervals for differences of means."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy import stats


@dataclass(frozen=True)
class Summary:
    """n values as mean, sample standard deviation and a two-sided confidence interval."""

    n: int
    mean: float
    std: float  # NaN for n < 2
    low: float  # NaN for n < 2
    high: float

    def __str__(self) -> str:
        if self.n < 2:
            return f"{self.mean:.4f}"
        return f"{self.mean:.4f} ± {self.std:.4f} [{self.low:.4f}, {self.high:.4f}]"


@dataclass(frozen=True)
class Difference:
    """mean(a) - mean(b) with a Welch t-interval."""

    estimate: float
    low: float  # NaN when either side has fewer than 2 values
    high: float

    @property
    def includes_zero(self) -> bool:
        return not (self.low > 0 or self.high < 0)


def summarize(values: Sequence[float], confidence: float = 0.95) -> Summary:
    """Mean ± t(n-1) * s / sqrt(n): the t-interval for the mean of n seeds."""
    x = np.asarray(values, dtype=float)
    n, mean = len(x), float(x.mean())
    if n < 2:
        return Summary(n, mean, math.nan, math.nan, math.nan)
    std = float(x.std(ddof=1))
    half = stats.t.ppf(0.5 + confidence / 2, n - 1) * std / math.sqrt(n)
    return Summary(n, mean, std, mean - half, mean + half)


def welch_difference(a: Sequence[float], b: Sequence[float], confidence: float = 0.95) -> Difference:
    """mean(a) - mean(b) with Welch's t-interval (unequal variances, Welch-Satterthwaite df)."""
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    estimate = float(a.mean() - b.mean())
    if len(a) < 2 or len(b) < 2:
        return Difference(estimate, math.nan, math.nan)
    va, vb = a.var(ddof=1) / len(a), b.var(ddof=1) / len(b)
    se = math.sqrt(va + vb)
    if se == 0:
        return Difference(estimate, estimate, estimate)
    df = (va + vb) ** 2 / (va**2 / (len(a) - 1) + vb**2 / (len(b) - 1))
    half = stats.t.ppf(0.5 + confidence / 2, df) * se
    return Difference(estimate, estimate - half, estimate + half)
