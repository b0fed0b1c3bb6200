"""Time the mlpsweep engine against the classic DataLoader loop, side by side in one process.

    python benchmarks/bench_engine.py                    # per-epoch timing, both lecture models
    python benchmarks/bench_engine.py --mode sweep       # the 6-run activation x norm sweep
    python benchmarks/bench_engine.py --mode accuracy    # test accuracy of both loops over seeds
    python benchmarks/bench_engine.py --mode steps optimizer=sgd_momentum   # training steps/s: autograd vs fast step
    python benchmarks/bench_engine.py --mode packed      # sweep (a)'s 18 runs: one pack's steps vs solo steps
    python benchmarks/bench_engine.py --device cuda      # the same on a GPU

The classic loop is the lecture's: torchvision's MNIST with ToTensor() per image, a
DataLoader of batch 32 (shuffle, drop_last), `.item()` on the loss every step. Both sides train
the same architecture from the same initial weights with the same optimizer (by default SGD lr 0.1;
an override such as optimizer=sgd_momentum changes it for both) on the same 54000/6000 split.
An "epoch" is one training pass plus one validation pass. Needs MNIST under $MNIST_ROOT.
The two loops draw their validation splits and batch orders differently from the same seed; the
accuracy mode compares them on the same 10000 test images over several seeds.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time

import torch
import torch.nn.functional as F
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig
from torch import nn
from torch.utils.data import DataLoader, random_split
from torchvision import datasets, transforms

from mlpsweep.config import CONFIG_DIR
from mlpsweep.data import load_splits
from mlpsweep.engine import (
    EpochMetrics,
    build_optimizer,
    evaluate,
    fit_epoch,
    resolve_device,
    seed_everything,
    train_one_epoch,
)
from mlpsweep.model import build_model
from mlpsweep.stats import summarize, welch_difference
from mlpsweep.steps import train_step

REPO_ROOT = CONFIG_DIR.parent
MODELS = {
    "784-165-165-10 ReLU": ["depth.widths=[165,165]"],
    "784-1024-300-10 BN-ReLU": ["norm=batchnorm"],
}


# inputs as ToTensor() gives them, on both sides, so that both compute the same thing
SAME_INPUTS = ["data.normalize=false"]


def compose_cfg(overrides: list[str]) -> DictConfig:
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        return compose(config_name="train", overrides=SAME_INPUTS + overrides)


# --- the classic loop ---------------------------------------------------------------------------


def classic_loaders(root: str, seed: int) -> tuple[DataLoader, DataLoader]:
    train_full = datasets.MNIST(root, train=True, download=False, transform=transforms.ToTensor())
    train, val = random_split(train_full, [54000, 6000], generator=torch.Generator().manual_seed(seed))
    return (
        DataLoader(train, batch_size=32, shuffle=True, drop_last=True),
        DataLoader(val, batch_size=32, shuffle=False),
    )


def classic_epoch(model: nn.Module, optimizer: torch.optim.Optimizer, train: DataLoader, val: DataLoader, device: torch.device) -> float:
    """One classic training + validation pass; returns the validation accuracy."""
    model.train()
    total_loss = 0.0
    for x, y in train:
        x, y = x.view(x.size(0), -1).to(device), y.to(device)
        optimizer.zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        optimizer.step()
        total_loss += loss.item()
    model.eval()
    correct = 0
    with torch.no_grad():
        for x, y in val:
            x, y = x.view(x.size(0), -1).to(device), y.to(device)
            correct += (model(x).argmax(1) == y).sum().item()
    return correct / len(val.dataset)


class ClassicRun:
    """The classic loop, one epoch per call."""

    def __init__(self, cfg: DictConfig, device: torch.device) -> None:
        seed_everything(cfg.seed)
        self.device = device
        self.model = build_model(cfg, 784, 10).to(device)
        self.optimizer = build_optimizer(cfg.optimizer, self.model.parameters())
        self.train, self.val = classic_loaders(cfg.data.root, cfg.seed)
        self.val_acc = 0.0

    def epoch(self) -> float:
        """Train and validate one epoch; return its seconds."""
        start = time.perf_counter()
        self.val_acc = classic_epoch(self.model, self.optimizer, self.train, self.val, self.device)
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - start


# --- the engine ---------------------------------------------------------------------------------


class EngineRun:
    """The engine (`fit`'s epochs), one epoch per call; `kind` is the training step it uses."""

    def __init__(self, cfg: DictConfig, device: torch.device) -> None:
        seed_everything(cfg.seed)
        self.cfg = cfg.trainer
        self.data = load_splits(cfg.data, device)
        self.model = build_model(cfg, self.data.num_features, self.data.num_classes).to(device)
        self.optimizer = build_optimizer(cfg.optimizer, self.model.parameters())
        self.generator = torch.Generator(device=device).manual_seed(cfg.seed)
        self.kind, self.step = train_step(
            self.model, self.optimizer, self.cfg.batch_size, self.data.num_features, self.cfg.fast_step,
            self.cfg.precision,
        )  # fmt: skip
        self.history: list[EpochMetrics] = []

    @property
    def val_acc(self) -> float:
        return self.history[-1].val_acc

    def epoch(self) -> float:
        """Train and validate one more epoch; return its seconds."""
        epoch = len(self.history) + 1
        self.history.append(fit_epoch(self.model, self.step, self.data, self.cfg, self.generator, epoch))
        return self.history[-1].epoch_time_s

    def train_steps(self) -> float:
        """One epoch of training steps alone (no validation); return its seconds."""
        start = time.perf_counter()
        losses, _ = train_one_epoch(self.model, self.step, self.data.train, self.cfg.batch_size, self.generator)
        losses.sum().item()  # wait for the device
        return time.perf_counter() - start


def engine_variants(device: torch.device) -> dict[str, list[str]]:
    """The engine as it runs by default, with autograd only, and (on a GPU) with bf16 autocast."""
    variants = {"mlpsweep engine, autograd": ["trainer.fast_step=false"], "mlpsweep engine": []}
    if device.type == "cuda":
        variants["mlpsweep engine, bf16"] = ["trainer.precision=bf16"]
    return variants


def epoch_mode(args: argparse.Namespace, device: torch.device) -> None:
    """Per model, the classic loop and each engine variant take turns, one epoch each, so that a
    shared machine's changing speed falls on all of them alike."""
    print(f"| model | loop | step | s/epoch (median of {args.epochs}) | samples/s | val acc after {args.epochs + 1} epochs | speed-up |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for name, overrides in MODELS.items():
        base = overrides + [f"trainer.device={device}", "trainer.progress_bar=false", *args.override]
        runs: dict[str, ClassicRun | EngineRun] = {"classic DataLoader": ClassicRun(compose_cfg(base), device)}
        runs |= {loop: EngineRun(compose_cfg(base + variant), device) for loop, variant in engine_variants(device).items()}
        times: dict[str, list[float]] = {loop: [] for loop in runs}
        for _ in range(args.epochs + 1):
            for loop, run in runs.items():
                times[loop].append(run.epoch())
        medians = {loop: statistics.median(t[1:]) for loop, t in times.items()}  # the first epoch is the warm-up
        for loop, run in runs.items():
            kind = run.kind if isinstance(run, EngineRun) else "autograd"
            median = medians[loop]
            speedup = medians["classic DataLoader"] / median
            print(f"| {name} | {loop} | {kind} | {median:.3f} | {54000 / median:,.0f} | {run.val_acc:.4f} | {speedup:.1f}x |", flush=True)


def steps_mode(args: argparse.Namespace, device: torch.device) -> None:
    """Training steps alone, per model: the engine's autograd step and its fast step take turns, one
    epoch of steps each (54000 // 32 steps); steps per second from the median epoch after a warm-up
    epoch. Shows what the fast step gains for the configured optimizer, e.g. optimizer=sgd_momentum."""
    print(f"| model | optimizer | autograd steps/s | fast step | fast steps/s | gain (median of {args.epochs}) |")
    print("| --- | --- | --- | --- | --- | --- |")
    for name, overrides in MODELS.items():
        base = overrides + [f"trainer.device={device}", "trainer.progress_bar=false", *args.override]
        autograd = EngineRun(compose_cfg(base + ["trainer.fast_step=false"]), device)
        fast = EngineRun(compose_cfg(base), device)
        times: dict[str, list[float]] = {"autograd": [], "fast": []}
        for _ in range(args.epochs + 1):
            times["autograd"].append(autograd.train_steps())
            times["fast"].append(fast.train_steps())
        steps = len(fast.data.train) // fast.cfg.batch_size
        rate = {loop: steps / statistics.median(t[1:]) for loop, t in times.items()}
        settings = ("lr", "momentum", "nesterov", "weight_decay", "betas")
        optimizer = f"{type(fast.optimizer).__name__} " + ", ".join(
            f"{k}={v}" for k, v in fast.optimizer.defaults.items() if k in settings
        )
        print(f"| {name} | {optimizer} | {rate['autograd']:,.0f} | {fast.kind} | {rate['fast']:,.0f} | "
              f"{rate['fast'] / rate['autograd']:.2f}x |", flush=True)  # fmt: skip


def accuracy_mode(args: argparse.Namespace, device: torch.device) -> None:
    """Test accuracy (the same 10000 images for both) of the classic loop and the engine after
    the same epochs, seed by seed, with the mean difference and its Welch 95% interval."""
    epochs = args.epochs + 1
    test = load_splits(compose_cfg([]).data, device).test
    for name, overrides in MODELS.items():
        print(f"\n{name}, test accuracy after {epochs} epochs:\n")
        print("| seed | classic DataLoader | mlpsweep engine | step |")
        print("| --- | --- | --- | --- |")
        classic, engine = [], []
        for seed in args.seeds:
            cfg = compose_cfg(overrides + [f"seed={seed}", f"trainer.device={device}", "trainer.progress_bar=false", *args.override])
            for run, accuracies in ((ClassicRun(cfg, device), classic), (engine_run := EngineRun(cfg, device), engine)):
                for _ in range(epochs):
                    run.epoch()
                accuracies.append(evaluate(run.model, test, 1000)[1])
            print(f"| {seed} | {classic[-1]:.4f} | {engine[-1]:.4f} | {engine_run.kind} |", flush=True)
        (c, e), difference = (summarize(classic), summarize(engine)), welch_difference(engine, classic)
        print(f"| mean ± std | {c.mean:.4f} ± {c.std:.4f} | {e.mean:.4f} ± {e.std:.4f} | |")
        print(f"\nengine - classic: {100 * difference.estimate:+.2f} pp, 95% Welch interval "
              f"[{100 * difference.low:+.2f}, {100 * difference.high:+.2f}] pp", flush=True)


def sweep_mode(args: argparse.Namespace, device: torch.device) -> None:
    activations, norms = ("sigmoid", "tanh", "relu"), ("none", "batchnorm")
    start = time.perf_counter()
    for activation in activations:
        for norm in norms:
            cfg = compose_cfg([f"activation={activation}", f"norm={norm}", f"trainer.device={device}", *args.override])
            run = ClassicRun(cfg, device)
            for _ in range(args.epochs):
                run.epoch()
    classic_s = time.perf_counter() - start

    with tempfile.TemporaryDirectory() as tmp:
        command = [
            sys.executable, str(REPO_ROOT / "train.py"), "--multirun",
            f"activation={','.join(activations)}", f"norm={','.join(norms)}",
            f"trainer.max_epochs={args.epochs}", f"trainer.device={device}", "trainer.progress_bar=false",
            f"tracking.uri=sqlite:///{tmp}/mlflow.db", f"hydra.sweep.dir={tmp}/multirun", *SAME_INPUTS, *args.override,
        ]  # fmt: skip
        start = time.perf_counter()
        subprocess.run(command, check=True, capture_output=True)
        engine_s = time.perf_counter() - start
    print(f"| sweep ({len(activations) * len(norms)} runs x {args.epochs} epochs) | seconds | speed-up |")
    print("| --- | --- | --- |")
    print(f"| classic loop, one run after another (training only) | {classic_s:.1f} | 1.0x |")
    print(f"| `python train.py -m ...` (process start, MLflow tracking, test pass, model logging included) | {engine_s:.1f} | {classic_s / engine_s:.1f}x |")


PACKED_MODELS = {"784-165-165-10": "depth.widths=[165,165]", "784-1024-300-10": "depth.widths=[1024,300]"}


def packed_mode(args: argparse.Namespace, device: torch.device) -> None:
    """Sweep (a)'s 18 runs (sigmoid, tanh, relu x none, batchnorm x seeds 0-2) per model: an epoch of
    training steps as one pack (the packed launcher's step) and as 18 runs one after another (each
    its own fastest step), taking turns; milliseconds per step of the pack against the sum of its
    members' steps, from the median epoch after a warm-up epoch."""
    from mlpsweep.cli import fresh_state
    from mlpsweep.packed import Member, PackedTrainer
    from mlpsweep.packing import segment_order

    print("| model | pack step | pack ms/step | 18 solo steps ms | pack / solo |")
    print("| --- | --- | --- | --- | --- |")
    for name, widths in PACKED_MODELS.items():
        cfgs = [
            compose_cfg([widths, f"activation={a}", f"norm={n}", f"seed={s}", f"trainer.device={device}", *args.override])
            for a in ("sigmoid", "tanh", "relu") for n in ("none", "batchnorm") for s in (0, 1, 2)
        ]  # fmt: skip
        cfgs.sort(key=segment_order)
        data = load_splits(cfgs[0].data, device)
        members, solos = [], []
        for cfg in cfgs:
            members.append(Member(str(cfg.seed), cfg, *fresh_state(cfg, data, device), probe=None, figure_epochs=set()))
            solos.append(EngineRun(cfg, device))
        trainer = PackedTrainer(members, data, device)
        times: dict[str, list[float]] = {"pack": [], "solo": []}
        for epoch in range(1, args.epochs + 2):
            start = time.perf_counter()
            trainer._train_epoch(epoch)
            if device.type == "cuda":
                torch.cuda.synchronize()
            times["pack"].append(time.perf_counter() - start)
            times["solo"].append(sum(solo.train_steps() for solo in solos))
        steps = len(data.train) // cfgs[0].trainer.batch_size
        pack, solo = (1000 * statistics.median(times[k][1:]) / steps for k in ("pack", "solo"))
        print(f"| {name} | {trainer.kind} | {pack:.2f} | {solo:.2f} | {pack / solo:.2f} |", flush=True)


def positive(text: str) -> int:
    """An integer of at least 1 (argparse type)."""
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"must be an integer of at least 1, not {text!r}")
    return int(text)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mode", choices=("epoch", "sweep", "accuracy", "steps", "packed"), default="epoch")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--epochs", type=positive, default=3, help="timed epochs (epoch, steps: after one warm-up epoch)")
    parser.add_argument("--threads", type=positive, help="torch CPU threads for both loops (default: all cores)")
    parser.add_argument("--seeds", type=lambda text: [int(s) for s in text.split(",")], default=[0, 1, 2, 3, 4], help="accuracy mode")
    parser.add_argument("override", nargs="*", help="extra config overrides for the engine, e.g. trainer.num_threads=1")
    args = parser.parse_args()
    if "MNIST_ROOT" not in os.environ:
        sys.exit("set MNIST_ROOT to the folder that contains MNIST/raw/")
    device = resolve_device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or platform.machine()
    print(f"device: {device} ({name}), torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} cores\n")
    modes = {"epoch": epoch_mode, "sweep": sweep_mode, "accuracy": accuracy_mode, "steps": steps_mode, "packed": packed_mode}
    modes[args.mode](args, device)


if __name__ == "__main__":
    main()
