"""CoDiNet (Wang et al., TPAMI 2021): dynamic routing with consistent and diverse path distributions.

Before every residual block a router reads the block's input: global average pool -> ``Linear(C -> C)``
-> ``Linear(C -> 2)``, with no nonlinearity between the two (as the paper), every Linear weight
``kaiming_normal_``. A kept block outputs ``block(x)``; a skipped one its skip path: the identity, or,
where the block changes stride or width, a 1x1 conv + BN + ReLU of the model's own, which is not free
(the ledger charges it as ``blocks.i.skip``). The blocks use the parameter-free shortcut (option A).
Training (:mod:`ponder.methods.codinet`) mixes ``k * block(x) + (1 - k) * skip(x)`` with the hard
(straight-through) or soft Gumbel sample ``k``; the losses: cross-entropy, the FLOPs L1 loss on the
number of executed blocks, and the consistency / diversity losses over augmented copies of each image.
"""

from __future__ import annotations

import torch.nn as nn

from ponder.models.gated import GatedResNet
from ponder.models.gated_builders import kaiming_routers, register_gated_cifar
from ponder.models.resnet import ResNet, conv1x1
from ponder.nn.routers import IndependentRouters, PooledRouter


def codinet_routers(backbone: ResNet) -> IndependentRouters:
    """CoDiNet's routers (two linear maps on the pooled block input) for every block of ``backbone``."""
    return kaiming_routers(backbone, lambda chans: IndependentRouters(
        [PooledRouter(c, c, 2, norm=False, act=False) for c in chans]))


def projection_skip(cin: int, cout: int, stride: int) -> nn.Sequential:
    """CoDiNet's skip path where a block changes stride or width: 1x1 conv (stride) + BN + ReLU."""
    bn = nn.BatchNorm2d(cout)
    conv = conv1x1(cin, cout, stride)
    nn.init.kaiming_normal_(conv.weight, mode="fan_out", nonlinearity="relu")
    return nn.Sequential(conv, bn, nn.ReLU())


class CoDiNetResNet(GatedResNet):
    """CoDiNet's gated ResNet (module docstring)."""

    paper = "Wang et al., TPAMI 2021 (CoDiNet)"

    def __init__(self, backbone: ResNet, threshold: float = 0.5):
        paths = {i: projection_skip(b.conv1.in_channels, b.conv2.out_channels, b.conv1.stride[0])
                 for i, b in enumerate(backbone.blocks) if b.downsample is not None}
        super().__init__(backbone, codinet_routers(backbone), skipped="shortcut", mix="outside", skip_paths=paths,
                         threshold=threshold)


def _codinet(depth: int):
    return register_gated_cifar(f"codinet_resnet{depth}_cifar", CoDiNetResNet, depth, "A",
                                f"CoDiNet on CIFAR ResNet-{depth} ({3 * ((depth - 2) // 6)} routed blocks; option-A "
                                f"shortcuts, 1x1 conv + BN + ReLU skip paths on the two downsampling blocks).")


codinet_resnet20_cifar = _codinet(20)
codinet_resnet32_cifar = _codinet(32)
codinet_resnet110_cifar = _codinet(110)
