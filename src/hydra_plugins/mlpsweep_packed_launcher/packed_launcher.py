"""`hydra/launcher=packed`: compose every job, train the jobs that can share a stacked network as
packs (mlpsweep.packed), then run each job through Hydra's own `run_job`, which logs a packed job's
result as an ordinary run (its callbacks, output folder and return value as under the basic
launcher). A job the packed step cannot train runs alone, as the basic launcher runs it, and the
log says why."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

from hydra.core.utils import JobReturn, configure_log, filter_overrides, run_job, setup_globals
from hydra.plugins.launcher import Launcher
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig, open_dict

from mlpsweep import interrupt
from mlpsweep.packed import MemberResult, member_result
from mlpsweep.packing import plan_packs, train_pack

log = logging.getLogger(__name__)


class PackedLauncher(Launcher):
    def __init__(self, pack_size: int | None = None) -> None:
        super().__init__()
        self.pack_size = pack_size
        self.config: DictConfig | None = None
        self.task_function: TaskFunction | None = None
        self.hydra_context: HydraContext | None = None

    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig) -> None:
        self.config = config
        self.hydra_context = hydra_context
        self.task_function = task_function

    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> Sequence[JobReturn]:
        setup_globals()
        assert self.hydra_context is not None and self.config is not None and self.task_function is not None
        configure_log(self.config.hydra.hydra_logging, self.config.hydra.verbose)
        Path(str(self.config.hydra.sweep.dir)).mkdir(parents=True, exist_ok=True)
        interrupt.install(launcher=True)
        configs = [self._compose(overrides, initial_job_idx + i) for i, overrides in enumerate(job_overrides)]
        plan = plan_packs(configs, self.pack_size)
        log.info(plan.summary())
        returns: dict[int, JobReturn] = {}
        for unit in plan.units:
            results = train_pack([configs[i] for i in unit.jobs], unit.device) if unit.packed else None
            for position, i in enumerate(unit.jobs):
                log.info(f"\t#{initial_job_idx + i} : {' '.join(filter_overrides(job_overrides[i]))}")
                returns[i] = self._run(configs[i], results[position] if results else None)
        return [returns[i] for i in range(len(configs))]

    def _compose(self, overrides: Sequence[str], idx: int) -> DictConfig:
        assert self.hydra_context is not None and self.config is not None
        sweep_config = self.hydra_context.config_loader.load_sweep_config(self.config, list(overrides))
        with open_dict(sweep_config):
            sweep_config.hydra.job.id = idx
            sweep_config.hydra.job.num = idx
        return sweep_config

    def _run(self, sweep_config: DictConfig, result: MemberResult | None) -> JobReturn:
        """Run one job with Hydra's `run_job`; a packed job's task logs `result` instead of training."""
        assert self.hydra_context is not None and self.config is not None and self.task_function is not None
        with member_result(result):
            ret = run_job(
                hydra_context=self.hydra_context,
                task_function=self.task_function,
                config=sweep_config,
                job_dir_key="hydra.sweep.dir",
                job_subdir_key="hydra.sweep.subdir",
            )
        configure_log(self.config.hydra.hydra_logging, self.config.hydra.verbose)
        return ret
