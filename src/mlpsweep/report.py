"""Compare the runs of one sweep, reading only the MLflow store.

    python report.py [--sweep NAME_OR_ID] [--experiment NAME] [--tracking-uri URI] [--out DIR] [--baseline AXIS=VALUE]

writes DIR/<sweep name>/: report.md, a self-contained report.html, runs.csv and figures/*.png,
and logs them to the sweep's parent run under `report/`. The arguments are checked against the
store before anything is written, and the report never creates a store.
"""

from __future__ import annotations

import argparse
import base64
import html
import itertools
import json
import math
import os
import re
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlparse

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator
from mlflow.entities import Run
from mlflow.tracking import MlflowClient

from mlpsweep import figures
from mlpsweep.checks import check_tracking_server, check_tracking_uri, uri_scheme
from mlpsweep.config import ConfigError
from mlpsweep.stats import summarize, welch_difference
from mlpsweep.tracking import ERROR_TAG, FAILED_JOB_TAG_PREFIX, OVERRIDES_TAG, ROLE_TAG, latest_attempts, resolve_tracking_uri

AXES = ("activation", "norm", "dropout", "depth")
# The first value of each order is the baseline an axis's effects are measured against.
AXIS_ORDER = {
    "activation": ["sigmoid", "tanh", "relu", "leaky_relu", "elu", "gelu", "silu"],
    "norm": ["none", "batchnorm", "layernorm"],
}
EPOCH_METRICS = ("train_loss", "train_acc", "val_loss", "val_acc", "epoch_time_s")
# params that never define a config: bookkeeping (how a run was computed), and the long forms of the four axes
IGNORED_PARAMS = re.compile(r"^(seed|num_params|train_step|tracking\..*|data\.root|data\.download|(activation|norm|dropout|depth)\..*)$")
# the longest name of a file or folder the report writes (ASCII: well under any file system's limit)
MAX_NAME = 100


class ReportError(ValueError):
    """An argument of the report names nothing that exists; the message names the argument, its
    value and what there is instead."""


# --- reading the store ----------------------------------------------------------------------------


@dataclass
class Sweep:
    parent: Run
    runs: pd.DataFrame  # one row per child run
    histories: dict[str, pd.DataFrame]  # run_id -> per-epoch metrics, indexed by epoch
    health: dict[str, pd.DataFrame]  # run_id -> per-epoch probe health metrics (saturated/dead fractions)
    histograms: dict[str, dict]  # run_id -> the last figure epoch's probe histograms, by layer
    failed_jobs: list[str]  # jobs that failed before their run existed (tags on the parent)
    axes: list[str] = field(default_factory=list)  # the swept axes that define a config (seed excluded)

    @property
    def name(self) -> str:
        return self.parent.info.run_name

    @property
    def finished(self) -> pd.DataFrame:
        return self.runs[self.runs.status == "FINISHED"]

    @property
    def has_seeds(self) -> bool:
        return bool(len(self.finished)) and self.finished.groupby(self.axes or (lambda _: 0)).size().max() > 1


def local_store_path(uri: str) -> Path | None:
    """The file or folder of a local store (sqlite:///path, file:path or a plain path); None for the others."""
    scheme = uri_scheme(uri)
    if scheme == "sqlite":
        return Path(uri.removeprefix("sqlite:///").partition("?")[0])
    if scheme == "file":
        return Path(urlparse(uri).path)
    return Path(uri) if scheme == "" else None


def check_store(uri: str, key: str) -> None:
    """A store MLflow can use is at `uri` (set by `key`): its file or folder exists, or its server
    answers. (MLflow would create a missing SQLite file or folder; the report only reads.)"""
    try:
        check_tracking_uri(uri, key)
        check_tracking_server(uri)
    except ConfigError as err:
        raise ReportError(str(err)) from None
    path = local_store_path(uri)
    if path is not None and not path.exists():
        raise ReportError(f"{key}={uri!r}: must be an existing MLflow store, and {path.absolute()} does not exist")


