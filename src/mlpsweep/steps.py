"""How one training step (forward, loss, backward, update) is computed.

Three implementations of the same step; `train_step` picks the fastest that applies:

- `autograd_step`: eager PyTorch autograd and the configured optimizer. Any model, any optimizer,
  any device; the reference the others are tested against.
- `cuda_graph_step` (CUDA): the autograd step captured once in a CUDA graph and replayed, so a
  step costs one graph launch instead of dozens of kernel launches from Python.
- `backprop_step` (CPU): for an MLP of Linear, BatchNorm1d, ReLU/LeakyReLU/sigmoid/tanh and
  Dropout trained by SGD (with or without momentum, Nesterov and weight decay), the gradients
  written out. At batch 32 eager autograd spends much of a step on per-op bookkeeping and on
  writing and reading gradient buffers; this does the same arithmetic with about a third of the
  operator calls. Plain SGD updates each weight in the matrix product that computes its gradient
  (no gradient buffers); momentum and weight decay follow torch.optim.SGD's own update.

Every step reads the optimizer's current learning rate, so a schedule (torch.optim.lr_scheduler)
takes effect on the next step: the CUDA graph reads it from a device tensor in the parameter group
(`lr_as_tensor`), which the schedulers update in place.

A step takes a batch (x, y) and returns (loss, logits), both valid until the next step.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

TrainStep = Callable[[Tensor, Tensor], tuple[Tensor, Tensor]]

# warm-up steps before a CUDA graph capture (lazy optimizer state, cuBLAS workspaces)
GRAPH_WARMUP_STEPS = 3


def autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    """bf16 autocast on the device for `precision="bf16"`, else nothing (fp32 throughout)."""
    if precision == "bf16":
        # no weight cache: a CUDA graph must recompute the casts on every replay
        return torch.autocast(device.type, dtype=torch.bfloat16, cache_enabled=False)
    return contextlib.nullcontext()


def autograd_step(model: nn.Module, optimizer: torch.optim.Optimizer, precision: str = "fp32") -> TrainStep:
    """The textbook step: zero the gradients, forward, cross-entropy, backward, optimizer step."""
    device = next(model.parameters()).device

    def step(x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        optimizer.zero_grad(set_to_none=True)
        with autocast(device, precision):
            logits = model(x)
            loss = F.cross_entropy(logits, y)
        loss.backward()
        optimizer.step()
        return loss.detach(), logits.detach()

    return step


# --- CUDA graph ---------------------------------------------------------------------------------


def graph_safe(optimizer: torch.optim.Optimizer) -> bool:
    """Whether `optimizer`'s step can be captured, and whether zeroing its lazily created state
    is the same as starting it fresh (what `_restored_after` relies on)."""
    if isinstance(optimizer, (torch.optim.Adam, torch.optim.AdamW)):
        return all(group["capturable"] for group in optimizer.param_groups)
    if isinstance(optimizer, torch.optim.SGD):
        return all(group["dampening"] == 0 for group in optimizer.param_groups)
    return False


@contextlib.contextmanager
def _restored_after(model: nn.Module, optimizer: torch.optim.Optimizer) -> Iterator[None]:
    """Undo what the warm-up steps inside the block did to the weights, buffers and optimizer
    state, in place (the captured graph holds their addresses). Optimizer state the block
    created is zeroed: for SGD (dampening 0) and capturable Adam/AdamW that equals fresh state."""
    tensors = [*model.parameters(), *model.buffers()]
    saved = [t.detach().clone() for t in tensors]
    saved_state = {p: {k: v.clone() for k, v in s.items() if torch.is_tensor(v)} for p, s in optimizer.state.items()}
    yield
    with torch.no_grad():
        for tensor, value in zip(tensors, saved, strict=True):
            tensor.copy_(value)
        for param, state in optimizer.state.items():
            for key, value in state.items():
                before = saved_state.get(param, {}).get(key)
                if before is not None:
                    value.copy_(before)
                elif torch.is_tensor(value):
                    value.zero_()


def lr_as_tensor(optimizer: torch.optim.Optimizer, device: torch.device) -> None:
    """Make each parameter group's learning rate a float32 tensor on `device`, its value kept, so
    that a CUDA graph captured afterwards reads the current rate at every replay: the schedulers of
    torch.optim.lr_scheduler write a tensor rate in place (`fill_`). SGD is switched to its fused
    implementation, the one that reads a tensor rate on the device (its for-each and single-tensor
    ones turn it into a Python number, which stops a capture); Adam and AdamW read it as a tensor
    when capturable, which `graph_safe` requires. A rate restored from a checkpoint (a tensor on
    the CPU, or a number) is moved back the same way."""
    for group in optimizer.param_groups:
        lr = group["lr"]
        if not (torch.is_tensor(lr) and lr.device == device and lr.dtype == torch.float32):
            group["lr"] = torch.tensor(float(lr), dtype=torch.float32, device=device)
        if isinstance(optimizer, torch.optim.SGD):
            group["foreach"], group["fused"] = False, True


def cuda_graph_step(
    model: nn.Module, optimizer: torch.optim.Optimizer, batch_size: int, num_features: int, precision: str = "fp32"
) -> TrainStep:
    """The autograd step captured in a CUDA graph (the whole-network recipe of PyTorch's CUDA
    graphs notes). Each call copies the batch into the graph's static input and replays it.

    The warm-up steps the capture needs are undone, so training starts from the same weights and
    optimizer state as it would without the graph. The learning rate is a device tensor the graph
    reads (`lr_as_tensor`), so a schedule's changes take effect at the next replay; the optimizer's
    other settings (momentum, betas, weight decay) are baked into the graph and must not change.
    """
    device = next(model.parameters()).device
    model.train()  # the graph replays the mode it was captured in
    lr_as_tensor(optimizer, device)
    static_x = torch.zeros(batch_size, num_features, device=device)
    static_y = torch.zeros(batch_size, dtype=torch.long, device=device)
    eager = autograd_step(model, optimizer, precision)
    with _restored_after(model, optimizer):
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):
            for _ in range(GRAPH_WARMUP_STEPS):
                eager(static_x, static_y)
        torch.cuda.current_stream(device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        optimizer.zero_grad(set_to_none=True)  # backward allocates the gradients in the graph's pool
        with torch.cuda.graph(graph):
            static_loss, static_logits = eager(static_x, static_y)

    def step(x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        static_x.copy_(x, non_blocking=True)
        static_y.copy_(y, non_blocking=True)
        graph.replay()
        return static_loss, static_logits

    return step


# --- hand-derived backprop (CPU) ----------------------------------------------------------------


class Activation(NamedTuple):
    """An activation in place: its forward, and grad *= its derivative given its output (ATen's own
    *_backward kernels, writing into grad: bitwise what autograd computes)."""

    forward: Callable[[Tensor], Tensor]
    scale_grad: Callable[[Tensor, Tensor], Tensor]


def activation_in_place(module: nn.Module) -> Activation | None:
    """The in-place forward and derivative of an activation module, or None if there is none here."""
    aten = torch.ops.aten
    if isinstance(module, nn.ReLU):
        return Activation(
            torch.relu_, lambda grad, out: aten.threshold_backward.grad_input(grad, out, 0, grad_input=grad)
        )
    if isinstance(module, nn.LeakyReLU) and module.negative_slope >= 0:
        slope = module.negative_slope
        return Activation(
            lambda h: F.leaky_relu_(h, slope),
            lambda grad, out: aten.leaky_relu_backward.grad_input(grad, out, slope, True, grad_input=grad),
        )
    if isinstance(module, nn.Sigmoid):
        return Activation(
            torch.sigmoid_, lambda grad, out: aten.sigmoid_backward.grad_input(grad, out, grad_input=grad)
        )
    if isinstance(module, nn.Tanh):
        return Activation(torch.tanh_, lambda grad, out: aten.tanh_backward.grad_input(grad, out, grad_input=grad))
    return None


def _batch_norm(module: nn.Module) -> nn.BatchNorm1d | None:
    """The module if it is a BatchNorm1d that `backprop_step` handles (affine, exponential
    running statistics), else None."""
    handled = isinstance(module, nn.BatchNorm1d) and module.affine and module.track_running_stats
    return module if handled and module.momentum is not None else None


class Layer(NamedTuple):
    """Linear -> optional BatchNorm1d -> activation -> optional dropout (the head: Linear only)."""

    linear: nn.Linear
    norm: nn.BatchNorm1d | None = None
    activation: Activation | None = None
    dropout: float = 0.0


def backprop_layers(model: nn.Module) -> list[Layer] | None:
    """The model's layers, if it is an MLP that `backprop_step` handles: the factory's layout with
    Linear, optional BatchNorm1d, a ReLU/LeakyReLU/sigmoid/tanh and optional Dropout per hidden
    block, no layer norm, no hooks. Else None."""
    children = list(model.children())
    if any(m._forward_hooks or m._forward_pre_hooks for m in model.modules()) or not children:
        return None
    *hidden, head = children
    if not isinstance(head, nn.Linear):
        return None
    layers = []
    for block in hidden:
        parts = list(block.children())
        dropout = parts.pop() if parts and type(parts[-1]) is nn.Dropout else None
        if len(parts) not in (2, 3) or not isinstance(parts[0], nn.Linear):
            return None
        norm = _batch_norm(parts[1]) if len(parts) == 3 else None
        activation = activation_in_place(parts[-1])
        if activation is None or (len(parts) == 3 and norm is None):
            return None
        layers.append(Layer(parts[0], norm, activation, dropout.p if dropout is not None else 0.0))
    return [*layers, Layer(head)]


def backprop_supported(model: nn.Module, optimizer: torch.optim.Optimizer, precision: str) -> bool:
    """Whether `backprop_step` computes what `autograd_step` would: a model `backprop_layers`
    handles, on the CPU in fp32, trained by SGD (one parameter group; momentum, dampening,
    Nesterov and weight decay as torch.optim.SGD has them, but not maximize)."""
    if precision != "fp32" or next(model.parameters()).device.type != "cpu":
        return False
    if type(optimizer) is not torch.optim.SGD or len(optimizer.param_groups) != 1:
        return False
    return not optimizer.param_groups[0]["maximize"] and backprop_layers(model) is not None


def _sgd_update(param: Tensor, grad: Tensor, group: dict, state: dict) -> None:
    """torch.optim.SGD's update of one parameter by the settings of its parameter `group`, given
    a gradient this step owns (it may be overwritten): its single-tensor CPU code operation for
    operation, the momentum buffer kept where it keeps it (`state`, the optimizer's state)."""
    momentum, weight_decay = group["momentum"], group["weight_decay"]
    if weight_decay != 0:
        grad.add_(param, alpha=weight_decay)
    if momentum != 0:
        param_state = state[param]
        buf = param_state.get("momentum_buffer")
        if buf is None:  # the first step: the buffer starts as the gradient
            buf = param_state["momentum_buffer"] = grad.clone()
        else:
            buf.mul_(momentum).add_(grad, alpha=1 - group["dampening"])
        grad = grad.add_(buf, alpha=momentum) if group["nesterov"] else buf
    param.add_(grad, alpha=-float(group["lr"]))


def backprop_step(model: nn.Module, optimizer: torch.optim.Optimizer, batch_size: int) -> TrainStep:
    """Forward, cross-entropy and SGD update of an MLP with the gradients written out:

        z_l = a_{l-1} W_l^T + b_l, h_l = BN(z_l) or z_l, a_l = act(h_l) * m_l;  dL/dz_L = (softmax(z_L) - onehot(y)) / B
        dL/dh_l = dL/da_l * m_l * act'(h_l);  dL/dz_l, dL/dgamma_l, dL/dbeta_l: ATen's batch-norm backward
        dL/da_{l-1} = dL/dz_l W_l;  dL/dW_l = dL/dz_l^T a_{l-1};  dL/db_l = sum_batch dL/dz_l

    m_l is the dropout mask (ones without dropout), drawn from the default generator exactly as
    ATen's CPU dropout draws it. Batch norm runs through ATen's own forward and backward kernels
    (the ones autograd calls), updating the running statistics as the module does. Each gradient
    goes back through a layer's weights before they are updated. The optimizer's parameter group
    is read at every step, so a learning-rate schedule takes effect as it does for autograd.
    Plain SGD (no momentum, no weight decay) updates W_l inside the product that computes its
    gradient (`addmm_`, alpha = -lr), so that gradient is never stored; with momentum or weight
    decay each gradient is computed (W_l's into a buffer kept between steps) and handed to
    `_sgd_update`, which keeps the momentum buffers in `optimizer.state` as torch.optim.SGD does
    (checkpoints and a later autograd step see the same state). Only where `backprop_supported`
    says so; tests/test_engine.py checks it against a textbook loop.
    """
    layers = backprop_layers(model)
    if layers is None:
        raise ValueError("backprop_step needs an MLP that backprop_layers handles (see backprop_supported)")
    group, state = optimizer.param_groups[0], optimizer.state
    minus_one = torch.full((batch_size, 1), -1.0)
    weight_grads = [torch.empty_like(layer.linear.weight) for layer in layers]  # with momentum or weight decay

    @torch.no_grad()
    def step(x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        inputs, outputs = [], []  # per layer: its input, its activation's output
        norm_saved, masks = [], []  # per norm: its input and batch statistics; per dropout: its mask
        a = x
        for linear, norm, activation, p in layers:
            inputs.append(a)
            a = F.linear(a, linear.weight, linear.bias)
            if norm is not None:
                z = a
                a, mean, invstd = torch.native_batch_norm(
                    z, norm.weight, norm.bias, norm.running_mean, norm.running_var, True, norm.momentum, norm.eps
                )
                norm.num_batches_tracked.add_(1)
                norm_saved.append((z, mean, invstd))
            if activation is not None:
                a = activation.forward(a)
                outputs.append(a)
            if p > 0:  # as ATen's CPU dropout draws and scales its mask
                masks.append(torch.empty_like(a).bernoulli_(1 - p).div_(1 - p))
                a = a * masks[-1]
        logits = a
        log_probs = torch.log_softmax(logits, dim=1)
        loss = F.nll_loss(log_probs, y)
        grad = log_probs.exp_().scatter_add_(1, y.unsqueeze(1), minus_one).div_(batch_size)  # dL/dz_L
        plain = group["momentum"] == 0 and group["weight_decay"] == 0
        alpha = -float(group["lr"])
        for i in reversed(range(len(layers))):
            linear, norm, activation, p = layers[i]
            if p > 0:
                grad.mul_(masks.pop())
            if activation is not None:
                grad = activation.scale_grad(grad, outputs[i])
            if norm is not None:
                z, mean, invstd = norm_saved.pop()
                grad, grad_gamma, grad_beta = torch.ops.aten.native_batch_norm_backward(
                    grad, z, norm.weight, norm.running_mean, norm.running_var, mean, invstd, True, norm.eps, [True] * 3
                )
                if plain:
                    norm.weight.add_(grad_gamma, alpha=alpha)
                    norm.bias.add_(grad_beta, alpha=alpha)
                else:
                    _sgd_update(norm.weight, grad_gamma, group, state)
                    _sgd_update(norm.bias, grad_beta, group, state)
            grad_input = grad @ linear.weight if i > 0 else None  # before W_l changes
            if plain:
                linear.weight.addmm_(grad.t(), inputs[i], alpha=alpha)
                if linear.bias is not None:
                    linear.bias.add_(grad.sum(0), alpha=alpha)
            else:
                _sgd_update(linear.weight, torch.mm(grad.t(), inputs[i], out=weight_grads[i]), group, state)
                if linear.bias is not None:
                    _sgd_update(linear.bias, grad.sum(0), group, state)
            grad = grad_input
        optimizer._opt_called = True  # what optimizer.step() records for the lr schedulers' order check
        return loss, logits

    return step


def step_kind(model: nn.Module, optimizer: torch.optim.Optimizer, fast: bool, precision: str) -> str:
    """Which step `train_step` uses: cuda_graph, backprop or autograd."""
    on_cuda = next(model.parameters()).device.type == "cuda"
    if fast and on_cuda and graph_safe(optimizer):
        return "cuda_graph"
    if fast and backprop_supported(model, optimizer, precision):
        return "backprop"
    return "autograd"


def train_step(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    batch_size: int,
    num_features: int,
    fast: bool = True,
    precision: str = "fp32",
) -> tuple[str, TrainStep]:
    """The fastest step that computes what `autograd_step` computes, and its kind (`step_kind`):
    a CUDA graph on a GPU, hand-derived backprop for an MLP trained by SGD on a CPU, else
    autograd."""
    kind = step_kind(model, optimizer, fast, precision)
    if kind == "cuda_graph":
        return kind, cuda_graph_step(model, optimizer, batch_size, num_features, precision)
    if kind == "backprop":
        return kind, backprop_step(model, optimizer, batch_size)
    return kind, autograd_step(model, optimizer, precision)
