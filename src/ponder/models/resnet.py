"""Residual networks: CIFAR ResNets (6n+2, selectable shortcut) and torchvision-layout ImageNet ResNets.

Shortcuts where a CIFAR block changes stride or width (``shortcut=``; reference
block_skipping.md 1.1): ``"A"`` subsamples ``x[:, :, ::2, ::2]`` and zero-pads the new channels
evenly on both sides (SP-Net, RDI-Net, CoDiNet); ``"avgpool"`` average-pools 2x2 and appends the
zero channels after the existing ones (BlockDrop, backbone and policy); ``"B"`` is a 1x1 conv + BN
projection (SkipNet, ConvNet-AIG). ``"A"`` and ``"avgpool"`` have no parameters and cost no MACs
(pooling is outside the conv + linear convention), so they give the same parameters and MACs but
different networks.

``state_dict`` keys of the ImageNet models are identical to torchvision's, so a torchvision
weights file loads without conversion (:func:`load_torchvision_weights`).
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from ponder.cost import CostLedger, eval_unit_macs
from ponder.models.base import PonderModel, example_input
from ponder.output import DynamicOutput, static_output
from ponder.registry import register_model

Shortcut = Literal["A", "avgpool", "B"]
SHORTCUTS = ("A", "avgpool", "B")


def conv3x3(cin: int, cout: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)


def conv1x1(cin: int, cout: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, 1, stride=stride, bias=False)


class ZeroPadShortcut(nn.Module):
    """Parameter-free shortcut ("option A"): subsample by ``stride``, zero-pad new channels evenly."""

    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.stride, self.pad = stride, cout - cin

    def forward(self, x: Tensor) -> Tensor:
        x = x[:, :, :: self.stride, :: self.stride]
        lo = self.pad // 2
        return F.pad(x, (0, 0, 0, 0, lo, self.pad - lo))


class AvgPoolShortcut(nn.Module):
    """Parameter-free shortcut of BlockDrop's CIFAR ResNets: ``stride x stride`` average pool, then the
    new ``cout - cin`` channels appended as zeros after the existing ones.

    ``[B, cin, H, W] -> [B, cout, ceil(H / stride), ceil(W / stride)]`` (an odd side's last window
    averages the pixels it covers, so the shape matches the strided 3x3 branch; even sides, such as
    CIFAR's, are exactly BlockDrop's pool).
    """

    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.stride, self.pad = stride, cout - cin

    def forward(self, x: Tensor) -> Tensor:
        if self.stride > 1:
            x = F.avg_pool2d(x, self.stride, ceil_mode=True)
        return F.pad(x, (0, 0, 0, 0, 0, self.pad))


class ResidualBlock(nn.Module):
    """A residual block split into ``branch(x)`` and ``shortcut(x)``; ``forward = relu(sum)``.

    Block-skipping models use the two halves separately.
    """

    downsample: nn.Module | None

    def shortcut(self, x: Tensor) -> Tensor:
        return x if self.downsample is None else self.downsample(x)

    def branch(self, x: Tensor) -> Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def forward(self, x: Tensor) -> Tensor:
        return F.relu(self.shortcut(x) + self.branch(x))


class BasicBlock(ResidualBlock):
    """conv3x3 -> BN -> ReLU -> conv3x3 -> BN, plus shortcut (torchvision names)."""

    expansion = 1

    def __init__(self, cin: int, planes: int, stride: int = 1, shortcut: Shortcut = "B"):
        super().__init__()
        self.conv1, self.bn1 = conv3x3(cin, planes, stride), nn.BatchNorm2d(planes)
        self.conv2, self.bn2 = conv3x3(planes, planes), nn.BatchNorm2d(planes)
        self.downsample = None
        if stride != 1 or cin != planes:
            if shortcut == "A":
                self.downsample = ZeroPadShortcut(cin, planes, stride)
            elif shortcut == "avgpool":
                self.downsample = AvgPoolShortcut(cin, planes, stride)
            else:
                self.downsample = nn.Sequential(conv1x1(cin, planes, stride), nn.BatchNorm2d(planes))

    def branch(self, x: Tensor) -> Tensor:
        return self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x)))))


class Bottleneck(ResidualBlock):
    """1x1 -> 3x3 (stride here, as torchvision) -> 1x1 with expansion 4."""

    expansion = 4

    def __init__(self, cin: int, planes: int, stride: int = 1, shortcut: Shortcut = "B"):
        super().__init__()
        out = planes * self.expansion
        self.conv1, self.bn1 = conv1x1(cin, planes), nn.BatchNorm2d(planes)
        self.conv2, self.bn2 = conv3x3(planes, planes, stride), nn.BatchNorm2d(planes)
        self.conv3, self.bn3 = conv1x1(planes, out), nn.BatchNorm2d(out)
        self.downsample = None
        if stride != 1 or cin != out:
            self.downsample = nn.Sequential(conv1x1(cin, out, stride), nn.BatchNorm2d(out))

    def branch(self, x: Tensor) -> Tensor:
        x = F.relu(self.bn1(self.conv1(x)))
        x = F.relu(self.bn2(self.conv2(x)))
        return self.bn3(self.conv3(x))


class ResNet(PonderModel):
    """A static ResNet: ``stem -> blocks -> head``. Ledger units: ``stem``, ``blocks.i``, ``head``.

    Subclasses define ``stem(x)``, ``head(x)`` and the stage containers; ``blocks`` lists every
    residual block in execution order (what block-skipping models decide over).
    """

    paper = "He et al., CVPR 2016 (ResNet)"
    blocks: list[ResidualBlock]
    stage_sizes: list[int]  # blocks per stage, in order

    def _collect_blocks(self, stages: list[nn.Sequential]) -> None:
        # a plain list (not a ModuleList) so state_dict keys stay torchvision's
        self.__dict__["blocks"] = [b for stage in stages for b in stage]
        self.__dict__["stage_sizes"] = [len(stage) for stage in stages]

    def stem(self, x: Tensor) -> Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def head(self, x: Tensor) -> Tensor:
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))

    def features(self, x: Tensor) -> Tensor:
        x = self.stem(x)
        for block in self.blocks:
            x = block(x)
        return x

    def forward_logits(self, x: Tensor) -> Tensor:
        """Plain ``[B, K]`` logits (no cost bookkeeping)."""
        return self.head(self.features(x))

    def forward(self, x: Tensor) -> DynamicOutput:
        self.check_input(x)
        return static_output(self.forward_logits(x), self.ledger_for(x).total)

    def measure_ledger(self, input_size: tuple[int, int, int]) -> CostLedger:
        x = example_input(self, input_size)
        stem_fn, head_fn = _MethodUnit(self.stem), _MethodUnit(self.head)
        units: dict[str, nn.Module] = {"stem": stem_fn, "head": head_fn}
        units.update({f"blocks.{i}": b for i, b in enumerate(self.blocks)})

        def run() -> None:
            h = stem_fn(x)
            for b in self.blocks:
                h = b(h)
            head_fn(h)

        costs = eval_unit_macs(self, run, units)
        total = costs.pop("total")
        return CostLedger(input_size=input_size, units=costs, total=total)

    def profile_blocks(self, input_size: tuple[int, int, int]) -> list[dict]:
        led = self.ledger(input_size)
        return [{"name": f"blocks.{i}", "macs": led[f"blocks.{i}"]} for i in range(len(self.blocks))]


class _MethodUnit(nn.Module):
    """Wraps a bound method as a module so ``unit_macs`` can hook it."""

    def __init__(self, fn):
        super().__init__()
        self.__dict__["fn"] = fn

    def forward(self, x: Tensor) -> Tensor:
        return self.fn(x)


def _init_weights(model: nn.Module, zero_init_residual: bool) -> None:
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
    if zero_init_residual:
        for m in model.modules():
            if isinstance(m, BasicBlock):
                nn.init.zeros_(m.bn2.weight)
            elif isinstance(m, Bottleneck):
                nn.init.zeros_(m.bn3.weight)


class CifarResNet(ResNet):
    """CIFAR ResNet of depth 6n+2: 3x3 stem (16), three stages of n BasicBlocks (16/32/64).

    ``shortcut``: ``"A"`` (subsample + even zero-pad), ``"avgpool"`` (BlockDrop's 2x2 average pool +
    appended zeros) or ``"B"`` (1x1 conv + BN); see the module docstring.
    """

    def __init__(self, depth: int = 20, num_classes: int = 10, shortcut: Shortcut = "A",
                 in_chans: int = 3, zero_init_residual: bool = False):
        super().__init__()
        if (depth - 2) % 6 != 0 or depth < 8:
            raise ValueError(f"CIFAR ResNet depth must be 6n+2 (20, 32, 44, 56, 110, ...), got {depth}")
        if shortcut not in SHORTCUTS:
            raise ValueError(f"shortcut must be 'A' (subsample + zero-pad), 'avgpool' (BlockDrop: 2x2 average "
                             f"pool + zero channels) or 'B' (1x1 conv projection), got {shortcut!r}")
        n = (depth - 2) // 6
        self.depth, self.num_classes, self.shortcut_type = depth, num_classes, shortcut
        self.default_input_size = (in_chans, 32, 32)
        self.conv1, self.bn1 = conv3x3(in_chans, 16), nn.BatchNorm2d(16)
        cin, stages = 16, []
        for i, planes in enumerate((16, 32, 64)):
            layers = []
            for j in range(n):
                stride = 2 if (i > 0 and j == 0) else 1
                layers.append(BasicBlock(cin, planes, stride, shortcut))
                cin = planes
            stages.append(nn.Sequential(*layers))
        self.layer1, self.layer2, self.layer3 = stages
        self.fc = nn.Linear(64, num_classes)
        self._collect_blocks(stages)
        _init_weights(self, zero_init_residual)

    def stem(self, x: Tensor) -> Tensor:
        return F.relu(self.bn1(self.conv1(x)))


class ImageNetResNet(ResNet):
    """torchvision-layout ResNet (same ``state_dict`` keys and shapes as ``torchvision.models``)."""

    def __init__(self, block: type[BasicBlock] | type[Bottleneck], layers: list[int], num_classes: int = 1000,
                 in_chans: int = 3, zero_init_residual: bool = False):
        super().__init__()
        self.num_classes = num_classes
        self.default_input_size = (in_chans, 224, 224)
        self.conv1 = nn.Conv2d(in_chans, 64, 7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
        cin, stages = 64, []
        for i, (planes, n) in enumerate(zip((64, 128, 256, 512), layers)):
            blocks = []
            for j in range(n):
                blocks.append(block(cin, planes, 2 if (i > 0 and j == 0) else 1, "B"))
                cin = planes * block.expansion
            stages.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(512 * block.expansion, num_classes)
        self._collect_blocks(stages)
        _init_weights(self, zero_init_residual)

    def stem(self, x: Tensor) -> Tensor:
        return self.maxpool(self.relu(self.bn1(self.conv1(x))))

    def head(self, x: Tensor) -> Tensor:
        return self.fc(torch.flatten(self.avgpool(x), 1))


def load_torchvision_weights(model: ImageNetResNet, path: str) -> None:
    """Load a torchvision ResNet ``.pth`` / ``.safetensors`` state dict into ``model`` (strict).

    ``.pth`` files are read with ``weights_only=True`` so they cannot run code.
    """
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        state = load_file(path)
    else:
        state = torch.load(path, map_location="cpu", weights_only=True)
    model.load_state_dict(state, strict=True)


def _cifar(depth: int):
    def factory(num_classes: int = 10, shortcut: Shortcut = "A", **kw) -> CifarResNet:
        return CifarResNet(depth, num_classes=num_classes, shortcut=shortcut, **kw)

    factory.__name__ = f"resnet{depth}_cifar"
    factory.__doc__ = (f"CIFAR ResNet-{depth} ({(depth - 2) // 6} BasicBlocks per stage; "
                       f"shortcut 'A', 'avgpool' or 'B').")
    return register_model(factory)


def _imagenet(name: str, block, layers: list[int]):
    def factory(num_classes: int = 1000, **kw) -> ImageNetResNet:
        return ImageNetResNet(block, layers, num_classes=num_classes, **kw)

    factory.__name__ = name
    factory.__doc__ = f"ImageNet {name} (torchvision state_dict layout)."
    return register_model(factory)


resnet20_cifar = _cifar(20)
resnet32_cifar = _cifar(32)
resnet44_cifar = _cifar(44)
resnet56_cifar = _cifar(56)
resnet110_cifar = _cifar(110)
#: torchvision's ImageNet ResNets: depth -> (block, blocks per stage); every family's ImageNet presets use these
IMAGENET_LAYOUTS: dict[int, tuple[type[ResidualBlock], list[int]]] = {
    18: (BasicBlock, [2, 2, 2, 2]), 34: (BasicBlock, [3, 4, 6, 3]), 50: (Bottleneck, [3, 4, 6, 3]),
    101: (Bottleneck, [3, 4, 23, 3]), 152: (Bottleneck, [3, 8, 36, 3])}

resnet18 = _imagenet("resnet18", *IMAGENET_LAYOUTS[18])
resnet34 = _imagenet("resnet34", *IMAGENET_LAYOUTS[34])
resnet50 = _imagenet("resnet50", *IMAGENET_LAYOUTS[50])
resnet101 = _imagenet("resnet101", *IMAGENET_LAYOUTS[101])
resnet152 = _imagenet("resnet152", *IMAGENET_LAYOUTS[152])