def find_sweep(client: MlflowClient, experiment_id: str, sweep: str | None) -> Run:
    """The parent run named or identified by `sweep`, or the experiment's latest sweep."""
    parents = client.search_runs(
        [experiment_id], f"tags.`{ROLE_TAG}` = 'sweep'", order_by=["attributes.start_time DESC"], max_results=50000
    )
    matching = [run for run in parents if sweep in (run.info.run_id, run.info.run_name)] if sweep else parents
    if matching:
        return matching[0]
    if not parents:
        raise ReportError(f"experiment {experiment_id} has no sweep yet (python train.py -m ... makes one)")
    latest = ", ".join(run.info.run_name for run in parents[:5])
    raise ReportError(f"--sweep={sweep!r}: must be the name or run id of a sweep of this experiment, e.g. {latest}")


def open_sweep(tracking_uri: str | None, experiment: str, sweep: str | None) -> tuple[MlflowClient, Sweep]:
    """The sweep that the report's arguments name, read from an existing store."""
    uri = resolve_tracking_uri(tracking_uri)
    from_environment = not tracking_uri and os.environ.get("MLFLOW_TRACKING_URI")
    check_store(uri, "$MLFLOW_TRACKING_URI" if from_environment else "--tracking-uri")
    client = MlflowClient(uri)
    found = client.get_experiment_by_name(experiment)
    if found is None:
        names = ", ".join(e.name for e in client.search_experiments())
        raise ReportError(f"--experiment={experiment!r}: must be an experiment of {uri}: {names}")
    return client, load_sweep(client, find_sweep(client, found.experiment_id, sweep))


def _value_key(axis: str):
    """Sort key of an axis's values: the AXIS_ORDER, widths by depth, numbers by size."""
    order = AXIS_ORDER.get(axis)

    def key(value: object) -> tuple:
        if order:
            return (order.index(value) if value in order else len(order), str(value))
        if axis == "depth":
            widths = [int(w) for w in str(value).split("x")]
            return (len(widths), widths)
        try:
            return (0, float(value))
        except ValueError:
            return (1, str(value))

    return key


def ordered_values(runs: pd.DataFrame, axis: str) -> list:
    return sorted(runs[axis].unique(), key=_value_key(axis))


def sort_by_axes(runs: pd.DataFrame, axes: Sequence[str]) -> pd.DataFrame:
    """Rows in the order of their axes' values (e.g. sigmoid before tanh before relu)."""
    keys = [_value_key(a) for a in axes]
    order = sorted(range(len(runs)), key=lambda i: tuple(k(runs[a].iloc[i]) for k, a in zip(keys, axes)))
    return runs.iloc[order]


def swept_axes(runs: pd.DataFrame, params: pd.DataFrame) -> list[str]:
    """The four axes that vary between `runs`, then other params that vary independently of them."""
    axes = [a for a in AXES if runs[a].nunique() > 1]
    extra = []
    for key in params.columns:
        if IGNORED_PARAMS.match(key) or params[key].nunique() <= 1:
            continue
        determined = axes and (params[key].groupby([runs[a] for a in axes]).nunique() <= 1).all()
        if not determined:
            extra.append(key)
    return axes + extra


