"""A run's figures, drawn outside the job's own thread of work.

Drawing a figure (matplotlib) costs a few hundred milliseconds of one core, several per run: in a
sweep that is most of a job's fixed cost. In a sweep whose jobs run one after another in one
process (the basic and packed launchers), `Figures` hands each figure to a worker process as soon
as its data exists, so it is drawn while the job trains, tests and logs, and logs the files as the
run's artifacts before the run ends. A single run, or a job in a parallel launcher's worker (which
has the other cores busy already), draws them in place. Either way the artifacts are the same files
under the same names. The packed launcher asks for every member's figures as the pack finishes
training (on a GPU, the probe's grids as it trains), and a worker per core draws them while the
members are logged one after another. The workers start as a sweep opens (`start_workers`).
"""

from __future__ import annotations

import atexit
import contextlib
import gc
import multiprocessing
import multiprocessing.connection
import os
import shutil
import signal
import tempfile
import threading
from collections.abc import Iterator
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path
from typing import Any, NamedTuple

from PIL import Image

# the functions of mlpsweep.figures that draw a figure from plain data (matplotlib is imported
# where they draw, a worker process or a job drawing in place, not by every job; a worker imports
# this module and mlpsweep.figures only, so neither imports torch or MLflow at the top)
DRAWINGS = ("learning_curves", "confusion_matrix", "probe_grid", "gradient_norms")
DPI = 72  # the probe frames' resolution; the other figures keep matplotlib's default

_pools: dict[bool, ProcessPoolExecutor] = {}  # every core's or half the cores' workers -> their pool


def save_gif(frames: list[Path], out: Path, seconds_per_frame: float = 0.8) -> None:
    """An animated GIF of PNG frames (all resized to the first frame's size)."""
    images = [Image.open(path).convert("RGB") for path in frames]
    images = [images[0]] + [image.resize(images[0].size) for image in images[1:]]
    # a palette per frame by fast octree quantisation: a quarter of the encoder's own time, for plots alike
    paletted = [image.quantize(colors=256, method=Image.Quantize.FASTOCTREE) for image in images]
    paletted[0].save(out, save_all=True, append_images=paletted[1:], duration=int(seconds_per_frame * 1000), loop=0)


class FigureRequest(NamedTuple):
    """A figure to draw: the DRAWINGS function, its arguments, the artifact it becomes, its dpi."""

    drawing: str
    args: tuple[Any, ...]
    artifact_path: str
    dpi: float | None = None


def draw(drawing: str, args: tuple[Any, ...], path: str, dpi: float | None) -> str:
    """Draw one figure into `path` (in a worker process, or here); return the path."""
    from mlpsweep import figures

    if drawing not in DRAWINGS:
        raise ValueError(f"no drawing {drawing!r}; drawings: {', '.join(DRAWINGS)}")
    # zlib's fastest level: a third of the PNG encoder's time, files about a quarter larger
    getattr(figures, drawing)(*args).savefig(path, dpi=dpi or "figure", pil_kwargs={"compress_level": 1})
    return path


def _start_worker() -> None:
    """A figure worker ignores Ctrl-C (it reaches the whole process group: the job decides what
    stops), and ends when the process that started it is gone, even killed (SIGKILL closes no
    pool): it would otherwise wait for figures forever. It started with Ctrl-C held back
    (`_ctrl_c_held`), so none interrupted its imports before this. It yields the CPU to the
    sweep's own process (nice 10), which the sweep waits for: a packed sweep's members, whose
    figures are asked for as the pack finishes, were logged 17% sooner; a basic launcher's sweep
    took as long as before. At exit it skips the interpreter's last collections (cyclic garbage
    and its finalizers: it holds no open files), so the sweep waits less for it to end."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if hasattr(os, "nice"):  # not on Windows
        os.nice(10)
    atexit.register(gc.freeze)
    if hasattr(signal, "pthread_sigmask"):
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})
    parent = multiprocessing.parent_process()
    if parent is not None:
        threading.Thread(target=_exit_with, args=(parent.sentinel,), daemon=True).start()


@contextlib.contextmanager
def _ctrl_c_held() -> Iterator[None]:
    """Ctrl-C blocked in this thread while it may start figure workers (a pool starts one as a
    figure is asked for): a process starts with its parent's signal mask, so a worker cannot be
    interrupted while it imports; a Ctrl-C meanwhile reaches this process as the block ends."""
    if not hasattr(signal, "pthread_sigmask"):  # Windows: no signal masks
        yield
        return
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


def _exit_with(parent_sentinel: int) -> None:
    multiprocessing.connection.wait([parent_sentinel])  # ready once the parent has ended
    os._exit(1)


def _worker_count(every_core: bool) -> int:
    cores = os.cpu_count() or 2
    return max(1, min(4, cores if every_core else cores // 2))


def worker_pool(every_core: bool) -> ProcessPoolExecutor:
    """The process's figure workers, started on first use (spawned: no copy of torch's threads or
    CUDA): one per core, or for half the cores where jobs train while they draw."""
    if every_core not in _pools:
        pool = ProcessPoolExecutor(
            max_workers=_worker_count(every_core),
            mp_context=multiprocessing.get_context("spawn"),
            initializer=_start_worker,
        )
        atexit.register(pool.shutdown, wait=True, cancel_futures=True)
        _pools[every_core] = pool
    return _pools[every_core]


def start_workers(every_core: bool) -> None:
    """Start the figure workers now instead of at the first figure: each imports matplotlib (0.7 s
    of a core) while a sweep's start leaves a core idle, and is ready when the first figure comes."""
    pool = worker_pool(every_core)
    with _ctrl_c_held():
        for _ in range(_worker_count(every_core)):  # a pool of spawned workers starts one per waiting task
            pool.submit(_ready)


