"""Everything checked before training starts: in each job, and for a whole sweep in its launcher.

Each failure is one line that names the key, the value and what is allowed (ConfigError), or
where the data was looked for and how to point MNIST_ROOT at a copy (DataError). The checks that
write nothing come first; the data files last, since a missing dataset may be downloaded.
"""

from __future__ import annotations

import copy
import os
import re
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch
from hydra.experimental.callback import Callback
from mlflow.environment_variables import MLFLOW_ALLOW_FILE_STORE
from mlflow.tracking import MlflowClient
from omegaconf import DictConfig, open_dict

from mlpsweep.config import ConfigError, launch_dir, problem, require, validate_config
from mlpsweep.data import DataError, check_data_files
from mlpsweep.engine import resolve_device
from mlpsweep.tracking import (
    redacted,
    refuse_deleted,
    resolve_tracking_uri,
    sqlite_store_missing,
    store_lock,
    unanswered,
)

INPUT_ERRORS = (ConfigError, DataError)

# the stores MLflow tracks to: SQLAlchemy databases (sqlite needs sqlite:///path), a server, a folder, Databricks
TRACKING_SCHEMES = re.compile(r"sqlite|https?|file|databricks|(postgresql|mysql|mssql)(\+\w+)?")
TRACKING_URIS = "a sqlite:///, http(s)://, postgresql:// or mysql:// URI"


def uri_scheme(uri: str) -> str:
    """The scheme of a tracking URI, lower case: '' for a plain path, 'databricks' for `databricks`."""
    if uri == "databricks":
        return uri
    found = re.match(r"([A-Za-z][A-Za-z0-9+.-]*):", uri)
    return found.group(1).lower() if found else ""


def check_tracking_uri(uri: str, key: str = "tracking.uri") -> None:
    """MLflow can use a store at `uri` (`key` says where it was set): a known scheme or a plain path."""
    scheme = uri_scheme(uri)
    known = scheme == "" or TRACKING_SCHEMES.fullmatch(scheme) is not None
    require(known and (scheme != "sqlite" or uri.startswith("sqlite:///")), key, redacted(uri), TRACKING_URIS)
    if scheme in ("", "file"):
        try:
            allowed = MLFLOW_ALLOW_FILE_STORE.get()
        except ValueError as err:  # e.g. MLFLOW_ALLOW_FILE_STORE=yes
            raise ConfigError(f"$MLFLOW_ALLOW_FILE_STORE: {err}") from None
        file_store = f"{TRACKING_URIS} (a folder, file: or a plain path, is a store MLflow 3 refuses unless " \
            "MLFLOW_ALLOW_FILE_STORE=true; `mlflow migrate-filestore` moves one into sqlite:///mlflow.db)"  # fmt: skip
        require(allowed, key, redacted(uri), file_store)


def check_tracking_server(tracking_uri: str) -> None:
    """An http(s) store must answer MLflow's health check within a few seconds, a database server
    (PostgreSQL, MySQL) a connection to its port."""
    if cause := unanswered(tracking_uri):
        http = uri_scheme(tracking_uri).startswith("http")
        server, start = ("MLflow server", "start one with `mlflow server`") if http else ("database server", "start it")
        raise ConfigError(
            f"tracking.uri={redacted(tracking_uri)!r} (or $MLFLOW_TRACKING_URI): no {server} answers there "
            f"({cause}); {start}, or use a sqlite:/// store"
        )


def check_experiment(tracking_uri: str, experiment: str) -> None:
    """The experiment is not one deleted in an existing store (a sweep finds out as it opens)."""
    if sqlite_store_missing(tracking_uri):
        return  # a new store: the experiment is made with it
    with store_lock(tracking_uri):
        refuse_deleted(MlflowClient(tracking_uri).get_experiment_by_name(experiment))


def check_writable_folder(folder: Path, key: str, value: str) -> None:
    """`folder` is one this process can write in, or can create: a folder can be made in its
    nearest existing ancestor (tried, and removed at once: permissions alone do not tell, e.g. in
    /proc or on a read-only mount, for root)."""
    existing = next(path for path in [folder, *folder.parents] if path.exists())
    try:
        os.rmdir(tempfile.mkdtemp(prefix=".mlpsweep-check-", dir=existing))
    except OSError as err:
        why = f"{existing} is not a folder" if not existing.is_dir() else f"{existing}: {err.strerror}"
        raise ConfigError(problem(key, value, f"a folder that can be created and written in ({why})")) from None


def check_settings(cfg: DictConfig) -> torch.device:
    """The checks that leave nothing behind: the config values, the tracking URI, the checkpoint
    folder (a folder made in it and removed at once) and the device; return the device."""
    validate_config(cfg)
    uri_key = "tracking.uri" if cfg.tracking.uri else "$MLFLOW_TRACKING_URI"
    check_tracking_uri(resolve_tracking_uri(cfg.tracking.uri), uri_key)
    folder = cfg.trainer.checkpoint_dir
    check_writable_folder(launch_dir() / folder, "trainer.checkpoint_dir", folder)
    return resolve_device(cfg.trainer.device)


def check_data(cfg: DictConfig) -> None:
    """The data files (downloaded when missing and allowed), and a batch size they can fill."""
    train_size = check_data_files(cfg.data)
    batch = cfg.trainer.batch_size
    require(batch <= train_size, "trainer.batch_size", batch, f"at most the number of training images ({train_size})")


def check_job_inputs(cfg: DictConfig) -> torch.device:
    """Check the settings, then the data; return the device."""
    device = check_settings(cfg)
    check_data(cfg)
    return device


def check_inputs(cfg: DictConfig) -> torch.device:
    """Check everything a job needs, the tracking server included (before any download); return the device."""
    device = check_settings(cfg)
    check_tracking_server(resolve_tracking_uri(cfg.tracking.uri))
    check_data(cfg)
    return device


class CheckInputsCallback(Callback):
    """Checks a single run's input before Hydra creates its output folder (outputs/...), so that
    bad input ends the command with one line per problem and exit status 2, having written nothing.
    (A multirun checks every job before it starts, in sweep.MlflowSweepCallback.)"""

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        cfg = copy.deepcopy(config)
        with open_dict(cfg):
            del cfg["hydra"]
        try:
            check_inputs(cfg)
            check_experiment(resolve_tracking_uri(cfg.tracking.uri), cfg.tracking.experiment)
        except INPUT_ERRORS as err:
            print(err, file=sys.stderr)
            raise SystemExit(2) from None
