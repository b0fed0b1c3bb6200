"""Each run gets the fastest training step that computes what autograd computes, and only such a step.

The CPU step's equivalence with a textbook loop is in test_engine.py; its SGD variants (momentum,
Nesterov, weight decay), learning-rate changes and optimizer state are checked against autograd
here. The CUDA graph's equivalence is here too and runs where a GPU is (it skips on CPU-only
machines such as CI).
"""

from __future__ import annotations

import copy
import io
from collections.abc import Callable
from typing import Any

import pytest
import torch
from conftest import compose_config
from omegaconf import DictConfig
from torch.optim import lr_scheduler

from mlpsweep.data import load_splits
from mlpsweep.engine import build_optimizer, fit, seed_everything
from mlpsweep.model import build_model
from mlpsweep.steps import autograd_step, backprop_step, lr_as_tensor, step_kind, train_step

needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")


@pytest.mark.parametrize(
    ("overrides", "kind"),
    [
        ([], "backprop"),
        (["activation=sigmoid"], "backprop"),
        (["activation=gelu"], "autograd"),  # no hand-derived backward for it
        (["norm=batchnorm", "activation=tanh"], "backprop"),
        (["norm=layernorm"], "autograd"),
        (["dropout=lecture"], "backprop"),
        (["optimizer=sgd_momentum"], "backprop"),
        (["optimizer=sgd_momentum", "optimizer.nesterov=true", "optimizer.weight_decay=0.01"], "backprop"),
        (["optimizer.weight_decay=0.01"], "backprop"),
        (["optimizer=adam"], "autograd"),
        (["trainer.precision=bf16"], "autograd"),
        (["trainer.fast_step=false"], "autograd"),
    ],
)
def test_cpu_step_choice(overrides: list[str], kind: str) -> None:
    cfg = compose_config(["depth.widths=[16]", *overrides])
    model = build_model(cfg, 784, 10)
    optimizer = build_optimizer(cfg.optimizer, model.parameters())
    assert step_kind(model, optimizer, cfg.trainer.fast_step, cfg.trainer.precision) == kind


def test_a_maximizing_sgd_trains_by_autograd() -> None:
    model = build_model(compose_config(["depth.widths=[16]"]), 784, 10)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, maximize=True)
    assert step_kind(model, optimizer, fast=True, precision="fp32") == "autograd"


def test_a_model_of_another_layout_trains_by_autograd() -> None:
    model = torch.nn.Sequential(torch.nn.Linear(784, 16), torch.nn.ReLU(), torch.nn.Linear(16, 10))
    assert step_kind(model, torch.optim.SGD(model.parameters(), lr=0.1), fast=True, precision="fp32") == "autograd"


def test_a_hooked_model_trains_by_autograd_so_its_hooks_see_every_step() -> None:
    model = build_model(compose_config(["depth.widths=[16]"]), 784, 10)
    optimizer = build_optimizer(compose_config().optimizer, model.parameters())
    model.hidden1.act.register_forward_hook(lambda *_: None)
    assert step_kind(model, optimizer, fast=True, precision="fp32") == "autograd"


SGD_SETTINGS = {
    "plain": {},
    "momentum": {"momentum": 0.9},
    "nesterov": {"momentum": 0.9, "nesterov": True},
    "weight_decay": {"weight_decay": 0.01},
    "all": {"momentum": 0.8, "dampening": 0.1, "weight_decay": 0.01},
}
MODELS = {
    "sigmoid": ["activation=sigmoid"],
    "bn-dropout-tanh": ["norm=batchnorm", "dropout=lecture", "activation=tanh"],
}


Model = torch.nn.Module


def sgd_pair(model_overrides: list[str], settings: dict) -> tuple[Model, torch.optim.SGD, Model, torch.optim.SGD]:
    """A small model and its copy, each with its own torch.optim.SGD of `settings`."""
    seed_everything(0)
    model = build_model(compose_config(["depth.widths=[32,16]", *model_overrides]), 784, 10).train()
    reference = copy.deepcopy(model)
    optimizers = [torch.optim.SGD(m.parameters(), lr=0.1, **settings) for m in (model, reference)]
    return model, optimizers[0], reference, optimizers[1]


