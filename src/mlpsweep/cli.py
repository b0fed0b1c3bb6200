"""The Hydra entry point (`python train.py ...` or `mlpsweep-train ...`) over a plain `train(cfg)`."""

from __future__ import annotations

import logging
import os
import tempfile
import time
from pathlib import Path

import hydra
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig

from mlpsweep import tracking
from mlpsweep.checkpoint import checkpoint_path, config_hash, load_checkpoint, save_checkpoint
from mlpsweep.checks import INPUT_ERRORS, check_inputs
from mlpsweep.config import CONFIG_DIR, launch_dir, require
from mlpsweep.data import load_splits
from mlpsweep.engine import (
    EpochMetrics,
    build_optimizer,
    confusion_counts,
    cpu_threads,
    device_for_job,
    evaluate,
    fit,
    seed_everything,
)
from mlpsweep.model import build_model, count_parameters
from mlpsweep.probe import ActivationProbe
from mlpsweep.steps import step_kind

log = logging.getLogger(__name__)


def train(cfg: DictConfig) -> float:
    """Train and test the model `cfg` describes, tracked in MLflow; return the best validation accuracy.

    Everything that can be wrong with the input is checked before the MLflow run starts; errors
    in the input raise ConfigError or DataError (`checks.INPUT_ERRORS`). With `resume=true` a
    config that already FINISHED is skipped, and a killed one continues from its checkpoint.
    """
    device = check_inputs(cfg)
    if cfg.trainer.deterministic:
        make_deterministic()
    jobs_at_once = parallel_jobs()
    if jobs_at_once is not None:
        device = device_for_job(device, HydraConfig.get().job.num, torch.cuda.device_count())
    torch.set_num_threads(cpu_threads(cfg.trainer.num_threads, jobs_at_once))
    cfg_hash = config_hash(cfg)
    if cfg.resume and (finished := tracking.find_run(cfg, cfg_hash, "FINISHED")):
        log.info(f"resume: {finished.info.run_name} already finished as run {finished.info.run_id}; skipped")
        return tracking.best_metric(cfg, finished.info.run_id, "val_acc")

    seed_everything(cfg.seed)
    data = load_splits(cfg.data, device)
    require(
        cfg.trainer.batch_size <= len(data.train),
        "trainer.batch_size",
        cfg.trainer.batch_size,
        f"at most the number of training images ({len(data.train)})",
    )
    model = build_model(cfg, data.num_features, data.num_classes).to(device)
    optimizer = build_optimizer(cfg.optimizer, model.parameters())
    generator = torch.Generator(device=device).manual_seed(cfg.seed)
    num_params = count_parameters(model)
    checkpoint = checkpoint_path(launch_dir() / cfg.trainer.checkpoint_dir, cfg_hash)
    unfinished = tracking.find_run(cfg, cfg_hash, "RUNNING") if cfg.resume and checkpoint.is_file() else None
    history = load_checkpoint(checkpoint, model, optimizer, generator) if unfinished else []
    title = tracking.run_name(cfg)
    log.info(f"{title} on {device} ({torch.get_num_threads()} CPU threads), {num_params:,} parameters:\n{model}")
    probe = ActivationProbe(
        model, data.test.x[: cfg.probe.num_samples], cfg.activation.name, cfg.probe.saturation_margin, cfg.probe.bins
    )

    resume_run_id = unfinished.info.run_id if unfinished else None
    train_step = step_kind(model, optimizer, cfg.trainer.fast_step, cfg.trainer.precision)
    run = tracking.job_run(cfg, num_params, train_step, cfg_hash, resume_run_id)
    with run, tempfile.TemporaryDirectory() as workdir:
        start = time.perf_counter()
        probe_log = tracking.ProbeLog(probe, figure_epochs(cfg), title, Path(workdir)) if cfg.probe.enabled else None
        if history:
            log.info(f"resume: run {resume_run_id} continues after epoch {len(history)}")
            tracking.log_missing_epochs(history)
        elif probe_log:
            probe_log(0)  # the distributions at initialisation

        def on_epoch_end(history: list[EpochMetrics]) -> None:
            save_checkpoint(checkpoint, cfg, model, optimizer, generator, history)
            metrics = history[-1]
            log.info(metrics.log_line())
            tracking.log_epoch(metrics)
            if probe_log:
                probe_log(metrics.epoch)

        history = fit(model, optimizer, data, cfg.trainer, generator, on_epoch_end, history=history)
        test_loss, test_acc = evaluate(model, data.test, cfg.trainer.eval_batch_size, cfg.trainer.precision)
        log.info(f"Test >> loss {test_loss:.5f} acc {test_acc:.5f}")
        tracking.log_test(test_loss, test_acc)
        confusion = confusion_counts(
            model, data.test, cfg.trainer.eval_batch_size, data.num_classes, cfg.trainer.precision
        )
        tracking.log_run_figures(history, confusion, title)
        if probe_log:
            probe_log.finish(run_seconds=time.perf_counter() - start)
        if cfg.tracking.log_model:
            tracking.log_model(model, data.test.x[:5])
    checkpoint.unlink(missing_ok=True)  # the run finished; its model is in MLflow
    return max(m.val_acc for m in history)


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


def figure_epochs(cfg: DictConfig) -> set[int]:
    """Epoch 0, the last epoch, and every `probe.figure_every`-th epoch in between."""
    return {0, cfg.trainer.max_epochs, *range(cfg.probe.figure_every, cfg.trainer.max_epochs, cfg.probe.figure_every)}


@hydra.main(version_base="1.3", config_path=str(CONFIG_DIR), config_name="train")
def main(cfg: DictConfig) -> float | None:
    """Run `train(cfg)`. In a multirun a failing job is recorded on the parent run and the sweep goes on."""
    multirun = HydraConfig.get().mode == RunMode.MULTIRUN
    try:
        return train(cfg)
    except INPUT_ERRORS as err:
        log.error(str(err))
        if not multirun:
            raise SystemExit(2) from None
        failure: Exception = err
    except Exception as err:
        if not multirun:
            raise
        log.exception(f"job failed: {err}")
        failure = err
    tracking.record_job_failure(cfg, failure)
    return None  # no objective: the Optuna sweeper marks the trial FAIL and the study goes on
