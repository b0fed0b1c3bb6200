"""The composed config: checks on its values and on the command line's group options (before any
data is read or any run is tracked), and where its relative paths start.

Every key a user can set has a Rule in RULES (type and range). Option names are checked against
the registries of the factories that use them (model.ACTIVATIONS, model.NORMS, engine.OPTIMIZERS,
data.DATASETS), and the other keys of an activation, norm or optimizer node against the keyword
arguments of the class it names. `check_group_overrides` checks `group=option` overrides against
the option files in conf/ before Hydra composes anything, and `check_composition` the rest of the
command line by composing the config as Hydra will (keys that do not exist, values of the wrong
type for Hydra's own settings), each problem in one line instead of Hydra's report.
"""

from __future__ import annotations

import difflib
import inspect
import math
import re
from collections.abc import Callable
from dataclasses import dataclass, replace
from enum import Enum
from pathlib import Path
from typing import Any

from hydra._internal.config_loader_impl import ConfigLoaderImpl
from hydra._internal.utils import create_config_search_path
from hydra.core.hydra_config import HydraConfig
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import ChoiceSweep, Glob, IntervalSweep, Override, RangeSweep
from hydra.errors import HydraException, OverrideParseException
from hydra.types import RunMode
from hydra.utils import get_class
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigAttributeError, ConfigKeyError, OmegaConfBaseException

# conf/ at the repository root (the package is installed editable from the repository)
CONFIG_DIR = Path(__file__).resolve().parents[2] / "conf"
CONFIG_NAME = "train"  # conf/train.yaml, the primary config

# trainer.precision: fp32, or bf16 autocast
PRECISIONS = ("fp32", "bf16")
# the validation metrics a plateau schedule or early stopping can watch, and which way is better
MONITORS = {"val_loss": "min", "val_acc": "max"}
# init.bias: zeros, or PyTorch's default uniform
BIAS_INITS = ("zeros", "default")


class ConfigError(ValueError):
    """A config value is not allowed; the message names the key, the value and what is allowed
    (one line per problem)."""


def launch_dir() -> Path:
    """The directory train.py was launched from (also inside a job that changed directory)."""
    return Path(HydraConfig.get().runtime.cwd) if HydraConfig.initialized() else Path.cwd()


def problem(key: str, value: Any, allowed: str) -> str:
    """The line that reports a bad value: `key=value: must be <allowed>`."""
    return f"{key}={value!r}: must be {allowed}"


