"""Typed run configuration; recipes (YAML) mirror these dataclasses and the CLI overrides fields."""

from __future__ import annotations

import dataclasses
import inspect
import math
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import yaml


class ConfigError(ValueError):
    """A recipe or override names a field that does not exist or has a bad value."""


@dataclass
class ModelConfig:
    name: str = "resnet20_cifar"
    kwargs: dict[str, Any] = field(default_factory=dict)


@dataclass
class DataConfig:
    dataset: str = "cifar10"          # cifar10 | cifar100 | imagefolder | digits (offline demo)
    data_dir: str | None = None
    val_size: int = 0                 # held-out split carved from train (seeded)
    long_tail_ratio: float | None = None  # long-tailed CIFAR: class c keeps N_c * ratio**(-c/(K-1))
    batch_size: int = 128
    eval_batch_size: int = 256
    workers: int = 0
    augment: bool = True
    limit_train: int | None = None    # use only the first N training images (quick runs)
    normalize: list[list[float]] | None = None  # [mean, std] per channel on x/255; None = the data set's own
    image_size: int | None = None     # imagefolder: side of the (square) training / eval crops; None = the model's
    skip_bad_images: bool = False     # imagefolder: skip unreadable images (counted) instead of stopping


@dataclass
class OptimConfig:
    name: str = "sgd"                 # sgd | adam | adamw
    lr: float = 0.1
    momentum: float = 0.9
    nesterov: bool = False
    weight_decay: float = 1e-4
    no_decay_norm_bias: bool = True   # no weight decay on BN / bias parameters
    betas: tuple[float, float] = (0.9, 0.999)


@dataclass
class ScheduleConfig:
    name: str = "multistep"           # multistep | cosine | constant
    milestones: list[float] = field(default_factory=lambda: [0.5, 0.75])  # fractions of epochs (or epochs if > 1)
    gamma: float = 0.1
    warmup_epochs: float = 0.0
    min_lr: float = 0.0


@dataclass
class MethodConfig:
    name: str = "cross_entropy"
    kwargs: dict[str, Any] = field(default_factory=dict)


@dataclass
class TrainConfig:
    epochs: int = 160
    seed: int = 0
    device: str = "auto"              # auto | cpu | cuda
    amp: bool = False                 # CUDA only
    channels_last: bool = False       # CUDA only
    tensorboard: bool = False
    init_from: str | None = None      # run dir or weights file to start from (fine-tuning)
    max_steps_per_epoch: int | None = None
    find_unused_parameters: bool | None = None  # DDP; None = auto (on for dynamic models)
    sync_batchnorm: bool = False      # DDP: BatchNorm statistics over the global batch (as in one process)


@dataclass
class RunConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    method: MethodConfig = field(default_factory=MethodConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(yaml.safe_dump(self.to_dict(), sort_keys=False))


def _build(cls: type, data: dict[str, Any], where: str) -> Any:
    if not isinstance(data, dict):
        raise ConfigError(f"{where or 'recipe'} must be a mapping, got {type(data).__name__}")
    names = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(names))
    if unknown:
        raise ConfigError(f"unknown recipe field {where + '.' if where else ''}{unknown[0]}; valid fields: {', '.join(names)}")
    hints = typing.get_type_hints(cls)
    kw = {}
    for k, v in data.items():
        sub = _SECTIONS.get(k) if cls is RunConfig else None
        kw[k] = _build(sub, v or {}, k) if sub else coerce(v, hints[k], f"{where}.{k}")
    return cls(**kw)


