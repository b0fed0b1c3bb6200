"""MLflow tracking: the store, the run of each job, and what a run logs.

In a multirun every job's run is a child of the sweep's parent run, which
`mlpsweep.sweep.MlflowSweepCallback` creates in the launching process before any job starts
and hands to the jobs through the environment. Each job opens its own run with `job_run`.
"""

from __future__ import annotations

import copy
import fcntl
import hashlib
import json
import logging
import math
import os
import re
import socket
import time
import traceback
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, nullcontext, suppress
from dataclasses import asdict
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlsplit

import mlflow
import numpy as np
import requests
import sqlalchemy
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from mlflow.data.dataset_source_registry import resolve_dataset_source
from mlflow.data.meta_dataset import MetaDataset
from mlflow.entities import Experiment, Metric, Run, RunStatus
from mlflow.tracking import MlflowClient
from mlflow.types import Schema, TensorSpec
from omegaconf import DictConfig, OmegaConf
from torch import nn

from mlpsweep.config import ConfigError, launch_dir, problem
from mlpsweep.data import DataSplits, raw_folder
from mlpsweep.engine import EpochMetrics, metric_key
from mlpsweep.interrupt import Interrupted, SweepStop
from mlpsweep.probe import ActivationProbe, Snapshot
from mlpsweep.rendering import DPI, FigureRequest, Figures

log = logging.getLogger(__name__)

PARENT_RUN_ENV = "MLPSWEEP_PARENT_RUN_ID"
ROLE_TAG = "mlpsweep.role"
OVERRIDES_TAG = "mlpsweep.overrides"
ERROR_TAG = "mlpsweep.error"
CONFIG_HASH_TAG = "mlpsweep.config_hash"
FAILED_JOB_TAG_PREFIX = "mlpsweep.failed_job."
# what the MLflow UI (3.x) reads to open an experiment in its "Model training" mode (the runs table,
# no GenAI traces overview and assistant); "genai_development" is the other mode
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
MODEL_TRAINING = "custom_model_development"
# the statuses of a run that stopped before it finished and may be continued (resume=true)
UNFINISHED = ("RUNNING", "KILLED")


class TrackingOutage(SweepStop):
    """The tracking server stopped answering: the sweep stops instead of failing job after job."""


def configure_store_access(cfg: DictConfig) -> None:
    """Bound how long a job waits on a store that does not answer (`cfg` is the `tracking` node):
    MLflow's HTTP retries and request timeout (an explicitly set environment variable wins) and
    SQLite's busy timeout, which MLflow fixes at 20 s per session."""
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", str(cfg.http_retries))
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "1")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", str(cfg.http_timeout_s))
    _sqlite_busy_timeout_ms[0] = int(1000 * cfg.sqlite_busy_timeout_s)
    engine = sqlalchemy.engine.Engine
    if not sqlalchemy.event.contains(engine, "before_cursor_execute", _session_busy_timeout):
        sqlalchemy.event.listen(engine, "connect", _connection_busy_timeout)
        sqlalchemy.event.listen(engine, "before_cursor_execute", _session_busy_timeout, retval=True)


_sqlite_busy_timeout_ms = [20_000]


def _connection_busy_timeout(dbapi_connection, connection_record) -> None:
    """SQLAlchemy hook: every new SQLite connection waits out a lock for the configured time
    (the sqlite3 module's own default is 5 s)."""
    if type(dbapi_connection).__module__.startswith("sqlite3"):
        dbapi_connection.execute(f"PRAGMA busy_timeout = {_sqlite_busy_timeout_ms[0]}")


def _session_busy_timeout(conn, cursor, statement: str, parameters, context, executemany):
    """SQLAlchemy hook: the `PRAGMA busy_timeout = 20000` MLflow runs in each session becomes the
    configured wait."""
    if statement.startswith("PRAGMA busy_timeout"):
        statement = f"PRAGMA busy_timeout = {_sqlite_busy_timeout_ms[0]};"
    return statement, parameters


# the default ports of the database servers MLflow's SQLAlchemy store connects to
DATABASE_PORTS = {"postgresql": 5432, "mysql": 3306, "mssql": 1433}
# the password of a URI (scheme://user:password@host): never printed, never logged to the store
# (scheme://user: up to the last @ of the URI; Hydra writes \: for :), or a password=... query parameter
_PASSWORD = re.compile(r"(?P<head>\b[A-Za-z][A-Za-z0-9+.-]*\\?://[^:/@\s]*:)[^\s]*@|(?P<query>\bpassword=)[^&\s]*")


