"""Per-sample MACs of residual units run at active positions (the spatial cost ledger).

Per unit and sample: ``shortcut MACs (dense) + sum over branch convs of
active_positions(sample) x MACs per position``, where the first conv is charged on its
(dilated) first-conv mask and the others on the unit mask (``reference/spatial.md`` 2.2, 3.5).
Per-position costs are measured with ``FlopCounterMode`` on a 1x1-output equivalent of each conv,
so this ledger equals ``FlopCounterMode`` on the sparse executor (whose one GEMM per conv does
``n_active x k*k*C_in x C_out`` MACs). The dense fall-back spends more than this; the ledger states
the algorithmic cost, as the papers report it.
"""

from __future__ import annotations

import weakref
from typing import TYPE_CHECKING

import torch
import torch.nn as nn
from torch import Tensor

from ponder.cost import count_macs
from ponder.nn.fused_spatial import unit_masks
from ponder.nn.sparse_units import branch_convs, first_conv_mask, unit_info

if TYPE_CHECKING:  # duck-typed at run time (no import cycle with ponder.models)
    from ponder.models.resnet import ResidualBlock

_POSITION: "weakref.WeakKeyDictionary[nn.Conv2d, int]" = weakref.WeakKeyDictionary()
_SHORTCUT: "weakref.WeakKeyDictionary[nn.Module, dict[tuple, int]]" = weakref.WeakKeyDictionary()


def position_macs(conv: nn.Conv2d) -> int:
    """MACs of ``conv`` per output position, counted by ``FlopCounterMode`` on an input giving a 1x1 output."""
    if conv not in _POSITION:
        k, p = conv.kernel_size, conv.padding
        size = (1, conv.in_channels, k[0] - 2 * p[0], k[1] - 2 * p[1])
        _POSITION[conv] = count_macs(conv, torch.zeros(size, device=conv.weight.device, dtype=conv.weight.dtype))
    return _POSITION[conv]


def shortcut_macs(block: ResidualBlock, in_size: tuple[int, int, int]) -> int:
    """Dense MACs of ``block.shortcut`` on one ``(C, H, W)`` input (0 for identity / zero-pad / avg-pool)."""
    if block.downsample is None:
        return 0
    per = _SHORTCUT.setdefault(block, {})
    key = tuple(int(s) for s in in_size)
    if key not in per:
        p = next(block.parameters())
        per[key] = count_macs(block.shortcut, torch.zeros(1, *key, device=p.device, dtype=p.dtype))
    return per[key]


def residual_macs(block: ResidualBlock, in_size: tuple[int, int, int], mask: Tensor,
                  first: Tensor | None = None) -> Tensor:
    """Per-sample MACs ``[B]`` (float64) of ``block`` on ``(C, H, W)`` inputs applied where ``mask [B, Ho, Wo]``.

    An all-zero mask costs the shortcut only; an all-one mask the dense unit. ``first`` is the
    unit's first-conv mask of ``mask`` when the caller has it (computed if ``None``).
    """
    hard = mask if mask.dtype == torch.bool else mask != 0
    if first is None:
        first = first_conv_mask(block, hard, (int(in_size[1]), int(in_size[2])))
    n_first = first.flatten(1).sum(1).to(torch.float64)
    n_mask = hard.flatten(1).sum(1).to(torch.float64)
    total = torch.full_like(n_mask, float(shortcut_macs(block, in_size)))
    for name, on_first in branch_convs(block):
        total = total + (n_first if on_first else n_mask) * position_macs(getattr(block, name))
    return total


def unit_masks_and_macs(block: ResidualBlock, in_size: tuple[int, int, int], mask: Tensor,
                        halt_macs: float = 0.0) -> tuple[Tensor, Tensor]:
    """``(first-conv mask, per-sample MACs [B])`` of a unit run where ``mask [B, Ho, Wo]`` (bool).

    The MACs are :func:`residual_macs` plus ``halt_macs`` (a halting branch's cost) for every sample
    with an active position. A stride-1 unit (whose first-conv mask is the 3x3 dilation of ``mask``
    for both block types) takes one compiled pass over the mask
    (:func:`ponder.nn.fused_spatial.unit_masks`) where available; the values are the same.
    """
    info = unit_info(block)  # its per-position MACs are the ledger's (C_out * C_in * k * k per conv)
    if info.stride == 1:
        fused = unit_masks(mask, shortcut_macs(block, in_size), info.first_macs, info.rest_macs, halt_macs)
        if fused is not None:
            return fused
    first = first_conv_mask(block, mask, (int(in_size[1]), int(in_size[2])))
    macs = residual_macs(block, in_size, mask, first=first)
    if halt_macs:
        macs = macs + mask.flatten(1).any(1).double() * halt_macs
    return first, macs
