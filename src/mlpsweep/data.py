"""Load an MNIST-format dataset once into normalised tensors on the training device.

torchvision parses the IDX files (and downloads them when asked); everything after that is
plain tensor work: a seeded train/validation split, flattening to 784 features in [0, 1], and
(by default) normalisation by the training images' mean and standard deviation.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from omegaconf import DictConfig
from torchvision import datasets

from mlpsweep.config import ConfigError

DATASETS: dict[str, type[datasets.MNIST]] = {
    "mnist": datasets.MNIST,
    "fashion_mnist": datasets.FashionMNIST,
    "kmnist": datasets.KMNIST,
}
NUM_CLASSES = 10


class DataNotFoundError(FileNotFoundError):
    """The IDX files are not where the config says and may not be downloaded."""


@dataclass(frozen=True)
class Split:
    """Features (float32, [n, 784], normalised) and integer labels of one split."""

    x: torch.Tensor
    y: torch.Tensor

    def __len__(self) -> int:
        return self.y.shape[0]


@dataclass(frozen=True)
class DataSplits:
    train: Split
    val: Split
    test: Split
    mean: float  # what was subtracted from the [0, 1] pixels (0 without normalisation)
    std: float  # what they were then divided by (1 without normalisation)

    @property
    def num_features(self) -> int:
        return self.train.x.shape[1]

    @property
    def num_classes(self) -> int:
        return NUM_CLASSES


def read_idx(name: str, root: str | Path, train: bool, download: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Raw uint8 images [n, 28, 28] and int64 labels of one torchvision MNIST-format dataset."""
    dataset_cls = DATASETS[name]
    root = Path(root)
    raw_folder = root / dataset_cls.__name__ / "raw"
    try:
        dataset = dataset_cls(root=str(root), train=train, download=download)
    except RuntimeError as err:  # torchvision: "Dataset not found" or a failed download
        hint = (
            f"data.root={str(root)!r}: no {name} IDX files in {raw_folder.resolve()} ({err}). "
            f"Point MNIST_ROOT (or data.root) at the folder that contains {dataset_cls.__name__}/raw/"
        )
        hint += "." if download else ", or allow data.download=true on a machine with internet."
        raise DataNotFoundError(hint) from err
    return dataset.data, dataset.targets.long()


def _flatten(images: torch.Tensor) -> torch.Tensor:
    return images.reshape(images.shape[0], -1).float().div_(255.0)


def load_splits(cfg: DictConfig, device: torch.device) -> DataSplits:
    """Train/validation/test splits of `cfg` (the `data` node), normalised and on `device`."""
    train_images, train_labels = read_idx(cfg.name, cfg.root, train=True, download=cfg.download)
    test_images, test_labels = read_idx(cfg.name, cfg.root, train=False, download=cfg.download)

    n = train_labels.shape[0]
    if not 0 < cfg.val_size < n:
        raise ConfigError(f"data.val_size={cfg.val_size}: must be between 1 and {n - 1} (the dataset has {n} training images)")
    order = torch.randperm(n, generator=torch.Generator().manual_seed(cfg.split_seed))
    val_idx, train_idx = order[: cfg.val_size], order[cfg.val_size :]
    if cfg.limit_train is not None:
        train_idx = train_idx[: cfg.limit_train]

    train_x = _flatten(train_images[train_idx])
    mean, std = (train_x.mean().item(), train_x.std().item()) if cfg.normalize else (0.0, 1.0)

    def to_split(x: torch.Tensor, y: torch.Tensor) -> Split:
        return Split(x=x.sub_(mean).div_(std).to(device), y=y.to(device))

    return DataSplits(
        train=to_split(train_x, train_labels[train_idx]),
        val=to_split(_flatten(train_images[val_idx]), train_labels[val_idx]),
        test=to_split(_flatten(test_images), test_labels),
        mean=mean,
        std=std,
    )
