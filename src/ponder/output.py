"""The one result type every ponder model returns from ``forward``."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor


@dataclass
class DynamicOutput:
    """What a forward pass produced and what it cost, per sample.

    Attributes:
        logits: ``[B, K]`` the prediction (for multi-exit models: of the exit each sample took).
        macs: ``[B]`` float64 multiply-accumulates this sample really cost, including
            policy / gate / mask-unit / halting-branch cost.
        exit_logits: multi-exit models: one ``[B, K]`` tensor per exit (compute-all path).
        exit_index: ``[B]`` long, the exit each sample took.
        gates: ``[B, blocks]`` keep decisions of block-skipping models (1 = ran).
        masks: spatial models: one ``[B, H, W]`` mask of active positions per unit.
        ponder: spatial / ACT models: ``[B, H, W]`` (or ``[B]``) ponder-cost maps per stage.
        extras: anything a training objective needs (log-probs, ponder cost, features...).
    """

    logits: Tensor
    macs: Tensor
    exit_logits: list[Tensor] | None = None
    exit_index: Tensor | None = None
    gates: Tensor | None = None
    masks: list[Tensor] | None = None
    ponder: list[Tensor] | None = None
    extras: dict[str, Any] = field(default_factory=dict)

    @property
    def batch_size(self) -> int:
        return self.logits.shape[0]


def static_output(logits: Tensor, macs_per_sample: int) -> DynamicOutput:
    """Output of a static network: every sample costs the same ``macs_per_sample``."""
    macs = torch.full((logits.shape[0],), float(macs_per_sample), dtype=torch.float64, device=logits.device)
    return DynamicOutput(logits=logits, macs=macs)
