"""The report's figures: factor effects and interactions with 95% intervals over seeds, learning
curves as a mean and band per config, the generalization gap, and the inside of the networks (probe
histograms, saturated/dead fractions per factor level, gradient norms per layer). Per-run figures are
mlpsweep.figures (the one drawing them during training)."""

from __future__ import annotations

import math
import re
import tempfile
import textwrap
from collections.abc import Sequence

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator
from mlflow.tracking import MlflowClient

from mlpsweep import figures as run_figures
from mlpsweep.report.analysis import metric_column, ordered_values, sort_by_axes
from mlpsweep.report.collect import Sweep
from mlpsweep.stats import summarize

MAX_COLUMNS = 3  # panels per row of a grid


def _colors(labels: Sequence[str]) -> dict[str, tuple]:
    cmap = plt.get_cmap("tab10" if len(labels) <= 10 else "tab20")
    return {label: cmap(i % cmap.N) for i, label in enumerate(labels)}


def _grid(panels: int, width: float = 4.2, height: float = 3.2) -> tuple[Figure, np.ndarray]:
    """A figure of `panels` axes, at most MAX_COLUMNS per row (the unused ones hidden), as a flat array."""
    columns = min(MAX_COLUMNS, panels)
    rows = math.ceil(panels / columns)
    fig, axes = plt.subplots(rows, columns, figsize=(width * columns, height * rows), squeeze=False, constrained_layout=True)
    for ax in axes.flat[panels:]:
        ax.set_visible(False)
    return fig, axes.flat[:panels]


def _mean_and_interval(values: Sequence[float]) -> tuple[float, float]:
    """Mean and half width of the 95% t-interval (0 for a single value)."""
    summary = summarize(values)
    return summary.mean, (summary.high - summary.mean) if summary.n > 1 else 0.0


def _legend_outside(fig: Figure, title: str) -> None:
    """One legend of every panel's lines, right of the figure (long config names stay on one line)."""
    entries: dict[str, object] = {}
    for ax in fig.axes:
        for handle, label in zip(*ax.get_legend_handles_labels()):
            entries.setdefault(label, handle)
    if entries:
        fig.legend(entries.values(), entries.keys(), title=title, loc="outside right upper", fontsize=8, title_fontsize=8)


# --- factors ----------------------------------------------------------------------------------------


def interaction_figure(runs: pd.DataFrame, first: str, second: str, metric: str = "test_acc") -> Figure:
    """Mean `metric` per level of `first` (x), one line per level of `second`, with 95% t-intervals over
    the runs of each pair of levels (the other factors pooled). Parallel lines: no interaction."""
    metric = metric_column(runs, metric)
    fig, ax = plt.subplots(figsize=(6.5, 4.2), constrained_layout=True)
    xs = ordered_values(runs, first)
    for j, level in enumerate(ordered_values(runs, second)):
        points = [_mean_and_interval(runs[(runs[first] == x) & (runs[second] == level)][metric].dropna().tolist() or [math.nan])
                  for x in xs]  # fmt: skip
        offset = 0.04 * (j - 0.5)  # keeps overlapping error bars apart
        ax.errorbar(np.arange(len(xs)) + offset, [m for m, _ in points], yerr=[h for _, h in points], marker="o",
                    capsize=4, label=str(level))  # fmt: skip
    ax.set_xticks(range(len(xs)), [str(x) for x in xs])
    ax.set(xlabel=first, ylabel=metric.replace("_", " "), title=f"{first} x {second}: mean with 95% t-interval")
    ax.grid(alpha=0.3)
    ax.legend(title=second, fontsize=8)
    return fig


def main_effects_figure(runs: pd.DataFrame, factors: Sequence[str], metric: str = "test_acc") -> Figure | None:
    """Mean `metric` per level of each factor (the other factors pooled) with its 95% t-interval, one panel per factor."""
    if not factors:
        return None
    metric = metric_column(runs, metric)
    fig, axes = _grid(len(factors), width=3.8, height=3.2)
    for ax, factor in zip(axes, factors):
        levels = ordered_values(runs, factor)
        points = [_mean_and_interval(runs[runs[factor] == v][metric].dropna().tolist() or [math.nan]) for v in levels]
        ax.errorbar(range(len(levels)), [m for m, _ in points], yerr=[h for _, h in points], marker="o", capsize=4)
        ax.set_xticks(range(len(levels)), [str(v) for v in levels], rotation=30 if len(levels) > 3 else 0)
        ax.set(xlabel=factor, ylabel=metric.replace("_", " "))
        ax.grid(alpha=0.3)
    fig.suptitle("main effects: mean with 95% t-interval over the runs of each level")
    return fig


