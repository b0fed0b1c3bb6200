"""A run's figures, drawn outside the job's own thread of work.

Drawing a figure (matplotlib) costs a few hundred milliseconds of one core, several per run: in a
sweep that is most of a job's fixed cost. In a sweep whose jobs run one after another in one
process (the basic and packed launchers), `Figures` hands each figure to a worker process as soon
as its data exists, so it is drawn while the job trains, tests and logs, and logs the files as the
run's artifacts before the run ends. A single run, or a job in a parallel launcher's worker (which
has the other cores busy already), draws them in place. Either way the artifacts are the same files
under the same names.
"""

from __future__ import annotations

import atexit
import contextlib
import multiprocessing
import os
import signal
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path
from typing import Any

import mlflow

from mlpsweep import figures

# figure name -> the function of mlpsweep.figures that draws it from plain data
DRAWINGS = {
    "learning_curves": figures.learning_curves,
    "confusion_matrix": figures.confusion_matrix,
    "probe_grid": figures.probe_grid,
    "gradient_norms": figures.gradient_norms,
}
DPI = 72  # the probe frames' resolution; the other figures keep matplotlib's default

_pool: ProcessPoolExecutor | None = None


def draw(drawing: str, args: tuple[Any, ...], path: str, dpi: float | None) -> str:
    """Draw one figure into `path` (in a worker process, or here); return the path."""
    fig = DRAWINGS[drawing](*args)
    fig.savefig(path, dpi=dpi or "figure")
    figures.plt.close(fig)
    return path


def worker_pool() -> ProcessPoolExecutor:
    """The process's figure workers, started on first use (spawned: no copy of torch's threads or CUDA)."""
    global _pool
    if _pool is None:
        workers = max(1, min(4, (os.cpu_count() or 2) // 2))  # leave half the cores to the jobs
        _pool = ProcessPoolExecutor(
            max_workers=workers, mp_context=multiprocessing.get_context("spawn"), initializer=_leave_interrupts
        )
        atexit.register(_pool.shutdown, wait=True, cancel_futures=True)
    return _pool


def _forget_pool() -> None:
    """Drop a broken pool (a worker died); the next figure starts a new one."""
    global _pool
    _pool = None


def _leave_interrupts() -> None:
    """A worker ignores Ctrl-C (it reaches the whole process group): the job decides what stops."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


class Figures:
    """The figures of one run: drawn in the worker process when `in_worker`, else in place; each
    logged as the artifact `artifact_path` by `log_all`, which waits for them. A worker that died
    (its pool broken) is replaced by drawing in place."""

    def __init__(self, workdir: Path, in_worker: bool) -> None:
        self.workdir = workdir
        self.in_worker = in_worker
        self.pending: list[tuple[Future[str] | str, tuple[str, tuple[Any, ...], str, float | None]]] = []
        self.gifs: list[tuple[list[Path], str]] = []  # (frames, artifact path)

    def add(self, drawing: str, args: tuple[Any, ...], artifact_path: str, dpi: float | None = None) -> Path:
        """Have `drawing` of `args` drawn into the file that becomes the artifact `artifact_path`; return that file."""
        path = self.workdir / artifact_path
        path.parent.mkdir(parents=True, exist_ok=True)
        request = (drawing, args, str(path), dpi)
        result: Future[str] | str | None = None
        if self.in_worker:
            try:
                result = worker_pool().submit(draw, *request)
            except BrokenProcessPool:
                _forget_pool()
        self.pending.append((result if result is not None else draw(*request), (*request[:2], artifact_path, dpi)))
        return path

    def add_gif(self, frames: list[Path], artifact_path: str) -> None:
        """An animated GIF of drawn frames (added before), made once they are drawn."""
        self.gifs.append((frames, artifact_path))

    def _drawn(self, result: Future[str] | str, request: tuple[str, tuple[Any, ...], str, float | None]) -> str:
        """The drawn file: a worker's, or drawn here if the worker died."""
        if not isinstance(result, Future):
            return result
        try:
            return result.result()
        except BrokenProcessPool:
            _forget_pool()
            drawing, args, artifact_path, dpi = request
            return draw(drawing, args, str(self.workdir / artifact_path), dpi)

    def log_all(self) -> None:
        """Wait for the figures and log each as an artifact of the active run, under its name."""
        for result, request in self.pending:
            artifact_path = request[2]
            mlflow.log_artifact(self._drawn(result, request), artifact_path.rpartition("/")[0] or None)
        for frames, artifact_path in self.gifs:
            gif = self.workdir / artifact_path
            figures.save_gif(frames, gif)
            mlflow.log_artifact(str(gif), artifact_path.rpartition("/")[0] or None)
        self.pending.clear()
        self.gifs.clear()

    def wait(self) -> None:
        """Until no worker writes into the run's folder any more (errors ignored: the run ends anyway)."""
        for result, _ in self.pending:
            if isinstance(result, Future):
                with contextlib.suppress(Exception):
                    result.result()
