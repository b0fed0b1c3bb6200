"""The composed config: checks on its values (before any data is read or any run is tracked),
and where its relative paths start.

Group options (`activation=foo`) are checked by Hydra itself when it composes the config,
and option names by the factories that use them; this module checks the numbers.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

# conf/ at the repository root (the package is installed editable from the repository)
CONFIG_DIR = Path(__file__).resolve().parents[2] / "conf"

# trainer.precision: fp32, or bf16 autocast
PRECISIONS = ("fp32", "bf16")


class ConfigError(ValueError):
    """A config value is not allowed; the message names the key, the value and what is allowed."""


def launch_dir() -> Path:
    """The directory train.py was launched from (also inside a job that changed directory)."""
    return Path(HydraConfig.get().runtime.cwd) if HydraConfig.initialized() else Path.cwd()


def require(ok: bool, key: str, value: Any, allowed: str) -> None:
    """Raise ConfigError(`key=value: must be <allowed>`) unless `ok`."""
    if not ok:
        raise ConfigError(f"{key}={value!r}: must be {allowed}")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def validate_config(cfg: DictConfig) -> None:
    """Raise ConfigError for the first value in `cfg` that training cannot use."""
    p = cfg.dropout.p
    require(_is_number(p) and 0.0 <= p < 1.0, "dropout.p", p, "a probability in [0, 1)")

    widths = list(cfg.depth.widths)
    require(all(_is_int(w) and w > 0 for w in widths), "depth.widths", widths, "a list of positive integers")

    for key in ("max_epochs", "batch_size", "eval_batch_size"):
        value = cfg.trainer[key]
        require(_is_int(value) and value > 0, f"trainer.{key}", value, "a positive integer")
    threads = cfg.trainer.num_threads
    require(threads is None or (_is_int(threads) and threads > 0), "trainer.num_threads", threads, "null or a positive integer")
    bar = cfg.trainer.progress_bar
    require(bar in ("auto", True, False), "trainer.progress_bar", bar, "one of auto, true, false")
    for key in ("fast_step", "deterministic"):
        require(isinstance(cfg.trainer[key], bool), f"trainer.{key}", cfg.trainer[key], "true or false")
    precision = cfg.trainer.precision
    require(precision in PRECISIONS, "trainer.precision", precision, f"one of {', '.join(PRECISIONS)}")

    lr = cfg.optimizer.lr
    require(_is_number(lr) and lr > 0, "optimizer.lr", lr, "a positive number")
    wd = cfg.optimizer.weight_decay
    require(_is_number(wd) and wd >= 0, "optimizer.weight_decay", wd, "a non-negative number")

    limit = cfg.data.limit_train
    require(limit is None or (_is_int(limit) and limit > 0), "data.limit_train", limit, "null or a positive integer")
    require(_is_int(cfg.seed), "seed", cfg.seed, "an integer")

    for key in ("num_samples", "figure_every", "bins"):
        value = cfg.probe[key]
        require(_is_int(value) and value > 0, f"probe.{key}", value, "a positive integer")
    margin = cfg.probe.saturation_margin
    require(_is_number(margin) and 0 <= margin < 0.5, "probe.saturation_margin", margin, "a number in [0, 0.5)")


def lookup_option(registry: dict[str, Any], group: str, node: DictConfig) -> tuple[Any, dict[str, Any]]:
    """The registry entry named by `node.name` and the node's other keys as keyword arguments."""
    options = OmegaConf.to_container(node, resolve=True)
    assert isinstance(options, dict)
    name = options.pop("name")
    require(name in registry, f"{group}.name", name, f"one of {', '.join(registry)}")
    return registry[name], options