def load_sweep(client: MlflowClient, parent: Run) -> Sweep:
    """Every config's run (see latest_attempts) under `parent` with its params, final numbers and
    per-epoch histories."""
    children = latest_attempts(
        client.search_runs(
            [parent.info.experiment_id], f"tags.mlflow.parentRunId = '{parent.info.run_id}'", max_results=50000
        )
    )
    rows, params, histories, health, histograms = [], [], {}, {}, {}
    for run in children:
        run_id, metrics = run.info.run_id, run.data.metrics
        history = pd.DataFrame(
            {key: {m.step: m.value for m in client.get_metric_history(run_id, key)} for key in EPOCH_METRICS}
        ).rename_axis("epoch")
        histories[run_id] = history
        health_keys = [k for k in metrics if k.startswith("probe/") and k.endswith("_frac")]
        health[run_id] = pd.DataFrame(
            {key.removeprefix("probe/"): {m.step: m.value for m in client.get_metric_history(run_id, key)} for key in health_keys}
        )
        histograms[run_id] = _last_histograms(client, run_id) if health_keys else {}
        last = history.iloc[-1] if len(history) else pd.Series(dtype=float)
        best_epoch = int(history.val_acc.idxmax()) if history.val_acc.notna().any() else None
        rows.append(
            {
                "run_id": run_id,
                "run_name": run.info.run_name,
                "status": run.info.status,
                "error": run.data.tags.get(ERROR_TAG, ""),
                "overrides": run.data.tags.get(OVERRIDES_TAG, ""),
                **{axis: run.data.params.get(axis, "") for axis in AXES},
                "seed": int(run.data.params.get("seed", 0)),
                "num_params": int(run.data.params.get("num_params", 0)),
                "test_acc": metrics.get("test_acc", math.nan),
                "test_loss": metrics.get("test_loss", math.nan),
                "best_val_acc": history.val_acc.max() if best_epoch else math.nan,
                "best_epoch": best_epoch,
                "epochs": len(history),
                "train_val_gap": last.get("train_acc", math.nan) - last.get("val_acc", math.nan),
                "s_per_epoch": history.epoch_time_s.mean() if len(history) else math.nan,
                "probe_time_frac": metrics.get("probe_time_frac", math.nan),
            }
        )
        params.append(run.data.params)
    runs = pd.DataFrame(rows, columns=None if rows else ["run_id", "run_name", "status", *AXES, "seed", "test_acc"])
    failed_jobs = [
        f"job {key.removeprefix(FAILED_JOB_TAG_PREFIX)}: {value}"
        for key, value in sorted(parent.data.tags.items())
        if key.startswith(FAILED_JOB_TAG_PREFIX)
    ]
    sweep = Sweep(parent, runs, histories, health, histograms, failed_jobs)
    if len(runs):
        params = pd.DataFrame(params).fillna("")
        finished = runs.status == "FINISHED"  # failed runs do not define what is compared
        sweep.axes = swept_axes(runs[finished], params[finished]) if finished.any() else []
        for key in sweep.axes:
            runs[key] = runs[key] if key in runs else params[key]
        runs["config"] = runs.apply(lambda r: config_label(r, sweep.axes), axis=1)
    return sweep


def _last_histograms(client: MlflowClient, run_id: str) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        try:
            path = client.download_artifacts(run_id, "probe/histograms.json", tmp)
        except Exception:
            return {}
        by_epoch = json.loads(Path(path).read_text())
    return by_epoch[max(by_epoch, key=int)] if by_epoch else {}


def config_label(run: pd.Series, axes: Sequence[str]) -> str:
    return " / ".join(str(run[a]) for a in axes) if axes else run["run_name"].rsplit("-s", 1)[0]


def parse_baselines(items: Sequence[str]) -> dict[str, str]:
    """The `--baseline AXIS=VALUE` arguments as {axis: value}."""
    baselines = {}
    for item in items:
        axis, equals, value = item.partition("=")
        if not (axis and equals and value):
            raise ReportError(f"--baseline={item!r}: must be AXIS=VALUE, e.g. norm=none")
        baselines[axis] = value
    return baselines


def check_baselines(sweep: Sweep, baselines: dict[str, str]) -> None:
    """Each baseline names one of the report's axes and a value that the sweep's finished runs have for it."""
    axes = list(dict.fromkeys([*AXES, *sweep.axes]))
    for axis, value in baselines.items():
        argument = f"--baseline={f'{axis}={value}'!r}"
        if axis not in axes:
            raise ReportError(f"{argument}: must name one of the report's axes: {', '.join(axes)}")
        values = [str(v) for v in ordered_values(sweep.finished, axis)]
        if value not in values:
            have = ", ".join(values) or "none (no run finished)"
            raise ReportError(f"{argument}: must be a value this sweep has for {axis}: {have}")


# --- numbers --------------------------------------------------------------------------------------


def leaderboard(sweep: Sweep) -> pd.DataFrame:
    columns = ["run_name", *AXES, "seed", "num_params", "test_acc", "test_loss", "best_val_acc", "best_epoch",
               "train_val_gap", "s_per_epoch"]  # fmt: skip
    return sweep.finished.sort_values("test_acc", ascending=False)[columns].reset_index(drop=True)


def config_summary(sweep: Sweep) -> pd.DataFrame:
    """Per config (runs that differ only by seed): n and mean ± std [95% CI] of the main numbers."""
    rows = []
    for label, group in sweep.finished.groupby("config", sort=False):
        row = {"config": label, "n": len(group)}
        for metric in ("test_acc", "best_val_acc", "train_val_gap"):
            row[metric] = str(summarize(group[metric].tolist()))
        rows.append(row)
    return pd.DataFrame(rows).sort_values("test_acc", ascending=False).reset_index(drop=True)


