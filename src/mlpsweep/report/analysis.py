"""The statistical analysis of a sweep, as pure functions: a DataFrame of runs in (one row per run, a
column per factor, `seed` and the metric), tables out. Nothing here reads the store or draws.

The sweep is a factorial design: its swept axes are the factors, a config (one level of every factor)
is a cell, and its seeds are the replicates. Seed k gives every config the same split and batch order,
so comparisons pair the seed-k run of one side with the seed-k run of the other where both have it.
Differences are in percentage points (pp) of the metric.
"""

from __future__ import annotations

import itertools
import math
import re
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import pandas as pd

from mlpsweep.engine import METRIC_NAMES, metric_key
from mlpsweep.stats import (
    Interval,
    bootstrap_interval,
    cohens_d,
    contrast,
    detectable_difference,
    equivalence_p,
    holm,
    paired_interval,
    pooled_sd,
    probability_of_improvement,
    samples_needed,
    summarize,
)

AXES = ("activation", "norm", "dropout", "depth", "init", "scheduler")
# The first value of each order is the baseline an axis's effects are measured against.
AXIS_ORDER = {
    "activation": ["sigmoid", "tanh", "relu", "leaky_relu", "elu", "gelu", "silu"],
    "norm": ["none", "batchnorm", "layernorm"],
    "init": ["default", "xavier_uniform", "xavier_normal", "kaiming_uniform", "kaiming_normal", "orthogonal"],
    "scheduler": ["none", "step", "cosine", "onecycle", "plateau"],
}
ALPHA = 0.05  # every test, interval (1 - ALPHA) and power calculation
POWER = 0.8
MARGIN_PP = 0.2  # default equivalence margin
N_RESAMPLES = 2000
RNG_SEED = 0  # bootstrap resamples are drawn from this seed: the same runs give the same report


class SweepLike(Protocol):
    """What the sweep-level tables need of a sweep: its finished runs and the axes that define a config."""

    @property
    def finished(self) -> pd.DataFrame: ...

    axes: list[str]


# --- axes and their values --------------------------------------------------------------------------


def _value_key(axis: str):
    """Sort key of an axis's values: the AXIS_ORDER, widths by depth, numbers by size."""
    order = AXIS_ORDER.get(axis)

    def key(value: object) -> tuple:
        if order:
            return (order.index(value) if value in order else len(order), str(value))
        if axis == "depth":
            widths = [int(w) for w in str(value).split("x") if w.isdigit()]
            return (len(widths), widths)
        try:
            return (0, float(value))
        except (TypeError, ValueError):
            return (1, str(value))

    return key


def ordered_values(runs: pd.DataFrame, axis: str) -> list:
    return sorted(runs[axis].unique(), key=_value_key(axis))


def sort_by_axes(runs: pd.DataFrame, axes: Sequence[str]) -> pd.DataFrame:
    """Rows in the order of their axes' values (e.g. sigmoid before tanh before relu)."""
    keys = [_value_key(a) for a in axes]
    order = sorted(range(len(runs)), key=lambda i: tuple(k(runs[a].iloc[i]) for k, a in zip(keys, axes)))
    return runs.iloc[order]


def config_name(factors: Sequence[str], levels: Sequence[object]) -> str:
    """A cell by its factors, e.g. 'activation=relu, dropout=0.1'."""
    return ", ".join(f"{f}={v}" for f, v in zip(factors, levels))


def varying(runs: pd.DataFrame, factors: Sequence[str]) -> list[str]:
    """The factors that have more than one level in `runs`."""
    return [f for f in factors if runs[f].nunique() > 1]


def metric_column(runs: pd.DataFrame, metric: str) -> str:
    """The column of `runs` holding `metric`, given by its MLflow key or its name (the report's runs
    have accuracy/test as test_acc, a frame of hydra/sweeper=adaptive_seeds the other way round)."""
    if metric in runs.columns:
        return metric
    return {key: name for name, key in METRIC_NAMES.items()}.get(metric, metric_key(metric))


def grid_coverage(runs: pd.DataFrame, factors: Sequence[str]) -> float:
    """The share of the combinations of the factors' levels that have a run: 1 for a full grid, a
    little less for a grid with failed configs, far less for a search (e.g. Optuna's) over continuous values."""
    if not factors:
        return 1.0
    return runs.groupby(list(factors)).ngroups / math.prod(runs[f].nunique() for f in factors)


