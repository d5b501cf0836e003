"""Residual units applied at active positions only: the dense reference and the sparse kernel.

Semantics, for ``x [B, C, H, W]`` and a unit mask ``mask [B, Ho, Wo]`` on the unit's output grid,
with ``s = block.shortcut(x)`` and ``b = block.branch(x)``:

* ``inactive="shortcut"`` (SACT: halted positions copy their input forward)::

      out = relu(s + b)  where mask,   out = s  elsewhere

  For a unit without a downsample ``s = x``, so inactive positions hold ``x`` unchanged.
* ``inactive="relu"`` (DynConv: ``relu(identity + mask * branch)``)::

      out = relu(s + b)  where mask,   out = relu(s)  elsewhere

Inside a post-activation ResNet a unit's input is a ReLU output (``x >= 0``), so both agree for
units without a downsample. Convs run where they are needed: the first conv of the unit on the
positions the following 3x3 conv reads (:func:`first_conv_mask`: the dilated mask), the others on
``mask``. Shortcuts (identity, option-A zero-pad, BlockDrop's avg-pool, 1x1 projection) are computed densely.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass
from typing import Callable, Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from ponder import fast
from ponder.nn.protocols import ResidualBlock
from ponder.nn.sparse_conv import (
    PositionIndex,
    empty_plane,
    gather_gemm,
    input_mask,
    padded_plane,
    soft_input_mask,
    plane_interior,
    rows_view,
    window_starts,
)


Inactive = Literal["shortcut", "relu"]
INACTIVE = ("shortcut", "relu")


@dataclass(frozen=True)
class UnitInfo:
    """Static facts of a residual unit, computed once per block (see :func:`unit_info`)."""

    basic: bool  # BasicBlock (3x3 -> 3x3) or Bottleneck (1x1 -> 3x3 -> 1x1)
    stride: int
    first_macs: int  # MACs per position of the first conv (runs on the first-conv mask)
    rest_macs: int  # MACs per position of the other branch convs together (run on the mask)
    signature: tuple  # conv shapes/strides and shortcut type: units alike share a calibration


_INFO: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def unit_info(block: ResidualBlock) -> UnitInfo:
    """:class:`UnitInfo` of a ``ponder.models.resnet`` ``BasicBlock`` / ``Bottleneck`` (cached).

    Blocks are recognised by their parts (``conv1, bn1, conv2, bn2[, conv3, bn3]``, ``branch``,
    ``shortcut``, ``downsample``), so this layer never imports the models package.
    """
    info = _INFO.get(block)
    if info is not None:
        return info
    parts = ("conv1", "bn1", "conv2", "bn2", "branch", "shortcut", "downsample")
    if not all(hasattr(block, a) for a in parts):
        raise TypeError(f"spatial residual execution supports ponder.models.resnet.BasicBlock and Bottleneck, "
                        f"got {type(block).__name__}")
    basic = not (hasattr(block, "conv3") and hasattr(block, "bn3"))
    if not basic and block.conv1.stride[0] != 1:
        raise ValueError("Bottleneck with a strided conv1 is not supported; put the stride on conv2 (torchvision).")
    convs = [block.conv1, block.conv2] + ([] if basic else [block.conv3])
    info = UnitInfo(
        basic=basic,
        stride=int((block.conv1 if basic else block.conv2).stride[0]),
        first_macs=conv_position_macs(convs[0]),
        rest_macs=sum(conv_position_macs(c) for c in convs[1:]),
        signature=(basic, type(block.downsample).__name__)
        + tuple(tuple(c.weight.shape) + tuple(c.stride) for c in convs),
    )
    _INFO[block] = info
    return info


def is_basic(block: ResidualBlock) -> bool:
    """True for a ``BasicBlock`` (two 3x3 convs), False for a ``Bottleneck``."""
    return unit_info(block).basic


def output_hw(block: ResidualBlock, in_hw: tuple[int, int]) -> tuple[int, int]:
    """Output grid of the unit for an ``in_hw`` input (3x3 convs with padding 1)."""
    s = unit_info(block).stride
    return (in_hw[0] - 1) // s + 1, (in_hw[1] - 1) // s + 1


def check_unit(block: ResidualBlock, x: Tensor, mask: Tensor, inactive: str = "shortcut") -> None:
    """One clear error for an unsupported block, input or mask shape."""
    if inactive not in INACTIVE:
        raise ValueError(f"inactive must be one of {INACTIVE}, got {inactive!r}")
    if x.dim() != 4:
        raise ValueError(f"x must be [batch, C, H, W], got shape {list(x.shape)}")
    want = (x.shape[0], *output_hw(block, (x.shape[2], x.shape[3])))
    if tuple(mask.shape) != want:
        raise ValueError(f"mask must be [batch, Ho, Wo] = {list(want)} (the unit's output grid), "
                         f"got {list(mask.shape)}")


def first_conv_mask(block: ResidualBlock, mask: Tensor, in_hw: tuple[int, int]) -> Tensor:
    """Where the unit's first conv must run for output ``mask [B, Ho, Wo]``: ``[B, H1, W1]`` bool.

    ``BasicBlock``: conv1's output grid (= ``mask``'s), dilated 3x3 (conv2 is 3x3).
    ``Bottleneck``: conv1's output = the input grid, every position a strided 3x3 conv2 reads.
    """
    if is_basic(block):
        return input_mask(mask, tuple(mask.shape[1:]), 3, 1)  # type: ignore[arg-type]
    return input_mask(mask, in_hw, 3, unit_info(block).stride)


def soft_first_conv_mask(block: ResidualBlock, mask: Tensor, in_hw: tuple[int, int]) -> Tensor:
    """:func:`first_conv_mask` of a 0/1 float ``mask [B, Ho, Wo]``, differentiable (same values; the gradient
    reaches ``mask``): what a sparsity criterion counts for the first conv."""
    if is_basic(block):
        return soft_input_mask(mask, tuple(mask.shape[1:]), 3, 1)  # type: ignore[arg-type]
    return soft_input_mask(mask, in_hw, 3, unit_info(block).stride)


def branch_convs(block: ResidualBlock) -> list[tuple[str, bool]]:
    """``(conv name, runs on the first-conv mask)`` for each conv of the unit's branch, in order."""
    if is_basic(block):
        return [("conv1", True), ("conv2", False)]
    return [("conv1", True), ("conv2", False), ("conv3", False)]


