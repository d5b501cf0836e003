"""Layers MSDNet and RANet share: ``ConvBasic`` and the exit head every block ends with.

The head is the MSDNet classifier (official names ``m`` / ``linear``): two ConvBasic 3x3 with
stride 2, AvgPool 2, Linear. Its convolutions keep their weights **channels-last**. At batch 1
on a CPU, PyTorch runs a 3x3 convolution on a small map through im2col (128 -> 128 channels,
4x4 -> 2x2: about 120 us for 0.6M MACs on this project's CPU); with channels-last weights (and
input) it takes PyTorch's channels-last kernel instead (about 25 us; oneDNN, which PyTorch does
not pick at batch 1, takes 75 us), so an early exit costs in time what its MACs say. Batch 64 and
training are no slower (README, "Real early exit"). ``state_dict`` values are the same numbers
in any memory format, and checkpoints are written contiguous.

Without autograd (``torch.no_grad`` / ``inference_mode`` in eval mode) every conv -> BN -> ReLU
chain here and in MSDNet's ``ConvBN`` runs as one convolution with BN folded in
(:func:`ponder.nn.sparse_units.folded_conv`: cached folded weights, 1x1 convolutions as row GEMMs,
3x3 ones on whichever of PyTorch, oneDNN and the compiled kernels of :mod:`ponder.nn.small_conv`
was timed fastest for the shape and batch size); forward hooks on those inner Conv2d /
BatchNorm2d / ReLU modules, and on a head's Linear, then do not fire (hooks on the blocks do; the
executors call a head through :meth:`ExitHead.classify`, not its ``forward``). On channels-last
float32 CPU inputs a head runs a plan kept per shape and batch bucket (:meth:`ExitHead.classify`):
its two convolutions as prepared calls, or the whole head (convolutions, mean, linear) as one
compiled call, whichever was timed faster; at batch 1 the latter (head 0: 43 -> 33 us per call).
"""

from __future__ import annotations

import weakref
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from ponder.nn.dense_conv import conv2d_runner
from ponder.nn.layout import is_channels_last
from ponder.nn.native import cpu_inference
from ponder.nn.small_conv import bound_exit_head, conv3x3_applies
from ponder.nn.sparse_conv import fold_conv_bn_dense, fold_key
from ponder.nn.sparse_units import folded_conv
from ponder.nn.timing import fastest

#: ExitHead -> {(batch bucket, input C H W, threads): (fold keys, linear weight, bias, x -> (feature, logits))}
_PLANS: "weakref.WeakKeyDictionary[ExitHead, dict[tuple, tuple]]" = weakref.WeakKeyDictionary()


def conv_bn_relu(net: nn.Sequential, x: Tensor) -> Tensor:
    """``net(x)`` for ``net`` = (Conv2d, BatchNorm2d, ReLU) repeated; without autograd, BN folded.

    ``x [B, C, H, W]`` -> ``[B, C', H', W']`` in ``x``'s memory format (or the convs' weights').
    """
    if net.training or torch.is_grad_enabled():
        return net(x)
    layers = list(net._modules.values())
    for i in range(0, len(layers), 3):
        x = folded_conv(x, layers[i], layers[i + 1], relu=True)
    return x


def _pool(x: Tensor, avg: nn.AvgPool2d) -> Tensor:
    """The head's ``avg`` pooling, flattened: ``[B, C, h, w]`` -> ``[B, C]``."""
    if x.shape[2:] == (2, 2):  # AvgPool2d(2) on a 2x2 map is the mean, one op for pool + flatten
        return x.mean((2, 3))
    return avg(x).flatten(1)


class ConvBasic(nn.Module):
    """Conv k x k (no bias) -> BN -> ReLU, as ``net`` (the official MSDNet layout)."""

    def __init__(self, cin: int, cout: int, kernel: int = 3, stride: int = 1, padding: int = 1):
        super().__init__()
        self.net = nn.Sequential(nn.Conv2d(cin, cout, kernel, stride, padding, bias=False),
                                 nn.BatchNorm2d(cout), nn.ReLU(inplace=True))

    def forward(self, x: Tensor) -> Tensor:
        return conv_bn_relu(self.net, x)


