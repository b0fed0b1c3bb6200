"""What a person reads in the terminal: every line of a job names its run, and a sweep says how
far along it is.

Each job marks its end on the sweep's parent run (a tag per job); the launching process polls the
parent and logs a line per job that ended, with the time elapsed and an estimate of what is left
(from the pace at which jobs end).
This works whatever runs the jobs: the basic launcher (in the launching process), joblib's worker
processes, SLURM.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress

from mlflow.tracking import MlflowClient

log = logging.getLogger(__name__)

JOB_END_TAG_PREFIX = "mlpsweep.job_end."  # + job number: "<run name>: <outcome>", removed when the sweep closes


class RunNameFilter(logging.Filter):
    """Prefixes `[run name] ` to every record logged by the thread that installed it (the job's):
    a launcher's own threads log through the same handlers without it."""

    def __init__(self, run_name: str) -> None:
        super().__init__()
        self.prefix = f"[{run_name}] "
        self.thread = threading.get_ident()

    def filter(self, record: logging.LogRecord) -> bool:
        if record.thread == self.thread and not getattr(record, "run_named", False):
            record.msg, record.args = self.prefix + record.getMessage(), None
            record.run_named = True  # once, whichever of the handlers sees it first
        return True


@contextmanager
def lines_named(run_name: str) -> Iterator[None]:
    """While inside, every line the handlers of the root and `mlflow` loggers write from this
    thread starts with `[run_name]`, so that the interleaved output of parallel jobs can be read."""
    handlers = {*logging.getLogger().handlers, *logging.getLogger("mlflow").handlers}
    name_filter = RunNameFilter(run_name)
    for handler in handlers:
        handler.addFilter(name_filter)
    try:
        yield
    finally:
        for handler in handlers:
            handler.removeFilter(name_filter)


def duration(seconds: float) -> str:
    """`42s`, `3m05s`, `1h02m`."""
    seconds = round(seconds)
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


def progress_line(done: int, total: int | None, what: str, elapsed: float, first_end: float | None = None) -> str:
    """E.g. `job 3/18 done (relu-none-p0-1024x300-s0: finished), 2m10s elapsed, about 10m50s left`.

    The estimate of what is left goes by the pace since the first job ended (`first_end` seconds in,
    if known): the first job's time holds the sweep's start-up, and under the packed launcher a
    whole pack's training, after which its members end a second or so apart. Until a second job has
    ended after the first, there is no pace and no estimate."""
    line = f"job {done}{f'/{total}' if total else ''} done ({what}), {duration(elapsed)} elapsed"
    if total is None or done >= total or done < 2 or first_end is None or elapsed <= first_end:
        return line
    left = (elapsed - first_end) / (done - 1) * (total - done)
    return f"{line}, about {duration(left)} left"


class SweepProgress:
    """In the launching process: a thread that polls the parent run for the jobs' end tags every
    `interval_s` and logs a progress line for each job that ended."""

    def __init__(self, client: MlflowClient, parent_id: str, total: int | None, interval_s: float = 2.0) -> None:
        self.client = client
        self.parent_id = parent_id
        self.total = total
        self.interval_s = interval_s
        self.seen: set[str] = set()
        self.start_time = time.monotonic()
        self.first_end: float | None = None  # seconds from the start to when the first job end was seen
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll_until_stopped, name="sweep-progress", daemon=True)

    def start(self) -> SweepProgress:
        self._thread.start()
        return self

    def stop(self, final_poll: bool = True) -> None:
        """Stop polling; with `final_poll`, log the jobs that ended since the last poll first (not
        when the store is known to be down: a poll would wait out its retries)."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=self.interval_s)  # a poll stuck on a store that does not answer is left
        if final_poll and not self._thread.is_alive():
            self.poll()

    def _poll_until_stopped(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.poll()

    def poll(self) -> None:
        try:
            tags = self.client.get_run(self.parent_id).data.tags
        except Exception:  # a busy or unreachable store: the sweep itself reports what matters
            return
        ended = sorted((k for k in tags if k.startswith(JOB_END_TAG_PREFIX) and k not in self.seen), key=_job_number)
        elapsed = time.monotonic() - self.start_time
        for key in ended:
            self.seen.add(key)
            if self.first_end is None:
                self.first_end = elapsed
            log.info(progress_line(len(self.seen), self.total, tags[key], elapsed, self.first_end))


def _job_number(tag: str) -> int:
    number = tag.removeprefix(JOB_END_TAG_PREFIX)
    return int(number) if number.isdigit() else -1


def record_job_end(client: MlflowClient, parent_id: str, job_num: int, run_name: str, outcome: str) -> None:
    """Mark job `job_num` as ended on the parent run (for SweepProgress); nothing when the store fails."""
    with suppress(Exception):
        client.set_tag(parent_id, f"{JOB_END_TAG_PREFIX}{job_num}", f"{run_name}: {outcome}")
