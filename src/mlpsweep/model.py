"""The model factory: every MLP of the ablation, built from the composed config.

A model is a stack of hidden blocks, Linear -> Norm -> Activation -> Dropout (the lecture's
order; Norm and Dropout only where configured), followed by a Linear head to the classes:

    Sequential(hidden1=Sequential(linear, norm, act, dropout), hidden2=..., head=Linear)

Its Linear weights start as the `init` group says: PyTorch's default, or a named scheme scaled by
the gain of the block's activation (the head: the linear gain, 1).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable

from omegaconf import DictConfig
from torch import Tensor, nn

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

# weight initialisation schemes: (weight, nonlinearity, negative slope) -> None; `default` keeps PyTorch's
INITS: dict[str, Callable[[Tensor, str, float], object] | None] = {
    "default": None,
    "xavier_uniform": lambda w, nl, a: nn.init.xavier_uniform_(w, gain=nn.init.calculate_gain(nl, a)),
    "xavier_normal": lambda w, nl, a: nn.init.xavier_normal_(w, gain=nn.init.calculate_gain(nl, a)),
    "kaiming_uniform": lambda w, nl, a: nn.init.kaiming_uniform_(w, a=a, nonlinearity=nl),
    "kaiming_normal": lambda w, nl, a: nn.init.kaiming_normal_(w, a=a, nonlinearity=nl),
    "orthogonal": lambda w, nl, a: nn.init.orthogonal_(w, gain=nn.init.calculate_gain(nl, a)),
}
# the gain each activation's weights are scaled for (torch.nn.init.calculate_gain's names); the
# smooth ReLU-likes take ReLU's, as is common practice
GAIN_NONLINEARITY = {
    "sigmoid": "sigmoid",
    "tanh": "tanh",
    "relu": "relu",
    "leaky_relu": "leaky_relu",
    "elu": "relu",
    "gelu": "relu",
    "silu": "relu",
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
    model = nn.Sequential(layers)
    initialize(model, cfg)
    return model


def initialize(model: nn.Sequential, cfg: DictConfig) -> None:
    """Initialise the Linear layers as `cfg.init` says: the weights by `init.name` (scaled by the
    gain of the hidden blocks' activation; the head by the linear gain), the biases by `init.bias`."""
    scheme = lookup_option(INITS, "init", cfg.init)[0]
    slope = float(cfg.activation.get("negative_slope", 0.01)) if cfg.activation.name == "leaky_relu" else 0.0
    for name, module in model.named_modules():
        if not isinstance(module, nn.Linear):
            continue
        if scheme is not None:
            nonlinearity = "linear" if name == "head" else GAIN_NONLINEARITY[cfg.activation.name]
            scheme(module.weight, nonlinearity, slope if nonlinearity == "leaky_relu" else 0.0)
        if module.bias is not None and cfg.init.bias == "zeros":
            nn.init.zeros_(module.bias)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def summary(model: nn.Sequential) -> str:
    """One line on `model`: its layer widths, what a hidden block holds, its parameter count, e.g.
    `MLP 784-1024-300-10, hidden blocks Linear-BatchNorm1d-ReLU, 1,116,998 parameters`."""
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    widths = "-".join(str(w) for w in [linears[0].in_features, *(m.out_features for m in linears)])
    blocks = [m for name, m in model.named_children() if name != "head"]
    block = "-".join(type(layer).__name__ for layer in blocks[0]) if blocks else "none"
    return f"MLP {widths}, hidden blocks {block}, {count_parameters(model):,} parameters"