class ExitHead(nn.Module):
    """Exit classifier: ``features`` (two ConvBasic 3x3/2, AvgPool 2, flatten) then ``linear``.

    ``width`` is the hidden width (128 on CIFAR); ``None`` keeps the input width (ImageNet).
    """

    def __init__(self, cin: int, width: int | None, num_classes: int):
        super().__init__()
        width = width or cin
        self.m = nn.Sequential(ConvBasic(cin, width, 3, 2, 1), ConvBasic(width, width, 3, 2, 1), nn.AvgPool2d(2))
        self.m.to(memory_format=torch.channels_last)
        self.linear = nn.Linear(width, num_classes)
        self.width = width
        self._folded = [(basic.net[0], basic.net[1]) for basic in self.m[:2]]  # (conv, bn): the inference path

    def features(self, x: Tensor) -> Tensor:
        """``x [B, cin, h, w]`` (8x8 on CIFAR, 7x7 on ImageNet) -> pooled feature ``[B, width]``."""
        if self.training or torch.is_grad_enabled():
            return self.m(x).flatten(1)
        if self._prepared(x):
            return self._planned(x)[0]
        for conv, bn in self._folded:  # the same as self.m[:2] (BN folded), without the module calls
            x = folded_conv(x, conv, bn, relu=True)
        return _pool(x, self.m[2])

    def classify(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """``x [B, cin, h, w]`` -> (pooled feature ``[B, width]``, logits ``[B, num_classes]``)."""
        if self.training or torch.is_grad_enabled() or not self._prepared(x):
            feat = self.features(x)
            return feat, self.linear(feat)
        return self._planned(x)

    def forward(self, x: Tensor) -> Tensor:
        """``x [B, cin, h, w]`` -> logits ``[B, num_classes]``."""
        return self.classify(x)[1]

    @staticmethod
    def _prepared(x: Tensor) -> bool:
        """Whether inference on ``x`` takes :meth:`_planned` (channels-last float32 on the CPU)."""
        return is_channels_last(x) and x.dtype == torch.float32 and cpu_inference(x)

    def _planned(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """(feature, logits) of ``x`` from a plan kept per input shape, batch bucket and thread count
        until a weight changes: an exit head is work only early exit does, and at batch 1 the route
        lookups, the pooling and the linear call cost as much as a convolution. The plan is the
        faster, timed once, of the two folded convolutions as prepared calls
        (:func:`ponder.nn.dense_conv.conv2d_runner`) then the mean and ``linear``, and the whole
        head as one compiled call (:func:`ponder.nn.small_conv.bound_exit_head`, where it applies)."""
        (c1, n1), (c2, n2) = self._folded
        lin = self.linear
        stamp = (fold_key(c1, n1), fold_key(c2, n2))  # the folded weights' cache key: same stamp, same weights
        plans = _PLANS.get(self)
        if plans is None:
            plans = _PLANS[self] = {}
        key = (1 << (x.shape[0] - 1).bit_length(), x.shape[1:], torch.get_num_threads())
        plan = plans.get(key)
        if plan is None or plan[0] != stamp or plan[1] is not lin.weight or plan[2] is not lin.bias:
            folded = [fold_conv_bn_dense(conv, bn, channels_last=True) for conv, bn in self._folded]
            plan = plans[key] = (stamp, lin.weight, lin.bias, self._plan(x, folded))
        return plan[3](x)

    def _plan(self, x: Tensor, folded: list[tuple[Tensor, Tensor]]) -> Callable[[Tensor], tuple[Tensor, Tensor]]:
        runners, y = [], x
        for (weight, bias), (conv, _) in zip(folded, self._folded):
            runners.append(conv2d_runner(y, weight, bias, conv.stride[0], conv.padding[0], relu=True))
            y = runners[-1](y)
        lin, avg = self.linear, self.m[2]  # (the plan must not hold the head: _PLANS is keyed weakly by it)

        def prepared(t: Tensor) -> tuple[Tensor, Tensor]:
            for run in runners:
                t = run(t)
            feat = _pool(t, avg)
            return feat, F.linear(feat, lin.weight, lin.bias)

        if y.shape[2:] != (2, 2) or not all(conv3x3_applies(t, w, b, 2, 1) for t, (w, b) in zip((x, y), folded)):
            return prepared
        whole = bound_exit_head([w for w, _ in folded], [b for _, b in folded], lin)
        return (prepared, whole)[fastest([lambda: prepared(x), lambda: whole(x)])]