def conv_position_macs(conv: torch.nn.Conv2d) -> int:
    """MACs per output position of a groups=1 conv (``C_out * C_in * k_h * k_w``)."""
    return int(conv.weight.numel())


def work_fraction(block: ResidualBlock, n_first: int, n_mask: int, total_first: int, total_mask: int) -> float:
    """Branch MACs at these active counts over the dense branch MACs (what the sparse path computes)."""
    info = unit_info(block)
    return (info.first_macs * n_first + info.rest_macs * n_mask) / max(
        info.first_macs * total_first + info.rest_macs * total_mask, 1)


def masked_residual(block: ResidualBlock, x: Tensor, mask: Tensor, inactive: Inactive = "shortcut") -> Tensor:
    """Dense reference: the unit computed everywhere, applied where ``mask`` is set (see module doc).

    ``x [B, C, H, W]``, ``mask [B, Ho, Wo]`` -> ``[B, C', Ho, Wo]``. Differentiable; a float mask
    (e.g. straight-through Gumbel 0/1 samples) also passes gradients to the mask.
    """
    check_unit(block, x, mask, inactive)
    s, b = block.shortcut(x), block.branch(x)
    if mask.dtype == torch.bool:
        keep = mask[:, None]
        if inactive == "shortcut":
            return torch.where(keep, F.relu(s + b), s)
        return F.relu(s + torch.where(keep, b, torch.zeros_like(b)))
    m = mask.to(b.dtype)[:, None]
    if inactive == "shortcut":
        return s + m * (F.relu(s + b) - s)
    return F.relu(s + m * b)