def require(ok: bool, key: str, value: Any, allowed: str) -> None:
    """Raise ConfigError(`key=value: must be <allowed>`) unless `ok`."""
    if not ok:
        raise ConfigError(problem(key, value, allowed))


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    """A finite int or float (not a bool)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


# --- the values of the composed config ------------------------------------------------------------


@dataclass(frozen=True)
class Rule:
    """What the value of one config key must be: `ok(value)`, which `allowed` says in words."""

    ok: Callable[[Any], bool]
    allowed: str
    optional: bool = False  # only some options of the key's group have it (e.g. optimizer.betas)


def optional(rule: Rule) -> Rule:
    return replace(rule, optional=True)


BOOL = Rule(lambda v: isinstance(v, bool), "true or false")
NAME = Rule(lambda v: isinstance(v, str) and v != "", "a non-empty string")
NAME_OR_NULL = Rule(lambda v: v is None or (isinstance(v, str) and v != ""), "null or a non-empty string")
POSITIVE_INT = Rule(lambda v: _is_int(v) and v > 0, "a positive integer")
POSITIVE_INT_OR_NULL = Rule(lambda v: v is None or (_is_int(v) and v > 0), "null or a positive integer")
NON_NEGATIVE_INT = Rule(lambda v: _is_int(v) and v >= 0, "a non-negative integer")
POSITIVE = Rule(lambda v: _is_number(v) and v > 0, "a positive number")
NON_NEGATIVE = Rule(lambda v: _is_number(v) and v >= 0, "a non-negative number")
FRACTION = Rule(lambda v: _is_number(v) and 0 <= v < 1, "a number in [0, 1)")
UNIT_INTERVAL_OPEN = Rule(lambda v: _is_number(v) and 0 < v < 1, "a number in (0, 1)")
SEED = Rule(lambda v: _is_int(v) and 0 <= v < 2**32, "an integer in [0, 2**32)")  # NumPy's seeds are 32-bit

RULES: dict[str, Rule] = {
    "activation.negative_slope": optional(NON_NEGATIVE),
    "activation.alpha": optional(POSITIVE),
    "norm.eps": optional(POSITIVE),
    "norm.momentum": Rule(
        lambda v: v is None or (_is_number(v) and 0 <= v <= 1), "null or a number in [0, 1]", optional=True
    ),
    "dropout.name": NAME,
    "dropout.p": replace(FRACTION, allowed="a probability in [0, 1)"),
    "depth.name": NAME,
    "depth.widths": Rule(
        lambda v: isinstance(v, list) and len(v) > 0 and all(_is_int(w) and w > 0 for w in v),
        "a list of positive integers, at least one",
    ),
    "optimizer.lr": POSITIVE,
    "optimizer.weight_decay": NON_NEGATIVE,
    "optimizer.momentum": optional(FRACTION),
    "optimizer.nesterov": optional(BOOL),
    "optimizer.betas": Rule(
        lambda v: isinstance(v, list) and len(v) == 2 and all(FRACTION.ok(b) for b in v),
        "two numbers in [0, 1)",
        optional=True,
    ),
    "scheduler.step_size": optional(POSITIVE_INT),
    "scheduler.gamma": optional(POSITIVE),
    "scheduler.min_lr": optional(NON_NEGATIVE),
    "scheduler.warmup_epochs": optional(NON_NEGATIVE_INT),
    "scheduler.warmup_start_factor": optional(Rule(lambda v: _is_number(v) and 0 < v <= 1, "a number in (0, 1]")),
    "scheduler.max_lr": optional(POSITIVE),
    "scheduler.pct_start": optional(UNIT_INTERVAL_OPEN),
    "scheduler.div_factor": optional(POSITIVE),
    "scheduler.final_div_factor": optional(POSITIVE),
    "scheduler.anneal_strategy": optional(Rule(lambda v: v in ("cos", "linear"), "one of cos, linear")),
    "scheduler.monitor": optional(Rule(lambda v: v in MONITORS, f"one of {', '.join(MONITORS)}")),
    "scheduler.factor": optional(UNIT_INTERVAL_OPEN),
    "scheduler.patience": optional(NON_NEGATIVE_INT),
    "scheduler.threshold": optional(NON_NEGATIVE),
    "data.root": NAME,
    "data.download": BOOL,
    "data.normalize": BOOL,
    "data.val_size": POSITIVE_INT,
    "data.split_seed": SEED,
    "data.limit_train": POSITIVE_INT_OR_NULL,
    "trainer.max_epochs": POSITIVE_INT,
    "trainer.batch_size": POSITIVE_INT,
    "trainer.eval_batch_size": POSITIVE_INT,
    "trainer.device": Rule(
        lambda v: isinstance(v, str) and re.fullmatch(r"auto|cpu|cuda(:\d+)?", v) is not None,
        "one of auto, cpu, cuda, cuda:N",
    ),
    "trainer.progress_bar": Rule(lambda v: v == "auto" or isinstance(v, bool), "one of auto, true, false"),
    "trainer.num_threads": POSITIVE_INT_OR_NULL,
    "trainer.checkpoint_dir": NAME,
    "trainer.fast_step": BOOL,
    "trainer.precision": Rule(lambda v: v in PRECISIONS, f"one of {', '.join(PRECISIONS)}"),
    "trainer.deterministic": BOOL,
    "trainer.early_stopping.monitor": Rule(lambda v: v in MONITORS, f"one of {', '.join(MONITORS)}"),
    "trainer.early_stopping.patience": replace(POSITIVE_INT_OR_NULL, allowed="null (off) or a positive integer"),
    "trainer.early_stopping.min_delta": NON_NEGATIVE,
    "trainer.early_stopping.restore_best": BOOL,
    "tracking.uri": Rule(lambda v: v is None or isinstance(v, str), "null or a string"),
    "tracking.experiment": NAME,
    "tracking.sweep_name": NAME_OR_NULL,
    "tracking.log_model": BOOL,
    "tracking.system_metrics": BOOL,
    "tracking.http_retries": NON_NEGATIVE_INT,
    "tracking.http_timeout_s": POSITIVE_INT,  # MLflow reads MLFLOW_HTTP_REQUEST_TIMEOUT as an integer
    "tracking.sqlite_busy_timeout_s": POSITIVE,
    "init.bias": Rule(lambda v: v in BIAS_INITS, f"one of {', '.join(BIAS_INITS)}"),
    "model.bias": BOOL,
    "seed": SEED,
    "resume": BOOL,
    "probe.enabled": BOOL,
    "probe.num_samples": POSITIVE_INT,
    "probe.figure_every": POSITIVE_INT,
    "probe.saturation_margin": Rule(lambda v: _is_number(v) and 0 <= v < 0.5, "a number in [0, 0.5)"),
    "probe.bins": POSITIVE_INT,
}

_MISSING = object()


def _get(values: dict[str, Any], key: str) -> Any:
    """The value at a dotted key of a plain config, or _MISSING."""
    node: Any = values
    for part in key.split("."):
        if not isinstance(node, dict) or part not in node:
            return _MISSING
        node = node[part]
    return node


def _named_options() -> dict[str, tuple[dict[str, Any], bool]]:
    """For each group whose `name` picks an entry of a factory's registry: the registry, and
    whether the node's other keys are that entry's keyword arguments (as `lookup_option` passes them)."""
    from mlpsweep.data import DATASETS  # imported here: these modules import this one
    from mlpsweep.engine import OPTIMIZERS
    from mlpsweep.model import ACTIVATIONS, INITS, NORMS
    from mlpsweep.schedulers import SCHEDULERS

    return {
        "activation": (ACTIVATIONS, True),
        "init": (INITS, False),
        "scheduler": (SCHEDULERS, False),
        "norm": (NORMS, True),
        "optimizer": (OPTIMIZERS, True),
        "data": (DATASETS, False),
    }


def _option_problems(group: str, registry: dict[str, Any], takes_arguments: bool, node: Any) -> list[str]:
    """The group's `name` is in the registry, and its other keys are arguments of the class it names."""
    name = node.get("name", _MISSING) if isinstance(node, dict) else _MISSING
    names = f"one of {', '.join(registry)}"
    if name is _MISSING:
        return [f"{group}.name is missing: it must be {names}"]
    if not (isinstance(name, str) and name in registry):
        return [problem(f"{group}.name", name, names)]
    cls = registry[name]
    if not takes_arguments or cls is None:
        return []
    arguments = [p.name for p in inspect.signature(cls).parameters.values() if p.default is not p.empty]
    takes = f"{cls.__name__} takes only {', '.join(arguments)}" if arguments else f"{cls.__name__} takes no arguments"
    extra = {key: value for key, value in node.items() if key != "name" and key not in arguments}
    return [problem(f"{group}.{key}", value, f"left out: {takes}") for key, value in extra.items()]


