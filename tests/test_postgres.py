"""The README's team tracking setup for real: a joblib sweep against `mlflow server` backed by PostgreSQL.

The `postgres_uri` fixture (conftest.py) runs a PostgreSQL cluster of its own; each test starts an
`mlflow server --backend-store-uri postgresql://...` on it and sweeps into an experiment of its own.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest
from conftest import REPO_ROOT, MlflowServer, tiny_overrides
from mlflow.tracking import MlflowClient

from mlpsweep.tracking import CONFIG_HASH_TAG, ROLE_TAG

pytestmark = pytest.mark.slow

SEEDS, ACTIVATIONS, NORMS = (0, 1, 2, 3), ("relu", "tanh"), ("none", "batchnorm")
OUTAGE_EXIT_S = 135  # a sweep whose server is gone must stop within about 2 minutes


def grid(seeds: tuple[int, ...] = SEEDS) -> set[str]:
    """The run names of the sweep over `seeds` (4 per seed)."""
    return {f"{act}-{norm}-p0-32-s{seed}" for seed in seeds for act in ACTIVATIONS for norm in NORMS}


GRID = grid()  # 16 run names


def sweep_args(
    data_root: Path, uri: str, experiment: str, sweep_dir: Path, seeds: tuple[int, ...] = SEEDS
) -> list[str]:
    """`python train.py --multirun ...`: 4 one-epoch jobs per seed (16 by default), 4 at a time,
    tracked on the server at `uri`."""
    return [
        sys.executable, str(REPO_ROOT / "train.py"), "--multirun",
        *tiny_overrides(data_root), "trainer.max_epochs=1", "depth.widths=[32]", "probe.enabled=false",
        f"seed={','.join(map(str, seeds))}", f"activation={','.join(ACTIVATIONS)}", f"norm={','.join(NORMS)}",
        "hydra/launcher=joblib", "hydra.launcher.n_jobs=4",
        f"tracking.uri={uri}", f"tracking.experiment={experiment}", f"hydra.sweep.dir={sweep_dir}",
    ]  # fmt: skip


def environment() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}


def run_sweep(command: list[str], cwd: Path, timeout: float) -> subprocess.CompletedProcess:
    result = subprocess.run(command, cwd=cwd, env=environment(), capture_output=True, text=True, timeout=timeout)
    print(result.stdout[-5000:], result.stderr[-5000:])
    return result


def runs_of(client: MlflowClient, experiment: str) -> tuple[list, list]:
    """(parents, children): the sweep runs and the job runs of `experiment`, nothing else in it."""
    found = client.get_experiment_by_name(experiment)
    runs = client.search_runs([found.experiment_id], max_results=1000) if found else []
    parents = [r for r in runs if r.data.tags.get(ROLE_TAG) == "sweep"]
    children = [r for r in runs if r.data.tags.get(ROLE_TAG) == "job"]
    assert len(parents) + len(children) == len(runs)
    return parents, children


def test_joblib_sweep_against_a_postgres_backed_server(
    tiny_mnist_root: Path, postgres_uri: str, tmp_path: Path
) -> None:
    experiment = "pg-sweep"
    with MlflowServer(tmp_path / "server", postgres_uri, tmp_path / "artifacts") as server:
        command = sweep_args(tiny_mnist_root, server.uri, experiment, tmp_path / "multirun")
        result = run_sweep(command, tmp_path, timeout=420)
        assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]

        client = MlflowClient(server.uri)
        parents, children = runs_of(client, experiment)
        assert len(parents) == 1 and parents[0].info.status == "FINISHED"
        assert len(children) == len(GRID)
        assert {c.info.run_name for c in children} == GRID  # distinct, the whole grid: nothing lost
        assert sorted(c.data.params["seed"] for c in children) == sorted(str(s) for s in SEEDS for _ in range(4))
        for child in children:
            assert child.info.status == "FINISHED"
            assert child.data.tags["mlflow.parentRunId"] == parents[0].info.run_id
            assert [m.step for m in client.get_metric_history(child.info.run_id, "accuracy/val")] == [1]
            assert "accuracy/test" in child.data.metrics
        assert "config.yaml" in {a.path for a in client.list_artifacts(children[0].info.run_id)}  # proxied artifacts

    # the runs are rows in PostgreSQL, not in some SQLite file the server fell back to
    import psycopg2  # there when postgres_uri is

    with psycopg2.connect(postgres_uri) as connection, connection.cursor() as cursor:
        query = "SELECT count(*) FROM runs JOIN experiments USING (experiment_id) WHERE experiments.name = %s"
        cursor.execute(query, (experiment,))
        assert cursor.fetchone() == (len(GRID) + 1,)
    assert not list(tmp_path.rglob("*.db"))


def _kill_group(process: subprocess.Popen) -> None:
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    process.wait(timeout=30)


def test_server_outage_stops_the_sweep_and_resume_completes_it(
    tiny_mnist_root: Path, postgres_uri: str, tmp_path: Path
) -> None:
    experiment = "pg-outage"
    server = MlflowServer(tmp_path / "server", postgres_uri, tmp_path / "artifacts")
    server.start()
    seeds = SEEDS[:2]  # 8 jobs: 4 start together, 2 of them reach the store before the outage
    command = sweep_args(tiny_mnist_root, server.uri, experiment, tmp_path / "multirun", seeds)
    out, err = tmp_path / "sweep.out", tmp_path / "sweep.err"
    try:
        with open(out, "w") as stdout, open(err, "w") as stderr:
            # its own process group: the launcher and its joblib workers, to kill if it hangs; unbuffered,
            # so that what it printed before the outage is in the files when the outage starts
            env = environment() | {"PYTHONUNBUFFERED": "1"}
            sweep = subprocess.Popen(
                command, cwd=tmp_path, env=env, stdout=stdout, stderr=stderr, start_new_session=True
            )
        try:
            client, deadline = MlflowClient(server.uri), time.monotonic() + 300
            while len(runs_of(client, experiment)[1]) < 2:
                assert sweep.poll() is None, f"the sweep ended before its second job started: {err.read_text()[-3000:]}"
                assert time.monotonic() < deadline, "no 2 job runs within 5 minutes"
                time.sleep(0.5)
            server.kill()  # the outage: SIGKILL, server and workers
            outage, printed_before = time.monotonic(), (out.stat().st_size, err.stat().st_size)
            try:
                returncode = sweep.wait(timeout=OUTAGE_EXIT_S)
            except subprocess.TimeoutExpired:
                returncode = None
            print(f"{time.monotonic() - outage:.1f}s after the outage the sweep's exit status is {returncode}")
        finally:
            if sweep.poll() is None:
                _kill_group(sweep)
        output = out.read_text() + err.read_text()
        print(output[-5000:])
        assert returncode is not None, f"the sweep still ran {OUTAGE_EXIT_S}s after the server went away"
        assert returncode != 0
        after = [path.read_bytes()[start:].decode(errors="replace") for path, start in zip((out, err), printed_before)]
        mlflow_links = ("View run", "View experiment")  # what MLflow prints as a run ends, with the server in it
        naming = [line for line in "\n".join(after).splitlines() if server.uri in line]
        assert [line for line in naming if not any(link in line for link in mlflow_links)], (
            "no message after the outage names the server"
        )
        assert "Traceback (most recent call last)" not in output  # one line, not a stack dump

        server.start()  # back, on the same port
        result = run_sweep([*command, "resume=true"], tmp_path, timeout=420)
        assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]

        parents, children = runs_of(MlflowClient(server.uri), experiment)
        assert [p.info.status for p in parents] == ["FINISHED"]
        assert not [r.info.run_name for r in parents + children if r.info.status == "RUNNING"]
        finished = [c for c in children if c.info.status == "FINISHED"]
        assert all(c.data.tags["mlflow.parentRunId"] == parents[0].info.run_id for c in finished)
        per_config = Counter(c.data.tags[CONFIG_HASH_TAG] for c in finished)
        assert len(per_config) == len(grid(seeds)) and set(per_config.values()) == {1}  # each config once, none lost
        assert {c.info.run_name for c in finished} == grid(seeds)
    finally:
        server.stop()


def test_a_database_password_is_never_logged(postgres_uri: str, tiny_mnist_root: Path, tmp_path: Path) -> None:
    """A sweep tracked straight into PostgreSQL (no `mlflow server`): the password of the URI is in
    no param, tag, config or overrides file, and in no line the sweep prints."""
    command = [sys.executable, str(REPO_ROOT / "train.py"), "--multirun", *tiny_overrides(tiny_mnist_root),
               "trainer.max_epochs=1", "depth.widths=[16]", "probe.enabled=false", "seed=0,1",
               f"tracking.uri={postgres_uri}", "tracking.experiment=direct", f"hydra.sweep.dir={tmp_path / 'm'}"]  # fmt: skip
    result = run_sweep(command, tmp_path, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "secret" not in result.stdout + result.stderr and "mlflow:***@" in result.stdout + result.stderr
    client = MlflowClient(postgres_uri)
    parents, children = runs_of(client, "direct")
    assert len(parents) == 1 and len(children) == 2
    for run in [*parents, *children]:
        assert "secret" not in repr(run.data.params) + repr(run.data.tags), run.info.run_name
    for child in children:
        assert child.data.params["tracking.uri"] == postgres_uri.replace("secret", "***")
        for name in ("config.yaml", "overrides.yaml"):
            folder = tmp_path / child.info.run_id
            text = Path(client.download_artifacts(child.info.run_id, name, str(folder))).read_text()
            assert "secret" not in text and ":***@" in text, name
