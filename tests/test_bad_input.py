"""Bad input: one clear line naming the key, the value and what is allowed, before anything runs,
and nothing written anywhere."""

from __future__ import annotations

import gzip
import hashlib
import http.server
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch
from conftest import REPO_ROOT, TINY_TEST, TINY_TRAIN, TINY_VAL, sqlite_uri, tiny_overrides, write_idx_labels
from mlflow.tracking import MlflowClient
from omegaconf import DictConfig
from torchvision import datasets

from mlpsweep import data
from mlpsweep.checks import INPUT_ERRORS, check_experiment, check_inputs, check_tracking_uri
from mlpsweep.cli import train
from mlpsweep.config import ConfigError, check_composition, check_group_overrides
from mlpsweep.data import IDX_FILES, DataError
from mlpsweep.sweep import check_optuna_settings
from mlpsweep.tracking import prepare_store


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
    "trainer.batch_size=541": r"trainer\.batch_size=541: must be at most the number of training images \(540\)",
    "data.limit_train=10": r"trainer\.batch_size=32: must be at most the number of training images \(10\)",
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


def test_a_database_that_does_not_answer_stops_the_run_at_once(tiny_cfg: Callable[..., DictConfig]) -> None:
    """MLflow's own retries wait about five minutes for a database server that is not there; its
    password is not shown."""
    uri = f"postgresql://user:secret@127.0.0.1:{closed_port()}/mlflow"
    with pytest.raises(INPUT_ERRORS) as err:
        train(tiny_cfg(f"tracking.uri={uri}"))
    assert str(err.value) == (
        f"tracking.uri='{uri.replace('secret', '***')}' (or $MLFLOW_TRACKING_URI): no database server answers "
        "there (ConnectionRefusedError); start it, or use a sqlite:/// store"
    )


def test_a_deleted_experiment_is_bad_input(tmp_path: Path) -> None:
    """MLflow refuses every run in a deleted experiment, each with a traceback: one line instead,
    from the single run's check and from the store (a sweep's parent run); a new store is not made."""
    uri = sqlite_uri(tmp_path)
    client = MlflowClient(uri)
    client.delete_experiment(client.create_experiment("gone"))
    deleted = r"tracking.experiment='gone': must be an experiment that is not deleted \(restore it: mlflow experiments"
    with pytest.raises(ConfigError, match=deleted):
        check_experiment(uri, "gone")
    with pytest.raises(ConfigError, match=deleted):
        prepare_store(uri, "gone")
    check_experiment(sqlite_uri(tmp_path / "new"), "gone")
    assert not (tmp_path / "new").exists()


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
    sweep = ["dropout.p=0.1,1.5", "optimizer.lr=0.1,0", f"hydra.sweep.dir={tmp_path / 'm'}"]
    result = run_cli(["--multirun", *tiny_overrides(tiny_mnist_root, tmp_path), *sweep], tmp_path)
    output = result.stdout + result.stderr
    assert result.returncode == 2
    assert "nothing was trained or tracked" in output and "job 0 " not in output
    bad_p, bad_lr = r"dropout.p=1.5: must be a probability in \[0, 1\)", "optimizer.lr=0: must be a positive number"
    assert re.search(rf"job 1 \[.* dropout.p=0.1 optimizer.lr=0\]: {bad_lr}$", output, re.M)
    assert re.search(rf"job 2 \[.* dropout.p=1.5 optimizer.lr=0.1\]: {bad_p}$", output, re.M)
    assert re.search(rf"job 3 \[.*\]: {bad_p} {bad_lr}$", output, re.M)  # a job's problems, in its one line
    assert not (tmp_path / "mlflow.db").exists()


@pytest.mark.slow
def test_cli_sweep_over_where_it_tracks_stops_before_tracking_anything(tiny_mnist_root: Path, tmp_path: Path) -> None:
    """A job tracked into another experiment (or store, or sweep name) than its sweep's would not
    be a child of the sweep's parent run: the sweep would end with none of its configs finished."""
    sweep = ["tracking.experiment=mlpsweep,other", f"hydra.sweep.dir={tmp_path / 'm'}"]
    result = run_cli(["--multirun", *tiny_overrides(tiny_mnist_root, tmp_path), *sweep], tmp_path)
    output = result.stdout + result.stderr
    assert result.returncode == 2, output[-2000:]
    assert "job 0 " not in output and re.search(
        r"job 1 \[.*tracking.experiment=other.*\]: tracking.experiment='other': must be the sweep's own \('mlpsweep'\)", output
    )
    assert not (tmp_path / "mlflow.db").exists() and not (tmp_path / "m").exists()


