"""The ACT / SACT objective: task loss plus tau times the ponder cost (Graves; Figurnov et al.)."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from ponder.methods.base import Method, StepOutput, register_method
from ponder.output import DynamicOutput


@register_method
class PonderCost(Method):
    """``L = CE(logits, y) + tau * mean_batch(sum_blocks rho_block)``.

    The model reports ``extras["ponder_cost"]`` ``[B]``: per image, the sum over ACT blocks of the
    ponder cost rho = N + R (SACT: averaged over the block's positions first), so the batch mean
    is the reference's ``sum_blocks mean(rho_block)``. The paper's released models use
    ``tau = 0.01`` on CIFAR-10 and ``tau = 0.005`` on ImageNet; weight decay comes from the optimiser.
    """

    name = "ponder_cost"

    def __init__(self, model: nn.Module, tau: float = 0.01, label_smoothing: float = 0.0) -> None:
        super().__init__(model)
        if tau < 0:
            raise ValueError(f"ponder_cost tau must be >= 0, got {tau}; it weighs the ponder-cost penalty")
        self.tau, self.label_smoothing = float(tau), float(label_smoothing)

    def loss(self, out: DynamicOutput, targets: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """``(total, cross-entropy, mean ponder cost)`` for one forward output."""
        if "ponder_cost" not in out.extras:
            raise ValueError("method 'ponder_cost' needs a model that reports extras['ponder_cost'] "
                             "(an act_* or sact_* model); use method cross_entropy for other models")
        ce = F.cross_entropy(out.logits, targets, label_smoothing=self.label_smoothing)
        ponder = out.extras["ponder_cost"].mean()
        return ce + self.tau * ponder, ce, ponder

    def training_step(self, model: nn.Module, images: Tensor, targets: Tensor) -> StepOutput:
        out: DynamicOutput = model(images)
        loss, ce, ponder = self.loss(out, targets)
        with torch.no_grad():
            metrics = {
                "acc": (out.logits.argmax(1) == targets).float().mean().item(),
                "ce": ce.item(),
                "ponder_cost": ponder.item(),
                "mmacs": out.macs.mean().item() / 1e6,
            }
        return StepOutput(loss=loss, metrics=metrics, output=out)
