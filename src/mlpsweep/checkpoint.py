"""Config hashes and epoch checkpoints: what `resume=true` needs to skip or continue a job.

A checkpoint holds everything the next epoch depends on (model, optimizer, learning-rate
schedule, the batch-order generator and the global RNGs, the best epoch's weights where early
stopping restores them), the history so far, the MLflow run to continue and the config
(as YAML, for people to read), so a job killed mid-run continues exactly where its last
finished epoch left it.

A checkpoint is a file anyone with access to the launch directory can replace, so it holds only
tensors and plain data and is read with `weights_only=True`: loading one never runs code. It
belongs to one CheckpointIdentity (store, experiment, config, dataset), whose key names the file
and whose fields are stored inside and compared on load. Everything in the file is tried on
copies before anything is restored, so a file that fails any check raises CheckpointError and
leaves the model, optimizer, generator and RNGs as they were.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import pickle
import random
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn

from mlpsweep.engine import EpochMetrics
from mlpsweep.schedulers import Schedule

# keys that cannot change what a run computes: where things go, how it is shown, threads, resume itself
NOT_HASHED = ("tracking", "resume", "data.root", "data.download", "trainer.progress_bar", "trainer.num_threads",
              "trainer.checkpoint_dir")  # fmt: skip
KEYS = ("identity", "run_id", "config", "history", "model", "optimizer", "rng")


class CheckpointError(ValueError):
    """A checkpoint file that cannot be used: unsafe to load, truncated or corrupt, or another job's."""


@dataclass(frozen=True)
class CheckpointIdentity:
    """What a checkpoint belongs to: the MLflow store and experiment, the config, the dataset and
    the sweep (two sweeps that share a config never share a checkpoint)."""

    tracking_uri: str
    experiment: str
    config_hash: str
    data_digest: str
    sweep: str = ""  # the sweep's parent run id; "" for a single run

    def key(self) -> str:
        """A short hex key: the sha256 of the fields (names the file)."""
        return identity_key(self)


@dataclass(frozen=True)
class Resumed:
    """What a loaded checkpoint hands back: the MLflow run to continue and the epochs done so far."""

    run_id: str
    history: list[EpochMetrics]
    best_model: dict[str, torch.Tensor] | None = None  # the best epoch's weights, where they were kept


@dataclass(frozen=True)
class _RngStates:
    """The RNG states of a checkpoint, in the types their setters take."""

    generator: torch.Tensor
    torch_cpu: torch.Tensor
    torch_cuda: list[torch.Tensor] | None
    numpy: tuple[str, np.ndarray, int, int, float]
    python: tuple[int, tuple[int, ...], float | None]


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


def identity_key(identity: Any) -> str:
    """A short hex key of a checkpoint's identity (a dataclass): the sha256 of its fields."""
    return hashlib.sha256(json.dumps(asdict(identity), sort_keys=True).encode()).hexdigest()[:16]


def check_identity(path: Path, stored: Any, identity: Any, what: str) -> None:
    """CheckpointError naming the fields of `identity` (a dataclass) that the file's `stored` ones
    (a dict, else all differ) differ from; `what` says what the file is not a checkpoint of."""
    stored = stored if isinstance(stored, dict) else {}
    differing = [f.name for f in fields(identity) if stored.get(f.name) != getattr(identity, f.name)]
    if differing:
        verb = "differs" if len(differing) == 1 else "differ"
        raise CheckpointError(f"{path}: not a checkpoint of this {what} ({', '.join(differing)} {verb})")


def write_state(path: Path, state: dict[str, Any]) -> None:
    """Save a checkpoint's state at `path` atomically (a kill never leaves half a file)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f"{path.stem}.{os.getpid()}.partial")  # one writer per file
    torch.save(state, partial)
    partial.replace(path)


def checkpoint_path(checkpoint_dir: Path, identity: CheckpointIdentity) -> Path:
    """Where `identity`'s checkpoint lives in `checkpoint_dir`."""
    return checkpoint_dir / f"{identity.key()}.pt"


def save_checkpoint(
    path: Path,
    identity: CheckpointIdentity,
    run_id: str,
    cfg: DictConfig,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    generator: torch.Generator,
    history: list[EpochMetrics],
    schedule: Schedule | None = None,
    best_model: dict[str, torch.Tensor] | None = None,
) -> None:
    """Write the state after the last epoch of `history`, atomically (a kill never leaves half a file)."""
    state: dict[str, Any] = {
        "identity": asdict(identity),
        "run_id": run_id,
        "config": OmegaConf.to_yaml(cfg, resolve=True),
        "history": [asdict(m) for m in history],
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "rng": _rng_states(generator),
        "scheduler": schedule.state_dict() if schedule is not None else None,
        "best_model": best_model,
    }
    write_state(path, state)


