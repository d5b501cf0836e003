"""SkipNet's two training stages (Wang et al., ECCV 2018).

``skipnet_sp``: supervised pre-training. Gates and network are trained jointly with cross-entropy
only (no compute penalty); gates are hard in the forward pass and soft in the backward pass
(straight-through).

``skipnet_hrl``: hybrid reinforcement learning, started from an SP run. Gates sample
``a_i ~ Bernoulli(p_i)`` in training; the network learns from cross-entropy and the gates from
REINFORCE with a per-gate skip reward ``r_i = (alpha / N) (1 - a_i)``, the terminal reward
``-terminal_weight * CE`` added at the last gate, and returns ``R_i = r_i + gamma R_{i+1}``:

    L = rl_weight * reduce_batch( sum_i -log pi(a_i) R_i ) + mean_batch CE

Models: anything whose forward returns ``extras["gate_actions"]`` and ``extras["gate_log_probs"]``
(``[B, N]`` over the N gates) and which has a ``decision_mode`` attribute and a ``gate_bank``
(:class:`ponder.nn.gates.GateBank`), e.g. :mod:`ponder.models.skipnet`.
"""

from __future__ import annotations

from typing import Any, Literal

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from ponder.methods.base import Method, StepOutput, register_method
from ponder.models.skipnet import SkipNet
from ponder.output import DynamicOutput


def skip_rewards(actions: Tensor, alpha: float) -> Tensor:
    """Per-gate reward ``[B, N]``: ``alpha / N`` for every skipped block (``actions`` 0/1 ``[B, N]``)."""
    return (alpha / actions.shape[1]) * (1.0 - actions)


def discounted_returns(rewards: Tensor, gamma: float) -> Tensor:
    """Returns ``R_i = r_i + gamma R_{i+1}`` (``R_N = r_N``) along dim 1 of ``rewards [B, N]``."""
    out = torch.empty_like(rewards)
    running = torch.zeros_like(rewards[:, 0])
    for i in range(rewards.shape[1] - 1, -1, -1):
        running = rewards[:, i] + gamma * running
        out[:, i] = running
    return out


def hrl_returns(actions: Tensor, ce: Tensor, *, alpha: float = 0.1, gamma: float = 1.0,
                terminal_weight: float = 1.0) -> Tensor:
    """SkipNet HRL returns ``[B, N]`` from gate actions ``[B, N]`` and per-sample CE ``[B]``.

    The skip rewards of :func:`skip_rewards` plus ``-terminal_weight * ce`` at the last gate,
    discounted by ``gamma``. CIFAR uses ``terminal_weight = 1``; ImageNet ``alpha / N``.
    """
    rewards = skip_rewards(actions, alpha)
    rewards[:, -1] -= terminal_weight * ce
    return discounted_returns(rewards, gamma)


def policy_gradient_loss(log_probs: Tensor, returns: Tensor, *, rl_weight: float = 0.01,
                         reduction: Literal["sum", "mean"] = "sum") -> Tensor:
    """REINFORCE loss ``rl_weight * reduce_b sum_i -log pi(a_i) R_i`` (``log_probs``, ``returns``: ``[B, N]``).

    ``returns`` are treated as constants. ``reduction`` over the batch: ``"sum"`` or ``"mean"``.
    """
    if reduction not in ("sum", "mean"):
        raise ValueError(f"rl_reduction must be 'sum' or 'mean', got {reduction!r}")
    per_sample = -(log_probs * returns.detach()).sum(1)
    total = per_sample.sum() if reduction == "sum" else per_sample.mean()
    return rl_weight * total


def _unwrap(model: nn.Module) -> nn.Module:
    return getattr(model, "module", model)  # DistributedDataParallel keeps the model in .module


def _gate_metrics(out: DynamicOutput, targets: Tensor) -> dict[str, float]:
    with torch.no_grad():
        metrics = {"acc": (out.logits.argmax(1) == targets).float().mean().item(),
                   "macs": out.macs.mean().item()}
        if out.gates is not None:
            metrics["keep"] = out.gates.float().mean().item()
    return metrics


