"""The entry point (`python train.py ...` or `mlpsweep-train ...`): Hydra over a plain `train(cfg)`,
with an exit status that tells the truth: 0 when every job finished, 1 when any failed, 2 for bad
input, 130 when interrupted (SIGINT/SIGTERM)."""

from __future__ import annotations

import gc
import logging
import os
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

import hydra
import torch
from hydra._internal.utils import get_args_parser
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from mlflow.tracking import MlflowClient
from omegaconf import DictConfig

from mlpsweep import console, interrupt, packed, tracking
from mlpsweep.checkpoint import (
    CheckpointError,
    CheckpointIdentity,
    Resumed,
    checkpoint_path,
    config_hash,
    load_checkpoint,
    save_checkpoint,
)
from mlpsweep.checks import INPUT_ERRORS, check_inputs
from mlpsweep.config import CONFIG_DIR, check_composition, check_group_overrides, launch_dir
from mlpsweep.data import DataSplits, dataset_digest, load_splits
from mlpsweep.early_stopping import BestWeights, EarlyStopping
from mlpsweep.engine import (
    DivergenceError,
    EpochMetrics,
    Evaluation,
    build_optimizer,
    cpu_threads,
    device_for_job,
    evaluate_with_confusion,
    fit,
    loss_divergence,
    seed_everything,
)
from mlpsweep.model import build_model, count_parameters
from mlpsweep.model import summary as model_summary
from mlpsweep.probe import ActivationProbe, Snapshot
from mlpsweep.rendering import Figures
from mlpsweep.schedulers import Schedule, build_schedule
from mlpsweep.steps import step_kind
from mlpsweep.sweep import close_sweep, current_session, in_launcher_process, multirun_started, resume_command

log = logging.getLogger(__name__)


def train(cfg: DictConfig) -> float:
    """Train and test the model `cfg` describes, tracked in MLflow; return the best validation accuracy.

    Everything that can be wrong with the input is checked before the MLflow run starts; errors
    in the input raise ConfigError or DataError (`checks.INPUT_ERRORS`). With `resume=true` a
    config that already FINISHED is skipped, and an interrupted or killed one continues from its
    checkpoint in its own run. An interrupt (SIGINT/SIGTERM) raises Interrupted after the run
    ended KILLED with its checkpoint kept.
    """
    tracking.redact_log_records()  # also in a job's own process (joblib, submitit)
    device = check_inputs(cfg)
    tracking.configure_store_access(cfg.tracking)
    if cfg.trainer.deterministic:
        make_deterministic()
    jobs_at_once = parallel_jobs()
    if jobs_at_once is not None:
        device = device_for_job(device, HydraConfig.get().job.num, torch.cuda.device_count())
    torch.set_num_threads(cpu_threads(cfg.trainer.num_threads, jobs_at_once))
    cfg_hash = config_hash(cfg)
    if cfg.resume and (finished := tracking.finished_run(cfg, cfg_hash)):
        log.info(f"resume: {finished.info.run_name} already finished as run {finished.info.run_id}; skipped")
        return tracking.best_metric(cfg, finished.info.run_id, "val_acc")

    data = load_splits(cfg.data, device)
    if (packed_result := packed.current_result()) is not None:  # trained in a pack by the packed launcher
        if cfg.resume:  # a run an interrupt stopped while it was logged: the pack's checkpoint gave it anew
            reason = "it stopped while it was logged; resume=true logs its config anew from its pack's checkpoint"
            tracking.retire_unfinished_runs(cfg, cfg_hash, continued=None, reason=reason)
        return log_packed_member(cfg, packed_result, data, cfg_hash)

    model, optimizer, schedule, generator = fresh_state(cfg, data, device)
    num_params = count_parameters(model)
    identity = CheckpointIdentity(
        tracking_uri=tracking.resolve_tracking_uri(cfg.tracking.uri),
        experiment=cfg.tracking.experiment,
        config_hash=cfg_hash,
        data_digest=dataset_digest(cfg.data.name, cfg.data.root),
        sweep=tracking.parent_run_id() or "",
    )
    checkpoint = checkpoint_path(launch_dir() / cfg.trainer.checkpoint_dir, identity)
    resumed = None
    if cfg.resume:
        if not (resumed := resume_from(checkpoint, identity, cfg, model, optimizer, schedule, generator)):
            model, optimizer, schedule, generator = fresh_state(
                cfg, data, device
            )  # undo what a checkpoint that is not continued restored
            if unfinished := tracking.unfinished_run(cfg, cfg_hash):  # stopped before its first checkpoint
                resumed = Resumed(unfinished.info.run_id, history=[])
                log.info(f"resume: run {resumed.run_id} has no checkpoint; it starts again from epoch 0")
        tracking.retire_unfinished_runs(cfg, cfg_hash, continued=resumed.run_id if resumed else None)
    log.info(f"on {device} ({torch.get_num_threads()} CPU threads): {model_summary(model)}")  # lines_named: the run
    log.debug(f"the model in full:\n{model}")
    probe = new_probe(cfg, model, data)
    train_step = step_kind(model, optimizer, cfg.trainer.fast_step, cfg.trainer.precision)
    try:
        with tracking.job_run(cfg, num_params, train_step, cfg_hash, resumed.run_id if resumed else None) as run:
            state = TrainingState(model, optimizer, schedule, generator)
            history = train_in_run(cfg, run.info.run_id, state, data, probe, checkpoint, identity, resumed)
    except Exception:
        checkpoint.unlink(missing_ok=True)  # a failed run is rerun from scratch; interrupts and outages keep it
        raise
    checkpoint.unlink(missing_ok=True)  # the run finished; its model is in MLflow
    if tracking.parent_run_id() is None:  # a sweep says where to look once it closes
        log.info(tracking.browse_hint(identity.tracking_uri, run.info.experiment_id, run.info.run_name))
    return max(m.val_acc for m in history)


