"""The engine learns, validates in eval mode, is repeatable, and stops on divergence."""

from __future__ import annotations

import copy
import os
from collections.abc import Callable

import pytest
import torch
from omegaconf import DictConfig

from mlpsweep.data import load_splits
from mlpsweep.engine import (
    DIVERGENCE_CHECK_EVERY,
    DivergenceError,
    build_optimizer,
    cpu_threads,
    device_for_job,
    evaluate,
    fit,
    seed_everything,
    train_one_epoch,
)
from mlpsweep.model import build_model
from mlpsweep.steps import step_kind, train_step


def fit_tiny(cfg: DictConfig, hook: Callable | None = None) -> tuple[list, torch.nn.Module]:
    seed_everything(cfg.seed)
    data = load_splits(cfg.data, torch.device("cpu"))
    model = build_model(cfg, data.num_features, data.num_classes)
    if hook is not None:
        model.register_forward_hook(hook)
    optimizer = build_optimizer(cfg.optimizer, model.parameters())
    history = fit(model, optimizer, data, cfg.trainer, torch.Generator().manual_seed(cfg.seed))
    return history, model


def test_loss_falls_and_accuracy_rises(tiny_cfg: Callable[..., DictConfig]) -> None:
    history, _ = fit_tiny(tiny_cfg("trainer.max_epochs=4", "depth.widths=[64,32]"))
    assert [m.epoch for m in history] == [1, 2, 3, 4]
    assert history[-1].train_loss < history[0].train_loss / 2
    assert history[-1].val_acc > 0.9
    assert all(m.epoch_time_s > 0 for m in history)