def through_a_checkpoint(state: dict) -> dict:
    """`state` saved and loaded back as checkpoint.py loads it (weights_only, onto the CPU)."""
    saved = io.BytesIO()
    torch.save(state, saved)
    saved.seek(0)
    return torch.load(saved, map_location="cpu", weights_only=True)


def batches(n: int, device: str = "cpu") -> list[tuple[torch.Tensor, torch.Tensor]]:
    """n random batches of 32 MNIST-sized inputs and labels."""
    generator = torch.Generator(device=device).manual_seed(7)
    x = torch.rand(n, 32, 784, device=device, generator=generator)
    return list(zip(x, torch.randint(0, 10, (n, 32), device=device, generator=generator), strict=True))


def assert_same_training_state(
    model: Model, optimizer: torch.optim.Optimizer, reference: Model, reference_optimizer: torch.optim.Optimizer
) -> None:
    """Same weights and batch-norm statistics, same optimizer state (momentum buffers) and rate, up
    to float rounding. The bias of a Linear before batch norm has a gradient of zero but for rounding,
    which momentum accumulates and the running mean follows: there the two differ by up to ~3e-6."""
    rtol, atol = 1e-4, 1e-6
    for (name, p), q in zip(model.state_dict().items(), reference.state_dict().values(), strict=True):
        torch.testing.assert_close(p, q, rtol=rtol, atol=1e-5 if name.endswith("running_mean") else atol, msg=name)
    state, expected = optimizer.state_dict(), reference_optimizer.state_dict()
    assert state["state"].keys() == expected["state"].keys()
    torch.testing.assert_close(state["state"], expected["state"], rtol=rtol, atol=atol)
    assert float(state["param_groups"][0]["lr"]) == pytest.approx(float(expected["param_groups"][0]["lr"]), rel=1e-6)


@pytest.mark.filterwarnings("error::UserWarning")  # the schedules see the step as an optimizer.step()
@pytest.mark.parametrize("model_overrides", MODELS.values(), ids=MODELS)
@pytest.mark.parametrize("settings", SGD_SETTINGS.values(), ids=SGD_SETTINGS)
def test_backprop_step_updates_as_torch_sgd_does_under_a_schedule(model_overrides: list[str], settings: dict) -> None:
    """Plain SGD, momentum, Nesterov, dampening, weight decay: the same losses, weights, batch-norm
    statistics and momentum buffers as autograd with torch.optim.SGD, step after step, while a
    schedule lowers the learning rate between steps."""
    model, optimizer, reference, reference_optimizer = sgd_pair(model_overrides, settings)
    assert step_kind(model, optimizer, fast=True, precision="fp32") == "backprop"
    fast, eager = backprop_step(model, optimizer, 32), autograd_step(reference, reference_optimizer)
    schedules = [lr_scheduler.StepLR(o, step_size=3, gamma=0.5) for o in (optimizer, reference_optimizer)]
    for i, (x, y) in enumerate(batches(12)):
        torch.manual_seed(i)  # dropout masks
        loss, logits = fast(x, y)
        torch.manual_seed(i)
        expected_loss, expected_logits = eager(x, y)
        torch.testing.assert_close(loss, expected_loss, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(logits, expected_logits, rtol=1e-5, atol=1e-6)
        for schedule in schedules:
            schedule.step()
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.1 * 0.5**4)
    assert_same_training_state(model, optimizer, reference, reference_optimizer)


