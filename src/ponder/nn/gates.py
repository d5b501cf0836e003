"""Per-block keep gates for gated residual networks (SkipNet's gates and the decision rules).

A gate reads a feature map ``[B, C, H, W]`` and returns one **keep logit** ``[B]``; the keep
probability is ``sigmoid(logit)`` (a two-way softmax over ``[drop, keep]`` logits equals the
sigmoid of their difference, so both styles fit this contract). Gates are grouped in a
:class:`GateBank` stepped once per gated block, which lets recurrent gates carry a state.

Decision rules (:func:`decide`):

- ``"straight_through"``: hard ``p >= threshold`` forward, the soft ``p``'s gradient backward;
- ``"sample"``: ``a ~ Bernoulli(p)`` in training (no gradient through ``a``; use the log-prob);
- ``"soft"``: the continuous ``p`` in training (SkipNet's Soft* variants).

In ``eval()`` every rule is the deterministic ``p >= threshold`` (never random; the same rule as
BlockDrop's policies, :mod:`ponder.nn.policy`).
The 1x1 convolutions that read a globally pooled map run as one matmul (:func:`pooled_linear`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Literal

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from ponder import fast
from ponder.nn.routers import RouterBank
from ponder.nn.thresholds import probability_logit

DecisionMode = Literal["straight_through", "sample", "soft"]
DECISION_MODES = ("straight_through", "sample", "soft")
GATE_TYPES = ("ffgate1", "ffgate2", "rnn")


def straight_through(hard: Tensor, soft: Tensor) -> Tensor:
    """``hard`` in the forward pass, ``soft``'s gradient in the backward pass (same shapes)."""
    return hard + soft - soft.detach()


def keep_log_prob(logit: Tensor, action: Tensor) -> Tensor:
    """``log pi(action)`` for ``action`` in {0, 1} under ``p = sigmoid(logit)`` (elementwise, stable)."""
    return action * F.logsigmoid(logit) + (1 - action) * F.logsigmoid(-logit)


@dataclass
class Decision:
    """One gate's decision for a batch.

    ``mask [B]``: what multiplies the block (hard 0/1, or soft in ``"soft"`` training; carries the
    straight-through gradient); ``action [B]``: the hard 0/1 decision (no gradient);
    ``log_prob [B]``: ``log pi(action)`` with gradient (training only; ``None`` in eval).
    """

    mask: Tensor
    action: Tensor
    log_prob: Tensor | None


def decide(logit: Tensor, *, mode: DecisionMode = "straight_through", threshold: float = 0.5,
           training: bool = False, forced: Tensor | None = None) -> Decision:
    """Turn keep logits ``[B]`` into a :class:`Decision` (rules in the module docstring).

    The threshold test is done on the logit (``logit >= probability_logit(threshold)``), so it is exact
    even where ``sigmoid`` saturates, and inference costs one comparison per gate.
    ``forced [B]`` (0/1) overrides the decision (random keep-rate benchmarks); its mask has no gradient.
    """
    if mode not in DECISION_MODES:
        raise ValueError(f"gate decision mode must be one of {DECISION_MODES}, got {mode!r}")
    if forced is not None:
        action = mask = forced.to(logit.dtype)
    elif training and mode == "sample":
        action = mask = torch.bernoulli(torch.sigmoid(logit.detach()))
    else:
        action = (logit.detach() >= probability_logit(threshold)).to(logit.dtype)
        if training and mode == "soft":
            mask = torch.sigmoid(logit)
        elif training:
            mask = straight_through(action, torch.sigmoid(logit))
        else:
            mask = action
    return Decision(mask=mask, action=action, log_prob=keep_log_prob(logit, action) if training else None)


def pooled_linear(x: Tensor, conv: nn.Conv2d) -> Tensor:
    """A 1x1 ``conv`` applied to the global average of ``x [B, C, H, W]``, as one matmul: ``[B, C_out]``."""
    return F.linear(x.mean((2, 3)), conv.weight.flatten(1), conv.bias)


def _two_way_logit(z: Tensor) -> Tensor:
    """``[B, 2]`` (drop, keep) logits -> ``[B]`` keep logit; ``softmax(z)[:, 1] == sigmoid(result)``."""
    return z[:, 1] - z[:, 0]


def _conv_bn_relu(c: int, stride: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(c, c, 3, stride=stride, padding=1, bias=False), nn.BatchNorm2d(c), nn.ReLU())


class FFGateI(nn.Module):
    """SkipNet FFGate-I: MaxPool 2 -> conv3x3 -> BN-ReLU -> conv3x3/2 -> BN-ReLU -> AvgPool -> conv1x1(C->2).

    ``forward(x [B, C, H, W]) -> [B]`` keep logits. The average pool covers the whole remaining map
    (the paper's pool size ``round(P/4)``, written as a global pool so any size works, batch 1 included).
    """

    def __init__(self, channels: int):
        super().__init__()
        self.body = nn.Sequential(nn.MaxPool2d(2), _conv_bn_relu(channels, 1), _conv_bn_relu(channels, 2))
        self.out = nn.Conv2d(channels, 2, 1)

    def forward(self, x: Tensor) -> Tensor:
        return _two_way_logit(pooled_linear(self.body(x), self.out))


