"""Typed run configuration; recipes (YAML) mirror these dataclasses and the CLI overrides fields."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

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
    kw = {}
    for k, v in data.items():
        sub = _SECTIONS.get(k) if cls is RunConfig else None
        kw[k] = _build(sub, v or {}, k) if sub else v
    return cls(**kw)


_SECTIONS: dict[str, type] = {
    "model": ModelConfig, "data": DataConfig, "optim": OptimConfig,
    "schedule": ScheduleConfig, "method": MethodConfig, "train": TrainConfig,
}


def config_from_dict(data: dict[str, Any]) -> RunConfig:
    """Build a :class:`RunConfig`, rejecting unknown fields with a clear message."""
    return _build(RunConfig, data, "")


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
