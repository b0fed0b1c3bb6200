"""End to end in subprocesses: a real Hydra multirun, its failures, and the MLflow server's view of it."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import requests
from conftest import REPO_ROOT, mlflow_server, sqlite_uri, tiny_overrides
from mlflow.tracking import MlflowClient

from mlpsweep.console import JOB_END_TAG_PREFIX
from mlpsweep.tracking import FAILED_JOB_TAG_PREFIX, ROLE_TAG

pytestmark = pytest.mark.slow


def run_train(args: list[str], cwd: Path, **env: str) -> subprocess.CompletedProcess:
    """`python train.py --multirun *args` in cwd, without the caller's MLFLOW_TRACKING_URI unless given."""
    environment = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"} | env
    result = subprocess.run(
        [sys.executable, str(REPO_ROOT / "train.py"), "--multirun", *args],
        cwd=cwd,
        env=environment,
        capture_output=True,
        text=True,
        timeout=600,
    )
    print(result.stdout[-5000:], result.stderr[-5000:])
    return result


def sweep_runs(client: MlflowClient):
    experiment = client.get_experiment_by_name("mlpsweep")
    runs = client.search_runs([experiment.experiment_id])
    parents = [r for r in runs if r.data.tags.get(ROLE_TAG) == "sweep"]
    children = [r for r in runs if r.data.tags.get(ROLE_TAG) == "job"]
    assert len(parents) + len(children) == len(runs)
    return parents, children


def test_multirun_makes_one_parent_with_a_child_per_job(tiny_mnist_root: Path, tmp_path: Path) -> None:
    args = ["activation=sigmoid,relu", "norm=none,batchnorm", "trainer.max_epochs=1", "data.limit_train=300", "probe.enabled=false"]
    result = run_train(tiny_overrides(tiny_mnist_root) + args + [f"hydra.sweep.dir={tmp_path / 'multirun'}"], cwd=tmp_path)
    assert result.returncode == 0

    # the default store: mlflow.db in the launch directory, artifacts beside it, no ./mlruns
    assert (tmp_path / "mlflow.db").is_file() and not (tmp_path / "mlruns").exists()
    client = MlflowClient(sqlite_uri(tmp_path))
    parents, children = sweep_runs(client)
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    assert parents[0].info.run_name.startswith("sweep-")
    assert len(children) == 4
    assert {c.info.run_name for c in children} == {
        f"{act}-{norm}-p0-1024x300-s0" for act in ("sigmoid", "relu") for norm in ("none", "batchnorm")
    }
    for child in children:
        assert child.info.status == "FINISHED"
        assert child.data.tags["mlflow.parentRunId"] == parents[0].info.run_id
        assert [m.step for m in client.get_metric_history(child.info.run_id, "accuracy/val")] == [1]
        assert "accuracy/test" in child.data.metrics
        assert f"[{child.info.run_name}] Iter: 1 >> T_loss" in result.stdout + result.stderr

    # the parent answers "what was this sweep and what won": its axes, its outcome, a description
    parent = parents[0]
    assert parent.data.params == {"activation": "sigmoid,relu", "norm": "none,batchnorm"}
    accuracies = {c.info.run_name: c.data.metrics["accuracy/test"] for c in children}
    best = max(accuracies, key=accuracies.get)
    assert parent.data.metrics == pytest.approx(
        {"jobs_finished": 4, "jobs_failed": 0, "best_test_acc": accuracies[best], "mean_test_acc": sum(accuracies.values()) / 4}
    )
    note = parent.data.tags["mlflow.note.content"]
    assert "activation=sigmoid,relu norm=none,batchnorm" in note and f"Best: **{best}**" in note
    assert not [tag for tag in parent.data.tags if tag.startswith(JOB_END_TAG_PREFIX)]  # progress marks are cleared
    output = result.stdout + result.stderr
    assert [f"job {n}/4 done (" in output for n in range(1, 5)] == [True] * 4


def test_failing_jobs_are_listed_and_the_sweep_goes_on(tiny_mnist_root: Path, tmp_path: Path) -> None:
    # lr=1e30 diverges inside its run (jobs 2 and 3); the other jobs still run and finish
    args = ["optimizer.lr=0.1,1e30", "seed=0,1", "trainer.max_epochs=1", "probe.enabled=false"]
    result = run_train(
        tiny_overrides(tiny_mnist_root) + args + [f"hydra.sweep.dir={tmp_path / 'multirun'}"],
        cwd=tmp_path,
        MLFLOW_TRACKING_URI=sqlite_uri(tmp_path / "elsewhere"),
    )
    assert result.returncode == 1
    output = result.stdout + result.stderr
    assert "2 job(s) failed" in output and "job 2: [" in output and "job 3: [" in output

    parents, children = sweep_runs(MlflowClient(sqlite_uri(tmp_path / "elsewhere")))
    assert len(parents) == 1 and parents[0].info.status == "FAILED"
    failures = {k: v for k, v in parents[0].data.tags.items() if k.startswith(FAILED_JOB_TAG_PREFIX)}
    assert sorted(failures) == [f"{FAILED_JOB_TAG_PREFIX}{n}" for n in (2, 3)]
    assert all("optimizer.lr=1e+30" in v and "DivergenceError: loss diverged" in v for v in failures.values())
    assert sorted(c.info.status for c in children) == ["FAILED", "FAILED", "FINISHED", "FINISHED"]
    assert parents[0].data.metrics["jobs_finished"] == 2 and parents[0].data.metrics["jobs_failed"] == 2
    assert "2 of 4 configs finished, 2 failed." in parents[0].data.tags["mlflow.note.content"]


def test_mlflow_server_shows_the_sweep(tiny_mnist_root: Path, tmp_path: Path) -> None:
    args = tiny_overrides(tiny_mnist_root, tmp_path) + ["norm=none,layernorm"]
    assert run_train(args + [f"hydra.sweep.dir={tmp_path / 'multirun'}"], cwd=tmp_path).returncode == 0

    with mlflow_server(tmp_path) as uri:
        api = f"{uri}/api/2.0/mlflow"
        experiment = requests.get(f"{api}/experiments/get-by-name", params={"experiment_name": "mlpsweep"}).json()
        runs = requests.post(f"{api}/runs/search", json={"experiment_ids": [experiment["experiment"]["experiment_id"]]}).json()["runs"]
        by_name = {run["info"]["run_name"]: run for run in runs}
        assert set(by_name) - {n for n in by_name if n.startswith("sweep-")} == {
            "relu-none-p0-1024x300-s0",
            "relu-layernorm-p0-1024x300-s0",
        }
        child = by_name["relu-layernorm-p0-1024x300-s0"]
        tags = {t["key"]: t["value"] for t in child["data"]["tags"]}
        parent_name = next(n for n in by_name if n.startswith("sweep-"))
        assert tags["mlflow.parentRunId"] == by_name[parent_name]["info"]["run_id"]
        history = requests.get(
            f"{api}/metrics/get-history", params={"run_id": child["info"]["run_id"], "metric_key": "accuracy/val"}
        ).json()["metrics"]
        assert [m["step"] for m in history] == [1, 2]


def test_console_script_prints_the_composed_config(tmp_path: Path) -> None:
    script = Path(sys.executable).parent / "mlpsweep-train"
    result = subprocess.run([str(script), "--cfg", "job", "activation=tanh"], cwd=tmp_path, capture_output=True, text=True)
    assert result.returncode == 0
    assert "name: tanh" in result.stdout and "widths:" in result.stdout