@pytest.mark.slow
def test_cli_sweep_against_an_unreachable_server_stops_before_any_job(tiny_mnist_root: Path, tmp_path: Path) -> None:
    uri = f"http://127.0.0.1:{closed_port()}"
    overrides = [*tiny_overrides(tiny_mnist_root), "activation=relu,tanh", f"tracking.uri={uri}", f"hydra.sweep.dir={tmp_path / 'm'}"]
    result = run_cli(["--multirun", *overrides], tmp_path)
    output = result.stdout + result.stderr
    assert result.returncode == 2
    assert output.count(f"tracking.uri='{uri}' (or $MLFLOW_TRACKING_URI): no MLflow server answers") == 1
    assert "Launching" not in output  # no job started


# --- every key a user can set: in-process, one line naming the key, the value and what is allowed ---

URI_ALLOWED = "must be a sqlite:///, http(s)://, postgresql:// or mysql:// URI"
BAD_VALUES = {  # overrides (space-separated) -> the whole message (its start, where torch's argument lists follow)
    "activation=leaky_relu activation.negative_slope=-0.1":
        "activation.negative_slope=-0.1: must be a non-negative number",
    "activation=elu activation.alpha=0": "activation.alpha=0: must be a positive number",
    "+activation.alpha=1.0": "activation.alpha=1.0: must be left out: ReLU takes only inplace",
    "activation=sigmoid +activation.inplace=true":
        "activation.inplace=True: must be left out: Sigmoid takes no arguments",
    "activation.name=swish": "activation.name='swish': must be one of sigmoid, tanh, relu, leaky_relu, elu, gelu, silu",
    "norm=batchnorm norm.eps=0": "norm.eps=0: must be a positive number",
    "norm=layernorm norm.eps=-1e-5": "norm.eps=-1e-05: must be a positive number",
    "norm=batchnorm norm.momentum=1.5": "norm.momentum=1.5: must be null or a number in [0, 1]",
    "norm.name=groupnorm": "norm.name='groupnorm': must be one of none, batchnorm, layernorm",
    "dropout.p=1.0": "dropout.p=1.0: must be a probability in [0, 1)",
    "dropout.p=half": "dropout.p='half': must be a probability in [0, 1)",
    "dropout.p=true": "dropout.p=True: must be a probability in [0, 1)",
    "dropout.name=": "dropout.name='': must be a non-empty string",
    "depth.widths=[]": "depth.widths=[]: must be a list of positive integers, at least one",
    "depth.widths=[64,1.5]": "depth.widths=[64, 1.5]: must be a list of positive integers, at least one",
    "depth.widths=[true]": "depth.widths=[True]: must be a list of positive integers, at least one",
    "depth.widths=64": "depth.widths=64: must be a list of positive integers, at least one",
    "depth.name=": "depth.name='': must be a non-empty string",
    "optimizer.lr=-0.1": "optimizer.lr=-0.1: must be a positive number",
    "optimizer.lr=inf": "optimizer.lr=inf: must be a positive number",
    "optimizer.lr=fast": "optimizer.lr='fast': must be a positive number",
    "optimizer.weight_decay=-1": "optimizer.weight_decay=-1: must be a non-negative number",
    "optimizer=sgd_momentum optimizer.momentum=1.0": "optimizer.momentum=1.0: must be a number in [0, 1)",
    "optimizer=sgd_momentum optimizer.nesterov=yes": "optimizer.nesterov='yes': must be true or false",
    "optimizer=sgd_momentum optimizer.nesterov=true optimizer.momentum=0":
        "optimizer.nesterov=True: must be false unless optimizer.momentum > 0 (Nesterov needs momentum)",
    "optimizer=adam optimizer.betas=[0.9]": "optimizer.betas=[0.9]: must be two numbers in [0, 1)",
    "optimizer=adamw optimizer.betas=[0.9,1.0]": "optimizer.betas=[0.9, 1.0]: must be two numbers in [0, 1)",
    "optimizer=adam optimizer.betas=0.9": "optimizer.betas=0.9: must be two numbers in [0, 1)",
    "optimizer.name=rmsprop": "optimizer.name='rmsprop': must be one of sgd, adam, adamw",
    "+optimizer.betas=[0.9,0.99]": "optimizer.betas=[0.9, 0.99]: must be left out: SGD takes only lr, momentum,",
    "data.name=cifar10": "data.name='cifar10': must be one of mnist, fashion_mnist, kmnist",
    "data.root=5": "data.root=5: must be a non-empty string",
    "data.val_size=0": "data.val_size=0: must be a positive integer",
    "data.val_size=1.5": "data.val_size=1.5: must be a positive integer",
    f"data.val_size={TINY_TRAIN}":
        f"data.val_size={TINY_TRAIN}: must be between 1 and {TINY_TRAIN - 1} (the dataset has {TINY_TRAIN} training",
    "data.split_seed=-1": "data.split_seed=-1: must be an integer in [0, 2**32)",
    "data.normalize=1": "data.normalize=1: must be true or false",
    "data.download=yes": "data.download='yes': must be true or false",
    "data.limit_train=0": "data.limit_train=0: must be null or a positive integer",
    f"data.limit_train={TINY_TRAIN}": f"data.limit_train={TINY_TRAIN}: must be null or at most {TINY_TRAIN - TINY_VAL} "
    "(the training images the validation split leaves)",
    "trainer.max_epochs=1.5": "trainer.max_epochs=1.5: must be a positive integer",
    "trainer.max_epochs=true": "trainer.max_epochs=True: must be a positive integer",
    "trainer.batch_size=0": "trainer.batch_size=0: must be a positive integer",
    "trainer.eval_batch_size=-5": "trainer.eval_batch_size=-5: must be a positive integer",
    "trainer.device=tpu": "trainer.device='tpu': must be one of auto, cpu, cuda, cuda:N",
    "trainer.device=cuda:x": "trainer.device='cuda:x': must be one of auto, cpu, cuda, cuda:N",
    "trainer.device=0": "trainer.device=0: must be one of auto, cpu, cuda, cuda:N",
    "trainer.progress_bar=1": "trainer.progress_bar=1: must be one of auto, true, false",
    "trainer.progress_bar=always": "trainer.progress_bar='always': must be one of auto, true, false",
    "trainer.num_threads=0": "trainer.num_threads=0: must be null or a positive integer",
    "trainer.checkpoint_dir=": "trainer.checkpoint_dir='': must be a non-empty string",
    "trainer.fast_step=1": "trainer.fast_step=1: must be true or false",
    "trainer.deterministic=no": "trainer.deterministic='no': must be true or false",
    "trainer.precision=fp16": "trainer.precision='fp16': must be one of fp32, bf16",
    "tracking.uri=5": "tracking.uri=5: must be null or a string",
    "tracking.experiment=": "tracking.experiment='': must be a non-empty string",
    "tracking.sweep_name=": "tracking.sweep_name='': must be null or a non-empty string",
    "tracking.log_model=1": "tracking.log_model=1: must be true or false",
    "tracking.http_timeout_s=2.5": "tracking.http_timeout_s=2.5: must be a positive integer",
    "model.bias=1": "model.bias=1: must be true or false",
    "seed=-1": "seed=-1: must be an integer in [0, 2**32)",
    "seed=4294967296": "seed=4294967296: must be an integer in [0, 2**32)",
    "seed=true": "seed=True: must be an integer in [0, 2**32)",
    "resume=1": "resume=1: must be true or false",
    "probe.enabled=maybe": "probe.enabled='maybe': must be true or false",
    "probe.num_samples=0": "probe.num_samples=0: must be a positive integer",
    "probe.figure_every=-1": "probe.figure_every=-1: must be a positive integer",
    "probe.bins=0": "probe.bins=0: must be a positive integer",
    "probe.saturation_margin=0.5": "probe.saturation_margin=0.5: must be a number in [0, 0.5)",
    "tracking.uri=bogus://x": f"tracking.uri='bogus://x': {URI_ALLOWED}",
    "init.name=lecun": "init.name='lecun': must be one of default, xavier_uniform, xavier_normal, kaiming_uniform,",
    "init=xavier_normal init.bias=ones": "init.bias='ones': must be one of zeros, default",
    "scheduler.name=cyclic": "scheduler.name='cyclic': must be one of none, step, cosine, onecycle, plateau",
    "scheduler=step scheduler.step_size=0": "scheduler.step_size=0: must be a positive integer",
    "scheduler=step scheduler.gamma=-0.5": "scheduler.gamma=-0.5: must be a positive number",
    "scheduler=cosine scheduler.warmup_epochs=2":
        "scheduler.warmup_epochs=2: must be fewer than trainer.max_epochs (2)",
    "scheduler=cosine scheduler.warmup_start_factor=0": "scheduler.warmup_start_factor=0: must be a number in (0, 1]",
    "scheduler=onecycle scheduler.pct_start=1.0": "scheduler.pct_start=1.0: must be a number in (0, 1)",
    "scheduler=onecycle scheduler.anneal_strategy=exp": "scheduler.anneal_strategy='exp': must be one of cos, linear",
    "scheduler=plateau scheduler.monitor=train_loss": "scheduler.monitor='train_loss': must be one of val_loss, val_acc",
    "scheduler=plateau scheduler.factor=1.5": "scheduler.factor=1.5: must be a number in (0, 1)",
    "trainer.early_stopping.patience=0": "trainer.early_stopping.patience=0: must be null (off) or a positive integer",
    "trainer.early_stopping.monitor=test_acc": "trainer.early_stopping.monitor='test_acc': must be one of val_loss, val_acc",
    "trainer.early_stopping.min_delta=-0.1": "trainer.early_stopping.min_delta=-0.1: must be a non-negative number",
    "trainer.early_stopping.restore_best=maybe": "trainer.early_stopping.restore_best='maybe': must be true or false",
    "trainer.checkpoint_dir=/proc/checkpoints":  # /proc takes no folder, not even root's (found after training, before)
        "trainer.checkpoint_dir='/proc/checkpoints': must be a folder that can be created and written in (/proc: ",
    "trainer.checkpoint_dir=/dev/null/checkpoints":
        "trainer.checkpoint_dir='/dev/null/checkpoints': must be a folder that can be created and written in "
        "(/dev/null is not a folder)",
}


