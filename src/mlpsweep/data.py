"""Load an MNIST-format dataset once into normalised tensors on the training device.

The IDX files are checked (headers against sizes, labels) and parsed here; torchvision only
downloads missing ones when asked, into a temporary folder first. Everything after that is plain tensor work: a seeded train/validation split, flattening to
784 features in [0, 1], and (by default) normalisation by the training images' mean and standard
deviation.
"""

from __future__ import annotations

import hashlib
import math
import shutil
import socket
import struct
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from mlpsweep.config import require

# data.name -> the torchvision dataset that downloads it, by name (also its folder under data.root)
DATASETS: dict[str, str] = {
    "mnist": "MNIST",
    "fashion_mnist": "FashionMNIST",
    "kmnist": "KMNIST",
}
NUM_CLASSES = 10
# seconds a download waits for the network at a time (to connect, or for the next bytes): a machine
# without internet fails at once where names do not resolve, and after this long where packets vanish
DOWNLOAD_TIMEOUT_S = 10


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
    return Path(root) / DATASETS[name] / "raw"


def _file_stats(name: str, root: str | Path) -> tuple[tuple[str, int, int, int], ...]:
    """Name, inode, size and modification time of each IDX file: what says a file was changed."""
    stats = [(file, (raw_folder(name, root) / file).stat()) for file in IDX_FILES]
    return tuple((file, st.st_ino, st.st_size, st.st_mtime_ns) for file, st in stats)


_digests: dict[tuple, str] = {}  # (name, root, file stats) -> digest, for the jobs of one process


def dataset_digest(name: str, root: str | Path) -> str:
    """A short sha256 hex of the contents of the dataset's four IDX files (each preceded by its name
    and size); computed once per process for files of unchanged size and modification time."""
    key = (name, str(root), _file_stats(name, root))
    if key not in _digests:
        _digests[key] = _digest(name, root)
    return _digests[key]


def _digest(name: str, root: str | Path) -> str:
    digest = hashlib.sha256()
    for file_name in IDX_FILES:
        path = raw_folder(name, root) / file_name
        digest.update(f"{file_name} {path.stat().st_size}\n".encode())
        with path.open("rb") as file:
            while chunk := file.read(1 << 20):
                digest.update(chunk)
    return digest.hexdigest()[:16]


def _hint(name: str, root: str | Path) -> str:
    return f"data.root={str(root)!r}: point MNIST_ROOT (or data.root) at the folder that contains {DATASETS[name]}/raw/"


def _is_complete_idx(path: Path, magic: int, dims: int) -> bool:
    """The header's magic number is right and its sizes account for the whole file."""
    header_size = 4 * (dims + 1)
    size = path.stat().st_size
    if size < header_size:
        return False
    with path.open("rb") as file:
        values = struct.unpack(f">{dims + 1}I", file.read(header_size))
    return values[0] == magic and size == header_size + math.prod(values[1:])


def _count(path: Path) -> int:
    """The number of items (images or labels) an IDX file's header declares."""
    with path.open("rb") as file:
        file.seek(4)  # after the magic number
        return struct.unpack(">I", file.read(4))[0]


def _label_problem(images: Path, labels: Path) -> str | None:
    """What is wrong with a labels file (read whole: 60 kB at most) beside its images file (its header only)."""
    values, num_images = labels.read_bytes()[8:], _count(images)
    if len(values) != num_images:
        return f"{labels} has {len(values)} labels for the {num_images} images of {images.name}"
    if values and max(values) >= NUM_CLASSES:
        index = next(i for i, value in enumerate(values) if value >= NUM_CLASSES)
        return f"{labels} has label {values[index]} at index {index}: labels must be in [0, {NUM_CLASSES})"
    return None


def download(name: str, root: str | Path, files: list[str]) -> None:
    """Download the dataset `name` into a temporary folder and, once all of it arrived, move
    `files` (the missing IDX files) into its raw folder under `root`. On failure nothing is left
    behind, under `root` or elsewhere (torchvision alone creates its folders first)."""
    staging = Path(tempfile.mkdtemp(prefix="mlpsweep-download-"))
    timeout = socket.getdefaulttimeout()
    socket.setdefaulttimeout(DOWNLOAD_TIMEOUT_S)  # torchvision's urlopen takes no timeout of its own
    try:
        from torchvision import datasets  # here, not at the top: it costs every process seconds (torch._dynamo)

        getattr(datasets, DATASETS[name])(root=str(staging), train=False, download=True)
    except Exception as err:  # whatever failed (network, server, checksum, disk) is one line
        cause = " ".join(f"{type(err).__name__}: {err}".split())
        failed = f"downloading {DATASETS[name]} failed, nothing was written"
        raise DataError(f"{_hint(name, root)}; {failed}: {cause}") from err
    else:
        folder = raw_folder(name, root)
        folder.mkdir(parents=True, exist_ok=True)
        for file in files:
            _install(raw_folder(name, staging) / file, folder / file)
    finally:
        socket.setdefaulttimeout(timeout)
        shutil.rmtree(staging, ignore_errors=True)


