"""Which jobs of a sweep train together (`plan_packs`), and the training of one pack (`train_pack`),
for the packed launcher (hydra_plugins.mlpsweep_packed_launcher)."""

from __future__ import annotations

import itertools
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import psutil
import torch
from omegaconf import DictConfig, open_dict

from mlpsweep import tracking
from mlpsweep.checkpoint import CheckpointError, config_hash
from mlpsweep.checks import INPUT_ERRORS, check_job_inputs
from mlpsweep.config import launch_dir
from mlpsweep.data import dataset_digest
from mlpsweep.engine import cpu_threads
from mlpsweep.interrupt import SweepStop
from mlpsweep.pack_checkpoint import (
    PackIdentity,
    load_pack_checkpoint,
    other_cuts,
    pack_checkpoint_path,
    save_pack_checkpoint,
)
from mlpsweep.packed import Member, MemberResult, PackedTrainer, pack_key, unpackable
from mlpsweep.rendering import Figures

log = logging.getLogger(__name__)

INVALID = "its config is invalid (its job says why)"  # why a job runs alone
# the share of the device's free memory (GPU) or of the free RAM (CPU) that packs may fill by default
MEMORY_SHARE = 0.5


@dataclass
class Unit:
    """Jobs (indices into the sweep's list) trained as one pack, or one job that runs alone and why."""

    jobs: list[int]
    reason: str | None = None  # why a job runs alone
    # a packed unit's whole pack: its jobs, and under resume=true the jobs of its pack that were
    # logged before an interrupt, whose checkpoint (of the whole pack) gives the others their results
    pack: list[int] = field(default_factory=list)
    resumed: bool = False  # a job alone that resume=true skips, or that continues its own run

    def __post_init__(self) -> None:
        if self.packed and not self.pack:
            self.pack = list(self.jobs)

    @property
    def packed(self) -> bool:
        return self.reason is None


@dataclass
class PackPlan:
    units: list[Unit]

    def summary(self, first_job: int = 0) -> str:
        """How the sweep's jobs are launched: packs and their sizes, and each job that runs alone and
        why; jobs numbered as Hydra numbers them (the batch's first is `first_job`)."""
        packs = [unit for unit in self.units if unit.packed]
        jobs = sum(len(unit.jobs) for unit in self.units)
        packed = sum(len(p.jobs) for p in packs)
        sizes = ", ".join(str(len(p.jobs)) for p in packs) or "none"
        in_packs = f"{len(packs)} pack{'' if len(packs) == 1 else 's'} ({sizes})"
        lines = [f"Launching {jobs} jobs: {packed} in {in_packs}, {jobs - packed} alone"]
        lines += [f"\tjob #{first_job + u.jobs[0]} runs alone: {u.reason}" for u in self.units if not u.packed]
        lines += [
            f"\tjobs {', '.join(f'#{first_job + i}' for i in unit.jobs)}: from the checkpoint of their pack of "
            f"{len(unit.pack)} (resume=true; the others finished)"
            for unit in packs
            if len(unit.pack) > len(unit.jobs)
        ]
        return "\n".join(lines)


def task_config(sweep_config: DictConfig) -> DictConfig:
    """A job's config as its task sees it: without the `hydra` node (a copy, which keeps what the
    sweep's resolvers gave, e.g. `${now:...}`, and its flags)."""
    cfg = sweep_config.copy()
    with open_dict(cfg):
        cfg.pop("hydra", None)
    return cfg