@pytest.mark.parametrize("overrides", BAD_VALUES)
def test_every_key_names_key_value_and_what_is_allowed(
    overrides: str, tiny_cfg: Callable[..., DictConfig], tmp_path: Path
) -> None:
    with pytest.raises(INPUT_ERRORS) as err:
        check_inputs(tiny_cfg(*overrides.split()))
    message = str(err.value)
    assert "\n" not in message and message.startswith(BAD_VALUES[overrides])
    assert list(tmp_path.iterdir()) == []  # no store, no checkpoints


def test_every_problem_is_reported_one_line_each(tiny_cfg: Callable[..., DictConfig]) -> None:
    with pytest.raises(ConfigError) as err:
        check_inputs(tiny_cfg("dropout.p=2", "optimizer.lr=0", "seed=-1"))
    assert str(err.value).splitlines() == [
        "dropout.p=2: must be a probability in [0, 1)",
        "optimizer.lr=0: must be a positive number",
        "seed=-1: must be an integer in [0, 2**32)",
    ]


# --- the tracking store's URI --------------------------------------------------------------------

USABLE_URIS = [
    "sqlite:///mlflow.db", "sqlite:////abs/mlflow.db", "http://host:5000", "https://host/mlflow",
    "postgresql://u:p@host/db", "postgresql+psycopg2://u@host/db",
    "mysql://u@host/db", "mysql+pymysql://u@host/db", "mssql+pyodbc://u@host/db", "databricks", "databricks://profile",
]  # fmt: skip
FILE_STORES = ["file:///tmp/mlruns", "file:mlruns", "/tmp/mlruns", "mlruns"]  # MLflow 3 refuses them by default
UNUSABLE_URIS = [
    "bogus://x", "s3://bucket/path", "sqlite://mlflow.db", "sqlite:mlflow.db", "postgres://u@host/db", "ftp://host/x",
    "mysql+://host",
]  # fmt: skip


