"""SIGINT and SIGTERM as a pause: the running job stops at the next step boundary, keeps its last
epoch's checkpoint and ends its run KILLED; `resume=true` continues it later.

The first signal only sets a flag, which the training loop reads between steps (`check`). A
process that launched a sweep passes the signal on to its job processes (joblib workers,
submitit jobs), so `kill -TERM <launcher>` or SLURM's pre-emption reaches every job. In the
process the user talks to (the launcher, or a single run) a second signal stops at once.
"""

from __future__ import annotations

import signal
import sys
from types import FrameType

import psutil

SIGNALS = (signal.SIGINT, signal.SIGTERM)


class SweepStop(BaseException):
    """Stop the whole sweep: not a failure of one job that the others should outlive.

    A BaseException, so that Hydra's launchers (which record a job's `Exception` and go on)
    let it through to the entry point, which ends the sweep with `exit_code`.
    """

    exit_code = 1


class Interrupted(SweepStop):
    """A job stopped on SIGINT/SIGTERM; its run is KILLED and its checkpoint kept."""

    exit_code = 130


_state: dict[str, object] = {"signal": None, "installed": False, "launcher": False}


def install(launcher: bool) -> None:
    """Handle SIGINT and SIGTERM in this process (once; later calls keep the first role).

    `launcher`: this process is the one a user talks to (the sweep's launcher or a single
    run): it forwards the signal to its child processes, and a second signal stops it at once.
    """
    if _state["installed"]:
        return
    _state.update(installed=True, launcher=launcher)
    for signum in SIGNALS:
        signal.signal(signum, _on_signal)


def requested() -> str | None:
    """The name of the signal that asked this process to stop, if one did."""
    return _state["signal"]  # type: ignore[return-value]


def check() -> None:
    """Raise Interrupted if a stop was requested (called between training steps)."""
    if _state["signal"] is not None:
        raise Interrupted(f"stopped by {_state['signal']}")


def _on_signal(signum: int, frame: FrameType | None) -> None:
    name = signal.Signals(signum).name
    if _state["signal"] is not None:
        if _state["launcher"]:
            raise KeyboardInterrupt  # a second signal: stop now
        return  # a job process: the launcher passing on what the terminal already sent
    _state["signal"] = name
    if _state["launcher"]:
        print(
            f"{name}: stopping after the current training step; checkpoints are kept, rerun with resume=true "
            "to continue (send it again to stop at once)",
            file=sys.stderr,
            flush=True,
        )
        for child in psutil.Process().children(recursive=True):
            try:
                child.send_signal(signum)
            except psutil.Error:
                pass  # it ended meanwhile
