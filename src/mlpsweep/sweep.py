"""The lifecycle of a multirun, in its launching process (a Hydra callback).

Before any job starts: every job's config is composed and checked (bad input stops the sweep
with one line per bad job, before anything is written to the store); then the store, the
experiment and the parent run are created once, so parallel jobs never race to create or
migrate a fresh SQLite store. After the jobs: the parent run is closed, FAILED if any job
failed, and the failures are listed.
"""

from __future__ import annotations

import atexit
import logging
import os
from datetime import datetime
from pathlib import Path
from typing import Any

from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
from hydra.core.global_hydra import GlobalHydra
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.errors import HydraException
from hydra.experimental.callback import Callback
from hydra.types import RunMode
from mlflow.entities import RunStatus
from mlflow.tracking import MlflowClient
from omegaconf import DictConfig, open_dict
from omegaconf.errors import OmegaConfBaseException

from mlpsweep.checks import INPUT_ERRORS, check_job_inputs, check_tracking_server
from mlpsweep.tracking import (
    ERROR_TAG,
    FAILED_JOB_TAG_PREFIX,
    OVERRIDES_TAG,
    PARENT_RUN_ENV,
    ROLE_TAG,
    prepare_store,
    resolve_tracking_uri,
)

log = logging.getLogger(__name__)
BASIC_SWEEPER = f"{BasicSweeper.__module__}.{BasicSweeper.__name__}"


def job_overrides(config: DictConfig) -> list[list[str]] | None:
    """The override list of every job, as the basic sweeper will expand them (None for other
    sweepers, e.g. Optuna, whose jobs are only known as the study runs)."""
    if config.hydra.sweeper._target_ != BASIC_SWEEPER:
        return None
    params = [f"{key}={value}" for key, value in (config.hydra.sweeper.get("params") or {}).items()]
    parser = OverridesParser.create(config_loader=GlobalHydra.instance().config_loader())
    overrides = parser.parse_overrides(params + list(config.hydra.overrides.task))
    return BasicSweeper.split_arguments(overrides, None)[0]


def preflight(config: DictConfig) -> list[str]:
    """Compose and check every job of the sweep; one line per job that would fail on its input."""
    jobs = job_overrides(config)
    if jobs is None:
        return []
    try:
        check_tracking_server(resolve_tracking_uri(config.tracking.uri))  # once for the sweep
    except INPUT_ERRORS as err:
        return [str(err)]
    loader = GlobalHydra.instance().config_loader()
    problems = []
    nvml_check = os.environ.get("PYTORCH_NVML_BASED_CUDA_CHECK")
    os.environ["PYTORCH_NVML_BASED_CUDA_CHECK"] = "1"  # ask NVML about GPUs: no CUDA in the launcher
    try:
        for num, overrides in enumerate(jobs):
            try:
                cfg = loader.load_configuration(config.hydra.job.config_name, overrides, run_mode=RunMode.RUN)
                with open_dict(cfg):
                    del cfg["hydra"]
                check_job_inputs(cfg)
            except (*INPUT_ERRORS, HydraException, OmegaConfBaseException) as err:
                message = " ".join(str(err).split("Config search path")[0].split())  # one line, no search path
                problems.append(f"job {num} [{' '.join(overrides)}]: {message}")
    finally:
        if nvml_check is None:
            os.environ.pop("PYTORCH_NVML_BASED_CUDA_CHECK")
        else:
            os.environ["PYTORCH_NVML_BASED_CUDA_CHECK"] = nvml_check
    return problems


class MlflowSweepCallback(Callback):
    """Creates the parent run of a multirun before its jobs, and closes it after them.

    The parent ends FINISHED when every child finished, else FAILED; the failed children are
    listed with their overrides and errors, and the process exits with status 1.
    """

    def __init__(self) -> None:
        self._client: MlflowClient | None = None
        self._parent_id: str | None = None

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        problems = preflight(config)
        if problems:
            for problem in problems:
                log.error(problem)
            log.error(f"{len(problems)} job(s) have bad input; nothing was trained or tracked")
            raise SystemExit(2)
        self._client, experiment_id = prepare_store(resolve_tracking_uri(config.tracking.uri), config.tracking.experiment)
        name = config.tracking.sweep_name or datetime.now().strftime("sweep-%Y-%m-%d_%H-%M-%S")
        tags = {
            ROLE_TAG: "sweep",
            OVERRIDES_TAG: " ".join(config.hydra.overrides.task),
            "mlpsweep.sweep_dir": str(Path(config.hydra.sweep.dir).resolve()),
        }
        parent = self._client.create_run(experiment_id, run_name=name, tags=tags)
        self._parent_id = parent.info.run_id
        os.environ[PARENT_RUN_ENV] = self._parent_id
        atexit.register(self._close_if_open)
        log.info(f"MLflow: sweep {name} is parent run {self._parent_id} in {self._client.tracking_uri}")

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        assert self._client is not None and self._parent_id is not None
        parent = self._client.get_run(self._parent_id)
        children = self._client.search_runs(
            [parent.info.experiment_id],
            filter_string=f"tags.mlflow.parentRunId = '{self._parent_id}'",
            max_results=50000,
        )
        finished = sum(run.info.status == "FINISHED" for run in children)
        failures = sorted(
            (int(key.removeprefix(FAILED_JOB_TAG_PREFIX)), value)
            for key, value in parent.data.tags.items()
            if key.startswith(FAILED_JOB_TAG_PREFIX)
        )
        unfinished = [run.info.run_name for run in children if run.info.status != "FINISHED"]
        log.info(f"MLflow: {finished} of {len(children)} tracked jobs finished; sweep run {self._parent_id}")
        self._close(RunStatus.FAILED if failures or unfinished else RunStatus.FINISHED)
        if failures:
            log.error(f"{len(failures)} job(s) failed:")
            for num, description in failures:
                log.error(f"  job {num}: {description}")
        if unfinished:
            log.error(f"runs that did not finish: {', '.join(unfinished)}")
        if failures or unfinished:
            raise SystemExit(1)

    def _close(self, status: int) -> None:
        assert self._client is not None and self._parent_id is not None
        self._client.set_terminated(self._parent_id, RunStatus.to_string(status))
        os.environ.pop(PARENT_RUN_ENV, None)
        self._parent_id = None

    def _close_if_open(self) -> None:
        """At exit: a sweep that stopped before on_multirun_end (e.g. a config error) ends FAILED."""
        if self._parent_id is not None:
            assert self._client is not None
            self._client.set_tag(self._parent_id, ERROR_TAG, "the sweep stopped before all of its jobs ran")
            self._close(RunStatus.FAILED)