def plan_packs(sweep_configs: Sequence[DictConfig], pack_size: int | None, remote: bool = False) -> PackPlan:
    """Group the jobs that can share a stacked network (same `pack_key` and device) into packs of at
    most `pack_size` (None: as many as fit, `fitting_pack_size`), as even as can be (`even_cuts`),
    in the order of their first job;
    every other job is a unit of its own with the reason it runs alone. The device is the one each
    job's `trainer.device` resolves to here (`cpu` and `auto` pack together on a machine without a
    GPU), and where the packs train on other machines (`remote`: submitit tasks) also as written.

    Under resume=true the packs are cut from every job of a group, then the jobs that finished or
    continue their own run are taken out of them: a resumed sweep cuts the packs it cut before, so
    an interrupted pack finds its checkpoint (which names its members). A pack that had trained
    when the interrupt came, some of its jobs logged, keeps its checkpoint: the jobs left take
    their results from it, as a unit of the whole pack."""
    groups: dict[str, list[int]] = {}
    devices: dict[str, torch.device] = {}
    units: list[Unit] = []
    resumed: dict[int, str] = {}  # the jobs resume=true takes out of their packs, and why
    finished: set[int] = set()
    for i, sweep_config in enumerate(sweep_configs):
        cfg = task_config(sweep_config)
        try:
            device = check_job_inputs(cfg)
        except INPUT_ERRORS:
            units.append(Unit([i], reason=INVALID))
            continue
        if (reason := unpackable(cfg)) is not None:
            units.append(Unit([i], reason=reason))
            continue
        if cfg.resume:
            cfg_hash = config_hash(cfg)
            if tracking.finished_run(cfg, cfg_hash):
                resumed[i] = "it already finished (resume=true skips it)"
                finished.add(i)
            elif tracking.has_unfinished_run(cfg, cfg_hash):
                resumed[i] = "its unfinished run continues from its checkpoint (resume=true)"
        key = pack_key(cfg) + str(device) + (f" as {cfg.trainer.device}" if remote else "")
        groups.setdefault(key, []).append(i)
        devices[key] = device
    for key, jobs in groups.items():
        size = max(1, pack_size or fitting_pack_size(task_config(sweep_configs[jobs[0]]), devices[key]))
        for cut in even_cuts(jobs, size):
            taken = [i for i in cut if i in resumed]
            # a pack that left a checkpoint (one that had trained, when its jobs had begun to log):
            # the jobs of it not finished go on from there, its finished ones not logged again
            checkpointed = bool(taken) and has_checkpoint([sweep_configs[i] for i in cut])
            if checkpointed:
                taken = [i for i in taken if i in finished]
            units += [Unit([i], reason=resumed[i], resumed=True) for i in taken]
            chunk = [i for i in cut if i not in taken]
            if checkpointed and chunk:
                units.append(Unit(chunk, pack=cut))
            elif checkpointed:
                forget_pack([sweep_configs[i] for i in cut])  # every job of the pack had logged its run
            elif len(chunk) > 1:
                units.append(Unit(chunk))
            elif chunk:
                units.append(Unit(chunk, reason=_why_alone(len(jobs), size, len(cut))))
    return PackPlan(sorted(units, key=lambda unit: unit.jobs[0]))


