"""The lifecycle of a multirun, in its launching process (a Hydra callback and the entry point).

A sweep has one identity for its whole life: its `tracking.sweep_name`, or, unnamed, its
experiment and overrides (without the keys that cannot change a result, as in the config hash).
Before any job starts: every job's config is composed and checked (bad input stops the sweep
with one line per bad job, before anything is written to the store); then the store and the
experiment are created once (parallel jobs never race a fresh SQLite store's migration), and
the parent run is created, or, with `resume=true`, the sweep's earlier parent is reattached.
At the end the parent is closed from what the store holds: FINISHED when every config of the
sweep has a FINISHED run, KILLED when it was interrupted, else FAILED; `close_sweep` returns
the exit status, which the entry point uses whatever Hydra did with the callback.
"""

from __future__ import annotations

import copy
import hashlib
import logging
import os
import shlex
import socket
import sys
import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import psutil
from hydra._internal.core_plugins.basic_launcher import BasicLauncher
from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
from hydra.core.config_loader import ConfigLoader
from hydra.core.global_hydra import GlobalHydra
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import ChoiceSweep, IntervalSweep, Override, RangeSweep
from hydra.errors import HydraException
from hydra.experimental.callback import Callback
from mlflow.entities import Metric, Param, Run
from mlflow.tracking import MlflowClient
from omegaconf import DictConfig, OmegaConf, open_dict, read_write
from omegaconf.errors import OmegaConfBaseException

from hydra_plugins.mlpsweep_adaptive_seeds.adaptive_seeds_sweeper import AdaptiveSeedsSweeper
from hydra_plugins.mlpsweep_packed_launcher.config import Backend
from hydra_plugins.mlpsweep_packed_launcher.packed_launcher import PackedLauncher
from hydra_plugins.mlpsweep_packed_launcher.packed_launcher import check_settings as check_packed_settings
from mlpsweep import interrupt, packing, rendering
from mlpsweep.checkpoint import NOT_HASHED, config_hash
from mlpsweep.checks import INPUT_ERRORS, check_job_inputs, check_tracking_server
from mlpsweep.config import ConfigError, require
from mlpsweep.console import JOB_END_TAG_PREFIX, SweepProgress
from mlpsweep.engine import metric_key
from mlpsweep.tracking import (
    CONFIG_HASH_TAG,
    ERROR_TAG,
    FAILED_JOB_TAG_PREFIX,
    OVERRIDES_TAG,
    PARENT_RUN_ENV,
    ROLE_TAG,
    TrackingOutage,
    browse_hint,
    configure_store_access,
    describe,
    latest_attempts,
    prepare_store,
    redacted,
    refuse_deleted,
    resolve_tracking_uri,
    server_outage,
    sqlite_store_missing,
    store_lock,
)

log = logging.getLogger(__name__)
BASIC_SWEEPER = f"{BasicSweeper.__module__}.{BasicSweeper.__name__}"
ADAPTIVE_SWEEPER = f"{AdaptiveSeedsSweeper.__module__}.{AdaptiveSeedsSweeper.__name__}"
OPTUNA_SWEEPER = "hydra_plugins.hydra_optuna_sweeper.optuna_sweeper.OptunaSweeper"
PACKED_LAUNCHER = f"{PackedLauncher.__module__}.{PackedLauncher.__name__}"
BASIC_LAUNCHER = f"{BasicLauncher.__module__}.{BasicLauncher.__name__}"
# what hydra/sweeper=adaptive_seeds may compare (each run's last value): accuracies, so that precision
# is in pp (by MLflow key; their names test_acc, val_acc and train_acc are accepted too, see metric_key)
ADAPTIVE_METRICS = ("accuracy/test", "accuracy/val", "accuracy/train")
SWEEP_KEY_TAG = "mlpsweep.sweep_key"
SWEEP_OVERRIDES_TAG = "mlpsweep.sweep_overrides"
# host:pid of the process that launched the sweep: a job running inside it (the basic launcher)
# stops the sweep itself on an interrupt, a job in a worker process leaves that to the launcher
LAUNCHER_PID_ENV = "MLPSWEEP_LAUNCHER_PID"
LAUNCHER_TAG = "mlpsweep.launcher"  # host:pid of the process running the sweep
LAUNCHER_STARTED_TAG = "mlpsweep.launcher_started"  # when that process started (seconds since the epoch)
NOTE_TAG = "mlflow.note.content"  # a run's description in the MLflow UI (markdown)