def folded_branch(block: ResidualBlock, x: Tensor) -> Tensor:
    """``block.branch(x)`` in eval mode with every BN folded into its conv (:func:`ponder.fast.conv_bn`; no BN passes).

    The folded weights are :func:`~ponder.fast.fold_conv_bn`'s (the sparse kernel's),
    cached until they change.
    """
    pairs = [(block.conv1, block.bn1), (block.conv2, block.bn2)]
    if not is_basic(block):
        pairs.append((block.conv3, block.bn3))
    for i, (conv, bn) in enumerate(pairs):
        x = fast.conv_bn(x, conv, bn, relu=i < len(pairs) - 1)
    return x


def folded_shortcut(block: ResidualBlock, x: Tensor) -> Tensor:
    """``block.shortcut(x)`` in eval mode, a ``Conv2d -> BatchNorm2d`` downsample folded (:func:`ponder.fast.conv_bn`)."""
    ds = block.downsample
    if isinstance(ds, torch.nn.Sequential) and len(ds) == 2 and isinstance(ds[0], torch.nn.Conv2d) \
            and isinstance(ds[1], torch.nn.BatchNorm2d) and not ds.training:
        return fast.conv_bn(x, ds[0], ds[1], relu=False)
    return block.shortcut(x)


def unit_layout(block: ResidualBlock, x: Tensor) -> str | None:
    """The layout in which ``block``'s dense unit runs faster on ``x``'s shape at inference: ``"channels_last"``
    or ``"nchw"`` (mkldnn's strided channels-last 1x1 convs can be 2x slower at ResNet-50's last stage, other
    units gain); a stored route per unit shape, input shape, layout and thread count (:func:`ponder.fast.choose`),
    ``None`` (as given) with fast paths off."""
    if not fast.enabled():
        return None
    cl = torch.channels_last
    key = (unit_info(block).signature, tuple(x.shape), x.is_contiguous(), x.dtype, torch.get_num_threads())
    return fast.choose("unit_layout", key, lambda: [  # ties: channels-last
        ("channels_last", lambda: _dense_unit(block, x.contiguous(memory_format=cl))),
        ("nchw", lambda: _dense_unit(block, x.contiguous()).contiguous(memory_format=cl))])


def _dense_unit(block: ResidualBlock, x: Tensor) -> Tensor:
    with torch.no_grad():  # BN folded into the convs, as in every sparse unit
        return folded_branch(block, x).add_(folded_shortcut(block, x)).relu_()


def dense_unit_channels_last(block: ResidualBlock, x: Tensor) -> Tensor:
    """``block(x)`` (eval mode, BN folded into the convs) as a channels-last tensor (inference only), computed in
    the faster layout (:func:`unit_layout`; channels-last with fast paths off)."""
    cl = torch.channels_last
    if unit_layout(block, x) == "nchw":
        return _dense_unit(block, x.contiguous()).contiguous(memory_format=cl)
    return _dense_unit(block, x.contiguous(memory_format=cl)).contiguous(memory_format=cl)


def dense_fallback(block: ResidualBlock, x: Tensor, mask: Tensor, inactive: str) -> Tensor:
    """:func:`masked_residual` for inference (the dense fall-back); ``mask`` bool.

    The unit runs densely (BN folded into the convs: :func:`folded_branch`, in the layout of
    :func:`unit_layout`, as :func:`dense_unit_channels_last`) with in-place ops as ``relu(s + mask * branch)``;
    that is exact for ``inactive="relu"``, and for ``"shortcut"`` whenever ``s >= 0`` (any unit input that is a
    ReLU output). Otherwise the inactive positions are restored from the shortcut afterwards. Channels-last
    float32 maps take the fused epilogue (:func:`ponder.fast.residual_epilogue`, one pass, exact for any ``s``)
    when compiled.
    """
    s = folded_shortcut(block, x)
    layout = unit_layout(block, x)
    if layout == "nchw":
        out = folded_branch(block, x.contiguous()).contiguous(memory_format=torch.channels_last)
    elif layout == "channels_last":
        out = folded_branch(block, x.contiguous(memory_format=torch.channels_last))
    else:
        out = folded_branch(block, x)
    return _masked_epilogue(out, s, mask, inactive)


