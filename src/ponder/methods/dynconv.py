"""DynConv's objective (Verelst & Tuytelaars, CVPR 2020): cross-entropy plus the sparsity criterion.

For block ``i`` with dilated mask ``m_d`` (where its first conv runs) and mask ``m``, over the batch::

    c_i = active(m_d) * fpp(m_d) + active(m) * fpp(m)       (fpp: MACs per position of that mask's convs)
    t_i = total(m_d) * fpp(m_d) + total(m) * fpp(m)
    theta_i = c_i / t_i ;  theta = sum_i c_i / sum_i t_i
    L_net   = (theta - target)^2
    p = clip(epoch / (0.33 * epochs), 0, 1) ;  progress = cos(p * pi / 2)^2
    upper = 1 - progress * (1 - target) ;  lower = progress * target
    L_block = mean_i [ max(0, theta_i - upper)^2 + max(0, lower - theta_i)^2 ]
    L = CE + 10 * (L_net + L_block)

At epoch 0 every block is pushed to the target; after a third of training the bounds are [0, 1] and only
the network-level term remains. ``active`` counts the straight-through hard masks, so the criterion's
gradient reaches the mask units (the model reports ``c_i`` and ``t_i`` as ``extras["sparsity"]``).

The method also runs the Gumbel schedule: the temperature (``temperature``, one value, or several stepped at
``temperature_milestones``: ImageNet's 5 / 2.5 / 1 at the first two learning-rate decays) and the noise,
switched off for the last 20 % of the epochs (``noise_off = 0.8``: noise while ``epoch < 0.8 * epochs``).
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from ponder.methods.base import Method, StepOutput, register_method
from ponder.models.dynconv import DynConvMixin
from ponder.output import DynamicOutput

SPARSITY_WEIGHT = 10.0
ANNEAL_FRACTION = 0.33


def annealing_progress(epoch: int, epochs: int, fraction: float = ANNEAL_FRACTION) -> float:
    """``cos(p * pi / 2)^2`` with ``p = clip(epoch / (fraction * epochs), 0, 1)``: 1 at epoch 0, 0 from ``fraction`` on."""
    p = min(max(epoch / (fraction * epochs), 0.0), 1.0)
    return math.cos(p * math.pi / 2) ** 2


def sparsity_bounds(target: float, progress: float) -> tuple[float, float]:
    """``(lower, upper)`` per-block bounds: ``(progress * target, 1 - progress * (1 - target))``."""
    return progress * target, 1.0 - progress * (1.0 - target)


def sparsity_loss(spent: Tensor, dense: Tensor, target: float, progress: float) -> Tensor:
    """``L_net + L_block`` (module docstring) from per-block conditional MACs ``spent [blocks]`` (differentiable)
    and their dense counterparts ``dense [blocks]``."""
    theta_i = spent / dense
    theta = spent.sum() / dense.sum()
    lower, upper = sparsity_bounds(target, progress)
    per_block = F.relu(theta_i - upper) ** 2 + F.relu(lower - theta_i) ** 2
    return (theta - target) ** 2 + per_block.mean()


def at_milestones(values: list[float], milestones: list[float], epoch: int, epochs: int) -> float:
    """``values[j]`` where ``j`` milestones have been reached by ``epoch`` (0-based); milestones are fractions of
    ``epochs`` when all are <= 1, epoch numbers otherwise (as ``schedule.milestones``)."""
    fractions = all(m <= 1 for m in milestones)
    return values[sum(epoch >= round(m * epochs if fractions else m) for m in milestones)]


@register_method
class DynConvSparsity(Method):
    """``L = CE + weight * sparsity_loss(theta, target)`` for a DynConv model trained for ``model.budgets[0]``."""

    name = "dynconv"

    def __init__(self, model: nn.Module, weight: float = SPARSITY_WEIGHT, temperature: float | list[float] = 1.0,
                 temperature_milestones: list[float] | None = None, noise_off: float = 0.8,
                 anneal: float = ANNEAL_FRACTION, label_smoothing: float = 0.0) -> None:
        super().__init__(model)
        if not isinstance(model, DynConvMixin):
            raise ValueError(f"method {self.name!r} trains DynConv models (dynconv_* names); "
                             f"{type(model).__name__} is not one")
        temps = [float(temperature)] if isinstance(temperature, (int, float)) else [float(t) for t in temperature]
        steps = list(temperature_milestones or [])
        if not temps or any(t <= 0 for t in temps) or len(steps) != len(temps) - 1:
            raise ValueError(f"temperature must be positive numbers with one milestone fewer in temperature_milestones "
                             f"(e.g. [5, 2.5, 1] and [30, 60]); got {temperature!r} and {temperature_milestones!r}")
        if weight < 0 or not 0.0 <= noise_off <= 1.0 or not 0.0 < anneal <= 1.0:
            raise ValueError(f"weight must be >= 0, noise_off in [0, 1] and anneal in (0, 1]; got {weight}, "
                             f"{noise_off}, {anneal}")
        self.weight, self.temperatures, self.milestones = float(weight), temps, steps
        self.noise_off, self.anneal, self.label_smoothing = float(noise_off), float(anneal), float(label_smoothing)
        self.epochs = 1
        self.progress = 1.0

    def on_epoch_start(self, epoch: int, num_epochs: int) -> None:
        """Set the model's Gumbel temperature and noise and the bounds' annealing progress for ``epoch``."""
        super().on_epoch_start(epoch, num_epochs)
        self.epochs = num_epochs
        self.progress = annealing_progress(epoch, num_epochs, self.anneal)
        self.model.gumbel_temperature = at_milestones(self.temperatures, self.milestones, epoch, num_epochs)
        self.model.gumbel_noise = epoch < self.noise_off * num_epochs

    def objective(self, out: DynamicOutput, targets: Tensor, target: float) -> tuple[Tensor, dict[str, float]]:
        """``(CE + weight * sparsity, metrics)`` of one training output for sparsity ``target``."""
        if "sparsity" not in out.extras:
            raise ValueError("the DynConv sparsity criterion needs a training forward (model.train(), gradients on)")
        spent, dense = out.extras["sparsity"]
        ce = F.cross_entropy(out.logits, targets, label_smoothing=self.label_smoothing)
        sparsity = sparsity_loss(spent, dense, target, self.progress)
        with torch.no_grad():
            metrics = {"acc": (out.logits.argmax(1) == targets).float().mean().item(), "ce": ce.item(),
                       "sparsity": sparsity.item(), "theta": (spent.sum() / dense.sum()).item(),
                       "mmacs": out.macs.mean().item() / 1e6}
        return ce + self.weight * sparsity, metrics

    def training_step(self, model: nn.Module, images: Tensor, targets: Tensor) -> StepOutput:
        out: DynamicOutput = model(images)
        loss, metrics = self.objective(out, targets, self.model.budgets[self.model.budget_index])
        return StepOutput(loss=loss, metrics=metrics, output=out)

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "progress": self.progress}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.progress = float(state.get("progress", self.progress))
