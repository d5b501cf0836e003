"""ConvNet-AIG (Veit & Belongie, ECCV 2018): convolutional networks with adaptive inference graphs.

Before every residual block a gate reads the block's input: global average pool -> ``Linear(C -> 16)`` ->
BatchNorm1d -> ReLU -> ``Linear(16 -> 2)`` (the paper's 1x1 convs on the pooled map; index 1 = execute).
The last layer starts at bias ``[0.1, 2]`` with weights ``N(0, 0.001)``, so about 87 % of the gates are
open at first. A kept block outputs ``relu(shortcut(x) + branch(x))``, a skipped one ``relu(shortcut(x))``
(training mixes ``relu(shortcut(x) + z * branch(x))`` with the straight-through hard Gumbel sample ``z``).
Training: :mod:`ponder.methods.aig` (cross-entropy plus the target-rate loss).

Unlike the official code, ``eval()`` is deterministic (argmax of the gate's logits, no Gumbel noise:
``model.noisy_eval = True`` restores the official behaviour) and skipped blocks really are skipped
(:class:`~ponder.nn.skip.BlockSkipper`'s sparse executor). CIFAR ResNets use projection shortcuts (B),
as the paper. The ImageNet models carry the papers' per-layer target-rate schedules
(:meth:`AIGResNet.target_rates`): ResNet-50 ``[1, 1, 0.8, 1, t, t, t, 1, t, t, t, t, t, 1, 0.7, 1]``,
ResNet-101 ``[1] * 8 + [t] * 25`` (layers targeted at 1 are left out of the loss).
"""

from __future__ import annotations

from ponder.models.gated import GatedResNet
from ponder.models.gated_builders import block_in_channels, register_gated_cifar
from ponder.models.resnet import IMAGENET_LAYOUTS, ImageNetResNet, ResNet
from ponder.nn.routers import IndependentRouters, PooledRouter
from ponder.registry import register_model

#: the gate's hidden width, and its last layer's initial bias and weight std (about 85 % open)
AIG_HIDDEN, AIG_BIAS, AIG_WEIGHT_STD = 16, [0.1, 2.0], 0.001


def aig_routers(backbone: ResNet) -> IndependentRouters:
    """ConvNet-AIG's gates for every block of ``backbone``, initialised as the paper's."""
    bank = IndependentRouters([PooledRouter(c, AIG_HIDDEN, 2, norm=True, act=True) for c in block_in_channels(backbone)])
    bank.init_final(bias=AIG_BIAS, weight_std=AIG_WEIGHT_STD)
    return bank


class AIGResNet(GatedResNet):
    """ConvNet-AIG: a gated ResNet with the paper's gates (module docstring). ``schedule``: ``None``
    (uniform targets), ``"resnet50"`` or ``"resnet101"`` (the papers' per-layer target rates)."""

    paper = "Veit & Belongie, ECCV 2018 (ConvNet-AIG)"

    def __init__(self, backbone: ResNet, threshold: float = 0.5, schedule: str | None = None):
        if schedule not in (None, "resnet50", "resnet101"):
            raise ValueError(f"schedule must be None, 'resnet50' or 'resnet101', got {schedule!r}")
        super().__init__(backbone, aig_routers(backbone), skipped="relu_shortcut", mix="inside", threshold=threshold)
        self.schedule = schedule

    def target_rates(self, target: float) -> list[float]:
        """Per-gate targets at rate ``target``: the paper's schedule for ResNet-50 / 101, else uniform."""
        t = float(target)
        if self.schedule == "resnet50":
            return [1, 1, 0.8, 1, t, t, t, 1, t, t, t, t, t, 1, 0.7, 1]
        if self.schedule == "resnet101":
            return [1.0] * 8 + [t] * 25
        return super().target_rates(t)


def _aig_cifar(depth: int):
    return register_gated_cifar(f"aig_resnet{depth}_cifar", AIGResNet, depth, "B",
                                f"ConvNet-AIG on CIFAR ResNet-{depth} ({3 * ((depth - 2) // 6)} gated blocks; "
                                f"projection shortcuts as the paper, 'A' / 'avgpool' also accepted).")


aig_resnet32_cifar = _aig_cifar(32)
aig_resnet110_cifar = _aig_cifar(110)


@register_model
def aig_resnet50(num_classes: int = 1000, threshold: float = 0.5) -> AIGResNet:
    """ConvNet-AIG on ImageNet ResNet-50 (16 gated bottlenecks; torchvision keys under ``backbone.``), with the
    paper's per-layer target schedule ``[1, 1, 0.8, 1, t, t, t, 1, t, t, t, t, t, 1, 0.7, 1]``."""
    return AIGResNet(ImageNetResNet(*IMAGENET_LAYOUTS[50], num_classes=num_classes), threshold, schedule="resnet50")


@register_model
def aig_resnet101(num_classes: int = 1000, threshold: float = 0.5) -> AIGResNet:
    """ConvNet-AIG on ImageNet ResNet-101 (33 gated bottlenecks), with the paper's per-layer target schedule
    ``[1] * 8 + [t] * 25``."""
    return AIGResNet(ImageNetResNet(*IMAGENET_LAYOUTS[101], num_classes=num_classes), threshold,
                     schedule="resnet101")
