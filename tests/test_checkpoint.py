"""Checkpoints restore a job exactly, load nothing but tensors and plain data, and refuse any file that
is not this job's or not whole, leaving the job untouched; dataset digests follow the IDX files' bytes."""

from __future__ import annotations

import contextlib
import pickle
import random
import shutil
from collections.abc import Callable
from dataclasses import asdict, fields, replace
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from omegaconf import DictConfig, OmegaConf
from torch import nn

from mlpsweep.checkpoint import (
    CheckpointError,
    CheckpointIdentity,
    Resumed,
    checkpoint_path,
    config_hash,
    load_checkpoint,
    save_checkpoint,
)
from mlpsweep.data import dataset_digest
from mlpsweep.engine import EpochMetrics, build_optimizer, seed_everything
from mlpsweep.model import build_model

HISTORY = [EpochMetrics(1, 2.0, 0.3, 1.9, 0.35, 0.5), EpochMetrics(2, 1.5, 0.5, 1.4, 0.55, 0.4)]


class Job(NamedTuple):
    model: nn.Module
    optimizer: torch.optim.Optimizer
    generator: torch.Generator


def trained_job(cfg: DictConfig, seed: int) -> Job:
    """A job a few steps into training, with the global RNGs seeded by `seed` and each holding a cached
    Gaussian (NumPy and Python draw them in pairs), so that restoring those caches matters."""
    seed_everything(seed)
    model = build_model(cfg, 784, 10)
    job = Job(model, build_optimizer(cfg.optimizer, model.parameters()), torch.Generator().manual_seed(seed))
    train_steps(job)
    np.random.standard_normal()
    random.gauss(0.0, 1.0)
    return job


def train_steps(job: Job, steps: int = 3) -> None:
    """Optimizer steps on random batches drawn from the job's generator (this fills momentum and Adam's moments)."""
    job.model.train()
    for _ in range(steps):
        x = torch.randn(8, 784, generator=job.generator)
        y = torch.randint(0, 10, (8,), generator=job.generator)
        job.optimizer.zero_grad()
        F.cross_entropy(job.model(x), y).backward()
        job.optimizer.step()


def continuation(job: Job) -> list[bytes]:
    """The next draws of every RNG a checkpoint restores, then the job's weights and optimizer state after
    more training, as bytes (equal only when bit for bit equal)."""
    draws = [
        torch.rand(4).numpy(),
        np.random.standard_normal(3),  # the first of them is the cached Gaussian
        np.random.randint(0, 2**31, size=3),
        np.array([random.gauss(0.0, 1.0), random.random()]),  # likewise
    ]
    train_steps(job)
    return [a.tobytes() for a in draws] + fingerprint(job)


def fingerprint(job: Job) -> list[bytes]:
    """Everything a refused load must leave as it was, as bytes."""
    optimizer_tensors = [v for state in job.optimizer.state.values() for v in state.values() if torch.is_tensor(v)]
    tensors = [*job.model.state_dict().values(), *optimizer_tensors, job.generator.get_state(), torch.get_rng_state()]
    _, numpy_keys, *numpy_rest = np.random.get_state()
    rest = repr((numpy_rest, random.getstate())).encode()
    return [t.numpy().tobytes() for t in tensors] + [numpy_keys.tobytes(), rest]


@pytest.fixture
def cfg(tiny_cfg: Callable[..., DictConfig]) -> DictConfig:
    return tiny_cfg("depth.widths=[32,16]", "norm=batchnorm", "optimizer=sgd_momentum")


@pytest.fixture
def identity(cfg: DictConfig) -> CheckpointIdentity:
    data_digest = dataset_digest(cfg.data.name, cfg.data.root)
    return CheckpointIdentity(cfg.tracking.uri, cfg.tracking.experiment, config_hash(cfg), data_digest, "parent-run")


@pytest.mark.parametrize("optimizer", ["sgd_momentum", "adam"])
def test_a_loaded_checkpoint_continues_bit_for_bit(
    tiny_cfg: Callable[..., DictConfig], tmp_path: Path, optimizer: str
) -> None:
    cfg = tiny_cfg("depth.widths=[32,16]", "norm=batchnorm", f"optimizer={optimizer}")
    identity = CheckpointIdentity("sqlite:///mlflow.db", "mlpsweep", config_hash(cfg), "0123abcd")
    path = checkpoint_path(tmp_path / "checkpoints", identity)
    original = trained_job(cfg, seed=0)
    assert np.random.get_state()[3] == 1 and random.getstate()[2] is not None  # Gaussians are cached
    save_checkpoint(path, identity, "run-0", cfg, *original, HISTORY)
    expected = continuation(original)

    restored = trained_job(cfg, seed=1)
    assert continuation(trained_job(cfg, seed=1)) != expected  # so the comparison below can fail
    assert load_checkpoint(path, identity, *restored) == Resumed("run-0", HISTORY)
    assert continuation(restored) == expected
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # written atomically: no partial file left


def test_the_file_holds_plain_data_only(cfg: DictConfig, identity: CheckpointIdentity, tmp_path: Path) -> None:
    path = checkpoint_path(tmp_path, identity)
    save_checkpoint(path, identity, "run-0", cfg, *trained_job(cfg, seed=0), HISTORY)
    state = torch.load(path, weights_only=True)
    assert state["identity"] == {"tracking_uri": cfg.tracking.uri, "experiment": "mlpsweep",
                                 "config_hash": config_hash(cfg), "data_digest": identity.data_digest,
                                 "sweep": "parent-run"}  # fmt: skip
    assert state["run_id"] == "run-0" and state["config"] == OmegaConf.to_yaml(cfg, resolve=True)


