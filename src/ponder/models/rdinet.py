"""RDI-Net (Wang et al., ICCV 2021): relational dynamic inference networks, three options per block.

Before every residual block a relational router (:class:`~ponder.nn.routers.RelationalRouters`) scores
three options from the block's input and the two previous routers' features: skip
(``relu(shortcut(x))``), half (the first conv only: ``relu(shortcut(x) + bn1(conv1(x)))``) or the whole
block. The ledger charges each sample ``blocks.i.skip`` (0: option-A shortcuts), ``blocks.i.half`` or
``blocks.i``. Training (:mod:`ponder.methods.rdinet`) takes three stages: uniform random paths, then the
routers with the network frozen (cost loss and the InfoNCE relation loss over two views per image),
then the network with the routers frozen.
"""

from __future__ import annotations

from ponder.models.gated import GatedResNet
from ponder.models.gated_builders import kaiming_routers, register_gated_cifar
from ponder.models.resnet import ResNet
from ponder.nn.routers import RelationalRouters


class RDINetResNet(GatedResNet):
    """RDI-Net's gated ResNet (module docstring)."""

    paper = "Wang et al., ICCV 2021 (RDI-Net)"

    def __init__(self, backbone: ResNet, threshold: float = 0.5):
        super().__init__(backbone, kaiming_routers(backbone, RelationalRouters), skipped="relu_shortcut", mix="inside", threshold=threshold)


def _rdinet(depth: int):
    return register_gated_cifar(f"rdinet_resnet{depth}_cifar", RDINetResNet, depth, "A",
                                f"RDI-Net on CIFAR ResNet-{depth} ({3 * ((depth - 2) // 6)} routed blocks, each skip / "
                                f"first conv only / whole; option-A shortcuts).")


rdinet_resnet32_cifar = _rdinet(32)
rdinet_resnet110_cifar = _rdinet(110)
