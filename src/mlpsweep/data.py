"""Load an MNIST-format dataset once into normalised tensors on the training device.

torchvision parses the IDX files (and downloads them when asked); everything after that is
plain tensor work: a seeded train/validation split, flattening to 784 features in [0, 1], and
(by default) normalisation by the training images' mean and standard deviation.
"""

from __future__ import annotations

import math
import struct
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


class DataError(FileNotFoundError):
    """The IDX files are missing (and may not be downloaded) or cannot be read."""


IDX_FILES = {  # file name: (magic number, number of dimensions)
    "train-images-idx3-ubyte": (0x00000803, 3),
    "train-labels-idx1-ubyte": (0x00000801, 1),
    "t10k-images-idx3-ubyte": (0x00000803, 3),
    "t10k-labels-idx1-ubyte": (0x00000801, 1),
}


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


def raw_folder(name: str, root: str | Path) -> Path:
    return Path(root) / DATASETS[name].__name__ / "raw"


def _hint(name: str, root: str | Path) -> str:
    return (
        f"data.root={str(root)!r}: point MNIST_ROOT (or data.root) at the folder that contains "
        f"{DATASETS[name].__name__}/raw/"
    )


def _is_complete_idx(path: Path, magic: int, dims: int) -> bool:
    """The header's magic number is right and its sizes account for the whole file."""
    header_size = 4 * (dims + 1)
    size = path.stat().st_size
    if size < header_size:
        return False
    with path.open("rb") as file:
        values = struct.unpack(f">{dims + 1}I", file.read(header_size))
    return values[0] == magic and size == header_size + math.prod(values[1:])


def check_data_files(cfg: DictConfig) -> None:
    """Cheap checks of `cfg` (the `data` node) before training: the four IDX files are there
    (or may be downloaded), and each one's header agrees with its size."""
    folder = raw_folder(cfg.name, cfg.root)
    missing = [name for name in IDX_FILES if not (folder / name).is_file()]
    if missing:
        if cfg.download:
            return  # torchvision fetches them
        raise DataError(f"{_hint(cfg.name, cfg.root)}; missing in {folder.resolve()}: {', '.join(missing)}")
    for name, (magic, dims) in IDX_FILES.items():
        if not _is_complete_idx(folder / name, magic, dims):
            raise DataError(f"{_hint(cfg.name, cfg.root)}; {folder / name} is not a complete IDX file (corrupt or truncated)")


def read_idx(name: str, root: str | Path, train: bool, download: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Raw uint8 images [n, 28, 28] and int64 labels of one torchvision MNIST-format dataset."""
    try:
        dataset = DATASETS[name](root=str(root), train=train, download=download)
    except (RuntimeError, ValueError) as err:  # torchvision: "Dataset not found", a failed download, a bad file
        raise DataError(f"{_hint(name, root)}; reading {raw_folder(name, root).resolve()} failed: {err}") from err
    return dataset.data, dataset.targets.long()


def _flatten(images: torch.Tensor) -> torch.Tensor:
    return images.reshape(images.shape[0], -1).float().div_(255.0)


def load_splits(cfg: DictConfig, device: torch.device) -> DataSplits:
    """Train/validation/test splits of `cfg` (the `data` node), normalised and on `device`."""
    check_data_files(cfg)
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
