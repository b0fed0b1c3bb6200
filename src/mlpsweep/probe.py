"""Look inside the network: the distributions inside every hidden block on a fixed probe set.

For each hidden block the probe captures, with forward hooks registered only while it runs
(the model's forward is untouched and training pays nothing), the Linear output, the
normalised output where there is a norm, and the activation output. From them it computes
per-layer statistics and a health figure that fits the activation:

- sigmoid / tanh: the saturated fraction, outputs within `margin` of the activation's bounds;
- ReLU-like: the dead fraction, units whose activation input is <= 0 on every probe image;

and the fraction of non-finite (inf/NaN) values, which a diverging network produces long before
its loss turns NaN. Statistics and histograms cover the finite values only.

Given the probe images' labels, it also measures the gradients inside the network, outside the
training step (which stays as fast as it is): the norm of each hidden block's weight gradient
(`grad_norm`) and of the gradient reaching the block's input (`input_grad_norm`), of the mean
cross-entropy over the probe set as the training step sees it: norms normalise with the batch's
statistics (their running statistics are put back afterwards), dropout is off (no mask is drawn,
so the training's random stream is untouched). Vanishing gradients show as these norms falling
from the head towards the input.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

SATURATING_BOUNDS = {"sigmoid": (0.0, 1.0), "tanh": (-1.0, 1.0)}
RELU_LIKE = {"relu", "leaky_relu", "elu", "gelu", "silu"}
STAGES = ("linear", "norm", "act")


@dataclass
class LayerSnapshot:
    """What one hidden block produced on the probe set, as per-layer numbers and histograms."""

    stats: dict[str, float]  # e.g. linear_mean, act_std, saturated_frac
    histograms: dict[str, tuple[list[float], list[int]]]  # stage -> (bin edges, counts)
    sample_pre: list[float]  # activation input of the first probe image
    sample_post: list[float]  # activation output of the first probe image


@dataclass
class Snapshot:
    epoch: int
    layers: dict[str, LayerSnapshot] = field(default_factory=dict)

    def metrics(self) -> dict[str, float]:
        """Flat MLflow metrics, e.g. probe/hidden1/act_std."""
        return {f"probe/{layer}/{key}": value for layer, snap in self.layers.items() for key, value in snap.stats.items()}


def health_metric(activation: str) -> str | None:
    """The name of the health figure logged for `activation` (None when none fits)."""
    if activation in SATURATING_BOUNDS:
        return "saturated_frac"
    return "dead_frac" if activation in RELU_LIKE else None


def _histogram(values: torch.Tensor, bins: int) -> tuple[list[float], list[int]]:
    """Bin edges and counts of the finite values (a network that blew up has inf/NaN inside).
    Binned on the CPU: CUDA's histc has no deterministic implementation (trainer.deterministic)."""
    values = values.flatten().float().cpu()
    values = values[torch.isfinite(values)]
    if values.numel() == 0:
        return torch.linspace(0, 1, bins + 1).tolist(), [0] * bins
    low, high = values.min().item(), values.max().item()
    if high <= low:
        high = low + 1e-6
    counts = torch.histc(values, bins=bins, min=low, max=high)
    edges = torch.linspace(low, high, bins + 1)
    return edges.tolist(), [int(c) for c in counts.tolist()]


