"""The lecture's nine models as presets: exact shapes and parameter counts, and every preset runs."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from conftest import REPO_ROOT, compose_config, sqlite_uri, tiny_overrides
from hydra import compose, initialize_config_dir
from hydra.types import RunMode
from mlflow.tracking import MlflowClient
from omegaconf import DictConfig
from torch import nn

from mlpsweep import lecture
from mlpsweep.cli import train
from mlpsweep.config import CONFIG_DIR
from mlpsweep.lecture import BN_PRESETS, batchnorm_question, dropout_question, preset_axes, verdict
from mlpsweep.model import build_model, count_parameters
from mlpsweep.sweep import job_overrides
from mlpsweep.tracking import ROLE_TAG

# preset: (Linear shapes (in, out), bias, activation, norm, dropout p, epochs, parameters counted by hand)
LECTURE = {
    "one_layer": ([(784, 200), (200, 10)], False, nn.ReLU, None, 0.0, 25, 158_800),
    "mlp": ([(784, 165), (165, 165), (165, 10)], True, nn.ReLU, None, 0.0, 25, 158_575),
    "mlp_sigmoid": ([(784, 1024), (1024, 300), (300, 10)], True, nn.Sigmoid, None, 0.0, 10, 1_114_350),
    "mlp_tanh": ([(784, 1024), (1024, 300), (300, 10)], True, nn.Tanh, None, 0.0, 10, 1_114_350),
    "mlp_relu": ([(784, 1024), (1024, 300), (300, 10)], True, nn.ReLU, None, 0.0, 10, 1_114_350),
    "mlp_sigmoid_batchnorm": ([(784, 1024), (1024, 300), (300, 10)], True, nn.Sigmoid, nn.BatchNorm1d, 0.0, 10, 1_116_998),
    "mlp_relu_batchnorm": ([(784, 1024), (1024, 300), (300, 10)], True, nn.ReLU, nn.BatchNorm1d, 0.0, 10, 1_116_998),
    "dropout": ([(784, 32), (32, 10)], True, nn.ReLU, None, 0.2, 25, 25_450),
    "mlp_dropout": ([(784, 165), (165, 165), (165, 10)], True, nn.ReLU, nn.BatchNorm1d, 0.2, 25, 159_235),
}
PRESETS = sorted(p.stem for p in (CONFIG_DIR / "lecture").glob("*.yaml") if not p.stem.startswith("_"))
EXPERIMENTS = sorted(str(p.relative_to(CONFIG_DIR / "experiment").with_suffix("")) for p in (CONFIG_DIR / "experiment").rglob("*.yaml"))


def test_there_is_a_preset_per_lecture_model() -> None:
    assert PRESETS == sorted(LECTURE)


@pytest.mark.parametrize("preset", sorted(LECTURE))
def test_preset_builds_the_lectures_model(preset: str) -> None:
    shapes, bias, act, norm, p, epochs, num_params = LECTURE[preset]
    cfg = compose_config([f"lecture={preset}"])
    model = build_model(cfg, 784, 10)
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == shapes
    assert all((m.bias is not None) == bias for m in linears)
    for block in list(model.children())[:-1]:
        layers = list(block.children())
        assert [type(m) for m in layers] == [nn.Linear] + ([norm] if norm else []) + [act] + ([nn.Dropout] if p else [])
    assert count_parameters(model) == num_params
    assert cfg.trainer.max_epochs == epochs
    assert (cfg.optimizer.name, cfg.optimizer.lr, cfg.optimizer.momentum, cfg.trainer.batch_size) == ("sgd", 0.1, 0.0, 32)
    assert (cfg.data.val_size, cfg.data.normalize) == (6000, False)


@pytest.mark.parametrize("preset", PRESETS)
def test_every_preset_trains_one_tiny_epoch(preset: str, tiny_cfg: Callable[..., DictConfig]) -> None:
    cfg = tiny_cfg(f"lecture={preset}", "trainer.max_epochs=1")
    assert 0 <= train(cfg) <= 1


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_every_experiment_is_a_sweep_of_its_presets(experiment: str) -> None:
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        cfg = compose(config_name="train", overrides=[f"experiment={experiment}"], return_hydra_config=True)
        jobs = job_overrides(cfg)
    expected = {"lecture/bn_ablation": 6, "lecture/all": 9}[experiment]
    assert cfg.hydra.mode == RunMode.MULTIRUN and len(jobs) == expected and len({tuple(j) for j in jobs}) == expected


@pytest.mark.slow
def test_the_whole_lecture_runs_as_one_sweep(tiny_mnist_root: Path, tmp_path: Path) -> None:
    experiment = "lecture/all"
    command = [sys.executable, str(REPO_ROOT / "train.py"), f"experiment={experiment}"]
    command += tiny_overrides(tiny_mnist_root, tmp_path) + ["trainer.max_epochs=1", "probe.enabled=false"]
    command += [f"hydra.sweep.dir={tmp_path / 'multirun'}"]
    result = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    client = MlflowClient(sqlite_uri(tmp_path))
    runs = client.search_runs([client.get_experiment_by_name("mlpsweep").experiment_id])
    children = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    assert len(runs) == len(children) + 1
    assert all(r.info.status == "FINISHED" for r in runs)
    assert len(children) == len({r.info.run_name for r in children}) == 9


def test_verdict_uses_the_prediction_interval_of_one_new_run() -> None:
    # mean 0.94, s = 0.001, n = 3: half width t(0.975, 2) * 0.001 * sqrt(4/3) = 4.302653 * 0.0011547 = 0.0049683
    assert verdict(0.9449, [0.939, 0.940, 0.941]) == ("+0.49 pp", "within seed noise [0.9350, 0.9450]")
    assert verdict(0.9451, [0.939, 0.940, 0.941])[1].startswith("beyond seed noise")
    assert verdict(0.93, [0.94]) == ("-1.00 pp", "needs repeated seeds")


def preset_frame(accuracies: dict[tuple[str, ...], float], seeds: int = 5, noise: float = 0.001) -> pd.DataFrame:
    """Finished runs of lecture presets (with overrides) at a mean test accuracy each, plus seed noise."""
    rng = np.random.default_rng(0)
    rows = [{**preset_axes(*key), "seed": seed, "test_acc": acc + rng.normal(0, noise)}
            for key, acc in accuracies.items() for seed in range(seeds)]  # fmt: skip
    return pd.DataFrame(rows)


@pytest.mark.parametrize(
    ("sigmoid_gain", "relu_gain", "answer"),
    [(0.025, 0.001, "Yes."), (0.001, 0.025, "No, it helps ReLU more."), (0.01, 0.01, "No: it helps both about equally.")],
)
def test_the_batchnorm_question_is_answered_from_the_interaction(sigmoid_gain: float, relu_gain: float, answer: str) -> None:
    means = dict(zip(BN_PRESETS, (0.939, 0.939 + sigmoid_gain, 0.982, 0.982 + relu_gain), strict=True))
    text = batchnorm_question(preset_frame({(preset,): acc for preset, acc in means.items()}, noise=0.0002))
    assert text.startswith(f"**Does Batch Normalization help sigmoid more than ReLU?** {answer}")
    expected = 100 * (relu_gain - sigmoid_gain)
    interaction = float(text.split("The interaction, ReLU's gain minus sigmoid's, is ")[1].split(" pp")[0])
    assert interaction == pytest.approx(expected, abs=0.05)
    unresolved = batchnorm_question(preset_frame({(preset,): acc for preset, acc in means.items()}, seeds=1))
    assert unresolved.startswith("Not answered: it needs at least 2 seeds")


def test_the_dropout_question_compares_the_mlp_with_and_without_dropout() -> None:
    runs = preset_frame({("mlp",): 0.9816, ("mlp", "dropout=lecture"): 0.9836})
    without, with_dropout = runs[runs.dropout == "0"], runs[runs.dropout == "0.2"]
    text = dropout_question(without, with_dropout)
    assert text.startswith("**Does Dropout help the 165-165 MLP?** Yes.")
    assert "changes its test accuracy by +0.2" in text and "over 5 seeds paired by seed" in text
    same = preset_frame({("mlp",): 0.9816, ("mlp", "dropout=lecture"): 0.9816}, noise=0.0002)
    answer = dropout_question(same[same.dropout == "0"], same[same.dropout == "0.2"])
    assert answer.startswith("**Does Dropout help the 165-165 MLP?** No: with and without it the MLP is equivalent")
    assert dropout_question(without, with_dropout.iloc[:1]).startswith("Not answered")


def test_the_lecture_table_is_not_rewritten_from_a_sweep_without_lecture_runs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """`python -m mlpsweep.lecture` on a sweep none of whose runs is a lecture preset: one line,
    exit 2, the document untouched (it rewrote every row to 'not run'); a missing --doc likewise."""
    client = MlflowClient(sqlite_uri(tmp_path))
    client.create_run(client.create_experiment("mlpsweep"), run_name="other", tags={ROLE_TAG: "sweep"})
    doc = tmp_path / "lecture.md"
    doc.write_text("<!-- results:begin -->\nour table\n<!-- results:end -->\n")
    for path, says in ((doc, "must be a sweep of the lecture's presets"), (tmp_path / "none.md", "not a file")):
        monkeypatch.setattr(sys, "argv", ["lecture", "--tracking-uri", sqlite_uri(tmp_path), "--doc", str(path)])
        with pytest.raises(SystemExit) as done:
            lecture.main()
        assert done.value.code == 2 and says in capsys.readouterr().err
    assert doc.read_text() == "<!-- results:begin -->\nour table\n<!-- results:end -->\n"
