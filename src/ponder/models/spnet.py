"""SP-Net (Wang et al., ECCV 2022): slowly progressing dynamic inference networks, with their own router.

SP-Net is a fork of ConvNet-AIG: a router before every residual block reads the block's input (global
average pool -> ``Linear(C -> 128)`` -> BatchNorm1d -> ReLU -> dropout 0.4 -> ``Linear(128 -> 2)``, the
last bias starting at ``[0.1, 2]``, every Linear weight ``kaiming_normal_``); a kept block outputs
``relu(shortcut(x) + branch(x))``, a skipped one ``relu(shortcut(x))``. CIFAR ResNets use the
parameter-free shortcut (option A), ImageNet ResNets the projection.

What makes SP-Net is its training (:mod:`ponder.methods.spnet`: multi-stage heads, the EMA "slowly
progressing" auxiliary module guiding routers and outputs, the feature-evolution loss, the rate loss
and gradient clamping), which applies to any :class:`~ponder.models.gated.GatedResNet`: ConvNet-AIG,
CoDiNet and RDI-Net models trained with method ``spnet`` are "SP-Net on that backbone".
"""

from __future__ import annotations

from ponder.models.gated import GatedResNet
from ponder.models.gated_builders import kaiming_routers
from ponder.models.resnet import IMAGENET_LAYOUTS, CifarResNet, ImageNetResNet, ResNet
from ponder.nn.routers import IndependentRouters, PooledRouter
from ponder.registry import register_model

#: the router's hidden width, dropout and last layer's initial bias
SPNET_HIDDEN, SPNET_DROPOUT, SPNET_BIAS = 128, 0.4, [0.1, 2.0]


def spnet_routers(backbone: ResNet) -> IndependentRouters:
    """SP-Net's routers for every block of ``backbone``, initialised as its official code."""
    bank = kaiming_routers(backbone, lambda chans: IndependentRouters(
        [PooledRouter(c, SPNET_HIDDEN, 2, norm=True, act=True, dropout=SPNET_DROPOUT) for c in chans]))
    bank.init_final(bias=SPNET_BIAS)
    return bank


class SPNetResNet(GatedResNet):
    """SP-Net's gated ResNet (module docstring)."""

    paper = "Wang et al., ECCV 2022 (SP-Net)"

    def __init__(self, backbone: ResNet, threshold: float = 0.5):
        super().__init__(backbone, spnet_routers(backbone), skipped="relu_shortcut", mix="inside", threshold=threshold)


@register_model
def spnet_resnet110_cifar(num_classes: int = 10, shortcut: str = "A", threshold: float = 0.5,
                          in_chans: int = 3) -> SPNetResNet:
    """SP-Net on CIFAR ResNet-110 (54 routed blocks, option-A shortcuts); train with method ``spnet``."""
    return SPNetResNet(CifarResNet(110, num_classes=num_classes, shortcut=shortcut, in_chans=in_chans), threshold)


@register_model
def spnet_resnet50(num_classes: int = 1000, threshold: float = 0.5) -> SPNetResNet:
    """SP-Net on ImageNet ResNet-50 (16 routed bottlenecks; torchvision keys under ``backbone.``)."""
    return SPNetResNet(ImageNetResNet(*IMAGENET_LAYOUTS[50], num_classes=num_classes), threshold)
