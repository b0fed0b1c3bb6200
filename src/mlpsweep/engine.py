"""The training engine shared by every run, on CPU or CUDA.

The whole dataset lives on the training device as tensors; each epoch draws a fresh
permutation and slices mini-batches out of it (no Dataset/DataLoader on the hot path).
Losses and correct counts stay on the device during an epoch and are read once at its end,
so a CUDA epoch has no host synchronisation inside it. The step itself is the fastest of
`mlpsweep.steps` that applies (a CUDA graph on a GPU, hand-derived backprop for an MLP trained
by SGD on a CPU, else autograd), all computing the same update.
"""

from __future__ import annotations

import logging
import math
import os
import random
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.nn.functional as F
from omegaconf import DictConfig
from torch import nn
from tqdm import tqdm

from mlpsweep import interrupt
from mlpsweep.config import ConfigError, lookup_option
from mlpsweep.data import DataSplits, Split
from mlpsweep.early_stopping import EarlyStopping
from mlpsweep.schedulers import Schedule, current_lr
from mlpsweep.steps import TrainStep, autocast, train_step

log = logging.getLogger(__name__)

OPTIMIZERS: dict[str, type[torch.optim.Optimizer]] = {
    "sgd": torch.optim.SGD,
    "adam": torch.optim.Adam,
    "adamw": torch.optim.AdamW,
}


# CPU steps between two looks at the loss for NaN/inf
DIVERGENCE_CHECK_EVERY = 50


class DivergenceError(RuntimeError):
    """The training loss became NaN or infinite, or a loss measured with the weights did."""


def loss_divergence(epoch: int | None, **losses: float) -> DivergenceError | None:
    """The error of the first NaN/inf among an epoch's mean `losses` (`epoch` None: the test pass),
    else None. Every step's loss can be finite while the network's outputs have grown huge: the
    epoch's mean overflows, or the evaluation's logits do and its cross-entropy is NaN."""
    for name, value in losses.items():
        if not math.isfinite(value):
            when = "in the test pass" if epoch is None else f"at epoch {epoch}"
            return DivergenceError(f"{name.replace('_', ' ')} diverged to {value} {when}")
    return None


# The MLflow key of each train/validation/test metric, by its name here (EpochMetrics' fields, the
# monitors of early stopping and the plateau scheduler). The run page's Model metrics tab groups
# charts by the part of a key before its last `/` and sorts the groups by name, so "accuracy" and
# "loss" come before the probe's "probe/hidden1", ... Stores written before these keys use the names.
METRIC_NAMES = {
    "train_loss": "loss/train",
    "val_loss": "loss/val",
    "test_loss": "loss/test",
    "train_acc": "accuracy/train",
    "val_acc": "accuracy/val",
    "test_acc": "accuracy/test",
}


def metric_key(name: str) -> str:
    """The MLflow key of a metric given by its name here or its key: val_acc -> accuracy/val,
    accuracy/val -> accuracy/val, lr -> lr."""
    return METRIC_NAMES.get(name, name)


@dataclass(frozen=True)
class EpochMetrics:
    epoch: int
    train_loss: float
    train_acc: float
    val_loss: float
    val_acc: float
    epoch_time_s: float
    lr: float | None = None  # the learning rate the epoch started with (None: not recorded, older checkpoints)

    def metrics(self) -> dict[str, float]:
        """Everything but the epoch number, keyed by MLflow metric key (METRIC_NAMES), validation
        accuracy first: MLflow's compare view plots the first metric a run logged by default."""
        values = asdict(self)
        del values["epoch"]
        order = ["val_acc", *values]
        return {metric_key(name): values[name] for name in dict.fromkeys(order) if values[name] is not None}

    def log_line(self) -> str:
        """The lecture's per-epoch line."""
        return (
            f"Iter: {self.epoch} >> T_loss {self.train_loss:.5f} T_acc {self.train_acc:.5f} "
            f"V_loss {self.val_loss:.5f} V_acc {self.val_acc:.5f} {self.epoch_time_s:.3f}s"
        )


def resolve_device(spec: str) -> torch.device:
    """`auto` -> CUDA when present, else CPU; `cuda`/`cuda:N` only where CUDA is present."""
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(spec)
    except RuntimeError as err:
        raise ConfigError(f"trainer.device={spec!r}: must be auto, cpu, cuda or cuda:N") from err
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"trainer.device={spec!r}: CUDA is not available on this machine; use auto or cpu")
    if device.type not in ("cpu", "cuda"):
        raise ConfigError(f"trainer.device={spec!r}: must be auto, cpu, cuda or cuda:N")
    return device


