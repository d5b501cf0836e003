"""Dense inference convolutions on oneDNN with pre-packed weights.

PyTorch's CPU convolution of a batch larger than one runs oneDNN, but with a plain weight tensor:
oneDNN then reorders the weight into its blocked layout on every call. That is a fixed cost per
call, proportional to the weight: on this project's CPU about 60 us for MSDNet's exit-head
convolutions (208 -> 128 and 128 -> 128 channels, 3x3), as much as the whole convolution of a
batch of 6. A batch of one on a small map is not sent to oneDNN at all (PyTorch picks it for fp32
only when the batch is larger than one or the input holds more than 20,480 elements) and runs
PyTorch's own im2col + GEMM, or its channels-last kernel.

:func:`conv2d` runs channels-last fp32 CPU inference convolutions as
``torch.ops.mkldnn._convolution_pointwise`` on a weight packed once into oneDNN's layout (cached
per weight tensor and input shape) with the ReLU fused in. At batch 1 it times that route against
``F.conv2d`` once per shape and thread count (:func:`ponder.nn.timing.fastest`) and keeps the
faster; at larger batches the packed route is PyTorch's own kernel minus the reorder. The op gets
a flop formula, so ``FlopCounterMode`` and the cost ledgers count it. The packed weights are a
second copy of the (folded) weights in memory.
"""

from __future__ import annotations

import functools
import weakref

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.flop_counter import conv_flop_count, register_flop_formula

from ponder.nn.layout import is_channels_last
from ponder.nn.timing import fastest

_ROUTE: dict[tuple, bool] = {}  # batch-1 shape key -> True when the packed oneDNN route is faster
_PACKED: dict[int, dict[tuple, Tensor]] = {}  # id(weight) -> {(version, input C H W, ...): packed}; freed with it


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

    ``x [B, C, H, W]`` -> ``[B, C', H', W']``. A channels-last fp32 CPU input without autograd runs
    on oneDNN with the weight packed once (at batch 1 only where measured faster than
    ``F.conv2d``); give ``weight`` in ``x``'s layout. Everything else runs ``F.conv2d``.
    """
    if (not is_channels_last(x) or x.device.type != "cpu" or x.dtype != torch.float32
            or torch.is_grad_enabled() or not onednn_conv_available()):
        return _pytorch(x, weight, bias, stride, padding, relu)
    if x.shape[0] == 1:
        key = (tuple(x.shape), tuple(weight.shape), stride, padding, bias is None, torch.get_num_threads())
        route = _ROUTE.get(key)
        if route is None:  # ties: PyTorch's route
            route = _ROUTE[key] = fastest([lambda: _pytorch(x, weight, bias, stride, padding, relu),
                                           lambda: _packed_conv(x, weight, bias, stride, padding, relu)]) == 1
        if not route:
            return _pytorch(x, weight, bias, stride, padding, relu)
    return _packed_conv(x, weight, bias, stride, padding, relu)


def _pytorch(x: Tensor, weight: Tensor, bias: Tensor | None, stride: int, padding: int, relu: bool) -> Tensor:
    y = F.conv2d(x, weight, bias, stride, padding)
    return y.relu_() if relu else y


def _packed_conv(x: Tensor, weight: Tensor, bias: Tensor | None, stride: int, padding: int, relu: bool) -> Tensor:
    return torch.ops.mkldnn._convolution_pointwise(
        x, packed_weight(weight, x, stride, padding), bias, [padding, padding], [stride, stride], [1, 1], 1,
        "relu" if relu else "none", [None] if relu else [], "")


def packed_weight(weight: Tensor, x: Tensor, stride: int, padding: int) -> Tensor:
    """``weight [C', C, k, k]`` in oneDNN's layout for convolving ``x``-shaped inputs (an MKLDNN tensor).

    Cached per weight tensor (until it is freed or, unless it is an inference tensor, modified in
    place) and input ``(C, H, W)``;
    any packed weight gives exact results on other shapes too, the cache only keeps each fast.
    """
    per_weight = _PACKED.get(id(weight))
    if per_weight is None:  # (tensors cannot be weak dictionary keys: they compare elementwise)
        per_weight = _PACKED[id(weight)] = {}
        weakref.finalize(weight, _PACKED.pop, id(weight), None)
    version = -1 if weight.is_inference() else weight._version  # inference tensors keep no version
    key = (version, tuple(x.shape[1:]), stride, padding)
    packed = per_weight.get(key)
    if packed is None:
        for old in [k for k in per_weight if k[0] != version]:  # packings of stale values
            del per_weight[old]
        packed = per_weight[key] = torch._C._nn.mkldnn_reorder_conv2d_weight(
            weight.detach().contiguous().to_mkldnn(), [padding, padding], [stride, stride], [1, 1], 1, list(x.shape))
    return packed
