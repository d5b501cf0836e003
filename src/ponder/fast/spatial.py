"""Fused CPU kernels for the spatial (SACT) executor, built by `ponder kernels build` (optional).

Five steps of a SACT unit at inference each take one C++ call and one pass over their data
(``csrc/fused_spatial.cpp``) instead of several PyTorch calls:

- :func:`residual_epilogue`: the dense fall-back's ``relu(s + b)`` at active positions, ``s``
  (or ``relu(s)``) elsewhere, in place into the branch output;
- :func:`spatial_halting`: the halting map ``sigmoid(conv3x3(BN(x)) + linear(GAP(BN(x))))`` from
  the BN-folded tap and global weights, with the global mean taken in the same pass;
- :func:`act_step`: the inference ACT step (halting test, ``p``, sums, remainder) and the
  mean-field accumulation ``out += p * x``;
- :func:`unit_masks`: a stride-1 unit's dilated first-conv mask and its per-sample MACs (the
  ledger's count of active positions) in one pass over the mask;
- :func:`scatter_residual`: the sparse kernel's epilogue, ``relu(out + y)`` written back into
  the active rows of the output table;
- :func:`sact_step`: a SACT unit's halting scores, ACT step and the next unit's dilated mask, MACs and
  activity in one call (what :func:`spatial_halting`, :func:`act_step` and :func:`unit_masks` do in three);
- :func:`mask_logits`: DynConv's mask unit (a strided 3x3 conv ``C -> 1`` plus a global term), its
  logits in one GEMM and one pass; :func:`mask_decide`: a DynConv block's whole decision (logits,
  threshold, dilated mask, per-sample MACs and active counts) in one call.

Each returns ``None`` where it does not apply (:func:`spatial_halting`: check
:func:`spatial_halting_applies` first), and the caller runs its PyTorch code instead:
without the built module (``ponder kernels build``), with fast paths off (``PONDER_FAST=0``), with
autograd, off the CPU, outside float32, for tensors that are not channels-last contiguous, and
under a ``TorchDispatchMode`` such as ``FlopCounterMode`` (which cannot see inside the kernels, so
cost counting always runs the PyTorch path). The results equal the PyTorch path's up to float
rounding (the halting test and the ACT sums exactly; tested).
"""

from __future__ import annotations

import torch
from torch import Tensor

from ponder.fast.gemm import onednn_available
from ponder.fast.native import load
from ponder.fast.routes import choose
from ponder.fast.switch import cpu_inference


def _extension():
    return load("spatial")


def kernels_available() -> bool:
    """Whether the fused kernels are compiled and loadable here (builds them on the first call)."""
    return _extension() is not None


def _usable(t: Tensor) -> bool:
    """No autograd, no dispatch mode (cost counting), ``t`` on the CPU, and the kernels built."""
    return cpu_inference(t) and _extension() is not None


def _cl(t: Tensor) -> bool:
    return t.dim() == 4 and t.dtype == torch.float32 and t.is_contiguous(memory_format=torch.channels_last)


def _map(t: Tensor, dtype: torch.dtype) -> bool:
    return t.dim() == 3 and t.dtype == dtype and t.is_contiguous()


def residual_epilogue(y: Tensor, s: Tensor, mask: Tensor, relu_inactive: bool) -> Tensor | None:
    """``y <- relu(s + y)`` where ``mask [B, H, W]``, ``s`` (``relu(s)`` with ``relu_inactive``) elsewhere.

    ``y`` (the branch output) and ``s`` (the shortcut) ``[B, C, H, W]`` channels-last; returns ``y``
    (written in place), or ``None`` where the kernel does not apply.
    """
    if not (_usable(y) and _cl(y) and _cl(s) and _map(mask, torch.bool) and y.shape == s.shape
            and tuple(mask.shape) == (y.shape[0], y.shape[2], y.shape[3])):
        return None
    return _extension().residual_epilogue(y, s, mask, relu_inactive)


def spatial_halting_applies(x: Tensor) -> bool:
    """Whether :func:`spatial_halting` runs on ``x`` (so the caller need not fold its weights otherwise)."""
    return _usable(x) and _cl(x)


