"""SIGINT and SIGTERM as a pause: the running job stops at the next step boundary, keeps its last
epoch's checkpoint and ends its run KILLED; `resume=true` continues it later.

The first signal only sets a flag, which the training loop reads between steps (`check`). The
process that launched a sweep passes the signal on to its job processes (joblib workers,
submitit jobs: each registers itself when its first job starts), so `kill -TERM <launcher>`
reaches every running job. In the process the user talks to (the launcher, or a single run) a
second signal stops at once. A job process also stops on SIGUSR2, which submitit has SLURM send
before a job's time limit.
"""

from __future__ import annotations

import atexit
import os
import shutil
import signal
import tempfile
from pathlib import Path
from types import FrameType

import psutil

# where job processes register their pid for the launcher to pass a signal on to
JOB_PIDS_ENV = "MLPSWEEP_JOB_PIDS"


class SweepStop(BaseException):
    """Stop the whole sweep: not a failure of one job that the others should outlive.

    A BaseException, so that Hydra's launchers (which record a job's `Exception` and go on)
    let it through to the entry point, which ends the sweep with `exit_code`.
    """

    exit_code = 1


class Interrupted(SweepStop):
    """A job stopped on SIGINT/SIGTERM; its run is KILLED and its checkpoint kept."""

    exit_code = 130


class _State:
    signal: str | None = None  # the signal that asked this process to stop
    installed = False
    launcher = False


def install(launcher: bool) -> None:
    """Handle SIGINT and SIGTERM in this process (once; later calls keep the first role).

    `launcher`: this process is the one a user talks to (the sweep's launcher or a single run):
    it passes a signal on to the job processes that registered, and a second signal stops it at
    once. Otherwise this is a job process: it registers with its launcher, and also stops on
    SIGUSR2.
    """
    if _State.installed:
        return
    _State.installed, _State.launcher = True, launcher
    signals = [signal.SIGINT, signal.SIGTERM]
    if launcher:
        if JOB_PIDS_ENV not in os.environ:
            os.environ[JOB_PIDS_ENV] = tempfile.mkdtemp(prefix="mlpsweep-jobs-")
            atexit.register(shutil.rmtree, os.environ[JOB_PIDS_ENV], ignore_errors=True)
    else:
        signals.append(signal.SIGUSR2)
        if folder := os.environ.get(JOB_PIDS_ENV):
            (Path(folder) / str(os.getpid())).touch()
    for signum in signals:
        signal.signal(signum, _on_signal)


def exiting() -> None:
    """The process is about to exit with its status: a signal from now on is ignored (the exit
    waits for worker processes and threads, where a raise would only print a traceback, and its
    clean-up, which the signal's default action would skip)."""
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, signal.SIG_IGN)


def requested() -> str | None:
    """The name of the signal that asked this process to stop, if one did."""
    return _State.signal


def check() -> None:
    """Raise Interrupted if a stop was requested (called between training steps)."""
    if _State.signal is not None:
        raise Interrupted(f"stopped by {_State.signal}")


def _on_signal(signum: int, frame: FrameType | None) -> None:
    name = signal.Signals(signum).name
    if _State.signal is not None:
        if _State.launcher:
            raise KeyboardInterrupt  # a second signal: stop now
        return  # a job process: the launcher passing on what the terminal already sent
    _State.signal = name
    if _State.launcher:
        _pass_on(signum)
        message = (
            f"{name}: stopping after the current training step; checkpoints are kept, rerun with "
            "resume=true to continue (send it again to stop at once)\n"
        )
        os.write(2, message.encode())  # not print(): the signal may have interrupted a write to stderr


def _pass_on(signum: int) -> None:
    """Send `signum` to the job processes below this one that registered (an idle joblib worker
    that never ran a job has no handler: the signal would kill it and break the pool)."""
    folder = os.environ.get(JOB_PIDS_ENV)
    if not folder:
        return
    registered = {int(path.name) for path in Path(folder).iterdir() if path.name.isdigit()}
    for child in psutil.Process().children(recursive=True):
        if child.pid in registered:
            try:
                child.send_signal(signum)
            except psutil.Error:
                pass  # it ended meanwhile
