"""The shapes of model parts that layers in ``ponder.nn`` work on, as typing protocols.

The layers are duck-typed on ``ponder.models.resnet``'s classes (so ``ponder.nn`` imports nothing from
``ponder.models``); these protocols name what they rely on.
"""

from __future__ import annotations

from typing import Protocol, Sequence

import torch.nn as nn
from torch import Tensor


class ResidualBlock(Protocol):
    """A residual block split into ``branch(x)`` and ``shortcut(x)`` (``forward = relu(sum)``), with its
    convolutions and BatchNorms as ``conv1, bn1, conv2, bn2[, conv3, bn3]`` and ``downsample`` (``None``
    for an identity shortcut)."""

    downsample: nn.Module | None
    training: bool

    def branch(self, x: Tensor) -> Tensor: ...

    def shortcut(self, x: Tensor) -> Tensor: ...

    def __call__(self, x: Tensor) -> Tensor: ...


class ResNet(Protocol):
    """A ResNet: ``stem(x)``, ``blocks`` in execution order, ``head(x)``; ``forward_logits`` runs all three."""

    blocks: Sequence[ResidualBlock]

    def stem(self, x: Tensor) -> Tensor: ...

    def head(self, x: Tensor) -> Tensor: ...

    def forward_logits(self, x: Tensor) -> Tensor: ...