def test_backprop_and_autograd_steps_continue_each_others_momentum_through_a_checkpoint() -> None:
    """Backprop steps, a checkpoint of the optimizer (loaded as checkpoint.py loads it), autograd
    steps, backprop steps again: the same as autograd all along. The momentum buffers live in the
    optimizer's state, whichever step wrote them."""
    model, optimizer, reference, reference_optimizer = sgd_pair(MODELS["bn-dropout-tanh"], SGD_SETTINGS["nesterov"])
    eager_all_along = autograd_step(reference, reference_optimizer)
    data = batches(12)
    for i, (x, y) in enumerate(data):
        torch.manual_seed(i)
        eager_all_along(x, y)
    fast = backprop_step(model, optimizer, 32)
    for i, (x, y) in enumerate(data[:4]):
        torch.manual_seed(i)
        fast(x, y)
    state = through_a_checkpoint(optimizer.state_dict())
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, **SGD_SETTINGS["nesterov"])
    optimizer.load_state_dict(state)
    steps = [autograd_step(model, optimizer)] * 4 + [backprop_step(model, optimizer, 32)] * 4
    for i, (step, (x, y)) in enumerate(zip(steps, data[4:], strict=True), start=4):
        torch.manual_seed(i)
        step(x, y)
    assert_same_training_state(model, optimizer, reference, reference_optimizer)


SCHEDULES: dict[str, Callable[[torch.optim.Optimizer], Any]] = {
    "step": lambda o: lr_scheduler.StepLR(o, step_size=2, gamma=0.5),
    "cosine": lambda o: lr_scheduler.CosineAnnealingLR(o, T_max=6, eta_min=0.001),
    "warmup-cosine": lambda o: lr_scheduler.SequentialLR(
        o,
        [lr_scheduler.LinearLR(o, start_factor=0.1, total_iters=2), lr_scheduler.CosineAnnealingLR(o, T_max=4)],
        milestones=[2],
    ),
    "onecycle": lambda o: lr_scheduler.OneCycleLR(o, max_lr=0.5, total_steps=10, cycle_momentum=False),
    "plateau": lambda o: lr_scheduler.ReduceLROnPlateau(o, factor=0.5, patience=0),
}


@pytest.mark.parametrize("make_schedule", SCHEDULES.values(), ids=SCHEDULES)
def test_a_tensor_learning_rate_is_changed_in_place_by_every_schedule(make_schedule: Callable) -> None:
    """What the CUDA graph relies on, checked on the CPU: after `lr_as_tensor` each schedule writes
    its rates into the same tensor (the one a graph captured), fused SGD follows them as SGD with a
    Python-number rate does, and the tensor rate survives a checkpoint loaded with weights_only."""
    model, optimizer, reference, reference_optimizer = sgd_pair([], SGD_SETTINGS["momentum"])
    schedule, reference_schedule = make_schedule(optimizer), make_schedule(reference_optimizer)
    lr_as_tensor(optimizer, torch.device("cpu"))
    lr = optimizer.param_groups[0]["lr"]
    assert torch.is_tensor(lr) and optimizer.param_groups[0]["fused"]
    steps = autograd_step(model, optimizer), autograd_step(reference, reference_optimizer)
    for i, (x, y) in enumerate(batches(8)):
        loss, expected_loss = (step(x, y)[0] for step in steps)
        torch.testing.assert_close(loss, expected_loss, rtol=1e-5, atol=1e-6)
        for s in (schedule, reference_schedule):
            s.step(1.0 + i % 2) if isinstance(s, lr_scheduler.ReduceLROnPlateau) else s.step()
    assert optimizer.param_groups[0]["lr"] is lr
    assert float(lr) != pytest.approx(0.1)  # the schedule did change the rate
    assert_same_training_state(model, optimizer, reference, reference_optimizer)
    restored = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    restored.load_state_dict(through_a_checkpoint(optimizer.state_dict()))
    assert float(restored.param_groups[0]["lr"]) == float(lr)


