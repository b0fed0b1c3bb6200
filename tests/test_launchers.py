"""Beyond the basic launcher: Optuna search, SLURM's submitit (local executor), a shared mlflow server."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from conftest import REPO_ROOT, compose_config, mlflow_server, sqlite_uri, tiny_overrides
from mlflow.tracking import MlflowClient

from mlpsweep.tracking import FAILED_JOB_TAG_PREFIX, ROLE_TAG

pytestmark = pytest.mark.slow
SMALL = ["depth.widths=[32]", "trainer.max_epochs=1", "probe.enabled=false"]  # the probe is tested elsewhere


def train_cli(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    result = subprocess.run([sys.executable, str(REPO_ROOT / "train.py"), *args], cwd=cwd, capture_output=True, text=True, timeout=600)
    print(result.stdout[-3000:], result.stderr[-3000:])
    return result


def parent_and_children(client: MlflowClient) -> tuple:
    runs = client.search_runs([client.get_experiment_by_name("mlpsweep").experiment_id])
    (parent,) = [r for r in runs if r.data.tags.get(ROLE_TAG) == "sweep"]
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert len(runs) == len(children) + 1
    return parent, children


def test_optuna_preset_composes() -> None:
    cfg = compose_config(["hparams_search=optuna"])
    assert cfg.activation.name == "relu"  # the search preset changes only Hydra's sweeper


def test_optuna_search_survives_failed_trials(tiny_mnist_root: Path, tmp_path: Path) -> None:
    # lr=1e30 diverges: those trials fail, the study runs all 4 trials and reports the best
    args = ["hparams_search=optuna", "hydra.sweeper.n_trials=4", "optimizer.lr=choice(0.1,1e30)", "depth=one",
            *tiny_overrides(tiny_mnist_root, tmp_path), *SMALL, f"hydra.sweep.dir={tmp_path / 'm'}"]  # fmt: skip
    result = train_cli(args, tmp_path)
    assert result.returncode == 1  # some trials failed
    parent, children = parent_and_children(MlflowClient(sqlite_uri(tmp_path)))
    statuses = sorted(c.info.status for c in children)
    assert len(children) == 4 and "FINISHED" in statuses and "FAILED" in statuses
    failed = [k for k in parent.data.tags if k.startswith(FAILED_JOB_TAG_PREFIX)]
    assert len(failed) == statuses.count("FAILED") and parent.info.status == "FAILED"
    results = yaml.safe_load((tmp_path / "m" / "optimization_results.yaml").read_text())
    assert results["best_params"]["optimizer.lr"] == 0.1
    best = max(c.data.metrics["accuracy/val"] for c in children if c.info.status == "FINISHED")
    assert results["best_value"] == pytest.approx(best)


def test_submitit_local_executor(tiny_mnist_root: Path, tmp_path: Path) -> None:
    args = ["--multirun", "hydra/launcher=submitit_local", "activation=sigmoid,relu",
            *tiny_overrides(tiny_mnist_root, tmp_path), *SMALL, f"hydra.sweep.dir={tmp_path / 'm'}"]  # fmt: skip
    assert train_cli(args, tmp_path).returncode == 0
    parent, children = parent_and_children(MlflowClient(sqlite_uri(tmp_path)))
    assert parent.info.status == "FINISHED" and len(children) == 2
    assert all(c.info.status == "FINISHED" for c in children)
    assert len(list((tmp_path / "m" / ".submitit").rglob("*_log.out"))) == 2  # real submitit jobs


def test_slurm_preset_composes() -> None:
    from hydra import compose, initialize_config_dir

    from mlpsweep.config import CONFIG_DIR

    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        cfg = compose(config_name="train", overrides=["hydra/launcher=slurm"], return_hydra_config=True)
    launcher = cfg.hydra.launcher
    assert launcher._target_.endswith("SlurmLauncher")
    assert (launcher.gpus_per_node, launcher.timeout_min, launcher.array_parallelism) == (1, 120, 32)


def test_parallel_sweep_against_an_mlflow_server(tiny_mnist_root: Path, tmp_path: Path) -> None:
    with mlflow_server(tmp_path / "server") as uri:
        args = ["--multirun", "hydra/launcher=joblib", "hydra.launcher.n_jobs=2", "activation=sigmoid,relu",
                "norm=none,batchnorm", *tiny_overrides(tiny_mnist_root), *SMALL, f"tracking.uri={uri}",
                f"hydra.sweep.dir={tmp_path / 'm'}"]  # fmt: skip
        assert train_cli(args, tmp_path).returncode == 0
        client = MlflowClient(uri)
        parent, children = parent_and_children(client)
        assert parent.info.status == "FINISHED" and len(children) == 4
        assert all(c.info.status == "FINISHED" and "accuracy/test" in c.data.metrics for c in children)
        assert "config.yaml" in {a.path for a in client.list_artifacts(children[0].info.run_id)}  # proxied artifacts


def test_a_sweep_composes_each_job_once(monkeypatch: pytest.MonkeyPatch) -> None:
    """The preflight's compositions answer the sweep's config loader: Hydra's basic sweeper (which
    composes a batch to check it) and the launchers get copies of their own, composed no more; a
    job the preflight did not compose, or a loader sent to another process, composes as before."""
    import pickle

    from hydra import compose, initialize_config_dir
    from hydra._internal.config_loader_impl import ConfigLoaderImpl
    from hydra.core.global_hydra import GlobalHydra
    from omegaconf import OmegaConf, open_dict

    from mlpsweep.config import CONFIG_DIR
    from mlpsweep.sweep import KeptCompositions

    composed: list[list[str]] = []
    own = ConfigLoaderImpl.load_sweep_config

    def counted(self: ConfigLoaderImpl, master_config: Any, sweep_overrides: list[str]) -> Any:
        composed.append(list(sweep_overrides))
        return own(self, master_config, sweep_overrides)

    monkeypatch.setattr(ConfigLoaderImpl, "load_sweep_config", counted)
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        config = compose(config_name="train", return_hydra_config=True)
        loader = GlobalHydra.instance().config_loader()
        compositions = KeptCompositions.install(loader, config, uses=2)  # the sweeper's check, the launch
        kept = compositions.compose(config, ["activation=tanh"])  # as the preflight does
        compositions.keep(["activation=tanh"], kept)
        sent = pickle.loads(pickle.dumps(loader))  # as joblib and submitit send Hydra's context
        first, second = (loader.load_sweep_config(config, ["activation=tanh"]) for _ in range(2))
        assert composed == [["activation=tanh"]]
        assert first == second == kept and first is not kept and second is not first
        with open_dict(first):
            first.hydra.job.num = 7  # what a launcher does to its copy
        assert OmegaConf.is_missing(kept.hydra.job, "num") and OmegaConf.is_missing(second.hydra.job, "num")
        assert loader.load_sweep_config(config, ["activation=tanh"]) == kept  # its two uses answered: gone
        assert loader.load_sweep_config(config, ["activation=relu"]).activation.name == "relu"
        assert composed[1:] == [["activation=tanh"], ["activation=relu"]]
        assert sent.load_sweep_config(config, ["activation=tanh"]) == kept
        assert composed[-1] == ["activation=tanh"] and len(composed) == 4
