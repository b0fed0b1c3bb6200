"""The data module parses IDX files, splits them (seeded, disjoint) and normalises them."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import TINY_TEST, TINY_TRAIN, write_tiny_mnist
from omegaconf import OmegaConf

from mlpsweep.config import ConfigError
from mlpsweep.data import DataError, DataSplits, load_splits, read_idx


def data_cfg(root: Path, **changes: object) -> OmegaConf:
    base = {"name": "mnist", "root": str(root), "download": False, "normalize": True, "val_size": 100, "split_seed": 0, "limit_train": None}
    return OmegaConf.create({**base, **changes})


def source_indices(x: torch.Tensor, data: DataSplits) -> list[int]:
    """Recover each image's index from pixels (0, 0) and (0, 1) (see conftest.tiny_images)."""
    pixels = (x[:, :2] * data.std + data.mean).mul(255).round().long()
    return (pixels[:, 0] * 256 + pixels[:, 1]).tolist()


def test_read_idx_parses_the_files(tiny_mnist_root: Path) -> None:
    images, labels = read_idx("mnist", tiny_mnist_root, train=True)
    assert images.shape == (TINY_TRAIN, 28, 28) and images.dtype == torch.uint8
    assert labels.shape == (TINY_TRAIN,) and labels.dtype == torch.int64
    # the class bar of the first image sits at row 4 + 2 * label
    assert images[0, 4 + 2 * labels[0]].float().mean() > 200


def test_split_sizes_disjoint_and_seeded(tiny_mnist_root: Path) -> None:
    data = load_splits(data_cfg(tiny_mnist_root), torch.device("cpu"))
    assert (len(data.train), len(data.val), len(data.test)) == (TINY_TRAIN - 100, 100, TINY_TEST)
    assert data.num_features == 784 and data.num_classes == 10
    train_ids, val_ids = source_indices(data.train.x, data), source_indices(data.val.x, data)
    assert set(train_ids).isdisjoint(val_ids)
    assert set(train_ids) | set(val_ids) == set(range(TINY_TRAIN))

    again = load_splits(data_cfg(tiny_mnist_root), torch.device("cpu"))
    assert torch.equal(again.val.x, data.val.x) and torch.equal(again.train.y, data.train.y)
    other = load_splits(data_cfg(tiny_mnist_root, split_seed=1), torch.device("cpu"))
    assert source_indices(other.val.x, other) != val_ids


def test_training_images_are_normalised(tiny_mnist_root: Path) -> None:
    data = load_splits(data_cfg(tiny_mnist_root), torch.device("cpu"))
    assert data.train.x.dtype == torch.float32
    assert abs(data.train.x.mean().item()) < 1e-4
    assert abs(data.train.x.std().item() - 1) < 1e-3


def test_without_normalisation_pixels_stay_in_0_1(tiny_mnist_root: Path) -> None:
    data = load_splits(data_cfg(tiny_mnist_root, normalize=False), torch.device("cpu"))
    assert (data.mean, data.std) == (0.0, 1.0)
    assert data.train.x.min() == 0 and data.train.x.max() == 1
    normalised = load_splits(data_cfg(tiny_mnist_root), torch.device("cpu"))
    assert source_indices(data.val.x, data) == source_indices(normalised.val.x, normalised)


def test_limit_train_keeps_the_first_images_of_the_split(tiny_mnist_root: Path) -> None:
    full = load_splits(data_cfg(tiny_mnist_root), torch.device("cpu"))
    limited = load_splits(data_cfg(tiny_mnist_root, limit_train=50), torch.device("cpu"))
    assert len(limited.train) == 50 and len(limited.val) == 100
    assert source_indices(limited.train.x, limited) == source_indices(full.train.x, full)[:50]


def test_other_mnist_format_datasets_read_their_own_folder(tmp_path: Path) -> None:
    write_tiny_mnist(tmp_path, folder="FashionMNIST")
    data = load_splits(data_cfg(tmp_path, name="fashion_mnist"), torch.device("cpu"))
    assert len(data.test) == TINY_TEST


def test_missing_data_says_where_it_looked_and_how_to_fix_it(tmp_path: Path) -> None:
    with pytest.raises(DataError) as err:
        load_splits(data_cfg(tmp_path / "nowhere"), torch.device("cpu"))
    message = str(err.value)
    assert "data.root=" in message and str(tmp_path / "nowhere" / "MNIST" / "raw") in message
    assert "MNIST_ROOT" in message


def test_val_size_beyond_the_data_is_a_config_error(tiny_mnist_root: Path) -> None:
    with pytest.raises(ConfigError, match=f"data.val_size={TINY_TRAIN}: must be between 1 and {TINY_TRAIN - 1}"):
        load_splits(data_cfg(tiny_mnist_root, val_size=TINY_TRAIN), torch.device("cpu"))


def test_real_mnist(real_mnist_root: Path) -> None:
    data = load_splits(data_cfg(real_mnist_root, val_size=6000), torch.device("cpu"))
    assert (len(data.train), len(data.val), len(data.test)) == (54000, 6000, 10000)
    assert data.test.y[:10].tolist() == [7, 2, 1, 0, 4, 1, 4, 9, 5, 9]
    assert abs(data.mean - 0.1307) < 0.002 and abs(data.std - 0.3081) < 0.002