def job_overrides(config: DictConfig) -> list[list[str]] | None:
    """The override list of every job the sweeper may run: the basic sweeper's grid; each config
    of the adaptive sweeper's grid with each seed it may give it (0 .. max_seeds - 1); None for
    other sweepers, e.g. Optuna, whose jobs are only known as the study runs."""
    sweeper = config.hydra.sweeper
    if sweeper._target_ == BASIC_SWEEPER:
        return grid(config)
    if sweeper._target_ == ADAPTIVE_SWEEPER:
        return [[*cell, f"seed={seed}"] for cell in adaptive_grid(config) for seed in range(sweeper.max_seeds)]
    return None


def task_overrides(config: DictConfig) -> list[str]:
    """The sweep's task overrides as the command line gave them (and as Hydra's sweepers get them):
    an interpolation in one (`trainer.eval_batch_size=${trainer.batch_size}`) is each job's to
    resolve, not the sweep's config's."""
    return list(OmegaConf.to_container(config.hydra.overrides.task, resolve=False))


def sweep_overrides(config: DictConfig) -> list[Override]:
    """`hydra.sweeper.params` and the command line's overrides, parsed."""
    # the params resolved, as the basic sweeper gets them; the command line's overrides as given
    params = [f"{key}={value}" for key, value in (config.hydra.sweeper.get("params") or {}).items()]
    parser = OverridesParser.create(config_loader=GlobalHydra.instance().config_loader())
    return parser.parse_overrides(params + task_overrides(config))


def search_space_probes(config: DictConfig) -> list[list[str]]:
    """For a sweeper that samples its jobs (Optuna): the shared config, and it with each value of
    the search space that can be named ahead: every choice, a range's ends (Optuna samples its
    stop too), an interval's lower end (its upper one is never sampled, as in
    dropout.p=interval(0, 1)). ConfigError for a range or choice with no value."""
    fixed = fixed_overrides(config)
    probes = [fixed]
    for override in sweep_overrides(config):
        if not override.is_sweep_override():
            continue
        value = override.value()
        if isinstance(value, IntervalSweep):
            values = [str(value.start)]
        elif isinstance(value, RangeSweep) and not value.shuffle:  # Optuna samples start .. stop, both ends
            values = [str(value.start), str(value.stop)] if value.start < value.stop else []
        else:
            values = list(override.sweep_string_iterator())
        written = (override.input_line or "").partition("=")[2]
        require(bool(values), override.get_key_element(), written, "a search space with at least one value")
        probes += [[*fixed, f"{override.get_key_element()}={v}"] for v in values]
    return probes


def check_optuna_settings(sweeper: DictConfig) -> None:
    """ConfigError for an Optuna study that would run no trial (it fails after the sweep opened)."""
    for key in ("n_trials", "n_jobs"):
        value = sweeper.get(key)
        ok = isinstance(value, int) and not isinstance(value, bool) and value >= 1
        require(ok, f"hydra.sweeper.{key}", value, "an integer of at least 1")


def grid(config: DictConfig) -> list[list[str]]:
    """The override list of every config of the grid, as the basic sweeper expands them."""
    return BasicSweeper.split_arguments(sweep_overrides(config), None)[0]


def adaptive_grid(config: DictConfig) -> list[list[str]]:
    """The grid of hydra/sweeper=adaptive_seeds, after checking its settings and that the grid
    leaves the seed to the sweeper (ConfigError naming the key otherwise)."""
    sweeper = config.hydra.sweeper
    key = "hydra.sweeper"
    require(sweeper.min_seeds >= 2, f"{key}.min_seeds", sweeper.min_seeds, "at least 2 (an interval needs two seeds)")
    allowed = f"at least hydra.sweeper.min_seeds ({sweeper.min_seeds})"
    require(sweeper.max_seeds >= sweeper.min_seeds, f"{key}.max_seeds", sweeper.max_seeds, allowed)
    require(sweeper.precision_pp > 0, f"{key}.precision_pp", sweeper.precision_pp, "a positive number of pp")
    metrics = f"one of {', '.join(ADAPTIVE_METRICS)}"
    require(metric_key(sweeper.metric) in ADAPTIVE_METRICS, f"{key}.metric", sweeper.metric, metrics)
    for override in sweep_overrides(config):
        if override.key_or_group.lstrip("+~") == "seed":
            raise ConfigError(
                f"{override.input_line}: hydra/sweeper=adaptive_seeds chooses the seeds itself (0, 1, ... up to "
                "hydra.sweeper.max_seeds - 1); remove seed from the command line and hydra.sweeper.params"
            )
    return grid(config)


