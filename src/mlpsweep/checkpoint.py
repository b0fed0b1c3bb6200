"""Config hashes and epoch checkpoints: what `resume=true` needs to skip or continue a job.

A checkpoint holds everything the next epoch depends on (model, optimizer, the batch-order
generator and the global RNGs) plus the history so far and the config itself, so a job killed
mid-run continues exactly where its last finished epoch left it.
"""

from __future__ import annotations

import hashlib
import json
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn

from mlpsweep.engine import EpochMetrics

# keys that cannot change what a run computes: where things go, how it is shown, threads, resume itself
NOT_HASHED = ("tracking", "resume", "data.root", "data.download", "trainer.progress_bar", "trainer.num_threads",
              "trainer.checkpoint_dir")  # fmt: skip


def config_hash(cfg: DictConfig) -> str:
    """A short hash of the resolved config without the NOT_HASHED keys."""
    container = OmegaConf.to_container(cfg, resolve=True)
    assert isinstance(container, dict)
    for dotted in NOT_HASHED:
        *parents, last = dotted.split(".")
        node = container
        for key in parents:
            node = node.get(key, {})
        node.pop(last, None)
    return hashlib.sha256(json.dumps(container, sort_keys=True).encode()).hexdigest()[:16]


def checkpoint_path(checkpoint_dir: Path, cfg_hash: str) -> Path:
    return checkpoint_dir / f"{cfg_hash}.pt"


def save_checkpoint(
    path: Path,
    cfg: DictConfig,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    generator: torch.Generator,
    history: list[EpochMetrics],
) -> None:
    """Write the state after the last epoch of `history`, atomically (a kill never leaves half a file)."""
    state: dict[str, Any] = {
        "config": OmegaConf.to_yaml(cfg, resolve=True),
        "history": [vars(m) for m in history],
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "generator": generator.get_state(),
        "torch_rng": torch.get_rng_state(),
        "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None,
        "numpy_rng": np.random.get_state(),
        "python_rng": random.getstate(),
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(".partial")
    torch.save(state, partial)
    partial.replace(path)


def load_checkpoint(
    path: Path, model: nn.Module, optimizer: torch.optim.Optimizer, generator: torch.Generator
) -> list[EpochMetrics]:
    """Restore a checkpoint's state into the given objects; return its history."""
    state = torch.load(path, map_location="cpu", weights_only=False)
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    generator.set_state(state["generator"])
    torch.set_rng_state(state["torch_rng"])
    if state["cuda_rng"] is not None:
        torch.cuda.set_rng_state_all(state["cuda_rng"])
    np.random.set_state(state["numpy_rng"])
    random.setstate(state["python_rng"])
    return [EpochMetrics(**m) for m in state["history"]]
