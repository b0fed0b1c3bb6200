"""Packed training: several runs of a sweep trained together as one stacked network.

Members of a pack share every tensor shape and the step's path (widths, batch size, epochs, data,
device, precision, optimizer kind; `pack_key`), and differ in anything else: seed, learning rate,
momentum, weight decay, dropout rate, activation and norm, initialisation, schedule, early
stopping. Each member starts as its solo run would: its own model, optimizer, schedule and batch
generator built by the same code from its own seed (`cli.fresh_state`), so it starts from the
same weights and draws the same batch order.

The stacked network holds every member's weights in one tensor per layer ([members, out, in]) and
runs each layer as one batched matrix product; members of one activation and norm sit in a
contiguous slice of the pack. Batch norm keeps its statistics per member, dropout draws a mask per
member at its own rate, and the loss is the sum of the members' mean cross-entropies, so each
member's gradient is its own. `PackedOptimizer` applies torch.optim's SGD, Adam or AdamW update
with every hyper-parameter a per-member tensor, read from the member's own optimizer, which its
schedule steps as in a solo run. On a GPU the whole step (gather of the batches, forward, backward,
update) is one CUDA graph; on a CPU, for the activations and norms the solo `backprop` step handles,
the gradients are written out (`StackedMLP.backprop_step`), and plain SGD updates each stacked
weight inside the batched product that computes its gradient; else autograd computes them.

A member that diverges fails alone and one that early stopping stops is done: both are frozen
(learning rate 0, loss left out), and the rest go on. What each member did (its epochs, its probe
snapshots, its trained weights, its error) is a `MemberResult`, which the packed launcher hands to
the member's own Hydra job to log as an ordinary child run.
"""

from __future__ import annotations

import contextlib
import inspect
import logging
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F
from omegaconf import DictConfig, OmegaConf
from torch import Tensor, nn

from mlpsweep import interrupt
from mlpsweep.data import DataSplits, Split
from mlpsweep.early_stopping import BestWeights, EarlyStopping
from mlpsweep.engine import (
    DIVERGENCE_CHECK_EVERY,
    OPTIMIZERS,
    DivergenceError,
    EpochMetrics,
    Evaluation,
    loss_divergence,
)
from mlpsweep.probe import ActivationProbe, Snapshot
from mlpsweep.rendering import Figures
from mlpsweep.schedulers import Schedule, current_lr
from mlpsweep.steps import GRAPH_WARMUP_STEPS, Activation, activation_in_place, autocast

log = logging.getLogger(__name__)

# the optimizers whose update PackedOptimizer applies
PACKED_OPTIMIZERS = ("sgd", "adam", "adamw")
# the optimizer settings PackedOptimizer reads from each member's parameter group; any other set
# to what its torch.optim class does not do by default has no packed update
PACKED_SETTINGS = ("lr", "momentum", "dampening", "nesterov", "weight_decay", "betas", "eps", "decoupled_weight_decay",
                   "foreach", "fused", "capturable", "differentiable")  # the last four: how torch computes, not what


def pack_key(cfg: DictConfig) -> str:
    """What members of one pack must share: the tensors' shapes and the step's path (and their
    device, which packing.plan_packs adds as it resolves it)."""
    shared = {
        "widths": list(cfg.depth.widths),
        "bias": cfg.model.bias,
        "batch_size": cfg.trainer.batch_size,
        "eval_batch_size": cfg.trainer.eval_batch_size,
        "max_epochs": cfg.trainer.max_epochs,
        "data": OmegaConf.to_container(cfg.data, resolve=True),
        "precision": cfg.trainer.precision,
        "deterministic": cfg.trainer.deterministic,
        "optimizer": cfg.optimizer.name,
        "probe": OmegaConf.to_container(cfg.probe, resolve=True),
    }
    return repr(shared)


def unpackable(cfg: DictConfig) -> str | None:
    """Why the packed step cannot train `cfg` (None: it can); such a job runs alone."""
    if not cfg.trainer.fast_step:
        return "trainer.fast_step=false asks for the eager autograd step"
    if cfg.optimizer.name not in PACKED_OPTIMIZERS:
        return f"optimizer {cfg.optimizer.name} has no packed update"
    defaults = inspect.signature(OPTIMIZERS[cfg.optimizer.name].__init__).parameters
    for key, value in cfg.optimizer.items():
        if key not in ("name", *PACKED_SETTINGS) and key in defaults and value != defaults[key].default:
            return f"optimizer.{key}={value} has no packed update"
    norm = cfg.norm
    if norm.name == "batchnorm" and (
        norm.get("momentum", 0.1) is None or not norm.get("affine", True) or not norm.get("track_running_stats", True)
    ):
        return "batch norm without momentum, affine weights or running statistics has no packed form"
    if norm.name == "layernorm" and (not norm.get("elementwise_affine", True) or not norm.get("bias", True)):
        return "layer norm without its weight or bias has no packed form"
    return None


# --- the stacked network ------------------------------------------------------------------------