def fixed_overrides(config: DictConfig) -> list[str]:
    """The overrides every job of a sweep shares (those that are not a sweep over values)."""
    parser = OverridesParser.create(config_loader=GlobalHydra.instance().config_loader())
    return [o.input_line for o in parser.parse_overrides(task_overrides(config)) if not o.is_sweep_override()]


class KeptCompositions:
    """The sweep's config loader, answering from the preflight's compositions: Hydra's basic sweeper
    composes every job of a batch again to check it, and a launcher composes it once more to run it
    (0.07 s a job each on the 2-core CPU). A job's config composed again from the same master config
    and overrides is the same config; each caller gets a copy of its own (launchers set fields on it).
    A composition goes once it has answered its `uses` (about 0.14 MB each; at most `KEPT_AT_MOST`
    are kept). A loader sent to another process (joblib, submitit) goes without them."""

    KEPT_AT_MOST = 1000

    def __init__(self, loader: ConfigLoader, config: DictConfig | None, uses: int) -> None:
        self.loader = loader
        self.config = config
        self.uses = uses
        self.kept: dict[tuple[str, ...], tuple[DictConfig, int]] = {}  # overrides -> (composition, uses left)

    @classmethod
    def install(cls, loader: ConfigLoader, config: DictConfig, uses: int) -> KeptCompositions:
        """Compositions kept for the sweep of master config `config`, each answering `uses` of
        `loader`'s own calls."""
        compositions = cls(loader, config, uses)
        loader.load_sweep_config = compositions  # type: ignore[method-assign]
        return compositions

    def compose(self, master_config: DictConfig, sweep_overrides: list[str]) -> DictConfig:
        """The loader's own composition."""
        return type(self.loader).load_sweep_config(self.loader, master_config, sweep_overrides)

    def keep(self, sweep_overrides: list[str], sweep_config: DictConfig) -> None:
        if len(self.kept) < self.KEPT_AT_MOST:
            self.kept[tuple(sweep_overrides)] = (sweep_config, self.uses)

    def __call__(self, master_config: DictConfig, sweep_overrides: list[str]) -> DictConfig:
        key = tuple(sweep_overrides)
        if master_config is not self.config or key not in self.kept:
            return self.compose(master_config, sweep_overrides)
        sweep_config, uses = self.kept.pop(key)
        if uses > 1:
            self.kept[key] = (sweep_config, uses - 1)
        return copy.deepcopy(sweep_config)

    def __getstate__(self) -> dict[str, Any]:
        return {"loader": self.loader, "config": None, "uses": self.uses, "kept": {}}


