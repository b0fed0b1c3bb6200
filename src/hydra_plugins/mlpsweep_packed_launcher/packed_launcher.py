"""`hydra/launcher=packed`: compose every job, train the jobs that can share a stacked network as
packs (mlpsweep.packed), then run each job through Hydra's own `run_job`, which logs a packed job's
result as an ordinary run (its callbacks, output folder and return value as under the basic
launcher). A job the packed step cannot train runs alone, as the basic launcher runs it, and the
log says why. With `backend=submitit` each pack (and each job that runs alone) is one task of a
submitit job array (SLURM, or submitit's local executor), as Hydra's submitit launcher sends jobs.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from hydra.core.singleton import Singleton
from hydra.core.utils import JobReturn, JobStatus, configure_log, filter_overrides, run_job, setup_globals
from hydra.plugins.launcher import Launcher
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig, open_dict

from hydra_plugins.mlpsweep_packed_launcher.config import Backend, Cluster
from mlpsweep import interrupt
from mlpsweep.config import require
from mlpsweep.packed import MemberResult, member_result
from mlpsweep.packing import Unit, forget_pack, plan_packs, train_pack, warn_of_old_cuts
from mlpsweep.tracking import redact_log_records

log = logging.getLogger(__name__)


def check_settings(pack_size: int | None, backend: Backend, submitit: Any) -> None:
    """ConfigError for a launcher setting out of its range (the sweep checks them before it starts)."""
    whole = isinstance(pack_size, int) and not isinstance(pack_size, bool)
    require(
        pack_size is None or (whole and pack_size >= 1),
        "hydra.launcher.pack_size",
        pack_size,
        "null or an integer of at least 1",
    )
    require(backend in list(Backend), "hydra.launcher.backend", backend, " or ".join(Backend))
    if backend == Backend.submitit:
        require(
            submitit.cluster in list(Cluster), "hydra.launcher.submitit.cluster", submitit.cluster, " or ".join(Cluster)
        )
        # the default is measured on the launching machine, not on the nodes that train the packs
        require(
            pack_size is not None,
            "hydra.launcher.pack_size",
            pack_size,
            "an integer of at least 1 under backend=submitit",
        )


class PackedLauncher(Launcher):
    def __init__(self, pack_size: int | None = None, backend: Backend = Backend.local, submitit: Any = None) -> None:
        super().__init__()
        check_settings(pack_size, backend, submitit)
        self.pack_size = pack_size
        self.backend = backend
        self.submitit = submitit
        self.config: DictConfig | None = None
        self.task_function: TaskFunction | None = None
        self.hydra_context: HydraContext | None = None

    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig) -> None:
        self.config = config
        self.hydra_context = hydra_context
        self.task_function = task_function

    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> Sequence[JobReturn]:
        setup_globals()
        assert self.config is not None
        configure_log(self.config.hydra.hydra_logging, self.config.hydra.verbose)
        Path(str(self.config.hydra.sweep.dir)).mkdir(parents=True, exist_ok=True)
        configs = [self._compose(overrides, initial_job_idx + i) for i, overrides in enumerate(job_overrides)]
        plan = plan_packs(configs, self.pack_size, remote=self.backend == Backend.submitit)
        log.info(plan.summary(first_job=initial_job_idx))
        warn_of_old_cuts(configs, plan)
        returns: dict[int, JobReturn] = {}
        if self.backend == Backend.submitit:
            results = self._submit([list(o) for o in job_overrides], plan.units, initial_job_idx)
            for unit, unit_returns in zip(plan.units, results):
                returns.update(zip(unit.jobs, unit_returns))
        else:
            interrupt.install(launcher=True)
            for unit in plan.units:
                pack = [configs[i] for i in unit.pack] if unit.packed else None
                returns.update(zip(unit.jobs, self._run_unit([configs[i] for i in unit.jobs], pack)))
        if interrupt.requested() is None:
            for unit in plan.units:  # a job that trained alone now: the checkpoints of packs it was cut into before
                if not unit.packed and not unit.resumed and returns[unit.jobs[0]].status == JobStatus.COMPLETED:
                    forget_pack([configs[unit.jobs[0]]])
        return [returns[i] for i in range(len(configs))]

    def _compose(self, overrides: Sequence[str], idx: int) -> DictConfig:
        assert self.hydra_context is not None and self.config is not None
        sweep_config = self.hydra_context.config_loader.load_sweep_config(self.config, list(overrides))
        with open_dict(sweep_config):
            sweep_config.hydra.job.id = idx
            sweep_config.hydra.job.num = idx
        return sweep_config

    def _run_unit(self, sweep_configs: list[DictConfig], pack: list[DictConfig] | None) -> list[JobReturn]:
        """Train the unit's pack (its jobs, or with the jobs of its pack logged before an interrupt:
        see packing.Unit), or nothing for a job that runs alone; then run each of its jobs. The
        pack's checkpoint goes once every job has run, unless an interrupt stopped them."""
        results = None
        if pack is not None:
            nums = {c.hydra.job.num for c in sweep_configs}
            ahead = [self.backend == Backend.local and c.hydra.job.num in nums for c in pack]
            trained = train_pack(pack, ahead)
            results = {c.hydra.job.num: r for c, r in zip(pack, trained, strict=True)} if trained else None
        returns = []
        try:
            for sweep_config in sweep_configs:
                overrides = " ".join(filter_overrides(sweep_config.hydra.overrides.task))
                log.info(f"\t#{sweep_config.hydra.job.num} : {overrides}")
                returns.append(self._run(sweep_config, results[sweep_config.hydra.job.num] if results else None))
        finally:  # the figures of members whose jobs did not run (a stopped sweep)
            for result in (results or {}).values():
                if result.figures is not None:
                    result.figures.close()
        if pack is not None and interrupt.requested() is None:  # a submitit task's stopped jobs return
            forget_pack(pack)
        return returns

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

    # --- backend=submitit ---------------------------------------------------------------------------

    def __call__(
        self, overrides: list[list[str]], job_nums: list[int], runs: int, packed: bool, state: dict[Any, Any]
    ) -> list[JobReturn]:
        """One submitit task (in its own process, on a node of the cluster): its first `runs` jobs,
        trained as one pack with the others (see packing.Unit) where `packed`, or a job alone."""
        Singleton.set_state(state)
        setup_globals()
        redact_log_records()  # before the first overrides line of this task's log
        interrupt.install(launcher=False)
        configs = [self._compose(o, num) for o, num in zip(overrides, job_nums)]
        pack = sorted(configs, key=lambda c: c.hydra.job.num) if packed else None  # in job order, as plan_packs cut it
        return self._run_unit(configs[:runs], pack)

    def _submit(self, overrides: list[list[str]], units: list[Unit], initial_job_idx: int) -> list[list[JobReturn]]:
        """Send every unit to the cluster as one task of a job array (the jobs it runs, then the
        other jobs of its pack); wait for their job returns."""
        import submitit

        assert self.config is not None
        settings = self.submitit
        folder = Path(str(self.config.hydra.sweep.dir)) / ".submitit" / "%j"
        executor = submitit.AutoExecutor(folder=folder, cluster=settings.cluster)
        parameters = {
            "timeout_min": settings.timeout_min,
            "gpus_per_node": settings.gpus_per_node,
            "cpus_per_task": settings.cpus_per_task,
            "mem_gb": settings.mem_gb,
            "name": str(self.config.hydra.job.name),
        }
        if settings.cluster == "slurm":
            parameters.update(slurm_partition=settings.partition, slurm_array_parallelism=settings.array_parallelism)
        executor.update_parameters(**parameters)
        composed = [[*unit.jobs, *(i for i in unit.pack if i not in unit.jobs)] for unit in units]
        task_overrides = [[overrides[i] for i in jobs] for jobs in composed]
        nums = [[initial_job_idx + i for i in jobs] for jobs in composed]
        runs = [len(unit.jobs) for unit in units]
        state = Singleton.get_state()
        jobs = executor.map_array(
            self, task_overrides, nums, runs, [u.packed for u in units], [state] * len(units)
        )
        log.info(f"submitted {len(jobs)} tasks ({settings.cluster}): {', '.join(j.job_id for j in jobs)}")
        return [job.results()[0] for job in jobs]