# --- the sweep's tables -----------------------------------------------------------------------------


def leaderboard(sweep: SweepLike) -> pd.DataFrame:
    finished = sweep.finished
    axes = [a for a in AXES if a in finished and (finished[a].astype(str) != "").any()]
    axes += [a for a in sweep.axes if a not in axes]
    columns = ["run_name", *axes, "seed", "num_params", "test_acc", "test_loss", "best_val_acc", "best_epoch",
               "train_val_gap", "s_per_epoch"]  # fmt: skip
    return finished.sort_values("test_acc", ascending=False)[columns].reset_index(drop=True)


def config_summary(sweep: SweepLike) -> pd.DataFrame:
    """Per config (runs that differ only by seed): n and mean ± std [95% CI] of the main numbers."""
    rows = []
    for label, group in sweep.finished.groupby("config", sort=False):
        row = {"config": label, "n": len(group)}
        for metric in ("test_acc", "best_val_acc", "train_val_gap"):
            row[metric] = str(summarize(group[metric].tolist()))
        rows.append(row)
    return pd.DataFrame(rows).sort_values("test_acc", ascending=False).reset_index(drop=True)


def pivot(sweep: SweepLike, rows: str, columns: str) -> pd.DataFrame:
    """Mean test accuracy (± std over seeds where there are several) for two axes."""
    finished = sweep.finished

    def cell(values: pd.Series) -> str:
        summary = summarize(values.tolist())
        return f"{summary.mean:.4f}" if summary.n < 2 else f"{summary.mean:.4f} ± {summary.std:.4f}"

    table = finished.pivot_table(index=rows, columns=columns, values="test_acc", aggfunc=cell)
    table = table.reindex(index=ordered_values(finished, rows), columns=ordered_values(finished, columns))
    return table.fillna("").rename_axis(index=rows, columns=columns)


def cells(runs: pd.DataFrame, factors: Sequence[str], metric: str = "test_acc") -> pd.DataFrame:
    """Per config (one level of every factor): n, its seeds, and mean, std and 95% t-interval of `metric` over seeds."""
    metric = metric_column(runs, metric)
    data = runs.dropna(subset=[metric])
    if data.empty:
        return pd.DataFrame(columns=[*factors, "config", "n", "seeds", "mean", "std", "ci_low", "ci_high"])
    rows = []
    for key, group in data.groupby(list(factors) or (lambda _: ""), sort=False):
        levels = key if isinstance(key, tuple) else (key,)
        summary = summarize(group[metric].tolist())
        rows.append({**dict(zip(factors, levels)), "config": config_name(factors, levels) or "all runs", "n": summary.n,
                     "seeds": " ".join(str(s) for s in sorted(group.seed)), "mean": summary.mean, "std": summary.std,
                     "ci_low": summary.low, "ci_high": summary.high})  # fmt: skip
    return sort_by_axes(pd.DataFrame(rows), list(factors)).reset_index(drop=True)


def effects(sweep: SweepLike, baselines: dict[str, str]) -> list[dict]:
    """For each axis, each value against the baseline value, within each setting of the other axes
    (difference of mean test accuracy in pp with its 95% Welch interval)."""
    table = comparisons(sweep.finished, sweep.axes, baselines=baselines, n_resamples=0)
    return [
        {"axis": r.factor, "value": r.level, "baseline": r.baseline, "context": r.context, "n": (r.n_a, r.n_b),
         "effect_pp": r.diff_pp, "low_pp": r.welch_low_pp, "high_pp": r.welch_high_pp,
         "includes_zero": not (r.welch_low_pp > 0 or r.welch_high_pp < 0)}
        for r in table[table.kind == "simple"].itertuples()
    ]


def effect_sentence(effect: dict) -> str:
    context = f", with {effect['context']}" if effect["context"] else ""
    text = f"{effect['value']} vs {effect['baseline']}{context}: {effect['effect_pp']:+.1f} pp"
    if math.isnan(effect["low_pp"]):
        return text + f" (n = {effect['n'][0]} vs {effect['n'][1]}: no interval without repeated seeds)"
    text += f" [{effect['low_pp']:.1f}, {effect['high_pp']:.1f}]"
    if effect["includes_zero"]:
        return text + " - the interval includes zero: not distinguishable from seed noise"
    return text