def preflight(config: DictConfig) -> tuple[list[str], set[str] | None]:
    """Compose and check every job of the sweep: one line per job that would fail on its input,
    and the config hash of every job. A sweeper that decides the jobs as it goes gets every job
    it may run checked (adaptive_seeds), or its settings, its shared config and each value of its
    search space that can be named ahead (Optuna: search_space_probes), and None for the hashes."""
    jobs = job_overrides(config)
    expected: set[str] | None = set() if config.hydra.sweeper._target_ == BASIC_SWEEPER else None
    optuna = config.hydra.sweeper._target_ == OPTUNA_SWEEPER
    try:
        if jobs is None:
            jobs = search_space_probes(config) if optuna else [fixed_overrides(config)]
        check_tracking_server(resolve_tracking_uri(config.tracking.uri))  # once for the sweep
        if config.hydra.launcher._target_ == PACKED_LAUNCHER:
            launcher = config.hydra.launcher
            check_packed_settings(launcher.pack_size, launcher.backend, launcher.submitit)
        if optuna:
            check_optuna_settings(config.hydra.sweeper)
    except INPUT_ERRORS as err:
        return [str(err)], None
    # the basic sweeper composes a batch to check it, then its launcher composes each job to run it
    uses = 2 if config.hydra.sweeper._target_ == BASIC_SWEEPER else 1
    compositions = KeptCompositions.install(GlobalHydra.instance().config_loader(), config, uses)
    problems = []
    nvml_check = os.environ.get("PYTORCH_NVML_BASED_CUDA_CHECK")
    os.environ["PYTORCH_NVML_BASED_CUDA_CHECK"] = "1"  # ask NVML about GPUs: no CUDA in the launcher
    try:
        for num, overrides in enumerate(jobs):
            try:
                sweep_config = compositions.compose(config, list(overrides))
                compositions.keep(list(overrides), sweep_config)
                cfg = packing.task_config(sweep_config)
                check_job_inputs(cfg)
                require_sweep_wide(config, cfg)
                if expected is not None:
                    expected.add(config_hash(cfg))
            except (*INPUT_ERRORS, HydraException, OmegaConfBaseException) as err:
                message = " ".join(str(err).split("Config search path")[0].split())  # one line, no search path
                what = "search space" if optuna else f"job {num}"
                problems.append(f"{what} [{' '.join(overrides)}]: {message}")
    finally:
        if nvml_check is None:
            os.environ.pop("PYTORCH_NVML_BASED_CUDA_CHECK")
        else:
            os.environ["PYTORCH_NVML_BASED_CUDA_CHECK"] = nvml_check
    return problems, expected


# where a sweep tracks: its parent run's store, experiment and name, the same for each of its jobs
SWEEP_WIDE = ("tracking.uri", "tracking.experiment", "tracking.sweep_name")


def require_sweep_wide(config: DictConfig, cfg: DictConfig) -> None:
    """ConfigError for a job (`cfg`) that tracks elsewhere than its sweep (`config`) does: its run
    would not be the parent run's child (a sweep over tracking.experiment, say)."""
    for key in SWEEP_WIDE:
        own, value = OmegaConf.select(config, key), OmegaConf.select(cfg, key)
        allowed = (
            f"the sweep's own ({'null' if own is None else repr(own)}): a sweep's jobs are children of its one "
            f"parent run, in its store and experiment, under its name; run a sweep for each {key.split('.')[1]}"
        )
        require(value == own, key, value, allowed)


def identity_overrides(overrides: list[str], as_given: bool = False) -> list[str]:
    """The overrides that make a sweep what it is: sorted, without the keys that cannot change a
    result (NOT_HASHED: where things go, how they are shown, resume itself), and the values of a
    list of choices sorted too (`a=x,y` and `a=y,x` are one grid), unless `as_given` (how sweeps
    were known before the values were sorted)."""

    def counts(override: str) -> bool:
        key = override.lstrip("+~").split("=", 1)[0]
        return not any(key == skip or key.startswith(f"{skip}.") for skip in NOT_HASHED)

    kept = list(filter(counts, overrides))
    if not as_given:
        parser = OverridesParser.create()  # no config loader: a choice's values, as written
        kept = [
            f"{o.get_key_element()}={','.join(sorted(o.sweep_string_iterator()))}"
            if isinstance(o.value(), ChoiceSweep) and o.value().simple_form
            else o.input_line
            for o in parser.parse_overrides(kept)
        ]
    return sorted(kept)


def sweep_key(config: DictConfig, as_given: bool = False) -> str:
    """The sweep's identity, as a hash (safe inside a search filter): of its name, or, unnamed, of
    the experiment, the overrides (identity_overrides) and the sweeper where it is not Hydra's
    basic one (an adaptive sweep and a grid of the same overrides are different sweeps)."""
    if config.tracking.sweep_name:
        text = f"name\n{config.tracking.sweep_name}"
    else:
        parts = [config.tracking.experiment, *identity_overrides(task_overrides(config), as_given)]
        sweeper = str(config.hydra.sweeper.get("_target_", ""))
        if sweeper != BASIC_SWEEPER:
            parts.append(f"sweeper {sweeper}")
        text = "\n".join(parts)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def launch_command() -> list[str]:
    """The command line that was run (`python train.py ...` or `mlpsweep-train ...`)."""
    program = ["python", sys.argv[0]] if sys.argv[0].endswith(".py") else [sys.argv[0]]
    return program + sys.argv[1:]