def marginal_figure(sweep: Sweep, axis: str) -> Figure:
    """Test accuracy per value of one axis: box, every run as a dot, mean (diamond), best (star)."""
    finished = sweep.finished
    values = ordered_values(finished, axis)
    data = [finished[finished[axis] == v].test_acc.to_numpy() for v in values]
    fig, ax = plt.subplots(figsize=(max(4, 1.4 * len(values) + 2), 4), constrained_layout=True)
    ax.boxplot(data, tick_labels=[str(v) for v in values], widths=0.5)
    rng = np.random.default_rng(0)
    for i, accs in enumerate(data, start=1):
        ax.scatter(i + rng.uniform(-0.12, 0.12, len(accs)), accs, s=14, alpha=0.6, color="tab:blue")
        ax.scatter([i], [accs.mean()], marker="D", color="tab:orange", zorder=3, label="mean" if i == 1 else None)
        ax.scatter([i], [accs.max()], marker="*", s=120, color="tab:red", zorder=3, label="best" if i == 1 else None)
    ax.set(xlabel=axis, ylabel="test accuracy", title=f"test accuracy by {axis}")
    ax.grid(alpha=0.3)
    ax.legend()
    return fig


def importance_figure(table: pd.DataFrame) -> Figure | None:
    if table.empty:
        return None
    table = table.sort_values("importance")
    fig, ax = plt.subplots(figsize=(6, 1 + 0.4 * len(table)), constrained_layout=True)
    ax.barh(table.factor, table.importance, color="tab:blue")
    ax.set(xlabel="fANOVA importance", title="parameter importances")
    ax.grid(alpha=0.3, axis="x")
    return fig


# --- over epochs ------------------------------------------------------------------------------------


def _band(ax: plt.Axes, series: list[pd.Series], color: tuple, label: str) -> None:
    """Mean line over the series (aligned on their index) and, where there are 2 or more, the 95% t-band."""
    table = pd.concat(series, axis=1)
    summaries = [summarize(row.dropna().tolist() or [math.nan]) for _, row in table.iterrows()]
    ax.plot(table.index, [s.mean for s in summaries], color=color, label=label)
    if len(series) > 1:
        ax.fill_between(table.index, [s.low for s in summaries], [s.high for s in summaries], color=color, alpha=0.2, lw=0)


def learning_curves_figure(sweep: Sweep) -> Figure:
    """Validation accuracy and loss per config: mean over seeds with a 95% t-band."""
    finished = sort_by_axes(sweep.finished, sweep.axes)
    labels = list(dict.fromkeys(finished.label))
    colors = _colors(labels)
    fig, (acc_ax, loss_ax) = plt.subplots(1, 2, figsize=(13, 4.8), constrained_layout=True)
    for label in labels:
        histories = [sweep.histories[r] for r in finished[finished.label == label].run_id if len(sweep.histories[r])]
        if histories:
            _band(acc_ax, [h.val_acc for h in histories], colors[label], label)
            _band(loss_ax, [h.val_loss for h in histories], colors[label], label)
    acc_ax.set(xlabel="epoch", ylabel="validation accuracy", title="validation accuracy")
    loss_ax.set(xlabel="epoch", ylabel="validation loss", title="validation loss", yscale="log")
    for ax in (acc_ax, loss_ax):
        ax.grid(alpha=0.3)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    _legend_outside(fig, " / ".join(sweep.axes) or "config")
    return fig