def _install(source: Path, target: Path) -> None:
    """Copy `source` to `target`, which is then either complete or absent."""
    partial = target.with_name(f".{target.name}.partial")
    try:
        shutil.copyfile(source, partial)
        partial.replace(target)
    finally:
        partial.unlink(missing_ok=True)


def check_data_files(cfg: DictConfig) -> int:
    """Checks of `cfg` (the `data` node) before training: the four IDX files are there (downloaded
    first when missing and `download` is true), each one's header agrees with its size, there is
    one label in [0, 10) per image, `val_size` leaves images to train on and `limit_train` asks for
    no more than those. Returns how many images the training split will hold."""
    folder = raw_folder(cfg.name, cfg.root)
    missing = [name for name in IDX_FILES if not (folder / name).is_file()]
    if missing and not cfg.download:
        raise DataError(f"{_hint(cfg.name, cfg.root)}; missing in {folder.resolve()}: {', '.join(missing)}")
    if missing:
        download(cfg.name, cfg.root, missing)
    for name, (magic, dims) in IDX_FILES.items():
        if not _is_complete_idx(folder / name, magic, dims):
            raise DataError(
                f"{_hint(cfg.name, cfg.root)}; {folder / name} is not a complete IDX file (corrupt or truncated)"
            )
    for prefix in ("train", "t10k"):
        if found := _label_problem(folder / f"{prefix}-images-idx3-ubyte", folder / f"{prefix}-labels-idx1-ubyte"):
            raise DataError(f"{_hint(cfg.name, cfg.root)}; {found}")
    n = _count(folder / "train-labels-idx1-ubyte")
    allowed = f"between 1 and {n - 1} (the dataset has {n} training images)"
    require(0 < cfg.val_size < n, "data.val_size", cfg.val_size, allowed)
    left = n - cfg.val_size
    allowed = f"null or at most {left} (the training images the validation split leaves)"
    require(cfg.limit_train is None or cfg.limit_train <= left, "data.limit_train", cfg.limit_train, allowed)
    return min(left, cfg.limit_train or n)


def read_idx(name: str, root: str | Path, train: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Raw uint8 images [n, rows, cols] and int64 labels of the training (or test) part of an
    MNIST-format dataset, parsed from its IDX files (which `check_data_files` has checked)."""
    folder, prefix = raw_folder(name, root), "train" if train else "t10k"
    image_bytes = (folder / f"{prefix}-images-idx3-ubyte").read_bytes()
    n, rows, cols = struct.unpack(">3I", image_bytes[4:16])
    images = np.frombuffer(image_bytes, dtype=np.uint8, offset=16).reshape(n, rows, cols)
    labels = np.frombuffer((folder / f"{prefix}-labels-idx1-ubyte").read_bytes(), dtype=np.uint8, offset=8)
    return torch.from_numpy(images.copy()), torch.from_numpy(labels.astype(np.int64))


def _flatten(images: torch.Tensor) -> torch.Tensor:
    return images.reshape(images.shape[0], -1).float().div_(255.0)


# the splits last loaded, by what they were loaded from: jobs run one after another in one process
# (the basic and packed launchers) share them
_last_loaded: tuple[tuple, DataSplits] | None = None


def load_splits(cfg: DictConfig, device: torch.device) -> DataSplits:
    """Train/validation/test splits of `cfg` (the `data` node), normalised and on `device`; the
    same splits as the last call's when the config, the device and the IDX files (their sizes and
    modification times) are the same as then. Nobody writes into them."""
    global _last_loaded
    check_data_files(cfg)
    key = (OmegaConf.to_yaml(cfg, resolve=True), str(device), _file_stats(cfg.name, cfg.root))
    if _last_loaded is None or _last_loaded[0] != key:
        _last_loaded = None  # free the old splits before loading new ones
        _last_loaded = (key, _read_splits(cfg, device))
    return _last_loaded[1]


def _read_splits(cfg: DictConfig, device: torch.device) -> DataSplits:
    train_images, train_labels = read_idx(cfg.name, cfg.root, train=True)
    test_images, test_labels = read_idx(cfg.name, cfg.root, train=False)

    n = train_labels.shape[0]
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
