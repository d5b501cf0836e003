"""Shared early-exit machinery: the pieces every multi-exit family uses.

The multi-exit *contract* and both executors live in :class:`ponder.models.multi_exit.MultiExitModel`.
A family describes itself stepwise:

- ``run_block(k, state) -> state``: everything computed between exit ``k-1`` and exit ``k``
  (block 0 receives the image ``x [B, C, H, W]``). ``state`` is any pytree of tensors whose
  first dimension is the batch, so the sparse executor can keep a subset (:func:`select_samples`).
- ``exit_features(k, state) -> [B, C_k]`` and ``exit_classifier(k, feat) -> [B, classes]``;
  optionally ``exit_outputs(k, state) -> (feat, logits)`` computing both at once (MSDNet and
  RANet run their whole exit head as one compiled call at inference).
- ``exit_feature_dims()``, ``stage_modules(k)``, ``exit_modules(k)``; optionally ``scale_gradient``.

This module holds the executor-independent parts: gradient rescaling (IMTA gradient
equilibrium), sample selection and the IMTA collaboration heads.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
import torch.nn as nn
from torch import Tensor
from torch.utils._pytree import tree_map

from ponder.layout import is_channels_last


class _GradRescale(torch.autograd.Function):
    """Identity in the forward pass; multiplies the gradient by ``scale`` in the backward pass.

    In forward-mode AD the tangent is multiplied by ``scale`` too (``jvp``), so a Jacobian-vector
    product is the transpose of what the backward pass applies (L2W's meta-gradient uses it).
    The forward returns a copy, since forward AD needs a view's tangent to be a view.
    """

    @staticmethod
    def forward(ctx: Any, x: Tensor, scale: float) -> Tensor:
        ctx.scale = scale
        return x.clone()

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:
        return grad * ctx.scale, None

    @staticmethod
    def jvp(ctx: Any, tangent: Tensor, _: Any) -> Tensor:
        return tangent * ctx.scale


def gradient_rescale(x: Tensor, scale: float) -> Tensor:
    """``x`` unchanged, with its gradient multiplied by ``scale`` (IMTA gradient equilibrium)."""
    return _GradRescale.apply(x, scale)


def select_samples(state: Any, idx: Tensor) -> Any:
    """Keep the samples ``idx [n]`` (long) of every tensor in the pytree ``state``, each in its own layout."""
    return tree_map(lambda t: _select(t, idx) if isinstance(t, Tensor) else t, state)


def _select(t: Tensor, idx: Tensor) -> Tensor:
    if t.dim() == 4 and is_channels_last(t):
        out = torch.empty((idx.shape[0],) + tuple(t.shape[1:]), dtype=t.dtype, device=t.device,
                          memory_format=torch.channels_last)
        return torch.index_select(t, 0, idx, out=out)
    return t.index_select(0, idx)


class CollaborationHeads(nn.Module):
    """IMTA inline subnetwork collaboration (ISC) heads.

    Exit 0: ``Linear(C_0 -> classes)`` on the pooled feature. Exit ``k >= 1``:
    ``Linear(2 C_k -> classes)`` on ``cat[feat_k, ReLU(BN1d(Linear(classes -> C_k)(new_logits_{k-1})))]``
    (the previous new logits are not detached).
    """

    def __init__(self, widths: Sequence[int], num_classes: int):
        super().__init__()
        self.heads = nn.ModuleList(
            [nn.Linear(w if k == 0 else 2 * w, num_classes) for k, w in enumerate(widths)])
        self.isc = nn.ModuleList([
            nn.Sequential(nn.Linear(num_classes, w), nn.BatchNorm1d(w), nn.ReLU(inplace=True))
            for w in widths[1:]])

    def forward(self, k: int, feat: Tensor, prev_logits: Tensor | None) -> Tensor:
        """New logits ``[B, classes]`` of exit ``k`` from ``feat [B, C_k]`` and exit ``k-1``'s new logits."""
        if k == 0:
            return self.heads[0](feat)
        return self.heads[k](torch.cat([feat, self.isc[k - 1](prev_logits)], dim=1))
