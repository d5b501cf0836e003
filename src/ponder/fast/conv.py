"""Dense inference convolutions on oneDNN with pre-packed weights.

PyTorch's CPU convolution of a batch larger than one runs oneDNN, but with a plain weight tensor:
oneDNN then reorders the weight into its blocked layout on every call. That is a fixed cost per
call, proportional to the weight: on this project's CPU about 60 us for MSDNet's exit-head
convolutions (208 -> 128 and 128 -> 128 channels, 3x3), as much as the whole convolution of a
batch of 6. A batch of one on a small map is not sent to oneDNN at all (PyTorch picks it for fp32
only when the batch is larger than one or the input holds more than 20,480 elements) and runs
PyTorch's own im2col + GEMM, or its channels-last kernel.

:func:`conv2d` runs channels-last fp32 CPU inference convolutions on the fastest of up to four
routes, timed once per shape, batch-size bucket and thread count (a stored route: :mod:`ponder.fast.routes`):
``F.conv2d``; ``torch.ops.mkldnn._convolution_pointwise`` on a weight packed once into oneDNN's
layout (cached per weight tensor and input shape) with the ReLU fused in, which at batches larger
than one is PyTorch's own kernel minus the reorder; and, for 3x3 layers, the two compiled kernels of
:mod:`ponder.fast.small_conv` (few channels; few positions). :func:`conv1x1_rows` does the same for
the rows of 1x1 convolutions. The oneDNN op gets a flop formula, so ``FlopCounterMode`` and the
cost ledgers count it; under a dispatch mode the compiled kernels never run. The packed and blocked
weights are further copies of the (folded) weights in memory.
"""

from __future__ import annotations

import functools
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils._python_dispatch import _get_current_dispatch_mode
from torch.utils.flop_counter import conv_flop_count, register_flop_formula

from ponder.fast.fold import fold_conv_bn, fold_conv_bn_dense
from ponder.fast.gemm import linear_rows
from ponder.fast.routes import choose
from ponder.fast.small_conv import (bound_kernel, conv3x3, conv3x3_applies, conv3x3_gemm, rows_gemm,
                                   rows_gemm_applies)
from ponder.fast.switch import cpu_inference, enabled
from ponder.fast.weight_cache import derived
from ponder.layout import is_channels_last


@functools.lru_cache(maxsize=1)
def onednn_conv_available() -> bool:
    """Whether this PyTorch build has oneDNN's convolution with packed weights and fused activations."""
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_convolution_pointwise")


def _pointwise_conv_flops(x_shape, second, third, *args, out_shape=None, **kwargs) -> int:
    """FLOPs of ``mkldnn._convolution_pointwise`` (``2 * MACs``), as for ``aten.convolution``.

    The ``default`` overload takes ``(x, weight, bias, ...)``, the ``binary`` one ``(x, other, weight, ...)``.
    """
    w_shape = third if third is not None and len(third) == 4 else second
    return conv_flop_count(x_shape, w_shape, out_shape, transposed=False)


if onednn_conv_available():
    register_flop_formula(torch.ops.mkldnn._convolution_pointwise)(_pointwise_conv_flops)


def conv2d(x: Tensor, weight: Tensor, bias: Tensor | None, stride: int, padding: int,
           relu: bool = False) -> Tensor:
    """``F.conv2d(x, weight, bias, stride, padding)`` (groups 1, no dilation), then ReLU when ``relu``.

    ``x [B, C, H, W]`` -> ``[B, C', H', W']``. A channels-last fp32 CPU input without autograd runs on
    the fastest of PyTorch's ``F.conv2d``, oneDNN with the weight packed once and, for 3x3 layers,
    the two compiled kernels of :mod:`ponder.fast.small_conv`, a stored route per shape, batch-size
    bucket (1, 2, 4, ... 2^k) and thread count; give ``weight`` in ``x``'s layout. Everything else
    (and everything with fast paths off) runs ``F.conv2d``.
    """
    if (not enabled() or not is_channels_last(x) or x.device.type != "cpu" or x.dtype != torch.float32
            or torch.is_grad_enabled()):
        return _pytorch(x, weight, bias, stride, padding, relu)
    if _get_current_dispatch_mode() is not None:  # cost counting (FlopCounterMode cannot see inside a
        # kernel): a route it sees, and no route decided under it
        return _RUN["packed" if onednn_conv_available() else "pytorch"](x, weight, bias, stride, padding, relu)
    return _RUN[_route(x, weight, bias, stride, padding, relu)](x, weight, bias, stride, padding, relu)