# --- factorial ANOVA --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Anova:
    """An ANOVA table (one row per term, then the residual; empty when there is none) and a sentence
    saying which model and sums of squares it used, or why there is no ANOVA."""

    table: pd.DataFrame
    note: str
    typ: int | None = None


ANOVA_COLUMNS = ["term", "df", "sum_sq", "F", "p", "partial_eta_sq"]


def anova(runs: pd.DataFrame, factors: Sequence[str], metric: str = "test_acc") -> Anova:
    """ANOVA of `metric` (in pp) over the factors and their interactions: OLS with sum-to-zero contrasts
    and statsmodels' anova_lm, type II sums of squares when the design is balanced (every config has the
    same number of seeds), type III when it is not. Interactions of the highest orders are left out when
    the full model leaves no residual or is not estimable (configs missing). F, p and partial eta-squared
    (SS_term / (SS_term + SS_residual)) per term."""
    from statsmodels.formula.api import ols
    from statsmodels.stats.anova import anova_lm

    empty = pd.DataFrame(columns=ANOVA_COLUMNS)
    metric = metric_column(runs, metric)
    data = runs.dropna(subset=[metric])
    used = varying(data, factors)
    single = [f for f in factors if f not in used]
    if not used:
        return Anova(empty, "No ANOVA: no factor has more than one level among the finished runs.")
    counts = data.groupby(used).size()
    if counts.min() < 2:
        smallest = config_name(used, counts.idxmin() if len(used) > 1 else (counts.idxmin(),))
        return Anova(empty, f"No ANOVA: it needs at least 2 seeds of every config, and {smallest} has {counts.min()}.")
    names = {f: f"f{i}" for i, f in enumerate(used)}
    frame = pd.DataFrame({names[f]: data[f].astype(str).to_numpy() for f in used})
    frame["y"] = 100 * data[metric].to_numpy(dtype=float)
    grid = math.prod(data[f].nunique() for f in used)
    complete = len(counts) == grid
    balanced = complete and counts.nunique() == 1
    for order in range(len(used), 0, -1):
        terms = [c for k in range(1, order + 1) for c in itertools.combinations(used, k)]
        formula = "y ~ " + " + ".join(":".join(f"C({names[f]}, Sum)" for f in term) for term in terms)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # a rank-deficient design is detected below and dropped
            model = ols(formula, frame).fit()
        exog = model.model.exog
        if model.df_resid > 0 and np.linalg.matrix_rank(exog) == exog.shape[1]:
            break
    else:
        return Anova(empty, "No ANOVA: even the main-effects model leaves no residual degrees of freedom.")
    typ = 2 if balanced else 3
    raw = anova_lm(model, typ=typ).drop(index="Intercept", errors="ignore")
    by_code = {code: f for f, code in names.items()}
    residual_ss = float(raw.loc["Residual", "sum_sq"])
    rows = []
    for term, row in raw.iterrows():
        label = "residual" if term == "Residual" else " x ".join(by_code[c] for c in re.findall(r"C\((f\d+), Sum\)", term))
        eta = math.nan if term == "Residual" else row.sum_sq / (row.sum_sq + residual_ss)
        rows.append([label, int(row.df), row.sum_sq, row.F, row["PR(>F)"], eta])
    if balanced:
        design = f"balanced design (every config has {counts.iloc[0]} seeds)"
    elif complete:
        design = f"unbalanced design (configs have {counts.min()} to {counts.max()} seeds)"
    else:
        design = f"unbalanced design ({grid - len(counts)} configs have no finished run)"
    note = f"Type {'II' if typ == 2 else 'III'} sums of squares of {metric} (pp), OLS with sum-to-zero contrasts, {design}."
    if order < len(used):
        left_out = "Interactions are" if order == 1 else f"Interactions of more than {order} factors are"
        note += f" {left_out} left out: the full model is not estimable from these runs."
    if single:
        note += f" Not factors here (one level only): {', '.join(single)}."
    return Anova(pd.DataFrame(rows, columns=ANOVA_COLUMNS), note, typ)