def config_problems(cfg: DictConfig) -> list[str]:
    """One line per value in `cfg` that training cannot use (none: every value is fine)."""
    values = OmegaConf.to_container(cfg, resolve=True)
    assert isinstance(values, dict)
    found = []
    for key, rule in RULES.items():
        value = _get(values, key)
        if value is _MISSING:
            if not rule.optional:
                found.append(f"{key} is missing: it must be {rule.allowed}")
        elif not rule.ok(value):
            found.append(problem(key, value, rule.allowed))
    for group, (registry, takes_arguments) in _named_options().items():
        found += _option_problems(group, registry, takes_arguments, _get(values, group))
    momentum = _get(values, "optimizer.momentum")
    if _get(values, "optimizer.nesterov") is True and not (_is_number(momentum) and momentum > 0):
        allowed = "false unless optimizer.momentum > 0 (Nesterov needs momentum)"
        found.append(problem("optimizer.nesterov", True, allowed))
    warmup, max_epochs = _get(values, "scheduler.warmup_epochs"), _get(values, "trainer.max_epochs")
    if _is_int(warmup) and _is_int(max_epochs) and warmup >= max_epochs > 0:
        found.append(problem("scheduler.warmup_epochs", warmup, f"fewer than trainer.max_epochs ({max_epochs})"))
    return found


def validate_config(cfg: DictConfig) -> None:
    """Raise ConfigError, one line per problem, unless training can use every value in `cfg`."""
    found = config_problems(cfg)
    if found:
        raise ConfigError("\n".join(found))


def lookup_option(registry: dict[str, Any], group: str, node: DictConfig) -> tuple[Any, dict[str, Any]]:
    """The registry entry named by `node.name` and the node's other keys as keyword arguments."""
    options = OmegaConf.to_container(node, resolve=True)
    assert isinstance(options, dict)
    name = options.pop("name")
    require(name in registry, f"{group}.name", name, f"one of {', '.join(registry)}")
    return registry[name], options


# --- group options on the command line ------------------------------------------------------------