def pivot(sweep: Sweep, rows: str, columns: str) -> pd.DataFrame:
    """Mean test accuracy (± std over seeds where there are several) for two axes."""
    finished = sweep.finished

    def cell(values: pd.Series) -> str:
        summary = summarize(values.tolist())
        return f"{summary.mean:.4f}" if summary.n < 2 else f"{summary.mean:.4f} ± {summary.std:.4f}"

    table = finished.pivot_table(index=rows, columns=columns, values="test_acc", aggfunc=cell)
    table = table.reindex(index=ordered_values(finished, rows), columns=ordered_values(finished, columns))
    return table.fillna("").rename_axis(index=rows, columns=columns)


def effects(sweep: Sweep, baselines: dict[str, str]) -> list[dict]:
    """For each axis, each value against the baseline value, within each setting of the other axes."""
    found = []
    finished = sweep.finished
    for axis in sweep.axes:
        values = ordered_values(finished, axis)
        baseline = baselines.get(axis, values[0])
        others = [a for a in sweep.axes if a != axis]
        for context in itertools.product(*(ordered_values(finished, a) for a in others)):
            group = finished[(finished[others] == list(context)).all(axis=1)] if others else finished
            base = group[group[axis].astype(str) == str(baseline)].test_acc.tolist()
            for value in values:
                treated = group[group[axis] == value].test_acc.tolist()
                if str(value) == str(baseline) or not base or not treated:
                    continue
                diff = welch_difference(treated, base)
                found.append(
                    {
                        "axis": axis,
                        "value": value,
                        "baseline": baseline,
                        "context": ", ".join(f"{a}={c}" for a, c in zip(others, context)),
                        "n": (len(treated), len(base)),
                        "effect_pp": 100 * diff.estimate,
                        "low_pp": 100 * diff.low,
                        "high_pp": 100 * diff.high,
                        "includes_zero": diff.includes_zero,
                    }
                )
    return found


def effect_sentence(effect: dict) -> str:
    context = f", with {effect['context']}" if effect["context"] else ""
    text = f"{effect['value']} vs {effect['baseline']}{context}: {effect['effect_pp']:+.1f} pp"
    if math.isnan(effect["low_pp"]):
        return text + f" (n = {effect['n'][0]} vs {effect['n'][1]}: no interval without repeated seeds)"
    text += f" [{effect['low_pp']:.1f}, {effect['high_pp']:.1f}]"
    if effect["includes_zero"]:
        return text + " - the interval includes zero: not distinguishable from seed noise"
    return text


# --- figures --------------------------------------------------------------------------------------


def _colors(labels: Sequence[str]) -> dict[str, tuple]:
    cmap = plt.get_cmap("tab10" if len(labels) <= 10 else "tab20")
    return {label: cmap(i % cmap.N) for i, label in enumerate(labels)}


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


def learning_curves_figure(sweep: Sweep) -> Figure:
    finished = sweep.finished
    colors = _colors(list(dict.fromkeys(finished.config)))
    labelled: set[str] = set()
    fig, (acc_ax, loss_ax) = plt.subplots(1, 2, figsize=(13, 5), constrained_layout=True)
    for run in finished.itertuples():
        history = sweep.histories[run.run_id]
        label = None if run.config in labelled else run.config  # one legend entry per config, not per seed
        labelled.add(run.config)
        acc_ax.plot(history.index, history.val_acc, color=colors[run.config], alpha=0.8, label=label)
        loss_ax.plot(history.index, history.val_loss, color=colors[run.config], alpha=0.8)
    acc_ax.set(xlabel="epoch", ylabel="validation accuracy", title="validation accuracy")
    loss_ax.set(xlabel="epoch", ylabel="validation loss", title="validation loss", yscale="log")
    for ax in (acc_ax, loss_ax):
        ax.grid(alpha=0.3)
    acc_ax.legend(fontsize=8)
    return fig


def gap_figure(sweep: Sweep) -> Figure:
    """Final train - validation accuracy per run (positive: the network fits the training set better)."""
    runs = sweep.finished.sort_values("train_val_gap")
    fig, ax = plt.subplots(figsize=(8, max(3, 0.3 * len(runs) + 1)), constrained_layout=True)
    ax.barh(runs.run_name, 100 * runs.train_val_gap, color=["tab:red" if g > 0 else "tab:blue" for g in runs.train_val_gap])
    ax.set(xlabel="final train accuracy - validation accuracy (pp)", title="generalization gap")
    ax.axvline(0, color="black", lw=0.8)
    ax.grid(alpha=0.3, axis="x")
    ax.tick_params(axis="y", labelsize=8)
    return fig


