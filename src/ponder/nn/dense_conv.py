"""Dense inference convolutions on oneDNN at batch 1 (where PyTorch does not send them there).

PyTorch's CPU convolution picks oneDNN for fp32 only when the batch is larger than one or the
input holds more than 20,480 elements; a batch-1 convolution on a small map (every CIFAR map,
ImageNet's last stages at batch 1) runs PyTorch's own im2col + GEMM instead. On this project's
CPU oneDNN is much faster on some of those shapes (ResNet-32 stage 1, 16 channels at 32x32,
channels-last: 46 us against 82 us) and slower on others (a 128 -> 128 convolution on a 4x4 map:
83 us against 58 us). :func:`conv2d` times both once per shape and thread count
(:func:`ponder.nn.timing.fastest`) and keeps the faster; other batch sizes call ``F.conv2d``.
``torch.mkldnn_convolution`` gets a flop formula, so ``FlopCounterMode`` counts that route.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.flop_counter import conv_flop_count, register_flop_formula

from ponder.nn.layout import is_channels_last
from ponder.nn.timing import fastest

_ROUTE: dict[tuple, bool] = {}  # shape key -> True when oneDNN is faster


def _mkldnn_conv_flops(x_shape, w_shape, *args, out_shape=None, **kwargs) -> int:
    """FLOPs of ``aten.mkldnn_convolution`` (``2 * MACs``), as for ``aten.convolution``."""
    return conv_flop_count(x_shape, w_shape, out_shape, transposed=False)


if torch.backends.mkldnn.is_available():
    register_flop_formula(torch.ops.aten.mkldnn_convolution)(_mkldnn_conv_flops)


def conv2d(x: Tensor, weight: Tensor, bias: Tensor | None, stride: int, padding: int) -> Tensor:
    """``F.conv2d(x, weight, bias, stride, padding)`` (groups 1, no dilation): ``[B, C, H, W]`` -> ``[B, C', H', W']``.

    A channels-last fp32 CPU batch of one without autograd runs on whichever of PyTorch's route and
    oneDNN's direct convolution was measured faster for its shape; give ``weight`` in ``x``'s layout.
    """
    if (x.shape[0] != 1 or not is_channels_last(x) or x.device.type != "cpu" or x.dtype != torch.float32
            or torch.is_grad_enabled() or not torch.backends.mkldnn.is_available()):
        return F.conv2d(x, weight, bias, stride, padding)
    key = (tuple(x.shape), tuple(weight.shape), stride, padding, bias is None, torch.get_num_threads())
    route = _ROUTE.get(key)
    if route is None:  # ties: PyTorch's route
        route = _ROUTE[key] = fastest([lambda: F.conv2d(x, weight, bias, stride, padding),
                                       lambda: _onednn(x, weight, bias, stride, padding)]) == 1
    if route:
        return _onednn(x, weight, bias, stride, padding)
    return F.conv2d(x, weight, bias, stride, padding)


def _onednn(x: Tensor, weight: Tensor, bias: Tensor | None, stride: int, padding: int) -> Tensor:
    return torch.mkldnn_convolution(x, weight, bias, (padding, padding), (stride, stride), (1, 1), 1)