def device_for_job(device: torch.device, job_num: int, gpu_count: int) -> torch.device:
    """Under a parallel launcher, spread the jobs over the GPUs: job n gets GPU n mod count
    (unless the config named one, e.g. cuda:1)."""
    if device.type != "cuda" or device.index is not None or gpu_count < 2:
        return device
    return torch.device("cuda", job_num % gpu_count)


def cpu_threads(requested: int | None, parallel_jobs: int | None) -> int:
    """Torch CPU threads for one job: as requested, else the cores split between parallel jobs."""
    if requested:
        return requested
    cores = os.cpu_count() or 1
    if parallel_jobs is None or parallel_jobs < 1:  # joblib's n_jobs=-1: one job per core
        parallel_jobs = cores if parallel_jobs is not None else 1
    return max(1, cores // parallel_jobs)


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (all devices)."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def build_optimizer(cfg: DictConfig, params: Iterable[nn.Parameter]) -> torch.optim.Optimizer:
    """The optimizer named by `cfg.name`, with the node's other keys as its arguments.
    Adam/AdamW on a GPU keep their step count on the device (`capturable`), so that their step
    can be captured in a CUDA graph."""
    optimizer_cls, kwargs = lookup_option(OPTIMIZERS, "optimizer", cfg)
    params = list(params)
    if optimizer_cls in (torch.optim.Adam, torch.optim.AdamW) and params and params[0].is_cuda:
        kwargs["capturable"] = True
    return optimizer_cls(params, **kwargs)


def _eval_batches(
    model: nn.Module, split: Split, batch_size: int, precision: str
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """(logits, labels) of `model` in eval mode, batch by batch over a whole split (the callers
    run under inference mode)."""
    model.eval()
    for start in range(0, len(split), batch_size):
        x, y = split.x[start : start + batch_size], split.y[start : start + batch_size]
        with autocast(split.x.device, precision):
            logits = model(x)
        yield logits, y


@torch.inference_mode()
def evaluate(model: nn.Module, split: Split, batch_size: int, precision: str = "fp32") -> tuple[float, float]:
    """Mean cross-entropy and accuracy of `model` in eval mode over a whole split."""
    loss_sum = torch.zeros((), device=split.x.device)
    correct = torch.zeros((), device=split.x.device, dtype=torch.long)
    for logits, y in _eval_batches(model, split, batch_size, precision):
        loss_sum += F.cross_entropy(logits.float(), y, reduction="sum")  # bf16 logits: summed in float32
        correct += (logits.argmax(dim=1) == y).sum()
    return loss_sum.item() / len(split), correct.item() / len(split)


@dataclass(frozen=True)
class Evaluation:
    """A model's mean cross-entropy, accuracy and [true class, predicted class] counts on a split."""

    loss: float
    accuracy: float
    confusion: torch.Tensor  # int64 [classes, classes], on the CPU


@torch.inference_mode()
def evaluate_with_confusion(
    model: nn.Module, split: Split, batch_size: int, num_classes: int, precision: str = "fp32"
) -> Evaluation:
    """`evaluate` and the confusion counts of `model` in eval mode, in one pass over a split."""
    loss_sum = torch.zeros((), device=split.x.device)
    counts = torch.zeros(num_classes * num_classes, device=split.x.device, dtype=torch.long)
    for logits, y in _eval_batches(model, split, batch_size, precision):
        loss_sum += F.cross_entropy(logits.float(), y, reduction="sum")
        counts += torch.bincount(y * num_classes + logits.argmax(dim=1), minlength=num_classes**2)
    confusion = counts.reshape(num_classes, num_classes).cpu()
    return Evaluation(loss_sum.item() / len(split), confusion.diagonal().sum().item() / len(split), confusion)


def train_one_epoch(
    model: nn.Module,
    step: TrainStep,
    split: Split,
    batch_size: int,
    generator: torch.Generator,
    epoch: int = 1,
    progress: tqdm | None = None,
    after_step: Callable[[], None] | None = None,
) -> tuple[torch.Tensor, float]:
    """One pass of `step` over a fresh permutation of `split`, dropping the last partial batch.

    The split is gathered into shuffled order once, so every step takes a contiguous slice,
    and the loop records only what it must (each step's loss and predictions, in place): it
    issues as few kernel launches as it can and, on a GPU, no host synchronisation (the losses
    are checked for NaN/inf at the epoch's end). On the CPU, where a look costs nothing, they are
    checked every DIVERGENCE_CHECK_EVERY steps, so a diverged run stops early. A requested stop
    (`mlpsweep.interrupt`) raises Interrupted before the next step. `after_step` runs after every
    step (a per-step learning-rate schedule).
    Returns the per-step losses (on the device) and the training accuracy.
    """
    model.train()
    steps = len(split) // batch_size
    check_every = DIVERGENCE_CHECK_EVERY if split.x.device.type == "cpu" else steps
    order = torch.randperm(len(split), device=split.x.device, generator=generator)[: steps * batch_size]
    xs, ys = split.x[order], split.y[order]
    predictions = torch.empty_like(ys)
    losses = torch.empty(steps, device=split.x.device)
    for i, start in enumerate(range(0, steps * batch_size, batch_size)):
        interrupt.check()  # SIGINT/SIGTERM: stop between steps (the last epoch's checkpoint stays)
        loss, logits = step(xs[start : start + batch_size], ys[start : start + batch_size])
        losses[i].copy_(loss)
        torch.argmax(logits, dim=1, out=predictions[start : start + batch_size])
        if after_step is not None:
            after_step()
        if progress is not None:
            progress.update()
        done = i + 1
        if done % check_every == 0 or done == steps:
            first = (done - 1) // check_every * check_every
            check_finite(losses[first:done], epoch, first_step=first + 1)
    return losses, (predictions == ys).sum().item() / len(ys)


def check_finite(step_losses: torch.Tensor, epoch: int, first_step: int) -> None:
    """Raise DivergenceError at the first NaN/inf of consecutive step losses starting at `first_step`."""
    bad = (~torch.isfinite(step_losses)).nonzero()
    if len(bad):
        i = int(bad[0])
        raise DivergenceError(f"loss diverged to {step_losses[i].item()} at epoch {epoch}, step {first_step + i}")


def fit_epoch(
    model: nn.Module,
    step: TrainStep,
    data: DataSplits,
    cfg: DictConfig,
    generator: torch.Generator,
    epoch: int,
    lr: float | None = None,
    after_step: Callable[[], None] | None = None,
) -> EpochMetrics:
    """Train one epoch with `step` and validate (`cfg` is the `trainer` node; `lr` the rate the
    epoch starts with, for the record)."""
    show_bar = sys.stderr.isatty() if cfg.progress_bar == "auto" else bool(cfg.progress_bar)
    start = time.perf_counter()
    with tqdm(total=len(data.train) // cfg.batch_size, desc=f"epoch {epoch}", leave=False, disable=not show_bar) as bar:
        step_losses, train_acc = train_one_epoch(
            model, step, data.train, cfg.batch_size, generator, epoch, bar, after_step
        )
    val_loss, val_acc = evaluate(model, data.val, cfg.eval_batch_size, cfg.precision)
    train_loss = step_losses.mean().item()
    if err := loss_divergence(epoch, train_loss=train_loss, val_loss=val_loss):
        raise err
    return EpochMetrics(
        epoch=epoch,
        train_loss=train_loss,
        train_acc=train_acc,
        val_loss=val_loss,
        val_acc=val_acc,
        epoch_time_s=time.perf_counter() - start,
        lr=lr,
    )


def fit(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    data: DataSplits,
    cfg: DictConfig,
    generator: torch.Generator,
    on_epoch_end: Callable[[list[EpochMetrics]], None] | None = None,
    history: Sequence[EpochMetrics] = (),
    schedule: Schedule | None = None,
) -> list[EpochMetrics]:
    """Train up to `cfg.max_epochs` epochs (`cfg` is the `trainer` node), validating after each,
    stepping the learning-rate `schedule` and calling `on_epoch_end` with the history so far; stop
    early where `cfg.early_stopping` says so. A resumed job passes the `history` of the epochs it
    already has (and a schedule restored to that point)."""
    history = list(history)
    stopping = EarlyStopping.from_config(cfg.early_stopping)
    schedule = schedule or Schedule(None, per_step=False)
    kind, step = train_step(model, optimizer, cfg.batch_size, data.num_features, cfg.fast_step, cfg.precision)
    log.info(f"training step: {kind}, precision {cfg.precision}")
    after_step = schedule.after_step if schedule.per_step else None
    while len(history) < cfg.max_epochs and not stopping.should_stop(history):
        epoch = len(history) + 1
        metrics = fit_epoch(model, step, data, cfg, generator, epoch, current_lr(optimizer), after_step)
        history.append(metrics)
        schedule.after_epoch(asdict(metrics))
        if on_epoch_end is not None:
            on_epoch_end(history)
    if stopping.should_stop(history):
        log.info(stopping.reason(history))
    return history
