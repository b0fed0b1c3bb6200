"""Shared fixtures: tiny IDX datasets written by the tests, and the real composed config."""

from __future__ import annotations

import os
import socket
import struct
import subprocess
import sys
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
        "tracking.log_model=false",
    ]
    return overrides + ([f"tracking.uri={sqlite_uri(store_dir)}"] if store_dir else [])


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


@contextmanager
def mlflow_server(store_dir: Path) -> Iterator[str]:
    """A real `mlflow server` on a free loopback port over store_dir/mlflow.db; yields its URI."""
    store_dir.mkdir(parents=True, exist_ok=True)
    port = free_port()
    command = [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", sqlite_uri(store_dir),
               "--artifacts-destination", str(store_dir / "artifacts"), "--host", "127.0.0.1", "--port", str(port)]  # fmt: skip
    server = subprocess.Popen(command, cwd=store_dir, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    uri = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 180
        while not _answers(uri):
            if time.monotonic() > deadline or server.poll() is not None:
                pytest.fail("mlflow server did not come up")
            time.sleep(0.5)
        yield uri
    finally:
        server.terminate()
        server.wait(timeout=30)


def _answers(uri: str) -> bool:
    try:
        return requests.get(f"{uri}/health", timeout=2).ok
    except requests.RequestException:
        return False