def representatives(sweep: Sweep) -> pd.DataFrame:
    """One run per config (its lowest seed) with probe data, in leaderboard order of configs."""
    runs = sweep.finished[[bool(sweep.histograms.get(r)) for r in sweep.finished.run_id]]
    return sort_by_axes(runs.sort_values("seed").drop_duplicates("config"), sweep.axes)


def histograms_figure(sweep: Sweep) -> Figure | None:
    """Last figure epoch's activation-input and activation-output histograms, one row per config."""
    runs = representatives(sweep)
    if runs.empty:
        return None
    layers = sorted({layer for r in runs.run_id for layer in sweep.histograms[r]})
    fig, axes = plt.subplots(len(runs), 2 * len(layers), figsize=(3.2 * 2 * len(layers), 2.3 * len(runs)), squeeze=False)
    fig.subplots_adjust(left=0.1, right=0.99, bottom=0.05, top=0.93, wspace=0.3, hspace=0.6)
    for row, run in zip(axes, runs.itertuples()):
        for j, layer in enumerate(layers):
            snap = sweep.histograms[run.run_id].get(layer)
            if not snap:
                continue
            pre_stage = "norm" if "norm" in snap["histograms"] else "linear"
            figures.draw_histogram(row[2 * j], *snap["histograms"][pre_stage], label=pre_stage, color=figures.STAGE_COLORS[pre_stage])
            figures.draw_histogram(row[2 * j + 1], *snap["histograms"]["act"], label="act", color=figures.STAGE_COLORS["act"])
            row[2 * j].set_title(f"{layer} {pre_stage} output", fontsize=8)
            row[2 * j + 1].set_title(f"{layer} activation", fontsize=8)
        row[0].set_ylabel(run.config, fontsize=8)
        for ax in row:
            ax.tick_params(labelsize=6)
    fig.suptitle("activation input and output on the probe set, last logged epoch (one seed per config)")
    return fig


def health_figure(sweep: Sweep) -> Figure | None:
    """Saturated / dead fraction of each layer over epochs, one line per config."""
    runs = representatives(sweep)
    series = {(run.config, key): sweep.health[run.run_id][key] for run in runs.itertuples() for key in sweep.health[run.run_id]}
    if not series:
        return None
    keys = sorted({key for _, key in series})
    colors = _colors(list(dict.fromkeys(runs.config)))
    fig, axes = plt.subplots(1, len(keys), figsize=(5 * len(keys), 4), squeeze=False, constrained_layout=True)
    for ax, key in zip(axes[0], keys):
        for (config, k), values in series.items():
            if k == key:
                ax.plot(values.index, values, "o-", ms=3, color=colors[config], label=config)
        ax.set(xlabel="epoch", ylabel="fraction", title=key, ylim=(-0.02, 1.02))
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
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
    return figures.confusion_matrix(counts, f"best run {best.run_name}: test confusion matrix"), best.run_name


# --- the document ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Heading:
    text: str
    level: int = 2

    def markdown(self) -> str:
        return f"{'#' * self.level} {self.text}"

    def html(self) -> str:
        return f"<h{self.level}>{html.escape(self.text)}</h{self.level}>"


@dataclass(frozen=True)
class Text:
    text: str

    def markdown(self) -> str:
        return self.text

    def html(self) -> str:
        return f"<p>{html.escape(self.text)}</p>"


@dataclass(frozen=True)
class Bullets:
    items: tuple[str, ...]

    def markdown(self) -> str:
        return "\n".join(f"- {item}" for item in self.items)

    def html(self) -> str:
        return "<ul>" + "".join(f"<li>{html.escape(item)}</li>" for item in self.items) + "</ul>"


@dataclass(frozen=True)
class Table:
    frame: pd.DataFrame

    def markdown(self) -> str:
        return markdown_table(self.frame)

    def html(self) -> str:
        return self.frame.to_html(index=False, float_format=_fmt, na_rep="", border=0, classes="t")


