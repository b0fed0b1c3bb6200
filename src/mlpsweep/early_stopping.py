"""Early stopping (`trainer.early_stopping`): stop a run whose monitored validation metric has
stopped improving, and optionally test the weights of its best epoch.

The decision is a pure function of the run's history, so a resumed run decides exactly as an
uninterrupted one; only the best epoch's weights (`BestWeights`) are state, kept in checkpoints.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from omegaconf import DictConfig
from torch import nn

from mlpsweep.config import MONITORS

if TYPE_CHECKING:
    from mlpsweep.engine import EpochMetrics


@dataclass(frozen=True)
class EarlyStopping:
    """Stop after `patience` epochs without an improvement of more than `min_delta` in `monitor`
    (val_loss: lower is better; val_acc: higher). Off when `patience` is None."""

    monitor: str = "val_loss"
    patience: int | None = None
    min_delta: float = 0.0
    restore_best: bool = True

    @classmethod
    def from_config(cls, cfg: DictConfig) -> EarlyStopping:
        """From the `trainer.early_stopping` node."""
        return cls(cfg.monitor, cfg.patience, cfg.min_delta, cfg.restore_best)

    @property
    def enabled(self) -> bool:
        return self.patience is not None

    def _improves(self, value: float, best: float) -> bool:
        if MONITORS[self.monitor] == "min":
            return value < best - self.min_delta
        return value > best + self.min_delta

    def best_epoch(self, history: Sequence[EpochMetrics]) -> int:
        """The epoch of the last improvement: the first epoch, then every epoch that beat the best
        so far by more than `min_delta` (0 for an empty history)."""
        best: EpochMetrics | None = None
        for metrics in history:
            if best is None or self._improves(getattr(metrics, self.monitor), getattr(best, self.monitor)):
                best = metrics
        return best.epoch if best is not None else 0

    def should_stop(self, history: Sequence[EpochMetrics]) -> bool:
        """Whether `patience` epochs have passed since the best epoch."""
        return self.enabled and bool(history) and history[-1].epoch - self.best_epoch(history) >= self.patience

    def reason(self, history: Sequence[EpochMetrics]) -> str:
        """Why training stopped after the last epoch of `history`, in one sentence."""
        return (
            f"early stopping after epoch {history[-1].epoch}: {self.monitor} has not improved by more than "
            f"{self.min_delta:g} for {self.patience} epochs (best: epoch {self.best_epoch(history)})"
        )


class BestWeights:
    """The model's weights at the best epoch so far (a copy on the model's device)."""

    def __init__(self, stopping: EarlyStopping) -> None:
        self.stopping = stopping
        self.state: dict[str, torch.Tensor] | None = None

    def update(self, history: Sequence[EpochMetrics], model: nn.Module) -> None:
        """Keep a copy of the weights if the last epoch of `history` is the best one."""
        if self.stopping.best_epoch(history) == history[-1].epoch:
            self.state = {key: value.detach().clone() for key, value in model.state_dict().items()}

    def restore(self, model: nn.Module) -> None:
        if self.state is not None:
            model.load_state_dict(self.state)
