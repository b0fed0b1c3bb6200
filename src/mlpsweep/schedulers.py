"""Learning-rate schedules: the `scheduler` group, built on torch.optim.lr_scheduler.

`step`, `cosine` (with an optional linear warm-up) and `plateau` change the rate once per epoch,
after validation (plateau on the monitored validation metric); `onecycle` after every training
step. The schedulers write each new rate into the optimizer's parameter groups, in place when the
rate is a tensor (as a CUDA graph step keeps it), so every training step reads the current rate.
"""

from __future__ import annotations

from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from torch.optim import lr_scheduler

from mlpsweep.config import MONITORS

# scheduler.name -> whether it is stepped after every training step (else after every epoch)
SCHEDULERS = {"none": False, "step": False, "cosine": False, "onecycle": True, "plateau": False}


class Schedule:
    """The learning-rate schedule of one run: `after_step` after each training step, `after_epoch`
    after each validation; its state goes into the run's checkpoints."""

    def __init__(
        self,
        scheduler: lr_scheduler.LRScheduler | lr_scheduler.ReduceLROnPlateau | None,
        per_step: bool,
        monitor: str | None = None,
    ):
        self.scheduler = scheduler
        self.per_step = per_step
        self.monitor = monitor

    def after_step(self) -> None:
        self.scheduler.step()

    def after_epoch(self, validation: dict[str, float]) -> None:
        if isinstance(self.scheduler, lr_scheduler.ReduceLROnPlateau):
            self.scheduler.step(validation[self.monitor])
        elif self.scheduler is not None and not self.per_step:
            self.scheduler.step()

    def state_dict(self) -> dict[str, Any] | None:
        return self.scheduler.state_dict() if self.scheduler is not None else None

    def load_state_dict(self, state: dict[str, Any] | None) -> None:
        if self.scheduler is not None and state is not None:
            self.scheduler.load_state_dict(state)


def current_lr(optimizer: torch.optim.Optimizer) -> float:
    """The learning rate of the optimizer's first parameter group (a float even where it is a tensor)."""
    return float(optimizer.param_groups[0]["lr"])


def build_schedule(
    cfg: DictConfig, optimizer: torch.optim.Optimizer, max_epochs: int, steps_per_epoch: int
) -> Schedule:
    """The schedule `cfg` (the `scheduler` node) describes, over `max_epochs` epochs of
    `steps_per_epoch` training steps; SCHEDULERS says whether it steps per training step."""
    options = OmegaConf.to_container(cfg, resolve=True)
    assert isinstance(options, dict)
    name = options.pop("name")
    if name not in SCHEDULERS:
        raise ValueError(f"scheduler.name={name!r}: must be one of {', '.join(SCHEDULERS)}")
    scheduler = _torch_scheduler(name, options, optimizer, max_epochs, steps_per_epoch)
    return Schedule(scheduler, per_step=SCHEDULERS[name], monitor=options.get("monitor"))


def _torch_scheduler(
    name: str, options: dict[str, Any], optimizer: torch.optim.Optimizer, max_epochs: int, steps_per_epoch: int
) -> lr_scheduler.LRScheduler | lr_scheduler.ReduceLROnPlateau | None:
    """The torch.optim.lr_scheduler that scheduler `name` with `options` stands for (None: a constant rate)."""
    if name == "step":
        return lr_scheduler.StepLR(optimizer, options["step_size"], options["gamma"])
    if name == "cosine":
        warmup = options["warmup_epochs"]
        cosine = lr_scheduler.CosineAnnealingLR(optimizer, T_max=max_epochs - warmup, eta_min=options["min_lr"])
        if warmup == 0:
            return cosine
        ramp = lr_scheduler.LinearLR(optimizer, start_factor=options["warmup_start_factor"], total_iters=warmup)
        return lr_scheduler.SequentialLR(optimizer, [ramp, cosine], milestones=[warmup])
    if name == "onecycle":
        return lr_scheduler.OneCycleLR(
            optimizer,
            max_lr=options["max_lr"],
            total_steps=max_epochs * steps_per_epoch,
            pct_start=options["pct_start"],
            anneal_strategy=options["anneal_strategy"],
            div_factor=options["div_factor"],
            final_div_factor=options["final_div_factor"],
            cycle_momentum=False,  # plain SGD has none, and a CUDA graph step reads only the rate
        )
    if name == "plateau":
        return lr_scheduler.ReduceLROnPlateau(
            optimizer,
            mode=MONITORS[options["monitor"]],
            factor=options["factor"],
            patience=options["patience"],
            threshold=options["threshold"],
            min_lr=options["min_lr"],
        )
    return None