def resume_command() -> str:
    """The command line that was run, with resume=true."""
    command = [arg for arg in launch_command() if not arg.startswith("resume=")] + ["resume=true"]
    return shlex.join(command)


@dataclass
class SweepSession:
    """The parent run of the sweep this process launched, and what the sweep must contain."""

    client: MlflowClient
    parent_id: str
    name: str
    expected: set[str] | None  # the config hash of every job; None when the sweeper decides as it goes
    planned: bool = True  # every job known at the start (the basic sweeper's grid), not decided as it goes
    exit_code: int | None = None  # set once the end of the sweep is recorded
    progress: SweepProgress | None = None  # the progress lines, while the sweep runs


_started: list[bool] = []  # a multirun started in this process (even if its parent run could not be opened)
_session: list[SweepSession] = []  # the sweep of this process, once its parent run is open


def current_session() -> SweepSession | None:
    return _session[-1] if _session else None


def multirun_started() -> bool:
    return bool(_started)


def _earlier_parents(tracking_uri: str, experiment: str, keys: list[str]) -> list[Run]:
    """The parent runs of the sweep already in the store, latest first, by the first of its `keys`
    that has any (none without a store); the caller holds the store's lock (a store another sweep
    is creating is opened once its migration is done)."""
    if sqlite_store_missing(tracking_uri):
        return []
    client = MlflowClient(tracking_uri)
    found = client.get_experiment_by_name(experiment)
    if found is None:
        return []
    refuse_deleted(found)  # before any other word on its sweeps
    for key in dict.fromkeys(keys):
        runs = client.search_runs(
            [found.experiment_id],
            f"tags.`{ROLE_TAG}` = 'sweep' and tags.`{SWEEP_KEY_TAG}` = '{key}'",
            order_by=["attributes.start_time DESC"],
        )
        if runs:
            return runs
    return []


def _refuse_reused_name(config: DictConfig, earlier: Run, overrides: set[str]) -> None:
    """A named sweep is one sweep: raise ConfigError when the name is taken by other overrides
    (`overrides`: this sweep's, in the forms a parent may have been tagged with) or when its sweep
    is rerun without resume=true."""
    name = config.tracking.sweep_name
    if earlier.data.tags.get(SWEEP_OVERRIDES_TAG) not in overrides:
        raise ConfigError(
            f"tracking.sweep_name={name!r}: a sweep of that name already exists with other overrides "
            f"({earlier.data.tags.get(SWEEP_OVERRIDES_TAG)!r}); give this one another name, e.g. "
            f"tracking.sweep_name={name}-2"
        )
    if not config.resume:
        raise ConfigError(
            f"tracking.sweep_name={name!r}: this sweep already exists (parent run {earlier.info.run_id}); "
            "add resume=true to continue it, or give a new sweep another name"
        )


def _refuse_running(parent: Run) -> None:
    """Raise ConfigError when the sweep's launcher is still running on this machine (a launcher on
    another machine cannot be seen from here): two launchers would train the same runs."""
    host, _, pid = parent.data.tags.get(LAUNCHER_TAG, "").rpartition(":")
    if parent.info.status != "RUNNING" or host != socket.gethostname() or not pid.isdigit():
        return
    try:
        launcher = psutil.Process(int(pid))
        started = parent.data.tags.get(LAUNCHER_STARTED_TAG)
        if started is not None:  # the process that set the tag, not a later one with its pid
            alive = abs(launcher.create_time() - float(started)) < 1
        else:  # a parent tagged before LAUNCHER_STARTED_TAG: its first launcher
            alive = launcher.create_time() <= parent.info.start_time / 1000
    except (psutil.Error, ValueError):
        return
    if alive:
        raise ConfigError(
            f"resume=true: sweep {parent.info.run_name} is still running (its launcher is process {pid}); "
            f"wait for it to end, or stop it (Ctrl-C, or kill -TERM {pid}) and resume then"
        )