@dataclass
class Segment:
    """Members [start, stop) of a pack: one activation and one norm (the first member's modules)."""

    start: int
    stop: int
    activation: nn.Module
    norm: nn.Module | None
    in_place: Activation | None = field(init=False)  # the activation as the hand-derived step applies it

    def __post_init__(self) -> None:
        self.in_place = activation_in_place(self.activation)


class StackedMLP:
    """The members' MLPs as one network: per layer a weight [P, out, in], a bias [P, out] and, where
    any member normalises, norm weights [P, out] (batch norm: running statistics [P, out] too)."""

    def __init__(self, models: Sequence[nn.Sequential], dropout: Sequence[float], device: torch.device) -> None:
        self.size = len(models)
        blocks = [[m for name, m in model.named_children() if name != "head"] for model in models]
        self.segments = segments_of(blocks)
        self.batch_norm_runs = batch_norm_runs(self.segments)
        self.weights, self.biases, self.gammas, self.betas = [], [], [], []
        self.running_means, self.running_vars, self.batches_tracked = [], [], []
        for layer in range(len(blocks[0]) + 1):
            linears = [_linear(model, layer) for model in models]
            self.weights.append(_stack([m.weight for m in linears], device))
            self.biases.append(_stack([m.bias for m in linears], device) if linears[0].bias is not None else None)
            if layer == len(blocks[0]):
                break
            width = linears[0].out_features
            norms = [getattr(block[layer], "norm", None) for block in blocks]
            self.gammas.append(_stack([_or(n, "weight", torch.ones(width)) for n in norms], device))
            self.betas.append(_stack([_or(n, "bias", torch.zeros(width)) for n in norms], device))
            self.running_means.append(
                _stack([_or(n, "running_mean", torch.zeros(width)) for n in norms], device, False)
            )
            self.running_vars.append(_stack([_or(n, "running_var", torch.ones(width)) for n in norms], device, False))
            tracked = [_or(n, "num_batches_tracked", torch.zeros((), dtype=torch.long)) for n in norms]
            self.batches_tracked.append(torch.stack([t.detach().to(device) for t in tracked]))
        self.keep = torch.tensor([1.0 - p for p in dropout], device=device).view(-1, 1, 1)
        self.dropout = any(p > 0 for p in dropout)

    @property
    def params(self) -> list[Tensor]:
        """The trained tensors, in a fixed order (the optimizer's state follows it); norm weights
        where any member normalises."""
        normalised = any(segment.norm is not None for segment in self.segments)
        gammas, betas = (self.gammas, self.betas) if normalised else ([None] * len(self.gammas),) * 2
        layers = zip(self.weights, self.biases, [*gammas, None], [*betas, None], strict=True)
        return [t for layer in layers for t in layer if t is not None]

    @property
    def buffers(self) -> list[Tensor]:
        return [*self.running_means, *self.running_vars, *self.batches_tracked]

    def forward(self, x: Tensor, train: bool) -> Tensor:
        """Logits [P, B, classes] of x ([P, B, in], each member its own batch; or [B, in], shared)."""
        a = x
        for layer in range(len(self.gammas)):
            z = _linear_stacked(a, self.weights[layer], self.biases[layer])
            parts = [self._block(z[s.start : s.stop], s, layer, train) for s in self.segments]
            a = torch.cat(parts) if len(parts) > 1 else parts[0]
            if train and self.dropout:  # each member's mask at its own rate (rate 0: all ones)
                a = a * (torch.rand_like(a) < self.keep).to(a.dtype) / self.keep
        return _linear_stacked(a, self.weights[-1], self.biases[-1])

    def _block(self, z: Tensor, segment: Segment, layer: int, train: bool) -> Tensor:
        """Norm and activation of one segment's slice of a hidden layer's pre-activations."""
        norm, rows = segment.norm, slice(segment.start, segment.stop)
        if norm is not None:
            z = z.float()  # norms compute in fp32 under bf16 autocast, as the modules do
        if isinstance(norm, nn.BatchNorm1d) and train:
            z, _ = self._batch_norm_train(z, segment, layer)
        elif isinstance(norm, nn.BatchNorm1d):
            mean, var = self.running_means[layer][rows].unsqueeze(1), self.running_vars[layer][rows].unsqueeze(1)
            z = (z - mean) * torch.rsqrt(var + norm.eps)
            z = z * self.gammas[layer][rows].unsqueeze(1) + self.betas[layer][rows].unsqueeze(1)
        elif isinstance(norm, nn.LayerNorm):
            z = F.layer_norm(z, z.shape[-1:], eps=norm.eps)
            z = z * self.gammas[layer][rows].unsqueeze(1) + self.betas[layer][rows].unsqueeze(1)
        return segment.activation(z)

    def backprop_supported(self) -> bool:
        """Whether `backprop_step` handles every member: ReLU, LeakyReLU, sigmoid or tanh, and no
        norm or batch norm (as the solo `backprop` step)."""
        return all(
            s.in_place is not None and (s.norm is None or isinstance(s.norm, nn.BatchNorm1d)) for s in self.segments
        )

    @torch.no_grad()
    def backprop_step(
        self, x: Tensor, y: Tensor, scale: Tensor, lr: Tensor | None
    ) -> tuple[Tensor, Tensor, list[Tensor]]:
        """Forward, per-member mean cross-entropy and its gradients written out, as the solo `backprop`
        step computes them (steps.py), for the batches x [P, B, in], y [P, B]; each member's gradient
        multiplied by `scale` [P] (0 leaves a frozen member out). With `lr` [P] (plain SGD) each weight
        is updated inside the batched product that computes its gradient and no gradient is returned;
        else the gradients, in the order of `params`. Returns the losses [P], logits and gradients."""
        batch = y.shape[1]
        inputs, outputs, saved, masks = [], [], [], []
        a = x
        for layer in range(len(self.gammas)):
            inputs.append(a)
            a = _linear_stacked(a, self.weights[layer], self.biases[layer])
            for run in self.batch_norm_runs:  # each run of alike batch norms in one pass, then the activations
                a[run.start : run.stop], normalised = self._batch_norm_train(a[run.start : run.stop], run, layer)
                saved.append(normalised)
            for segment in self.segments:
                segment.in_place.forward(a[segment.start : segment.stop])
            outputs.append(a)
            if self.dropout:
                masks.append((torch.rand_like(a) < self.keep).to(a.dtype) / self.keep)
                a = a * masks[-1]
        inputs.append(a)
        logits = _linear_stacked(a, self.weights[-1], self.biases[-1])
        log_probs = torch.log_softmax(logits, dim=2)
        losses = -log_probs.gather(2, y.unsqueeze(2)).squeeze(2).mean(dim=1)
        grad = log_probs.exp_().scatter_add_(2, y.unsqueeze(2), torch.full_like(y, -1, dtype=logits.dtype).unsqueeze(2))
        grad.mul_((scale / batch).view(-1, 1, 1))  # dL/dlogits
        lr3 = lr.view(-1, 1, 1).to(grad.dtype) if lr is not None else None
        grads: dict[int, Tensor] = {}
        for layer in reversed(range(len(self.weights))):
            weight, bias = self.weights[layer], self.biases[layer]
            grad_input = torch.bmm(grad, weight) if layer > 0 else None  # before the weight changes
            if lr3 is not None:
                scaled = grad * lr3
                weight.baddbmm_(scaled.transpose(1, 2), inputs[layer], alpha=-1)
                if bias is not None:
                    bias.sub_(scaled.sum(dim=1))
            else:
                grads[id(weight)] = torch.bmm(grad.transpose(1, 2), inputs[layer])
                if bias is not None:
                    grads[id(bias)] = grad.sum(dim=1)
            if layer == 0:
                break
            hidden = layer - 1
            grad = grad_input * masks[hidden] if self.dropout else grad_input
            self._block_backward(grad, outputs[hidden], saved, hidden, lr, grads)
        return losses, logits, [grads[id(t)] for t in self.params] if lr is None else []

    def _batch_norm_train(
        self, z: Tensor, segment: Segment | NormRun, layer: int
    ) -> tuple[Tensor, tuple[Tensor, Tensor]]:
        """Training-mode batch norm of a segment's slice (differentiable), its running statistics
        updated as the module updates them: its output, and (normalised input, 1/std) for the
        hand-derived backward pass."""
        norm, rows = segment.norm, slice(segment.start, segment.stop)
        mean = z.mean(dim=1, keepdim=True)
        centered = z - mean
        var = centered.square().mean(dim=1, keepdim=True)  # two passes: torch.var_mean is ~8x slower on such CPU slices
        with torch.no_grad():  # the running variance is unbiased, as the module's
            n = z.shape[1]
            self.running_means[layer][rows].mul_(1 - norm.momentum).add_(mean.squeeze(1), alpha=norm.momentum)
            self.running_vars[layer][rows].mul_(1 - norm.momentum).add_(
                var.squeeze(1) * (n / (n - 1)), alpha=norm.momentum
            )
            self.batches_tracked[layer][rows].add_(1)
        invstd = torch.rsqrt(var + norm.eps)
        normalised = centered * invstd
        out = normalised * self.gammas[layer][rows].unsqueeze(1) + self.betas[layer][rows].unsqueeze(1)
        return out, (normalised, invstd)

    def _block_backward(
        self, grad: Tensor, output: Tensor, saved: list, layer: int, lr: Tensor | None, grads: dict[int, Tensor]
    ) -> None:
        """In place: dL/d(activation output) of hidden layer `layer` -> dL/d(its linear output): per
        segment its activation's derivative, then per run of alike batch norms theirs (their
        weights updated, or their gradients kept)."""
        gamma, beta = self.gammas[layer], self.betas[layer]
        if lr is None and self.batch_norm_runs:
            grads[id(gamma)], grads[id(beta)] = torch.zeros_like(gamma), torch.zeros_like(beta)
        for segment in self.segments:
            rows = slice(segment.start, segment.stop)
            segment.in_place.scale_grad(grad[rows], output[rows])
        for run in reversed(self.batch_norm_runs):
            rows = slice(run.start, run.stop)
            part = grad[rows]
            normalised, invstd = saved.pop()
            grad_gamma, grad_beta = (part * normalised).sum(dim=1), part.sum(dim=1)
            scaled = part * gamma[rows].unsqueeze(1)
            n = part.shape[1]
            dz = (
                invstd
                / n
                * (
                    n * scaled
                    - scaled.sum(dim=1, keepdim=True)
                    - normalised * (scaled * normalised).sum(dim=1, keepdim=True)
                )
            )
            grad[rows].copy_(dz)
            if lr is not None:
                gamma[rows].sub_(grad_gamma * lr[rows].unsqueeze(1).to(gamma.dtype))
                beta[rows].sub_(grad_beta * lr[rows].unsqueeze(1).to(beta.dtype))
            else:
                grads[id(gamma)][rows], grads[id(beta)][rows] = grad_gamma, grad_beta

    @torch.no_grad()
    def copy_to(self, member: int, model: nn.Sequential) -> None:
        """Write member `member`'s weights and statistics into its own model (built by the factory)."""
        blocks = [m for name, m in model.named_children() if name != "head"]
        for layer in range(len(self.weights)):
            linear = _linear(model, layer)
            linear.weight.copy_(self.weights[layer][member])
            if linear.bias is not None:
                linear.bias.copy_(self.biases[layer][member])
            norm = getattr(blocks[layer], "norm", None) if layer < len(blocks) else None
            if norm is not None and norm.weight is not None:
                norm.weight.copy_(self.gammas[layer][member])
                norm.bias.copy_(self.betas[layer][member])
            if isinstance(norm, nn.BatchNorm1d):
                norm.running_mean.copy_(self.running_means[layer][member])
                norm.running_var.copy_(self.running_vars[layer][member])
                norm.num_batches_tracked.copy_(self.batches_tracked[layer][member])


