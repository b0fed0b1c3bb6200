"""Epoch checkpoints of a pack: what `resume=true` needs to continue a pack that was interrupted
while it trained, instead of training it again from its first epoch, or, interrupted while its
jobs logged their runs, to give the jobs left their results (the launcher removes the file once
every job of the pack has run).

A pack's members have no MLflow runs until the pack has trained (each job then logs its member),
so a pack's checkpoint holds, besides the stacked network, its optimizer's tensors and the RNGs,
everything each member's run will log: its history, its probe snapshots, its error. It is plain
data and tensors read with `weights_only=True`, tried on copies before anything is restored, as a
job's own checkpoint is (mlpsweep.checkpoint); it belongs to one PackIdentity (store, experiment,
dataset, sweep, and the config of every member, in the pack's order).
"""

from __future__ import annotations

import copy
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch

from mlpsweep.checkpoint import (
    CheckpointError,
    check_identity,
    error_reason,
    identity_key,
    present_cuda_states,
    read_state,
    write_state,
)
from mlpsweep.engine import DivergenceError, EpochMetrics
from mlpsweep.packed import Member, PackedTrainer
from mlpsweep.probe import LayerSnapshot, Snapshot

KEYS = ("identity", "epoch", "tensors", "rng", "members")


@dataclass(frozen=True)
class PackIdentity:
    """What a pack checkpoint belongs to: the store and experiment, the dataset, the sweep, and the
    config hash of each member in the pack's order (the same jobs packed otherwise are another pack)."""

    tracking_uri: str
    experiment: str
    data_digest: str
    sweep: str
    config_hashes: tuple[str, ...]

    def key(self) -> str:
        """A short hex key: the sha256 of the fields (names the file)."""
        return identity_key(self)


def pack_checkpoint_path(checkpoint_dir: Path, identity: PackIdentity) -> Path:
    """Where `identity`'s checkpoint lives in `checkpoint_dir` (a job's own are `<key>.pt`)."""
    return checkpoint_dir / f"pack-{identity.key()}.pt"


def other_cuts(checkpoint_dir: Path, identity: PackIdentity) -> dict[Path, PackIdentity]:
    """The pack checkpoints in `checkpoint_dir` of `identity`'s store, dataset and sweep that hold
    some of its members in another pack: the sweep cut its packs otherwise before it was resumed
    (another `hydra.launcher.pack_size`, or other free memory choosing it). Files that do not load
    safely are left out."""
    found = {}
    for path in sorted(checkpoint_dir.glob("pack-*.pt")):
        try:  # mmap: the identity without reading the tensors
            stored = torch.load(path, map_location="cpu", weights_only=True, mmap=True)["identity"]
            other = PackIdentity(**{**stored, "config_hashes": tuple(stored["config_hashes"])})
        except Exception:
            continue
        same_sweep = replace(other, config_hashes=()) == replace(identity, config_hashes=())
        if other != identity and same_sweep and set(other.config_hashes) & set(identity.config_hashes):
            found[path] = other
    return found


def _trainer_tensors(trainer: PackedTrainer) -> list[torch.Tensor]:
    """The stacked state a step changes: weights, batch-norm statistics, the optimizer's tensors."""
    return [*trainer.net.params, *trainer.net.buffers, *trainer.optimizer.tensors]


def save_pack_checkpoint(path: Path, identity: PackIdentity, trainer: PackedTrainer, epoch: int) -> None:
    """Write the pack's state after `epoch`, atomically (a kill never leaves half a file)."""
    state = {
        "identity": {**asdict(identity), "config_hashes": list(identity.config_hashes)},
        "epoch": epoch,
        "tensors": [t.detach().cpu() for t in _trainer_tensors(trainer)],
        "rng": {  # dropout's masks come from the global generators
            "torch_cpu": torch.get_rng_state(),
            "torch_cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None,
        },
        "members": [_member_state(member) for member in trainer.members],
    }
    write_state(path, state)


def _member_state(member: Member) -> dict[str, Any]:
    return {
        "generator": member.generator.get_state(),
        "optimizer": member.optimizer.state_dict(),  # its learning rate, as its schedule left it
        "scheduler": member.schedule.state_dict(),
        "history": [asdict(m) for m in member.history],
        "snapshots": [asdict(s) for s in member.snapshots],
        "probe_seconds": member.probe_seconds,
        "done": member.done,
        "error": str(member.error) if member.error is not None else None,
        # a stopped member's weights are its own model's (a diverged one's from before it diverged)
        "model": member.model.state_dict() if member.done else None,
        "best": member.best.state,
    }