@dataclass(frozen=True)
class Group:
    """A folder of conf/ as Hydra sees it: a config group and its options."""

    options: list[str]  # its yaml files (subfolders too) as Hydra names them, e.g. lecture/all
    number_keys: list[str]  # keys that hold a number in every one of its options (dropout: p)
    nullable: bool  # may be left out: train.yaml defaults it to null, or does not list it

    @property
    def listed(self) -> str:
        """The options to offer, without private ones (_base)."""
        return ", ".join(o for o in self.options if not o.rpartition("/")[2].startswith("_"))


def config_groups() -> dict[str, Group]:
    """Every config group in CONFIG_DIR but Hydra's own (hydra/...), by name (e.g. experiment/lecture)."""
    defaults = [entry for entry in OmegaConf.load(CONFIG_DIR / "train.yaml").defaults if isinstance(entry, DictConfig)]
    required = {group for entry in defaults for group, option in entry.items() if option is not None}
    groups = {}
    for folder in sorted(path for path in CONFIG_DIR.rglob("*") if path.is_dir()):
        name = folder.relative_to(CONFIG_DIR).as_posix()
        if name.split("/")[0] == "hydra":
            continue
        files = sorted(folder.rglob("*.yaml"))
        nodes = [OmegaConf.load(file) for file in files]
        number_keys = [key for key in nodes[0] if all(_is_number(node.get(key)) for node in nodes)] if nodes else []
        options = [file.relative_to(folder).with_suffix("").as_posix() for file in files]
        groups[name] = Group(options, number_keys, nullable=name not in required)
    return groups


def _override_values(override: Override) -> list[tuple[Any, str]]:
    """The values an override gives its key, each with how it is written; none for a glob (which
    Hydra matches against the options itself)."""
    value = override.value()
    if isinstance(value, ChoiceSweep):
        return [(item, _as_written(item)) for item in value.list]
    if isinstance(value, RangeSweep):
        return [(item, _as_written(item)) for item in override.sweep_iterator()]
    if isinstance(value, Glob):
        return []
    return [(value, override.get_value_string())]


def _as_written(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    return str(value)


def check_group_overrides(overrides: list[str]) -> list[str]:
    """One line per value of a config group override that is not an option of the group: in
    `group=option`, a sweep (`a,b`, `choice(a,b)`, `range(...)`), `+group=...`, `group=null` or
    `~group` (both only where the group may be left out). Overrides of Hydra's own groups
    (hydra/...), of keys (dropout.p=0.2) and overrides that do not parse are left to Hydra."""
    groups = config_groups()
    parser = OverridesParser.create()
    found = []
    for text in overrides:
        try:
            override = parser.parse_override(text)
        except HydraException:  # Hydra reports it
            continue
        name = override.key_or_group
        group = groups.get(name)
        if group is None:
            continue
        if override.is_delete():
            if not group.nullable:
                found.append(f"{text}: {name} cannot be left out; it must be one of {group.listed}")
            continue
        for value, written in _override_values(override):
            if (isinstance(value, str) and value in group.options) or (value is None and group.nullable):
                continue
            is_number = isinstance(value, (int, float, IntervalSweep)) and not isinstance(value, bool)
            if is_number and group.number_keys:
                uses = " or ".join(f"{name}.{key}={written}" for key in group.number_keys)
                named = f"{name} is a group of named options ({group.listed})"
                found.append(f"{name}={written}: {named}; to set a number, use {uses}")
            else:
                found.append(f"{name}={written}: must be one of {group.listed}")
    return found


def check_composition(overrides: list[str], multirun: bool) -> list[str]:
    """The problem, in one line, that Hydra's own composition of the command line would stop at
    (none if it composes): a key that does not exist, a value of the wrong type for one of Hydra's
    typed settings (hydra.launcher.pack_size=abc), a config that is not there, a swept value where
    Hydra allows none. Hydra reports these over several lines and exits with status 1 before any
    callback of ours runs; composing here first (as Hydra will: a sweep's config without its swept
    values, which the preflight composes job by job) makes them bad input like any other."""
    loader = ConfigLoaderImpl(config_search_path=create_config_search_path(str(CONFIG_DIR)))
    try:
        # Hydra's first composition, the one it reads the run mode from (Hydra.get_mode)
        cfg = loader.load_configuration(CONFIG_NAME, overrides, RunMode.MULTIRUN, validate_sweep_overrides=False)
        mode = RunMode.MULTIRUN if multirun or cfg.hydra.mode == RunMode.MULTIRUN else RunMode.RUN
        parsed = OverridesParser.create().parse_overrides(overrides)
        loader.validate_sweep_overrides_legal(parsed, mode, from_shell=True)
    except (HydraException, OmegaConfBaseException) as err:
        return [_composition_problem(err, overrides)]
    if mode != RunMode.MULTIRUN:  # a single run builds neither
        return []
    problems = [_plugin_setting_problem(cfg, plugin, overrides) for plugin in ("launcher", "sweeper")]
    return [problem for problem in problems if problem]


def _plugin_setting_problem(cfg: DictConfig, plugin: str, overrides: list[str]) -> str | None:
    """A setting of the launcher or sweeper (`plugin`) that its class does not take (one added with
    `+hydra.launcher.x=...`): Hydra would compose it, open the sweep, then fail to build the plugin."""
    node = cfg.hydra[plugin]
    try:
        parameters = inspect.signature(get_class(node._target_).__init__).parameters.values()
    except Exception:  # a plugin that cannot be imported here: Hydra reports it itself
        return None
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters):
        return None
    takes = [p.name for p in parameters if p.name != "self"]
    instantiate_keys = [key for key in node if key.startswith("_") and key.endswith("_")]  # _target_, _partial_, ...
    unknown = [key for key in node if key not in instantiate_keys and key not in takes]
    if not unknown:
        return None
    key = f"hydra.{plugin}.{unknown[0]}"
    written = next((text for text in overrides if _override_key(text) == key), key)
    choice = cfg.hydra.runtime.choices.get(f"hydra/{plugin}", node._target_)
    settings = ", ".join(takes) or "none"
    return f"{written}: hydra/{plugin}={choice} has no setting {unknown[0]!r}; its settings: {settings}"


