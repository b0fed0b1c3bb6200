"""resume=true: finished configs are skipped, failed ones rerun, a killed job continues bit for bit."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from conftest import REPO_ROOT, sqlite_uri, tiny_overrides
from mlflow.tracking import MlflowClient
from omegaconf import DictConfig

from mlpsweep.checkpoint import CheckpointIdentity, checkpoint_path, config_hash, save_checkpoint
from mlpsweep.cli import train
from mlpsweep.data import dataset_digest
from mlpsweep.engine import EpochMetrics, build_optimizer
from mlpsweep.model import build_model
from mlpsweep.tracking import CONFIG_HASH_TAG, ERROR_TAG, ROLE_TAG, resolve_tracking_uri

pytestmark = pytest.mark.slow


def train_command(data_root: Path, store_dir: Path, *args: str, multirun: bool = False) -> list[str]:
    mode = ["--multirun"] if multirun else []
    return [sys.executable, str(REPO_ROOT / "train.py"), *mode, *tiny_overrides(data_root, store_dir), "resume=true", *args]


def job_runs(store_dir: Path) -> list:
    client = MlflowClient(sqlite_uri(store_dir))
    runs = client.search_runs([client.get_experiment_by_name("mlpsweep").experiment_id], max_results=1000)
    return [r for r in runs if r.data.tags.get(ROLE_TAG) == "job"]


def test_config_hash_ignores_where_things_go(tiny_cfg: Callable[..., DictConfig]) -> None:
    base = config_hash(tiny_cfg())
    assert base == config_hash(tiny_cfg("tracking.uri=sqlite:///elsewhere.db", "trainer.progress_bar=true", "data.root=/x"))
    assert base != config_hash(tiny_cfg("seed=1")) and base != config_hash(tiny_cfg("dropout.p=0.1"))


def test_rerunning_a_sweep_skips_finished_and_reruns_failed(tiny_mnist_root: Path, tmp_path: Path) -> None:
    command = train_command(tiny_mnist_root, tmp_path, "optimizer.lr=0.1,1e30", "seed=0,1", "depth.widths=[32]", multirun=True)
    for attempt in range(2):
        result = subprocess.run(command + [f"hydra.sweep.dir={tmp_path / f'm{attempt}'}"], cwd=tmp_path, capture_output=True, text=True, timeout=600)
        assert result.returncode == 1  # the lr=1e30 jobs diverge, both times
    assert (result.stdout + result.stderr).count("already finished as run") == 2
    runs = job_runs(tmp_path)
    by_hash: dict[str, list[str]] = {}
    for run in runs:
        by_hash.setdefault(run.data.tags[CONFIG_HASH_TAG], []).append(run.info.status)
    assert sorted(map(sorted, by_hash.values())) == [["FAILED", "FAILED"], ["FAILED", "FAILED"], ["FINISHED"], ["FINISHED"]]


def test_rerunning_an_identical_config_without_resume_makes_a_new_run(tiny_cfg: Callable[..., DictConfig], tmp_path: Path) -> None:
    train(tiny_cfg("trainer.max_epochs=1", "depth.widths=[16]"))
    train(tiny_cfg("trainer.max_epochs=1", "depth.widths=[16]"))  # no "Changing param values is not allowed"
    assert [r.info.status for r in job_runs(tmp_path)] == ["FINISHED", "FINISHED"]


def test_a_killed_job_resumes_to_the_metrics_of_an_uninterrupted_run(tiny_mnist_root: Path, tmp_path: Path) -> None:
    """With every piece of state a run carries: dropout's random stream, a per-step learning-rate
    schedule, and early stopping that tests the best epoch's weights."""
    stopping = ["trainer.early_stopping.monitor=val_acc", "trainer.early_stopping.patience=3", "trainer.early_stopping.min_delta=0.02"]
    args = ["trainer.max_epochs=25", "dropout=lecture", "seed=3", "probe.enabled=false", "scheduler=onecycle", *stopping]
    subprocess.run(train_command(tiny_mnist_root, tmp_path / "whole", *args), cwd=tmp_path, check=True, capture_output=True, timeout=600)

    killed_dir = tmp_path / "killed"
    command = train_command(tiny_mnist_root, killed_dir, *args, f"hydra.run.dir={killed_dir / 'run'}")
    process = subprocess.Popen(command, cwd=killed_dir.parent, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    checkpoints = killed_dir.parent / "checkpoints"
    while not any(checkpoints.glob("*.pt")) and process.poll() is None:  # epoch 1 is done and saved
        time.sleep(0.02)
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    (killed,) = job_runs(killed_dir)
    assert killed.info.status == "RUNNING"  # SIGKILL: nobody closed the run
    # the checkpoint is written before an epoch's metrics are logged, so 0 logged epochs is possible:
    # the resumed run then logs the epochs it has from the checkpoint
    epochs_before = len(MlflowClient(sqlite_uri(killed_dir)).get_metric_history(killed.info.run_id, "accuracy/val"))
    assert epochs_before < 25 and any(checkpoints.glob("*.pt"))

    subprocess.run(command, cwd=killed_dir.parent, check=True, capture_output=True, timeout=600)
    (whole,), (resumed,) = job_runs(tmp_path / "whole"), job_runs(killed_dir)
    assert resumed.info.run_id == killed.info.run_id and resumed.info.status == "FINISHED"
    histories = []
    for store, run in ((tmp_path / "whole", whole), (killed_dir, resumed)):
        client = MlflowClient(sqlite_uri(store))
        histories.append({key: [(m.step, m.value) for m in client.get_metric_history(run.info.run_id, key)]
                          for key in ("loss/train", "loss/val", "accuracy/val", "lr")})  # fmt: skip
    assert histories[0] == histories[1]
    assert len(histories[0]["accuracy/val"]) == whole.data.metrics["stopped_epoch"] < 25  # stopped early ...
    assert whole.data.metrics["best_epoch"] < whole.data.metrics["stopped_epoch"]  # ... and tested an earlier epoch
    for key in ("accuracy/test", "loss/test", "best_epoch", "stopped_epoch"):
        assert resumed.data.metrics[key] == whole.data.metrics[key], key
    assert not any(checkpoints.glob("*.pt"))  # removed once the run finished


def test_deterministic_switch_sets_up_torch_before_training(tiny_cfg: Callable[..., DictConfig], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    try:
        first = train(tiny_cfg("trainer.deterministic=true", "dropout=lecture", "depth.widths=[32]"))
        assert torch.are_deterministic_algorithms_enabled() and not torch.backends.cudnn.benchmark
        assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8"
        assert first == train(tiny_cfg("trainer.deterministic=true", "dropout=lecture", "depth.widths=[32]"))
    finally:
        torch.use_deterministic_algorithms(False)
        torch.backends.cudnn.deterministic = False


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_deterministic_switch_makes_gpu_runs_repeatable(tiny_cfg: Callable[..., DictConfig], tmp_path: Path) -> None:
    first = train(tiny_cfg("trainer.device=cuda", "trainer.deterministic=true", "dropout=lecture"))
    second = train(tiny_cfg("trainer.device=cuda", "trainer.deterministic=true", "dropout=lecture"))
    assert first == second


def test_a_checkpoint_whose_run_cannot_be_continued_does_not_seed_a_fresh_run(tiny_cfg: Callable[..., DictConfig]) -> None:
    """The run a checkpoint belongs to is gone: the job starts afresh, not from the file's weights."""
    small = ["depth.widths=[16]", "probe.enabled=false"]
    cfg = tiny_cfg(*small, "resume=true")
    identity = CheckpointIdentity(resolve_tracking_uri(cfg.tracking.uri), cfg.tracking.experiment, config_hash(cfg),
                                  dataset_digest(cfg.data.name, cfg.data.root))  # fmt: skip
    model = build_model(cfg, 784, 10)
    for parameter in model.parameters():
        parameter.data.zero_()
    optimizer = build_optimizer(cfg.optimizer, model.parameters())
    path = checkpoint_path(Path(cfg.trainer.checkpoint_dir), identity)
    save_checkpoint(path, identity, "no-such-run", cfg, model, optimizer, torch.Generator(), [EpochMetrics(1, 9, 0, 9, 0, 1)])
    assert train(cfg) == train(tiny_cfg(*small))  # the same as a run that never saw the checkpoint


def test_a_run_left_running_without_a_checkpoint_ends_when_resume_trains_its_config_again(
    tiny_cfg: Callable[..., DictConfig], tmp_path: Path
) -> None:
    """A job whose last status update never reached the store (an outage as it ended, its checkpoint
    already gone) leaves a RUNNING run with logged epochs: resume=true trains the config in a new
    run and ends the old one FAILED, so that nothing stays RUNNING."""
    cfg = tiny_cfg("trainer.max_epochs=1", "depth.widths=[16]", "probe.enabled=false", "resume=true")
    train(cfg)
    client = MlflowClient(sqlite_uri(tmp_path))
    [stale] = job_runs(tmp_path)
    client.update_run(stale.info.run_id, status="RUNNING")
    train(cfg)
    runs = {run.info.run_id: run for run in job_runs(tmp_path)}
    assert len(runs) == 2
    assert runs[stale.info.run_id].info.status == "FAILED"
    assert "resume=true trains its config in a new run" in runs[stale.info.run_id].data.tags[ERROR_TAG]
    assert [run.info.status for run_id, run in runs.items() if run_id != stale.info.run_id] == ["FINISHED"]