@needs_gpu
@pytest.mark.parametrize(
    "overrides",
    [[], ["norm=batchnorm", "optimizer=sgd_momentum"], ["activation=tanh", "optimizer=adam"], ["optimizer=adamw"]],
    ids=["relu-sgd", "bn-momentum", "tanh-adam", "adamw"],
)
def test_cuda_graph_step_computes_what_the_autograd_step_computes(overrides: list[str]) -> None:
    cfg = compose_config(["depth.widths=[64,32]", *overrides])
    device = torch.device("cuda")
    seed_everything(0)
    model = build_model(cfg, 784, 10).to(device)
    reference = copy.deepcopy(model)
    optimizer = build_optimizer(cfg.optimizer, model.parameters())
    assert step_kind(model, optimizer, fast=True, precision="fp32") == "cuda_graph"
    _, graphed = train_step(model, optimizer, 32, 784)
    eager = autograd_step(reference, build_optimizer(cfg.optimizer, reference.parameters()))
    for p, q in zip(model.state_dict().values(), reference.state_dict().values(), strict=True):
        assert torch.equal(p, q)  # the capture's warm-up steps were undone
    xs, ys = torch.rand(20, 32, 784, device=device), torch.randint(0, 10, (20, 32), device=device)
    for x, y in zip(xs, ys, strict=True):
        (loss, logits), (expected_loss, expected_logits) = graphed(x, y), eager(x, y)
        torch.testing.assert_close(loss, expected_loss, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(logits, expected_logits, rtol=1e-4, atol=1e-5)
    for p, q in zip(model.state_dict().values(), reference.state_dict().values(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-6)


@needs_gpu
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_gpu_training_learns_through_the_cuda_graph(tiny_cfg: Callable[..., DictConfig], precision: str) -> None:
    cfg = tiny_cfg("trainer.device=cuda", f"trainer.precision={precision}", "trainer.max_epochs=4", "depth.widths=[64]")
    seed_everything(0)
    data = load_splits(cfg.data, torch.device("cuda"))
    model = build_model(cfg, data.num_features, data.num_classes).cuda()
    optimizer = build_optimizer(cfg.optimizer, model.parameters())
    assert step_kind(model, optimizer, fast=True, precision=precision) == "cuda_graph"
    history = fit(model, optimizer, data, cfg.trainer, torch.Generator(device="cuda").manual_seed(0))
    assert history[-1].train_loss < history[0].train_loss / 2 and history[-1].val_acc > 0.9


@needs_gpu
@pytest.mark.parametrize(
    "overrides",
    [
        [],
        ["norm=batchnorm", "optimizer=sgd_momentum", "optimizer.nesterov=true", "optimizer.weight_decay=0.01"],
        ["optimizer=adam"],
        ["optimizer=adamw"],
    ],
    ids=["sgd", "bn-nesterov-decay", "adam", "adamw"],
)
def test_cuda_graph_step_follows_a_learning_rate_schedule(overrides: list[str]) -> None:
    """The graph reads its rate from a device tensor, which a schedule changes in place between
    replays: the same losses and weights as autograd under the same schedule, with no new capture;
    and the optimizer's checkpoint, tensor rate included, loads back as checkpoint.py loads it."""
    cfg = compose_config(["depth.widths=[64,32]", *overrides])
    seed_everything(0)
    model = build_model(cfg, 784, 10).cuda()
    reference = copy.deepcopy(model)
    optimizer = build_optimizer(cfg.optimizer, model.parameters())
    reference_optimizer = build_optimizer(cfg.optimizer, reference.parameters())
    schedules = [lr_scheduler.StepLR(o, step_size=4, gamma=0.3) for o in (optimizer, reference_optimizer)]
    _, graphed = train_step(model, optimizer, 32, 784)
    lr = optimizer.param_groups[0]["lr"]
    assert torch.is_tensor(lr) and lr.is_cuda
    eager = autograd_step(reference, reference_optimizer)
    for x, y in batches(16, "cuda"):
        (loss, _), (expected_loss, _) = graphed(x, y), eager(x, y)
        torch.testing.assert_close(loss, expected_loss, rtol=1e-5, atol=1e-6)
        for schedule in schedules:
            schedule.step()
    assert optimizer.param_groups[0]["lr"] is lr
    assert float(lr) == pytest.approx(cfg.optimizer.lr * 0.3**4, rel=1e-6)
    for p, q in zip(model.state_dict().values(), reference.state_dict().values(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-6)
    restored = build_optimizer(cfg.optimizer, model.parameters())
    restored.load_state_dict(through_a_checkpoint(optimizer.state_dict()))
    assert float(restored.param_groups[0]["lr"]) == float(lr)