@dataclass(frozen=True)
class Image:
    path: Path  # the PNG file
    link: str  # its path relative to report.md
    caption: str

    def markdown(self) -> str:
        return f"![{self.caption}]({self.link})\n\n*{self.caption}*"

    def html(self) -> str:
        data = base64.b64encode(self.path.read_bytes()).decode()
        caption = html.escape(self.caption)
        return f'<figure><img src="data:image/png;base64,{data}" alt="{caption}"><figcaption>{caption}</figcaption></figure>'


HTML_STYLE = (
    "body{font-family:system-ui,sans-serif;max-width:1200px;margin:2em auto;padding:0 1em;color:#222}"
    "table.t{border-collapse:collapse;font-size:13px;margin:1em 0}"
    "table.t td,table.t th{border-bottom:1px solid #ddd;padding:3px 8px;text-align:right}"
    "table.t th{background:#f3f3f3}img{max-width:100%}figcaption{color:#555;font-size:13px}"
)


@dataclass
class Document:
    """Blocks rendered both as Markdown (figures linked) and as self-contained HTML (embedded)."""

    out: Path
    blocks: list[Heading | Text | Bullets | Table | Image] = field(default_factory=list)

    def heading(self, text: str, level: int = 2) -> None:
        self.blocks.append(Heading(text, level))

    def text(self, text: str) -> None:
        self.blocks.append(Text(text))

    def bullets(self, items: Sequence[str]) -> None:
        self.blocks.append(Bullets(tuple(items)))

    def table(self, frame: pd.DataFrame, index: bool = False) -> None:
        self.blocks.append(Table(frame.reset_index() if index else frame))

    def figure(self, fig: Figure | None, name: str, caption: str) -> None:
        if fig is None:
            return
        path = self.out / "figures" / f"{safe_name(name, 'figure')}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=90)
        plt.close(fig)
        self.blocks.append(Image(path, path.relative_to(self.out).as_posix(), caption))

    def markdown(self) -> str:
        return "\n\n".join(block.markdown() for block in self.blocks) + "\n"

    def html(self, title: str) -> str:
        body = "\n".join(block.html() for block in self.blocks)
        return (
            f"<!DOCTYPE html>\n<html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
            f"<style>{HTML_STYLE}</style></head>\n<body>\n{body}\n</body></html>\n"
        )


def _fmt(value: float) -> str:
    return f"{value:.4f}" if abs(value) < 100 else f"{value:,.0f}"


def markdown_table(frame: pd.DataFrame) -> str:
    def cell(value: object) -> str:
        if isinstance(value, float):
            return "" if math.isnan(value) else _fmt(value)
        return str(value).replace("|", "\\|")

    header = "| " + " | ".join(str(c) for c in frame.columns) + " |"
    rule = "| " + " | ".join("---" for _ in frame.columns) + " |"
    rows = ["| " + " | ".join(cell(v) for v in row) + " |" for row in frame.itertuples(index=False)]
    return "\n".join([header, rule, *rows])