def fresh_state(
    cfg: DictConfig, data: DataSplits, device: torch.device
) -> tuple[torch.nn.Module, torch.optim.Optimizer, Schedule, torch.Generator]:
    """The model, optimizer, learning-rate schedule and batch-order generator a job of this seed starts from."""
    seed_everything(cfg.seed)
    model = build_model(cfg, data.num_features, data.num_classes).to(device)
    optimizer = build_optimizer(cfg.optimizer, model.parameters())
    steps_per_epoch = len(data.train) // cfg.trainer.batch_size
    schedule = build_schedule(cfg.scheduler, optimizer, cfg.trainer.max_epochs, steps_per_epoch)
    return model, optimizer, schedule, torch.Generator(device=device).manual_seed(cfg.seed)


def new_probe(cfg: DictConfig, model: torch.nn.Sequential, data: DataSplits) -> ActivationProbe:
    """The job's probe: the first `probe.num_samples` test images and their labels."""
    return ActivationProbe(
        model,
        data.test.x[: cfg.probe.num_samples],
        cfg.activation.name,
        cfg.probe.saturation_margin,
        cfg.probe.bins,
        y=data.test.y[: cfg.probe.num_samples],
    )


class TrainingState(NamedTuple):
    """What a job trains and what its checkpoints restore."""

    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    schedule: Schedule
    generator: torch.Generator


def train_in_run(
    cfg: DictConfig,
    run_id: str,
    state: TrainingState,
    data: DataSplits,
    probe: ActivationProbe,
    checkpoint: Path,
    identity: CheckpointIdentity,
    resumed: Resumed | None,
) -> list[EpochMetrics]:
    """Inside the job's active MLflow run: train the epochs that the `resumed` history lacks
    (checkpoint and metrics after each), then test (the best epoch's weights where early stopping
    restores them) and log the figures, the probe and the model."""
    title = tracking.run_name(cfg)
    model, optimizer, schedule, generator = state
    stopping = EarlyStopping.from_config(cfg.trainer.early_stopping)
    best = BestWeights(stopping)
    history = resumed.history if resumed else []
    if resumed and history:
        best.state = resumed.best_model
        if best.state is None and stopping.best_epoch(history) == history[-1].epoch:
            best.update(history, model)
    tracking.log_datasets(cfg.data, data, identity.data_digest)
    with tempfile.TemporaryDirectory() as workdir:
        start = time.perf_counter()
        drawn = Figures(Path(workdir), in_worker=draw_in_worker())
        probe_log = tracking.ProbeLog(probe, figure_epochs(cfg), title, drawn) if cfg.probe.enabled else None
        if history:
            log.info(f"resume: run {run_id} continues after epoch {len(history)}")
            tracking.log_missing_epochs(history)
        elif probe_log:
            probe_log.snapshot(0)  # the distributions at initialisation, logged after epoch 1's metrics

        def on_epoch_end(history: list[EpochMetrics]) -> None:
            if stopping.enabled and stopping.restore_best:
                best.update(history, model)
            save_checkpoint(
                checkpoint, identity, run_id, cfg, model, optimizer, generator, history, schedule, best.state
            )
            metrics = history[-1]
            log.info(metrics.log_line() + (f" lr {metrics.lr:.4g}" if cfg.scheduler.name != "none" else ""))
            tracking.log_epoch(metrics)
            if probe_log:
                probe_log.log_waiting()
                probe_log(metrics.epoch, final=stopping.should_stop(history))

        try:
            try:
                history = fit(model, optimizer, data, cfg.trainer, generator, on_epoch_end, history, schedule)
            except (DivergenceError, interrupt.Interrupted):
                log_figures_so_far(probe_log, drawn)  # up to the divergence or the interrupt
                raise
            if stopping.enabled and stopping.restore_best and stopping.best_epoch(history) != history[-1].epoch:
                best.restore(model)
            test_and_log(cfg, model, data, history, probe_log, drawn, started=start)
        finally:
            drawn.wait()  # no worker still writes into workdir when it is removed
    return history