# --- comparisons ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Spec:
    kind: str  # simple, main or interaction
    factor: str
    level: str
    baseline: str
    context: str
    a: str
    b: str
    cells: tuple[tuple[tuple, float], ...]  # (cell key, weight): the contrast sum_i w_i mean_i
    poi_pairs: tuple[tuple[tuple, tuple], ...]  # (cell of A, cell of B) pairs whose P(A > B) is averaged


def _specs(levels: dict[str, list], base: dict[str, object], present: set[tuple], factors: list[str]) -> list[_Spec]:
    """Each level of each factor against its baseline, within every setting of the other factors
    (simple) and averaged over them (main); and for each pair of factors, how much the effect of one
    changes with the other (interaction: the difference of two effects, averaged over the rest)."""

    def key(**fixed) -> tuple:
        return tuple(fixed[f] for f in factors)

    specs = []
    for f in factors:
        others = [g for g in factors if g != f]
        contexts = list(itertools.product(*(levels[g] for g in others)))
        for v in levels[f]:
            if v == base[f]:
                continue
            pairs = []
            for context in contexts:
                fixed = dict(zip(others, context))
                a, b = key(**fixed, **{f: v}), key(**fixed, **{f: base[f]})
                if a in present and b in present:
                    pairs.append((a, b))
                    specs.append(_Spec("simple", f, str(v), str(base[f]), config_name(others, context),
                                       config_name(factors, a), config_name(factors, b), ((a, 1.0), (b, -1.0)), ((a, b),)))  # fmt: skip
            if others and len(pairs) > 1:
                k = len(pairs)
                weighted = tuple((a, 1 / k) for a, _ in pairs) + tuple((b, -1 / k) for _, b in pairs)
                specs.append(_Spec("main", f, str(v), str(base[f]), f"mean over {', '.join(others)}",
                                   f"{f}={v}", f"{f}={base[f]}", weighted, tuple(pairs)))  # fmt: skip
    for f, g in itertools.combinations(factors, 2):
        rest = [h for h in factors if h not in (f, g)]
        for v, w in itertools.product(levels[f], levels[g]):
            if v == base[f] or w == base[g]:
                continue
            quads = []
            for context in itertools.product(*(levels[h] for h in rest)):
                fixed = dict(zip(rest, context))
                quad = [key(**fixed, **{f: x, g: y}) for x, y in ((v, w), (base[f], w), (v, base[g]), (base[f], base[g]))]
                if all(q in present for q in quad):
                    quads.append(quad)
            if not quads:
                continue
            k = len(quads)
            weighted = tuple((q[i], sign / k) for q in quads for i, sign in enumerate((1.0, -1.0, -1.0, 1.0)))
            effect = f"{f}={v} vs {base[f]}"
            specs.append(_Spec("interaction", f"{f} x {g}", f"{f}={v}, {g}={w}", f"{f}={base[f]}, {g}={base[g]}",
                               f"mean over {', '.join(rest)}" if rest else "", f"{effect} at {g}={w}",
                               f"{effect} at {g}={base[g]}", weighted, ()))  # fmt: skip
    return specs


COMPARISON_COLUMNS = [
    "kind", "factor", "level", "baseline", "context", "a", "b", "cells_a", "cells_b", "cells", "n_a", "n_b", "n_pairs",
    "diff_pp", "welch_low_pp", "welch_high_pp", "welch_p", "paired_low_pp", "paired_high_pp", "paired_p", "test", "p",
    "ci_low_pp", "ci_high_pp", "ci_width_pp", "boot_low_pp", "boot_high_pp", "boot_method", "cohens_d", "poi",
    "poi_low", "poi_high", "mdd_pp", "seeds_needed", "tost_p", "p_holm", "verdict",
]  # fmt: skip


