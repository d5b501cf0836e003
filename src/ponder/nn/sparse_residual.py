"""Residual units run at active positions only, with a measured fall-back to dense.

:func:`sparse_residual` is the inference executor, :func:`masked_residual` the dense
reference that trains; both compute (see :mod:`ponder.nn.sparse_units` for the exact rule)::

    out = relu(shortcut(x) + branch(x))   at active positions
    out = shortcut(x)                     elsewhere      (inactive="shortcut": x itself for
                                                          units without a downsample)

:class:`SparseResidual` wraps a block with an ``executor`` attribute (``"masked"`` / ``"sparse"``),
so :func:`ponder.nn.set_executor` switches it.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn as nn
from torch import Tensor
from torch.utils._python_dispatch import _get_current_dispatch_mode

from ponder import fast
from ponder.nn.protocols import ResidualBlock
from ponder.nn.sparse_fallback import break_even_for
from ponder.nn.sparse_units import (
    Inactive,
    bound_dense_fallback,
    check_unit,
    dense_fallback,
    first_conv_mask,
    folded_shortcut,
    is_basic,
    masked_residual,
    run_sparse,
    work_fraction,
)


BreakEven = float | str | None
_DEFAULT: list[BreakEven] = ["auto"]


def set_default_break_even(value: BreakEven) -> None:
    """Process-wide default of ``break_even`` for :func:`sparse_residual` (``"auto"`` initially)."""
    _check_break_even(value)
    _DEFAULT[0] = value


def get_default_break_even() -> BreakEven:
    """The current process-wide default ``break_even``."""
    return _DEFAULT[0]


def _check_break_even(value: BreakEven) -> None:
    if not (value is None or value == "auto" or (isinstance(value, (int, float)) and not isinstance(value, bool))):
        raise ValueError(f"break_even must be 'auto', a work fraction in [0, 1] or None, got {value!r}")


@dataclass(frozen=True)
class UnitPlan:
    """A unit's inference prepared for inputs of one shape (:func:`plan_unit`): the work fraction above
    which it runs densely (``None``: always sparse) and its dense fall-back with the convolutions bound,
    ``fallback(x, mask) -> out``."""

    limit: float | None
    fallback: Callable[[Tensor, Tensor], Tensor]


def plan_unit(block: ResidualBlock, x: Tensor, inactive: Inactive = "shortcut",
              break_even: BreakEven = "default") -> UnitPlan:
    """:func:`sparse_residual`'s per-call lookups for ``block`` on inputs shaped like ``x``, done now: its
    break-even fraction and its dense fall-back bound (:func:`~ponder.nn.sparse_units.bound_dense_fallback`).
    Valid while the block's weights are unchanged (the caller's :mod:`ponder.fast.plan` checks)."""
    return UnitPlan(_limit(block, x, inactive, break_even), bound_dense_fallback(block, x, inactive))


def _limit(block: ResidualBlock, x: Tensor, inactive: str, break_even: BreakEven) -> float | None:
    """The work fraction above which ``block`` runs densely on ``x`` (``None``: always sparse)."""
    if break_even == "default":
        break_even = _DEFAULT[0]
    if break_even == "auto" and (not fast.enabled() or _get_current_dispatch_mode() is not None):
        # no timed fall-back with fast paths off, and cost counting (FlopCounterMode) sees the sparse path
        # the ledger charges: the measured fall-back is a speed choice, not another algorithm
        break_even = None
    _check_break_even(break_even)
    if break_even is None:
        return None
    return break_even_for(block, x, inactive) if break_even == "auto" else float(break_even)


def sparse_residual(block: ResidualBlock, x: Tensor, mask: Tensor, inactive: Inactive = "shortcut",
                    break_even: BreakEven = "default", first: Tensor | None = None,
                    overwrite: bool = False, active: tuple[int, int] | None = None,
                    plan: UnitPlan | None = None) -> Tensor:
    """Run ``block`` only where ``mask`` is set (inference): ``[B, C, H, W]`` -> ``[B, C', Ho, Wo]``.

    Args:
        block: an eval-mode ``BasicBlock`` or ``Bottleneck`` (any stride; shortcuts run densely).
        x: the unit input. Channels-last inputs avoid one layout copy.
        mask: ``[B, Ho, Wo]`` on the unit's output grid; nonzero = active.
        inactive: ``"shortcut"`` (copy the shortcut forward, SACT) or ``"relu"`` (``relu(shortcut)``,
            DynConv); see :mod:`ponder.nn.sparse_units`.
        break_even: run densely when the unit's work fraction (sparse branch MACs / dense branch
            MACs, dilation included) exceeds this: ``"auto"`` = calibrated on this device per unit and
            input shape (:func:`ponder.nn.sparse_fallback.break_even_for`; with fast paths off: ``None``),
            a float = fixed, ``None`` = always sparse, ``"default"`` = :func:`set_default_break_even`'s value.
        first: the unit's :func:`~ponder.nn.sparse_units.first_conv_mask` of ``mask`` (bool), when the
            caller already has it (e.g. for :func:`ponder.nn.sparse_cost.residual_macs`); computed if ``None``.
        overwrite: the caller no longer needs ``x``: the sparse kernel may write the output into
            ``x``'s storage (identity shortcut, channels-last ``x``) instead of into a copy of it.
        active: ``(active positions of mask, of first)`` over the batch, when the caller counted them
            (with ``first``); counted here if ``None``.
        plan: the unit's :func:`plan_unit` for ``x``'s shape and this ``break_even`` (used with fast
            paths on and no dispatch mode, in place of the lookups it holds).

    Returns a new tensor (contiguous channels_last on the sparse path; the dense fall-back keeps
    ``x``'s layout), or ``x`` itself when nothing is active and the unit has no downsample (with
    ``inactive="shortcut"``), or with ``overwrite`` possibly ``x`` updated in place. No gradient flows.
    """
    check_unit(block, x, mask, inactive)
    if block.training:
        raise ValueError("the sparse executor is inference-only: call model.eval(), or use executor='masked' "
                         "to train.")
    planned = plan is not None and fast.enabled() and _get_current_dispatch_mode() is None
    if not planned:
        _check_break_even(_DEFAULT[0] if break_even == "default" else break_even)
    with torch.no_grad():
        m = mask if mask.dtype == torch.bool else mask != 0
        counted = active is not None and first is not None
        n = active[0] if counted else int(m.sum())
        if n == 0:
            s = folded_shortcut(block, x)
            return torch.relu(s) if inactive == "relu" else s
        fallback = plan.fallback if planned else functools.partial(dense_fallback, block, inactive=inactive)
        if n == m.numel():  # every position active: the dense unit (BN folded, as the fall-back)
            return fallback(x, m)
        limit = plan.limit if planned else _limit(block, x, inactive, break_even)
        if limit is not None:
            first_total = m.numel() if is_basic(block) else x.shape[0] * x.shape[2] * x.shape[3]
            # the first conv runs on at least the n active positions: a lower bound, no dilation needed
            if limit <= 0.0 or work_fraction(block, n, n, first_total, m.numel()) > limit:
                return fallback(x, m)
            if first is None:
                first = first_conv_mask(block, m, (x.shape[2], x.shape[3]))
            n_first = active[1] if counted else int(first.sum())
            if work_fraction(block, n_first, n, first_total, m.numel()) > limit:
                return fallback(x, m)
        elif first is None:
            first = first_conv_mask(block, m, (x.shape[2], x.shape[3]))
        return run_sparse(block, x, m, first, inactive, overwrite)


class SparseResidual(nn.Module):
    """A residual unit applied at active positions; ``forward(x, mask)``.

    ``executor = "masked"`` (default, and always while training) runs :func:`masked_residual`;
    ``"sparse"`` in eval mode runs :func:`sparse_residual`. Switch with ``set_executor``.
    The block is a submodule, so its parameters appear under ``block.``.
    """

    def __init__(self, block: ResidualBlock, inactive: Inactive = "shortcut",
                 break_even: BreakEven = "default"):
        super().__init__()
        _check_break_even(None if break_even == "default" else break_even)
        self.block, self.inactive, self.break_even = block, inactive, break_even
        self.executor = "masked"

    def forward(self, x: Tensor, mask: Tensor) -> Tensor:
        if self.executor == "sparse" and not self.training:
            return sparse_residual(self.block, x, mask, self.inactive, self.break_even)
        return masked_residual(self.block, x, mask, self.inactive)

    def extra_repr(self) -> str:
        return f"executor={self.executor!r}, inactive={self.inactive!r}, break_even={self.break_even!r}"
