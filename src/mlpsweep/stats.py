"""Seed statistics of plain arrays: means with t-intervals, Welch and paired intervals of differences,
bootstrap intervals, the probability of improvement, equivalence tests, power and Holm's correction."""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy import stats
from statsmodels.stats.power import TTestIndPower, TTestPower
from statsmodels.tools.sm_exceptions import ConvergenceWarning  # imported first: it sets "always" filters


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
    interval = contrast([a, b], [1.0, -1.0], confidence)
    return Difference(interval.estimate, interval.low, interval.high)


# --- the analysis of one comparison (see mlpsweep.report.analysis for how the report uses them) -----


@dataclass(frozen=True)
class Interval:
    """A two-sided interval of an estimate, how it was computed, and the test of zero that goes with it."""

    estimate: float
    low: float  # NaN when the data cannot give one (n too small)
    high: float
    p: float = math.nan  # two-sided p-value of estimate = 0 (NaN where there is no test)
    df: float = math.nan
    se: float = math.nan
    method: str = ""


def contrast(samples: Sequence[Sequence[float]], weights: Sequence[float], confidence: float = 0.95) -> Interval:
    """sum_i w_i mean(sample_i) with the unpaired t-interval: se^2 = sum w_i^2 s_i^2 / n_i and the
    Welch-Satterthwaite df. Two samples with weights (1, -1) give Welch's interval and test."""
    xs = [np.asarray(s, dtype=float) for s in samples]
    estimate = float(sum(w * x.mean() for w, x in zip(weights, xs)))
    if any(len(x) < 2 for x in xs):
        return Interval(estimate, math.nan, math.nan, method="welch")
    parts = [w**2 * x.var(ddof=1) / len(x) for w, x in zip(weights, xs)]
    se = math.sqrt(sum(parts))
    if se == 0:
        return Interval(estimate, estimate, estimate, 0.0 if estimate else 1.0, math.inf, 0.0, "welch")
    df = sum(parts) ** 2 / sum(p**2 / (len(x) - 1) for p, x in zip(parts, xs) if p > 0)
    half = stats.t.ppf(0.5 + confidence / 2, df) * se
    p = 2 * stats.t.sf(abs(estimate) / se, df)
    return Interval(estimate, float(estimate - half), float(estimate + half), float(p), float(df), se, "welch")


def paired_interval(differences: Sequence[float], confidence: float = 0.95) -> Interval:
    """Mean of paired differences with the one-sample t-interval and t-test (df = pairs - 1)."""
    d = np.asarray(differences, dtype=float)
    if len(d) < 2:
        return Interval(float(d.mean()) if len(d) else math.nan, math.nan, math.nan, method="paired")
    mean, se = float(d.mean()), float(d.std(ddof=1) / math.sqrt(len(d)))
    if se == 0:
        return Interval(mean, mean, mean, 0.0 if mean else 1.0, len(d) - 1, 0.0, "paired")
    half = stats.t.ppf(0.5 + confidence / 2, len(d) - 1) * se
    p = 2 * stats.t.sf(abs(mean) / se, len(d) - 1)
    return Interval(mean, float(mean - half), float(mean + half), float(p), len(d) - 1, se, "paired")


def probability_of_improvement(a: Sequence[float], b: Sequence[float]) -> float:
    """P(a random value of a > a random value of b), ties counting one half: the Mann-Whitney U of a
    over len(a) * len(b)."""
    return float(_poi(np.asarray(a, dtype=float), np.asarray(b, dtype=float), axis=-1))


def _poi(a: np.ndarray, b: np.ndarray, axis: int = -1) -> np.ndarray:
    a, b = np.moveaxis(a, axis, -1), np.moveaxis(b, axis, -1)
    diff = a[..., :, None] - b[..., None, :]
    return ((diff > 0) + 0.5 * (diff == 0)).mean(axis=(-2, -1))


