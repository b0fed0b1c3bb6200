"""The training options of an ablation: weight initialisation, learning-rate schedules, early
stopping, and the gradients the probe measures inside the network."""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from conftest import compose_config, sqlite_uri
from mlflow.tracking import MlflowClient
from omegaconf import DictConfig

from mlpsweep.checkpoint import CheckpointIdentity, checkpoint_path, load_checkpoint, save_checkpoint
from mlpsweep.cli import train
from mlpsweep.early_stopping import BestWeights, EarlyStopping
from mlpsweep.engine import EpochMetrics, build_optimizer
from mlpsweep.model import build_model
from mlpsweep.probe import ActivationProbe
from mlpsweep.schedulers import build_schedule, current_lr
from mlpsweep.tracking import run_name

WIDTHS = "depth.widths=[512,256]"


def model_for(*overrides: str) -> torch.nn.Sequential:
    torch.manual_seed(0)
    return build_model(compose_config([WIDTHS, *overrides]), 784, 10)


# --- init -----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("activation", "gain"), [("relu", math.sqrt(2)), ("tanh", 5 / 3), ("sigmoid", 1.0), ("gelu", math.sqrt(2))]
)
def test_kaiming_normal_scales_by_the_activations_gain(activation: str, gain: float) -> None:
    model = model_for("init=kaiming_normal", f"activation={activation}")
    weight = model.hidden2.linear.weight  # 256 x 512: std gain / sqrt(fan_in)
    assert weight.std().item() == pytest.approx(gain / math.sqrt(512), rel=0.02)
    assert abs(weight.mean().item()) < 0.01 * gain / math.sqrt(512) * 10
    assert model.head.weight.std().item() == pytest.approx(1 / math.sqrt(256), rel=0.05)  # the head: linear gain


def test_xavier_uniform_fills_glorots_bound() -> None:
    model = model_for("init=xavier_uniform", "activation=tanh")
    bound = 5 / 3 * math.sqrt(6 / (512 + 256))
    weight = model.hidden2.linear.weight
    assert weight.abs().max().item() <= bound and weight.abs().max().item() > 0.99 * bound
    assert weight.std().item() == pytest.approx(bound / math.sqrt(3), rel=0.02)


def test_xavier_normal_and_kaiming_uniform_spreads() -> None:
    normal = model_for("init=xavier_normal", "activation=sigmoid").hidden2.linear.weight
    assert normal.std().item() == pytest.approx(math.sqrt(2 / (512 + 256)), rel=0.02)
    uniform = model_for("init=kaiming_uniform", "activation=leaky_relu").hidden2.linear.weight
    gain = math.sqrt(2 / (1 + 0.01**2))
    assert uniform.abs().max().item() <= gain * math.sqrt(3 / 512)
    assert uniform.std().item() == pytest.approx(gain / math.sqrt(512), rel=0.02)


def test_orthogonal_rows_are_orthonormal_times_the_gain() -> None:
    weight = model_for("init=orthogonal", "activation=relu").hidden2.linear.weight  # 256 x 512: orthogonal rows
    torch.testing.assert_close(weight @ weight.T, 2.0 * torch.eye(256), atol=1e-4, rtol=0)


def test_bias_zeros_or_default_and_default_init_is_pytorchs() -> None:
    assert all(not m.bias.any() for m in model_for("init=orthogonal").modules() if isinstance(m, torch.nn.Linear))
    kept = model_for("init=orthogonal", "init.bias=default").hidden1.linear.bias
    assert kept.abs().max().item() <= 1 / math.sqrt(784) and kept.abs().min().item() > 0
    torch.manual_seed(0)
    pytorch = torch.nn.Linear(784, 512)
    torch.testing.assert_close(model_for("init=default").hidden1.linear.weight, pytorch.weight, rtol=0, atol=0)


def test_init_and_scheduler_join_the_run_name_and_params_only_when_not_default() -> None:
    assert run_name(compose_config()) == "relu-none-p0-1024x300-s0"
    cfg = compose_config(["init=xavier_uniform", "scheduler=cosine", "depth=deep", "seed=1"])
    assert run_name(cfg) == "relu-none-p0-256x256x256x256x256x256x256x256-xavier_uniform-cosine-s1"


# --- schedules ------------------------------------------------------------------------------------


def epoch_lrs(
    name: str, *overrides: str, epochs: int = 10, steps_per_epoch: int = 1, losses: list[float] | None = None
) -> list[float]:
    """The learning rate each epoch starts with under scheduler `name` (SGD, lr 0.1)."""
    cfg = compose_config([f"scheduler={name}", *overrides])
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
    schedule = build_schedule(cfg.scheduler, optimizer, epochs, steps_per_epoch)
    rates = []
    for epoch in range(epochs):
        rates.append(current_lr(optimizer))
        for _ in range(steps_per_epoch):
            optimizer.step()
            if schedule.per_step:
                schedule.after_step()
        schedule.after_epoch({"val_loss": losses[epoch] if losses else 1.0, "val_acc": 0.5})
    return rates


