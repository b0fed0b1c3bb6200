"""Time the mlpsweep engine against the classic DataLoader loop, side by side in one process.

    python benchmarks/bench_engine.py                    # per-epoch timing, both lecture models
    python benchmarks/bench_engine.py --mode sweep       # the 6-run activation x norm sweep
    python benchmarks/bench_engine.py --device cuda      # the same on a GPU

The classic loop is the lecture's: torchvision's MNIST with ToTensor() per image, a
DataLoader of batch 32 (shuffle, drop_last), `.item()` on the loss every step. Both sides train
the same architecture from the same initial weights with SGD lr 0.1 on the same 54000/6000 split.
An "epoch" is one training pass plus one validation pass. Needs MNIST under $MNIST_ROOT.
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
from mlpsweep.engine import build_optimizer, fit, resolve_device, seed_everything
from mlpsweep.model import build_model
from mlpsweep.steps import step_kind

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


def time_classic(cfg: DictConfig, device: torch.device, epochs: int) -> tuple[list[float], float]:
    seed_everything(cfg.seed)
    model = build_model(cfg, 784, 10).to(device)
    optimizer = torch.optim.SGD(model.parameters(), lr=cfg.optimizer.lr)
    train, val = classic_loaders(cfg.data.root, cfg.seed)
    times, val_acc = [], 0.0
    for _ in range(epochs):
        start = time.perf_counter()
        val_acc = classic_epoch(model, optimizer, train, val, device)
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return times, val_acc


# --- the engine ---------------------------------------------------------------------------------


def time_engine(cfg: DictConfig, device: torch.device, epochs: int) -> tuple[list[float], float, str]:
    """Seconds per epoch, the last validation accuracy, and which training step the engine used."""
    seed_everything(cfg.seed)
    data = load_splits(cfg.data, device)
    model = build_model(cfg, data.num_features, data.num_classes).to(device)
    optimizer = build_optimizer(cfg.optimizer, model.parameters())
    kind = step_kind(model, optimizer, cfg.trainer.fast_step, cfg.trainer.precision)
    cfg.trainer.max_epochs = epochs
    history = fit(model, optimizer, data, cfg.trainer, torch.Generator(device=device).manual_seed(cfg.seed))
    return [m.epoch_time_s for m in history], history[-1].val_acc, kind


def engine_variants(device: torch.device) -> dict[str, list[str]]:
    """The engine as it runs by default, with autograd only, and (on a GPU) with bf16 autocast."""
    variants = {"mlpsweep engine, autograd": ["trainer.fast_step=false"], "mlpsweep engine": []}
    if device.type == "cuda":
        variants["mlpsweep engine, bf16"] = ["trainer.precision=bf16"]
    return variants


def epoch_mode(args: argparse.Namespace, device: torch.device) -> None:
    print(f"| model | loop | step | s/epoch (median of {args.epochs}) | samples/s | val acc after {args.epochs + 1} epochs | speed-up |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for name, overrides in MODELS.items():
        base = overrides + [f"trainer.device={device}", "trainer.progress_bar=false", *args.override]
        times, val_acc = time_classic(compose_cfg(base), device, args.epochs + 1)
        classic_s = statistics.median(times[1:])  # the first epoch is the warm-up
        print(f"| {name} | classic DataLoader | autograd | {classic_s:.3f} | {54000 / classic_s:,.0f} | {val_acc:.4f} | 1.0x |")
        for loop, variant in engine_variants(device).items():
            times, val_acc, kind = time_engine(compose_cfg(base + variant), device, args.epochs + 1)
            median = statistics.median(times[1:])
            print(f"| {name} | {loop} | {kind} | {median:.3f} | {54000 / median:,.0f} | {val_acc:.4f} | {classic_s / median:.1f}x |", flush=True)


def sweep_mode(args: argparse.Namespace, device: torch.device) -> None:
    activations, norms = ("sigmoid", "tanh", "relu"), ("none", "batchnorm")
    start = time.perf_counter()
    for activation in activations:
        for norm in norms:
            cfg = compose_cfg([f"activation={activation}", f"norm={norm}", f"trainer.device={device}", *args.override])
            time_classic(cfg, device, args.epochs)
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mode", choices=("epoch", "sweep"), default="epoch")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--epochs", type=int, default=3, help="timed epochs (epoch mode: after one warm-up epoch)")
    parser.add_argument("override", nargs="*", help="extra config overrides for the engine, e.g. trainer.num_threads=1")
    args = parser.parse_args()
    if "MNIST_ROOT" not in os.environ:
        sys.exit("set MNIST_ROOT to the folder that contains MNIST/raw/")
    device = resolve_device(args.device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or platform.machine()
    print(f"device: {device} ({name}), torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} cores\n")
    (epoch_mode if args.mode == "epoch" else sweep_mode)(args, device)


if __name__ == "__main__":
    main()
