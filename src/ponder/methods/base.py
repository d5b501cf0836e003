"""The Method interface: a method owns its objective, the trainer owns the loop.

A method supplies its losses (``training_step``), which parameters the trainer optimises
and how (``param_groups``), and any schedule of its own (``on_epoch_start``: curricula,
temperature annealing...). A new paper = a model file + a method file.

Methods with steps of their own use the hooks, each given the trainer's
:class:`~ponder.engine.context.TrainContext`:

- ``setup(ctx)``: once, before training (and before a resume restores state): create
  method-owned networks and optimizers with ``ctx.add_module`` / ``ctx.add_optimizer``
  (EMA teachers, a weight-prediction network and its Adam), which are then saved and resumed.
- ``train_step(ctx, images, targets)``: one batch; the default runs ``training_step`` under
  ``ctx.autocast()`` and ``ctx.optimize(loss)``. Override it for several optimizer steps per
  batch, virtual steps (:func:`ponder.methods.virtual_sgd.virtual_sgd_step`) or a choice per
  iteration (``ctx.iteration``).
- ``after_step(ctx)``: after every batch's step(s) (EMA updates).
- ``on_epoch_end(ctx)``: after every epoch, before evaluation and the checkpoint; may read the
  held-out split (``ctx.collect()``) and returns metrics for the epoch's log line.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Iterable

import torch
import torch.nn as nn
from torch import Tensor

from ponder.output import DynamicOutput

if TYPE_CHECKING:
    from ponder.engine.context import TrainContext


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
        """The loss of one batch for ``model`` (the trained net, DDP-wrapped under torchrun)."""
        raise NotImplementedError

    def setup(self, ctx: TrainContext) -> None:
        """Hook: called once by the trainer, after it built its optimizer and before any resume;
        create method-owned modules / optimizers here with ``ctx.add_module`` / ``ctx.add_optimizer``."""

    def train_step(self, ctx: TrainContext, images: Tensor, targets: Tensor) -> StepOutput:
        """Hook: train on one batch and return what to log (``loss`` is logged, not back-propagated).

        Default: :meth:`training_step` on ``ctx.net`` under ``ctx.autocast()``, then one
        ``ctx.optimize(loss)`` (non-finite check, zero grad, backward, optimizer step).
        """
        with ctx.autocast():
            out = self.training_step(ctx.net, images, targets)
        ctx.optimize(out.loss)
        return out

    def after_step(self, ctx: TrainContext) -> None:
        """Hook: called after every :meth:`train_step` (e.g. an EMA teacher's update)."""

    def on_epoch_end(self, ctx: TrainContext) -> dict[str, Any]:
        """Hook: called after every epoch's training, before its evaluation and checkpoint;
        returns metrics for the epoch's record (numbers, or lists of numbers)."""
        return {}

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


def method_class(name: str) -> type[Method]:
    """The Method subclass registered under ``name``."""
    import ponder.methods  # noqa: F401

    if name not in _METHODS:
        raise ValueError(f"unknown method {name!r}; known methods: {', '.join(sorted(_METHODS))}")
    return _METHODS[name]


def create_method(name: str, model: nn.Module, **options: Any) -> Method:
    """Build a registered method for ``model``."""
    return method_class(name)(model, **options)


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

