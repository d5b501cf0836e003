"""ConvNet-AIG's training objective (Veit & Belongie, ECCV 2018): cross-entropy plus the target-rate loss.

``L = CE + rate_weight / L_all * sum_{l: t_l < 1} (t_l - z_l)^2`` with ``z_l`` the batch mean of gate
``l``'s hard (straight-through) output and ``t_l`` its target (:func:`ponder.methods.gated.target_rate_loss`).
Targets: ``target`` for every gate on CIFAR (paper: 0.6 with ``rate_weight`` 2), the paper's per-layer
schedule at ``target`` for ``aig_resnet50`` / ``aig_resnet101`` (ImageNet: ``rate_weight`` 1), or an
explicit list ``targets``. ``gate_lr_scale`` scales the learning rate of the gates' last layers (the
official ``lrfact``, default 1). Gates train with the straight-through hard Gumbel sample at temperature 1.
"""

from __future__ import annotations

from typing import Any, Iterable

import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from ponder.methods.base import Method, StepOutput, register_method
from ponder.methods.gated import gated_metrics, rate_targets, require_gated, router_lr_groups, target_rate_loss


@register_method
class AIG(Method):
    """ConvNet-AIG: CE + target-rate loss (module docstring)."""

    name = "aig"

    def __init__(self, model: nn.Module, target: float = 0.6, rate_weight: float = 2.0,
                 targets: list[float] | None = None, gate_lr_scale: float = 1.0) -> None:
        super().__init__(model)
        net = require_gated(model, self.name)
        self.targets = rate_targets(net, target, targets)
        self.rate_weight, self.gate_lr_scale = float(rate_weight), float(gate_lr_scale)
        net.train_decisions = "gumbel"

    def param_groups(self, model: nn.Module) -> Iterable[dict[str, Any]]:
        return router_lr_groups(require_gated(model, self.name), self.gate_lr_scale)

    def training_step(self, model: nn.Module, images: Tensor, targets: Tensor) -> StepOutput:
        out = model(images)
        ce = F.cross_entropy(out.logits, targets)
        rate = target_rate_loss(out.extras["usage"], self.targets, self.rate_weight)
        return StepOutput(loss=ce + rate, metrics={"ce": ce.item(), "rate": rate.item(), **gated_metrics(out, targets)},
                          output=out)