def open_sweep(config: DictConfig, expected: set[str] | None) -> SweepSession:
    """Create the sweep's parent run, or reattach its earlier one (resume=true, or the same name).
    On a SQLite store under the store's lock, from the look for an earlier parent to its creation
    or reattachment: two launchers of one sweep started at once make one parent run, and the
    second is refused as a rerun (or, under resume=true, as a sweep still running)."""
    tracking_uri = resolve_tracking_uri(config.tracking.uri)
    with store_lock(tracking_uri):
        return _open_sweep(config, expected, tracking_uri)


def _open_sweep(config: DictConfig, expected: set[str] | None, tracking_uri: str) -> SweepSession:
    key = sweep_key(config)
    given = task_overrides(config)
    overrides = " ".join(identity_overrides(given))
    as_given = " ".join(identity_overrides(given, as_given=True))
    earlier = _earlier_parents(tracking_uri, config.tracking.experiment, [key, sweep_key(config, as_given=True)])
    if earlier and config.tracking.sweep_name:
        _refuse_reused_name(config, earlier[0], {overrides, as_given})
    if earlier and config.resume:
        _refuse_running(earlier[0])
    if config.resume and not earlier:
        log.warning(
            f"resume=true: experiment {config.tracking.experiment!r} has no earlier sweep "
            + (f"named {config.tracking.sweep_name!r}" if config.tracking.sweep_name else "of these overrides")
            + "; this starts a new sweep"
        )
    client, experiment_id = prepare_store(tracking_uri, config.tracking.experiment, locked=True)
    if earlier and config.resume:
        parent = earlier[0]
        for tag in parent.data.tags:  # what the last attempt said no longer holds
            if tag.startswith((FAILED_JOB_TAG_PREFIX, JOB_END_TAG_PREFIX)) or tag == ERROR_TAG:
                client.delete_tag(parent.info.run_id, tag)
        client.update_run(parent.info.run_id, status="RUNNING")
        client.set_tag(parent.info.run_id, LAUNCHER_TAG, _this_process())
        client.set_tag(parent.info.run_id, LAUNCHER_STARTED_TAG, str(psutil.Process().create_time()))
        log.info(f"MLflow: resuming sweep {parent.info.run_name}, parent run {parent.info.run_id}")
    else:
        name = config.tracking.sweep_name or datetime.now().strftime("sweep-%Y-%m-%d_%H-%M-%S")
        tags = {
            ROLE_TAG: "sweep",
            SWEEP_KEY_TAG: key,
            SWEEP_OVERRIDES_TAG: overrides,
            OVERRIDES_TAG: redacted(" ".join(given)),
            "mlpsweep.sweep_dir": str(Path(config.hydra.sweep.dir).resolve()),
            LAUNCHER_TAG: _this_process(),
            LAUNCHER_STARTED_TAG: str(psutil.Process().create_time()),
        }
        parent = client.create_run(experiment_id, run_name=name, tags=tags)
        client.log_batch(parent.info.run_id, params=[Param(k, v) for k, v in swept_values(config).items()])
        log.info(f"MLflow: sweep {name} is parent run {parent.info.run_id} in {client.tracking_uri}")
    os.environ[PARENT_RUN_ENV] = parent.info.run_id
    os.environ[LAUNCHER_PID_ENV] = _this_process()
    return SweepSession(client, parent.info.run_id, parent.info.run_name, expected, planned=expected is not None)


def _this_process() -> str:
    """host:pid (a SLURM job on another node may have the launcher's pid)."""
    return f"{socket.gethostname()}:{os.getpid()}"


def in_launcher_process() -> bool:
    """Whether this job runs inside the process that launched its sweep (the basic launcher)."""
    return os.environ.get(LAUNCHER_PID_ENV) == _this_process()