def test_step_schedule() -> None:
    assert epoch_lrs("step", "scheduler.step_size=3", "scheduler.gamma=0.5") == pytest.approx(
        [0.1] * 3 + [0.05] * 3 + [0.025] * 3 + [0.0125]
    )


def test_cosine_schedule_with_and_without_warmup() -> None:
    cosine = [0.001 + (0.1 - 0.001) * (1 + math.cos(math.pi * e / 10)) / 2 for e in range(10)]
    assert epoch_lrs("cosine", "scheduler.min_lr=0.001") == pytest.approx(cosine)
    warm = epoch_lrs("cosine", "scheduler.warmup_epochs=2", "scheduler.warmup_start_factor=0.1")
    after_warmup = [(1 + math.cos(math.pi * e / 8)) / 2 * 0.1 for e in range(8)]
    assert warm == pytest.approx([0.01, 0.055, *after_warmup])


def test_onecycle_schedule_steps_every_batch() -> None:
    rates = epoch_lrs("onecycle", "scheduler.pct_start=0.3", epochs=10, steps_per_epoch=10)
    assert rates[0] == pytest.approx(0.1 / 25)  # max_lr / div_factor
    assert rates[3] == pytest.approx(0.1, rel=1e-3)  # the peak at 30% of the 100 steps
    assert all(a > b for a, b in itertools.pairwise(rates[3:]))  # then down


def test_plateau_schedule_cuts_the_rate_when_validation_loss_stalls() -> None:
    losses = [1.0, 0.9, 0.8, 0.8, 0.8, 0.8, 0.8, 0.8, 0.8, 0.8]
    rates = epoch_lrs("plateau", "scheduler.patience=2", "scheduler.factor=0.5", losses=losses)
    assert rates == pytest.approx([0.1] * 6 + [0.05] * 3 + [0.025])


@pytest.mark.parametrize("fast_step", [True, False], ids=["backprop", "autograd"])
def test_a_run_logs_its_learning_rate_per_epoch(
    fast_step: bool, tiny_cfg: Callable[..., DictConfig], tmp_path: Path
) -> None:
    overrides = ["scheduler=step", "scheduler.step_size=1", "scheduler.gamma=0.5", "depth.widths=[16]"]
    train(tiny_cfg(*overrides, "trainer.max_epochs=3", "probe.enabled=false", f"trainer.fast_step={fast_step}"))
    client = MlflowClient(sqlite_uri(tmp_path))
    run = client.search_runs([client.get_experiment_by_name("mlpsweep").experiment_id])[0]
    assert run.data.params["scheduler"] == "step" and run.data.params["train_step"] == (
        "backprop" if fast_step else "autograd"
    )
    rates = client.get_metric_history(run.info.run_id, "lr")
    assert [m.step for m in rates] == [1, 2, 3] and [m.value for m in rates] == pytest.approx([0.1, 0.05, 0.025])


def test_the_backprop_step_follows_a_schedule_as_autograd_does(tiny_cfg: Callable[..., DictConfig]) -> None:
    """The same run with the hand-derived step and with autograd: the same validation accuracy."""
    overrides = ["scheduler=onecycle", "depth.widths=[32]", "probe.enabled=false", "tracking.log_model=false"]
    assert train(tiny_cfg(*overrides)) == pytest.approx(
        train(tiny_cfg(*overrides, "trainer.fast_step=false")), abs=1e-9
    )


# --- early stopping -------------------------------------------------------------------------------


def history(values: list[float], key: str = "val_loss") -> list[EpochMetrics]:
    other = "val_acc" if key == "val_loss" else "val_loss"
    return [
        EpochMetrics(epoch=i + 1, train_loss=0, train_acc=0, epoch_time_s=0, **{key: v, other: 0.0})
        for i, v in enumerate(values)
    ]


def test_best_epoch_and_stop_follow_patience_and_min_delta() -> None:
    stopping = EarlyStopping("val_loss", patience=2, min_delta=0.05)
    losses = [1.0, 0.8, 0.78, 0.77, 0.6, 0.7, 0.65]  # 0.78 and 0.77 improve by less than min_delta
    assert [stopping.best_epoch(history(losses[:n])) for n in range(1, 8)] == [1, 2, 2, 2, 5, 5, 5]
    assert [stopping.should_stop(history(losses[:n])) for n in range(1, 8)] == [
        False,
        False,
        False,
        True,
        False,
        False,
        True,
    ]
    accuracy = EarlyStopping("val_acc", patience=1)
    assert accuracy.best_epoch(history([0.5, 0.7, 0.7, 0.6], "val_acc")) == 2  # a tie is no improvement
    assert accuracy.should_stop(history([0.5, 0.7, 0.7], "val_acc"))
    assert not EarlyStopping(patience=None).should_stop(history([1.0] * 20))


