"""The config of `hydra/launcher=packed`, registered in Hydra's ConfigStore."""

from dataclasses import dataclass, field
from enum import StrEnum
from typing import Optional

from hydra.core.config_store import ConfigStore


class Backend(StrEnum):
    """Where the packs train: `local`, one after another in this process; `submitit`, each a task
    of a submitit job array (hydra.launcher.submitit)."""

    local = "local"
    submitit = "submitit"


class Cluster(StrEnum):
    """submitit's executor: `slurm`, a SLURM job array; `local`, a process per task (for tests)."""

    slurm = "slurm"
    local = "local"


@dataclass
class SubmititConf:
    """Where `backend=submitit` sends the packs: each pack (and each job that runs alone) is one
    task of a submitit job array, with the settings of the `slurm` launcher preset."""

    # slurm: a SLURM job array; local: submitit's local executor (a process per task, for tests)
    cluster: Cluster = Cluster.slurm
    # the SLURM partition (queue) to submit to
    partition: Optional[str] = None
    # GPUs per task (each task trains one pack on one node); trainer.device=auto then picks CUDA
    gpus_per_node: int = 1
    cpus_per_task: int = 8
    mem_gb: int = 32
    # time limit of each task, in minutes
    timeout_min: int = 120
    # at most this many tasks of the array run at once
    array_parallelism: int = 32


@dataclass
class PackedLauncherConf:
    _target_: str = "hydra_plugins.mlpsweep_packed_launcher.packed_launcher.PackedLauncher"
    # the most runs one stacked network trains; null: as many as fit (GPU: half its free memory,
    # CPU: half the free RAM); required under backend=submitit (what fits is known on the nodes)
    pack_size: Optional[int] = None
    # local: the packs train one after another in this process; submitit: each is a task of a
    # submitit job array (hydra.launcher.submitit)
    backend: Backend = Backend.local
    submitit: SubmititConf = field(default_factory=SubmititConf)


ConfigStore.instance().store(group="hydra/launcher", name="packed", node=PackedLauncherConf, provider="mlpsweep")
