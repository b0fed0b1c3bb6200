"""The model factory builds every option of every axis with the right shapes, order and bias."""

from __future__ import annotations

import pytest
import torch
from conftest import compose_config
from torch import nn

from mlpsweep.config import CONFIG_DIR
from mlpsweep.model import ACTIVATIONS, build_model, count_parameters

AXIS_OPTIONS = [
    (group, path.stem) for group in ("activation", "norm", "dropout", "depth") for path in sorted((CONFIG_DIR / group).glob("*.yaml"))
]
NORM_TYPES = {"none": None, "batchnorm": nn.BatchNorm1d, "layernorm": nn.LayerNorm}


@pytest.mark.parametrize(("group", "option"), AXIS_OPTIONS, ids=[f"{g}={o}" for g, o in AXIS_OPTIONS])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no_bias"])
def test_factory_builds_every_option(group: str, option: str, bias: bool) -> None:
    cfg = compose_config([f"{group}={option}", f"model.bias={bias}"])
    model = build_model(cfg, in_features=784, num_classes=10)
    widths = list(cfg.depth.widths)

    blocks = [name for name, _ in model.named_children()]
    assert blocks == [f"hidden{i}" for i in range(1, len(widths) + 1)] + ["head"]

    norm_type = NORM_TYPES[cfg.norm.name]
    expected_order = ["linear"] + (["norm"] if norm_type else []) + ["act"] + (["dropout"] if cfg.dropout.p > 0 else [])
    in_features = 784
    for i, width in enumerate(widths, start=1):
        block = getattr(model, f"hidden{i}")
        assert [name for name, _ in block.named_children()] == expected_order
        assert (block.linear.in_features, block.linear.out_features) == (in_features, width)
        assert (block.linear.bias is not None) == bias
        assert type(block.act) is ACTIVATIONS[cfg.activation.name]
        if norm_type:
            assert type(block.norm) is norm_type
        if cfg.dropout.p > 0:
            assert block.dropout.p == cfg.dropout.p
        in_features = width
    assert (model.head.in_features, model.head.out_features) == (in_features, 10)
    assert (model.head.bias is not None) == bias

    model.eval()
    assert model(torch.randn(4, 784)).shape == (4, 10)


def test_parameter_count_of_the_default_model() -> None:
    model = build_model(compose_config(), in_features=784, num_classes=10)
    assert count_parameters(model) == (784 * 1024 + 1024) + (1024 * 300 + 300) + (300 * 10 + 10)


def test_batchnorm_adds_scale_and_shift_per_unit() -> None:
    plain = build_model(compose_config(), 784, 10)
    with_bn = build_model(compose_config(["norm=batchnorm"]), 784, 10)
    assert count_parameters(with_bn) - count_parameters(plain) == 2 * (1024 + 300)


def test_activation_options_reach_the_module() -> None:
    leaky = build_model(compose_config(["activation=leaky_relu", "activation.negative_slope=0.2"]), 784, 10)
    assert leaky.hidden1.act.negative_slope == 0.2
    elu = build_model(compose_config(["activation=elu", "activation.alpha=0.5"]), 784, 10)
    assert elu.hidden2.act.alpha == 0.5
