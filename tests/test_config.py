"""Every config option composes; bad values fail early with the key, the value and what is allowed."""

from __future__ import annotations

import pytest
import torch
from conftest import compose_config
from hydra.errors import MissingConfigException

from mlpsweep.config import CONFIG_DIR, ConfigError, validate_config
from mlpsweep.engine import resolve_device

GROUPS = ("activation", "norm", "dropout", "depth", "init", "optimizer", "scheduler", "data", "trainer", "tracking")
GROUP_OPTIONS = [
    (group, path.stem) for group in GROUPS for path in sorted((CONFIG_DIR / group).glob("*.yaml"))
]


def test_every_group_has_its_options() -> None:
    options = {group: {opt for g, opt in GROUP_OPTIONS if g == group} for group in GROUPS}
    assert options["activation"] == {"sigmoid", "tanh", "relu", "leaky_relu", "elu", "gelu", "silu"}
    assert options["norm"] == {"none", "batchnorm", "layernorm"}
    assert options["dropout"] == {"none", "lecture", "heavy"}
    assert options["depth"] == {"one", "two", "three", "four", "deep"}
    assert options["init"] == {"default", "xavier_uniform", "xavier_normal", "kaiming_uniform", "kaiming_normal", "orthogonal"}
    assert options["scheduler"] == {"none", "step", "cosine", "onecycle", "plateau"}
    assert options["optimizer"] == {"sgd", "sgd_momentum", "adam", "adamw"}
    assert options["data"] == {"mnist", "fashion_mnist", "kmnist"}


@pytest.mark.parametrize(("group", "option"), GROUP_OPTIONS, ids=[f"{g}={o}" for g, o in GROUP_OPTIONS])
def test_every_option_composes_and_validates(group: str, option: str) -> None:
    cfg = compose_config([f"{group}={option}"])
    validate_config(cfg)
    if "name" in cfg[group]:
        assert cfg[group].name == option or group == "optimizer"


def test_defaults_are_the_lectures_batchnorm_slides() -> None:
    cfg = compose_config()
    assert (cfg.activation.name, cfg.norm.name, cfg.dropout.p) == ("relu", "none", 0.0)
    assert list(cfg.depth.widths) == [1024, 300]
    assert (cfg.optimizer.name, cfg.optimizer.lr, cfg.optimizer.momentum) == ("sgd", 0.1, 0.0)
    assert (cfg.trainer.batch_size, cfg.trainer.max_epochs, cfg.trainer.device) == (32, 10, "auto")
    assert (cfg.data.name, cfg.data.val_size) == ("mnist", 6000)


def test_dropout_rate_and_widths_are_overridable_numerically() -> None:
    cfg = compose_config(["dropout=lecture", "dropout.p=0.35", "depth=three", "depth.widths=[64,32,16]"])
    assert cfg.dropout.p == 0.35
    assert list(cfg.depth.widths) == [64, 32, 16]


def test_data_root_comes_from_mnist_root(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MNIST_ROOT", "/somewhere/mnist")
    assert compose_config().data.root == "/somewhere/mnist"
    monkeypatch.delenv("MNIST_ROOT")
    cfg = compose_config()
    assert (cfg.data.root, cfg.data.download) == ("data", True)


def test_unknown_group_option_lists_the_options() -> None:
    with pytest.raises(MissingConfigException) as err:
        compose_config(["activation=foo"])
    message = str(err.value)
    assert "activation/foo" in message and "relu" in message and "sigmoid" in message


@pytest.mark.parametrize(
    ("override", "key"),
    [
        ("dropout.p=1.5", "dropout.p=1.5"),
        ("dropout.p=-0.1", "dropout.p=-0.1"),
        ("depth.widths=[1024,0]", "depth.widths=[1024, 0]"),
        ("depth.widths=[-5]", "depth.widths=[-5]"),
        ("trainer.batch_size=0", "trainer.batch_size=0"),
        ("trainer.max_epochs=-1", "trainer.max_epochs=-1"),
        ("optimizer.lr=0", "optimizer.lr=0"),
        ("data.limit_train=0", "data.limit_train=0"),
        ("trainer.precision=fp16", "trainer.precision='fp16'"),
        ("trainer.fast_step=maybe", "trainer.fast_step='maybe'"),
    ],
)
def test_bad_values_name_key_value_and_what_is_allowed(override: str, key: str) -> None:
    with pytest.raises(ConfigError, match="must be") as err:
        validate_config(compose_config([override]))
    assert str(err.value).startswith(key)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error on a machine without CUDA")
def test_cuda_requested_without_cuda_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match=r"trainer.device='cuda': CUDA is not available"):
        resolve_device("cuda")


def test_device_auto_and_bad_device() -> None:
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    assert resolve_device("cpu") == torch.device("cpu")
    with pytest.raises(ConfigError, match="trainer.device='tpu'"):
        resolve_device("tpu")