def comparisons(
    runs: pd.DataFrame,
    factors: Sequence[str],
    metric: str = "test_acc",
    baselines: dict[str, str] | None = None,
    margin_pp: float = MARGIN_PP,
    n_resamples: int = N_RESAMPLES,
    seed: int = RNG_SEED,
) -> pd.DataFrame:
    """Every comparison the report makes, one row each, differences in pp of `metric` (a fraction).

    kind: 'simple' (a level of `factor` against its baseline level, the other factors fixed at `context`),
    'main' (the same averaged over the settings of the other factors that have both) or 'interaction'
    (the effect of one factor's level at a level of a second factor minus that effect at the second
    factor's baseline, averaged over the rest). a and b name the two sides, cells_a / cells_b the configs
    on each ('; '-joined), cells the configs involved as a tuple of {factor: level} dicts (for adding
    seeds to them), n_a / n_b their runs, n_pairs the seeds every involved config has.
    diff_pp: the contrast of config means; welch_*: its unpaired t-interval (Welch-Satterthwaite) and
    p; paired_*: the t-interval and p of the per-seed contrasts (seed k of every config, needs 2 seeds
    in common); test / p / ci_*: the paired ones where there are, else Welch's; ci_width_pp its width.
    boot_*: scipy.stats.bootstrap interval (BCa, else percentile: boot_method; fixed seed); cohens_d:
    diff over the pooled SD of the involved configs; poi: P(a run of A beats a run of B in the same
    setting), ties one half, with its bootstrap interval (not for interactions); mdd_pp: the difference
    this comparison detects with 80% power at the 5% level; seeds_needed: seeds per config to detect
    max(|diff|, margin) so (before any correction for multiple tests; at least one more than now); tost_p: equivalence within +-margin_pp; p_holm: Holm over these rows;
    verdict: a sentence. Factors with one level are ignored; n_resamples=0 skips the bootstraps.
    """
    metric = metric_column(runs, metric)
    data = runs.dropna(subset=[metric]).copy()
    used = varying(data, factors)
    if data.empty:
        return pd.DataFrame(columns=COMPARISON_COLUMNS)
    values: dict[tuple, pd.Series] = {}
    for key, group in data.groupby(used or (lambda _: ""), sort=False):
        key = (key if isinstance(key, tuple) else (key,)) if used else ()
        values[key] = (100 * group.drop_duplicates("seed").set_index("seed")[metric].astype(float)).sort_index()
    levels = {f: ordered_values(data, f) for f in used}
    wanted = baselines or {}
    base = {f: next((v for v in levels[f] if f in wanted and str(v) == str(wanted[f])), levels[f][0]) for f in used}
    sigma, _ = pooled_sd([v.to_numpy() for v in values.values()])
    rows = [_compare(spec, used, values, sigma, margin_pp, n_resamples, seed) for spec in _specs(levels, base, set(values), used)]
    table = pd.DataFrame(rows, columns=COMPARISON_COLUMNS)
    return with_holm(table, margin_pp)