def _require_gates(model: nn.Module, method: str) -> None:
    if not isinstance(model, SkipNet):
        raise ValueError(f"method {method!r} needs a SkipNet model (e.g. skipnet_resnet38_cifar), "
                         f"got {type(model).__name__}")


@register_method
class SkipNetSP(Method):
    """SkipNet stage 1: cross-entropy only, hard-forward / soft-backward gates.

    ``gate_mode``: ``"straight_through"`` (the paper) or ``"soft"`` (the Soft* gate variants).
    """

    name = "skipnet_sp"

    def __init__(self, model: nn.Module, gate_mode: Literal["straight_through", "soft"] = "straight_through") -> None:
        super().__init__(model)
        model = _unwrap(model)
        _require_gates(model, self.name)
        if gate_mode not in ("straight_through", "soft"):
            raise ValueError(f"skipnet_sp gate_mode must be 'straight_through' or 'soft', got {gate_mode!r}")
        model.decision_mode = gate_mode

    def training_step(self, model: nn.Module, images: Tensor, targets: Tensor) -> StepOutput:
        out: DynamicOutput = model(images)
        loss = F.cross_entropy(out.logits, targets)
        return StepOutput(loss=loss, metrics={"ce": loss.item(), **_gate_metrics(out, targets)}, output=out)


@register_method
class SkipNetHRL(Method):
    """SkipNet stage 2: sampled gates, REINFORCE with skip rewards and discounted returns, plus CE.

    Options (paper's CIFAR defaults): ``alpha=0.1`` (skip reward; grid {0.1, 0.01, 0.001}),
    ``gamma=1.0`` (discount), ``rl_weight=0.01``, ``terminal_weight=1.0`` (ImageNet: ``alpha / N``),
    ``rl_reduction="sum"`` over the batch (``"mean"`` also offered), ``sharpen_temp=None`` (ImageNet:
    0.05: the gates' final layer is divided by it once, when training starts).
    """

    name = "skipnet_hrl"

    def __init__(self, model: nn.Module, alpha: float = 0.1, gamma: float = 1.0, rl_weight: float = 0.01,
                 terminal_weight: float = 1.0, rl_reduction: Literal["sum", "mean"] = "sum",
                 sharpen_temp: float | None = None) -> None:
        super().__init__(model)
        model = _unwrap(model)
        _require_gates(model, self.name)
        if rl_reduction not in ("sum", "mean"):
            raise ValueError(f"skipnet_hrl rl_reduction must be 'sum' or 'mean', got {rl_reduction!r}")
        if sharpen_temp is not None and sharpen_temp <= 0:
            raise ValueError(f"skipnet_hrl sharpen_temp must be > 0 or null, got {sharpen_temp}")
        self.alpha, self.gamma, self.rl_weight = alpha, gamma, rl_weight
        self.terminal_weight, self.rl_reduction, self.sharpen_temp = terminal_weight, rl_reduction, sharpen_temp
        self.sharpened = False
        model.decision_mode = "sample"

    def on_epoch_start(self, epoch: int, num_epochs: int) -> None:
        super().on_epoch_start(epoch, num_epochs)
        # sharpen once, after the trainer has loaded the SP weights (and never again on resume)
        if self.sharpen_temp is not None and not self.sharpened:
            _unwrap(self.model).gate_bank.sharpen(self.sharpen_temp)
            self.sharpened = True

    def training_step(self, model: nn.Module, images: Tensor, targets: Tensor) -> StepOutput:
        out: DynamicOutput = model(images)
        ce = F.cross_entropy(out.logits, targets, reduction="none")
        actions, log_probs = out.extras["gate_actions"], out.extras["gate_log_probs"]
        returns = hrl_returns(actions, ce.detach(), alpha=self.alpha, gamma=self.gamma,
                              terminal_weight=self.terminal_weight)
        pg = policy_gradient_loss(log_probs, returns, rl_weight=self.rl_weight, reduction=self.rl_reduction)
        loss = ce.mean() + pg
        metrics = {"ce": ce.mean().item(), "pg": pg.item(), "return": returns[:, 0].mean().item(),
                   **_gate_metrics(out, targets)}
        return StepOutput(loss=loss, metrics=metrics, output=out)

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "sharpened": self.sharpened}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.sharpened = bool(state.get("sharpened", False))
