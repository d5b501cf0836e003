"""Convolutions computed at active spatial positions only (window gather -> one GEMM -> scatter).

The CPU kernel measured best in pure PyTorch (``reference/spatial.md`` 5.2), refined: feature maps
live in zero-padded NHWC *planes* (``[B*(H+2p)*(W+2p), C]`` rows). The ``k`` taps of one kernel
row are ``k`` consecutive plane rows, i.e. one contiguous run of ``k*C`` values, so the ``k x k``
window of an output position is ``k`` strided "super-rows" (an overlapping ``as_strided`` view)
gathered with ``index_select``: ``[n, k*k*C_in]``, then one GEMM with the weight (eval BatchNorm
folded in), then the ``[n, C_out]`` rows are scattered. Padding is physical zeros, so indices
come from arithmetic alone (no lookup tables, no bounds tests), and ``k`` times fewer indices
are gathered than with one index per tap.

Conventions: masks are ``[B, H, W]`` (nonzero = active); "rows" are flat indices
``b*H*W + i*W + j`` in row-major order (the order of ``mask.nonzero()``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from ponder.fast import FoldedConv, fold_conv_bn, linear_rows


def dilate_mask(mask: Tensor, k: int = 3) -> Tensor:
    """Positions within the ``k x k`` neighbourhood of an active one: ``[B, H, W]`` -> ``[B, H, W]`` bool.

    This is where the conv *feeding* a ``k x k`` stride-1 conv must run so that the second conv
    sees its true inputs at every active position (a max-pool ``k x k``, stride 1, SAME).
    """
    if mask.dim() != 3:
        raise ValueError(f"mask must be [batch, H, W], got shape {list(mask.shape)}; drop the channel dim.")
    if k % 2 != 1:
        raise ValueError(f"dilation kernel k must be odd (1, 3, 5, ...), got {k}")
    m = mask if mask.dtype == torch.bool else mask != 0
    return _dilate(m, k)


DILATE_POOL_MAX = 1024
"""Masks of at most this many elements are dilated with one max-pool (fewer, slower ops: 7-15 us
against ~20 us for the separable ORs on batch-1 CIFAR maps; the ORs win from ~3,000 elements on)."""


def _dilate(m: Tensor, k: int) -> Tensor:
    """``k x k`` OR-dilation (SAME) of a bool ``[B, H, W]`` map: separable (2k-2 elementwise ORs), or
    one max-pool for small maps."""
    if k == 1:
        return m.clone()
    if m.numel() <= DILATE_POOL_MAX:
        return F.max_pool2d(m[:, None].to(torch.float32), k, 1, k // 2)[:, 0] > 0
    r, (B, H, W) = k // 2, m.shape
    p = m.new_zeros(B, H + 2 * r, W)
    p[:, r:r + H] = m
    rows = p[:, 0:H].clone()
    for d in range(1, k):
        rows |= p[:, d:d + H]
    p = m.new_zeros(B, H, W + 2 * r)
    p[:, :, r:r + W] = rows
    out = p[:, :, 0:W].clone()
    for d in range(1, k):
        out |= p[:, :, d:d + W]
    return out


def input_mask(mask_out: Tensor, in_hw: tuple[int, int], k: int = 3, stride: int = 1,
               padding: int | None = None) -> Tensor:
    """Input positions read by the active outputs of a ``k x k`` conv: ``[B, Ho, Wo]`` -> ``[B, H, W]`` bool.

    For stride 1 and ``padding = k // 2`` this is :func:`dilate_mask`; for stride ``s`` it is the
    mask upsampled onto the input grid (each active output at its window's centre) and dilated,
    as DynConv's ``ExpandMask`` for the 1x1 conv before a strided 3x3. Uses only pooling, so a
    ``FlopCounterMode`` around it counts nothing.
    """
    pad = k // 2 if padding is None else padding
    H, W = in_hw
    B, ho, wo = mask_out.shape
    if k % 2 != 1 or (ho, wo) != ((H + 2 * pad - k) // stride + 1, (W + 2 * pad - k) // stride + 1):
        raise ValueError(f"mask of size {ho}x{wo} is not the output grid of a {k}x{k} stride-{stride} "
                         f"conv (padding {pad}) on {H}x{W}; pass the mask at the conv's output resolution.")
    if stride == 1 and pad == k // 2:
        return dilate_mask(mask_out, k)
    c = k // 2  # window centre, in padded input coordinates: stride * i + c
    grid = torch.zeros((B, H + 2 * pad, W + 2 * pad), dtype=torch.bool, device=mask_out.device)
    grid[:, c:c + stride * ho:stride, c:c + stride * wo:stride] = mask_out != 0
    return _dilate(grid, k)[:, pad:pad + H, pad:pad + W]


def soft_input_mask(mask: Tensor, in_hw: tuple[int, int], k: int = 3, stride: int = 1) -> Tensor:
    """Differentiable :func:`input_mask` of a 0/1 float ``mask [B, Ho, Wo]``: the input
    positions a ``k x k`` conv (``stride``, padding ``k // 2``) reads for the active outputs, ``[B, H, W]``.

    The same 0/1 values as the bool version (a max-pool over each position's window of outputs placed at
    their windows' centres); its gradient reaches the output positions (what DynConv's sparsity criterion
    needs of the dilated mask's active count).
    """
    pad = k // 2
    if stride == 1:
        return F.max_pool2d(mask[:, None], k, 1, pad)[:, 0]
    H, W = in_hw
    b, ho, wo = mask.shape
    grid = mask.new_zeros(b, H + 2 * pad, W + 2 * pad)
    grid[:, pad:pad + stride * ho:stride, pad:pad + stride * wo:stride] = mask
    return F.max_pool2d(grid[:, None], k, 1, pad)[:, 0, pad:pad + H, pad:pad + W]


@dataclass
class PositionIndex:
    """The active positions of one ``[B, H, W]`` mask, as flat rows (built once, shared by convs)."""

    shape: tuple[int, int, int]
    rows: Tensor  # [n] long, b*H*W + i*W + j, row-major

    @classmethod
    def from_mask(cls, mask: Tensor) -> "PositionIndex":
        """Index of the nonzero entries of ``mask [B, H, W]``."""
        flat = mask.reshape(-1)
        rows = torch.nonzero(flat if flat.dtype == torch.bool else flat != 0).squeeze(1)
        return cls(tuple(mask.shape), rows)  # type: ignore[arg-type]

    @property
    def n(self) -> int:
        return self.rows.numel()

    def coords(self) -> tuple[Tensor, Tensor, Tensor]:
        """``(b, i, j)`` of each active position, each ``[n]`` long."""
        _, H, W = self.shape
        b = torch.div(self.rows, H * W, rounding_mode="floor")
        rem = self.rows - b * (H * W)
        i = torch.div(rem, W, rounding_mode="floor")
        return b, i, rem - i * W

    def padded_rows(self, pad: int) -> Tensor:
        """Flat indices of the active positions in the zero-padded ``[B, H+2p, W+2p]`` grid."""
        _, H, W = self.shape
        b, i, j = self.coords()
        return b * ((H + 2 * pad) * (W + 2 * pad)) + (i + pad) * (W + 2 * pad) + (j + pad)


def window_starts(out: PositionIndex, in_hw: tuple[int, int], k: int, stride: int, padding: int,
                  plane_pad: int) -> Tensor:
    """``[n * k]`` plane rows where each kernel row of each active output's window starts.

    The input plane holds the ``in_hw`` map with ``plane_pad >= padding`` zeros on each side;
    output ``(b, i, j)`` of a ``k x k`` conv (``stride``, ``padding``) reads plane rows
    ``start + kw`` for kernel row ``kh`` with ``start = b*Hp*Wp + (s*i + off + kh)*Wp + s*j + off``,
    ``off = plane_pad - padding``. Order: position-major, then ``kh`` (:class:`FoldedConv`'s layout).
    """
    H, W = in_hw
    if plane_pad < padding:
        raise ValueError(f"the input plane has padding {plane_pad} but the conv needs {padding}")
    Hp, Wp = H + 2 * plane_pad, W + 2 * plane_pad
    off = plane_pad - padding
    b, i, j = out.coords()
    corner = b * (Hp * Wp) + (stride * i + off) * Wp + (stride * j + off)
    if k == 1:
        return corner
    return (corner[:, None] + torch.arange(k, device=corner.device) * Wp).reshape(-1)


CHUNK_BYTES = 4 << 20


def gather_gemm(plane: Tensor, starts: Tensor | None, conv: FoldedConv, relu: bool) -> Tensor:
    """``act(window(plane, starts) @ conv.weight^T + conv.bias)``: ``[n, C_out]``.

    ``plane`` is a contiguous ``[R, C_in]`` row table; ``starts`` the ``[n * k]`` kernel-row
    starts from :func:`window_starts` (``k = conv.k``), or ``None`` when the rows of ``plane``
    already are the inputs in order (a 1x1 conv on the same positions). The GEMMs run on the
    faster CPU backend (:func:`ponder.fast.linear_rows`). The gather runs in chunks of about
    ``CHUNK_BYTES`` through one reused buffer, so each GEMM reads its operand from cache instead
    of a freshly written ``n x k*k*C_in`` matrix (at CIFAR batch 64 the whole matrix is tens of
    MB and the GEMM becomes memory-bound: 3x slower).
    """
    cout, kin = conv.weight.shape
    if starts is None:
        return linear_rows(plane.view(-1, kin), conv.weight, conv.bias, relu)
    k, c = conv.k, plane.shape[1]
    runs = plane.as_strided((plane.shape[0] - k + 1, k * c), (c, 1)) if k > 1 else plane
    n = starts.numel() // k
    step = max(64, CHUNK_BYTES // (kin * plane.element_size()))
    if n <= step:
        return linear_rows(runs.index_select(0, starts).view(n, kin), conv.weight, conv.bias, relu)
    y = plane.new_empty(n, cout)
    buf = plane.new_empty(step * k, k * c)
    for s in range(0, n, step):
        e = min(n, s + step)
        a = torch.index_select(runs, 0, starts[s * k:e * k], out=buf[: (e - s) * k])
        y[s:e] = linear_rows(a.view(e - s, kin), conv.weight, conv.bias, relu)
    return y


def padded_plane(x: Tensor, pad: int) -> Tensor:
    """A fresh zero-padded NHWC plane ``[B*(H+2p)*(W+2p), C]`` holding ``x [B, C, H, W]``."""
    B, C, H, W = x.shape
    plane = empty_plane((B, H, W), C, pad, x)
    plane_interior(plane, (B, H, W), pad).copy_(x)
    return plane


def empty_plane(shape: tuple[int, int, int], channels: int, pad: int, like: Tensor) -> Tensor:
    """An uninitialised plane for a ``[B, channels, H, W]`` map whose ``pad``-wide border is zero."""
    B, H, W = shape
    plane = like.new_empty(B, H + 2 * pad, W + 2 * pad, channels)
    if pad:
        plane[:, :pad].zero_()
        plane[:, H + pad:].zero_()
        plane[:, pad:H + pad, :pad].zero_()
        plane[:, pad:H + pad, W + pad:].zero_()
    return plane.view(-1, channels)


def plane_interior(plane: Tensor, shape: tuple[int, int, int], pad: int) -> Tensor:
    """The ``[B, C, H, W]`` map inside a plane (a channels_last-strided view, non-contiguous if ``pad``)."""
    B, H, W = shape
    grid = plane.view(B, H + 2 * pad, W + 2 * pad, plane.shape[1])
    return grid[:, pad:pad + H, pad:pad + W].permute(0, 3, 1, 2)


def rows_view(x: Tensor) -> Tensor:
    """``x [B, C, H, W]`` as ``[B*H*W, C]`` rows (a view for channels_last tensors, else a copy)."""
    return x.permute(0, 2, 3, 1).reshape(-1, x.shape[1])


def _conv_out_hw(conv: nn.Conv2d, hw: tuple[int, int]) -> tuple[int, int]:
    k, s, p = conv.kernel_size[0], conv.stride[0], conv.padding[0]
    return (hw[0] + 2 * p - k) // s + 1, (hw[1] + 2 * p - k) // s + 1


def sparse_conv2d(x: Tensor, mask: Tensor, conv: nn.Conv2d, bn: nn.BatchNorm2d | None = None,
                  relu: bool = False) -> Tensor:
    """``act(bn(conv(x)))`` at the active positions of ``mask [B, Ho, Wo]``, zero elsewhere.

    ``x [B, C_in, H, W]`` -> ``[B, C_out, Ho, Wo]`` (channels_last memory). Inference only: BN is
    folded with its running statistics and no gradient flows. Equals
    :func:`masked_conv2d` (the dense reference) at active positions.
    """
    B, _, H, W = x.shape
    ho, wo = _conv_out_hw(conv, (H, W))
    if tuple(mask.shape) != (B, ho, wo):
        raise ValueError(f"mask must be [batch, Ho, Wo] = {[B, ho, wo]} (the conv's output grid), "
                         f"got {list(mask.shape)}")
    f = fold_conv_bn(conv, bn)
    pos = PositionIndex.from_mask(mask)
    out = x.new_zeros(B * ho * wo, f.weight.shape[0])
    with torch.no_grad():
        if pos.n:
            plane = padded_plane(x, f.padding)
            y = gather_gemm(plane, window_starts(pos, (H, W), f.k, f.stride, f.padding, f.padding), f, relu)
            out.index_copy_(0, pos.rows, y)
    return plane_interior(out, (B, ho, wo), 0)


def masked_conv2d(x: Tensor, mask: Tensor, conv: nn.Conv2d, bn: nn.BatchNorm2d | None = None,
                  relu: bool = False) -> Tensor:
    """Dense reference of :func:`sparse_conv2d`: ``act(bn(conv(x))) * mask`` (differentiable)."""
    y = conv(x)
    if bn is not None:
        y = bn(y)
    if relu:
        y = F.relu(y)
    return y * (mask != 0).to(y.dtype)[:, None]