@dataclass
class NormRun:
    """Members [start, stop) of a pack, of consecutive segments with alike batch norms (the same
    eps and momentum): normalised in one pass by the hand-derived step."""

    start: int
    stop: int
    norm: nn.BatchNorm1d


def batch_norm_runs(segments: Sequence[Segment]) -> list[NormRun]:
    """The runs of consecutive segments whose batch norms are alike (packing orders members by norm first)."""
    runs: list[NormRun] = []
    for segment in segments:
        if not isinstance(segment.norm, nn.BatchNorm1d):
            continue
        if runs and runs[-1].stop == segment.start and repr(runs[-1].norm) == repr(segment.norm):
            runs[-1].stop = segment.stop
        else:
            runs.append(NormRun(segment.start, segment.stop, segment.norm))
    return runs


def segments_of(blocks: Sequence[Sequence[nn.Module]]) -> list[Segment]:
    """The runs of consecutive members whose hidden blocks have the same activation and norm."""

    def kind(member_blocks: Sequence[nn.Module]) -> str:
        first = member_blocks[0] if member_blocks else None
        return repr(getattr(first, "act", None)) + repr(getattr(first, "norm", None))

    segments: list[Segment] = []
    for i, member_blocks in enumerate(blocks):
        if segments and kind(blocks[segments[-1].start]) == kind(member_blocks):
            segments[-1].stop = i + 1
            continue
        first = member_blocks[0] if member_blocks else None
        segments.append(Segment(i, i + 1, getattr(first, "act", nn.Identity()), getattr(first, "norm", None)))
    return segments