class FFGateII(nn.Module):
    """SkipNet FFGate-II: conv3x3/2 -> BN-ReLU -> AvgPool -> conv1x1(C->2); ``forward(x) -> [B]`` keep logits."""

    def __init__(self, channels: int):
        super().__init__()
        self.body = _conv_bn_relu(channels, 2)
        self.out = nn.Conv2d(channels, 2, 1)

    def forward(self, x: Tensor) -> Tensor:
        return _two_way_logit(pooled_linear(self.body(x), self.out))


class GateBank(RouterBank):
    """The gates of one network: a :class:`~ponder.nn.routers.RouterBank` whose ``step(i, x, state)`` returns one
    **keep logit** ``[B]`` per sample (not ``[B, K]`` option logits).

    ``i`` indexes the gates (0 .. ``len(self) - 1``), ``x [B, C_i, H, W]`` is what gate ``i`` reads,
    ``state`` comes from :meth:`init_state` (``None`` for feed-forward gates); :meth:`final_layers` are the
    layers that produce the keep logits (1x1 convs or a Linear; scaled by :meth:`sharpen`).
    """

    @torch.no_grad()
    def bias_towards_keep(self, prob: float) -> None:
        """Set the final layers' biases so that a zero feature gives keep probability ``prob`` in (0, 1)."""
        if not 0.0 < prob < 1.0:
            raise ValueError(f"initial keep probability must be in (0, 1), got {prob}")
        keep_logit = probability_logit(prob)
        for layer in self.final_layers():
            layer.bias.zero_()
            layer.bias[-1] = keep_logit  # the keep logit is the last output (drop, keep)

    @torch.no_grad()
    def sharpen(self, temperature: float) -> None:
        """Divide the final layers' weights and biases by ``temperature`` (SkipNet HRL's ``temp``)."""
        if temperature <= 0:
            raise ValueError(f"sharpening temperature must be > 0, got {temperature}")
        for layer in self.final_layers():
            for p in layer.parameters():
                p.div_(temperature)


class FeedForwardGates(GateBank):
    """Independent feed-forward gates, one per gated block (``FFGateI`` or ``FFGateII``)."""

    def __init__(self, gates: list[nn.Module]):
        super().__init__()
        self.gates = nn.ModuleList(gates)

    def __len__(self) -> int:
        return len(self.gates)

    def step(self, i: int, x: Tensor, state: Any) -> tuple[Tensor, Any]:
        return self.gates[i](x), state

    def final_layers(self) -> list[nn.Module]:
        return [g.out for g in self.gates]


class RecurrentGates(GateBank):
    """SkipNet's RNN gate: per gate AvgPool -> conv1x1(C_i -> proj); one LSTM cell shared by all gates,
    stepped once per gate, then Linear(hidden -> 1). The LSTM state starts at zero every forward."""

    def __init__(self, channels: list[int], proj_dim: int = 10, hidden: int = 10):
        super().__init__()
        self.proj = nn.ModuleList(nn.Conv2d(c, proj_dim, 1) for c in channels)
        self.lstm = nn.LSTMCell(proj_dim, hidden)
        self.out = nn.Linear(hidden, 1)
        self.hidden = hidden

    def __len__(self) -> int:
        return len(self.proj)

    def init_state(self, x: Tensor) -> tuple[Tensor, Tensor]:
        h = x.new_zeros(x.shape[0], self.hidden)
        return h, h.clone()

    def step(self, i: int, x: Tensor, state: tuple[Tensor, Tensor]) -> tuple[Tensor, tuple[Tensor, Tensor]]:
        h, c = self.lstm(pooled_linear(x, self.proj[i]), state)
        return F.linear(h, self.out.weight, self.out.bias).squeeze(1), (h, c)

    def bound_steps(self) -> list[Callable[[Tensor, Any], tuple[Tensor, Any]]]:
        """Each gate's step as one compiled call where the kernels are built (:func:`ponder.fast.bound_lstm_gate`:
        mean, projection, LSTM cell, keep logit; equal up to float rounding), else :meth:`step`."""
        steps = [fast.bound_lstm_gate(proj, self.lstm, self.out) for proj in self.proj]
        return super().bound_steps() if None in steps else steps  # type: ignore[return-value]

    def final_layers(self) -> list[nn.Module]:
        return [self.out]


def make_gate_bank(gate_type: str, channels: list[int]) -> GateBank:
    """Gates for blocks reading ``channels[i]``-channel maps: ``"ffgate1"``, ``"ffgate2"`` or ``"rnn"``."""
    if gate_type == "ffgate1":
        bank: GateBank = FeedForwardGates([FFGateI(c) for c in channels])
    elif gate_type == "ffgate2":
        bank = FeedForwardGates([FFGateII(c) for c in channels])
    elif gate_type == "rnn":
        bank = RecurrentGates(channels)
    else:
        raise ValueError(f"gate_type must be one of {GATE_TYPES}, got {gate_type!r}")
    init_gate_weights(bank)
    return bank


def init_gate_weights(module: nn.Module) -> None:
    """SkipNet's init: conv ``N(0, sqrt(2 / (k*k*C_out)))``, Linear ``N(0, sqrt(2 / (in*out)))``, BN 1/0.

    Biases (and the LSTM cell) keep PyTorch's default initialisation.
    """
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            k = m.kernel_size[0] * m.kernel_size[1]
            nn.init.normal_(m.weight, 0.0, math.sqrt(2.0 / (k * m.out_channels)))
        elif isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, 0.0, math.sqrt(2.0 / (m.in_features * m.out_features)))
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