def redacted(text: str) -> str:
    """`text` with the password of every URI in it as *** (a tracking URI in a log line, a param,
    the overrides)."""
    return _PASSWORD.sub(lambda m: f"{m['head']}***@" if m["head"] else f"{m['query']}***", text)


def redact_log_records() -> None:
    """From now on every log record of this process with the passwords of its URIs as *** (Hydra's
    own lines name a job's overrides, a tracking.uri among them)."""
    make = logging.getLogRecordFactory()
    if getattr(make, "redacts", False):
        return

    def redacting(*args: Any, **kwargs: Any) -> logging.LogRecord:
        record = make(*args, **kwargs)
        with suppress(Exception):  # a record whose arguments do not fit its message: logging reports it
            if "@" in (message := record.getMessage()):
                record.msg, record.args = redacted(message), ()
        return record

    redacting.redacts = True  # type: ignore[attr-defined]
    logging.setLogRecordFactory(redacting)


def unanswered(tracking_uri: str) -> str | None:
    """Why the tracking server does not answer now: an http(s) server its health check, a database
    server a connection to its port, within 5 s (the error's type, e.g. ConnectionError; None when
    it answers, or when the store is a file, such as SQLite's). MLflow's own retries would wait
    minutes."""
    if tracking_uri.startswith(("http://", "https://")):
        try:
            requests.get(f"{tracking_uri.rstrip('/')}/health", timeout=5).raise_for_status()
        except requests.RequestException as err:
            return type(err).__name__
        return None
    parts = urlsplit(tracking_uri)
    default_port = DATABASE_PORTS.get(parts.scheme.split("+")[0])
    try:
        address = (parts.hostname, parts.port or default_port)
    except ValueError:  # a port that is no number: MLflow says so itself
        return None
    query = {key for key, _ in parse_qsl(parts.query)}
    if default_port is None or not parts.hostname or query & {"host", "unix_socket", "unix_sock"}:
        return None  # a file, or a database on a local socket
    if parts.scheme.startswith("mssql") and parts.port is None:
        return None  # an ODBC data source's name, not a host
    try:
        socket.create_connection(address, timeout=5).close()
    except OSError as err:
        return type(err).__name__
    return None


def server_outage(tracking_uri: str) -> str | None:
    """One line on a tracking server that does not answer (None: it answers, or is no server)."""
    cause = unanswered(tracking_uri)
    return f"the tracking server {redacted(tracking_uri)} does not answer ({cause})" if cause else None


@contextmanager
def _without_retries() -> Iterator[None]:
    """One attempt per request: for the last words to a server already known to be down."""
    previous = os.environ.get("MLFLOW_HTTP_REQUEST_MAX_RETRIES")
    os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] = "0"
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop("MLFLOW_HTTP_REQUEST_MAX_RETRIES")
        else:
            os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] = previous


def resolve_tracking_uri(uri: str | None) -> str:
    """`uri` if set, else $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db in the launch directory."""
    if uri:
        return uri
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    return f"sqlite:///{launch_dir().resolve() / 'mlflow.db'}"


def _task_overrides() -> list[str]:
    return list(HydraConfig.get().overrides.task) if HydraConfig.initialized() else []


def flatten(node: dict[str, Any], prefix: str = "") -> dict[str, str]:
    """Nested dict -> {"a.b.c": "value"}, the form MLflow params take."""
    flat: dict[str, str] = {}
    for key, value in node.items():
        if isinstance(value, dict):
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = str(value)
    return flat


def axes(cfg: DictConfig) -> dict[str, str]:
    """The ablation axes under their short names."""
    return {
        "activation": cfg.activation.name,
        "norm": cfg.norm.name,
        "dropout": f"{cfg.dropout.p:g}",
        "depth": "x".join(str(w) for w in cfg.depth.widths),
        "init": cfg.init.name,
        "scheduler": cfg.scheduler.name,
    }