def load_pack_checkpoint(path: Path, identity: PackIdentity, trainer: PackedTrainer) -> int:
    """Restore `identity`'s checkpoint at `path` into `trainer` (a pack built afresh, before it
    trains) and the global RNGs; return the last epoch it holds.

    Raises CheckpointError, with everything left untouched, when the file does not load safely, is
    another pack's, or does not fit the pack."""
    state = read_state(path, KEYS)
    stored = state["identity"] if isinstance(state["identity"], dict) else {}
    stored = {**stored, "config_hashes": tuple(stored.get("config_hashes") or ())}  # a list in the file
    check_identity(path, stored, identity, "pack/store/data")
    try:  # on copies: whatever a malformed (but safely loaded) file makes them raise
        epoch, members, rng = _checked(state, trainer)
    except Exception as err:
        raise CheckpointError(f"{path}: malformed, or not for this pack ({error_reason(err)})") from err
    with torch.no_grad():
        for tensor, saved in zip(_trainer_tensors(trainer), state["tensors"], strict=True):
            tensor.copy_(saved)
    for i, (member, saved) in enumerate(zip(trainer.members, members, strict=True)):
        member.generator.set_state(saved.generator)
        member.optimizer.load_state_dict(saved.optimizer)
        member.schedule.load_state_dict(saved.scheduler)
        member.history, member.snapshots, member.probe_seconds = saved.history, saved.snapshots, saved.probe_seconds
        member.done, member.error, member.best.state = saved.done, saved.error, saved.best
        if saved.model is not None:
            member.model.load_state_dict(saved.model)
        else:
            trainer.net.copy_to(i, member.model)
    torch.set_rng_state(rng["torch_cpu"])
    for index, cuda_state in present_cuda_states(rng["torch_cuda"]):
        torch.cuda.set_rng_state(cuda_state, index)
    trainer.restored(epoch)
    return epoch


@dataclass
class _MemberState:
    """A member's state from a checkpoint, in the types it is restored as."""

    generator: torch.Tensor
    optimizer: dict[str, Any]
    scheduler: dict[str, Any] | None
    history: list[EpochMetrics]
    snapshots: list[Snapshot]
    probe_seconds: float
    done: bool
    error: DivergenceError | None
    model: dict[str, torch.Tensor] | None
    best: dict[str, torch.Tensor] | None


def _checked(state: dict[str, Any], trainer: PackedTrainer) -> tuple[int, list[_MemberState], dict[str, Any]]:
    """The checkpoint's last epoch, its members' states and its RNG states, each tried on a copy
    of what it restores (an exception where one does not fit)."""
    epoch = state["epoch"]
    if not isinstance(epoch, int) or not 0 < epoch <= trainer.max_epochs:
        raise ValueError(f"epoch {epoch!r} is not one of 1..{trainer.max_epochs}")
    if len(state["members"]) != len(trainer.members):
        raise ValueError(f"{len(state['members'])} members, the pack has {len(trainer.members)}")
    current = _trainer_tensors(trainer)
    if len(state["tensors"]) != len(current):
        raise ValueError(f"{len(state['tensors'])} stacked tensors, the pack has {len(current)}")
    for saved, tensor in zip(state["tensors"], current, strict=True):
        if not isinstance(saved, torch.Tensor) or saved.shape != tensor.shape or saved.dtype != tensor.dtype:
            raise ValueError(f"a stacked tensor is not {tensor.dtype} {list(tensor.shape)}")
    rng = {"torch_cpu": state["rng"]["torch_cpu"], "torch_cuda": state["rng"]["torch_cuda"]}
    torch.Generator().set_state(rng["torch_cpu"])
    if rng["torch_cuda"] is not None and not isinstance(rng["torch_cuda"], list):
        raise TypeError(f"torch_cuda is {type(rng['torch_cuda']).__name__}, not a list")
    for index, cuda_state in present_cuda_states(rng["torch_cuda"]):
        torch.Generator(device=f"cuda:{index}").set_state(cuda_state)
    members = [_member_checked(m, saved, epoch) for m, saved in zip(trainer.members, state["members"], strict=True)]
    return epoch, members, rng


def _member_checked(member: Member, saved: dict[str, Any], epoch: int) -> _MemberState:
    """A member's saved state in its restored types, tried on copies of the member's own objects."""
    torch.Generator(device=member.generator.device).set_state(saved["generator"])
    model, optimizer, schedule = copy.deepcopy((member.model, member.optimizer, member.schedule))
    optimizer.load_state_dict(saved["optimizer"])
    schedule.load_state_dict(saved["scheduler"])
    for weights in (saved["model"], saved["best"]):
        if weights is not None:
            model.load_state_dict(weights)
    done, error, probe_seconds = saved["done"], saved["error"], saved["probe_seconds"]
    if not isinstance(done, bool) or (error is not None and not isinstance(error, str)):
        raise TypeError("done is not a bool, or error neither None nor a message")
    if done != (saved["model"] is not None):
        raise ValueError("a stopped member without its weights, or a training one with")
    if not _is_number(probe_seconds):
        raise TypeError(f"probe_seconds is {type(probe_seconds).__name__}, not a number")
    history = [EpochMetrics(**m) for m in saved["history"]]
    if not all(_is_number(v) or (k == "lr" and v is None) for m in saved["history"] for k, v in m.items()):
        raise TypeError("an epoch's metric is not a number")
    if not done and len(history) != epoch:
        raise ValueError(f"a training member has {len(history)} epochs, not {epoch}")
    snapshots = [
        Snapshot(s["epoch"], {name: LayerSnapshot(**layer) for name, layer in s["layers"].items()})
        for s in saved["snapshots"]
    ]
    if not all(_is_number(v) for s in snapshots for layer in s.layers.values() for v in layer.stats.values()):
        raise TypeError("a probe statistic is not a number")
    return _MemberState(
        generator=saved["generator"],
        optimizer=saved["optimizer"],
        scheduler=saved["scheduler"],
        history=history,
        snapshots=snapshots,
        probe_seconds=float(probe_seconds),
        done=done,
        error=DivergenceError(error) if error is not None else None,
        model=saved["model"],
        best=saved["best"],
    )


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)