class ActivationProbe:
    """Captures the hidden blocks of a model built by `mlpsweep.model.build_model`."""

    def __init__(
        self,
        model: nn.Sequential,
        x: torch.Tensor,
        activation: str,
        margin: float = 0.03,
        bins: int = 60,
        y: torch.Tensor | None = None,
    ):
        self.model = model
        self.x = x
        self.y = y
        self.activation = activation
        self.margin = margin
        self.bins = bins
        self.blocks = {name: block for name, block in model.named_children() if name.startswith("hidden")}

    @torch.inference_mode()
    def _capture(self) -> dict[str, dict[str, torch.Tensor]]:
        outputs: dict[str, dict[str, torch.Tensor]] = {name: {} for name in self.blocks}
        handles = []
        for name, block in self.blocks.items():
            for stage in STAGES:
                if hasattr(block, stage):
                    store = outputs[name]
                    hook = lambda module, inputs, output, store=store, stage=stage: store.__setitem__(stage, output)  # noqa: E731
                    handles.append(getattr(block, stage).register_forward_hook(hook))
        was_training = self.model.training
        self.model.eval()
        try:
            self.model(self.x)
        finally:
            for handle in handles:
                handle.remove()
            self.model.train(was_training)
        return outputs

    def gradient_norms(self) -> dict[str, dict[str, float]]:
        """Per hidden block: the norms of the loss's gradient with respect to its Linear weight
        (`grad_norm`) and to its input (`input_grad_norm`), on the labelled probe set, the norms in
        training mode and dropout off. The parameters' .grad and the model's buffers are left as
        they were (the optimizer never sees these gradients)."""
        inputs: dict[str, torch.Tensor] = {}
        handles = [
            block.register_forward_pre_hook(lambda module, args, name=name: inputs.__setitem__(name, args[0]))
            for name, block in self.blocks.items()
        ]
        was_training = self.model.training
        buffers = [(buffer, buffer.clone()) for buffer in self.model.buffers()]
        self.model.train()
        for module in self.model.modules():
            if isinstance(module, nn.Dropout):
                module.eval()
        try:
            with torch.enable_grad():
                x = self.x.detach().float().requires_grad_(True)
                loss = F.cross_entropy(self.model(x), self.y)
                weights = [block.linear.weight for block in self.blocks.values()]
                grads = torch.autograd.grad(loss, [*weights, *(inputs[name] for name in self.blocks)])
        finally:
            for handle in handles:
                handle.remove()
            self.model.train(was_training)
            with torch.no_grad():
                for buffer, saved in buffers:
                    buffer.copy_(saved)
        count = len(self.blocks)
        return {
            name: {"grad_norm": grads[i].norm().item(), "input_grad_norm": grads[count + i].norm().item()}
            for i, name in enumerate(self.blocks)
        }

    def snapshot(self, epoch: int, with_histograms: bool) -> Snapshot:
        """Statistics of every hidden block (and histograms when asked) at `epoch`."""
        snapshot = Snapshot(epoch)
        gradients = self.gradient_norms() if self.y is not None else {}
        for name, stages in self._capture().items():
            pre = stages.get("norm", stages["linear"])  # what enters the activation
            post = stages["act"]
            stats = {}
            nonfinite = 0
            for stage, values in stages.items():
                finite = values[torch.isfinite(values)]
                nonfinite += values.numel() - finite.numel()
                if finite.numel() > 1:  # never log NaN or inf as a metric
                    std, mean = torch.std_mean(finite)
                    stats[f"{stage}_mean"], stats[f"{stage}_std"] = mean.item(), std.item()
            stats["nonfinite_frac"] = nonfinite / sum(v.numel() for v in stages.values())
            if self.activation in SATURATING_BOUNDS:
                low, high = SATURATING_BOUNDS[self.activation]
                saturated = (post < low + self.margin) | (post > high - self.margin)
                stats["saturated_frac"] = saturated.float().mean().item()
            elif self.activation in RELU_LIKE:
                stats["dead_frac"] = (pre <= 0).all(dim=0).float().mean().item()
            stats.update({key: value for key, value in gradients.get(name, {}).items() if math.isfinite(value)})
            histograms = {stage: _histogram(values, self.bins) for stage, values in stages.items()} if with_histograms else {}
            snapshot.layers[name] = LayerSnapshot(
                stats=stats,
                histograms=histograms,
                sample_pre=pre[0].tolist() if with_histograms else [],
                sample_post=post[0].tolist() if with_histograms else [],
            )
        return snapshot