def _composition_problem(err: Exception, overrides: list[str]) -> str:
    """One line for a composition error: the override it stopped at and why (for a key that does
    not exist, the keys there are, the nearest first), else Hydra's message on one line."""
    if isinstance(err, OverrideParseException):
        return f"{err.override}: {' '.join(str(err).split())}"
    cause = err.__cause__
    full_key = getattr(cause, "full_key", None)
    keys = (full_key, *_parents(full_key)) if full_key else ()  # the key itself, then its parents, nearest first
    written = next((text for key in keys for text in overrides if _override_key(text) == key), None)
    if not isinstance(cause, OmegaConfBaseException) or written is None:
        return " ".join(str(err).split("Config search path")[0].split())  # no search path listing
    if isinstance(cause, (ConfigAttributeError, ConfigKeyError)) and isinstance(cause.parent_node, DictConfig):
        parent, _, key = full_key.rpartition(".")
        there = [str(k) for k in cause.parent_node]
        near = difflib.get_close_matches(str(key), there, n=3)
        listed = ", ".join(near + sorted(set(there) - set(near))) or "none"
        add = f" (to add a key, use +{written})" if _override_key(written) == full_key else ""
        return f"{written}: {parent or 'the config'} has no key {key!r}; its keys: {listed}{add}"
    return f"{written}: {str(cause).splitlines()[0]}{_takes(cause)}"


TYPE_NAMES = {int: "an integer", float: "a number", bool: "true or false", str: "a string"}


def _takes(cause: OmegaConfBaseException) -> str:
    """`; <key> takes an integer or null` (or `local or submitit`, an enum's) for a value a typed
    field (a structured config's, as Hydra's launchers and sweepers have) refused; else nothing."""
    parent, key = getattr(cause, "parent_node", None), getattr(cause, "key", None)
    node = parent._get_node(key) if isinstance(parent, DictConfig) and key is not None else None
    ref_type = node._metadata.ref_type if node is not None else None
    if isinstance(ref_type, type) and issubclass(ref_type, Enum):  # OmegaConf names them for a value not null
        kind = " or ".join(member.name for member in ref_type) if "expected one of" not in str(cause) else None
    else:
        kind = TYPE_NAMES.get(ref_type)
    if kind is None:
        return ""
    return f"; {cause.full_key} takes {kind}{' or null' if node._metadata.optional else ''}"


def _override_key(text: str) -> str:
    """The key (or group) an override names, without its +/~/++ prefix."""
    return text.lstrip("+~").split("=", 1)[0].split("@", 1)[0]


def _parents(key: str) -> list[str]:
    """`a.b.c` -> [`a.b`, `a`]: an override of a node fails on one of its keys."""
    parts = key.split(".")
    return [".".join(parts[:i]) for i in range(len(parts) - 1, 0, -1)]
