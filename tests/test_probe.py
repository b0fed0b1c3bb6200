"""The probe sees inside every hidden block: statistics, saturation, dead units, figures."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import psutil
import pytest
import torch
from conftest import TINY_TEST, compose_config, sqlite_uri
from mlflow.tracking import MlflowClient
from omegaconf import DictConfig
from PIL import Image

from mlpsweep import cli, figures
from mlpsweep.cli import new_probe, train
from mlpsweep.data import load_splits
from mlpsweep.engine import DivergenceError, Evaluation
from mlpsweep.model import build_model
from mlpsweep.probe import ActivationProbe
from mlpsweep.rendering import Figures
from mlpsweep.tracking import ProbeLog

PROBE_X = torch.randn(200, 784, generator=torch.Generator().manual_seed(0))


def probe_for(*overrides: str) -> tuple[torch.nn.Sequential, ActivationProbe]:
    cfg = compose_config(["depth.widths=[64,32]", *overrides])
    torch.manual_seed(0)
    model = build_model(cfg, 784, 10)
    return model, ActivationProbe(model, PROBE_X, cfg.activation.name)


@pytest.mark.parametrize("activation", ["sigmoid", "tanh"])
def test_huge_weights_saturate_a_sigmoid_or_tanh_layer(activation: str) -> None:
    model, probe = probe_for(f"activation={activation}")
    healthy = probe.snapshot(0, with_histograms=False).layers["hidden1"].stats["saturated_frac"]
    with torch.no_grad():
        model.hidden1.linear.weight.mul_(1000)
    saturated = probe.snapshot(1, with_histograms=False).layers["hidden1"].stats["saturated_frac"]
    assert healthy < 0.2 and saturated > 0.95


@pytest.mark.parametrize("activation", ["relu", "leaky_relu", "gelu"])
def test_a_large_negative_bias_kills_every_unit_of_a_relu_layer(activation: str) -> None:
    model, probe = probe_for(f"activation={activation}", "norm=none")
    assert probe.snapshot(0, with_histograms=False).layers["hidden2"].stats["dead_frac"] < 0.5
    with torch.no_grad():
        model.hidden2.linear.bias.fill_(-1e4)
    stats = probe.snapshot(1, with_histograms=False).layers
    assert stats["hidden2"].stats["dead_frac"] == 1.0
    assert stats["hidden1"].stats["dead_frac"] < 0.5


def test_every_stage_of_every_layer_is_captured_without_touching_the_model() -> None:
    model, probe = probe_for("norm=batchnorm", "dropout=heavy")
    model.train()
    snapshot = probe.snapshot(3, with_histograms=True)
    assert model.training and not any(m._forward_hooks for m in model.modules())
    assert set(snapshot.layers) == {"hidden1", "hidden2"}
    for name, width in (("hidden1", 64), ("hidden2", 32)):
        layer = snapshot.layers[name]
        assert set(layer.histograms) == {"linear", "norm", "act"}
        assert sum(layer.histograms["act"][1]) == 200 * width
        assert len(layer.sample_pre) == len(layer.sample_post) == width
        assert {f"{s}_{k}" for s in ("linear", "norm", "act") for k in ("mean", "std")} | {"dead_frac", "nonfinite_frac"} == set(layer.stats)
        assert layer.stats["nonfinite_frac"] == 0
    assert snapshot.metrics()["probe/hidden2/norm_std"] == snapshot.layers["hidden2"].stats["norm_std"]


def test_a_run_logs_probe_metrics_every_epoch_and_its_figures(tiny_cfg: Callable[..., DictConfig], tmp_path: Path) -> None:
    train(tiny_cfg("activation=sigmoid", "depth.widths=[64,32]", "trainer.max_epochs=3", "probe.figure_every=2"))
    client = MlflowClient(sqlite_uri(tmp_path))
    run = client.search_runs([client.get_experiment_by_name("mlpsweep").experiment_id])[0]
    for layer in ("hidden1", "hidden2"):
        for key in ("linear_mean", "linear_std", "act_mean", "act_std", "saturated_frac", "grad_norm", "input_grad_norm"):
            steps = [m.step for m in client.get_metric_history(run.info.run_id, f"probe/{layer}/{key}")]
            assert steps == [0, 1, 2, 3]
    assert 0 < run.data.metrics["probe_time_frac"] < 1

    probe_files = {a.path for a in client.list_artifacts(run.info.run_id, "probe")}
    assert probe_files == {f"probe/epoch_00{e}.png" for e in (0, 2, 3)} | {
        "probe/activations.gif", "probe/histograms.json", "probe/gradient_norms.png"
    }
    histograms = json.loads(mlflow.artifacts.load_text(f"runs:/{run.info.run_id}/probe/histograms.json"))
    assert sorted(histograms) == ["0", "2", "3"] and set(histograms["3"]) == {"hidden1", "hidden2"}

    files = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"learning_curves.png", "confusion_matrix.png", "confusion_matrix.csv"} <= files
    rows = mlflow.artifacts.load_text(f"runs:/{run.info.run_id}/confusion_matrix.csv").splitlines()
    counts = [[int(n) for n in row.split(",")[1:]] for row in rows[1:]]
    assert len(counts) == 10 and sum(map(sum, counts)) == TINY_TEST
    correct = sum(counts[i][i] for i in range(10))
    assert correct / TINY_TEST == pytest.approx(run.data.metrics["accuracy/test"])


def test_probing_can_be_switched_off(tiny_cfg: Callable[..., DictConfig], tmp_path: Path) -> None:
    train(tiny_cfg("probe.enabled=false"))
    client = MlflowClient(sqlite_uri(tmp_path))
    run = client.search_runs([client.get_experiment_by_name("mlpsweep").experiment_id])[0]
    assert not [key for key in run.data.metrics if key.startswith("probe")]
    assert not client.list_artifacts(run.info.run_id, "probe")


def test_infinite_activations_are_counted_not_logged_as_metrics() -> None:
    model, probe = probe_for("activation=sigmoid", "norm=none")
    with torch.no_grad():
        model.hidden1.linear.weight[:5].fill_(float("inf"))  # 5 of 64 units blow up
    snapshot = probe.snapshot(1, with_histograms=True)
    layer = snapshot.layers["hidden1"]
    assert 0 < layer.stats["nonfinite_frac"] < 1
    assert all(math.isfinite(v) for v in snapshot.metrics().values())
    assert 0 < sum(layer.histograms["linear"][1]) < 200 * 64  # the finite values only


def test_a_figure_worker_imports_matplotlib_not_torch_or_mlflow(tmp_path: Path) -> None:
    """What a spawned figure worker imports: train.py as its main module, then what `draw` needs
    (torch, MLflow and Hydra were three seconds of each worker's start, most of a short sweep's figure time)."""
    worker = (
        "import runpy, sys; runpy.run_path(sys.argv[1], run_name='__mp_main__'); from mlpsweep import rendering; "
        "rendering.draw('gradient_norms', ({0: {'hidden1': 1.0}}, 'title'), sys.argv[2], None); "
        "print(' '.join(sorted({'torch', 'mlflow', 'hydra', 'matplotlib'} & set(sys.modules))))"
    )
    train_py = Path(__file__).resolve().parents[1] / "train.py"
    out = subprocess.run([sys.executable, "-c", worker, str(train_py), str(tmp_path / "norms.png")], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["matplotlib"]
    assert (tmp_path / "norms.png").stat().st_size > 1000


def test_figure_workers_end_with_the_process_that_started_them_even_killed(tmp_path: Path) -> None:
    """SIGKILL closes no pool: the workers (spawned, each with the pool's queues open) notice that
    their parent is gone and end, instead of waiting for figures forever."""
    parent = (
        "import sys, time; from mlpsweep import rendering; pool = rendering.worker_pool(every_core=True); "
        "args = ({0: {'h': 1.0}}, 't'); "
        "futures = [pool.submit(rendering.draw, 'gradient_norms', args, f'{sys.argv[1]}/{i}.png', None) for i in (0, 1)]; "
        "[f.result() for f in futures]; "
        "print(*[p.pid for p in pool._processes.values()], flush=True); time.sleep(300)"
    )
    process = subprocess.Popen([sys.executable, "-c", parent, str(tmp_path)], stdout=subprocess.PIPE, text=True)
    assert process.stdout is not None
    workers = [psutil.Process(int(pid)) for pid in process.stdout.readline().split()]
    assert workers and all(worker.is_running() for worker in workers)
    process.kill()
    process.wait()
    gone, alive = psutil.wait_procs(workers, timeout=30)
    assert not alive, [worker.pid for worker in alive]


def test_figure_workers_yield_the_cpu_to_the_process_that_started_them() -> None:
    """That process is what a sweep waits for (the figures are mostly asked for well ahead): its
    figure workers run 10 nice levels below it."""
    parent = (
        "import os; from mlpsweep import rendering; "
        "print(os.nice(0), rendering.worker_pool(every_core=True).submit(os.nice, 0).result())"
    )
    result = subprocess.run([sys.executable, "-c", parent], capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode == 0, result.stderr
    own, worker = map(int, result.stdout.split())
    assert worker == min(own + 10, 19)


def test_ctrl_c_while_figure_workers_start_interrupts_neither_them_nor_the_sweep(tmp_path: Path) -> None:
    """A Ctrl-C (SIGINT to the whole process group) while the figure workers import: they start
    with it held back and then ignore it (no KeyboardInterrupt of theirs), and the process that
    started them gets it once they are started."""
    parent = (
        "import os, signal, sys, time; from mlpsweep import rendering; got = []; "
        "signal.signal(signal.SIGINT, lambda *_: got.append(time.monotonic())); "
        "rendering.start_workers(every_core=True); "
        "[os.killpg(os.getpgrp(), signal.SIGINT) or time.sleep(0.05) for _ in range(6)]; "
        "pool = rendering.worker_pool(every_core=True); args = ({0: {'h': 1.0}}, 't'); "
        "print(pool.submit(rendering.draw, 'gradient_norms', args, f'{sys.argv[1]}/n.png', None).result(), len(got))"
    )
    result = subprocess.run(
        [sys.executable, "-c", parent, str(tmp_path)],
        capture_output=True, text=True, timeout=120, start_new_session=True, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "KeyboardInterrupt" not in result.stderr, result.stderr
    drawn, interrupts = result.stdout.split()
    assert Path(drawn).is_file() and int(interrupts) >= 1


def _layer(rng: np.random.Generator, scale: float, stages: tuple[str, ...]) -> dict[str, Any]:
    edges = np.linspace(-scale, scale, 31).tolist()
    return {
        "histograms": {stage: (edges, rng.integers(0, 500, 30).tolist()) for stage in stages},
        "stats": {"grad_norm": 0.1 * scale, "dead_frac": rng.random()},
        "sample_pre": rng.normal(size=50).tolist(),
        "sample_post": rng.normal(size=50).tolist(),
    }


def _two_figures(drawing: str) -> tuple[tuple[Any, ...], tuple[Any, ...]]:
    """Arguments of two figures of `drawing` with the same layout and different data, ranges,
    scales, legends and numbers of points."""
    rng = np.random.default_rng(0)
    history = lambda n: [{"epoch": e, **{k: rng.random() for k in ("train_loss", "val_loss", "train_acc", "val_acc")}}
                         for e in range(1, n + 1)]  # fmt: skip
    return {
        "probe_grid": ((0, {"h1": _layer(rng, 1, ("linear", "norm", "act")), "h2": _layer(rng, 5, ("linear", "norm", "act"))}, "a"),
                       (3, {"h1": _layer(rng, 30, ("linear", "act")), "h2": _layer(rng, 0.1, ("linear", "act"))}, "b")),
        "learning_curves": ((history(3), "a"), (history(10), "b")),
        "confusion_matrix": ((rng.integers(0, 1000, (10, 10)), "a"), (rng.integers(0, 10, (10, 10)), "b")),
        "gradient_norms": (({0: {"h1": 1.0, "h2": 2.0}, 1: {"h1": 1e-5, "h2": 3.0}}, "a"),
                           ({e: {"h1": 10.0**-e, "h2": 0.5} for e in range(8)}, "b")),
    }[drawing]  # fmt: skip


@pytest.mark.parametrize("drawing", ["probe_grid", "learning_curves", "confusion_matrix", "gradient_norms"])
def test_a_figure_drawn_on_a_kept_figure_is_the_one_drawn_afresh(drawing: str, tmp_path: Path) -> None:
    """Each drawing keeps its figure for the next run's (no new axes and ticks per figure): the
    next figure must come out pixel for pixel as if drawn on a new one, colours, limits, legends and all."""
    first, second = _two_figures(drawing)
    draw = getattr(figures, drawing)

    def pixels(args: tuple[Any, ...], name: str) -> np.ndarray:
        draw(*args).savefig(tmp_path / name, dpi=50)
        return np.asarray(Image.open(tmp_path / name))

    figures._kept.clear()
    afresh = pixels(second, "afresh.png")
    figures._kept.clear()
    pixels(first, "first.png")
    kept = pixels(second, "kept.png")
    assert afresh.shape == kept.shape
    assert np.array_equal(afresh, kept), f"{np.mean(afresh != kept):.2%} of the pixels differ"


@pytest.mark.parametrize("drawing", ["probe_grid", "learning_curves", "confusion_matrix", "gradient_norms"])
def test_titles_and_x_labels_sit_where_matplotlib_would_place_them(drawing: str) -> None:
    """A kept figure's x labels, and the titles of axes that show no offset or multiplier, are
    placed once (figures._fixed_x_labels, _fixed_title), not measured at each draw: they must sit
    where matplotlib's own placement puts them, also with numbers that make matplotlib show an
    offset (counts in the millions, a stuck loss, activations that barely move), and no title may
    sit on an offset."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.transforms import IdentityTransform, blended_transform_factory

    first, second = _two_figures(drawing)
    figures._kept.clear()
    getattr(figures, drawing)(*first)
    fig = getattr(figures, drawing)(*second)
    offsets = {"probe_grid": {0: (0, 2.5e6), 2: (0.99990, 0.99991)}, "learning_curves": {0: (2.3025849, 2.3025851)}}
    for i, limits in offsets.get(drawing, {}).items():
        fig.axes[i].set_ylim(*limits)
    renderer = FigureCanvasAgg(fig).get_renderer()

    def places() -> list[float]:
        fig.draw(renderer)
        texts = [text for ax in fig.axes for text in (ax.title, ax.xaxis.label)]
        return [edge for text in texts for edge in text.get_window_extent(renderer).bounds]

    fixed = places()
    if drawing == "probe_grid":
        assert fig.axes[0].get_yticklabels()[-1].get_text().endswith("M")  # 2.5M, not "1e6" above the axis
    for i in offsets.get(drawing, {}):
        assert fig.axes[i].yaxis.get_offset_text().get_text() or drawing == "probe_grid" and i == 0
    for ax in fig.axes:
        offset = ax.yaxis.get_offset_text()
        if offset.get_text() and ax.get_title():
            assert not offset.get_window_extent(renderer).overlaps(ax.title.get_window_extent(renderer))
    for ax in fig.axes:  # matplotlib's own placement, measured at each draw (as its XAxis sets it up)
        assert hasattr(ax, "_autotitlepos") and hasattr(ax.xaxis, "_autolabelpos")  # else nothing is compared
        ax._autotitlepos = True
        ax.xaxis._autolabelpos = True
        ax.xaxis.label.set_transform(blended_transform_factory(ax.transAxes, IdentityTransform()))
    assert places() == pytest.approx(fixed, abs=0.5)  # pixels


def test_a_histogram_is_what_matplotlib_stairs_draws() -> None:
    """draw_histogram gives its steps' data limits itself instead of matplotlib's bound of their
    path: the axes must still come out as `ax.stairs` draws them (limits, baseline, legend)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    rng = np.random.default_rng(1)
    histograms = [np.histogram(rng.normal(mean, scale, 4000), 60) for mean, scale in ((0, 1), (1, 3))]

    def pixels(draw: Callable[..., None]) -> np.ndarray:
        fig = Figure(figsize=(4, 3))
        canvas = FigureCanvasAgg(fig)
        ax = fig.subplots()
        for (counts, edges), color in zip(histograms, ("tab:blue", "tab:orange")):
            draw(ax, edges.tolist(), counts.tolist(), label=color, color=color)
        ax.legend()
        canvas.draw()
        return np.asarray(canvas.buffer_rgba()).copy()

    def stairs(ax: Any, edges: list[float], counts: list[int], label: str, color: str) -> None:
        ax.stairs(counts, edges, label=label, color=color, fill=True, alpha=0.35)
        ax.stairs(counts, edges, color=color)

    drawn, expected = pixels(figures.draw_histogram), pixels(stairs)
    assert np.array_equal(drawn, expected), f"{np.mean(drawn != expected):.2%} of the pixels differ"


def test_a_nan_test_loss_fails_the_run_with_its_probe_figures_and_no_test_metric(
    tiny_cfg: Callable[..., DictConfig], tmp_path: Path
) -> None:
    """The test pass of weights whose outputs overflow (as a packed member's pack passes it in):
    the run fails as one that diverged in training, its probe's figures logged, no NaN logged."""
    cfg = tiny_cfg("trainer.max_epochs=1")
    data = load_splits(cfg.data, torch.device("cpu"))
    model = build_model(cfg, data.num_features, data.num_classes)
    drawn = Figures(tmp_path / "figures", in_worker=False)
    mlflow.set_tracking_uri(sqlite_uri(tmp_path))
    with mlflow.start_run() as run:
        probe_log = ProbeLog(new_probe(cfg, model, data), {0}, "title", drawn)
        probe_log.snapshot(0)
        nan_test = Evaluation(math.nan, 0.1, torch.zeros(10, 10, dtype=torch.long))
        with pytest.raises(DivergenceError, match="^test loss diverged to nan in the test pass$"):
            # cli.test_and_log, not imported by name: pytest would collect it as a test
            cli.test_and_log(cfg, model, data, [], probe_log, drawn, started=0.0, tested=nan_test)
    client = MlflowClient(sqlite_uri(tmp_path))
    assert not {"loss/test", "accuracy/test"} & set(client.get_run(run.info.run_id).data.metrics)
    assert [a.path for a in client.list_artifacts(run.info.run_id, "probe")] == ["probe/epoch_000.png"]