_FLOAT = re.compile(r"[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?|[+-]?(inf|nan)", re.IGNORECASE)


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def coerce(value: Any, tp: Any, where: str) -> Any:
    """``value`` checked against the type ``tp`` (int, float, bool, str, ``X | None``, ``list[X]``,
    ``tuple[X, ...]``, ``dict``, ``Any``), with the conversions a YAML recipe needs: an int where
    a float is wanted, and a float written as YAML 1.1 reads it as a string (``1e6``, ``1.0e-4``).
    Raises :class:`ConfigError` naming ``where`` otherwise."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp is Any or tp is inspect.Parameter.empty:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        options = [a for a in args if a is not type(None)]
        for option in options:
            try:
                return coerce(value, option, where)
            except ConfigError:
                continue
        raise ConfigError(f"{where} must be {' or '.join(_type_name(o) for o in options)}"
                          f"{' or null' if type(None) in args else ''} (got {value!r})")
    if origin in (list, tuple) or tp in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where} must be a list (got {value!r})")
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(value) != len(args):
                raise ConfigError(f"{where} must be a list of {len(args)} values (got {value!r})")
            return tuple(coerce(v, a, f"{where}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
        item = args[0] if args else Any
        items = [coerce(v, item, f"{where}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if (origin or tp) is tuple else items
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where} must be a mapping of options (got {value!r})")
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where} must be true or false (got {value!r})")
        return value
    if tp is int:
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where} must be an integer (got {value!r})")
        return value
    if tp is float:
        if isinstance(value, str) and _FLOAT.fullmatch(value.strip()):
            value = float(value)  # YAML 1.1 reads 1e6 and 1.0e6 as strings
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where} must be a number (got {value!r})")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where} must be a string (got {value!r})")
        return value
    return value  # other annotations (classes, literals...) are left to the code that uses them


def coerce_kwargs(fn: Callable[..., Any], kwargs: dict[str, Any], where: str, skip: int = 0) -> dict[str, Any]:
    """``kwargs`` checked against ``fn``'s signature (its first ``skip`` parameters are not
    options): unknown names are refused unless ``fn`` takes ``**kwargs``, and values of
    annotated parameters are coerced with :func:`coerce`. Raises :class:`ConfigError`."""
    params = list(inspect.signature(fn).parameters.values())[skip:]
    named = {p.name: p for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
    takes_any = any(p.kind == p.VAR_KEYWORD for p in params)
    unknown = sorted(set(kwargs) - set(named))
    if unknown and not takes_any:
        raise ConfigError(f"{where} has unknown option {unknown[0]!r}; valid options: {', '.join(named) or 'none'}")
    try:
        hints = typing.get_type_hints(fn)
    except Exception:  # annotations that do not resolve: check names only
        hints = {}
    return {k: coerce(v, hints[k], f"{where}.{k}") if k in hints and k in named else v for k, v in kwargs.items()}


def _check(ok: bool, where: str, rule: str, value: Any) -> None:
    if not ok:
        raise ConfigError(f"{where} must be {rule} (got {value!r})")


def validate(config: RunConfig) -> None:
    """Check the types and ranges of every field of ``config`` (values are coerced in place);
    raises :class:`ConfigError` with one sentence naming the first bad field."""
    for section, cls in _SECTIONS.items():
        obj = getattr(config, section)
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            setattr(obj, f.name, coerce(getattr(obj, f.name), hints[f.name], f"{section}.{f.name}"))
    d, o, s, t = config.data, config.optim, config.schedule, config.train
    _check(d.val_size >= 0, "data.val_size", "0 or more", d.val_size)
    _check(d.batch_size >= 1, "data.batch_size", "a positive integer", d.batch_size)
    _check(d.eval_batch_size >= 1, "data.eval_batch_size", "a positive integer", d.eval_batch_size)
    _check(d.workers >= 0, "data.workers", "0 or more", d.workers)
    _check(d.long_tail_ratio is None or d.long_tail_ratio >= 1, "data.long_tail_ratio", "a number >= 1 or null",
           d.long_tail_ratio)
    _check(d.limit_train is None or d.limit_train >= 1, "data.limit_train", "a positive integer or null", d.limit_train)
    _check(d.image_size is None or d.image_size >= 1, "data.image_size", "a positive integer or null", d.image_size)
    for name, value, rule, ok in (
        ("optim.lr", o.lr, "a finite number >= 0", o.lr >= 0),
        ("optim.momentum", o.momentum, "in [0, 1)", 0 <= o.momentum < 1),
        ("optim.weight_decay", o.weight_decay, "a finite number >= 0", o.weight_decay >= 0),
        ("schedule.gamma", s.gamma, "a finite number > 0", s.gamma > 0),
        ("schedule.warmup_epochs", s.warmup_epochs, "a finite number >= 0", s.warmup_epochs >= 0),
        ("schedule.min_lr", s.min_lr, "a finite number >= 0", s.min_lr >= 0),
    ):
        _check(ok and math.isfinite(value), name, rule, value)
    _check(all(0 <= b < 1 for b in o.betas), "optim.betas", "two numbers in [0, 1)", list(o.betas))
    _check(all(m >= 0 and math.isfinite(m) for m in s.milestones), "schedule.milestones", "numbers >= 0", s.milestones)
    _check(t.epochs >= 1, "train.epochs", "a positive integer", t.epochs)
    _check(t.seed >= 0, "train.seed", "0 or more", t.seed)
    _check(t.max_steps_per_epoch is None or t.max_steps_per_epoch >= 1, "train.max_steps_per_epoch",
           "a positive integer or null", t.max_steps_per_epoch)
    _check(re.fullmatch(r"auto|cpu|cuda(:\d+)?", t.device.lower()) is not None, "train.device",
           "auto, cpu, cuda or cuda:N", t.device)
    for where, value, known in (("data.dataset", d.dataset, _known("ponder.data", "DATASETS")),
                                ("optim.name", o.name.lower(), _known("ponder.engine.optim", "OPTIMIZERS")),
                                ("schedule.name", s.name.lower(), _known("ponder.engine.optim", "SCHEDULES"))):
        _check(value in known, where, f"one of {', '.join(known)}", value)


def _known(module: str, name: str) -> tuple[str, ...]:
    import importlib

    return tuple(getattr(importlib.import_module(module), name))


_SECTIONS: dict[str, type] = {
    "model": ModelConfig, "data": DataConfig, "optim": OptimConfig,
    "schedule": ScheduleConfig, "method": MethodConfig, "train": TrainConfig,
}


def config_from_dict(data: dict[str, Any]) -> RunConfig:
    """Build a :class:`RunConfig`, rejecting unknown fields and bad values with a clear message."""
    config = _build(RunConfig, data, "")
    validate(config)
    return config


def load_config(path: str | Path, overrides: list[str] | None = None) -> RunConfig:
    """Read a YAML recipe and apply ``key.sub=value`` overrides (values parsed as YAML)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"recipe file {path} does not exist")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"recipe {path} is not valid YAML: {str(e).splitlines()[0]}") from None
    return config_from_dict(apply_overrides(data, overrides or []))


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """``["optim.lr=0.05", "model.kwargs.shortcut=B"]`` applied to a nested dict (copied)."""
    import copy

    data = copy.deepcopy(data)
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like key.sub=value")
        key, raw = item.split("=", 1)
        parts = key.split(".")
        node = data
        for p in parts[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {key!r}: {p} is not a section")
        node[parts[-1]] = yaml.safe_load(raw)
    return data


def flat_config(d: dict[str, Any], prefix: str = "", kwargs_whole: bool = True) -> dict[str, Any]:
    """A config dict as ``{"optim.lr": 0.1, "model.kwargs": {...}, ...}`` (sections flattened, kwargs kept whole;
    with ``kwargs_whole=False`` flattened too: ``"model.kwargs.budget": 0.5``)."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict) and (k != "kwargs" or not kwargs_whole):
            out.update(flat_config(v, f"{prefix}{k}.", kwargs_whole))
        else:
            out[f"{prefix}{k}"] = list(v) if isinstance(v, tuple) else v
    return out
