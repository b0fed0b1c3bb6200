"""Matplotlib figures of one run, from plain data (numbers, lists, dicts, numpy arrays): learning
curves, confusion matrix, the probe's 2x3-style grid, gradient norms. A figure worker process
(rendering.Figures) imports this module and matplotlib, not torch or MLflow: three seconds less
per worker start.

A sweep draws the same figures for every run, so each drawing keeps its figure for the next one of
the same layout: the data are cleared, the axes and their ticks stay (building them is about a
third of drawing a small figure). A returned figure is therefore valid until the next drawing of
its kind and layout in this process: save it before drawing another. Its x labels, and the titles
of axes that show no offset or multiplier ("1e6") above them, sit at fixed distances from their
axes (`_fixed_x_labels`, `_fixed_title`), where matplotlib would measure the tick labels of every
axes at each draw to place them (a sixth of a probe grid's drawing)."""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only, never a window

import numpy as np  # noqa: E402
from matplotlib.axes import Axes  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from matplotlib.patches import StepPatch  # noqa: E402
from matplotlib.ticker import EngFormatter, MaxNLocator  # noqa: E402
from matplotlib.transforms import ScaledTranslation  # noqa: E402

STAGE_COLORS = {"linear": "tab:blue", "norm": "tab:orange", "act": "tab:green"}

_kept: dict[tuple[Any, ...], tuple[Figure, np.ndarray]] = {}  # (drawing, layout) -> its figure and axes


def _cleared(
    drawing: str, rows: int, cols: int, figsize: tuple[float, float], **adjust: float
) -> tuple[Figure, np.ndarray]:
    """The figure of `drawing` with a rows x cols grid of axes (a fixed layout: no layout engine to
    run), kept from its last use with its data, legends and texts removed; its axes as a 2-D array."""
    key = (drawing, rows, cols, figsize, tuple(sorted(adjust.items())))
    if key not in _kept:
        fig = Figure(figsize=figsize)  # not pyplot's: nothing to close, nothing kept by pyplot
        axes = fig.subplots(rows, cols, squeeze=False)
        fig.subplots_adjust(**adjust)
        _fixed_x_labels(fig)
        _kept[key] = fig, axes
    fig, axes = _kept[key]
    for ax in axes.flat:
        for artist in [*ax.lines, *ax.patches, *ax.collections, *ax.images, *ax.texts]:
            artist.remove()
        if (legend := ax.get_legend()) is not None:
            legend.remove()
        ax.relim()  # the data limits of no data: the next plot's own limits
        ax.set_autoscale_on(True)
        ax.set_prop_cycle(None)  # the next plot's colours from the first again
    return fig, axes


def _fixed_x_labels(fig: Figure) -> None:
    """Every x label where matplotlib puts it below one row of horizontal tick labels, without
    measuring them at each draw: the x axes here are linear, their labels plain numbers."""
    drop = ScaledTranslation(0, -_xlabel_drop(), fig.dpi_scale_trans)
    for ax in fig.axes:
        ax.xaxis.set_label_coords(0.5, 0, transform=ax.transAxes + drop)


def _fixed_title(ax: Axes, title: str, **kwargs: Any) -> None:
    """`title` on the axes' top edge, where matplotlib would measure the y axis at each draw to lift
    it over an offset or multiplier: for axes that show none (counts in k and M, log scales, a
    fixed set of ticks)."""
    ax.set_title(title, y=1.0, **kwargs)


@functools.cache
def _xlabel_drop() -> float:
    """How far below its axes matplotlib puts the top of an x label, in inches: measured once per
    process (as each kept figure is made once), under the rc settings then in force (tick size
    and pad, tick label size, label pad)."""
    fig = Figure()
    ax = fig.add_subplot()
    ax.set_xlabel("x")
    fig.draw_without_rendering()
    return (ax.bbox.y0 - ax.xaxis.label.get_window_extent().y1) / fig.dpi


def draw_histogram(ax: Axes, edges: Sequence[float], counts: Sequence[int], label: str, color: str) -> None:
    """A histogram from precomputed bin edges and counts, as a step outline over a light fill: what
    `ax.stairs` draws, with the data limits given as the histogram's corners (matplotlib's bound of
    the steps' path, segment by segment, is a tenth of a probe grid's drawing)."""
    fill = StepPatch(counts, edges, baseline=0, fill=True, linewidth=0, facecolor=color, alpha=0.35, label=label)
    outline = StepPatch(counts, edges, baseline=0, fill=False, edgecolor=color)
    for patch in (fill, outline):
        ax.add_artist(patch)
        patch.sticky_edges.y.append(0)  # no margin below the baseline, as ax.stairs
    ax.update_datalim([(edges[0], 0), (edges[-1], max(counts, default=0))])
    ax.autoscale_view()


def learning_curves(history: Sequence[Mapping[str, float]], title: str) -> Figure:
    """Loss and accuracy per epoch; `history`: one mapping per epoch (engine.EpochMetrics as a dict)."""
    epochs = [m["epoch"] for m in history]
    fig, [[loss_ax, acc_ax]] = _cleared(
        "learning_curves", 1, 2, (10, 4), left=0.07, right=0.98, bottom=0.13, top=0.88, wspace=0.22
    )
    loss_ax.plot(epochs, [m["train_loss"] for m in history], "o-", label="train")
    loss_ax.plot(epochs, [m["val_loss"] for m in history], "o-", label="validation")
    acc_ax.plot(epochs, [m["train_acc"] for m in history], "o-", label="train")
    acc_ax.plot(epochs, [m["val_acc"] for m in history], "o-", label="validation")
    for ax, name in ((loss_ax, "cross-entropy loss"), (acc_ax, "accuracy")):
        ax.set(xlabel="epoch", ylabel=name)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(title)
    return fig


