"""The Method interface: a method owns its objective, the trainer owns the loop.

A method supplies its losses (``training_step``), which parameters the trainer optimises
and how (``param_groups``), and any schedule of its own (``on_epoch_start``: curricula,
temperature annealing, round-robin budgets...). A new paper = a model file + a method file.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterable

import torch
import torch.nn as nn
from torch import Tensor

from ponder.output import DynamicOutput


@dataclass
class StepOutput:
    """What one training step produced: the loss to back-propagate and scalars to log."""

    loss: Tensor
    metrics: dict[str, float] = field(default_factory=dict)
    output: DynamicOutput | None = None


class Method:
    """Base training objective. Subclasses override :meth:`training_step` at least."""

    name = "base"

    def __init__(self, model: nn.Module, **options: Any) -> None:
        if options:
            raise ValueError(f"method {self.name!r} got unknown options {sorted(options)}; check the recipe's method.kwargs")
        self.model = model
        self.epoch = 0

    def param_groups(self, model: nn.Module) -> Iterable[dict[str, Any]]:
        """Parameter groups to optimise (``{"params": [...], ...}``); default: every trainable parameter.

        The trainer splits each group into weight-decay / no-decay parts and applies the
        optimiser config; a group may carry ``lr_scale`` to scale the base learning rate.
        """
        return [{"params": [p for p in model.parameters() if p.requires_grad]}]

    def on_epoch_start(self, epoch: int, num_epochs: int) -> None:
        """Hook for the method's own schedules (called before each epoch, 0-based)."""
        self.epoch = epoch

    def training_step(self, model: nn.Module, images: Tensor, targets: Tensor) -> StepOutput:
        raise NotImplementedError

    def state_dict(self) -> dict[str, Any]:
        """Method state saved in checkpoints (baselines, running statistics...)."""
        return {"epoch": self.epoch}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.epoch = int(state.get("epoch", 0))


_METHODS: dict[str, type[Method]] = {}


def register_method(cls: type[Method]) -> type[Method]:
    """Register a Method subclass under ``cls.name``."""
    if cls.name in _METHODS:
        raise ValueError(f"method {cls.name!r} is registered twice")
    _METHODS[cls.name] = cls
    return cls


def list_methods() -> list[str]:
    import ponder.methods  # noqa: F401  (registers built-in methods)

    return sorted(_METHODS)


def create_method(name: str, model: nn.Module, **options: Any) -> Method:
    """Build a registered method for ``model``."""
    import ponder.methods  # noqa: F401

    if name not in _METHODS:
        raise ValueError(f"unknown method {name!r}; known methods: {', '.join(sorted(_METHODS))}")
    return _METHODS[name](model, **options)


@register_method
class CrossEntropy(Method):
    """Plain cross-entropy on ``output.logits`` (static baselines), optional label smoothing."""

    name = "cross_entropy"

    def __init__(self, model: nn.Module, label_smoothing: float = 0.0) -> None:
        super().__init__(model)
        self.label_smoothing = label_smoothing

    def training_step(self, model: nn.Module, images: Tensor, targets: Tensor) -> StepOutput:
        out: DynamicOutput = model(images)
        loss = nn.functional.cross_entropy(out.logits, targets, label_smoothing=self.label_smoothing)
        with torch.no_grad():
            acc = (out.logits.argmax(1) == targets).float().mean().item()
        return StepOutput(loss=loss, metrics={"acc": acc}, output=out)