def gap_figure(sweep: Sweep) -> Figure:
    """Final train - validation accuracy per run (positive: the network fits the training set better)."""
    runs = sweep.finished.sort_values("train_val_gap")
    longest = max((len(n) for n in runs.run_name), default=10)
    fig, ax = plt.subplots(figsize=(6 + 0.07 * longest, max(3, 0.3 * len(runs) + 1)), constrained_layout=True)
    ax.barh(runs.run_name, 100 * runs.train_val_gap, color=["tab:red" if g > 0 else "tab:blue" for g in runs.train_val_gap])
    ax.set(xlabel="final train accuracy - validation accuracy (pp)", title="generalization gap")
    ax.axvline(0, color="black", lw=0.8)
    ax.grid(alpha=0.3, axis="x")
    ax.tick_params(axis="y", labelsize=8)
    return fig


# --- inside the networks ----------------------------------------------------------------------------


def representatives(sweep: Sweep) -> pd.DataFrame:
    """One run per config (its lowest seed) with probe data, in the order of the axes' values."""
    runs = sweep.finished[[bool(sweep.histograms.get(r)) for r in sweep.finished.run_id]]
    return sort_by_axes(runs.sort_values("seed").drop_duplicates("config"), sweep.axes)


def histograms_figure(sweep: Sweep) -> Figure | None:
    """Last figure epoch's activation-input and activation-output histograms, one row per config."""
    runs = representatives(sweep)
    if runs.empty:
        return None
    layers = sorted({layer for r in runs.run_id for layer in sweep.histograms[r]})
    fig, axes = plt.subplots(len(runs), 2 * len(layers), figsize=(3.4 * 2 * len(layers), 2.5 * len(runs) + 0.6),
                             squeeze=False, constrained_layout=True)  # fmt: skip
    for row, run in zip(axes, runs.itertuples()):
        for j, layer in enumerate(layers):
            snap = sweep.histograms[run.run_id].get(layer)
            if not snap:
                continue
            pre_stage = "norm" if "norm" in snap["histograms"] else "linear"
            run_figures.draw_histogram(row[2 * j], *snap["histograms"][pre_stage], label=pre_stage,
                                       color=run_figures.STAGE_COLORS[pre_stage])  # fmt: skip
            run_figures.draw_histogram(row[2 * j + 1], *snap["histograms"]["act"], label="act",
                                       color=run_figures.STAGE_COLORS["act"])  # fmt: skip
            row[2 * j].set_title(f"{layer} {pre_stage} output", fontsize=8)
            row[2 * j + 1].set_title(f"{layer} activation", fontsize=8)
        row[0].set_ylabel(run.label, fontsize=8)
        for ax in row:
            ax.tick_params(labelsize=7)
            ax.xaxis.set_major_locator(MaxNLocator(nbins=4))  # e.g. tanh's [-1, 1] with few, unclipped labels
            ax.yaxis.set_major_locator(MaxNLocator(nbins=3))
    # on lines that fit the figure's width (one layer's figure is under 7 inches wide)
    title = (f"activation input and output on the probe set, last logged epoch (one seed per config: "
             f"{' / '.join(sweep.axes) or 'config'})")  # fmt: skip
    fig.suptitle(textwrap.fill(title, width=int(9 * fig.get_figwidth())))
    return fig


def _probe_keys(sweep: Sweep, pattern: str) -> list[str]:
    return sorted({k for frame in sweep.health.values() for k in frame if re.search(pattern, k)})


def _health_layers(sweep: Sweep) -> list[str]:
    """The hidden layers with a saturated (sigmoid/tanh) or dead (ReLU-like) fraction, in order."""
    layers = {k.split("/")[0] for k in _probe_keys(sweep, r"/(saturated|dead)_frac$")}
    return sorted(layers, key=lambda name: (len(name), name))


def _health(sweep: Sweep, run_id: str, layer: str) -> pd.Series | None:
    """A run's saturated or dead fraction of `layer` by epoch (the one its activation has)."""
    frame = sweep.health.get(run_id, pd.DataFrame())
    key = next((f"{layer}/{kind}_frac" for kind in ("saturated", "dead") if f"{layer}/{kind}_frac" in frame), None)
    return frame[key].dropna() if key and frame[key].notna().any() else None


HEALTH_TITLE = "{}: saturated or dead units"