def close_sweep(stop: BaseException | None = None) -> int:
    """Close the parent run from what the store holds and return the sweep's exit status:
    0 when every config of the sweep has a FINISHED run, 1 when any job failed (or the store
    could not be read), 130 when it was interrupted. `stop` is what ended the sweep early."""
    session = current_session()
    if session is None:
        return 1
    if session.exit_code is not None:
        return session.exit_code
    if session.progress is not None:
        session.progress.stop(final_poll=not isinstance(stop, TrackingOutage))
    try:
        if isinstance(stop, TrackingOutage):
            raise stop
        session.exit_code = _close(session, stop)
    except (Exception, TrackingOutage) as err:  # the store itself failed: one line; the runs stay resumable
        reason = server_outage(session.client.tracking_uri) or describe(err)
        log.error(f"sweep {session.name} stopped: {reason}; once the store answers, continue it with: {resume_command()}")
        session.exit_code = 1
    os.environ.pop(PARENT_RUN_ENV, None)
    return session.exit_code


def _close(session: SweepSession, stop: BaseException | None) -> int:
    client, parent_id = session.client, session.parent_id
    parent = client.get_run(parent_id)
    children = client.search_runs(
        [parent.info.experiment_id], f"tags.mlflow.parentRunId = '{parent_id}'", max_results=50000
    )
    for tag in parent.data.tags:  # the progress marks (console.SweepProgress) have served
        if tag.startswith(JOB_END_TAG_PREFIX):
            client.delete_tag(parent_id, tag)
    latest_runs = latest_attempts(children)
    latest = {run.data.tags.get(CONFIG_HASH_TAG, run.info.run_id): run.info.status for run in latest_runs}
    expected = session.expected if session.expected is not None else set(latest)
    finished = {h for h in expected if latest.get(h) == "FINISHED"}
    failures = sorted(
        (int(key.removeprefix(FAILED_JOB_TAG_PREFIX)), value)
        for key, value in parent.data.tags.items()
        if key.startswith(FAILED_JOB_TAG_PREFIX)
    )
    failed = failures or any(latest.get(h) == "FAILED" for h in expected)
    interrupted = isinstance(stop, (interrupt.Interrupted, KeyboardInterrupt)) or interrupt.requested() is not None
    interrupted = interrupted or any(latest.get(h) == "KILLED" for h in expected)
    log.info(f"MLflow: {len(finished)} of {len(expected)} configs of sweep {session.name} finished; parent run {parent_id}")
    log.info(browse_hint(client.tracking_uri, parent.info.experiment_id, session.name))
    failed_count = max(len(failures), sum(latest.get(h) == "FAILED" for h in expected))
    record_outcome(session, [run for run in latest_runs if run.info.status == "FINISHED"], len(expected), failed_count)
    if failures:
        log.error(f"{len(failures)} job(s) failed:")
    for num, description in failures:
        log.error(f"  job {num}: {description}")
    # a sweeper that decides its jobs as it goes (Optuna, adaptive seeds) and was stopped has jobs to
    # come that have no run yet: its sweep is not finished, however many of its runs are
    cut_short = not session.planned and (stop is not None or interrupt.requested() is not None)
    if len(finished) == len(expected) and not failures and not cut_short:
        client.set_terminated(parent_id, "FINISHED")
        return 0
    of_expected = f"{len(finished)} of {len(expected)} configs" if session.planned else f"{len(finished)} configs"
    if failed or not interrupted:
        missing = len(expected) - len(finished)
        reason = f"{missing} of {len(expected)} configs did not finish" if missing else f"stopped with {of_expected} finished"
        reason += f" ({describe(stop)})" if stop else ""
        client.set_tag(parent_id, ERROR_TAG, f"{reason}; rerun failed and missing ones with resume=true")
        client.set_terminated(parent_id, "FAILED")
        log.error(f"sweep {session.name}: {reason}; rerun the failed and missing ones with: {resume_command()}")
        return 1
    reason = f"interrupted with {of_expected} finished"
    client.set_tag(parent_id, ERROR_TAG, f"{reason}; resume=true continues it")
    client.set_terminated(parent_id, "KILLED")
    log.warning(f"sweep {session.name} {reason}; continue it with: {resume_command()}")
    return 130


def planned_jobs(config: DictConfig) -> int | None:
    """How many jobs the sweep will run, where known: the grid's size, or Optuna's n_trials."""
    if config.hydra.sweeper._target_ == BASIC_SWEEPER:
        return len(grid(config))
    return config.hydra.sweeper.get("n_trials")


def swept_values(config: DictConfig) -> dict[str, str]:
    """The sweep's axes and their values, e.g. {"norm": "none,batchnorm"}: the parent run's params."""
    return {o.key_or_group: o.input_line.split("=", 1)[1] for o in sweep_overrides(config) if o.is_sweep_override()}