def test_each_identity_has_its_own_file(identity: CheckpointIdentity, tmp_path: Path) -> None:
    others = [replace(identity, **{f.name: "other"}) for f in fields(identity)]
    paths = {checkpoint_path(tmp_path, i) for i in [identity, *others]}
    assert len(paths) == len(fields(identity)) + 1 and checkpoint_path(tmp_path, replace(identity)) in paths  # an equal identity: its file
    assert all(p.parent == tmp_path and p.suffix == ".pt" for p in paths)


class Payload:
    """Unpickling this creates `marker` (what a planted file could do with any callable)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return open, (str(self.marker), "w")


@pytest.mark.parametrize("dump", [torch.save, lambda obj, path: path.write_bytes(pickle.dumps(obj, protocol=2))])
def test_a_planted_pickle_is_refused_without_running_it(
    cfg: DictConfig, identity: CheckpointIdentity, tmp_path: Path, dump: Callable[[Any, Path], None]
) -> None:
    path, marker = checkpoint_path(tmp_path, identity), tmp_path / "marker"
    dump({"identity": asdict(identity), "model": Payload(marker)}, path)
    job = trained_job(cfg, seed=0)
    before = fingerprint(job)
    with pytest.raises(CheckpointError, match="cannot be loaded safely"):
        load_checkpoint(path, identity, *job)
    assert not marker.exists()
    assert fingerprint(job) == before

    with contextlib.suppress(Exception):
        torch.load(path, weights_only=False)  # the unsafe load this replaced
    assert marker.exists()  # so the file really is malicious


REMOVED = object()


def setting(*keys: str | int, value: Any) -> Callable[[Path], None]:
    """A defect: the entry at `keys` of the (safely loaded) file set to `value`, or REMOVED."""

    def apply(path: Path) -> None:
        state = torch.load(path, weights_only=True)
        *parents, last = keys
        node = state
        for key in parents:
            node = node[key]
        if value is REMOVED:
            del node[last]
        else:
            node[last] = value
        torch.save(state, path)

    return apply


def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


DEFECTS: dict[str, tuple[Callable[[Path], None], str]] = {  # how the file is spoiled, what the error says
    "truncated": (truncate, "truncated or corrupt"),
    "empty": (lambda path: path.write_bytes(b""), "truncated or corrupt"),
    "not a dict": (lambda path: torch.save([1, 2], path), r"not a checkpoint \(holds a list"),
    "lacks the optimizer": (setting("optimizer", value=REMOVED), r"not a checkpoint \(lacks optimizer\)"),
    "other store": (setting("identity", "tracking_uri", value="sqlite:///other.db"), r"\(tracking_uri differs\)"),
    "other experiment": (setting("identity", "experiment", value="other"), r"\(experiment differs\)"),
    "other config": (setting("identity", "config_hash", value="0" * 16), r"\(config_hash differs\)"),
    "other data": (setting("identity", "data_digest", value="0" * 16), r"\(data_digest differs\)"),
    "no identity": (setting("identity", value=None), "tracking_uri, experiment, config_hash, data_digest, sweep differ"),
    "run id not a string": (setting("run_id", value=7), r"\(TypeError: run_id is int, not str\)"),
    "other history fields": (setting("history", value=[{"epoch": 1}]), "malformed"),
    "other model shapes": (setting("model", "head.weight", value=torch.zeros(10, 8)), "size mismatch for head.weight"),
    "other model keys": (setting("model", "head.bias", value=REMOVED), r'Missing key\(s\) in state_dict: "head.bias"'),
    "other optimizer groups": (setting("optimizer", "param_groups", value=[]), "different number of parameter groups"),
    "other momentum shape": (setting("optimizer", "state", 0, "momentum_buffer", value=torch.zeros(3)), r"is \[3\]"),
    "short numpy state": (setting("rng", "numpy", "keys", value=[1, 2, 3]), "malformed"),
    "bad python state": (setting("rng", "python", "internal", value=[1]), "malformed"),
    "bad generator state": (setting("rng", "generator", value=torch.zeros(3, dtype=torch.uint8)), "malformed"),
    "bad cpu rng state": (setting("rng", "torch_cpu", value="seed"), "malformed"),
}


@pytest.mark.parametrize("defect", DEFECTS)
def test_a_refused_checkpoint_leaves_the_job_untouched(
    cfg: DictConfig, identity: CheckpointIdentity, tmp_path: Path, defect: str
) -> None:
    spoil, message = DEFECTS[defect]
    path = checkpoint_path(tmp_path, identity)
    save_checkpoint(path, identity, "run-0", cfg, *trained_job(cfg, seed=0), HISTORY)
    spoil(path)
    job = trained_job(cfg, seed=1)
    before = fingerprint(job)
    with pytest.raises(CheckpointError, match=message) as refused:
        load_checkpoint(path, identity, *job)
    assert str(refused.value).startswith(f"{path}: ") and "\n" not in str(refused.value)
    assert fingerprint(job) == before


def test_dataset_digest_follows_the_bytes(tiny_mnist_root: Path, tmp_path: Path) -> None:
    shutil.copytree(tiny_mnist_root / "MNIST", tmp_path / "MNIST")
    digest = dataset_digest("mnist", tiny_mnist_root)
    assert dataset_digest("mnist", tmp_path) == digest
    labels = tmp_path / "MNIST" / "raw" / "t10k-labels-idx1-ubyte"
    data = bytearray(labels.read_bytes())
    data[-1] ^= 1
    labels.write_bytes(bytes(data))
    assert dataset_digest("mnist", tmp_path) != digest
    assert len(digest) == 16 and int(digest, 16) >= 0
