"""Each run gets the fastest training step that computes what autograd computes, and only such a step.

The CPU step's equivalence with a textbook loop is in test_engine.py; the CUDA graph's is here and
runs where a GPU is (it skips on CPU-only machines such as CI).
"""

from __future__ import annotations

import copy
from collections.abc import Callable

import pytest
import torch
from conftest import compose_config
from omegaconf import DictConfig

from mlpsweep.data import load_splits
from mlpsweep.engine import build_optimizer, fit, seed_everything
from mlpsweep.model import build_model
from mlpsweep.steps import autograd_step, step_kind, train_step

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
        (["optimizer=sgd_momentum"], "autograd"),
        (["optimizer.weight_decay=0.01"], "autograd"),
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


def test_a_model_of_another_layout_trains_by_autograd() -> None:
    model = torch.nn.Sequential(torch.nn.Linear(784, 16), torch.nn.ReLU(), torch.nn.Linear(16, 10))
    assert step_kind(model, torch.optim.SGD(model.parameters(), lr=0.1), fast=True, precision="fp32") == "autograd"


def test_a_hooked_model_trains_by_autograd_so_its_hooks_see_every_step() -> None:
    model = build_model(compose_config(["depth.widths=[16]"]), 784, 10)
    optimizer = build_optimizer(compose_config().optimizer, model.parameters())
    model.hidden1.act.register_forward_hook(lambda *_: None)
    assert step_kind(model, optimizer, fast=True, precision="fp32") == "autograd"


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
