"""The console: lines named by their run, one-line model summaries, a sweep's progress lines."""

from __future__ import annotations

import io
import logging
import threading
import time
from pathlib import Path

import pytest
from conftest import compose_config, sqlite_uri
from mlflow.tracking import MlflowClient

from mlpsweep.console import SweepProgress, duration, lines_named, progress_line, record_job_end
from mlpsweep.model import build_model, summary
from mlpsweep.tracking import get_or_create_experiment


def test_lines_of_the_job_thread_name_its_run_and_no_others() -> None:
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(logging.Formatter("%(name)s - %(message)s"))
    root = logging.getLogger()
    root.addHandler(handler)
    log = logging.getLogger("mlpsweep.test_console")
    log.setLevel(logging.INFO)
    try:
        with lines_named("relu-batchnorm-p0-1024x300-s0"):
            log.info("Iter: %d >> T_loss %.1f", 1, 0.5)
            other = threading.Thread(target=lambda: log.info("job 1/2 done"))  # e.g. the launcher's progress
            other.start()
            other.join()
        log.info("after the job")
    finally:
        root.removeHandler(handler)
    assert stream.getvalue().splitlines() == [
        "mlpsweep.test_console - [relu-batchnorm-p0-1024x300-s0] Iter: 1 >> T_loss 0.5",
        "mlpsweep.test_console - job 1/2 done",
        "mlpsweep.test_console - after the job",
    ]


def test_the_model_in_one_line() -> None:
    model = build_model(compose_config(["norm=batchnorm", "dropout=lecture"]), 784, 10)
    assert summary(model) == "MLP 784-1024-300-10, hidden blocks Linear-BatchNorm1d-ReLU-Dropout, 1,116,998 parameters"


def test_progress_lines() -> None:
    assert [duration(s) for s in (42.4, 185, 3725)] == ["42s", "3m05s", "1h02m"]
    # the pace since the first job ended: 30 s a job, 15 jobs to go
    assert progress_line(3, 18, "a: finished", 90, first_end=30) == "job 3/18 done (a: finished), 1m30s elapsed, about 7m30s left"
    # a pack of 18 trained for 60 s, then its members ended a second apart: 14 s left, not 14 minutes
    assert progress_line(4, 18, "p: finished", 64, first_end=61).endswith("about 14s left")
    assert progress_line(1, 18, "a: finished", 61, first_end=61) == "job 1/18 done (a: finished), 1m01s elapsed"  # no pace yet
    assert progress_line(18, 18, "b: finished", 540) == "job 18/18 done (b: finished), 9m00s elapsed"
    assert progress_line(4, None, "c: did not finish", 20) == "job 4 done (c: did not finish), 20s elapsed"


def test_sweep_progress_reads_the_job_ends_from_the_store(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    client = MlflowClient(sqlite_uri(tmp_path))
    parent = client.create_run(get_or_create_experiment(client, "mlpsweep"), run_name="sweep").info.run_id
    progress = SweepProgress(client, parent, total=4, interval_s=0.1)
    caplog.set_level(logging.INFO, logger="mlpsweep.console")
    record_job_end(client, parent, 1, "relu-none-p0-1024x300-s0", "finished")
    record_job_end(client, parent, 0, "relu-batchnorm-p0-1024x300-s0", "did not finish")
    progress.poll()
    progress.poll()  # nothing new: nothing said twice
    time.sleep(0.2)
    record_job_end(client, parent, 2, "tanh-none-p0-1024x300-s0", "finished")
    progress.poll()
    record_job_end(client, parent, 3, "tanh-batchnorm-p0-1024x300-s0", "finished")
    progress.start().stop()
    lines = [r.getMessage() for r in caplog.records if r.name == "mlpsweep.console"]
    assert [line.split(", ")[0] for line in lines] == [
        "job 1/4 done (relu-batchnorm-p0-1024x300-s0: did not finish)",
        "job 2/4 done (relu-none-p0-1024x300-s0: finished)",
        "job 3/4 done (tanh-none-p0-1024x300-s0: finished)",
        "job 4/4 done (tanh-batchnorm-p0-1024x300-s0: finished)",
    ]
    # jobs 1 and 2 were seen in one poll: no pace yet; then one job in 0.2 s; job 4 is the last
    assert ["left" in line for line in lines] == [False, False, True, False]
