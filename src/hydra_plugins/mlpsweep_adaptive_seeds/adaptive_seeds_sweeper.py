"""The Hydra side of `hydra/sweeper=adaptive_seeds`: the plugin class Hydra instantiates. The rounds
are mlpsweep.adaptive's, imported only when this sweeper runs (Hydra imports every plugin module
in every process it starts)."""

from typing import Any, Dict, List, Optional

from hydra.plugins.sweeper import Sweeper
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig


class AdaptiveSeedsSweeper(Sweeper):
    """The grid with min_seeds seeds, then one more seed per round for the configs whose
    comparisons are not yet within ±precision_pp (see mlpsweep.adaptive)."""

    def __init__(
        self, min_seeds: int, max_seeds: int, precision_pp: float, metric: str, params: Optional[Dict[str, str]] = None
    ) -> None:
        from mlpsweep.adaptive import AdaptiveSeeds

        # `params` (the grid) is read from the config with the command line's sweeps: mlpsweep.sweep.grid
        self.sweeper = AdaptiveSeeds(min_seeds, max_seeds, precision_pp, metric)

    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig) -> None:
        self.sweeper.setup(hydra_context=hydra_context, task_function=task_function, config=config)

    def sweep(self, arguments: List[str]) -> Any:
        return self.sweeper.sweep(arguments)