def run_name(cfg: DictConfig) -> str:
    """A readable run name, e.g. relu-batchnorm-p0.2-1024x300-s0; an init and a scheduler other than
    the defaults join it, e.g. relu-none-p0-256x256-xavier_uniform-cosine-s1."""
    a = axes(cfg)
    extra = [a[axis] for axis, default in (("init", "default"), ("scheduler", "none")) if a[axis] != default]
    return "-".join([a["activation"], a["norm"], f"p{a['dropout']}", a["depth"], *extra, f"s{cfg.seed}"])


def parent_run_id() -> str | None:
    in_multirun = HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN
    return os.environ.get(PARENT_RUN_ENV) if in_multirun else None


def sqlite_database(tracking_uri: str) -> Path | None:
    """The database file of a sqlite:/// store (None for other stores)."""
    return Path(tracking_uri.removeprefix("sqlite:///")).resolve() if tracking_uri.startswith("sqlite:///") else None


def sqlite_store_missing(tracking_uri: str) -> bool:
    """Whether the store is a SQLite one whose file does not exist yet (nothing in it to read)."""
    database = sqlite_database(tracking_uri)
    return database is not None and not database.is_file()


def artifact_location(tracking_uri: str) -> str | None:
    """For a SQLite store, `mlartifacts/` beside the database file; otherwise the server decides."""
    database = sqlite_database(tracking_uri)
    return (database.parent / "mlartifacts").as_uri() if database else None


def refuse_deleted(experiment: Experiment | None) -> None:
    """ConfigError for an experiment deleted in its store (MLflow would refuse every run in it)."""
    if experiment is not None and experiment.lifecycle_stage == "deleted":
        allowed = (
            f"an experiment that is not deleted (restore it: mlflow experiments restore --experiment-id "
            f"{experiment.experiment_id}; or purge it with `mlflow gc`, or choose another name)"
        )
        raise ConfigError(problem("tracking.experiment", experiment.name, allowed))


def get_or_create_experiment(client: MlflowClient, name: str) -> str:
    """The experiment's id (created if new), marked as model training for the MLflow UI (see
    EXPERIMENT_KIND_TAG) unless it already says what it is."""
    experiment = client.get_experiment_by_name(name)
    if experiment is None:
        location = artifact_location(client.tracking_uri)
        return client.create_experiment(name, artifact_location=location, tags={EXPERIMENT_KIND_TAG: MODEL_TRAINING})
    refuse_deleted(experiment)
    if EXPERIMENT_KIND_TAG not in experiment.tags:
        client.set_experiment_tag(experiment.experiment_id, EXPERIMENT_KIND_TAG, MODEL_TRAINING)
    return experiment.experiment_id


