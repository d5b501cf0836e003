"""Layers MSDNet and RANet share: ``ConvBasic`` and the exit head every block ends with.

The head is the MSDNet classifier (official names ``m`` / ``linear``): two ConvBasic 3x3 with
stride 2, AvgPool 2, Linear. Its convolutions keep their weights **channels-last**: at batch 1 on a
CPU, PyTorch runs a 3x3 convolution on a small map through im2col unless input and weights are
channels-last (about 120 us against 25 us for 0.6M MACs on this project's CPU). ``state_dict``
values are the same numbers in any memory format, and checkpoints are written contiguous.

At inference (no autograd, eval mode) the conv -> BN -> ReLU chains run through
:func:`ponder.fast.conv_bn` and a whole head through :func:`ponder.fast.exit_head` (prepared plans)
where fast paths apply; forward hooks on the inner Conv2d / BatchNorm2d / ReLU modules and on a
head's Linear then do not fire (hooks on the blocks do; the executors call a head through
:meth:`ExitHead.classify`, not its ``forward``).
"""

from __future__ import annotations

import torch
import torch.nn as nn
from torch import Tensor

from ponder import fast


def conv_bn_relu(net: nn.Sequential, x: Tensor) -> Tensor:
    """``net(x)`` for ``net`` = (Conv2d, BatchNorm2d, ReLU) repeated; without autograd, BN folded.

    ``x [B, C, H, W]`` -> ``[B, C', H', W']`` in ``x``'s memory format (or the convs' weights').
    """
    if net.training or torch.is_grad_enabled():
        return net(x)
    layers = list(net._modules.values())
    for i in range(0, len(layers), 3):
        x = fast.conv_bn(x, layers[i], layers[i + 1], relu=True)
    return x


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
        return self.classify(x)[0] if not (self.training or torch.is_grad_enabled()) else self.m(x).flatten(1)

    def classify(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """``x [B, cin, h, w]`` -> (pooled feature ``[B, width]``, logits ``[B, num_classes]``)."""
        if self.training or torch.is_grad_enabled():
            feat = self.m(x).flatten(1)
        elif fast.exit_head_applies(x):
            return fast.exit_head(self, x, self._folded, self.m[2], self.linear)
        else:
            for conv, bn in self._folded:  # the same as self.m[:2], without the module calls
                x = fast.conv_bn(x, conv, bn, relu=True)
            feat = fast.pool_flat(x, self.m[2])
        return feat, self.linear(feat)

    def forward(self, x: Tensor) -> Tensor:
        """``x [B, cin, h, w]`` -> logits ``[B, num_classes]``."""
        return self.classify(x)[1]