def build_report(client: MlflowClient, sweep: Sweep, out: Path, baselines: dict[str, str]) -> Document:
    doc = Document(out)
    finished, failed = sweep.finished, sweep.runs[sweep.runs.status != "FINISHED"] if len(sweep.runs) else sweep.runs
    doc.heading(f"Sweep {sweep.name}", level=1)
    overrides = sweep.parent.data.tags.get(OVERRIDES_TAG, "")
    doc.text(
        f"Parent run {sweep.parent.info.run_id}, overrides `{overrides}`: {len(sweep.runs)} runs, "
        f"{len(finished)} finished, {len(failed) + len(sweep.failed_jobs)} failed. "
        f"Swept axes: {', '.join(sweep.axes) or 'none'}"
        + ("; configs repeat over seeds, so numbers are mean ± std over seeds [95% t-interval]." if sweep.has_seeds else ".")
    )
    if finished.empty:
        doc.text("No run of this sweep finished, so there is nothing to compare.")
    else:
        doc.heading("Leaderboard")
        doc.table(leaderboard(sweep))
        if sweep.has_seeds:
            doc.heading("Configs over seeds")
            doc.table(config_summary(sweep))
        if len(sweep.axes) >= 2:
            doc.heading("Test accuracy by pairs of axes")
            for rows, columns in itertools.combinations(sweep.axes, 2):
                doc.text(f"{rows} x {columns}:")
                doc.table(pivot(sweep, rows, columns), index=True)
        if sweep.axes:
            doc.heading("Effects")
            found = effects(sweep, baselines)
            doc.text(
                "Each value against its axis's baseline, within each setting of the other axes: difference of "
                "mean test accuracy in percentage points, with a 95% Welch t-interval over seeds."
            )
            doc.bullets([effect_sentence(e) for e in found] or ["no pair of configs to compare"])
            for axis in sweep.axes:
                doc.figure(marginal_figure(sweep, axis), f"marginal_{axis}", f"test accuracy by {axis}")
        doc.heading("Learning curves")
        doc.figure(learning_curves_figure(sweep), "learning_curves", "validation accuracy and loss of every run")
        doc.heading("Generalization gap")
        doc.figure(gap_figure(sweep), "generalization_gap", "final train - validation accuracy per run")
        doc.heading("Inside the networks")
        doc.figure(histograms_figure(sweep), "activation_histograms", "activation input/output histograms per layer")
        doc.figure(health_figure(sweep), "probe_health", "saturated (sigmoid/tanh) or dead (ReLU-like) fraction per layer")
        if not any(sweep.histograms.values()):
            doc.text("These runs have no probe data (trained with probe.enabled=false).")
        confusion = best_confusion_figure(client, sweep)
        if confusion:
            doc.heading("Confusion matrix of the best run")
            doc.figure(confusion[0], "confusion_best", f"test confusion matrix of {confusion[1]}")
    doc.heading("Failed runs")
    failures = [f"{r.run_name} ({r.status}) [{r.overrides}]: {r.error or 'no error recorded'}" for r in failed.itertuples()]
    doc.bullets(failures + sweep.failed_jobs or ["none"])
    return doc


def safe_name(text: str, fallback: str) -> str:
    """`text` as a name that is never a path: ASCII letters, digits, '.', '_' and '-' (anything
    else becomes '_'), no leading or trailing dots or dashes ('.' and '..' become nothing), at
    most MAX_NAME characters; `fallback` when nothing is left."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text)[:MAX_NAME].strip("._-") or fallback


def write_report(client: MlflowClient, sweep: Sweep, out_root: Path, baselines: dict[str, str]) -> Path:
    """Write the report files to out_root/<sweep name>/ (a safe name, else the run id) and log them
    to the parent run."""
    out = out_root / safe_name(sweep.name or "", sweep.parent.info.run_id)
    if not out.resolve().is_relative_to(out_root.resolve()):  # out_root/<name> is a link that leads elsewhere
        raise ReportError(f"--out={str(out_root)!r}: must be a folder the report stays in, and {out} leads outside it")
    out.mkdir(parents=True, exist_ok=True)
    doc = build_report(client, sweep, out, baselines)
    (out / "report.md").write_text(doc.markdown())
    (out / "report.html").write_text(doc.html(f"Sweep {sweep.name}"))
    sweep.runs.drop(columns=["config"], errors="ignore").to_csv(out / "runs.csv", index=False)
    client.log_artifacts(sweep.parent.info.run_id, str(out), artifact_path="report")
    return out


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Compare the runs of a sweep from the MLflow store.")
    parser.add_argument("--sweep", help="parent run id or name (default: the latest sweep)")
    parser.add_argument("--experiment", default="mlpsweep")
    parser.add_argument("--tracking-uri", help="default: as train.py ($MLFLOW_TRACKING_URI, else ./mlflow.db)")
    parser.add_argument("--out", type=Path, default=Path("multirun_reports"))
    parser.add_argument("--baseline", action="append", default=[], metavar="AXIS=VALUE",
                        help="the value an axis's effects are measured against (default: e.g. norm=none)")  # fmt: skip
    args = parser.parse_args(argv)
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    try:
        baselines = parse_baselines(args.baseline)
        if args.out.exists() and not args.out.is_dir():
            raise ReportError(f"--out={str(args.out)!r}: must be a folder, and it is a file")
        client, sweep = open_sweep(args.tracking_uri, args.experiment, args.sweep)
        check_baselines(sweep, baselines)
        out = write_report(client, sweep, args.out, baselines)
    except ReportError as err:  # one line, nothing written
        parser.exit(2, f"{parser.prog}: error: {err}\n")
    print(f"{out / 'report.html'}  ({len(sweep.runs)} runs)")
