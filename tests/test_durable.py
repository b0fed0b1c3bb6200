"""A sweep is one durable thing: one parent for its whole life, true exit codes, interrupts that
pause, bounded outages. Real processes, real signals, real stores and servers."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from conftest import REPO_ROOT, MlflowServer, sqlite_uri, tiny_overrides
from mlflow.tracking import MlflowClient

from mlpsweep.sweep import LAUNCHER_TAG
from mlpsweep.tracking import CONFIG_HASH_TAG, ERROR_TAG, ROLE_TAG, describe, prepare_store

pytestmark = pytest.mark.slow
EPOCHS = 25
LONG = [f"trainer.max_epochs={EPOCHS}", "probe.enabled=false", "depth.widths=[64]"]


def command(data_root: Path, store_dir: Path, *args: str) -> list[str]:
    return [sys.executable, str(REPO_ROOT / "train.py"), "--multirun", *tiny_overrides(data_root, store_dir), *args]


def run(args: list[str], cwd: Path, timeout: float = 300) -> subprocess.CompletedProcess:
    result = subprocess.run(args, cwd=cwd, capture_output=True, text=True, timeout=timeout)
    print(result.stdout[-4000:], result.stderr[-4000:])
    return result


def store_runs(store: str) -> tuple[list, list]:
    """(parents, children) of the mlpsweep experiment."""
    client = MlflowClient(store)
    runs = client.search_runs([client.get_experiment_by_name("mlpsweep").experiment_id], max_results=1000)
    parents = [r for r in runs if r.data.tags.get(ROLE_TAG) == "sweep"]
    children = [r for r in runs if r.data.tags.get(ROLE_TAG) == "job"]
    assert len(parents) + len(children) == len(runs)
    return parents, children


def histories(store: str, run_id: str) -> dict[str, list]:
    client = MlflowClient(store)
    return {key: [(m.step, m.value) for m in client.get_metric_history(run_id, key)]
            for key in ("loss/train", "loss/val", "accuracy/val", "accuracy/test")}  # fmt: skip


def wait_until(process: subprocess.Popen, condition: Callable[[], bool], what: str) -> None:
    """Until `condition()`, while `process` runs (at most 2 minutes)."""
    deadline = time.monotonic() + 120
    while not condition():
        assert process.poll() is None and time.monotonic() < deadline, f"{what} never happened"
        time.sleep(0.02)


def wait_for_a_checkpoint(process: subprocess.Popen, checkpoints: Path) -> None:
    """Until a job of `process` has finished its first epoch (and written its checkpoint)."""
    wait_until(process, lambda: any(checkpoints.glob("*.pt")), "a checkpoint")


def test_ctrl_c_pauses_the_sweep_and_resume_completes_it_under_one_parent(tiny_mnist_root: Path, tmp_path: Path) -> None:
    """The Quickstart case: Ctrl-C in the middle of a sweep, then the same command with resume=true."""
    sweep = command(tiny_mnist_root, tmp_path, "activation=sigmoid,relu", *LONG)
    process = subprocess.Popen(sweep, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    wait_for_a_checkpoint(process, tmp_path / "checkpoints")
    os.kill(process.pid, signal.SIGINT)
    output, _ = process.communicate(timeout=120)
    print(output[-4000:])
    assert process.returncode == 130
    assert "Traceback" not in output and "KeyboardInterrupt" not in output
    assert "resume=true" in output.splitlines()[-1]  # the last line says how to continue
    store = sqlite_uri(tmp_path)
    (parent,), children = store_runs(store)
    assert parent.info.status == "KILLED" and "interrupted" in parent.data.tags[ERROR_TAG]
    (killed,) = children  # the first job stopped at a step boundary; no other job started
    assert killed.info.status == "KILLED" and "SIGINT" in killed.data.tags[ERROR_TAG]
    assert any((tmp_path / "checkpoints").glob("*.pt"))  # its last epoch's checkpoint stays
    epochs_before = len(histories(store, killed.info.run_id)["accuracy/val"])
    assert 1 <= epochs_before < EPOCHS

    result = run(sweep + ["resume=true"], tmp_path)
    assert result.returncode == 0
    (parent_after,), children = store_runs(store)
    assert parent_after.info.run_id == parent.info.run_id and parent_after.info.status == "FINISHED"
    assert ERROR_TAG not in parent_after.data.tags
    assert len(children) == 2 and {c.info.status for c in children} == {"FINISHED"}
    assert len({c.data.tags[CONFIG_HASH_TAG] for c in children}) == 2
    resumed = next(c for c in children if c.info.run_id == killed.info.run_id)  # the same run, continued
    assert not any((tmp_path / "checkpoints").glob("*.pt"))

    # bit for bit the run an uninterrupted sweep of that config makes
    whole = tmp_path / "whole"
    whole.mkdir()
    activation = resumed.data.params["activation.name"]
    assert run(command(tiny_mnist_root, whole, f"activation={activation}", *LONG), whole).returncode == 0
    (_, (reference,)) = store_runs(sqlite_uri(whole))
    assert histories(sqlite_uri(whole), reference.info.run_id) == histories(store, resumed.info.run_id)

    # the report of the sweep covers both configs
    report = run([sys.executable, str(REPO_ROOT / "report.py"), "--tracking-uri", store, "--out", str(tmp_path / "r")], tmp_path)
    assert report.returncode == 0 and "(2 runs)" in report.stdout


def test_sigterm_to_a_joblib_launcher_stops_every_running_job_safely(tiny_mnist_root: Path, tmp_path: Path) -> None:
    """SLURM's pre-emption signal reaches the launcher: its workers stop, their runs end KILLED."""
    sweep = command(tiny_mnist_root, tmp_path, "activation=sigmoid,relu", "seed=0,1", *LONG,
                    "hydra/launcher=joblib", "hydra.launcher.n_jobs=2")  # fmt: skip
    process = subprocess.Popen(sweep, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    wait_for_a_checkpoint(process, tmp_path / "checkpoints")
    os.kill(process.pid, signal.SIGTERM)
    output, _ = process.communicate(timeout=120)
    print(output[-4000:])
    assert process.returncode == 130 and "Traceback" not in output
    (parent,), children = store_runs(sqlite_uri(tmp_path))
    assert parent.info.status == "KILLED"
    assert children and {c.info.status for c in children} == {"KILLED"}  # none left RUNNING

    assert run(sweep + ["resume=true"], tmp_path).returncode == 0
    (parent_after,), children_after = store_runs(sqlite_uri(tmp_path))
    assert parent_after.info.run_id == parent.info.run_id and parent_after.info.status == "FINISHED"
    assert len(children_after) == 4 and {c.info.status for c in children_after} == {"FINISHED"}
    assert {c.info.run_id for c in children} <= {c.info.run_id for c in children_after}  # continued, not redone


def test_ctrl_c_in_a_terminal_stops_a_joblib_sweep_with_more_workers_than_jobs(tiny_mnist_root: Path, tmp_path: Path) -> None:
    """The terminal sends SIGINT to the whole process group, idle workers included."""
    sweep = command(tiny_mnist_root, tmp_path, "activation=sigmoid,relu", *LONG, "hydra/launcher=joblib", "hydra.launcher.n_jobs=4")
    process = subprocess.Popen(sweep, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                               start_new_session=True)  # fmt: skip
    wait_for_a_checkpoint(process, tmp_path / "checkpoints")
    os.killpg(process.pid, signal.SIGINT)
    output, _ = process.communicate(timeout=120)
    print(output[-4000:])
    assert process.returncode == 130 and "Traceback" not in output
    (parent,), children = store_runs(sqlite_uri(tmp_path))
    assert parent.info.status == "KILLED" and children and {c.info.status for c in children} == {"KILLED"}


def refused_while_it_runs(launcher: subprocess.Popen, sweep: list[str], cwd: Path, running: Callable[[], bool]) -> None:
    """Once `running()`, `resume=true` of `sweep` is refused (exit 2) naming `launcher`, which is stopped then."""
    try:
        wait_until(launcher, running, "the launcher taking the sweep")
        again = run(sweep + ["resume=true"], cwd)
        assert again.returncode == 2
        assert f"is still running (its launcher is process {launcher.pid})" in again.stdout + again.stderr
    finally:
        launcher.send_signal(signal.SIGINT)
        assert launcher.wait(timeout=120) in (0, 130)


def test_resume_refuses_a_sweep_that_is_still_running(tiny_mnist_root: Path, tmp_path: Path) -> None:
    # long enough to be still running when the second launch has started (it is stopped below)
    sweep = command(tiny_mnist_root, tmp_path, "activation=sigmoid,relu", *LONG, "trainer.max_epochs=100000")
    quiet = {"stdout": subprocess.DEVNULL, "stderr": subprocess.DEVNULL}
    first = subprocess.Popen(sweep, cwd=tmp_path, **quiet)
    refused_while_it_runs(first, sweep, tmp_path, lambda: any((tmp_path / "checkpoints").glob("*.pt")))
    (parent,), _ = store_runs(sqlite_uri(tmp_path))  # the running sweep was left alone
    assert parent.info.status in ("KILLED", "FINISHED")

    # a resumed launcher is refused likewise (the parent run started before it: its start is in a tag)
    resumed = subprocess.Popen(sweep + ["resume=true"], cwd=tmp_path, **quiet)
    client = MlflowClient(sqlite_uri(tmp_path))
    launcher_pid = lambda: client.get_run(parent.info.run_id).data.tags.get(LAUNCHER_TAG, "").split(":")[-1]  # noqa: E731
    refused_while_it_runs(resumed, sweep, tmp_path, lambda: launcher_pid() == str(resumed.pid))


def test_a_sweep_name_is_one_sweep(tiny_mnist_root: Path, tmp_path: Path) -> None:
    small = ["trainer.max_epochs=1", "probe.enabled=false", "depth.widths=[16]", "tracking.sweep_name=ablation"]
    assert run(command(tiny_mnist_root, tmp_path, "activation=relu,tanh", *small), tmp_path).returncode == 0

    other = run(command(tiny_mnist_root, tmp_path, "activation=relu,sigmoid", *small), tmp_path)
    assert other.returncode == 2
    assert "tracking.sweep_name='ablation': a sweep of that name already exists with other overrides" in other.stdout
    again = run(command(tiny_mnist_root, tmp_path, "activation=relu,tanh", *small), tmp_path)
    assert again.returncode == 2 and "add resume=true to continue it" in again.stdout

    resumed = run(command(tiny_mnist_root, tmp_path, "activation=relu,tanh", *small, "resume=true"), tmp_path)
    assert resumed.returncode == 0 and resumed.stdout.count("already finished") + resumed.stderr.count("already finished") == 2
    parents, children = store_runs(sqlite_uri(tmp_path))
    assert [p.info.run_name for p in parents] == ["ablation"] and len(children) == 2


def test_resume_skips_only_this_sweeps_finished_configs(tiny_mnist_root: Path, tmp_path: Path) -> None:
    small = ["trainer.max_epochs=1", "probe.enabled=false", "depth.widths=[16]"]
    assert run(command(tiny_mnist_root, tmp_path, "activation=relu,tanh", *small), tmp_path).returncode == 0
    # another sweep that shares the relu config: resume finds no parent of its own, says so, and runs everything
    other = run(command(tiny_mnist_root, tmp_path, "activation=relu,sigmoid", *small, "resume=true"), tmp_path)
    assert other.returncode == 0
    assert "resume=true: experiment 'mlpsweep' has no earlier sweep of these overrides; this starts a new sweep" in (
        other.stdout + other.stderr
    )
    # the first sweep's values in another order: the same grid, the same sweep, nothing run again
    again = run(command(tiny_mnist_root, tmp_path, "activation=tanh,relu", *small, "resume=true"), tmp_path)
    assert again.returncode == 0 and (again.stdout + again.stderr).count("already finished") == 2
    parents, children = store_runs(sqlite_uri(tmp_path))
    assert len(parents) == 2 and len(children) == 4
    for parent in parents:
        assert parent.info.status == "FINISHED"
        assert sum(c.data.tags["mlflow.parentRunId"] == parent.info.run_id for c in children) == 2


def test_a_dead_tracking_server_stops_the_sweep_fast(tiny_mnist_root: Path, tmp_path: Path) -> None:
    """The basic launcher's side of an outage (test_postgres.py restarts the server and resumes,
    under joblib): the job in training fails, no further job starts, one line names the server."""
    with MlflowServer(tmp_path / "server") as server:
        sweep = command(tiny_mnist_root, tmp_path, "seed=0,1,2,3", *LONG, f"tracking.uri={server.uri}")
        process = subprocess.Popen(sweep, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        wait_for_a_checkpoint(process, tmp_path / "checkpoints")
        server.kill()
        killed_at = time.monotonic()
        output, _ = process.communicate(timeout=180)
    print(output[-4000:], f"\nthe sweep exited {time.monotonic() - killed_at:.1f} s after the server was killed")
    assert process.returncode == 1
    assert time.monotonic() - killed_at < 90  # bounded: not MLflow's half hour of retries
    last = output.strip().splitlines()[-1]
    assert server.uri in last and "does not answer" in last and "resume=true" in last
    assert "#1 :" not in output  # the next job was never launched
    assert any((tmp_path / "checkpoints").glob("*.pt"))  # the job's checkpoint stays for resume=true


def test_a_long_sqlite_lock_is_waited_out(tiny_mnist_root: Path, tmp_path: Path) -> None:
    small = ["trainer.max_epochs=1", "probe.enabled=false", "depth.widths=[16]", "tracking.sqlite_busy_timeout_s=90"]
    prepare_store(sqlite_uri(tmp_path), "mlpsweep")  # the store exists

    locked = threading.Event()

    def hold_lock(seconds: float) -> None:
        database = sqlite3.connect(tmp_path / "mlflow.db", isolation_level=None)
        database.execute("BEGIN EXCLUSIVE")
        locked.set()
        time.sleep(seconds)
        database.execute("COMMIT")
        database.close()

    holder = threading.Thread(target=hold_lock, args=(22,))  # longer than MLflow's own 20 s
    holder.start()
    locked.wait()
    result = run(command(tiny_mnist_root, tmp_path, "seed=1", *small), tmp_path)
    holder.join()
    assert result.returncode == 0
    _, children = store_runs(sqlite_uri(tmp_path))
    assert [c.info.status for c in children] == ["FINISHED"]


def test_error_tags_are_one_line_without_sql() -> None:
    from sqlalchemy.exc import OperationalError

    err = OperationalError("INSERT INTO tags (key, value) VALUES (?, ?)", ("a", "b"), sqlite3.OperationalError("database is locked"))
    assert describe(err) == "OperationalError: (sqlite3.OperationalError) database is locked"
    assert describe(ValueError("first\nsecond")) == "ValueError: first"


def test_a_store_that_fails_as_the_sweep_starts_is_not_a_success(tiny_mnist_root: Path, tmp_path: Path) -> None:
    """Hydra turns an exception inside a callback into a warning and goes on; the sweep must not."""
    (tmp_path / "a_file").write_text("not a folder")
    store = f"sqlite:///{tmp_path / 'a_file' / 'mlflow.db'}"  # its folder cannot be created
    result = run([sys.executable, str(REPO_ROOT / "train.py"), "--multirun", *tiny_overrides(tiny_mnist_root),
                  f"tracking.uri={store}", "seed=0,1"], tmp_path)  # fmt: skip
    assert result.returncode == 1
    assert "the sweep could not start" in result.stdout + result.stderr
    assert "Launching" not in result.stdout + result.stderr  # no job ran without a parent
