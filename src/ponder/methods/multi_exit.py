"""Multi-exit training (MSDNet, RANet) with the IMTA options.

``multi_exit``: the sum over exits of cross-entropy, equal weights (as official).

IMTA (Li et al., ICCV 2019) as options:

- stage 1, ``gradient_equilibrium: true``: the model rescales gradients on the tensor its exits
  read (MSDNet: coarsest scale): exit ``i`` (0-based, N exits) gets ``1/(N-i)``, later exits
  ``(N-i-1)/(N-i)``;
- stage 2, ``collaboration: true``: the model must be built with ``collaboration=True`` (IMTA
  inline subnetwork collaboration heads) and initialised from the stage-1 run
  (``train.init_from``); the backbone is frozen and only the new heads train, with the
  one-for-all KD loss

  ``L = CE(f_N, y) + sum_{k<N} [(1-gamma) CE(f_k, y) + gamma T^2 KL(softmax(t/T) || softmax(f_k/T))]``

  where ``t`` is the backbone's own last-exit logits (detached). ``kd_reduction="batchmean"``
  (default) is the textbook KL; ``"mean"`` is the official code's (divides by classes too).
  ``freeze_bn: true`` keeps the frozen backbone's BN statistics fixed (the official code lets
  them update).
"""

from __future__ import annotations

from typing import Any, Iterable, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from ponder.methods.base import Method, StepOutput, register_method
from ponder.methods.distill import kd_loss, kd_per_sample
from ponder.models.multi_exit import MultiExitModel
from ponder.output import DynamicOutput


def _unwrap(model: nn.Module) -> nn.Module:
    return getattr(model, "module", model)


@register_method
class MultiExit(Method):
    """Sum of per-exit cross-entropies (equal weights by default) plus the IMTA options."""

    name = "multi_exit"

    def __init__(self, model: nn.Module, weights: Sequence[float] | None = None, label_smoothing: float = 0.0,
                 gradient_equilibrium: bool = False, collaboration: bool = False, kd_gamma: float = 0.0,
                 kd_temperature: float = 1.0, kd_reduction: str = "batchmean", freeze_bn: bool = False):
        super().__init__(model)
        net = _unwrap(model)
        if not isinstance(net, MultiExitModel):
            raise ValueError(f"method 'multi_exit' needs a multi-exit model (MSDNet, RANet), got {type(net).__name__}")
        if weights is not None and len(weights) != net.num_exits:
            raise ValueError(f"weights has {len(weights)} entries but the model has {net.num_exits} exits")
        if collaboration and net.collab is None:
            raise ValueError("collaboration: true needs a model built with collaboration=True "
                             "(set model.kwargs.collaboration: true in the recipe)")
        if kd_gamma and not collaboration:
            raise ValueError("kd_gamma > 0 (IMTA one-for-all KD) needs collaboration: true (IMTA stage 2)")
        kd_loss(torch.zeros(1, 2), torch.zeros(1, 2), kd_temperature, kd_reduction)  # validate options early
        self.weights = list(weights) if weights is not None else [1.0] * net.num_exits
        self.label_smoothing, self.collaboration, self.freeze_bn = label_smoothing, collaboration, freeze_bn
        self.kd_gamma, self.kd_temperature, self.kd_reduction = kd_gamma, kd_temperature, kd_reduction
        net.grad_equilibrium = gradient_equilibrium
        if collaboration:
            for name, p in net.named_parameters():
                p.requires_grad_(name.startswith("collab."))

    def param_groups(self, model: nn.Module) -> Iterable[dict[str, Any]]:
        """Every trainable parameter (stage 2: only the collaboration heads, the backbone is frozen)."""
        return [{"params": [p for p in model.parameters() if p.requires_grad]}]

    def _freeze_backbone_bn(self, net: MultiExitModel) -> None:
        for name, m in net.named_modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and not name.startswith("collab."):
                m.eval()

    def exit_losses(self, out: DynamicOutput, targets: Tensor) -> Tensor:
        """The per-sample loss of each exit ``[B, K]`` (without the exit weights): cross-entropy, and with
        IMTA's KD (``kd_gamma``) ``(1-gamma) CE + gamma T^2 KL`` at every exit but the last. Its mean over
        the batch, weighted by ``weights`` and summed over exits, is the loss of :meth:`training_step`."""
        exits = out.exit_logits
        ce = torch.stack([F.cross_entropy(z, targets, reduction="none", label_smoothing=self.label_smoothing)
                          for z in exits], dim=1)
        if not self.kd_gamma:
            return ce
        teacher = out.extras["teacher_logits"]
        kd = torch.stack([kd_per_sample(z, teacher, self.kd_temperature, self.kd_reduction) for z in exits[:-1]], dim=1)
        return torch.cat([(1 - self.kd_gamma) * ce[:, :-1] + self.kd_gamma * kd, ce[:, -1:]], dim=1)

    def prepare(self, model: nn.Module) -> None:
        """Before a training forward pass: with ``freeze_bn`` (IMTA stage 2), the frozen backbone's BN layers in eval mode."""
        if self.collaboration and self.freeze_bn:
            self._freeze_backbone_bn(_unwrap(model))

    def training_step(self, model: nn.Module, images: Tensor, targets: Tensor) -> StepOutput:
        self.prepare(model)
        out = model(images)
        exits = out.exit_logits
        n = len(exits)
        ce = [F.cross_entropy(z, targets, label_smoothing=self.label_smoothing) for z in exits]
        metrics: dict[str, float] = {}
        if self.kd_gamma:
            teacher = out.extras["teacher_logits"]
            kd = [kd_loss(z, teacher, self.kd_temperature, self.kd_reduction) for z in exits[:-1]]
            loss = ce[-1] + sum((1 - self.kd_gamma) * c + self.kd_gamma * d for c, d in zip(ce[:-1], kd))
            metrics["kd"] = float(sum(d.item() for d in kd) / max(1, len(kd)))
        else:
            loss = sum(w * c for w, c in zip(self.weights, ce))
        with torch.no_grad():
            for k in range(n):
                metrics[f"acc_exit{k + 1}"] = (exits[k].argmax(1) == targets).float().mean().item()
            metrics["acc"] = metrics[f"acc_exit{n}"]
        return StepOutput(loss=loss, metrics=metrics, output=out)