def test_and_log(
    cfg: DictConfig,
    model: torch.nn.Module,
    data: DataSplits,
    history: list[EpochMetrics],
    probe_log: tracking.ProbeLog | None,
    drawn: Figures,
    started: float,
    tested: Evaluation | None = None,
) -> None:
    """The end of a job's run, its model trained (holding the best epoch's weights where early
    stopping restores them): where it stopped, the test pass (unless `tested` holds it), the
    figures, the probe (its share of the run since `started`, a perf_counter time) and the model
    (logged while `drawn` draws the figures; they are logged last)."""
    stopping = EarlyStopping.from_config(cfg.trainer.early_stopping)
    if stopping.enabled:
        best_epoch = stopping.best_epoch(history)
        tracking.log_stopping(best_epoch, stopped_epoch=history[-1].epoch)
        if stopping.restore_best and best_epoch != history[-1].epoch:
            log.info(f"early stopping: testing the weights of epoch {best_epoch}, the best {stopping.monitor}")
    if tested is None:
        tested = evaluate_with_confusion(
            model, data.test, cfg.trainer.eval_batch_size, data.num_classes, cfg.trainer.precision
        )
    if err := loss_divergence(None, test_loss=tested.loss):  # nothing of the test pass logged
        log_figures_so_far(probe_log, drawn)  # as a run that diverged in training logs them
        raise err
    log.info(f"Test >> loss {tested.loss:.5f} acc {tested.accuracy:.5f}")
    tracking.log_test(tested.loss, tested.accuracy)
    tracking.log_run_figures(history, tested.confusion, tracking.run_name(cfg), drawn)
    if probe_log:
        probe_log.finish(started)
    if cfg.tracking.log_model:
        tracking.log_model(model, data.test.x[:5])
    drawn.log_all()


def log_figures_so_far(probe_log: tracking.ProbeLog | None, drawn: Figures) -> None:
    """What a run that fails still logs: the probe's snapshot waiting to be logged, and the figures
    asked for so far (the probe's grids)."""
    if probe_log:
        probe_log.log_waiting()
    drawn.log_all()


def log_packed_member(cfg: DictConfig, result: packed.MemberResult, data: DataSplits, cfg_hash: str) -> float:
    """Log a member that the packed launcher trained as an ordinary run: its params, its epochs, its
    probe, then (unless it failed) the test pass, figures and model; return its best validation accuracy."""
    model = result.model
    log.info(f"trained in a pack of {result.pack_size} ({result.train_step}): {model_summary(model)}")
    drawn = result.figures or Figures(None, in_worker=draw_in_worker())
    try:
        with tracking.job_run(cfg, count_parameters(model), result.train_step, cfg_hash):
            tracking.log_datasets(cfg.data, data, dataset_digest(cfg.data.name, cfg.data.root))
            probe_log = None
            if cfg.probe.enabled:
                title = tracking.run_name(cfg)
                probe_log = tracking.ProbeLog(new_probe(cfg, model, data), figure_epochs(cfg), title, drawn)
                probe_log.seconds = result.probe_seconds
            for metrics in result.history:
                log.info(metrics.log_line())
            snapshots = result.snapshots if probe_log else []
            tracking.log_epochs(result.history, snapshots)
            for snapshot in snapshots:
                probe_log.record(snapshot, metrics_logged=True)
            if result.error is not None:
                log_figures_so_far(probe_log, drawn)
                raise result.error
            started = time.perf_counter() - result.train_seconds  # the pack's training is part of the run
            test_and_log(cfg, model, data, result.history, probe_log, drawn, started, result.test)
    finally:
        drawn.close()  # no worker still writes into its folder when it goes
    return max(m.val_acc for m in result.history)