def _masked_epilogue(out: Tensor, s: Tensor, mask: Tensor, inactive: str) -> Tensor:
    """The dense fall-back's ``relu(s + mask * out)`` (the inactive positions as the rule says), in ``out``."""
    fused = fast.residual_epilogue(out, s, mask, inactive == "relu")
    if fused is not None:
        return fused
    if inactive == "relu" or bool(s.amin() >= 0):  # amin: a fast full reduction (min() is slow)
        return torch.addcmul(s, out, mask[:, None].to(out.dtype), out=out).relu_()
    out += s
    out.relu_()
    if out.is_contiguous(memory_format=torch.channels_last) and s.is_contiguous(memory_format=torch.channels_last):
        rows = torch.nonzero((~mask).reshape(-1)).squeeze(1)
        out.permute(0, 2, 3, 1).view(-1, out.shape[1]).index_copy_(0, rows, rows_view(s).index_select(0, rows))
        return out
    return torch.where(mask[:, None], out, s, out=out)


Runner = Callable[[Tensor], Tensor]


def bound_branch(block: ResidualBlock, x: Tensor, upto: int | None = None) -> Runner:
    """:func:`folded_branch` (its first ``upto`` convs, each with ReLU but the last) for channels-last inputs
    shaped like ``x``, the 3x3 convolutions bound to their routes' kernels now
    (:func:`ponder.fast.conv2d_runner`; 1x1 ones keep their call): ``run(x) -> y``, the same result.
    Valid while the block's weights are unchanged (the caller's :mod:`ponder.fast.plan` checks)."""
    pairs = [(block.conv1, block.bn1), (block.conv2, block.bn2)]
    if not is_basic(block):
        pairs.append((block.conv3, block.bn3))
    pairs = pairs[:upto]
    convs, y = [], x
    for i, (conv, bn) in enumerate(pairs):
        convs.append(_bound_conv(conv, bn, y, relu=i < len(pairs) - 1))
        y = convs[-1](y)

    def run(t: Tensor) -> Tensor:
        for conv in convs:
            t = conv(t)
        return t

    return run


def _bound_conv(conv: torch.nn.Conv2d, bn: torch.nn.BatchNorm2d, x: Tensor, relu: bool) -> Runner:
    if conv.kernel_size == (1, 1) and conv.padding == (0, 0):
        return lambda t: fast.conv_bn(t, conv, bn, relu)
    weight, bias = fast.fold_conv_bn_dense(conv, bn, channels_last=True)
    return fast.conv2d_runner(x, weight, bias, conv.stride[0], conv.padding[0], relu)


def bound_dense_fallback(block: ResidualBlock, x: Tensor, inactive: str) -> Callable[[Tensor, Tensor], Tensor]:
    """:func:`dense_fallback` for inputs shaped like ``x`` with the branch bound (:func:`bound_branch`) where
    the unit runs channels-last: ``run(x, mask) -> out``, the same result. Valid while the weights are unchanged."""
    if unit_layout(block, x) != "channels_last":
        return lambda t, mask: dense_fallback(block, t, mask, inactive)
    branch = bound_branch(block, x.contiguous(memory_format=torch.channels_last))

    def run(t: Tensor, mask: Tensor) -> Tensor:
        s = folded_shortcut(block, t)
        return _masked_epilogue(branch(t.contiguous(memory_format=torch.channels_last)), s, mask, inactive)

    return run


def _finish(out: Tensor, rows: Tensor, y: Tensor, inactive: str) -> None:
    """``out[rows] = relu(out[rows] + y)``; every other row relu'd too for ``inactive="relu"``."""
    if fast.scatter_residual(out, rows, y, inactive == "relu") is not None:  # one pass (compiled kernel)
        return
    y += out.index_select(0, rows)
    y.relu_()
    if inactive == "relu":
        out.relu_()
    out.index_copy_(0, rows, y)