@pytest.mark.parametrize("uri", USABLE_URIS)
def test_usable_tracking_uris(uri: str) -> None:
    check_tracking_uri(uri)


@pytest.mark.parametrize("uri", FILE_STORES)
def test_a_file_store_is_refused_unless_mlflow_allows_it(uri: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """MLflow 3 raises on a folder store (after the run had started); MLFLOW_ALLOW_FILE_STORE opts in."""
    monkeypatch.delenv("MLFLOW_ALLOW_FILE_STORE", raising=False)
    refused = f"tracking.uri='{uri}': {URI_ALLOWED} (a folder, file: or a plain path, is a store MLflow 3 refuses"
    with pytest.raises(ConfigError, match=re.escape(refused)):
        check_tracking_uri(uri)
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "yes")
    with pytest.raises(ConfigError, match=r"^\$MLFLOW_ALLOW_FILE_STORE: .* but got yes"):
        check_tracking_uri(uri)
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    check_tracking_uri(uri)


@pytest.mark.parametrize("uri", UNUSABLE_URIS)
def test_unusable_tracking_uris(uri: str) -> None:
    with pytest.raises(ConfigError) as err:
        check_tracking_uri(uri)
    assert str(err.value) == f"tracking.uri={uri!r}: {URI_ALLOWED}"


