"""Optimizers over a Method's parameter groups, and per-iteration learning-rate schedules.

Every optimizer group carries ``base_lr`` (the config's ``lr`` times the group's
``lr_scale``); :class:`LRSchedule` sets ``lr = base_lr * factor(step)`` before each step,
so the schedule has no hidden state: the global step alone fixes the learning rate.
"""

from __future__ import annotations

import math
from typing import Any, Iterable

import torch
import torch.nn as nn

from ponder.config import OptimConfig, ScheduleConfig

OPTIMIZERS = ("sgd", "adam", "adamw")
SCHEDULES = ("multistep", "cosine", "constant")

_NORM_TYPES = (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm, nn.LocalResponseNorm)


def _no_decay_ids(model: nn.Module) -> set[int]:
    """Ids of the parameters that should not be decayed: biases and normalisation affine parameters."""
    ids: set[int] = set()
    for module in model.modules():
        is_norm = isinstance(module, _NORM_TYPES)
        for name, p in module.named_parameters(recurse=False):
            if is_norm or name == "bias":
                ids.add(id(p))
    return ids


def split_param_groups(groups: Iterable[dict[str, Any]], model: nn.Module, cfg: OptimConfig) -> list[dict[str, Any]]:
    """Turn a Method's groups into optimizer groups with ``lr``, ``base_lr`` and ``weight_decay`` set.

    With ``cfg.no_decay_norm_bias`` each group is split in two: its decayed parameters and
    its biases / normalisation parameters (weight decay 0). Parameters the model does not
    own (a method's own modules) are classed by shape: 1-d tensors are not decayed.
    A group's ``lr_scale`` (default 1) scales ``cfg.lr``; its own ``weight_decay`` wins over
    ``cfg.weight_decay``. Frozen parameters and empty groups are dropped.
    """
    owned = {id(p) for p in model.parameters()}
    no_decay = _no_decay_ids(model)
    out: list[dict[str, Any]] = []
    for i, group in enumerate(groups):
        if "params" not in group:
            raise ValueError(f"parameter group {i} has no 'params' key; a Method's param_groups must be dicts with 'params'")
        params = [p for p in group["params"] if p.requires_grad]
        extra = {k: v for k, v in group.items() if k != "params"}
        lr_scale = float(extra.pop("lr_scale", 1.0))
        wd = float(extra.pop("weight_decay", cfg.weight_decay))
        base = {**extra, "lr_scale": lr_scale, "base_lr": cfg.lr * lr_scale, "lr": cfg.lr * lr_scale}
        if cfg.no_decay_norm_bias:
            def skip(p: torch.Tensor) -> bool:
                return id(p) in no_decay if id(p) in owned else p.ndim <= 1

            parts = [([p for p in params if not skip(p)], wd), ([p for p in params if skip(p)], 0.0)]
        else:
            parts = [(params, wd)]
        out.extend({**base, "params": ps, "weight_decay": d} for ps, d in parts if ps)
    if not out:
        raise ValueError("no trainable parameters: every parameter group is empty or frozen")
    return out


def build_optimizer(groups: Iterable[dict[str, Any]], model: nn.Module, cfg: OptimConfig) -> torch.optim.Optimizer:
    """SGD (momentum, optional Nesterov), Adam or AdamW over :func:`split_param_groups` of ``groups``."""
    name = cfg.name.lower()
    if name not in OPTIMIZERS:
        raise ValueError(f"unknown optimizer {cfg.name!r} in optim.name; choose one of {', '.join(OPTIMIZERS)}")
    param_groups = split_param_groups(groups, model, cfg)
    if name == "sgd":
        return torch.optim.SGD(param_groups, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov)
    cls = torch.optim.Adam if name == "adam" else torch.optim.AdamW
    return cls(param_groups, lr=cfg.lr, betas=tuple(cfg.betas))


class LRSchedule:
    """Learning-rate factor per iteration: linear warm-up, then multistep / cosine / constant.

    Args:
        cfg: the schedule section of the run config.
        base_lr: the optimizer's base learning rate (``cosine`` decays to ``cfg.min_lr`` from it).
        epochs: total number of epochs.
        steps_per_epoch: optimizer steps per epoch.

    ``milestones`` are fractions of ``epochs`` when all are <= 1 (rounded to whole epochs),
    epoch numbers otherwise; the rate is multiplied by ``gamma`` at each. Warm-up raises the
    factor linearly from ``1/warmup_steps`` to 1 over ``warmup_epochs``; cosine then runs
    over the remaining steps and reaches ``min_lr`` at the last step.
    """

    def __init__(self, cfg: ScheduleConfig, base_lr: float, epochs: int, steps_per_epoch: int) -> None:
        self.name = cfg.name.lower()
        if self.name not in SCHEDULES:
            raise ValueError(f"unknown schedule {cfg.name!r} in schedule.name; choose one of {', '.join(SCHEDULES)}")
        if epochs < 1 or steps_per_epoch < 1:
            raise ValueError(f"a schedule needs at least one epoch and one step per epoch, got {epochs} and {steps_per_epoch}")
        if cfg.warmup_epochs < 0:
            raise ValueError(f"schedule.warmup_epochs must be >= 0, got {cfg.warmup_epochs}")
        self.gamma = cfg.gamma
        self.steps_per_epoch = steps_per_epoch
        self.total_steps = epochs * steps_per_epoch
        self.warmup_steps = min(round(cfg.warmup_epochs * steps_per_epoch), self.total_steps)
        self.min_ratio = cfg.min_lr / base_lr if base_lr > 0 else 0.0
        ms = [float(m) for m in cfg.milestones]
        if any(m < 0 for m in ms):
            raise ValueError(f"schedule.milestones must be non-negative, got {cfg.milestones}")
        as_epochs = [round(m * epochs) for m in ms] if all(m <= 1 for m in ms) else [round(m) for m in ms]
        self.milestone_epochs = sorted(as_epochs)
        self.milestone_steps = [e * steps_per_epoch for e in self.milestone_epochs]

    def factor(self, step: int) -> float:
        """Multiplier of each group's ``base_lr`` for the iteration with index ``step`` (0-based)."""
        if step < self.warmup_steps:
            return (step + 1) / self.warmup_steps
        if self.name == "multistep":
            return self.gamma ** sum(step >= s for s in self.milestone_steps)
        if self.name == "cosine":
            span = max(self.total_steps - 1 - self.warmup_steps, 1)
            progress = min((step - self.warmup_steps) / span, 1.0)
            return self.min_ratio + (1 - self.min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
        return 1.0

    def apply(self, optimizer: torch.optim.Optimizer, step: int) -> float:
        """Set every group's ``lr`` for iteration ``step``; returns the factor."""
        f = self.factor(step)
        for group in optimizer.param_groups:
            group["lr"] = group.get("base_lr", group["lr"]) * f
        return f