def ask_figures_ahead(cfg: DictConfig, result: packed.MemberResult, drawn: Figures) -> None:
    """A packed member's figures, asked of `drawn` as its pack finished training, to be drawn while
    the members before it are logged: those its job would ask for (the run's, unless it failed or is
    still to be tested; the probe's, its grids asked for as the pack trained among them)."""
    title = tracking.run_name(cfg)
    finished = result.error is None
    requests = tracking.probe_figures(result.snapshots, title, finished) if cfg.probe.enabled else []
    if finished and result.test is not None:
        requests = tracking.run_figures(result.history, result.test.confusion, title) + requests
    for request in requests:
        drawn.add(*request)


def grid_ahead(title: str, drawn: Figures) -> Callable[[Snapshot], None]:
    """What a packed member does with a probe snapshot as its pack trains: have its grid drawn."""

    def ask(snapshot: Snapshot) -> None:
        try:
            if grid := tracking.probe_grid_figure(snapshot, title):
                drawn.add(*grid)
        except Exception as err:  # a speed-up only: the grid is asked for again as the pack finishes
            log.warning(f"[{title}] probe grid of epoch {snapshot.epoch} not drawn ahead ({type(err).__name__}: {err})")

    return ask


def resume_from(
    checkpoint: Path,
    identity: CheckpointIdentity,
    cfg: DictConfig,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    schedule: Schedule,
    generator: torch.Generator,
) -> Resumed | None:
    """Restore `checkpoint` into the job's state if it is this job's and its run can be continued
    (else say why in the log and return None: the caller starts from a fresh state)."""
    if not checkpoint.is_file():
        return None
    try:
        resumed = load_checkpoint(checkpoint, identity, model, optimizer, generator, schedule)
    except CheckpointError as err:
        log.warning(f"resume: {err}; starting from epoch 0")
        return None
    if reason := tracking.continuable_run(cfg, resumed.run_id, identity.config_hash):
        log.warning(f"resume: {checkpoint} is not continued ({reason}); starting from epoch 0")
        return None
    return resumed


def make_deterministic() -> None:
    """Bitwise-repeatable GPU runs: set before CUDA starts (cuBLAS reads its workspace at start-up)."""
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True)
    torch.backends.cudnn.benchmark = False
    torch.backends.cudnn.deterministic = True


def parallel_jobs() -> int | None:
    """How many jobs a parallel launcher runs at once (its n_jobs); None outside one."""
    if not HydraConfig.initialized():
        return None
    return HydraConfig.get().launcher.get("n_jobs")


def draw_in_worker() -> bool:
    """Whether a job's figures are drawn in a worker process (mlpsweep.rendering): in a sweep whose
    jobs run one after another in the launcher's process, where the worker overlaps the next work."""
    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN and in_launcher_process()


def figure_epochs(cfg: DictConfig) -> set[int]:
    """Epoch 0, the last epoch, and every `probe.figure_every`-th epoch in between."""
    return {0, cfg.trainer.max_epochs, *range(cfg.probe.figure_every, cfg.trainer.max_epochs, cfg.probe.figure_every)}


@hydra.main(version_base="1.3", config_path=str(CONFIG_DIR), config_name="train")
def run_job(cfg: DictConfig) -> float | None:
    """Hydra's task: `job(cfg)`, every line it logs starting with its run's name; in a multirun
    its end is marked on the parent run, for the launcher's progress lines (console.SweepProgress)."""
    name = job_label(cfg)
    with console.lines_named(name):
        result = job(cfg)
    if parent_id := tracking.parent_run_id():
        client = MlflowClient(tracking.resolve_tracking_uri(cfg.tracking.uri))
        outcome = "finished" if result is not None else "did not finish"
        console.record_job_end(client, parent_id, HydraConfig.get().job.num, name, outcome)
    return result


