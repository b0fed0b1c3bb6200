"""Everything checked before training starts: in each job, and for a whole sweep in its launcher.

Each failure is one line that names the key, the value and what is allowed (ConfigError), or
where the data was looked for and how to point MNIST_ROOT at a copy (DataError).
"""

from __future__ import annotations

import requests
import torch
from omegaconf import DictConfig

from mlpsweep.config import ConfigError, validate_config
from mlpsweep.data import DataError, check_data_files
from mlpsweep.engine import resolve_device
from mlpsweep.tracking import resolve_tracking_uri

INPUT_ERRORS = (ConfigError, DataError)


def check_tracking_server(tracking_uri: str) -> None:
    """An http(s) store must answer MLflow's health check within a few seconds."""
    if not tracking_uri.startswith(("http://", "https://")):
        return
    try:
        requests.get(f"{tracking_uri.rstrip('/')}/health", timeout=5).raise_for_status()
    except requests.RequestException as err:
        raise ConfigError(
            f"tracking.uri={tracking_uri!r} (or $MLFLOW_TRACKING_URI): no MLflow server answers there "
            f"({type(err).__name__}); start one with `mlflow server`, or use a sqlite:/// store"
        ) from None


def check_job_inputs(cfg: DictConfig) -> torch.device:
    """Check the config values, the device and the data files; return the device."""
    validate_config(cfg)
    device = resolve_device(cfg.trainer.device)
    check_data_files(cfg.data)
    return device


def check_inputs(cfg: DictConfig) -> torch.device:
    """Check everything a job needs, the tracking store included; return the device."""
    device = check_job_inputs(cfg)
    check_tracking_server(resolve_tracking_uri(cfg.tracking.uri))
    return device