def test_tracking_uri_from_the_environment(
    tiny_cfg: Callable[..., DictConfig], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "bogus://x")
    with pytest.raises(ConfigError) as err:
        check_inputs(tiny_cfg("tracking.uri=null"))
    assert str(err.value) == f"$MLFLOW_TRACKING_URI='bogus://x': {URI_ALLOWED}"


def test_a_bad_uri_stops_before_any_download(tiny_cfg: Callable[..., DictConfig], tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="tracking.uri='bogus://x'"):
        check_inputs(tiny_cfg("tracking.uri=bogus://x", f"data.root={tmp_path / 'new'}", "data.download=true"))
    assert not (tmp_path / "new").exists()


# --- data files: labels, and downloads that leave nothing behind ----------------------------------


def damaged_copy(root: Path, to: Path, labels_file: str, labels: list[int]) -> Path:
    """A copy of the tiny dataset whose `labels_file` holds `labels` (a well-formed IDX file)."""
    shutil.copytree(root, to)
    write_idx_labels(to / "MNIST" / "raw" / labels_file, torch.tensor(labels).numpy())
    return to


def test_a_label_out_of_range(tiny_mnist_root: Path, tiny_cfg: Callable[..., DictConfig], tmp_path: Path) -> None:
    labels = [3] * 5 + [12] + [0] * (TINY_TRAIN - 6)
    root = damaged_copy(tiny_mnist_root, tmp_path / "bad", "train-labels-idx1-ubyte", labels)
    with pytest.raises(DataError) as err:
        check_inputs(tiny_cfg(f"data.root={root}"))
    labels = root / "MNIST" / "raw" / "train-labels-idx1-ubyte"
    assert str(err.value).endswith(f"; {labels} has label 12 at index 5: labels must be in [0, 10)")
    assert not (tmp_path / "mlflow.db").exists()


def test_fewer_labels_than_images(tiny_mnist_root: Path, tiny_cfg: Callable[..., DictConfig], tmp_path: Path) -> None:
    root = damaged_copy(tiny_mnist_root, tmp_path / "bad", "t10k-labels-idx1-ubyte", [1] * (TINY_TEST - 1))
    with pytest.raises(DataError) as err:
        check_inputs(tiny_cfg(f"data.root={root}"))
    labels = root / "MNIST" / "raw" / "t10k-labels-idx1-ubyte"
    found = f"{labels} has {TINY_TEST - 1} labels for the {TINY_TEST} images of t10k-images-idx3-ubyte"
    assert str(err.value).endswith(f"; {found}")


@pytest.fixture
def staging_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Where tempfile makes folders during the test, to see that a download leaves none behind."""
    staging = tmp_path / "tmp"
    staging.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(staging))
    return staging


def download_cfg(tiny_cfg: Callable[..., DictConfig], root: Path) -> DictConfig:
    return tiny_cfg(f"data.root={root}", "data.download=true")


def test_a_failed_download_is_quick_and_leaves_nothing(
    tiny_cfg: Callable[..., DictConfig], tmp_path: Path, staging_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(datasets.MNIST, "mirrors", [f"http://127.0.0.1:{closed_port()}/"])  # connection refused
    root = tmp_path / "new"
    start = time.monotonic()
    with pytest.raises(DataError) as err:
        check_inputs(download_cfg(tiny_cfg, root))
    assert time.monotonic() - start < 5
    message = str(err.value)
    assert message.startswith(f"data.root={str(root)!r}: ") and "\n" not in message
    assert "downloading MNIST failed, nothing was written: RuntimeError: Error downloading train-images" in message
    assert "Connection refused" in message
    assert not root.exists() and list(staging_dir.iterdir()) == []


def test_a_silent_server_times_out(
    tiny_cfg: Callable[..., DictConfig], tmp_path: Path, staging_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with socket.socket() as server:  # accepts connections (the backlog) and never answers
        server.bind(("127.0.0.1", 0))
        server.listen(8)
        monkeypatch.setattr(datasets.MNIST, "mirrors", [f"http://127.0.0.1:{server.getsockname()[1]}/"])
        monkeypatch.setattr(data, "DOWNLOAD_TIMEOUT_S", 1)
        start = time.monotonic()
        with pytest.raises(DataError, match="downloading MNIST failed, nothing was written: TimeoutError"):
            check_inputs(download_cfg(tiny_cfg, tmp_path / "new"))
        assert time.monotonic() - start < 10
    assert socket.getdefaulttimeout() is None
    assert not (tmp_path / "new").exists() and list(staging_dir.iterdir()) == []


@pytest.fixture
def mnist_mirror(tiny_mnist_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """A local HTTP mirror of the tiny dataset as .gz files, and MNIST's mirrors and checksums pointed at it."""
    served = tmp_path / "mirror"
    served.mkdir()
    resources = []
    for name in IDX_FILES:
        packed = gzip.compress((tiny_mnist_root / "MNIST" / "raw" / name).read_bytes())
        (served / f"{name}.gz").write_bytes(packed)
        resources.append((f"{name}.gz", hashlib.md5(packed).hexdigest()))

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def __init__(self, *args: object, **kwargs: object) -> None:
            super().__init__(*args, directory=str(served), **kwargs)

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Quiet)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    monkeypatch.setattr(datasets.MNIST, "mirrors", [f"http://127.0.0.1:{server.server_address[1]}/"])
    monkeypatch.setattr(datasets.MNIST, "resources", resources)
    yield
    server.shutdown()
    server.server_close()