def spatial_halting(x: Tensor, weights: Tensor, shifts: Tensor, glob_shift: float, bias: float) -> Tensor:
    """Halting map ``[B, H, W]`` from a channels-last ``x [B, C, H, W]``; only where
    :func:`spatial_halting_applies` (the caller checks: no autograd, CPU, kernels built).

    ``weights [10, C]``: rows ``3 kh + kw`` the local 3x3 conv's taps, row 9 the global term's
    weight, all times the BN scale; ``shifts [10]``: the taps times the BN shift (added only inside
    the map: zero padding of the BN'd input), 0 for row 9; ``glob_shift``: the global weight times
    the BN shift; ``bias``: the local conv's bias. The ten dot products per position are one GEMM
    (the tap planes ``[10, B*H*W]``, on BLAS or oneDNN, whichever made the whole kernel faster for
    this shape when timed once); the rest is one pass.
    """
    if not _cl(x) or weights.shape != (10, x.shape[1]):
        raise ValueError(f"spatial_halting needs a channels-last float32 map and [10, C] weights; "
                         f"got x {list(x.shape)}, weights {list(weights.shape)}")
    ext = _extension()
    route = choose("halting_planes", (tuple(x.shape), torch.get_num_threads()), lambda: [  # ties: BLAS
        ("blas", lambda: ext.spatial_halting(x, weights, shifts, None, glob_shift, bias)),
        *([("onednn", lambda: _halting_onednn(x, weights, shifts, glob_shift, bias))] if onednn_available() else [])])
    if route == "onednn":
        return _halting_onednn(x, weights, shifts, glob_shift, bias)
    return ext.spatial_halting(x, weights, shifts, None, glob_shift, bias)


def _halting_onednn(x: Tensor, weights: Tensor, shifts: Tensor, glob_shift: float, bias: float) -> Tensor:
    # oneDNN's GEMM is up to 2x faster than BLAS's [10, P] one on most of SACT's shapes here, but its
    # position-major planes make the 3x3 sum strided: the route is timed end to end, once per shape
    rows = x.permute(0, 2, 3, 1).reshape(-1, x.shape[1])  # a view: [B*H*W, C]
    planes = torch.ops.mkldnn._linear_pointwise(rows, weights, shifts, "none", [], "").t()
    return _extension().spatial_halting(x, weights, shifts, planes, glob_shift, bias)


def mask_logits(x: Tensor, weights: Tensor, glob_bias: float, bias: float, stride: int) -> Tensor | None:
    """DynConv mask logits ``[B, Ho, Wo]`` of a channels-last ``x [B, C, H, W]``, or ``None`` where the kernel does
    not apply: ``conv3x3(x; stride, padding 1) + bias + weights[9] . mean(x) + glob_bias``.

    ``weights [10, C]``: rows ``3 kh + kw`` the local conv's taps, row 9 the global term's weight.
    """
    if not (_usable(x) and _cl(x) and weights.shape == (10, x.shape[1]) and weights.dtype == torch.float32):
        return None
    return _extension().mask_logits(x, weights, float(glob_bias), float(bias), int(stride))


def mask_decide(x: Tensor, weights: Tensor, glob_bias: float, bias: float, stride: int, threshold: float,
                forced: Tensor | None, dilate: bool, base: float, first_macs: float,
                rest_macs: float) -> tuple[Tensor, Tensor | None, Tensor, int, int] | None:
    """A DynConv block's decision on a channels-last float32 input ``x``, or ``None`` where the kernel does not apply.

    The mask ``logits >= threshold`` (:func:`mask_logits`; or ``forced [B, Ho, Wo]``, contiguous bool, the logits
    computed all the same), its 3x3 dilation at the same grid when ``dilate`` (else ``None``), per-sample MACs
    ``[B]`` float64 ``base + first_macs * |dilated| + rest_macs * |mask|`` (``|dilated|`` counted as 0 without
    ``dilate``) and the active counts ``|mask|`` and ``|dilated|`` over the batch. ``weights [10, C]`` float32 as
    for :func:`mask_logits` (the caller's promise: unchecked, this runs once per block).
    """
    if not (_usable(x) and _cl(x)):
        return None
    return _extension().mask_decide(x, weights, glob_bias, bias, stride, threshold, forced, dilate, base,
                                    first_macs, rest_macs)