def _compare(spec: _Spec, factors: list[str], values: dict[tuple, pd.Series], sigma: float, margin: float,
             n_resamples: int, seed: int) -> dict:  # fmt: skip
    keys = [k for k, _ in spec.cells]
    weights = [w for _, w in spec.cells]
    samples = [values[k].to_numpy() for k in keys]
    welch = contrast(samples, weights)
    common = sorted(set.intersection(*(set(values[k].index) for k in keys)))
    per_seed = [sum(w * values[k][s] for k, w in spec.cells) for s in common]
    paired = paired_interval(per_seed) if len(common) >= 2 else Interval(welch.estimate, math.nan, math.nan)
    test = paired if not math.isnan(paired.p) else welch
    if n_resamples:
        boot = bootstrap_interval(samples, "contrast", weights, 1 - ALPHA, n_resamples, seed)
    else:
        boot = Interval(welch.estimate, math.nan, math.nan, method="not computed")
    poi = poi_low = poi_high = math.nan
    if spec.poi_pairs:
        poi = float(np.mean([probability_of_improvement(values[a], values[b]) for a, b in spec.poi_pairs]))
        if n_resamples:
            flat = [values[k].to_numpy() for pair in spec.poi_pairs for k in pair]
            poi_boot = bootstrap_interval(flat, "poi", confidence=1 - ALPHA, n_resamples=n_resamples, seed=seed)
            poi_low, poi_high = poi_boot.low, poi_boot.high
    spread, _ = pooled_sd(samples)
    target = max(abs(welch.estimate), margin)
    if test is paired:
        sd_d = float(np.std(per_seed, ddof=1))
        mdd = detectable_difference(sd_d, len(common), paired=True, alpha=ALPHA, power=POWER)
        needed = samples_needed(target, sd_d, paired=True, alpha=ALPHA, power=POWER)
    else:
        # with n seeds per config the contrast's variance is sigma^2 sum(w^2) / n: a two-sample test with
        # 2 / sum(w_i^2 / n_i) runs per side now, and n = m sum(w^2) / 2 seeds for m runs per side
        n_equivalent = 2 / sum(w**2 / len(s) for w, s in zip(weights, samples))
        mdd = detectable_difference(sigma, n_equivalent, paired=False, alpha=ALPHA, power=POWER)
        needed = samples_needed(target, sigma, paired=False, alpha=ALPHA, power=POWER) * sum(w**2 for w in weights) / 2
    now = len(common) if test is paired else min(len(x) for x in samples)  # seeds per config today
    positive = [k for k, w in spec.cells if w > 0]
    negative = [k for k, w in spec.cells if w < 0]
    return {
        "kind": spec.kind, "factor": spec.factor, "level": spec.level, "baseline": spec.baseline, "context": spec.context,
        "a": spec.a, "b": spec.b, "cells_a": "; ".join(config_name(factors, k) for k in positive),
        "cells_b": "; ".join(config_name(factors, k) for k in negative),
        "cells": tuple(dict(zip(factors, k)) for k in dict.fromkeys(keys)),
        "n_a": sum(len(values[k]) for k in positive), "n_b": sum(len(values[k]) for k in negative), "n_pairs": len(common),
        "diff_pp": welch.estimate, "welch_low_pp": welch.low, "welch_high_pp": welch.high, "welch_p": welch.p,
        "paired_low_pp": paired.low, "paired_high_pp": paired.high, "paired_p": paired.p,
        "test": test.method if not math.isnan(test.p) else "none", "p": test.p,
        "ci_low_pp": test.low, "ci_high_pp": test.high, "ci_width_pp": test.high - test.low,
        "boot_low_pp": boot.low, "boot_high_pp": boot.high, "boot_method": boot.method,
        "cohens_d": cohens_d(welch.estimate, spread), "poi": poi, "poi_low": poi_low, "poi_high": poi_high,
        "mdd_pp": mdd, "seeds_needed": max(math.ceil(needed), now + 1) if np.isfinite(needed) else math.nan,
        "tost_p": equivalence_p(test, margin), "p_holm": math.nan, "verdict": "",
    }  # fmt: skip


def with_holm(table: pd.DataFrame, margin_pp: float, p_holm: Sequence[float] | None = None) -> pd.DataFrame:
    """`table` with Holm-adjusted p-values (its own p column as the family, unless p_holm is given) and
    the verdicts that follow from them."""
    table = table.copy()
    table["p_holm"] = holm(table.p.to_numpy(dtype=float)) if p_holm is None else list(p_holm)
    table["verdict"] = [verdict(row, margin_pp) for row in table.itertuples()]
    return table


def verdict(row, margin_pp: float) -> str:
    """What one comparison resolves: a difference (Holm-adjusted p < 5%), equivalence within the margin
    (TOST p < 5%), or neither, with the seeds per config it would take."""
    if not np.isfinite(row.p):
        return "n too small: no interval (every config involved needs 2 or more seeds)"
    if row.p_holm < ALPHA:
        return f"{'higher' if row.diff_pp > 0 else 'lower'} by {abs(row.diff_pp):.2f} pp (Holm-adjusted p {_p(row.p_holm)})"
    if row.tost_p < ALPHA:
        return f"equivalent within ±{margin_pp:g} pp (TOST p {_p(row.tost_p)})"
    needed = f"about {row.seeds_needed:.0f} seeds per config" if np.isfinite(row.seeds_needed) else "more seeds"
    return f"not resolved: would need {needed}"


def _p(p: float) -> str:
    return "< 0.0001" if p < 1e-4 else f"= {p:.2g}"