def test_a_download_moves_the_missing_files_only_once_complete(
    mnist_mirror: None, tiny_mnist_root: Path, tiny_cfg: Callable[..., DictConfig], tmp_path: Path, staging_dir: Path
) -> None:
    raw = tmp_path / "new" / "MNIST" / "raw"
    raw.mkdir(parents=True)
    present = raw / "train-images-idx3-ubyte"
    shutil.copyfile(tiny_mnist_root / "MNIST" / "raw" / present.name, present)
    inode = present.stat().st_ino
    check_inputs(download_cfg(tiny_cfg, tmp_path / "new"))
    assert sorted(p.name for p in raw.iterdir()) == sorted(IDX_FILES)  # no archives, no partial files
    assert present.stat().st_ino == inode  # a file that was there is never rewritten
    for name in IDX_FILES:
        assert (raw / name).read_bytes() == (tiny_mnist_root / "MNIST" / "raw" / name).read_bytes()
    assert list(staging_dir.iterdir()) == []


# --- group options on the command line, before Hydra composes anything -----------------------------

ACTIVATIONS = "elu, gelu, leaky_relu, relu, sigmoid, silu, tanh"
DROPOUT_RATE = "dropout is a group of named options (heavy, lecture, none); to set a number, use dropout.p="
GROUP_OVERRIDES = {
    "dropout=0.2": [f"dropout=0.2: {DROPOUT_RATE}0.2"],
    "+dropout=7": [f"dropout=7: {DROPOUT_RATE}7"],
    "dropout=interval(0,0.5)": [f"dropout=interval(0,0.5): {DROPOUT_RATE}interval(0,0.5)"],
    "optimizer=0.01": [
        "optimizer=0.01: optimizer is a group of named options (adam, adamw, sgd, sgd_momentum); "
        "to set a number, use optimizer.lr=0.01 or optimizer.weight_decay=0.01"
    ],
    "activation=foo": [f"activation=foo: must be one of {ACTIVATIONS}"],
    "activation=0.5": [f"activation=0.5: must be one of {ACTIVATIONS}"],
    "activation=relu,foo,tanh,bar": [
        f"activation=foo: must be one of {ACTIVATIONS}",
        f"activation=bar: must be one of {ACTIVATIONS}",
    ],
    "dropout=choice(none,0.5)": [f"dropout=0.5: {DROPOUT_RATE}0.5"],
    "depth=range(1,3)": [f"depth={n}: must be one of deep, four, one, three, two" for n in (1, 2)],
    "init=he": ["init=he: must be one of default, kaiming_normal, kaiming_uniform, orthogonal, xavier_normal, xavier_uniform"],
    "scheduler=cosine,linear": ["scheduler=linear: must be one of cosine, none, onecycle, plateau, step"],
    "norm=true": ["norm=true: must be one of batchnorm, layernorm, none"],
    "norm=null": ["norm=null: must be one of batchnorm, layernorm, none"],
    "~norm": ["~norm: norm cannot be left out; it must be one of batchnorm, layernorm, none"],
    "experiment=lecture": ["experiment=lecture: must be one of lecture/all, lecture/bn_ablation"],
    "lecture=mlp_bn": [
        "lecture=mlp_bn: must be one of dropout, mlp, mlp_dropout, mlp_relu, mlp_relu_batchnorm, mlp_sigmoid, "
        "mlp_sigmoid_batchnorm, mlp_tanh, one_layer"
    ],
}
GOOD_OVERRIDES = [
    "dropout=heavy", "activation=sigmoid,tanh,relu", "activation=choice(relu,elu)", "experiment=lecture/all",
    "lecture=mlp_relu", "lecture=null", "~lecture", "hparams_search=optuna", "hydra/launcher=joblib",
    "hydra/launcher=0.5", "dropout.p=0.2", "dropout.p=0.0,0.1", "dropout=glob(*)", "seed=0,1,2", "depth.widths=[64,32]",
    "dropout.p=[1", "hydra.sweep.dir=/tmp/x",
]  # fmt: skip