def health_figure(sweep: Sweep) -> Figure | None:
    """Saturated / dead fraction of each hidden layer over epochs, one panel per layer (at most three
    per row), one line per config: the mean over seeds with a 95% t-band."""
    layers = _health_layers(sweep)
    if not layers:
        return None
    finished = sort_by_axes(sweep.finished, sweep.axes)
    labels = list(dict.fromkeys(finished.label))
    colors = _colors(labels)
    fig, axes = _grid(len(layers), width=4.6)
    for ax, layer in zip(axes, layers):
        for label in labels:
            series = [h for r in finished[finished.label == label].run_id if (h := _health(sweep, r, layer)) is not None]
            if series:
                _band(ax, series, colors[label], label)
        ax.set(xlabel="epoch", ylabel="fraction", ylim=(-0.02, 1.02), title=HEALTH_TITLE.format(layer))
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
    _legend_outside(fig, " / ".join(sweep.axes) or "config")
    return fig


def health_by_level_figure(sweep: Sweep, factor: str) -> Figure | None:
    """Each hidden layer's saturated / dead fraction at the last epoch per level of `factor`: mean over
    its runs (the other factors pooled) with the 95% t-interval."""
    layers = _health_layers(sweep)
    if not layers:
        return None
    finished = sweep.finished
    levels = ordered_values(finished, factor)
    fig, axes = _grid(len(layers), width=4.2, height=3.0)
    for ax, layer in zip(axes, layers):
        points = []
        for level in levels:
            last = [h.iloc[-1] for r in finished[finished[factor] == level].run_id if (h := _health(sweep, r, layer)) is not None]
            points.append(_mean_and_interval(last or [math.nan]))
        ax.errorbar(range(len(levels)), [m for m, _ in points], yerr=[h for _, h in points], marker="o", ls="", capsize=4)
        ax.set_xticks(range(len(levels)), [str(v) for v in levels], rotation=30 if len(levels) > 3 else 0)
        ax.set(xlabel=factor, ylabel="fraction at the last epoch", ylim=(-0.02, 1.02), title=HEALTH_TITLE.format(layer))
        ax.grid(alpha=0.3)
    fig.suptitle(f"saturated / dead fractions by {factor}: mean with 95% t-interval")
    return fig


def grad_norm_figure(sweep: Sweep) -> Figure | None:
    """The probe's gradient norm per hidden layer at the last epoch, against the layer's index: one line
    per config, mean over seeds with a 95% t-band (vanishing gradients fall to the left). None without
    probe/hiddenN/grad_norm metrics."""
    keys = sorted(_probe_keys(sweep, r"^hidden\d+/grad_norm$"), key=lambda k: int(re.search(r"\d+", k).group()))
    if not keys:
        return None
    finished = sort_by_axes(sweep.finished, sweep.axes)
    labels = list(dict.fromkeys(finished.label))
    colors = _colors(labels)
    fig, ax = plt.subplots(figsize=(7.5, 4.5), constrained_layout=True)
    layer = [int(re.search(r"\d+", k).group()) for k in keys]
    for label in labels:
        series = []
        for run_id in finished[finished.label == label].run_id:
            frame = sweep.health.get(run_id, pd.DataFrame())
            last = {n: frame[k].dropna().iloc[-1] for n, k in zip(layer, keys) if k in frame and frame[k].notna().any()}
            if last:
                series.append(pd.Series(last))
        if series:
            _band(ax, series, colors[label], label)
    ax.set(xlabel="hidden layer", ylabel="gradient norm (last epoch)", yscale="log", title="gradient norm per layer")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(alpha=0.3)
    _legend_outside(fig, " / ".join(sweep.axes) or "config")
    return fig


def best_confusion_figure(client: MlflowClient, sweep: Sweep) -> tuple[Figure, str] | None:
    finished = sweep.finished.dropna(subset=["test_acc"])
    if finished.empty:
        return None
    best = finished.loc[finished.test_acc.idxmax()]
    with tempfile.TemporaryDirectory() as tmp:
        try:
            path = client.download_artifacts(best.run_id, "confusion_matrix.csv", tmp)
        except Exception:
            return None
        counts = pd.read_csv(path, index_col=0).to_numpy()
    return run_figures.confusion_matrix(counts, f"best run {best.run_name}: test confusion matrix"), best.run_name