def holm_across(anova_table: pd.DataFrame, table: pd.DataFrame, margin_pp: float) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Holm's correction over every test of the report: the ANOVA's terms and the comparisons together
    (adds p_holm to both, and the comparisons' verdicts follow from it)."""
    terms = anova_table[anova_table.term != "residual"]
    adjusted = holm(np.concatenate([terms.p.to_numpy(dtype=float), table.p.to_numpy(dtype=float)]))
    anova_table = anova_table.copy()
    anova_table["p_holm"] = math.nan
    anova_table.loc[terms.index, "p_holm"] = adjusted[: len(terms)]
    return anova_table, with_holm(table, margin_pp, adjusted[len(terms):])


@dataclass(frozen=True)
class Resolution:
    """What a sweep can resolve: the pooled seed-to-seed SD (pp), its df, the typical seeds per config,
    and the smallest difference between two configs detected at 80% power, 5% level (pp)."""

    sd_pp: float
    df: int
    seeds: int
    mdd_pp: float


def resolution(runs: pd.DataFrame, factors: Sequence[str], metric: str = "test_acc") -> Resolution:
    metric = metric_column(runs, metric)
    data = runs.dropna(subset=[metric])
    groups = [100 * g[metric].to_numpy(dtype=float) for _, g in data.groupby(varying(data, factors) or (lambda _: ""))]
    sd, df = pooled_sd(groups)
    seeds = int(np.median([len(g) for g in groups])) if groups else 0
    return Resolution(sd, df, seeds, detectable_difference(sd, seeds, paired=False, alpha=ALPHA, power=POWER))


# --- non-grid sweeps --------------------------------------------------------------------------------


def importances(runs: pd.DataFrame, factors: Sequence[str], metric: str = "test_acc") -> tuple[pd.DataFrame, str]:
    """Optuna's importance of each factor for `metric` (fANOVA, else mean decrease in impurity), from an
    in-memory study built of the runs (numbers as uniform distributions over their range, the rest as
    categories); an empty table and a sentence saying why where there is none."""
    metric = metric_column(runs, metric)
    data = runs.dropna(subset=[metric])
    used = varying(data, factors)
    empty = pd.DataFrame(columns=["factor", "importance"])
    if len(used) < 2 or len(data) < 4:
        return empty, "No parameter importances: they need 2 or more varied parameters and 4 or more finished runs."
    try:
        import optuna
        from optuna.distributions import CategoricalDistribution
        from optuna.importance import (
            FanovaImportanceEvaluator,
            MeanDecreaseImpurityImportanceEvaluator,
            get_param_importances,
        )
    except ImportError:
        return empty, "No parameter importances: optuna is not installed."
    float_distribution = getattr(optuna.distributions, "FloatDistribution", None) or optuna.distributions.UniformDistribution
    columns = {}
    for f in used:
        numbers = pd.to_numeric(data[f], errors="coerce")
        if numbers.notna().all():
            columns[f] = (numbers.astype(float).tolist(), float_distribution(float(numbers.min()), float(numbers.max())))
        else:
            labels = data[f].astype(str).tolist()
            columns[f] = (labels, CategoricalDistribution(sorted(set(labels))))
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(direction="maximize")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Optuna 2 calls create_trial and add_trial experimental
        for i, value in enumerate(data[metric].astype(float)):
            params = {f: columns[f][0][i] for f in used}
            study.add_trial(optuna.trial.create_trial(params=params, distributions={f: columns[f][1] for f in used}, value=value))
    # fANOVA first; Optuna 2's fANOVA fails on newer scikit-learn trees, then the forest's impurity decrease
    for name, evaluator in (("fANOVA", FanovaImportanceEvaluator), ("mean decrease in impurity", MeanDecreaseImpurityImportanceEvaluator)):
        try:
            found = get_param_importances(study, evaluator=evaluator(seed=RNG_SEED))
            break
        except Exception as err:  # noqa: BLE001 - the evaluator's own limits, named in the sentence
            failure = f"{name} failed ({type(err).__name__})"
    else:
        return empty, f"No parameter importances: Optuna's evaluators failed: {failure}."
    table = pd.DataFrame({"factor": list(found), "importance": list(found.values())})
    fallback = "" if name == "fANOVA" else f"; Optuna's fANOVA {failure.removeprefix('fANOVA ')} here"
    return table, (f"Parameter importance ({name} of a random forest fitted by Optuna, seed {RNG_SEED}{fallback}) "
                   f"of each parameter for {metric} over {len(data)} runs; importances sum to 1.")  # fmt: skip