@pytest.mark.parametrize("override", GROUP_OVERRIDES)
def test_a_bad_group_option_is_one_line_per_value(override: str) -> None:
    assert check_group_overrides([override]) == GROUP_OVERRIDES[override]


def test_good_group_options_and_other_overrides_pass() -> None:
    assert check_group_overrides(GOOD_OVERRIDES) == []


def test_group_problems_come_in_command_line_order() -> None:
    assert check_group_overrides(["activation=foo", "seed=1", "dropout=0.2"]) == [
        f"activation=foo: must be one of {ACTIVATIONS}",
        f"dropout=0.2: {DROPOUT_RATE}0.2",
    ]


# --- the rest of the command line, composed as Hydra will before any callback runs ---------------

TRAINER_KEYS = "batch_size, checkpoint_dir, deterministic, device, early_stopping, eval_batch_size, fast_step"
COMPOSITION = {  # (overrides, multirun) -> the one line
    ("trainer.max_epoch=3",): "trainer.max_epoch=3: trainer has no key 'max_epoch'; its keys: max_epochs, "
    f"{TRAINER_KEYS}, num_threads, precision, progress_bar (to add a key, use +trainer.max_epoch=3)",
    ("-m", "hydra/launcher=packed", "hydra.launcher.pack_size=abc"):
    "hydra.launcher.pack_size=abc: Value 'abc' of type 'str' could not be converted to Integer; "
    "hydra.launcher.pack_size takes an integer or null",
    ("-m", "hydra/launcher=packed", "hydra.launcher.backend=null"): "hydra.launcher.backend=null: field "
    "'hydra.launcher.backend' is not Optional; hydra.launcher.backend takes local or submitit",
    ("-m", "hydra/launcher=packed", "hydra.launcher.submitit.cluster=pbs"): "hydra.launcher.submitit.cluster=pbs: "
    "Invalid value 'pbs', expected one of [slurm, local]",
    ("-m", "hydra.sweeper.max_batch=2"): "hydra.sweeper.max_batch=2: hydra.sweeper has no key 'max_batch'; its keys: "
    "max_batch_size, _target_, params (to add a key, use +hydra.sweeper.max_batch=2)",
    ("-m", "hydra.launcher.pack_size=1,2"):
    "Sweeping over Hydra's configuration is not supported : 'hydra.launcher.pack_size=1,2'",
    ("dropout.p=[",): "dropout.p=[: no viable alternative at input '['",
    ("hydra/launcher=bogus",): "In 'hydra/config': Could not find 'hydra/launcher/bogus' Available options in "
    "'hydra/launcher': basic joblib packed slurm submitit_local submitit_slurm",
    ("seed=0,1",): "Ambiguous value for argument 'seed=0,1'",
    ("-m", "hydra/launcher=packed", "+hydra.launcher.foo=1"):  # composes, but the launcher cannot be built
    "+hydra.launcher.foo=1: hydra/launcher=packed has no setting 'foo'; its settings: pack_size, backend, submitit",
    ("-m", "+hydra.sweeper.bar=2"):
    "+hydra.sweeper.bar=2: hydra/sweeper=basic has no setting 'bar'; its settings: max_batch_size, params",
}  # fmt: skip


@pytest.mark.parametrize("command", COMPOSITION)
def test_what_hydra_would_stop_at_is_one_line(command: tuple[str, ...]) -> None:
    multirun = command[0] == "-m"
    problems = check_composition(list(command[multirun:]), multirun)
    assert len(problems) == 1 and problems[0].startswith(COMPOSITION[command])


@pytest.mark.parametrize(
    "overrides",
    [["seed=0,1", "activation=relu,tanh", "hydra/launcher=packed", "hydra.launcher.pack_size=4"],
     ["experiment=lecture/all", "seed=0,1"], ["+trainer.new_key=1", "optimizer.lr=0.1,0.2"]],
)  # fmt: skip
def test_what_composes_passes(overrides: list[str]) -> None:
    multirun = "experiment=lecture/all" not in overrides  # the experiment is a sweep without -m (hydra.mode)
    assert check_composition(overrides, multirun) == []


# --- the command line: exit status 2, one line naming the key, nothing written in its directory ---

