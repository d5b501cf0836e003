"""What the gated ResNets' model files (ConvNet-AIG, CoDiNet, RDI-Net, SP-Net) build the same way: routers over
a backbone's blocks, and the registered factories of their CIFAR models."""

from __future__ import annotations

from typing import Callable, TypeVar

from ponder.models.gated import GatedResNet
from ponder.models.resnet import CifarResNet, ResNet
from ponder.nn.routers import RouterBank, init_router_weights
from ponder.registry import register_model

Bank = TypeVar("Bank", bound=RouterBank)


def block_in_channels(backbone: ResNet) -> list[int]:
    """Channels of each block's input (what its router reads)."""
    return [b.conv1.in_channels for b in backbone.blocks]


def kaiming_routers(backbone: ResNet, make: Callable[[list[int]], Bank]) -> Bank:
    """``make(channels)`` (``channels``: each block's input width in ``backbone``) with every Linear weight
    ``kaiming_normal_`` and zero biases (:func:`~ponder.nn.routers.init_router_weights`)."""
    bank = make(block_in_channels(backbone))
    init_router_weights(bank)
    return bank


def register_gated_cifar(name: str, cls: type[GatedResNet], depth: int, shortcut: str,
                         doc: str) -> Callable[..., GatedResNet]:
    """Register ``name``: ``cls(CifarResNet(depth, ...), threshold)``, with the options ``num_classes`` (10),
    ``shortcut`` (default ``shortcut``), ``threshold`` (0.5) and ``in_chans`` (3); ``doc`` is its docstring, ``cls``
    its return annotation (what the registry lists without building) and ``cls``'s module its module."""
    def factory(num_classes: int = 10, shortcut: str = shortcut, threshold: float = 0.5,
                in_chans: int = 3) -> GatedResNet:
        return cls(CifarResNet(depth, num_classes=num_classes, shortcut=shortcut, in_chans=in_chans), threshold)

    factory.__name__, factory.__doc__, factory.__module__ = name, doc, cls.__module__
    factory.__annotations__["return"] = cls
    return register_model(factory)
