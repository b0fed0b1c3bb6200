"""Collecting a sweep from the MLflow store: its parent run, one row per config's run with its
axes and final numbers, per-epoch histories and the probe's health metrics and histograms."""

from __future__ import annotations

import json
import math
import os
import re
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlparse

import pandas as pd
from mlflow.entities import Run
from mlflow.tracking import MlflowClient

from mlpsweep.checkpoint import NOT_HASHED
from mlpsweep.checks import check_tracking_server, check_tracking_uri, uri_scheme
from mlpsweep.config import ConfigError
from mlpsweep.engine import metric_key
from mlpsweep.report.analysis import AXES, ordered_values
from mlpsweep.tracking import (
    ERROR_TAG,
    FAILED_JOB_TAG_PREFIX,
    OVERRIDES_TAG,
    ROLE_TAG,
    latest_attempts,
    resolve_tracking_uri,
)

# the per-epoch metrics of a run's history, by name (columns; their MLflow keys: metric_key)
EPOCH_METRICS = ("train_loss", "train_acc", "val_loss", "val_acc", "epoch_time_s")
# params that never define a config: bookkeeping (how a run was computed; what config_hash leaves
# out, e.g. `resume`, which cannot change a result), and the long forms of the axes
_BOOKKEEPING = ("seed", "num_params", "train_step", *NOT_HASHED)
IGNORED_PARAMS = re.compile(rf"^(({'|'.join(map(re.escape, _BOOKKEEPING))})(\..*)?|({'|'.join(AXES)})\..*)$")
# what runs logged before an axis existed trained with: PyTorch's default init, no scheduler
LEGACY_AXES = {"init": "default", "scheduler": "none"}
# the probe's per-epoch metrics: saturated/dead fractions and (newer runs) gradient norms, per hidden layer
PROBE_METRIC = re.compile(r"^probe/.+(_frac|/grad_norm)$")


class ReportError(ValueError):
    """An argument of the report names nothing that exists; the message names the argument, its
    value and what there is instead."""


# --- reading the store ----------------------------------------------------------------------------


@dataclass
class Sweep:
    parent: Run
    runs: pd.DataFrame  # one row per child run
    histories: dict[str, pd.DataFrame]  # run_id -> per-epoch metrics, indexed by epoch
    health: dict[str, pd.DataFrame]  # run_id -> per-epoch probe metrics (saturated/dead fractions, gradient norms)
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
    def failed(self) -> pd.DataFrame:
        """The runs that did not finish (FAILED, KILLED, or left RUNNING)."""
        return self.runs[self.runs.status != "FINISHED"]

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


def stored_key(metrics: Mapping[str, float], name: str) -> str:
    """The key a run stored metric `name` (e.g. val_acc) under, given its last values `metrics`:
    its MLflow key (accuracy/val), or `name` itself in a store written before those keys."""
    key = metric_key(name)
    return name if key not in metrics and name in metrics else key


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
            {
                name: {m.step: m.value for m in client.get_metric_history(run_id, stored_key(metrics, name))}
                for name in EPOCH_METRICS
            }
        ).rename_axis("epoch")
        histories[run_id] = history
        health_keys = [k for k in metrics if PROBE_METRIC.match(k)]
        health[run_id] = pd.DataFrame(
            {key.removeprefix("probe/"): {m.step: m.value for m in client.get_metric_history(run_id, key)} for key in health_keys}
        )
        histograms[run_id] = _last_histograms(client, run_id) if any(k.endswith("_frac") for k in health_keys) else {}
        last = history.iloc[-1] if len(history) else pd.Series(dtype=float)
        best_epoch = int(history.val_acc.idxmax()) if history.val_acc.notna().any() else None
        rows.append(
            {
                "run_id": run_id,
                "run_name": run.info.run_name,
                "status": run.info.status,
                "error": run.data.tags.get(ERROR_TAG, ""),
                "overrides": run.data.tags.get(OVERRIDES_TAG, ""),
                **{axis: run.data.params.get(axis, LEGACY_AXES.get(axis, "")) for axis in AXES},
                "seed": int(run.data.params.get("seed", 0)),
                "num_params": int(run.data.params.get("num_params", 0)),
                "test_acc": metrics.get(stored_key(metrics, "test_acc"), math.nan),
                "test_loss": metrics.get(stored_key(metrics, "test_loss"), math.nan),
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
    sweep = Sweep(parent, runs, histories, health, histograms, failed_jobs=[])
    with_a_run = tuple(f"[{overrides}] " for overrides in sweep.failed.get("overrides", []))  # listed as failed runs
    sweep.failed_jobs = [
        f"job {key.removeprefix(FAILED_JOB_TAG_PREFIX)}: {value}"
        for key, value in sorted(parent.data.tags.items())
        if key.startswith(FAILED_JOB_TAG_PREFIX) and not value.startswith(with_a_run)
    ]
    if len(runs):
        params = pd.DataFrame(params).fillna("")
        finished = runs.status == "FINISHED"  # failed runs do not define what is compared
        sweep.axes = swept_axes(runs[finished], params[finished]) if finished.any() else []
        for key in sweep.axes:
            runs[key] = runs[key] if key in runs else params[key]
        runs["config"] = runs.apply(lambda r: config_label(r, sweep.axes), axis=1)
        runs["label"] = runs.apply(lambda r: short_label(r, sweep.axes), axis=1)
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
    """A config by its swept axes, e.g. 'activation=relu, dropout=0.1' (the run name less its seed without axes)."""
    return ", ".join(f"{a}={run[a]}" for a in axes) if axes else run["run_name"].rsplit("-s", 1)[0]


def short_label(run: pd.Series, axes: Sequence[str]) -> str:
    """A config's axis values only, e.g. 'relu / 0.1', for legends titled with the axes' names."""
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