def _route(x: Tensor, weight: Tensor, bias: Tensor | None, stride: int, padding: int, relu: bool) -> str:
    """:func:`conv2d`'s stored route for ``x``'s shape and batch bucket (timed on first use on this machine)."""
    key = (1 << (x.shape[0] - 1).bit_length(), tuple(x.shape[1:]), tuple(weight.shape), stride, padding,
           bias is None, relu, torch.get_num_threads())

    def routes() -> list[tuple[str, Callable[[], Tensor]]]:  # ties: the earlier route
        small = conv3x3_applies(x, weight, bias, stride, padding)
        names = [n for n, ok in (("pytorch", True), ("packed", onednn_conv_available()), ("small", small),
                                 ("gemm", small)) if ok]
        return [(n, functools.partial(_RUN[n], x, weight, bias, stride, padding, relu)) for n in names]

    return choose("conv2d", key, routes)


def conv2d_runner(x: Tensor, weight: Tensor, bias: Tensor | None, stride: int, padding: int,
                  relu: bool = False) -> Callable[[Tensor], Tensor]:
    """:func:`conv2d` prepared for inputs shaped like ``x`` (same batch bucket): ``run(x) -> y``.

    The route is decided (timed) now and its weight layout bound, so a call skips the route lookup
    and the weight caches: for a fixed pipeline run many times (an exit head). Valid while
    ``weight`` and ``bias`` are these tensors, unchanged, and for channels-last fp32 CPU inputs
    without autograd or a dispatch mode (the caller checks; :func:`conv2d` otherwise).
    """
    route = _route(x, weight, bias, stride, padding, relu)
    if route in ("small", "gemm"):
        return bound_kernel(route == "gemm", weight, bias, stride, relu)
    if route == "packed":
        packed = packed_weight(weight, x, stride, padding)
        return lambda t: _pointwise(t, packed, bias, stride, padding, relu)
    return lambda t: _pytorch(t, weight, bias, stride, padding, relu)


def conv1x1_rows(x: Tensor, weight: Tensor, bias: Tensor, relu: bool = False) -> Tensor:
    """A 1x1 convolution's rows at inference: ``act(x @ weight^T + bias)``, ``x [n, K]`` -> ``[n, N]``.

    Runs :func:`ponder.fast.gemm.linear_rows` (oneDNN or BLAS) or, where it applies, the compiled block
    GEMM (:func:`ponder.fast.small_conv.rows_gemm`), whichever was faster when timed once per row-count
    bucket, shape and thread count (a stored route).
    """
    if not cpu_inference(x):
        return linear_rows(x, weight, bias, relu)  # (no route is decided under a dispatch mode either)
    key = (1 << (x.shape[0] - 1).bit_length(), tuple(x.shape[1:]), tuple(weight.shape), str(x.dtype),
           str(weight.dtype), x.stride(-1) == 1, relu, torch.get_num_threads())  # all rows_gemm_applies checks

    def routes() -> list[tuple[str, Callable[[], Tensor]]]:  # ties: linear_rows
        options = [("linear_rows", lambda: linear_rows(x, weight, bias, relu))]
        if rows_gemm_applies(x, weight):
            options.append(("block_gemm", lambda: rows_gemm(x, weight, bias, relu)))
        return options

    if choose("conv1x1_rows", key, routes) == "block_gemm":
        return rows_gemm(x, weight, bias, relu)
    return linear_rows(x, weight, bias, relu)


