"""Bad input: one clear line naming the key, the value and what is allowed, before anything runs."""

from __future__ import annotations

import re
import shutil
import socket
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from conftest import REPO_ROOT, tiny_overrides
from omegaconf import DictConfig

from mlpsweep.checks import INPUT_ERRORS
from mlpsweep.cli import train


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]  # nothing listens there once the socket is closed


def truncated_copy(root: Path, to: Path) -> Path:
    shutil.copytree(root, to)
    images = to / "MNIST" / "raw" / "train-images-idx3-ubyte"
    images.write_bytes(images.read_bytes()[:-100])
    return to


BAD = {
    "dropout.p=1.5": r"dropout\.p=1\.5: must be a probability in \[0, 1\)",
    "depth.widths=[1024,0]": r"depth\.widths=\[1024, 0\]: must be a list of positive integers",
    "depth.widths=[-3]": r"depth\.widths=\[-3\]: must be a list of positive integers",
    "trainer.batch_size=0": r"trainer\.batch_size=0: must be a positive integer",
    "trainer.max_epochs=-1": r"trainer\.max_epochs=-1: must be a positive integer",
    "data.root=/nonexistent": r"data\.root='/nonexistent': point MNIST_ROOT \(or data\.root\) at the folder that contains MNIST/raw/; missing in /nonexistent/MNIST/raw",
}


@pytest.mark.parametrize("override", BAD)
def test_bad_value_fails_before_any_run(override: str, tiny_cfg: Callable[..., DictConfig], tmp_path: Path) -> None:
    with pytest.raises(INPUT_ERRORS, match=BAD[override]):
        train(tiny_cfg(override))
    assert not (tmp_path / "mlflow.db").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error on a machine without CUDA")
def test_cuda_without_cuda(tiny_cfg: Callable[..., DictConfig], tmp_path: Path) -> None:
    with pytest.raises(INPUT_ERRORS, match=r"trainer\.device='cuda': CUDA is not available on this machine"):
        train(tiny_cfg("trainer.device=cuda"))
    assert not (tmp_path / "mlflow.db").exists()


def test_corrupt_data(tiny_mnist_root: Path, tiny_cfg: Callable[..., DictConfig], tmp_path: Path) -> None:
    root = truncated_copy(tiny_mnist_root, tmp_path / "corrupt")
    with pytest.raises(INPUT_ERRORS, match=r"train-images-idx3-ubyte is not a complete IDX file \(corrupt or truncated\)"):
        train(tiny_cfg(f"data.root={root}"))
    assert not (tmp_path / "mlflow.db").exists()


def test_unreachable_tracking_server(tiny_cfg: Callable[..., DictConfig]) -> None:
    uri = f"http://127.0.0.1:{closed_port()}"
    with pytest.raises(INPUT_ERRORS, match=rf"tracking\.uri='{uri}' \(or \$MLFLOW_TRACKING_URI\): no MLflow server answers"):
        train(tiny_cfg(f"tracking.uri={uri}"))


def run_cli(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(REPO_ROOT / "train.py"), *args], cwd=cwd, capture_output=True, text=True, timeout=300)


@pytest.mark.slow
def test_cli_reports_a_bad_value_in_one_line(tiny_mnist_root: Path, tmp_path: Path) -> None:
    result = run_cli([*tiny_overrides(tiny_mnist_root, tmp_path), "dropout.p=1.5"], tmp_path)
    assert result.returncode == 2
    lines = (result.stdout + result.stderr).strip().splitlines()
    assert lines[-1].endswith("dropout.p=1.5: must be a probability in [0, 1)") and "Traceback" not in result.stderr
    assert not (tmp_path / "mlflow.db").exists()


@pytest.mark.slow
def test_cli_sweep_checks_every_job_before_tracking_anything(tiny_mnist_root: Path, tmp_path: Path) -> None:
    overrides = [*tiny_overrides(tiny_mnist_root, tmp_path), "dropout.p=0.1,1.5", "activation=relu,foo", f"hydra.sweep.dir={tmp_path / 'm'}"]
    result = run_cli(["--multirun", *overrides], tmp_path)
    output = result.stdout + result.stderr
    assert result.returncode == 2
    assert "3 job(s) have bad input; nothing was trained or tracked" in output
    assert re.search(r"job 1 \[.* dropout.p=0.1 activation=foo\]: .*Could not find 'activation/foo' Available options in 'activation': elu gelu leaky_relu relu sigmoid silu tanh$", output, re.M)
    assert re.search(r"job 2 \[.* dropout.p=1.5 activation=relu\]: dropout.p=1.5: must be a probability in \[0, 1\)$", output, re.M)
    assert not (tmp_path / "mlflow.db").exists()


@pytest.mark.slow
def test_cli_sweep_against_an_unreachable_server_stops_before_any_job(tiny_mnist_root: Path, tmp_path: Path) -> None:
    uri = f"http://127.0.0.1:{closed_port()}"
    overrides = [*tiny_overrides(tiny_mnist_root), "activation=relu,tanh", f"tracking.uri={uri}", f"hydra.sweep.dir={tmp_path / 'm'}"]
    result = run_cli(["--multirun", *overrides], tmp_path)
    output = result.stdout + result.stderr
    assert result.returncode == 2
    assert output.count(f"tracking.uri='{uri}' (or $MLFLOW_TRACKING_URI): no MLflow server answers") == 1
    assert "Launching" not in output  # no job started
