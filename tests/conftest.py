"""Shared fixtures: tiny IDX datasets written by the tests, and the real composed config."""

from __future__ import annotations

import glob
import os
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
import requests
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig

from mlpsweep.config import CONFIG_DIR

REPO_ROOT = CONFIG_DIR.parent
TINY_TRAIN, TINY_TEST, TINY_VAL = 640, 200, 100


def write_idx_images(path: Path, images: np.ndarray) -> None:
    n, rows, cols = images.shape
    path.write_bytes(struct.pack(">IIII", 0x00000803, n, rows, cols) + images.astype(np.uint8).tobytes())


def write_idx_labels(path: Path, labels: np.ndarray) -> None:
    path.write_bytes(struct.pack(">II", 0x00000801, len(labels)) + labels.astype(np.uint8).tobytes())


def tiny_images(labels: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Noisy 28x28 images whose class is a bright horizontal bar at row 4 + 2 * label.

    Pixels (0, 0) and (0, 1) hold the image's index (high and low byte), so tests can tell
    which source image ended up in which split.
    """
    images = rng.integers(0, 60, size=(len(labels), 28, 28))
    for i, label in enumerate(labels):
        images[i, 4 + 2 * label, 3:25] = 255
        images[i, 0, 0], images[i, 0, 1] = divmod(i, 256)
    return images


def write_tiny_mnist(root: Path, folder: str = "MNIST", seed: int = 0) -> Path:
    """Write a learnable MNIST-format dataset (TINY_TRAIN + TINY_TEST images) under root/folder/raw."""
    rng = np.random.default_rng(seed)
    raw = root / folder / "raw"
    raw.mkdir(parents=True)
    for prefix, n in (("train", TINY_TRAIN), ("t10k", TINY_TEST)):
        labels = rng.integers(0, 10, size=n)
        write_idx_images(raw / f"{prefix}-images-idx3-ubyte", tiny_images(labels, rng))
        write_idx_labels(raw / f"{prefix}-labels-idx1-ubyte", labels)
    return root


@pytest.fixture(autouse=True)
def one_torch_thread() -> Iterator[None]:
    """Tests train tiny batches in process, two test processes at a time (pytest-xdist): one torch
    thread each, as two threads per process on two cores wait on each other."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def tiny_mnist_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_mnist(tmp_path_factory.mktemp("tiny_mnist"))


def tiny_overrides(data_root: Path, store_dir: Path | None = None) -> list[str]:
    """Overrides that shrink a run to the tiny dataset and two quick epochs.

    With store_dir, the MLflow store is store_dir/mlflow.db; without, the default applies.
    """
    overrides = [
        f"data.root={data_root}",
        "data.download=false",
        f"data.val_size={TINY_VAL}",
        "trainer.max_epochs=2",
        "trainer.progress_bar=false",
        "trainer.device=cpu",
        "trainer.num_threads=1",  # tiny batches; two test processes share the cores
        "tracking.log_model=false",
    ]
    return overrides + ([f"tracking.uri={sqlite_uri(store_dir)}"] if store_dir else [])


# A real 16-job sweep, shared by the report's and the browser's end-to-end tests (which run on one
# xdist worker: they carry @pytest.mark.xdist_group(REAL_SWEEP_GROUP), and pytest runs --dist loadgroup)
REAL_SWEEP_GROUP = "real_sweep"
REAL_SWEEP = [
    "activation=sigmoid,relu", "norm=none,batchnorm", "seed=0,1", "optimizer.lr=0.1,1e30",
    "depth.widths=[64,32]", "tracking.sweep_name=real-sweep",
]  # fmt: skip


@pytest.fixture(scope="session")
def real_sweep(tiny_mnist_root: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, subprocess.CompletedProcess]:
    """The folder of a finished real sweep (its mlflow.db inside) and how train.py ended: sigmoid/relu x
    none/batchnorm x seed 0, 1 x lr 0.1 and 1e30 (whose jobs diverge and fail)."""
    folder = tmp_path_factory.mktemp("real_sweep")
    overrides = [*tiny_overrides(tiny_mnist_root, folder), *REAL_SWEEP, f"hydra.sweep.dir={folder / 'multirun'}"]
    command = [sys.executable, str(REPO_ROOT / "train.py"), "--multirun", *overrides]
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    return folder, subprocess.run(command, cwd=folder, env=env, capture_output=True, text=True, timeout=600)


def sqlite_uri(store_dir: Path) -> str:
    return f"sqlite:///{store_dir / 'mlflow.db'}"


def compose_config(overrides: list[str] = ()) -> DictConfig:
    """The real composed config (conf/train.yaml) with `overrides`, as `python train.py` builds it."""
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        return compose(config_name="train", overrides=list(overrides))


@pytest.fixture
def tiny_cfg(tiny_mnist_root: Path, tmp_path: Path) -> Callable[..., DictConfig]:
    """compose(*overrides) on top of the tiny-data overrides, with the store in tmp_path."""

    def compose_tiny(*overrides: str) -> DictConfig:
        checkpoints = f"trainer.checkpoint_dir={tmp_path / 'checkpoints'}"
        return compose_config(tiny_overrides(tiny_mnist_root, tmp_path) + [checkpoints, *overrides])

    return compose_tiny


@pytest.fixture(scope="session")
def real_mnist_root() -> Path:
    """MNIST_ROOT when it holds MNIST; skipped when absent, except in CI, where it fails."""
    root = Path(os.environ.get("MNIST_ROOT", "data"))
    if (root / "MNIST" / "raw" / "train-images-idx3-ubyte").is_file():
        return root
    if os.environ.get("CI"):
        pytest.fail(f"CI must have real MNIST: set MNIST_ROOT to the folder containing MNIST/raw/ (looked in {root})")
    pytest.skip(f"no MNIST under {root.resolve()} (set MNIST_ROOT)")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class MlflowServer:
    """A real `mlflow server` on one loopback port, which can be stopped (or killed) and started again
    on the same port: over `backend_store_uri` (default store_dir/mlflow.db), with its artifacts in
    `artifacts_dir` (default store_dir/artifacts). Its log is store_dir/server.log."""

    def __init__(
        self, store_dir: Path, backend_store_uri: str | None = None, artifacts_dir: Path | None = None
    ) -> None:
        self.store_dir = store_dir
        self.backend_store_uri = backend_store_uri or sqlite_uri(store_dir)
        self.artifacts_dir = artifacts_dir or store_dir / "artifacts"
        self.port = free_port()
        self.uri = f"http://127.0.0.1:{self.port}"
        self._process: subprocess.Popen | None = None

    def start(self, timeout: float = 180) -> str:
        """Start the server (its own process group: the server and its workers) and wait until it answers."""
        assert self._process is None, "already started"
        self.store_dir.mkdir(parents=True, exist_ok=True)
        command = [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", self.backend_store_uri,
                   "--artifacts-destination", str(self.artifacts_dir), "--host", "127.0.0.1", "--port", str(self.port)]  # fmt: skip
        # tracking only: without the runner of MLflow's GenAI jobs (half a dozen huey processes per server)
        env = os.environ | {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
        with open(self.store_dir / "server.log", "ab") as log:
            self._process = subprocess.Popen(
                command, cwd=self.store_dir, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
            )
        deadline = time.monotonic() + timeout
        while not _answers(self.uri):
            if time.monotonic() > deadline or self._process.poll() is not None:
                self.stop()
                pytest.fail(f"mlflow server did not come up on {self.uri}; see {self.store_dir / 'server.log'}")
            time.sleep(0.5)
        return self.uri

    def stop(self, sig: signal.Signals = signal.SIGTERM) -> None:
        """Send `sig` to the server's process group (SIGKILL: an outage) and wait until none of it is left."""
        if self._process is None:
            return
        process, self._process = self._process, None
        _signal_group(process.pid, sig)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            _signal_group(process.pid, signal.SIGKILL)
            process.wait(timeout=30)
        _signal_group(process.pid, signal.SIGKILL)  # workers the server left behind would hold the port

    def kill(self) -> None:
        self.stop(signal.SIGKILL)

    def __enter__(self) -> MlflowServer:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()


def _signal_group(pgid: int, sig: signal.Signals) -> None:
    try:
        os.killpg(pgid, sig)
    except ProcessLookupError:
        pass


@contextmanager
def mlflow_server(
    store_dir: Path, backend_store_uri: str | None = None, artifacts_dir: Path | None = None
) -> Iterator[str]:
    """A real `mlflow server` on a free loopback port over store_dir/mlflow.db (or `backend_store_uri`);
    yields its URI. MlflowServer when a test needs to stop and restart it."""
    with MlflowServer(store_dir, backend_store_uri, artifacts_dir) as server:
        yield server.uri


def _answers(uri: str) -> bool:
    try:
        return requests.get(f"{uri}/health", timeout=2).ok
    except requests.RequestException:
        return False


def postgres_bin_dir() -> Path | None:
    """The folder holding PostgreSQL's initdb and pg_ctl: from PATH, else Debian's
    /usr/lib/postgresql/<version>/bin (not on PATH there), the newest version first."""

    def version(bin_dir: Path) -> tuple[int, ...]:
        return tuple(int(part) for part in bin_dir.parent.name.split(".") if part.isdigit())

    on_path = shutil.which("pg_ctl")
    debian = sorted((Path(p) for p in glob.glob("/usr/lib/postgresql/*/bin")), key=version, reverse=True)
    candidates = ([Path(on_path).resolve().parent] if on_path else []) + debian
    return next((d for d in candidates if (d / "pg_ctl").is_file() and (d / "initdb").is_file()), None)


@pytest.fixture(scope="session")
def postgres_uri() -> Iterator[str]:
    """A PostgreSQL cluster of its own (temporary folder, free loopback port) with a database and a
    password user for MLflow; yields postgresql://mlflow:secret@127.0.0.1:PORT/mlflow and stops the
    cluster at the end. PostgreSQL refuses to run as root: as root the server runs as the `postgres`
    user, which owns the folder. Skipped when PostgreSQL or its Python drivers are absent, except in CI,
    where it fails."""
    bin_dir = postgres_bin_dir()
    missing = "PostgreSQL (initdb, pg_ctl)" if bin_dir is None else None
    try:
        import psycopg2
        from sqlalchemy.engine import make_url

        make_url("postgresql://").get_dialect().import_dbapi()  # the driver `mlflow server` uses for postgresql://
    except ImportError as err:
        missing = missing or f"the PostgreSQL driver {err.name} (pip install -e '.[dev]')"
    if missing:
        if os.environ.get("CI"):
            pytest.fail(f"CI must have {missing}: .ci/run installs it")
        pytest.skip(f"{missing} not found (apt-get install postgresql; pip install -e '.[dev]')")
    as_user: list[str] = []
    folder = Path(tempfile.mkdtemp(prefix="mlpsweep-pg-"))  # under /tmp: pytest's own tmp folders are 0700 root's
    if os.geteuid() == 0:
        as_user = ["runuser", "-u", "postgres", "--"]
        shutil.chown(folder, "postgres", "postgres")
    data, port = folder / "data", free_port()

    def run(*command: str) -> None:
        result = subprocess.run([*as_user, *command], cwd=folder, capture_output=True, text=True, timeout=120)
        if result.returncode != 0:
            pytest.fail(f"{' '.join(command)} failed ({result.returncode}): {result.stdout}{result.stderr}")

    run(str(bin_dir / "initdb"), "-D", str(data), "-U", "postgres", "-E", "UTF8", "--no-locale", "--no-sync",
        "--auth-local=trust", "--auth-host=scram-sha-256")  # fmt: skip
    options = f"-k {folder} -p {port} -c listen_addresses=127.0.0.1 -c fsync=off -c synchronous_commit=off"
    run(str(bin_dir / "pg_ctl"), "-D", str(data), "-l", str(folder / "postgres.log"), "-o", options, "-w", "start")
    try:
        admin = psycopg2.connect(host=str(folder), port=port, user="postgres", dbname="postgres")  # the socket, trusted
        admin.autocommit = True
        with admin.cursor() as cursor:
            cursor.execute("CREATE ROLE mlflow LOGIN PASSWORD 'secret'")
            cursor.execute("CREATE DATABASE mlflow OWNER mlflow")
        admin.close()
        yield f"postgresql://mlflow:secret@127.0.0.1:{port}/mlflow"
    finally:
        try:
            run(str(bin_dir / "pg_ctl"), "-D", str(data), "-m", "fast", "-w", "stop")
        finally:
            shutil.rmtree(folder, ignore_errors=True)