def _linear(model: nn.Sequential, layer: int) -> nn.Linear:
    children = list(model.children())
    return children[layer] if layer == len(children) - 1 else children[layer].linear


def _or(module: nn.Module | None, name: str, default: Tensor) -> Tensor:
    value = getattr(module, name, None) if module is not None else None
    return value if value is not None else default


def _stack(tensors: Sequence[Tensor], device: torch.device, trained: bool = True) -> Tensor:
    stacked = torch.stack([t.detach().float().to(device) for t in tensors])
    return stacked.requires_grad_(trained)


def _linear_stacked(a: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    """a W^T + b per member: a is [P, B, in] or [B, in] (shared), weight [P, out, in], bias [P, out]."""
    if a.dim() == 2:
        out = torch.matmul(a, weight.transpose(1, 2))
        return out + bias.unsqueeze(1) if bias is not None else out
    if bias is None:
        return torch.bmm(a, weight.transpose(1, 2))
    return torch.baddbmm(bias.unsqueeze(1), a, weight.transpose(1, 2))


# --- the per-member optimizer -------------------------------------------------------------------


class PackedOptimizer:
    """torch.optim's SGD (momentum, dampening, Nesterov, weight decay), Adam or AdamW (L2 or
    decoupled weight decay, each member its own) over stacked tensors, every hyper-parameter a [P]
    tensor on the device, so that a CUDA graph reads the current values and each member keeps its own."""

    HYPERS = ("lr", "momentum", "dampening", "nesterov", "weight_decay", "beta1", "beta2", "eps", "decoupled")

    def __init__(self, kind: str, params: Sequence[Tensor], size: int, device: torch.device) -> None:
        self.kind = kind
        self.params = list(params)
        # float64, as torch.optim computes with Python floats (Adam's bias corrections lose digits in float32)
        self.hypers = {name: torch.zeros(size, dtype=torch.float64, device=device) for name in self.HYPERS}
        self.started = torch.zeros(size, device=device)  # SGD: whether the momentum buffers hold a step
        self.steps = torch.zeros((), dtype=torch.float64, device=device)  # Adam: steps taken
        self.state = [torch.zeros_like(p) for p in self.params]  # SGD momentum, Adam first moment
        # whether any member uses momentum or weight decay: fixed by the first `load` (a CUDA graph
        # captures one path, and deciding on the device would wait for it)
        self.momentum: bool | None = None
        self.weight_decay: bool | None = None
        self.second = [torch.zeros_like(p) for p in self.params] if kind != "sgd" else []

    @property
    def tensors(self) -> list[Tensor]:
        return [*self.hypers.values(), self.started, self.steps, *self.state, *self.second]

    def load_lr(self, groups: Sequence[dict], frozen: Sequence[bool]) -> None:
        """Only the learning rates (what a per-step schedule changes): one copy to the device."""
        rates = [0.0 if still else float(group["lr"]) for group, still in zip(groups, frozen, strict=True)]
        self.hypers["lr"].copy_(torch.tensor(rates, dtype=torch.float64), non_blocking=True)

    def load(self, groups: Sequence[dict], frozen: Sequence[bool]) -> None:
        """Each member's hyper-parameters from its own optimizer's parameter group (learning rate 0 where frozen)."""
        values = {name: [] for name in self.HYPERS}
        for group, still in zip(groups, frozen, strict=True):
            betas = group.get("betas", (0.0, 0.0))
            values["lr"].append(0.0 if still else float(group["lr"]))
            values["momentum"].append(float(group.get("momentum", 0.0)))
            values["dampening"].append(float(group.get("dampening", 0.0)))
            values["nesterov"].append(float(bool(group.get("nesterov", False))))
            values["weight_decay"].append(float(group.get("weight_decay", 0.0)))
            values["beta1"].append(float(betas[0]))
            values["beta2"].append(float(betas[1]))
            values["eps"].append(float(group.get("eps", 0.0)))
            # AdamW's is true (a group of a torch before 2.8's AdamW, not yet Adam's subclass, lacks the key)
            values["decoupled"].append(float(bool(group.get("decoupled_weight_decay", self.kind == "adamw"))))
        for name, tensor in self.hypers.items():
            tensor.copy_(torch.tensor(values[name], dtype=torch.float64), non_blocking=True)
        if self.momentum is None:
            self.momentum = any(values["momentum"])
            self.weight_decay = any(values["weight_decay"])

    @staticmethod
    def _shaped(values: Tensor, like: Tensor) -> Tensor:
        """Per-member `values` [P] as `like`'s dtype, shaped to broadcast over the stacked tensor `like`."""
        return values.to(like.dtype).view(-1, *([1] * (like.dim() - 1)))

    def _hyper(self, name: str, like: Tensor) -> Tensor:
        return self._shaped(self.hypers[name], like)

    @torch.no_grad()
    def step(self, grads: Sequence[Tensor]) -> None:
        if self.kind == "sgd":
            self._sgd(grads)
        else:
            self._adam(grads)

    def _sgd(self, grads: Sequence[Tensor]) -> None:
        for param, grad, buffer in zip(self.params, grads, self.state, strict=True):
            lr = self._hyper("lr", param)
            if self.weight_decay:
                grad = grad + self._hyper("weight_decay", param) * param
            if self.momentum:
                beta = self._hyper("momentum", param)
                started = self.started.view_as(lr) > 0
                buffer.copy_(torch.where(started, beta * buffer + (1 - self._hyper("dampening", param)) * grad, grad))
                direction = torch.where(self._hyper("nesterov", param) > 0, grad + beta * buffer, buffer)
                grad = torch.where(beta != 0, direction, grad)
            param.addcmul_(lr, grad, value=-1)
        self.started.fill_(1.0)

    def _adam(self, grads: Sequence[Tensor]) -> None:
        self.steps.add_(1)
        lr, weight_decay = self.hypers["lr"], self.hypers["weight_decay"]
        beta1, beta2 = self.hypers["beta1"], self.hypers["beta2"]
        step_size = lr / (1 - beta1**self.steps)
        bias_second_root = (1 - beta2**self.steps).sqrt()
        decoupled = self.hypers["decoupled"]
        for param, grad, first, second in zip(self.params, grads, self.state, self.second, strict=True):
            if self.weight_decay:  # each member's as torch.optim's Adam applies it: decoupled (a factor
                # of 1 for the other members), or L2 in the gradient (a term of 0 for the others)
                param.mul_(self._shaped(1 - lr * weight_decay * decoupled, param))
                grad = grad + self._shaped(weight_decay * (1 - decoupled), param) * param
            first.lerp_(grad, self._shaped(1 - beta1, param))
            second.mul_(self._shaped(beta2, param)).addcmul_(grad, grad * self._shaped(1 - beta2, param))
            denom = second.sqrt() / self._shaped(bias_second_root, param) + self._hyper("eps", param)
            param.sub_(self._shaped(step_size, param) * (first / denom))


# --- the members and their training -------------------------------------------------------------


@dataclass
class Member:
    """One run of a pack: its config and its own state, built as its solo run builds it."""

    name: str
    cfg: DictConfig
    model: nn.Sequential
    optimizer: torch.optim.Optimizer
    schedule: Schedule
    generator: torch.Generator
    probe: ActivationProbe | None
    figure_epochs: set[int]
    on_snapshot: Callable[[Snapshot], None] | None = None  # each snapshot as it is taken (its figure drawn meanwhile)
    history: list[EpochMetrics] = field(default_factory=list)
    snapshots: list[Snapshot] = field(default_factory=list)
    probe_seconds: float = 0.0
    error: Exception | None = None
    done: bool = False

    def __post_init__(self) -> None:
        self.stopping = EarlyStopping.from_config(self.cfg.trainer.early_stopping)
        self.best = BestWeights(self.stopping)


@dataclass
class MemberResult:
    """What a packed member did, for its own job to log: its epochs and probe snapshots, its
    trained model (the best epoch's weights where early stopping restores them), its error."""

    history: list[EpochMetrics]
    snapshots: list[Snapshot]
    model: nn.Sequential
    probe_seconds: float
    train_seconds: float
    pack_size: int
    train_step: str
    error: Exception | None
    test: Evaluation | None = None  # its test pass, where the pack made it
    figures: Figures | None = None  # its figures, asked for as the pack trained and finished (rendering.Figures.ahead)


_current: MemberResult | None = None


@contextlib.contextmanager
def member_result(result: MemberResult | None) -> Iterator[None]:
    """Hand `result` to the job that runs inside the block (`current_result`)."""
    global _current
    _current = result
    try:
        yield
    finally:
        _current = None


def current_result() -> MemberResult | None:
    """The packed result of the job running now (None: the job trains itself)."""
    return _current


class PackedTrainer:
    """Trains a pack of members on shared data, epoch by epoch, as `engine.fit` trains one."""

    def __init__(self, members: Sequence[Member], data: DataSplits, device: torch.device) -> None:
        self.members = list(members)
        self.data = data
        self.device = device
        trainer = members[0].cfg.trainer
        self.batch_size = trainer.batch_size
        self.eval_batch_size = trainer.eval_batch_size
        self.max_epochs = trainer.max_epochs
        self.precision = trainer.precision
        self.net = StackedMLP([m.model for m in members], [float(m.cfg.dropout.p) for m in members], device)
        self.optimizer = PackedOptimizer(members[0].cfg.optimizer.name, self.net.params, len(members), device)
        self._load_hypers()
        for member in members:  # their schedules follow the pack's steps (torch warns of a schedule stepped first)
            member.optimizer._opt_called = True
        self.alive = torch.ones(len(members), dtype=torch.bool, device=device)
        self.epochs_done = 0  # the epochs trained (restored() sets it from a checkpoint)
        self.per_step = any(m.schedule.per_step for m in members)
        if device.type == "cuda":
            self.kind, self._step = "packed_cuda_graph", self._graph_step()
        elif self.precision == "fp32" and self.net.backprop_supported():
            self.kind, self._step = "packed_backprop", self._backprop_step
        else:
            self.kind, self._step = "packed", self._eager_step

    def _load_hypers(self) -> None:
        self.optimizer.load([m.optimizer.param_groups[0] for m in self.members], [m.done for m in self.members])

    def _batches(self, index: Tensor) -> tuple[Tensor, Tensor]:
        """Each member's training batch, x [P, B, in] and y [P, B], by the indices `index` [P, B]
        (index_select: a third cheaper than indexing on a CPU)."""
        train = self.data.train
        x = torch.index_select(train.x, 0, index.flatten()).view(*index.shape, *train.x.shape[1:])
        return x, train.y.take(index)

    def _loss(self, index: Tensor) -> tuple[Tensor, Tensor]:
        """Per-member mean cross-entropy [P] and logits [P, B, classes] of the batches `index` [P, B]."""
        x, y = self._batches(index)
        with autocast(self.device, self.precision):
            logits = self.net.forward(x, train=True)
            losses = F.cross_entropy(logits.flatten(0, 1).float(), y.flatten(), reduction="none")
        return losses.view(len(self.members), -1).mean(dim=1), logits

    def _eager_step(self, index: Tensor) -> tuple[Tensor, Tensor]:
        losses, logits = self._loss(index)
        total = torch.where(self.alive, losses, torch.zeros_like(losses)).sum()
        grads = torch.autograd.grad(total, self.net.params)
        self.optimizer.step(grads)
        return losses.detach(), logits.detach()

    def _backprop_step(self, index: Tensor) -> tuple[Tensor, Tensor]:
        """The step with its gradients written out (StackedMLP.backprop_step); plain SGD updates the
        weights inside the products that compute their gradients."""
        x, y = self._batches(index)
        optimizer = self.optimizer
        plain = optimizer.kind == "sgd" and not optimizer.momentum and not optimizer.weight_decay
        lr = optimizer.hypers["lr"] if plain else None
        losses, logits, grads = self.net.backprop_step(x, y, self.alive.to(x.dtype), lr)
        if grads:
            optimizer.step(grads)
        return losses, logits

    def _graph_step(self) -> Callable[[Tensor], tuple[Tensor, Tensor]]:
        """The eager step captured in one CUDA graph: each call copies the batch indices in and replays."""
        static_index = torch.zeros(len(self.members), self.batch_size, dtype=torch.long, device=self.device)
        state = [*self.net.params, *self.net.buffers, *self.optimizer.tensors]
        saved = [t.detach().clone() for t in state]
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):
            for _ in range(GRAPH_WARMUP_STEPS):
                self._eager_step(static_index)
        torch.cuda.current_stream(self.device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            static_losses, static_logits = self._eager_step(static_index)
        with torch.no_grad():  # undo the warm-up and capture steps
            for tensor, value in zip(state, saved, strict=True):
                tensor.copy_(value)

        def step(index: Tensor) -> tuple[Tensor, Tensor]:
            static_index.copy_(index, non_blocking=True)
            graph.replay()
            return static_losses, static_logits

        return step

    def fit(self, after_epoch: Callable[[int], None] | None = None) -> None:
        """Train every member up to max_epochs (from the epoch after a restored checkpoint's),
        validating after each epoch, then `after_epoch(epoch)`; a member that diverges or that
        early stopping stops is frozen, the others go on."""
        if self.epochs_done == 0:
            self._probe_all(epoch=0)
        for epoch in range(self.epochs_done + 1, self.max_epochs + 1):
            if all(m.done for m in self.members):
                break
            start = time.perf_counter()
            lrs = [current_lr(m.optimizer) for m in self.members]
            losses, train_acc = self._train_epoch(epoch)
            val_loss, val_acc, _ = self.evaluate(self.data.val)
            seconds = time.perf_counter() - start
            for i, member in enumerate(self.members):
                if not member.done and (err := loss_divergence(epoch, train_loss=losses[i], val_loss=val_loss[i])):
                    member.error = err
                    self._freeze(i)
            training = [i for i, member in enumerate(self.members) if not member.done]
            for i in training:
                member = self.members[i]
                metrics = EpochMetrics(epoch, losses[i], train_acc[i], val_loss[i], val_acc[i], seconds, lrs[i])
                member.history.append(metrics)
                member.schedule.after_epoch(asdict(metrics))
            self._load_hypers()
            self._after_epoch(epoch)
            self.epochs_done = epoch
            if after_epoch is not None:
                after_epoch(epoch)
            if not training:  # every member left diverged during this epoch
                continue
            best = max(training, key=lambda i: val_acc[i])
            worst = min(val_acc[i] for i in training)
            log.info(
                f"pack epoch {epoch}/{self.max_epochs}: {len(training)} runs, val acc "
                f"{worst:.4f} to {val_acc[best]:.4f} ({self.members[best].name}), {seconds:.1f}s"
            )

    def restored(self, epoch: int) -> None:
        """Go on after `epoch`, the members' and the stacked state restored by a pack checkpoint
        (mlpsweep.pack_checkpoint): stopped members frozen, the others at their current rates."""
        self.alive.copy_(torch.tensor([not m.done for m in self.members], device=self.device))
        self._load_hypers()
        self.epochs_done = epoch

    def _train_epoch(self, epoch: int) -> tuple[list[float], list[float]]:
        """One pass over each member's own permutation of the training split; per-member mean loss and accuracy."""
        size, batch = len(self.data.train), self.batch_size
        steps = size // batch
        order = torch.stack(
            [torch.randperm(size, device=self.device, generator=m.generator)[: steps * batch] for m in self.members]
        )
        predictions = torch.empty_like(order)
        losses = torch.empty(steps, len(self.members), device=self.device)
        check_every = DIVERGENCE_CHECK_EVERY if self.device.type == "cpu" else steps
        for i in range(steps):
            interrupt.check()
            columns = slice(i * batch, (i + 1) * batch)
            step_losses, logits = self._step(order[:, columns])
            losses[i].copy_(step_losses)
            torch.argmax(logits, dim=2, out=predictions[:, columns])
            if self.per_step:
                for member in self.members:
                    if member.schedule.per_step and not member.done:
                        member.schedule.after_step()
                self.optimizer.load_lr(
                    [m.optimizer.param_groups[0] for m in self.members], [m.done for m in self.members]
                )
            if (i + 1) % check_every == 0 or i + 1 == steps:
                self._check_finite(losses, epoch, first=i // check_every * check_every, done=i + 1)
        correct = (predictions == self.data.train.y[order]).sum(dim=1)
        return losses.mean(dim=0).tolist(), [c / order.shape[1] for c in correct.tolist()]

    def _check_finite(self, losses: Tensor, epoch: int, first: int, done: int) -> None:
        """Fail each live member whose step losses in [first, done) hold a NaN/inf (solo's message)."""
        bad = ~torch.isfinite(losses[first:done])
        for i in bad.any(dim=0).nonzero().flatten().tolist():
            member = self.members[i]
            if member.done:
                continue
            step = int(bad[:, i].nonzero()[0])
            member.error = DivergenceError(
                f"loss diverged to {losses[first + step, i].item()} at epoch {epoch}, step {first + step + 1}"
            )
            self._freeze(i)

    def _freeze(self, index: int) -> None:
        member = self.members[index]
        member.done = True
        self.alive[index] = False
        self._load_hypers()
        if member.error is None:
            self.net.copy_to(index, member.model)

    @torch.inference_mode()
    def evaluate(self, split: Split, confusion: bool = False) -> tuple[list[float], list[float], Tensor | None]:
        """Per-member mean cross-entropy and accuracy over a whole split, in eval mode, and where
        asked the members' [true class, predicted class] counts [P, classes, classes] (on the CPU)."""
        size, classes = len(self.members), self.data.num_classes
        loss_sum = torch.zeros(size, device=self.device)
        counts = torch.zeros(size * classes * classes, dtype=torch.long, device=self.device)
        offsets = torch.arange(size, device=self.device).unsqueeze(1) * classes * classes
        for start in range(0, len(split), self.eval_batch_size):
            x, y = split.x[start : start + self.eval_batch_size], split.y[start : start + self.eval_batch_size]
            with autocast(self.device, self.precision):
                logits = self.net.forward(x, train=False)
            expanded = y.expand(size, -1)
            per_sample = F.cross_entropy(logits.flatten(0, 1).float(), expanded.flatten(), reduction="none")
            loss_sum += per_sample.view(size, -1).sum(dim=1)
            cells = offsets + expanded * classes + logits.argmax(dim=2)
            counts += torch.bincount(cells.flatten(), minlength=size * classes * classes)
        matrices = counts.view(size, classes, classes)
        correct = matrices.diagonal(dim1=1, dim2=2).sum(dim=1)
        # divided here, as the solo evaluation divides its sums (float32 quotients would log 0.8306000232696533)
        losses = [total / len(split) for total in loss_sum.tolist()]
        return losses, [count / len(split) for count in correct.tolist()], matrices.cpu() if confusion else None

    def _after_epoch(self, epoch: int) -> None:
        """Per live member: its model brought up to date, its best weights, its probe, and whether it stops."""
        for i, member in enumerate(self.members):
            if member.done:
                continue
            self.net.copy_to(i, member.model)
            if member.stopping.enabled and member.stopping.restore_best:
                member.best.update(member.history, member.model)
            final = member.stopping.should_stop(member.history)
            self._probe(member, epoch, final)
            if final:
                log.info(f"{member.name}: {member.stopping.reason(member.history)}")
                self._freeze(i)

    def _probe_all(self, epoch: int) -> None:
        for member in self.members:
            self._probe(member, epoch, final=False)

    @staticmethod
    def _probe(member: Member, epoch: int, final: bool) -> None:
        if member.probe is None:
            return
        start = time.perf_counter()
        member.snapshots.append(member.probe.snapshot(epoch, with_histograms=epoch in member.figure_epochs or final))
        member.probe_seconds += time.perf_counter() - start
        if member.on_snapshot is not None:
            member.on_snapshot(member.snapshots[-1])

    def results(self, train_seconds: float) -> list[MemberResult]:
        """Each member's result: its model holding its trained weights (the best epoch's, if early
        stopping restores them) and, unless it failed, its test pass (the pack's, one stacked pass,
        for the members whose final weights are the pack's)."""
        test_loss, test_acc, confusion = self.evaluate(self.data.test, confusion=True)
        results = []
        for i, member in enumerate(self.members):
            if not member.done:
                self.net.copy_to(i, member.model)
            stopping = member.stopping
            restores = member.error is None and stopping.enabled and stopping.restore_best
            tested = None
            if member.error is None:
                tested = Evaluation(test_loss[i], test_acc[i], confusion[i])
            if restores and stopping.best_epoch(member.history) != member.history[-1].epoch:
                member.best.restore(member.model)
                tested = None  # tested alone, with the restored weights
            elif member.done and member.error is None:
                tested = None  # frozen before the end: the pack's weights are not its own
            if tested is not None and (err := loss_divergence(None, test_loss=tested.loss)):
                member.error, tested = err, None  # fails as its solo run would, before any figure is asked for
            results.append(
                MemberResult(
                    history=member.history,
                    snapshots=member.snapshots,
                    model=member.model,
                    probe_seconds=member.probe_seconds,
                    train_seconds=train_seconds,
                    pack_size=len(self.members),
                    train_step=self.kind,
                    error=member.error,
                    test=tested,
                )
            )
        return results
