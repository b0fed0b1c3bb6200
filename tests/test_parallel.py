"""Parallel sweeps with Hydra's joblib launcher against a fresh SQLite store: no race, no lost run."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO_ROOT, sqlite_uri, tiny_overrides
from mlflow.tracking import MlflowClient

from mlpsweep.tracking import ROLE_TAG

pytestmark = pytest.mark.slow
RACE_ERRORS = ("database is locked", "duplicate column", "already exists")


def sweep_command(data_root: Path, store_dir: Path, sweep_dir: Path, n_jobs: int, seeds: str) -> list[str]:
    return [
        sys.executable, str(REPO_ROOT / "train.py"), "--multirun",
        *tiny_overrides(data_root, store_dir), "trainer.num_threads=null", "depth.widths=[32]", "probe.figure_every=10",
        "activation=sigmoid,relu", "norm=none,batchnorm", f"seed={seeds}",
        "hydra/launcher=joblib", f"hydra.launcher.n_jobs={n_jobs}", f"hydra.sweep.dir={sweep_dir}",
    ]  # fmt: skip


def all_output(result: subprocess.CompletedProcess, sweep_dir: Path) -> str:
    """What the launcher printed and every job's log file."""
    logs = [path.read_text() for path in sweep_dir.rglob("*.log")]
    return "\n".join([result.stdout, result.stderr, *logs])


def check_store(store_dir: Path, parents: int, children_per_parent: int) -> None:
    client = MlflowClient(sqlite_uri(store_dir))
    experiments = [e for e in client.search_experiments() if e.name != "Default"]  # MLflow's own, made with the store
    assert [e.name for e in experiments] == ["mlpsweep"]
    runs = client.search_runs([experiments[0].experiment_id], max_results=1000)
    sweep_runs = [r for r in runs if r.data.tags.get(ROLE_TAG) == "sweep"]
    assert len(sweep_runs) == parents and all(r.info.status == "FINISHED" for r in sweep_runs)
    for parent in sweep_runs:
        children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
        assert len(children) == children_per_parent
        for child in children:
            assert child.info.status == "FINISHED"
            assert [m.step for m in client.get_metric_history(child.info.run_id, "accuracy/val")] == [1, 2]
            assert "accuracy/test" in child.data.metrics
    assert len(runs) == parents * (children_per_parent + 1)


@pytest.mark.parametrize(("seeds", "n_jobs"), [("0,1,2,3", 8)], ids=["16_jobs_8_parallel"])
def test_parallel_sweep_on_a_fresh_store(tiny_mnist_root: Path, tmp_path: Path, seeds: str, n_jobs: int) -> None:
    store = tmp_path / "store"  # does not exist yet: the sweep creates it
    sweep_dir = tmp_path / "multirun"
    result = subprocess.run(
        sweep_command(tiny_mnist_root, store, sweep_dir, n_jobs, seeds), cwd=tmp_path, capture_output=True, text=True, timeout=900
    )
    output = all_output(result, sweep_dir)
    assert result.returncode == 0, output[-3000:]
    assert not [e for e in RACE_ERRORS if e in output]
    check_store(store, parents=1, children_per_parent=4 * len(seeds.split(",")))
    # every line of a job names its run, so that the interleaved output can be read; the launcher counts the jobs down
    names = {r.info.run_name for r in MlflowClient(sqlite_uri(store)).search_runs(["1"]) if r.data.tags[ROLE_TAG] == "job"}
    iterations = [line for line in (result.stdout + result.stderr).splitlines() if "Iter: " in line]
    assert len(iterations) == 2 * len(names)
    assert all(re.search(r"\] - \[(.+?)\] Iter: ", line)[1] in names for line in iterations), iterations[:4]
    jobs = len(names)
    assert all(f"job {n}/{jobs} done (" in result.stdout + result.stderr for n in range(1, jobs + 1))
    threads = max(1, (os.cpu_count() or 1) // n_jobs)
    job_logs = "".join(path.read_text() for path in sweep_dir.rglob("*.log"))
    assert job_logs.count(f"({threads} CPU threads)") == 4 * len(seeds.split(","))


def test_two_sweeps_started_together_into_one_fresh_store(tiny_mnist_root: Path, tmp_path: Path) -> None:
    store = tmp_path / "store"
    commands = [sweep_command(tiny_mnist_root, store, tmp_path / f"multirun{i}", 2, "0") for i in (1, 2)]
    processes = [subprocess.Popen(c, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for c in commands]
    for i, process in enumerate(processes, start=1):
        stdout, stderr = process.communicate(timeout=900)
        output = all_output(subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr), tmp_path / f"multirun{i}")
        assert process.returncode == 0, output[-3000:]
        assert not [e for e in RACE_ERRORS if e in output]
    check_store(store, parents=2, children_per_parent=4)


@pytest.mark.slow
def test_one_named_sweep_started_twice_at_once_is_one_sweep(tiny_mnist_root: Path, tmp_path: Path) -> None:
    """Each launcher looks for the sweep's earlier parent run and creates it under the store's lock:
    the second finds the first's and is refused as a rerun, instead of making a second `dup`."""
    store = tmp_path / "store"
    commands = [[*sweep_command(tiny_mnist_root, store, tmp_path / f"multirun{i}", 1, "0"), "tracking.sweep_name=dup",
                 "activation=relu", "norm=none"] for i in (1, 2)]  # fmt: skip
    processes = [subprocess.Popen(c, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for c in commands]
    results = [process.communicate(timeout=600) for process in processes]
    codes = sorted(process.returncode for process in processes)
    assert codes == [0, 2], results
    refused = next(out + err for (out, err), p in zip(results, processes, strict=True) if p.returncode == 2)
    assert "tracking.sweep_name='dup': this sweep already exists" in refused
    check_store(store, parents=1, children_per_parent=1)