def job_label(cfg: DictConfig) -> str:
    """The job's run name; `job N` where the config is too broken to name (its error comes later)."""
    try:
        return tracking.run_name(cfg)
    except Exception:
        return f"job {HydraConfig.get().job.num}"


def job(cfg: DictConfig) -> float | None:
    """`train(cfg)`. In a multirun a failing job is recorded on the parent run and
    the sweep goes on; an interrupted one stops the sweep (its launcher does, under a parallel
    launcher), and so does a tracking server that stopped answering."""
    multirun = HydraConfig.get().mode == RunMode.MULTIRUN
    interrupt.install(launcher=not multirun or in_launcher_process())
    try:
        interrupt.check()  # an interrupted sweep starts no new job
        return train(cfg)
    except interrupt.Interrupted as stop:
        if multirun and not in_launcher_process():
            log.warning(f"{tracking.run_name(cfg)}: {stop}; its run is KILLED, its checkpoint kept")
            return None  # the launcher, signalled too, ends the sweep once its running jobs have stopped
        raise
    except Exception as err:
        if multirun and (outage := tracking.server_outage(tracking.resolve_tracking_uri(cfg.tracking.uri))):
            raise tracking.TrackingOutage(outage) from None  # the next jobs would fail the same way
        if isinstance(err, INPUT_ERRORS):
            log.error(str(err))
            if not multirun:
                raise SystemExit(2) from None
        elif not multirun:
            raise
        else:
            log.exception(f"job failed: {err}")
        tracking.record_job_failure(cfg, err)
    return None  # no objective: the Optuna sweeper marks the trial FAIL and the study goes on


def main() -> None:
    """`python train.py [-m] [overrides]`: check the command line (input_problems), run Hydra,
    and exit with the status of what happened (a sweep's from the store, see sweep.close_sweep)."""
    tracking.redact_log_records()
    problems = input_problems(sys.argv[1:])
    for problem in problems:
        print(tracking.redacted(problem), file=sys.stderr)
    if problems:
        sys.exit(2)
    stop: BaseException | None = None
    try:
        run_job()
        code = 0
    except SystemExit as done:
        if isinstance(done.code, str):
            print(done.code, file=sys.stderr)
        code = done.code if isinstance(done.code, int) else int(done.code is not None)
    except (interrupt.SweepStop, KeyboardInterrupt) as err:
        stop = err
        code = getattr(err, "exit_code", 130)
        if current_session() is None:  # a single run: one line instead of a traceback
            print(f"{err or 'interrupted'}; continue with: {resume_command()}", file=sys.stderr)
    if current_session() is not None:
        try:
            code = close_sweep(stop) or code  # the sweep's own line says what happened and how to continue
        except KeyboardInterrupt:  # a second signal while the parent run was closed: stop at once
            print(f"stopped at once; the sweep's parent run may stay RUNNING: continue with: {resume_command()}",
                  file=sys.stderr)  # fmt: skip
            code = 130
    elif multirun_started() and code == 0:
        code = 1  # a sweep whose parent run never opened did not run as a sweep
    interrupt.exiting()
    # the interpreter's last collections skip what it holds (cyclic garbage and its finalizers; the
    # atexit handlers still end runs, flush logs and stop the workers): it exits 1 to 2 s sooner
    gc.freeze()
    sys.exit(code)


def input_problems(argv: list[str]) -> list[str]:
    """The command line's problems, one line each: its group options, then, for a command that
    runs or sweeps the app's own config, what Hydra's composition of it would stop at. A command
    line that does not parse is Hydra's to report, as is anything after --help, --cfg or --info."""
    try:
        args = get_args_parser().parse_known_args(argv)[0]
    except SystemExit:
        return []
    overrides = list(args.overrides)
    if args.config_path or args.config_name or args.config_dir or args.experimental_rerun:
        return []  # another config (or more groups and options than conf/ has): Hydra's to check
    if problems := check_group_overrides(overrides):
        return problems
    shows = args.help or args.hydra_help or args.cfg or args.info is not None or args.shell_completion
    return [] if shows else check_composition(overrides, args.multirun)