WRITTEN = {"mlflow.db", "mlruns", "mlartifacts", "multirun", "outputs", "checkpoints"}


def assert_nothing_written(cwd: Path) -> None:
    assert not WRITTEN & {p.name for p in cwd.iterdir()}


@pytest.mark.slow
@pytest.mark.parametrize("multirun", [[], ["--multirun"]], ids=["run", "multirun"])
def test_cli_group_option_given_a_number_or_an_unknown_name(multirun: list[str], tmp_path: Path) -> None:
    result = run_cli([*multirun, "dropout=0.2", "activation=relu,foo" if multirun else "activation=foo"], tmp_path)
    assert result.returncode == 2
    assert (result.stdout + result.stderr).strip().splitlines() == [
        f"dropout=0.2: {DROPOUT_RATE}0.2",
        f"activation=foo: must be one of {ACTIVATIONS}",
    ]
    assert_nothing_written(tmp_path)


@pytest.mark.slow
def test_cli_a_key_hydra_cannot_set_is_bad_input(tmp_path: Path) -> None:
    result = run_cli(["--multirun", "seed=0,1", "trainer.max_epoch=3"], tmp_path)
    assert result.returncode == 2
    assert (result.stdout + result.stderr).strip().splitlines() == [COMPOSITION[("trainer.max_epoch=3",)]]
    assert_nothing_written(tmp_path)


@pytest.mark.slow
def test_cli_single_run_with_bad_values_writes_nothing(tiny_mnist_root: Path, tmp_path: Path) -> None:
    result = run_cli([*tiny_overrides(tiny_mnist_root), "depth.widths=[]", "optimizer.lr=0"], tmp_path)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    lines = (result.stdout + result.stderr).strip().splitlines()
    assert lines[-2:] == [
        "depth.widths=[]: must be a list of positive integers, at least one",
        "optimizer.lr=0: must be a positive number",
    ]
    assert_nothing_written(tmp_path)


@pytest.mark.slow
def test_cli_sweep_with_an_unusable_tracking_uri_writes_nothing(tiny_mnist_root: Path, tmp_path: Path) -> None:
    sweep = ["activation=relu,tanh", "tracking.uri=bogus://x"]
    result = run_cli(["--multirun", *tiny_overrides(tiny_mnist_root), *sweep], tmp_path)
    assert result.returncode == 2
    output = result.stdout + result.stderr
    message = f"tracking.uri='bogus://x': {URI_ALLOWED}"
    assert re.search(rf"job 0 \[.*activation=relu.*\]: {re.escape(message)}$", output, re.M)
    assert re.search(rf"job 1 \[.*activation=tanh.*\]: {re.escape(message)}$", output, re.M)
    assert_nothing_written(tmp_path)


@pytest.mark.parametrize(
    ("search", "lines"),
    [
        (["trainer.batch_size=0"], ["trainer.batch_size=0: must be a positive integer"]),  # the shared config
        (
            ["optimizer.lr=choice(-1,0.1)", "trainer.batch_size=range(0,64,16)"],  # values of the search space
            ["optimizer.lr=-1]: optimizer.lr=-1: must be a positive number",
             "trainer.batch_size=0]: trainer.batch_size=0: must be a positive integer"],
        ),
    ],
)  # fmt: skip
def test_cli_optuna_search_checks_its_config_and_search_space_before_any_trial(
    search: list[str], lines: list[str], tiny_mnist_root: Path, tmp_path: Path
) -> None:
    """Its shared config, and each value of its search space that can be named ahead (choices, a
    range's ends, an interval's lower end): a trial would fail on them."""
    optuna = ["hparams_search=optuna", "hydra.sweeper.n_trials=2"]
    result = run_cli([*tiny_overrides(tiny_mnist_root), *optuna, *search], tmp_path)
    assert result.returncode == 2
    assert all(line in result.stdout + result.stderr for line in lines), result.stdout[-2000:]
    assert_nothing_written(tmp_path)


@pytest.mark.parametrize("settings", [{"n_trials": 0, "n_jobs": 1}, {"n_trials": 5, "n_jobs": -1}, {"n_trials": None}])
def test_an_optuna_study_that_would_run_no_trial_is_bad_input(settings: dict) -> None:
    """n_trials=0 ended in a traceback after the sweep's parent run had opened (FINISHED, no job)."""
    with pytest.raises(ConfigError, match=r"^hydra\.sweeper\.n_(trials|jobs)=.*: must be an integer of at least 1$"):
        check_optuna_settings(DictConfig({"n_jobs": 1, **settings}))
