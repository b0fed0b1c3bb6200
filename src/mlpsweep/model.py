"""The model factory: every MLP of the ablation, built from the composed config.

A model is a stack of hidden blocks, Linear -> Norm -> Activation -> Dropout (the lecture's
order; Norm and Dropout only where configured), followed by a Linear head to the classes:

    Sequential(hidden1=Sequential(linear, norm, act, dropout), hidden2=..., head=Linear)
"""

from __future__ import annotations

from collections import OrderedDict

from omegaconf import DictConfig
from torch import nn

from mlpsweep.config import lookup_option

ACTIVATIONS: dict[str, type[nn.Module]] = {
    "sigmoid": nn.Sigmoid,
    "tanh": nn.Tanh,
    "relu": nn.ReLU,
    "leaky_relu": nn.LeakyReLU,
    "elu": nn.ELU,
    "gelu": nn.GELU,
    "silu": nn.SiLU,
}
NORMS: dict[str, type[nn.Module] | None] = {
    "none": None,
    "batchnorm": nn.BatchNorm1d,
    "layernorm": nn.LayerNorm,
}


def hidden_block(in_features: int, width: int, cfg: DictConfig) -> nn.Sequential:
    """Linear -> Norm -> Activation -> Dropout, leaving out a `none` norm and a zero dropout."""
    norm_cls, norm_kwargs = lookup_option(NORMS, "norm", cfg.norm)
    act_cls, act_kwargs = lookup_option(ACTIVATIONS, "activation", cfg.activation)
    layers: OrderedDict[str, nn.Module] = OrderedDict(linear=nn.Linear(in_features, width, bias=cfg.model.bias))
    if norm_cls is not None:
        layers["norm"] = norm_cls(width, **norm_kwargs)
    layers["act"] = act_cls(**act_kwargs)
    if cfg.dropout.p > 0:
        layers["dropout"] = nn.Dropout(cfg.dropout.p)
    return nn.Sequential(layers)


def build_model(cfg: DictConfig, in_features: int, num_classes: int) -> nn.Sequential:
    """The MLP described by `cfg` (groups activation, norm, dropout, depth and `model.bias`)."""
    layers: OrderedDict[str, nn.Module] = OrderedDict()
    width_in = in_features
    for i, width in enumerate(cfg.depth.widths, start=1):
        layers[f"hidden{i}"] = hidden_block(width_in, width, cfg)
        width_in = width
    layers["head"] = nn.Linear(width_in, num_classes, bias=cfg.model.bias)
    return nn.Sequential(layers)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