def even_cuts(jobs: list[int], size: int) -> list[list[int]]:
    """`jobs` in as few packs of at most `size` as there can be, their sizes as even as can be (7
    jobs in packs of at most 3: 3, 2, 2, not 3, 3, 1; a job is left over alone only where no cut
    avoids it, as 3 jobs in packs of 2)."""
    packs = -(-len(jobs) // size)
    small, bigger = divmod(len(jobs), packs)
    bounds = [0, *itertools.accumulate(small + (i < bigger) for i in range(packs))]
    return [jobs[start:stop] for start, stop in itertools.pairwise(bounds)]


def _why_alone(group: int, size: int, cut: int) -> str:
    """Why the one job left of a pack of `cut` jobs, cut from a group of `group` in packs of `size`, runs alone."""
    if group == 1:
        return "no other job of the sweep shares its shapes and step"
    if size == 1:
        return "hydra.launcher.pack_size=1"
    if cut > 1:
        return "the other jobs of its pack finished or continue their own runs (resume=true)"
    return f"the job left over from its group's packs of at most {size}"


def fitting_pack_size(cfg: DictConfig, device: torch.device, in_features: int = 784, classes: int = 10) -> int:
    """How many members of `cfg`'s shape fit in MEMORY_SHARE of the device's free memory: per
    member its weights four times (weights, gradients, two optimizer states) and its activations
    (a training batch, saved for the backward pass, and an evaluation batch)."""
    widths = [in_features, *cfg.depth.widths, classes]
    params = sum(a * b + b for a, b in itertools.pairwise(widths))
    activations = (cfg.trainer.batch_size * 6 + cfg.trainer.eval_batch_size * 2) * sum(widths)
    member_bytes = 4 * (4 * params + activations)
    if device.type == "cuda":
        free = torch.cuda.mem_get_info(device)[0]
    else:
        free = psutil.virtual_memory().available
    return max(1, int(MEMORY_SHARE * free) // member_bytes)


def pack_identity(cfgs: Sequence[DictConfig]) -> PackIdentity:
    """The identity of the pack of `cfgs` (in the pack's order) in this store, sweep and dataset."""
    first = cfgs[0]
    return PackIdentity(
        tracking_uri=tracking.resolve_tracking_uri(first.tracking.uri),
        experiment=first.tracking.experiment,
        data_digest=dataset_digest(first.data.name, first.data.root),
        sweep=tracking.parent_run_id() or "",
        config_hashes=tuple(config_hash(cfg) for cfg in cfgs),
    )


def in_pack_order(configs: Sequence[DictConfig]) -> list[int]:
    """The positions of `configs` (sweep or task configs) in their pack: members of one activation
    and norm together, those of one norm next to each other (the pack's contiguous slices)."""
    return sorted(range(len(configs)), key=lambda i: segment_order(configs[i]))


def checkpoint_of(cfgs: Sequence[DictConfig]) -> tuple[Path, PackIdentity]:
    """The checkpoint file of the pack of the jobs of task configs `cfgs`, and its identity."""
    cfgs = [cfgs[i] for i in in_pack_order(cfgs)]
    identity = pack_identity(cfgs)
    return pack_checkpoint_path(launch_dir() / cfgs[0].trainer.checkpoint_dir, identity), identity


def has_checkpoint(sweep_configs: Sequence[DictConfig]) -> bool:
    """Whether the pack of these jobs left a checkpoint (its sweep was interrupted)."""
    return checkpoint_of([task_config(c) for c in sweep_configs])[0].is_file()


def forget_pack(sweep_configs: Sequence[DictConfig]) -> None:
    """Remove the pack's checkpoint, and those of the sweep's other cuts that held its members:
    every job of the pack has logged its run (or failed)."""
    checkpoint, identity = checkpoint_of([task_config(c) for c in sweep_configs])
    for path in [checkpoint, *other_cuts(checkpoint.parent, identity)]:
        path.unlink(missing_ok=True)


def warn_of_old_cuts(sweep_configs: Sequence[DictConfig], plan: PackPlan) -> None:
    """Under resume=true, name the checkpoints of packs cut otherwise before that hold a job which
    now trains alone from epoch 0 (resume_pack names those of a job packed otherwise)."""
    for unit in plan.units:
        sweep_config = sweep_configs[unit.jobs[0]]
        if unit.packed or unit.resumed or not sweep_config.resume or unit.reason == INVALID:
            continue
        checkpoint, identity = checkpoint_of([task_config(sweep_config)])
        for path, other in other_cuts(checkpoint.parent, identity).items():
            log.warning(
                f"resume: {path} holds job #{sweep_config.hydra.job.num} in a pack of {len(other.config_hashes)}; "
                f"the job now runs alone ({unit.reason}) from epoch 0 (resume with the interrupted sweep's "
                "pack_size to continue that pack)"
            )


def resume_pack(checkpoint: Path, identity: PackIdentity, trainer: PackedTrainer) -> None:
    """Restore the pack's checkpoint into `trainer`, if there is one it can continue (else say why
    in the log: the pack trains from its first epoch)."""
    if not checkpoint.is_file():
        for path, other in other_cuts(checkpoint.parent, identity).items():
            shared = len(set(other.config_hashes) & set(identity.config_hashes))
            log.warning(
                f"resume: {path} holds {shared} of this pack's {len(identity.config_hashes)} jobs in a pack of "
                f"{len(other.config_hashes)}, cut otherwise (another hydra.launcher.pack_size, or other free "
                "memory); this pack starts from epoch 0 (resume with the interrupted sweep's pack_size to continue it)"
            )
        return
    try:
        epoch = load_pack_checkpoint(checkpoint, identity, trainer)
    except CheckpointError as err:
        log.warning(f"resume: {err}; the pack starts from epoch 0")
        return
    log.info(f"resume: the pack continues after epoch {epoch} ({checkpoint})")


def segment_order(cfg: DictConfig) -> str:
    """Members of one activation and norm sit together in a pack, those of one norm next to each other."""
    return repr(cfg.norm) + repr(cfg.activation)


def train_pack(sweep_configs: Sequence[DictConfig], figures_ahead_for: Sequence[bool]) -> list[MemberResult] | None:
    """Train the jobs `sweep_configs` as one pack on their device (resolved here: a submitit task
    runs on another machine), from the pack's checkpoint under resume=true; their results in the
    same order, the figures of those `figures_ahead_for` marks asked of worker processes (they
    draw them while the jobs log their members one by one). The checkpoint stays until the
    launcher has logged every job (`forget_pack`). None if the packed training itself failed (the
    error is logged and the jobs run alone)."""
    drawn = [Figures.ahead() if ahead else None for ahead in figures_ahead_for]  # in job order
    results = None
    try:
        results = _train_pack([task_config(c) for c in sweep_configs], drawn)
        return results
    finally:
        if results is None:  # the jobs run alone, or the sweep stops: nobody logs these figures
            close_all(drawn)


def _train_pack(cfgs: list[DictConfig], drawn: list[Figures | None]) -> list[MemberResult] | None:
    """train_pack of the jobs' task configs `cfgs`, their figures asked of `drawn`."""
    from mlpsweep.cli import (  # the job's own builders
        ask_figures_ahead,
        figure_epochs,
        fresh_state,
        grid_ahead,
        make_deterministic,
        new_probe,
    )
    from mlpsweep.data import load_splits

    order = in_pack_order(cfgs)
    first = cfgs[0]
    checkpoint: Path | None = None
    try:
        device = check_job_inputs(first)
        if first.trainer.deterministic:
            make_deterministic()
        torch.set_num_threads(cpu_threads(first.trainer.num_threads, None))
        data = load_splits(first.data, device)
        members = []
        for i in order:
            cfg = cfgs[i]
            model, optimizer, schedule, generator = fresh_state(cfg, data, device)
            probe = new_probe(cfg, model, data) if cfg.probe.enabled else None
            name = tracking.run_name(cfg)
            # on a GPU the workers draw the probe's grids while the pack trains (the CPU has cores to
            # spare); on a CPU the training takes the cores (drawing meanwhile slowed it more than it
            # saved), so they are drawn after
            drawing_meanwhile = (figures := drawn[i]) is not None and device.type == "cuda"
            on_snapshot = grid_ahead(name, figures) if drawing_meanwhile else None
            members.append(
                Member(name, cfg, model, optimizer, schedule, generator, probe, figure_epochs(cfg), on_snapshot)
            )
        start = time.perf_counter()
        trainer = PackedTrainer(members, data, device)
        log.info(f"pack of {len(members)} runs on {device}, step {trainer.kind}: {', '.join(m.name for m in members)}")
        checkpoint, identity = checkpoint_of(cfgs)
        if first.resume:
            resume_pack(checkpoint, identity, trainer)
        trainer.fit(after_epoch=lambda epoch: save_pack_checkpoint(checkpoint, identity, trainer, epoch))
        results = trainer.results(train_seconds=time.perf_counter() - start)
    except (SweepStop, KeyboardInterrupt):
        raise  # the last epoch's checkpoint stays, for resume=true
    except Exception as err:
        log.exception(f"packed training failed ({type(err).__name__}); its {len(cfgs)} jobs run alone")
        if checkpoint is not None:
            checkpoint.unlink(missing_ok=True)  # they start from scratch, as a failed job does
        return None
    in_job_order: list[MemberResult] = [None] * len(cfgs)  # type: ignore[list-item]
    for position, i in enumerate(order):
        in_job_order[i] = results[position]
    for cfg, result, figures in zip(cfgs, in_job_order, drawn, strict=True):
        if figures is not None:
            ask_figures_ahead(cfg, result, figures)
            result.figures = figures
    return in_job_order


def close_all(drawn: Sequence[Figures | None]) -> None:
    """Drop the figures asked for ahead of jobs that will not log them."""
    for figures in drawn:
        if figures is not None:
            figures.close()
