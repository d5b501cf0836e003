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

import torch
import torch.nn as nn
from torch import Tensor

from ponder.cost import CostLedger, count_macs
from ponder import fast
from ponder.nn.sparse_units import branch_convs, first_conv_mask, unit_info
from ponder.nn.protocols import ResidualBlock


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
    """Dense MACs of ``block.shortcut`` on one ``(C, H, W)`` input (0 for identity / zero-pad / avg-pool); counted in
    eval mode."""
    if block.downsample is None:
        return 0
    per = _SHORTCUT.setdefault(block, {})
    key = tuple(int(s) for s in in_size)
    if key not in per:
        p = next(block.parameters())
        ds, was_training = block.downsample, block.downsample.training
        ds.eval()  # a train-mode BatchNorm would move its statistics towards the zero input
        try:
            per[key] = count_macs(block.shortcut, torch.zeros(1, *key, device=p.device, dtype=p.dtype))
        finally:
            ds.train(was_training)
    return per[key]


def position_units(name: str, block: ResidualBlock, in_size: tuple[int, int, int]) -> dict[str, int]:
    """A unit's per-position ledger units on a ``(C, H, W)`` input: ``name.skip`` (the shortcut, dense),
    ``name.first`` (MACs per position of its first conv) and ``name.rest`` (of its other convs together),
    the names :func:`unit_masks_and_macs` charges."""
    convs = branch_convs(block)
    return {f"{name}.skip": shortcut_macs(block, in_size),
            f"{name}.first": sum(position_macs(getattr(block, c)) for c, on_first in convs if on_first),
            f"{name}.rest": sum(position_macs(getattr(block, c)) for c, on_first in convs if not on_first)}


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


def unit_masks_and_macs(block: ResidualBlock, in_size: tuple[int, int, int], mask: Tensor, ledger: CostLedger,
                        unit: str, halt: str | None = None) -> tuple[Tensor, Tensor]:
    """``(first-conv mask, per-sample MACs [B])`` of a unit run where ``mask [B, Ho, Wo]`` (bool).

    The MACs are the ledger's charge of the unit's per-position units (``unit.skip`` once,
    ``unit.first`` per position of the first-conv mask, ``unit.rest`` per active position) plus the
    halting unit ``halt`` for every sample with an active position. A stride-1 unit (whose first-conv
    mask is the 3x3 dilation of ``mask`` for both block types) takes one compiled pass over the mask
    that counts and charges in one go (:func:`ponder.fast.unit_masks`, with the same ledger values).
    """
    names = (f"{unit}.skip", f"{unit}.first", f"{unit}.rest") + ((halt,) if halt else ())
    if unit_info(block).stride == 1:
        costs = [float(ledger[n]) for n in names] + [0.0] * (4 - len(names))
        fused = fast.unit_masks(mask, *costs)
        if fused is not None:
            return fused
    first = first_conv_mask(block, mask, (int(in_size[1]), int(in_size[2])))
    counts = [torch.ones(mask.shape[0], dtype=torch.float64, device=mask.device),
              first.flatten(1).sum(1).to(torch.float64), mask.flatten(1).sum(1).to(torch.float64)]
    if halt:
        counts.append(mask.flatten(1).any(1).to(torch.float64))
    return first, ledger.charge(names, torch.stack(counts, 1))