def bootstrap_interval(
    samples: Sequence[Sequence[float]],
    statistic: str,
    weights: Sequence[float] = (1.0, -1.0),
    confidence: float = 0.95,
    n_resamples: int = 2000,
    seed: int = 0,
) -> Interval:
    """Bootstrap interval of a statistic of independent samples, each resampled on its own (scipy.stats.bootstrap):
    'contrast' is sum_i w_i mean(sample_i); 'poi' is the mean probability of improvement of the samples at
    even positions over the next one (pairs (0, 1), (2, 3), ...). BCa where it gives an interval, else the
    percentile interval (method says which); NaN when a sample has fewer than 2 values or all are equal.
    The fixed seed makes the interval reproducible."""
    xs = [np.asarray(s, dtype=float) for s in samples]
    if statistic == "contrast":
        estimate = float(sum(w * x.mean() for w, x in zip(weights, xs)))

        def fn(*resampled: np.ndarray, axis: int = -1) -> np.ndarray:
            return sum(w * r.mean(axis=axis) for w, r in zip(weights, resampled))
    else:
        estimate = float(np.mean([_poi(xs[i], xs[i + 1]) for i in range(0, len(xs), 2)]))

        def fn(*resampled: np.ndarray, axis: int = -1) -> np.ndarray:
            return np.mean([_poi(resampled[i], resampled[i + 1], axis) for i in range(0, len(resampled), 2)], axis=0)

    if any(len(x) < 2 for x in xs) or np.ptp(np.concatenate(xs)) == 0:
        return Interval(estimate, math.nan, math.nan, method="none")
    for method in ("BCa", "percentile"):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            result = stats.bootstrap(tuple(xs), fn, n_resamples=n_resamples, confidence_level=confidence,
                                     method=method, vectorized=True, rng=np.random.default_rng(seed))  # fmt: skip
        low, high = result.confidence_interval
        if np.isfinite(low) and np.isfinite(high):
            return Interval(estimate, float(low), float(high), method=method)
    return Interval(estimate, math.nan, math.nan, method="none")


def cohens_d(difference: float, pooled_sd: float) -> float:
    """A difference in units of the pooled within-config standard deviation."""
    return difference / pooled_sd if pooled_sd > 0 else math.nan


def pooled_sd(samples: Sequence[Sequence[float]]) -> tuple[float, int]:
    """The pooled within-sample standard deviation and its degrees of freedom (sum of n_i - 1)."""
    xs = [np.asarray(s, dtype=float) for s in samples if len(s) >= 2]
    df = sum(len(x) - 1 for x in xs)
    if df == 0:
        return math.nan, 0
    return math.sqrt(sum(((x - x.mean()) ** 2).sum() for x in xs) / df), df


def equivalence_p(interval: Interval, margin: float) -> float:
    """Two one-sided tests (TOST) of |true difference| < margin from a t-interval's estimate, se and df:
    the larger of the two one-sided p-values (equivalent at level a when it is below a, i.e. when the
    (1 - 2a) interval lies inside +-margin)."""
    if not (interval.se >= 0 and interval.df > 0):
        return math.nan
    if interval.se == 0:
        return 0.0 if abs(interval.estimate) < margin else 1.0
    lower = stats.t.sf((interval.estimate + margin) / interval.se, interval.df)
    upper = stats.t.cdf((interval.estimate - margin) / interval.se, interval.df)
    return float(max(lower, upper))


def detectable_difference(sd: float, n: float, paired: bool, alpha: float = 0.05, power: float = 0.8) -> float:
    """The smallest true difference a two-sided t-test at `alpha` detects with `power`: with n per side
    (TTestIndPower, sd the pooled SD) or n pairs (TTestPower, sd the SD of the paired differences)."""
    if not (sd > 0 and n >= 2):
        return math.nan
    solver = TTestPower() if paired else TTestIndPower()
    nobs = {"nobs": n} if paired else {"nobs1": n, "ratio": 1.0}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)  # the root finder's; NaN is handled below
        effect = solver.solve_power(effect_size=None, alpha=alpha, power=power, **nobs)
    if not np.isfinite(effect):  # beyond the solver's bracket (e.g. 2 pairs): the central-t approximation
        df = n - 1 if paired else 2 * n - 2
        effect = (stats.t.ppf(1 - alpha / 2, df) + stats.t.ppf(power, df)) * math.sqrt((1 if paired else 2) / n)
    return float(effect) * sd


def samples_needed(difference: float, sd: float, paired: bool, alpha: float = 0.05, power: float = 0.8) -> float:
    """n per side (or pairs) at which a two-sided t-test at `alpha` detects `difference` with `power`."""
    if not (sd > 0 and difference != 0):
        return math.nan
    effect = abs(difference) / sd
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)  # the root finder's; NaN is handled below
        if paired:
            n = TTestPower().solve_power(effect_size=effect, nobs=None, alpha=alpha, power=power)
        else:
            n = TTestIndPower().solve_power(effect_size=effect, nobs1=None, alpha=alpha, power=power, ratio=1.0)
    if np.isfinite(n):
        return float(n)
    # far beyond the solver's bracket (tiny effects): the normal approximation, which the t-test approaches
    z = stats.norm.ppf(1 - alpha / 2) + stats.norm.ppf(power)
    return (1 if paired else 2) * (z / effect) ** 2


def holm(p_values: Sequence[float]) -> np.ndarray:
    """Holm's step-down adjusted p-values (family-wise error rate); NaN entries stay NaN and are not counted."""
    p = np.asarray(p_values, dtype=float)
    adjusted = np.full_like(p, math.nan)
    valid = np.flatnonzero(~np.isnan(p))
    order = valid[np.argsort(p[valid], kind="stable")]
    m, running = len(order), 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (m - rank) * p[i]))
        adjusted[i] = running
    return adjusted