def conv_bn(x: Tensor, conv: torch.nn.Conv2d, bn: torch.nn.BatchNorm2d | None, relu: bool) -> Tensor:
    """``act(bn(conv(x)))`` at inference (eval-mode BN): ``[B, C, H, W]`` -> ``[B, C', H', W']`` in ``x``'s layout.

    Fast paths on: BN folded into the convolution (cached folded weights); a 1x1 convolution (padding
    0) on a channels-last ``x`` runs as one row GEMM on its stored route (:func:`conv1x1_rows`; a
    strided one on the subsampled map), any other through :func:`conv2d`. Off: the modules themselves.
    """
    if not enabled():
        y = conv(x) if bn is None else bn(conv(x))
        return torch.relu(y) if relu else y
    cl = is_channels_last(x)
    if cl and conv.kernel_size == (1, 1) and conv.padding == (0, 0):
        f = fold_conv_bn(conv, bn)
        s = conv.stride[0]
        if s > 1:
            x = x[:, :, ::s, ::s].contiguous(memory_format=torch.channels_last)
        B, _, H, W = x.shape
        y = conv1x1_rows(x.permute(0, 2, 3, 1).reshape(-1, x.shape[1]), f.weight, f.bias, relu)
        return y.view(B, H, W, -1).permute(0, 3, 1, 2)
    weight, bias = fold_conv_bn_dense(conv, bn, channels_last=cl)
    return conv2d(x, weight, bias, conv.stride[0], conv.padding[0], relu)


def _pytorch(x: Tensor, weight: Tensor, bias: Tensor | None, stride: int, padding: int, relu: bool) -> Tensor:
    y = F.conv2d(x, weight, bias, stride, padding)
    return y.relu_() if relu else y


def _packed_conv(x: Tensor, weight: Tensor, bias: Tensor | None, stride: int, padding: int, relu: bool) -> Tensor:
    return _pointwise(x, packed_weight(weight, x, stride, padding), bias, stride, padding, relu)


def _pointwise(x: Tensor, packed: Tensor, bias: Tensor | None, stride: int, padding: int, relu: bool) -> Tensor:
    """oneDNN's convolution of ``x`` with a :func:`packed_weight`, the ReLU fused when ``relu``."""
    return torch.ops.mkldnn._convolution_pointwise(
        x, packed, bias, [padding, padding], [stride, stride], [1, 1], 1,
        "relu" if relu else "none", [None] if relu else [], "")


def _small(x: Tensor, weight: Tensor, bias: Tensor | None, stride: int, padding: int, relu: bool) -> Tensor:
    return conv3x3(x, weight, bias, stride, relu)  # (only routed where conv3x3_applies: padding 1)


def _gemm(x: Tensor, weight: Tensor, bias: Tensor | None, stride: int, padding: int, relu: bool) -> Tensor:
    return conv3x3_gemm(x, weight, bias, stride, relu)


_RUN = {"pytorch": _pytorch, "packed": _packed_conv, "small": _small, "gemm": _gemm}


def packed_weight(weight: Tensor, x: Tensor, stride: int, padding: int) -> Tensor:
    """``weight [C', C, k, k]`` in oneDNN's layout for convolving ``x``-shaped inputs (an MKLDNN tensor).

    Cached with the weight (:func:`ponder.fast.weight_cache.derived`) per input ``(C, H, W)``; any
    packed weight gives exact results on other shapes too, the cache only keeps each fast.
    """
    return derived(weight, ("onednn", tuple(x.shape[1:]), stride, padding),
                   lambda: torch._C._nn.mkldnn_reorder_conv2d_weight(
                       weight.detach().contiguous().to_mkldnn(), [padding, padding], [stride, stride], [1, 1], 1,
                       list(x.shape)))