@contextmanager
def store_lock(tracking_uri: str) -> Iterator[None]:
    """For a SQLite store, an exclusive lock on `<database>.lock`: processes that meet a fresh
    store would otherwise race its schema migration and the experiment's creation."""
    database = sqlite_database(tracking_uri)
    if database is None:
        yield
        return
    database.parent.mkdir(parents=True, exist_ok=True)
    with open(f"{database}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def prepare_store(tracking_uri: str, experiment: str, locked: bool = False) -> tuple[MlflowClient, str]:
    """A client of the store (created and migrated if new) and the experiment's id (created if
    new), under the store's lock (`locked`: the caller holds it already)."""
    with nullcontext() if locked else store_lock(tracking_uri):
        client = MlflowClient(tracking_uri)
        return client, get_or_create_experiment(client, experiment)


class SplitDataset(MetaDataset):
    """One split as an MLflow dataset input: name, digest, source (the folder of the IDX files),
    schema and number of rows; only this description is stored, never the images."""

    def __init__(self, source_folder: Path, name: str, digest: str, num_rows: int, num_features: int) -> None:
        with warnings.catch_warnings():  # MLflow registers its local-file source twice and says so
            warnings.simplefilter("ignore", UserWarning)
            source = resolve_dataset_source(str(source_folder.resolve()))
        schema = Schema([TensorSpec(np.dtype(np.float32), (-1, num_features), "image"),
                         TensorSpec(np.dtype(np.int64), (-1,), "label")])  # fmt: skip
        super().__init__(source, name=name, digest=digest, schema=schema)
        self.num_rows = num_rows

    @property
    def profile(self) -> dict[str, int]:
        return {"num_rows": self.num_rows}

    def to_dict(self) -> dict[str, str]:
        return {**super().to_dict(), "profile": json.dumps(self.profile)}


def split_datasets(data_cfg: DictConfig, data: DataSplits, files_digest: str) -> dict[str, SplitDataset]:
    """The train, validation and test splits as MLflow datasets, by their MLflow context. A split's
    digest covers the IDX files' contents (`files_digest`, see data.dataset_digest) and what cuts
    the split from them, so a changed data file or split shows as a new digest."""
    splits = {"training": ("train", data.train), "validation": ("val", data.val), "testing": ("test", data.test)}
    cut = f"split_seed={data_cfg.split_seed} val_size={data_cfg.val_size} limit_train={data_cfg.limit_train}"
    datasets = {}
    for context, (split, tensors) in splits.items():
        digest = hashlib.sha256(f"{files_digest} {cut} normalize={data_cfg.normalize} {split}".encode()).hexdigest()
        name = f"{data_cfg.name}-{split}"
        source = raw_folder(data_cfg.name, data_cfg.root)
        datasets[context] = SplitDataset(source, name, digest[:16], len(tensors), data.num_features)
    return datasets


DATASET_ATTEMPTS = 3


def log_datasets(data_cfg: DictConfig, data: DataSplits, files_digest: str) -> None:
    """Log the splits (see split_datasets) as the active run's dataset inputs."""
    datasets = split_datasets(data_cfg, data, files_digest)
    for attempt in range(DATASET_ATTEMPTS):
        try:
            mlflow.log_inputs(list(datasets.values()), contexts=list(datasets), tags_list=[None] * len(datasets))
            return
        except mlflow.exceptions.MlflowException as err:
            # parallel jobs logging the same splits at once race the store's insert of a dataset's
            # row (a unique-key violation); the transaction rolled back, and a retry finds the row
            if attempt == DATASET_ATTEMPTS - 1 or "unique" not in str(err).lower():
                raise
            time.sleep(0.2 * (attempt + 1))


def browse_hint(tracking_uri: str, experiment_id: str, run_name: str) -> str:
    """Where to look at a run in the MLflow UI, in its model-training view: MLflow 3's UI opens an
    experiment in its GenAI view unless the page's `workflowType` says otherwise (it remembers the
    choice in the browser; the experiment's kind tag does not decide it)."""
    page = f"#/experiments/{experiment_id}?workflowType=machine_learning"
    tracking_uri = redacted(tracking_uri)
    if tracking_uri.startswith(("http://", "https://")):
        return f"MLflow UI: {tracking_uri.rstrip('/')}/{page} (run {run_name})"
    return f"MLflow UI: run `mlflow ui --backend-store-uri {tracking_uri}`, then open http://127.0.0.1:5000/{page} (run {run_name})"


def log_epoch(metrics: EpochMetrics) -> None:
    mlflow.log_metrics(metrics.metrics(), step=metrics.epoch)


def log_epochs(history: Sequence[EpochMetrics], snapshots: Sequence[Snapshot] = ()) -> None:
    """Log a whole history of epochs, and the probe's snapshots of them, in one request (the
    epochs' metrics first: MLflow's compare view plots a run's first metric)."""
    run_id = mlflow.active_run().info.run_id
    now = int(time.time() * 1000)
    metrics = [Metric(key, value, now, m.epoch) for m in history for key, value in m.metrics().items()]
    metrics += [Metric(key, value, now, s.epoch) for s in snapshots for key, value in s.metrics().items()]
    MlflowClient().log_batch(run_id, metrics=metrics, synchronous=True)


def log_test(test_loss: float, test_acc: float) -> None:
    mlflow.log_metrics({metric_key("test_loss"): test_loss, metric_key("test_acc"): test_acc})


def log_stopping(best_epoch: int, stopped_epoch: int) -> None:
    """Where early stopping left a run: its best epoch, and the last epoch it trained."""
    mlflow.log_metrics({"best_epoch": best_epoch, "stopped_epoch": stopped_epoch})


def run_figures(history: Sequence[EpochMetrics], confusion: torch.Tensor, title: str) -> list[FigureRequest]:
    """A run's learning curves and test confusion matrix."""
    counts = confusion.numpy()
    return [
        FigureRequest("learning_curves", ([asdict(m) for m in history], title), "learning_curves.png"),
        FigureRequest("confusion_matrix", (counts, f"{title}: test confusion matrix"), "confusion_matrix.png"),
    ]


def log_run_figures(history: Sequence[EpochMetrics], confusion: torch.Tensor, title: str, drawn: Figures) -> None:
    """Learning curves and the test confusion matrix as figures (drawn by `drawn`), and the
    confusion counts as CSV."""
    for request in run_figures(history, confusion, title):
        drawn.add(*request)
    counts = confusion.numpy()
    header = "true\\predicted," + ",".join(str(c) for c in range(counts.shape[1]))
    rows = [f"{true}," + ",".join(str(n) for n in row) for true, row in enumerate(counts)]
    mlflow.log_text("\n".join([header, *rows]) + "\n", "confusion_matrix.csv")


def probe_grid_figure(snapshot: Snapshot, title: str) -> FigureRequest | None:
    """The probe's grid of a snapshot with histograms (a figure epoch's), else None."""
    if not any(layer.histograms for layer in snapshot.layers.values()):
        return None
    layers = {name: asdict(layer) for name, layer in snapshot.layers.items()}
    artifact_path = f"probe/epoch_{snapshot.epoch:03d}.png"
    return FigureRequest("probe_grid", (snapshot.epoch, layers, title), artifact_path, dpi=DPI)


def snapshot_gradient_norms(snapshot: Snapshot) -> dict[str, float]:
    """Layer -> the norm of its weight gradient, where the snapshot measured it."""
    return {name: layer.stats["grad_norm"] for name, layer in snapshot.layers.items() if "grad_norm" in layer.stats}


def gradient_norms_figure(norms: dict[int, dict[str, float]], title: str) -> FigureRequest:
    return FigureRequest("gradient_norms", (norms, title), "probe/gradient_norms.png")


def probe_figures(snapshots: Sequence[Snapshot], title: str, finished: bool = True) -> list[FigureRequest]:
    """The figures a ProbeLog draws of these snapshots (see `record`, and `finish`, which a run
    that failed never reaches)."""
    grids = [grid for snapshot in snapshots if (grid := probe_grid_figure(snapshot, title))]
    norms = {snapshot.epoch: norms for snapshot in snapshots if (norms := snapshot_gradient_norms(snapshot))}
    return grids + ([gradient_norms_figure(norms, title)] if norms and finished else [])


class ProbeLog:
    """Logs an ActivationProbe: metrics every epoch; at `figure_epochs` the grid figure and its
    histograms; at the end an animated GIF of the figures and the probe's share of the run time
    (the time it took in the job's own process; `drawn` may draw its figures in another)."""

    def __init__(self, probe: ActivationProbe, figure_epochs: set[int], title: str, drawn: Figures) -> None:
        self.probe = probe
        self.figure_epochs = figure_epochs
        self.title = title
        self.drawn = drawn
        self.frames: list[Path] = []
        self.histograms: dict[int, dict[str, Any]] = {}
        self.gradient_norms: dict[int, dict[str, float]] = {}  # epoch -> layer -> weight-gradient norm
        self.waiting: Snapshot | None = None  # taken, not yet logged (see `snapshot`)
        self.seconds = 0.0

    def __call__(self, epoch: int, final: bool = False) -> None:
        """Log the probe at `epoch`; a figure at the figure epochs and at a `final` one (early stopping)."""
        start = time.perf_counter()
        snapshot = self.probe.snapshot(epoch, with_histograms=epoch in self.figure_epochs or final)
        self.seconds += time.perf_counter() - start
        self.record(snapshot)

    def snapshot(self, epoch: int) -> None:
        """Take the probe's snapshot at `epoch` (a figure epoch) now, and log it at `log_waiting`:
        the run's first metrics are then its epoch metrics (MLflow's compare view plots the first)."""
        start = time.perf_counter()
        self.waiting = self.probe.snapshot(epoch, with_histograms=True)
        self.seconds += time.perf_counter() - start

    def log_waiting(self) -> None:
        """Log the snapshot that `snapshot` took, if any."""
        if self.waiting is not None:
            self.record(self.waiting)
            self.waiting = None

    def record(self, snapshot: Snapshot, metrics_logged: bool = False) -> None:
        """Log a snapshot taken at its epoch: its metrics (unless `metrics_logged` already, see
        log_epochs), and its figure where it has histograms."""
        start = time.perf_counter()
        epoch = snapshot.epoch
        if not metrics_logged:
            mlflow.log_metrics(snapshot.metrics(), step=epoch)
        if norms := snapshot_gradient_norms(snapshot):
            self.gradient_norms[epoch] = norms
        if grid := probe_grid_figure(snapshot, self.title):
            self.frames.append(self.drawn.add(*grid))
            self.histograms[epoch] = grid.args[1]  # the snapshot's layers as dicts, as the grid draws them
        self.seconds += time.perf_counter() - start

    def finish(self, started: float) -> None:
        """The histograms, the gradient-norm figure and GIF, and the probe's time and its share of
        the run since `started` (a perf_counter time, before the probe's first snapshot)."""
        start = time.perf_counter()
        self.log_waiting()
        mlflow.log_dict(self.histograms, "probe/histograms.json")
        if self.gradient_norms:
            self.drawn.add(*gradient_norms_figure(self.gradient_norms, self.title))
        if len(self.frames) > 1:
            self.drawn.add_gif(self.frames, "probe/activations.gif")
        self.seconds += time.perf_counter() - start
        run_seconds = time.perf_counter() - started
        mlflow.log_metrics({"probe_time_s": self.seconds, "probe_time_frac": self.seconds / run_seconds})
        log.info(f"probe: {self.seconds:.2f}s, {100 * self.seconds / run_seconds:.1f}% of the run")


def log_model(model: nn.Module, example: torch.Tensor) -> None:
    """Log a CPU copy of `model` with an input example (MLflow infers the signature from it)."""
    mlflow.pytorch.log_model(
        copy.deepcopy(model).cpu().eval(),
        name="model",
        input_example=example.detach().cpu().numpy().astype(np.float32),
        pip_requirements=[f"torch=={torch.__version__.split('+')[0]}"],
        # no reload of the saved model to try the example on it: a few hundred milliseconds per
        # run, and on a GPU machine MLflow reloads it onto the GPU, which a CPU export refuses
        validate_serving_input=False,
    )


def latest_attempts(runs: Sequence[Run]) -> list[Run]:
    """One run per config of a sweep that was resumed: its FINISHED run, else its latest attempt
    (a failed attempt that a rerun under `resume=true` replaced is history, not a result)."""
    chosen: dict[str, Run] = {}
    for run in sorted(runs, key=lambda run: (run.info.status == "FINISHED", run.info.start_time)):
        chosen[run.data.tags.get(CONFIG_HASH_TAG, run.info.run_id)] = run
    return list(chosen.values())


def _config_runs(cfg: DictConfig, cfg_hash: str, status_filter: str = "", max_results: int = 1000) -> list[Run]:
    """The runs with the config hash `cfg_hash`, latest first: in a multirun only the sweep's own
    children (another sweep's run of the same config is not this sweep's), else the experiment's."""
    client, experiment_id = prepare_store(resolve_tracking_uri(cfg.tracking.uri), cfg.tracking.experiment)
    parent_id = parent_run_id()
    in_sweep = f" and tags.mlflow.parentRunId = '{parent_id}'" if parent_id else ""
    return client.search_runs(
        [experiment_id],
        f"tags.`{CONFIG_HASH_TAG}` = '{cfg_hash}'{status_filter}{in_sweep}",
        order_by=["attributes.start_time DESC"],
        max_results=max_results,
    )


def finished_run(cfg: DictConfig, cfg_hash: str) -> Run | None:
    """The latest FINISHED run with the config hash `cfg_hash` (see _config_runs)."""
    runs = _config_runs(cfg, cfg_hash, " and attributes.status = 'FINISHED'", max_results=1)
    return runs[0] if runs else None


def _unfinished_runs(cfg: DictConfig, cfg_hash: str) -> list[Run]:
    """This config's runs that stopped before they finished, latest first: in a multirun the
    sweep's own, else those that ran alone (not a sweep's)."""
    own = [run for run in _config_runs(cfg, cfg_hash) if run.data.tags.get("mlflow.parentRunId") == parent_run_id()]
    return [run for run in own if run.info.status in UNFINISHED]


def unfinished_run(cfg: DictConfig, cfg_hash: str) -> Run | None:
    """The latest run of this config (see _unfinished_runs) that stopped before it finished, if it
    stopped before logging any epoch (so it can start again from epoch 0 without logging an epoch
    twice)."""
    unfinished = next(iter(_unfinished_runs(cfg, cfg_hash)), None)
    logged_epochs = {"val_acc", metric_key("val_acc")} & set(unfinished.data.metrics) if unfinished else set()
    return unfinished if unfinished and not logged_epochs else None


def has_unfinished_run(cfg: DictConfig, cfg_hash: str) -> bool:
    """Whether this config has a run (in this sweep, in a multirun) that stopped before it finished:
    resume=true continues it from its checkpoint."""
    return bool(_unfinished_runs(cfg, cfg_hash))


NO_CHECKPOINT = "it stopped without a checkpoint to continue from; resume=true trains its config in a new run"


def retire_unfinished_runs(cfg: DictConfig, cfg_hash: str, continued: str | None, reason: str = NO_CHECKPOINT) -> None:
    """End FAILED (saying `reason`) this config's unfinished runs other than the one resume=true
    `continued`: runs that a crash or an outage left RUNNING or KILLED without a checkpoint to
    continue them from, whose config now goes into another run. A resumed sweep leaves no run RUNNING."""
    client = MlflowClient(resolve_tracking_uri(cfg.tracking.uri))
    for run in _unfinished_runs(cfg, cfg_hash):
        if run.info.run_id != continued:
            client.set_tag(run.info.run_id, ERROR_TAG, reason)
            client.set_terminated(run.info.run_id, "FAILED")
            log.info(f"resume: run {run.info.run_id} ends FAILED: {reason}")


def continuable_run(cfg: DictConfig, run_id: str, cfg_hash: str) -> str | None:
    """Why the run a checkpoint belongs to cannot be continued here (None: it can): it must be in
    this store and experiment, of this config, in this sweep, and stopped before it finished."""
    client, experiment_id = prepare_store(resolve_tracking_uri(cfg.tracking.uri), cfg.tracking.experiment)
    try:
        run = client.get_run(run_id)
    except mlflow.exceptions.MlflowException:
        return f"its run {run_id} is not in this store"
    tags = run.data.tags
    if run.info.experiment_id != experiment_id or tags.get(CONFIG_HASH_TAG) != cfg_hash:
        return f"its run {run_id} is of another experiment or config"
    if tags.get("mlflow.parentRunId") != parent_run_id():
        return f"its run {run_id} belongs to another sweep"
    if run.info.status not in UNFINISHED:
        return f"its run {run_id} is {run.info.status}"
    return None


def best_metric(cfg: DictConfig, run_id: str, name: str) -> float:
    """The largest value in a run's history of metric `name` (e.g. val_acc, see metric_key; NaN when it has none)."""
    client = MlflowClient(resolve_tracking_uri(cfg.tracking.uri))
    history = client.get_metric_history(run_id, metric_key(name))
    if not history and metric_key(name) != name:  # a run logged before the keys were renamed
        history = client.get_metric_history(run_id, name)
    return max((m.value for m in history), default=math.nan)


@contextmanager
def job_run(
    cfg: DictConfig, num_params: int, train_step: str, cfg_hash: str, resume_run_id: str | None = None
) -> Iterator[mlflow.ActiveRun]:
    """The MLflow run of one training job: params (the config's, its axes, the parameter count and
    the training step used), config and overrides logged on entry.

    In a multirun the run is a child of the sweep's parent run. `resume_run_id` continues an
    unfinished run instead (its params are already there). The run ends FINISHED; KILLED on
    Interrupted (its checkpoint stays, to be continued); FAILED on any other exception, with the
    error as a one-line tag and the traceback as an artifact (see _end_stopped_run). When a
    tracking server stopped answering, TrackingOutage is raised and the run is left RUNNING for
    `resume=true`.
    """
    tracking_uri = resolve_tracking_uri(cfg.tracking.uri)
    _, experiment_id = prepare_store(tracking_uri, cfg.tracking.experiment)
    mlflow.set_tracking_uri(tracking_uri)
    overrides = _task_overrides()
    system_metrics = bool(cfg.tracking.system_metrics)  # MLflow's CPU, memory (and GPU) sampling
    if resume_run_id:
        run = mlflow.start_run(run_id=resume_run_id, log_system_metrics=system_metrics)  # RUNNING again
        if ERROR_TAG in run.data.tags:
            mlflow.delete_tag(ERROR_TAG)
    else:
        tags = {ROLE_TAG: "job", OVERRIDES_TAG: redacted(" ".join(overrides)), CONFIG_HASH_TAG: cfg_hash}
        run = mlflow.start_run(
            experiment_id=experiment_id,
            run_name=run_name(cfg),
            parent_run_id=parent_run_id(),
            tags=tags,
            log_system_metrics=system_metrics,
        )
    try:
        if not resume_run_id:
            container = OmegaConf.to_container(cfg, resolve=True)
            assert isinstance(container, dict)
            params = {key: redacted(value) for key, value in flatten(container).items()}
            mlflow.log_params({**params, **axes(cfg), "num_params": num_params, "train_step": train_step})
            mlflow.log_text(redacted(OmegaConf.to_yaml(cfg, resolve=True)), "config.yaml")
            mlflow.log_text(redacted(OmegaConf.to_yaml(overrides)), "overrides.yaml")
        yield run
    except BaseException as err:
        if outage := server_outage(tracking_uri):
            with _without_retries(), suppress(Exception):
                mlflow.end_run(RunStatus.to_string(RunStatus.FAILED))  # forgets the run locally; the server is down
            raise TrackingOutage(outage) from err
        _end_stopped_run(err)
        raise
    try:
        mlflow.end_run(RunStatus.to_string(RunStatus.FINISHED))
    except Exception as err:  # the run stays RUNNING: an outage keeps its checkpoint for resume=true
        if outage := server_outage(tracking_uri):
            raise TrackingOutage(outage) from err
        raise


def _end_stopped_run(err: BaseException) -> None:
    """End the active run KILLED (an interrupt, or a SystemExit such as submitit's) or FAILED,
    with the reason as a one-line tag; the status is written even if the tag or traceback is not."""
    interrupted = isinstance(err, (Interrupted, KeyboardInterrupt, SystemExit))
    run_id = mlflow.active_run().info.run_id
    try:
        if interrupted:
            reason = str(err) if isinstance(err, Interrupted) else f"{type(err).__name__}, stopped at once"
            mlflow.set_tag(ERROR_TAG, f"interrupted ({reason}); resume=true continues it from its last checkpoint")
        else:
            mlflow.set_tag(ERROR_TAG, describe(err))
            mlflow.log_text(redacted(traceback.format_exc()), "traceback.txt")
    except Exception:
        log.exception(f"could not record why run {run_id} stopped")
    finally:
        try:
            mlflow.end_run(RunStatus.to_string(RunStatus.KILLED if interrupted else RunStatus.FAILED))
        except Exception:
            log.exception(f"could not end run {run_id}; resume=true will find it unfinished")


def log_missing_epochs(history: Sequence[EpochMetrics]) -> None:
    """Log the epochs of a resumed `history` that the active run does not have yet."""
    run_id = mlflow.active_run().info.run_id
    logged = {m.step for m in MlflowClient().get_metric_history(run_id, metric_key("val_acc"))}
    for metrics in history:
        if metrics.epoch not in logged:
            log_epoch(metrics)


def describe(err: BaseException) -> str:
    """One line: the error's type and the first line of its message, without any SQL statement
    a database error carries."""
    message = redacted(str(err)).split("[SQL:")[0].strip().splitlines()
    return f"{type(err).__name__}: {message[0] if message else ''}"[:500]


def record_job_failure(cfg: DictConfig, err: BaseException) -> None:
    """Tag the sweep's parent run with a failed job's number, overrides and error.

    This also covers jobs that failed before their own run started (e.g. a bad value).
    """
    parent_id = parent_run_id()
    if parent_id is None:
        return
    job = HydraConfig.get().job
    try:
        client = MlflowClient(resolve_tracking_uri(cfg.tracking.uri))
        client.set_tag(
            parent_id, f"{FAILED_JOB_TAG_PREFIX}{job.num}", redacted(f"[{' '.join(_task_overrides())}] {describe(err)}")
        )
    except Exception:  # the store itself may be what failed; the job's log still has the error
        log.exception(f"could not record the failure of job {job.num} on parent run {parent_id}")