def _ready() -> None:
    from mlpsweep import figures  # noqa: F401  (matplotlib, for the worker's first figure)


def _forget_pool(every_core: bool) -> None:
    """Drop a broken pool (a worker died); the next figure starts a new one."""
    _pools.pop(every_core, None)


class Figures:
    """The figures of one run: drawn in the worker process when `in_worker`, else in place; each
    logged as the artifact `artifact_path` by `log_all`, which waits for them. A worker that died
    (its pool broken) is replaced by drawing in place. Without a `workdir` the files go into a
    folder of its own, which `close` removes.

    Figures can be asked for ahead of their run (`ahead`: a packed member's, as its pack finishes,
    and on a GPU its probe grids as the pack trains, so that the workers draw them while the
    members before it are logged and the pack trains): asking again for an artifact already asked
    for changes nothing."""

    def __init__(self, workdir: Path | None, in_worker: bool, every_core: bool = False) -> None:
        self.own_dir = workdir is None
        self.workdir = Path(tempfile.mkdtemp(prefix="mlpsweep-figures-")) if workdir is None else workdir
        self.in_worker = in_worker
        self.every_core = every_core  # a worker per core: nothing trains on the CPU while they draw
        self.pending: list[tuple[Future[str] | str, FigureRequest]] = []  # (drawn file, what it draws)
        self.gifs: list[tuple[list[Path], str]] = []  # (frames, artifact path)

    @classmethod
    def ahead(cls) -> Figures:
        """Figures to ask for ahead of their run, in a folder of their own, drawn by a worker per
        core (what runs meanwhile is a pack's training or the logging of runs)."""
        return cls(None, in_worker=True, every_core=True)

    def add(self, drawing: str, args: tuple[Any, ...], artifact_path: str, dpi: float | None = None) -> Path:
        """Have `drawing` of `args` drawn into the file that becomes the artifact `artifact_path`; return that file."""
        path = self.workdir / artifact_path
        if any(request.artifact_path == artifact_path for _, request in self.pending):  # asked for ahead
            return path
        path.parent.mkdir(parents=True, exist_ok=True)
        result: Future[str] | str | None = None
        if self.in_worker:
            try:
                with _ctrl_c_held():
                    result = worker_pool(self.every_core).submit(draw, drawing, args, str(path), dpi)
            except BrokenProcessPool:
                _forget_pool(self.every_core)
        drawn = result if result is not None else draw(drawing, args, str(path), dpi)
        self.pending.append((drawn, FigureRequest(drawing, args, artifact_path, dpi)))
        return path

    def add_gif(self, frames: list[Path], artifact_path: str) -> None:
        """An animated GIF of drawn frames (added before), made once they are drawn."""
        self.gifs.append((frames, artifact_path))

    def _drawn(self, result: Future[str] | str, request: FigureRequest) -> str:
        """The drawn file: a worker's, or drawn here if the worker died."""
        if not isinstance(result, Future):
            return result
        try:
            return result.result()
        except BrokenProcessPool:
            _forget_pool(self.every_core)
            return draw(request.drawing, request.args, str(self.workdir / request.artifact_path), request.dpi)

    def log_all(self) -> None:
        """Wait for the figures and log each as an artifact of the active run, under its name."""
        import mlflow  # here, not at the top: see DRAWINGS

        for result, request in self.pending:
            mlflow.log_artifact(self._drawn(result, request), request.artifact_path.rpartition("/")[0] or None)
        for frames, artifact_path in self.gifs:
            gif = self.workdir / artifact_path
            save_gif(frames, gif)
            mlflow.log_artifact(str(gif), artifact_path.rpartition("/")[0] or None)
        self.pending.clear()
        self.gifs.clear()

    def wait(self) -> None:
        """Until no worker writes into the run's folder any more (errors ignored: the run ends anyway)."""
        for result, _ in self.pending:
            if isinstance(result, Future):
                with contextlib.suppress(Exception):
                    result.result()

    def close(self) -> None:
        """Drop the figures not logged (those not drawn yet are not drawn), wait for the worker,
        then remove the folder if it is this object's own."""
        for result, _ in self.pending:
            if isinstance(result, Future):
                result.cancel()
        self.wait()
        if self.own_dir:
            shutil.rmtree(self.workdir, ignore_errors=True)