def test_early_stopping_stops_and_tests_the_best_epochs_weights(
    tiny_cfg: Callable[..., DictConfig], tmp_path: Path
) -> None:
    # no epoch can improve val_acc by more than 1: the first epoch stays the best and training stops after 1 + patience
    stop = [
        "trainer.early_stopping.monitor=val_acc",
        "trainer.early_stopping.min_delta=1.0",
        "trainer.early_stopping.patience=2",
    ]
    small = ["depth.widths=[32]", "probe.enabled=false", "tracking.log_model=false"]
    train(tiny_cfg(*small, *stop, "trainer.max_epochs=10"))
    train(tiny_cfg(*small, "trainer.max_epochs=1"))  # what epoch 1 alone tests at
    client = MlflowClient(sqlite_uri(tmp_path))
    stopped, one_epoch = client.search_runs(
        [client.get_experiment_by_name("mlpsweep").experiment_id], order_by=["start_time ASC"]
    )
    assert len(client.get_metric_history(stopped.info.run_id, "accuracy/val")) == 3
    assert (stopped.data.metrics["best_epoch"], stopped.data.metrics["stopped_epoch"]) == (1, 3)
    assert stopped.data.metrics["accuracy/test"] == one_epoch.data.metrics["accuracy/test"]
    assert stopped.data.metrics["loss/test"] == one_epoch.data.metrics["loss/test"]
    assert "best_epoch" not in one_epoch.data.metrics  # off by default


def test_a_checkpoint_carries_the_schedule_and_the_best_weights(
    tiny_cfg: Callable[..., DictConfig], tmp_path: Path
) -> None:
    cfg = tiny_cfg("scheduler=plateau", "depth.widths=[16]")
    identity = CheckpointIdentity("sqlite:///x.db", "mlpsweep", "hash", "data")

    def state() -> tuple:
        model = build_model(cfg, 784, 10)
        optimizer = build_optimizer(cfg.optimizer, model.parameters())
        return model, optimizer, build_schedule(cfg.scheduler, optimizer, 10, 5), torch.Generator()

    model, optimizer, schedule, generator = state()
    for loss in (1.0, 1.0, 1.0, 1.0):
        schedule.after_epoch({"val_loss": loss})
    best = BestWeights(EarlyStopping(patience=3))
    best.update(history([0.5]), model)
    path = checkpoint_path(tmp_path, identity)
    save_checkpoint(path, identity, "run", cfg, model, optimizer, generator, history([0.5, 0.6]), schedule, best.state)

    model2, optimizer2, schedule2, generator2 = state()
    resumed = load_checkpoint(path, identity, model2, optimizer2, generator2, schedule2)
    assert current_lr(optimizer2) == pytest.approx(0.01)
    assert schedule2.state_dict() == schedule.state_dict()
    assert resumed.best_model is not None
    for key, value in model.state_dict().items():
        torch.testing.assert_close(resumed.best_model[key], value, rtol=0, atol=0)


# --- gradients inside the network -----------------------------------------------------------------


def gradient_norms(*overrides: str, steps: int = 0) -> list[float]:
    """The weight-gradient norm of each of eight sigmoid layers, input side first."""
    cfg = compose_config(["depth=deep", "activation=sigmoid", *overrides])
    torch.manual_seed(0)
    model = build_model(cfg, 784, 10)
    generator = torch.Generator().manual_seed(0)
    x, y = torch.randn(256, 784, generator=generator), torch.randint(0, 10, (256,), generator=generator)
    norms = ActivationProbe(model, x, "sigmoid", y=y).gradient_norms()
    return [norms[f"hidden{i}"]["grad_norm"] for i in range(1, 9)]


def test_gradients_vanish_towards_the_input_of_a_deep_sigmoid_network_but_not_with_batchnorm() -> None:
    plain = gradient_norms("norm=none")
    assert all(a < b for a, b in itertools.pairwise(plain)) and plain[0] < 1e-3 * plain[-1]
    normed = gradient_norms("norm=batchnorm")
    assert normed[0] > 0.1 * normed[-1]


def test_measuring_gradients_changes_nothing_in_the_model() -> None:
    cfg = compose_config(["depth.widths=[32,16]", "norm=batchnorm", "dropout=lecture"])
    torch.manual_seed(0)
    model = build_model(cfg, 784, 10).train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x, y = torch.randn(64, 784), torch.randint(0, 10, (64,))
    rng = torch.get_rng_state()
    snapshot = ActivationProbe(model, x, "relu", y=y).snapshot(1, with_histograms=False)
    assert {"grad_norm", "input_grad_norm"} <= set(snapshot.layers["hidden1"].stats)
    assert snapshot.layers["hidden1"].stats["input_grad_norm"] > 0
    assert model.training and all(p.grad is None for p in model.parameters())
    assert torch.equal(torch.get_rng_state(), rng)  # no dropout mask drawn: the training's random stream is untouched
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key
