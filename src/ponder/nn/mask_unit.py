"""DynConv's mask unit and its binary decisions (Verelst & Tuytelaars, CVPR 2020).

One mask unit per residual block reads the block input ``x [B, C, H, W]`` and scores every position of
the block's *output* grid::

    logit = conv3x3_{C->1}(x; stride = block stride, padding 1, bias) + linear_{C->1}(GAP(x))   # broadcast

Training samples a hard 0/1 mask with the binary Gumbel-sigmoid and a straight-through gradient
(:func:`gumbel_mask`); inference thresholds the logits (:func:`threshold_mask`), no noise.
"""

from __future__ import annotations

import torch
import torch.nn as nn
from torch import Tensor

from ponder import fast
from ponder.nn.thresholds import probability_logit

GUMBEL_EPS = 1e-8
"""Inside both logarithms of a Gumbel sample ``-log(-log(U + eps) + eps)`` (the official code's guard)."""


class MaskUnit(nn.Module):
    """Mask logits ``[B, Ho, Wo]`` of one residual block from its input ``x [B, C, H, W]``.

    A local 3x3 conv (``C -> 1``, the block's stride, padding 1, with bias) plus a global term, a linear
    layer (``C -> 1``, with bias) on the globally pooled input, broadcast over the map. Cost per image:
    ``9 C`` MACs per output position plus ``C``. PyTorch's default initialisation (as the official code).
    """

    def __init__(self, channels: int, stride: int = 1) -> None:
        super().__init__()
        self.local = nn.Conv2d(channels, 1, 3, stride=stride, padding=1)
        self.glob = nn.Linear(channels, 1)

    def forward(self, x: Tensor) -> Tensor:
        if not self.training and fast.enabled():  # one GEMM and one pass (compiled kernel) on a channels-last x
            logits = fast.mask_logits(x, *self._inference_weights(), self.local.stride[0])
            if logits is not None:
                return logits
        return self.local(x)[:, 0] + self.glob(x.mean((2, 3)))[:, :, None]

    def decide(self, x: Tensor, logit_threshold: float, forced: Tensor | None, dilate: bool, base: float,
               first_macs: float, rest_macs: float) -> tuple[Tensor, Tensor | None, Tensor, int, int] | None:
        """The block's whole inference decision in one compiled call (:func:`ponder.fast.mask_decide`): the mask
        ``logits >= logit_threshold`` (or ``forced``), its 3x3 dilation when ``dilate``, per-sample MACs and
        the active counts; ``None`` where the kernel does not apply (the caller runs :meth:`forward` and PyTorch ops)."""
        if self.training or not fast.enabled() or x.dtype != torch.float32:
            return None
        w10, glob_bias, bias, stride = self._inference_weights(with_stride=True)
        return fast.mask_decide(x, w10, glob_bias, bias, stride, logit_threshold, forced, dilate, base, first_macs,
                                rest_macs)

    def _inference_weights(self, with_stride: bool = False) -> tuple:
        """``(weights [10, C], global bias, local bias[, stride])``: rows ``3 kh + kw`` of the weights are the local
        conv's taps, row 9 the global weight (a plan, :func:`ponder.fast.prepared`: kept until a parameter changes)."""
        weights = fast.prepared(self, "inference_weights", self._fold_weights)
        return weights if with_stride else weights[:3]

    def _fold_weights(self) -> tuple[Tensor, float, float, int]:
        local, glob = self.local, self.glob
        with torch.no_grad():
            w10 = torch.cat([local.weight[0].permute(1, 2, 0).reshape(9, -1), glob.weight]).contiguous()
            return w10, float(glob.bias), float(local.bias), local.stride[0]


def gumbel_noise(shape: torch.Size | tuple[int, ...], like: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """Logistic noise ``g1 - g2`` of two independent Gumbel samples ``g = -log(-log(U + 1e-8) + 1e-8)``, ``U ~ U(0, 1)``."""
    u = torch.rand((2, *shape), generator=generator, device=like.device, dtype=like.dtype)
    g = -torch.log(-torch.log(u + GUMBEL_EPS) + GUMBEL_EPS)
    return g[0] - g[1]


def gumbel_mask(logits: Tensor, temperature: float = 1.0, noise: bool = True,
                generator: torch.Generator | None = None) -> Tensor:
    """Training mask: hard 0/1 values (float, ``logits``' shape) with the soft sample's gradient.

    ``soft = sigmoid((logits + noise) / temperature)`` with ``noise = g1 - g2`` (:func:`gumbel_noise`, when
    ``noise``); ``hard = 1[soft >= 0.5]``; returns ``hard - soft.detach() + soft`` (straight-through).
    """
    if temperature <= 0:
        raise ValueError(f"the Gumbel temperature must be > 0, got {temperature}")
    z = logits + gumbel_noise(logits.shape, logits, generator) if noise else logits
    soft = torch.sigmoid(z / temperature)
    hard = (soft >= 0.5).to(soft.dtype)
    return hard - soft.detach() + soft


def threshold_mask(logits: Tensor, threshold: float = 0.5) -> Tensor:
    """Inference mask ``[B, Ho, Wo]`` (bool): ``sigmoid(logits) >= threshold``, tested on the logits (0.5: ``logits >= 0``)."""
    return logits >= probability_logit(threshold)