def _output_plane(block: ResidualBlock, x: Tensor, overwrite: bool) -> Tensor:
    """The ``[B*Ho*Wo, C_out]`` rows the unit's output is written into, holding the shortcut.

    With ``overwrite`` and an identity shortcut on a channels-last ``x``, ``x``'s own storage (no copy).
    """
    if block.downsample is not None:
        return padded_plane(folded_shortcut(block, x), 0)
    if overwrite and x.is_contiguous(memory_format=torch.channels_last):
        return rows_view(x)
    return padded_plane(x, 0)


def run_sparse_basic(block: ResidualBlock, x: Tensor, mask: Tensor, first: Tensor, inactive: str,
                     overwrite: bool = False) -> Tensor:
    """Sparse ``BasicBlock``: conv1 (3x3, stride s) on ``first``, conv2 (3x3) on ``mask``.

    Returns a contiguous channels_last tensor (``x`` itself, updated, when ``overwrite`` allows it).
    """
    B, _, H, W = x.shape
    _, ho, wo = mask.shape
    f1, f2 = fast.fold_conv_bn(block.conv1, block.bn1), fast.fold_conv_bn(block.conv2, block.bn2)
    pos1, pos = PositionIndex.from_mask(first), PositionIndex.from_mask(mask)
    xp = padded_plane(x, 1)
    h = gather_gemm(xp, window_starts(pos1, (H, W), 3, f1.stride, 1, 1), f1, relu=True)
    hp = empty_plane((B, ho, wo), h.shape[1], 1, x)
    hp.index_copy_(0, pos1.padded_rows(1), h)
    y = gather_gemm(hp, window_starts(pos, (ho, wo), 3, 1, 1, 1), f2, relu=False)
    out = _output_plane(block, x, overwrite)
    _finish(out, pos.rows, y, inactive)
    return plane_interior(out, (B, ho, wo), 0)


def run_sparse_bottleneck(block: ResidualBlock, x: Tensor, mask: Tensor, first: Tensor, inactive: str,
                          overwrite: bool = False) -> Tensor:
    """Sparse ``Bottleneck``: conv1 (1x1) on ``first`` (input grid), conv2 (3x3, stride s) and conv3 on ``mask``.

    Returns a contiguous channels_last tensor (``x`` itself, updated, when ``overwrite`` allows it).
    """
    B, _, H, W = x.shape
    _, ho, wo = mask.shape
    f1, f2, f3 = (fast.fold_conv_bn(block.conv1, block.bn1), fast.fold_conv_bn(block.conv2, block.bn2),
                  fast.fold_conv_bn(block.conv3, block.bn3))
    pos1, pos = PositionIndex.from_mask(first), PositionIndex.from_mask(mask)
    out = _output_plane(block, x, overwrite)
    x_rows = out if block.downsample is None else rows_view(x)  # conv1 reads x before out is written
    h = gather_gemm(x_rows, pos1.rows, f1, relu=True)
    hp = empty_plane((B, H, W), h.shape[1], 1, x)
    hp.index_copy_(0, pos1.padded_rows(1), h)
    h2 = gather_gemm(hp, window_starts(pos, (H, W), 3, f2.stride, 1, 1), f2, relu=True)
    y = gather_gemm(h2, None, f3, relu=False)
    _finish(out, pos.rows, y, inactive)
    return plane_interior(out, (B, ho, wo), 0)


def run_sparse(block: ResidualBlock, x: Tensor, mask: Tensor, first: Tensor, inactive: str,
               overwrite: bool = False) -> Tensor:
    """The sparse kernel for ``block`` (no fall-back, no fast paths); ``mask``/``first`` bool.

    ``overwrite``: the caller no longer needs ``x``, so an identity-shortcut unit may write its
    output into ``x``'s storage instead of a copy of it.
    """
    if block.training:
        raise ValueError("the sparse executor is inference-only: call model.eval(), or use executor='masked' "
                         "to train.")
    with torch.no_grad():
        if is_basic(block):
            return run_sparse_basic(block, x, mask, first, inactive, overwrite)
        return run_sparse_bottleneck(block, x, mask, first, inactive, overwrite)