def load_checkpoint(
    path: Path,
    identity: CheckpointIdentity,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    generator: torch.Generator,
    schedule: Schedule | None = None,
) -> Resumed:
    """Restore `identity`'s checkpoint at `path` into the given objects and the global RNGs.

    Raises CheckpointError, with everything left untouched, when the file does not load safely,
    is another identity's, or does not fit the model and optimizer.
    """
    state = read_state(path, KEYS)
    check_identity(path, state["identity"], identity, "config/store/data")
    try:  # on copies and scratch RNGs: whatever a malformed (but safely loaded) file makes them raise
        if not isinstance(state["run_id"], str):
            raise TypeError(f"run_id is {type(state['run_id']).__name__}, not str")
        history = [EpochMetrics(**m) for m in state["history"]]
        resumed = Resumed(run_id=state["run_id"], history=history, best_model=state.get("best_model"))
        _check_fits(state, model, optimizer, schedule)
        rng = _decode_rng_states(state["rng"], generator.device)
    except Exception as err:
        raise CheckpointError(f"{path}: malformed, or not for this model and optimizer ({error_reason(err)})") from err
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    if schedule is not None:
        schedule.load_state_dict(state.get("scheduler"))
    _restore_rng_states(rng, generator)
    return resumed


def read_state(path: Path, keys: tuple[str, ...]) -> dict[str, Any]:
    """The checkpoint's top-level dict, with at least `keys`, loaded without running anything the file names."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        raise CheckpointError(f"{path}: cannot be loaded safely ({error_reason(err)})") from err
    except Exception as err:  # a zip, EOF or OS error: a truncated or otherwise corrupt file
        raise CheckpointError(f"{path}: truncated or corrupt ({error_reason(err)})") from err
    if not isinstance(state, dict):
        raise CheckpointError(f"{path}: not a checkpoint (holds a {type(state).__name__}, not a dict)")
    missing = [key for key in keys if key not in state]
    if missing:
        raise CheckpointError(f"{path}: not a checkpoint (lacks {', '.join(missing)})")
    return state


def error_reason(err: Exception) -> str:
    """`Type: first sentence of the message` in one line; of torch's long weights-only message, the sentence
    naming what it refused."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    refused = [line.removeprefix("WeightsUnpickler error: ") for line in lines if "unsupported" in line.lower()]
    message = (refused[0] if refused else " ".join(lines)).split(". ")[0]
    return f"{type(err).__name__}: {message}" if message else type(err).__name__


def _check_fits(
    state: dict[str, Any], model: nn.Module, optimizer: torch.optim.Optimizer, schedule: Schedule | None
) -> None:
    """Load the checkpoint's states into copies of the model (also its best weights, if any),
    optimizer and schedule (keys and shapes must match), and check that the optimizer's
    per-parameter tensors (momentum, Adam's moments) have their parameter's shape."""
    model_copy, optimizer_copy, schedule_copy = copy.deepcopy((model, optimizer, schedule))
    model_copy.load_state_dict(state["model"])
    if state.get("best_model") is not None:
        model_copy.load_state_dict(state["best_model"])
    optimizer_copy.load_state_dict(state["optimizer"])
    if schedule_copy is not None:
        schedule_copy.load_state_dict(state.get("scheduler"))
    for param, param_state in optimizer_copy.state.items():
        for name, value in param_state.items():
            if isinstance(value, torch.Tensor) and value.ndim > 0 and value.shape != param.shape:
                raise ValueError(f"optimizer {name} is {list(value.shape)}, its parameter {list(param.shape)}")


def _rng_states(generator: torch.Generator) -> dict[str, Any]:
    """The batch-order generator's and the global RNGs' states, as tensors and plain data."""
    algorithm, keys, pos, has_gauss, cached_gaussian = np.random.get_state()
    version, internal, gauss = random.getstate()
    return {
        "generator": generator.get_state(),
        "torch_cpu": torch.get_rng_state(),
        "torch_cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None,
        "numpy": {"algorithm": algorithm, "keys": keys.tolist(), "pos": int(pos), "has_gauss": int(has_gauss),
                  "cached_gaussian": float(cached_gaussian)},  # fmt: skip
        "python": {"version": version, "internal": list(internal), "gauss": gauss},
    }


def _decode_rng_states(rng: dict[str, Any], generator_device: torch.device) -> _RngStates:
    """The states of `_rng_states` back in their setters' types, each tried on a scratch RNG."""
    numpy, python = rng["numpy"], rng["python"]
    keys = np.array(numpy["keys"], dtype=np.uint32)
    states = _RngStates(
        generator=rng["generator"],
        torch_cpu=rng["torch_cpu"],
        torch_cuda=rng["torch_cuda"],
        numpy=(numpy["algorithm"], keys, numpy["pos"], numpy["has_gauss"], numpy["cached_gaussian"]),
        python=(python["version"], tuple(python["internal"]), python["gauss"]),
    )
    torch.Generator(device=generator_device).set_state(states.generator)
    torch.Generator().set_state(states.torch_cpu)
    for index, state in present_cuda_states(states.torch_cuda):
        torch.Generator(device=f"cuda:{index}").set_state(state)
    np.random.RandomState().set_state(states.numpy)
    random.Random().setstate(states.python)
    return states


def present_cuda_states(cuda: list[torch.Tensor] | None) -> list[tuple[int, torch.Tensor]]:
    """(device index, state) for the saved CUDA RNG states whose device is present here."""
    return list(enumerate(cuda or []))[: torch.cuda.device_count()]


def _restore_rng_states(states: _RngStates, generator: torch.Generator) -> None:
    generator.set_state(states.generator)
    torch.set_rng_state(states.torch_cpu)
    for index, state in present_cuda_states(states.torch_cuda):
        torch.cuda.set_rng_state(state, index)
    np.random.set_state(states.numpy)
    random.setstate(states.python)
