"""The config of `hydra/sweeper=adaptive_seeds`, registered in Hydra's ConfigStore."""

from dataclasses import dataclass
from typing import Dict, Optional

from hydra.core.config_store import ConfigStore


@dataclass
class AdaptiveSeedsSweeperConf:
    _target_: str = "hydra_plugins.mlpsweep_adaptive_seeds.adaptive_seeds_sweeper.AdaptiveSeedsSweeper"
    # seeds every config runs in the first round (an interval needs two)
    min_seeds: int = 2
    # the most seeds a config gets: seeds 0 .. max_seeds - 1
    max_seeds: int = 10
    # the target: every comparison's 95% interval within ±precision_pp percentage points (its half-width)
    precision_pp: float = 0.5
    # the accuracy compared (its last value in each run): accuracy/test, accuracy/val or accuracy/train
    # (the older names test_acc, val_acc and train_acc are accepted too)
    metric: str = "accuracy/test"
    # the grid, as for the basic sweeper (the command line's sweeps add to it); never `seed`
    params: Optional[Dict[str, str]] = None


ConfigStore.instance().store(
    group="hydra/sweeper", name="adaptive_seeds", node=AdaptiveSeedsSweeperConf, provider="mlpsweep"
)