def sact_step(hsum: Tensor, n: Tensor, remainder: Tensor, run: Tensor, x: Tensor, output: Tensor | None,
              halting: tuple[Tensor, Tensor, float, float] | None, forced_h: Tensor | None, eps: float,
              next_costs: tuple[float, float, float, float] | None
              ) -> tuple[Tensor, Tensor, Tensor, Tensor | None, Tensor | None, int, int] | None:
    """A SACT unit's inference tail (after the unit computed its output ``x``), or ``None`` where it does not apply.

    The halting scores of ``x`` from ``halting = (weights, shifts, glob_shift, bias)`` (:func:`spatial_halting`;
    ``None`` for a stage's last unit), replaced by ``forced_h`` when given (still computed); the ACT step on them
    (:func:`act_step`: ``hsum``, ``n``, ``remainder`` updated in place, ``output + p * x``); and with
    ``next_costs = (base, first_macs, rest_macs, halt_macs)`` the next unit's mask (the new running map) dilated
    3x3 and its per-sample MACs (:func:`unit_masks`). Returns ``(p, running, output, next first-conv mask,
    next MACs, running positions, dilated positions)`` (mask and MACs ``None``, counts 0 without ``next_costs``).
    """
    if not (_usable(run) and _cl(x) and _map(hsum, torch.float32) and _map(run, torch.bool)
            and (output is None or (_cl(output) and output.shape == x.shape))):
        return None
    w10 = t10 = planes = None
    gconst = bias = 0.0
    if halting is not None:
        w10, t10, gconst, bias = halting
        ext = _extension()
        route = choose("halting_planes", (tuple(x.shape), torch.get_num_threads()), lambda: [  # ties: BLAS
            ("blas", lambda: ext.spatial_halting(x, w10, t10, None, gconst, bias)),
            *([("onednn", lambda: _halting_onednn(x, w10, t10, gconst, bias))] if onednn_available() else [])])
        if route == "onednn":
            planes = torch.ops.mkldnn._linear_pointwise(x.permute(0, 2, 3, 1).reshape(-1, x.shape[1]), w10, t10,
                                                        "none", [], "").t()
    base, first_macs, rest_macs, halt_macs = next_costs or (0.0, 0.0, 0.0, 0.0)
    return _extension().sact_step(hsum, n, remainder, run, x, output, w10, t10, planes, float(gconst), float(bias),
                                  forced_h, float(eps), next_costs is not None, float(base), float(first_macs),
                                  float(rest_macs), float(halt_macs))


def sact_step_applies(x: Tensor) -> bool:
    """Whether :func:`sact_step` runs on SACT states like ``x`` (float32, CPU inference, kernels built)."""
    return _usable(x) and x.dtype == torch.float32


def act_step(hsum: Tensor, n: Tensor, remainder: Tensor, run: Tensor, h: Tensor | None, x: Tensor | None,
             output: Tensor | None, eps: float, last: bool) -> tuple[Tensor, Tensor, Tensor | None] | None:
    """One inference ACT step on per-position maps ``[B, H, W]``, or ``None``.

    Updates ``hsum``, ``n`` and ``remainder`` (``ACTAccumulator``'s sums: same shape, dtype and
    layout as each other) in place; returns ``(p, running after the step, output)`` with
    ``output = p * x`` (new) or ``output + p * x`` (in place); ``h`` is ``None`` for the last unit,
    ``x`` ``None`` when no state is accumulated.
    """
    if not (_usable(run) and _map(hsum, torch.float32) and _map(run, torch.bool) and hsum.shape == run.shape
            and n.is_contiguous() and remainder.is_contiguous()):
        return None
    if h is None and not last or h is not None and not (_map(h, torch.float32) and h.shape == run.shape):
        return None
    if x is not None:
        if not (_cl(x) and tuple(run.shape) == (x.shape[0], x.shape[2], x.shape[3])):
            return None
        if output is not None and not (_cl(output) and output.shape == x.shape):
            return None
    p, running, out = _extension().act_step(hsum, n, remainder, run, h, x, output, float(eps), bool(last))
    return p, running, (out if x is not None else None)


def unit_masks(mask: Tensor, base: float, first_macs: float, rest_macs: float,
               halt_macs: float) -> tuple[Tensor, Tensor] | None:
    """For a stride-1 unit's ``mask [B, H, W]`` (bool): its 3x3 dilation (where the first conv runs)
    and the per-sample MACs ``[B]`` (float64) ``base + first_macs * |dilated| + rest_macs * |mask|``,
    plus ``halt_macs`` for samples with an active position; or ``None``."""
    if not (_usable(mask) and _map(mask, torch.bool)):
        return None
    first, macs = _extension().unit_masks(mask, float(base), float(first_macs), float(rest_macs), float(halt_macs))
    return first, macs


def scatter_residual(out: Tensor, rows: Tensor, y: Tensor, relu_all: bool) -> Tensor | None:
    """``out[rows] = relu(out[rows] + y)`` in place on a ``[R, C]`` row table (``rows [n]`` int64,
    ``y [n, C]``), every other row relu'd too with ``relu_all``; or ``None``."""
    if not (_usable(out) and out.dtype == torch.float32 and y.dtype == torch.float32 and rows.dtype == torch.int64
            and out.dim() == 2 and out.is_contiguous() and y.is_contiguous() and rows.is_contiguous()
            and y.shape == (rows.shape[0], out.shape[1])):
        return None
    return _extension().scatter_residual(out, rows, y, relu_all)