def record_outcome(session: SweepSession, finished: list[Run], configs: int, failed: int) -> None:
    """The parent run's own metrics (best and mean test accuracy of the finished configs, how many
    finished and how many failed) and its description (mlflow.note.content: the command and what won)."""
    client, parent_id = session.client, session.parent_id
    test_acc = metric_key("test_acc")
    scored = sorted((run for run in finished if test_acc in run.data.metrics), key=lambda r: r.data.metrics[test_acc])
    metrics = {"jobs_finished": len(finished), "jobs_failed": failed}
    lines = [f"Sweep `{shlex.join(launch_command())}`", ""]
    if scored:
        accuracies = [run.data.metrics[test_acc] for run in scored]
        metrics |= {"best_test_acc": accuracies[-1], "mean_test_acc": sum(accuracies) / len(accuracies)}
        best = scored[-1]
        lines.append(f"Best: **{best.info.run_name}**, test accuracy {accuracies[-1]:.4f} (run {best.info.run_id}); "
                     f"mean over {len(scored)} finished configs {metrics['mean_test_acc']:.4f}.")  # fmt: skip
    lines.append(f"{len(finished)} of {configs} configs finished, {failed} failed.")
    client.log_batch(parent_id, metrics=[Metric(k, float(v), int(time.time() * 1000), 0) for k, v in metrics.items()])
    client.set_tag(parent_id, NOTE_TAG, redacted("\n".join(lines)))


def no_idle_workers(config: DictConfig, jobs: int) -> None:
    """A joblib launcher starts no more workers than the sweep has jobs: a worker that never ran
    a job has no signal handler, so the terminal's Ctrl-C would kill it, and loky would then
    break the pool and kill the workers that are stopping their jobs safely."""
    launcher = config.hydra.launcher
    workers = launcher.get("n_jobs")
    if isinstance(workers, int) and (workers < 1 or workers > jobs):
        with read_write(config.hydra), open_dict(config.hydra):
            launcher.n_jobs = min(jobs, os.cpu_count() or 1) if workers < 1 else jobs


def start_figure_workers(config: DictConfig) -> None:
    """Start the figure workers of a launcher that runs the jobs in this process (mlpsweep.rendering:
    a worker per core for the packed launcher, for half the cores for the basic one) as the sweep
    opens its parent run, so that they are ready by the first figure."""
    launcher = config.hydra.launcher
    every_core = launcher._target_ == PACKED_LAUNCHER and launcher.backend == Backend.local
    if every_core or launcher._target_ == BASIC_LAUNCHER:
        try:
            rendering.start_workers(every_core)
        except OSError as err:  # only sooner than the first figure, which tries again (or draws in place)
            log.warning(f"figure workers not started ahead: {describe(err)}")


class MlflowSweepCallback(Callback):
    """Opens the sweep's parent run before its jobs (after checking all of them) and closes it
    after them. The exit status is `close_sweep`'s, applied by the entry point (cli.main), so it
    holds even where Hydra turns an exception inside a callback into a warning."""

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        _started.append(True)
        interrupt.install(launcher=True)
        try:
            problems, expected = preflight(config)
            if interrupt.requested():  # Ctrl-C during the checks: nothing was started, nothing is tracked
                raise SystemExit(130)
            if not problems:
                start_figure_workers(config)
                configure_store_access(config.tracking)
                session = open_sweep(config, expected)
                _session.append(session)
                session.progress = SweepProgress(session.client, session.parent_id, planned_jobs(config)).start()
                if expected:
                    no_idle_workers(config, len(expected))
        except INPUT_ERRORS as err:
            problems = [str(err)]
        except Exception as err:  # e.g. the store: Hydra would only warn, and run the jobs without a parent
            uri = resolve_tracking_uri(config.tracking.uri)
            log.error(f"the sweep could not start ({describe(err)}); tracking store: {uri}")
            raise SystemExit(1) from None
        if problems:
            for problem in problems:
                log.error(problem)
            log.error(f"{len(problems)} problem(s) with the input; nothing was trained or tracked")
            raise SystemExit(2)

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        close_sweep()