def test_validation_runs_in_eval_mode_and_training_in_train_mode(tiny_cfg: Callable[..., DictConfig]) -> None:
    calls: list[tuple[bool, int]] = []
    cfg = tiny_cfg("dropout=heavy", "norm=batchnorm", "trainer.batch_size=32", "trainer.eval_batch_size=50")
    fit_tiny(cfg, hook=lambda module, inputs, output: calls.append((module.training, inputs[0].shape[0])))
    train_calls = [training for training, n in calls if n == 32]
    eval_calls = [training for training, n in calls if n == 50]
    assert len(train_calls) == 2 * (540 // 32) and all(train_calls)
    assert len(eval_calls) == 2 * 2 and not any(eval_calls)


def test_evaluation_of_a_dropout_model_is_deterministic(tiny_cfg: Callable[..., DictConfig]) -> None:
    cfg = tiny_cfg("dropout=heavy", "trainer.max_epochs=1")
    _, model = fit_tiny(cfg)
    data = load_splits(cfg.data, torch.device("cpu"))
    loss, acc = evaluate(model, data.val, 50)
    assert (loss, acc) == evaluate(model, data.val, 50)
    assert not model.training
    with torch.no_grad():
        eval_loss = torch.nn.functional.cross_entropy(model(data.val.x), data.val.y).item()
        model.train()
        dropout_loss = torch.nn.functional.cross_entropy(model(data.val.x), data.val.y).item()
    assert loss == pytest.approx(eval_loss, rel=1e-5)
    assert dropout_loss != pytest.approx(eval_loss, rel=1e-3)


def test_last_partial_batch_is_dropped(tiny_cfg: Callable[..., DictConfig]) -> None:
    steps: list[int] = []
    fit_tiny(tiny_cfg("trainer.batch_size=100", "trainer.eval_batch_size=64", "trainer.max_epochs=1"), hook=lambda m, i, o: steps.append(i[0].shape[0]))
    assert steps.count(100) == 540 // 100  # 5 full batches of 540 images, the last 40 dropped


def test_same_seed_gives_the_same_numbers_on_cpu(tiny_cfg: Callable[..., DictConfig]) -> None:
    first, _ = fit_tiny(tiny_cfg("dropout=lecture", "seed=3"))
    second, _ = fit_tiny(tiny_cfg("dropout=lecture", "seed=3"))
    other, _ = fit_tiny(tiny_cfg("dropout=lecture", "seed=4"))
    strip = lambda history: [(m.train_loss, m.train_acc, m.val_loss, m.val_acc) for m in history]  # noqa: E731
    assert strip(first) == strip(second)
    assert strip(first) != strip(other)


def test_divergence_stops_training_with_where_it_happened(tiny_cfg: Callable[..., DictConfig]) -> None:
    with pytest.raises(DivergenceError, match=r"loss diverged to (nan|inf) at epoch 1, step \d+"):
        fit_tiny(tiny_cfg("optimizer.lr=1e30"))


@pytest.mark.parametrize(
    ("overrides", "kind"),
    [
        (["depth.widths=[64,32]"], "backprop"),  # ReLU, plain SGD: the lecture's MLP
        (["activation=sigmoid", "depth.widths=[64,32]"], "backprop"),
        (["activation=tanh", "model.bias=false", "depth.widths=[48]"], "backprop"),
        (["activation=leaky_relu", "depth.widths=[64,32,16]"], "backprop"),
        (["norm=batchnorm", "depth.widths=[64,32]"], "backprop"),  # the lecture's BN model
        (["norm=batchnorm", "activation=sigmoid", "model.bias=false", "depth.widths=[48]"], "backprop"),
        (["dropout=lecture", "depth.widths=[64,32]"], "backprop"),  # the lecture's MLP_Dropout
        (["norm=batchnorm", "dropout=heavy", "activation=tanh", "depth.widths=[64,32]"], "backprop"),
        (["norm=batchnorm", "dropout=lecture", "depth.widths=[64,32]", "optimizer=sgd_momentum"], "backprop"),
        (["activation=sigmoid", "depth.widths=[64,32]", "optimizer=sgd_momentum", "optimizer.nesterov=true",
          "optimizer.weight_decay=0.001"], "backprop"),
        (["norm=batchnorm", "depth.widths=[64,32]", "optimizer=adam"], "autograd"),
    ],
    ids=["relu", "sigmoid", "tanh-nobias", "leaky_relu-3", "bn-relu", "bn-sigmoid-nobias", "dropout", "bn-dropout-tanh",
         "bn-dropout-momentum", "sigmoid-nesterov-decay", "bn-adam"],
)
def test_fast_epoch_computes_what_a_plain_step_by_step_loop_computes(
    tiny_cfg: Callable[..., DictConfig], overrides: list[str], kind: str
) -> None:
    """Same batches, same updates: the engine's losses and weights equal a textbook loop's."""
    cfg = tiny_cfg(*overrides)
    data = load_splits(cfg.data, torch.device("cpu"))
    seed_everything(0)
    model = build_model(cfg, data.num_features, data.num_classes)
    reference = copy.deepcopy(model)
    bs = cfg.trainer.batch_size

    torch.manual_seed(1)  # dropout masks
    optimizer = build_optimizer(cfg.optimizer, model.parameters())
    assert step_kind(model, optimizer, fast=True, precision="fp32") == kind
    _, step = train_step(model, optimizer, bs, data.num_features)
    losses, _ = train_one_epoch(model, step, data.train, bs, torch.Generator().manual_seed(5))

    torch.manual_seed(1)
    optimizer = build_optimizer(cfg.optimizer, reference.parameters())
    order = torch.randperm(len(data.train), generator=torch.Generator().manual_seed(5))
    reference.train()
    expected = []
    for step in range(len(data.train) // bs):
        idx = order[step * bs : (step + 1) * bs]
        optimizer.zero_grad()
        loss = torch.nn.functional.cross_entropy(reference(data.train.x[idx]), data.train.y[idx])
        loss.backward()
        optimizer.step()
        expected.append(loss.item())
    assert losses.tolist() == pytest.approx(expected, rel=1e-5, abs=1e-6)
    for (name, p), q in zip(model.state_dict().items(), reference.state_dict().values(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-6, msg=name)  # weights, and batch-norm statistics


def test_bf16_autocast_trains_on_the_cpu(tiny_cfg: Callable[..., DictConfig]) -> None:
    history, _ = fit_tiny(tiny_cfg("trainer.precision=bf16", "trainer.max_epochs=3", "depth.widths=[64]"))
    assert history[-1].train_loss < history[0].train_loss and history[-1].val_acc > 0.8


def test_a_bf16_evaluation_sums_its_losses_in_float32(tiny_cfg: Callable[..., DictConfig]) -> None:
    """bf16 logits, their cross-entropy summed in float32 (summed in bf16, which keeps 8 bits, a
    validation loss of 2.1 came out where the packed launcher's float32 sum gave 2.11763)."""
    cfg = tiny_cfg()
    data = load_splits(cfg.data, torch.device("cpu"))
    model = build_model(cfg, data.num_features, data.num_classes).eval()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        logits = model(data.val.x)
    expected = torch.nn.functional.cross_entropy(logits.float(), data.val.y, reduction="sum").item() / len(data.val)
    loss, _ = evaluate(model, data.val, cfg.trainer.eval_batch_size, "bf16")
    assert loss == pytest.approx(expected, rel=1e-6)


def test_divergence_stops_within_a_check_interval_not_at_the_epoch_end(tiny_cfg: Callable[..., DictConfig]) -> None:
    train_steps: list[bool] = []
    with pytest.raises(DivergenceError, match=r"at epoch 1, step \d+$") as err:
        fit_tiny(tiny_cfg("optimizer.lr=1e30", "trainer.batch_size=4"), hook=lambda m, i, o: train_steps.append(m.training))
    assert int(str(err.value).rsplit(" ", 1)[1]) < DIVERGENCE_CHECK_EVERY
    assert sum(train_steps) == DIVERGENCE_CHECK_EVERY < 540 // 4  # stopped at the first look, long before the epoch's end


def test_parallel_jobs_are_spread_over_the_gpus() -> None:
    cuda = torch.device("cuda")
    assert [device_for_job(cuda, n, gpu_count=2).index for n in range(4)] == [0, 1, 0, 1]
    assert device_for_job(torch.device("cuda", 1), 0, gpu_count=2).index == 1  # named explicitly: kept
    assert device_for_job(cuda, 3, gpu_count=1) == cuda
    assert device_for_job(torch.device("cpu"), 3, gpu_count=2).type == "cpu"


def test_cpu_threads_split_the_cores_between_parallel_jobs() -> None:
    cores = os.cpu_count() or 1
    assert cpu_threads(None, None) == cores
    assert cpu_threads(None, 2) == max(1, cores // 2)
    assert cpu_threads(None, -1) == 1  # joblib's n_jobs=-1: a job per core
    assert cpu_threads(3, 8) == 3