def confusion_matrix(counts: np.ndarray, title: str) -> Figure:
    """Rows: true class, columns: predicted class; cells annotated with their counts."""
    fig, [[ax]] = _cleared("confusion_matrix", 1, 1, (6.5, 5.5), left=0.1, right=0.97, bottom=0.1, top=0.92)
    image = ax.imshow(np.log1p(counts), cmap="Blues")
    dark = image.norm(np.log1p(counts)) > 0.6  # white counts on the darkest cells
    for (true, pred), count in np.ndenumerate(counts):
        color = "white" if dark[true, pred] else "black"
        ax.text(pred, true, str(count), ha="center", va="center", fontsize=7, color=color)
    ax.set(xlabel="predicted", ylabel="true", xticks=range(counts.shape[1]), yticks=range(counts.shape[0]))
    _fixed_title(ax, title)
    return fig


def probe_grid(epoch: int, layers: Mapping[str, Mapping[str, Any]], title: str) -> Figure:
    """Per hidden layer: activation-input histogram, activation-output histogram, and pre vs
    post of one probe image (the lecture's grid: one row per layer, three columns). `layers`:
    a snapshot's layers at `epoch`, each a probe.LayerSnapshot as a dict."""
    layers = list(layers.items())
    height = 3 * len(layers)  # inches; margins in inches: room for the suptitle, titles, x labels at any depth
    fig, axes = _cleared(
        "probe_grid", len(layers), 3, (12, height),
        left=0.06, right=0.98, bottom=0.48 / height, top=1 - 0.72 / height, wspace=0.25, hspace=0.45,
    )  # fmt: skip
    for row, (name, layer) in zip(axes, layers):
        for stage in ("linear", "norm"):
            if stage in layer["histograms"]:
                draw_histogram(row[0], *layer["histograms"][stage], label=f"{stage} output", color=STAGE_COLORS[stage])
        stats = layer["stats"]
        grad = f" (|dL/dW| {stats['grad_norm']:.2g})" if "grad_norm" in stats else ""
        _fixed_title(row[0], f"{name}: pre-activation{grad}", fontsize=9)
        row[0].set(ylabel="count")
        for ax in row[:2]:
            ax.yaxis.set_major_formatter(EngFormatter(sep=""))  # 500, 5k, 1.2M: no "1e6" above the axis
        row[0].legend(fontsize=8)
        draw_histogram(row[1], *layer["histograms"]["act"], label="activation output", color=STAGE_COLORS["act"])
        health = {k: v for k, v in stats.items() if k.endswith("_frac")}
        _fixed_title(row[1], f"{name}: activation " + " ".join(f"({k} {v:.2f})" for k, v in health.items()), fontsize=9)
        # the points as a line's markers (one marker stamped at each point): they look as a scatter
        # of size 4 does, whose collection took a tenth of the grid's drawing
        row[2].plot(layer["sample_pre"], layer["sample_post"], "o", ms=2, alpha=0.6, color="tab:purple")
        # placed by matplotlib: activations that barely move show an offset ("1e-5+5e-1") above the axis
        row[2].set_title(f"{name}: pre vs post, one image", fontsize=9)
        row[2].set(xlabel="activation input", ylabel="activation output")
    fig.suptitle(f"{title}, epoch {epoch}")
    return fig


def gradient_norms(norms: dict[int, dict[str, float]], title: str) -> Figure:
    """The probe's weight-gradient norm of every hidden layer: over the epochs (one line per layer)
    and across the layers (input to output) at the first and the last epoch. A log scale, so that
    gradients vanishing towards the input read as a slope."""
    epochs = sorted(norms)
    layers = list(norms[epochs[0]])
    fig, [[time_ax, depth_ax]] = _cleared(
        "gradient_norms", 1, 2, (11, 4), left=0.07, right=0.98, bottom=0.13, top=0.85, wspace=0.25
    )
    colors = matplotlib.colormaps["viridis"](np.linspace(0, 0.9, len(layers)))
    for layer, color in zip(layers, colors):
        time_ax.plot(epochs, [norms[e].get(layer, np.nan) for e in epochs], "o-", color=color, label=layer, ms=3)
    time_ax.set(xlabel="epoch", ylabel="||dL/dW||", yscale="log")
    _fixed_title(time_ax, "weight-gradient norm per layer")
    time_ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    time_ax.legend(fontsize=8)
    positions = range(1, len(layers) + 1)
    for epoch, style in ((epochs[0], "o--"), (epochs[-1], "o-")):
        depth_ax.plot(positions, [norms[epoch].get(layer, np.nan) for layer in layers], style, label=f"epoch {epoch}")
    depth_ax.set(xlabel="hidden layer (1 = next to the input)", ylabel="||dL/dW||", yscale="log", xticks=list(positions))
    _fixed_title(depth_ax, "from the input to the head")
    depth_ax.legend(fontsize=8)
    for ax in (time_ax, depth_ax):
        ax.grid(alpha=0.3, which="both")
    fig.suptitle(title)
    return fig
