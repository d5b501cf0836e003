"""A ResNet's dense units at inference on the sparse executor's kernels (BN folded, channels-last out).

The spatial executor runs every unit of a stage in channels-last layout with BN folded into the
convolutions (:func:`dense_unit_channels_last` for the units it runs densely), and ``ponder bench``
times the whole dense ResNet on the same kernels (:func:`resnet_on_kernels`) next to plain PyTorch,
so the speed-up owed to sparsity alone is reported too. The BlockDrop policy trunk runs on it at
inference as well. Duck-typed on ``ponder.models.resnet`` ResNets (``conv1``, ``bn1``, optional
``maxpool``, ``blocks``, ``head``), so this layer imports nothing from ``ponder.models``.
"""

from __future__ import annotations

import torch
import torch.nn as nn
from torch import Tensor

from ponder import fast
from ponder.nn.sparse_units import dense_unit_channels_last

__all__ = ["dense_unit_channels_last", "resnet_on_kernels", "stem_on_kernels"]


def resnet_on_kernels(model: nn.Module, x: Tensor) -> Tensor:
    """``model.forward_logits(x)`` of a ``ponder.models.resnet`` ResNet at inference: the stem by
    :func:`stem_on_kernels`, every unit through :func:`dense_unit_channels_last` (BN folded, 1x1 convs
    as row GEMMs on the faster backend, channels-last where measured faster), the head as it is.
    ``[B, C, H, W]`` -> ``[B, K]``."""
    h = stem_on_kernels(model, x)
    for block in model.blocks:
        h = dense_unit_channels_last(block, h)
    return model.head(h)


def stem_on_kernels(model: nn.Module, x: Tensor) -> Tensor:
    """``model.stem(x)`` at inference, channels-last: conv1 with BN folded (:func:`ponder.fast.conv_bn`),
    then the ImageNet stem's max-pool (``model.maxpool``, if any) on the channels-last map (PyTorch's
    NCHW max-pool is the slow one: 4.6 ms against 0.3 ms on ResNet-50's 64 x 112 x 112 map at batch 1,
    one thread). ``[B, 3, H, W]`` -> ``[B, 64, H', W']`` (CIFAR: ``[B, 16, H, W]``)."""
    with torch.no_grad():
        h = fast.conv_bn(x.contiguous(memory_format=torch.channels_last), model.conv1, model.bn1, relu=True)
        pool = getattr(model, "maxpool", None)
        return (pool(h) if pool is not None else h).contiguous(memory_format=torch.channels_last)
