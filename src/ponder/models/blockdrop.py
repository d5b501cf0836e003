"""BlockDrop (Wu et al., CVPR 2018): a policy network decides, per image, which residual blocks run.

Two variants over a ``ponder.models.resnet`` backbone:

- :class:`BlockDropResNet`: the policy (a ResNet-8 on the 32x32 CIFAR input, or a ResNet-10 on the
  ImageNet input pooled to 112 px) reads the image **once, before** the backbone, and outputs one
  keep probability per block (a contextual bandit).
- :class:`BlockDropSeqResNet` (BlockDrop-seq): before each block, ``Linear(C -> 2)`` on the pooled
  current feature map decides (softmax keep/drop) whether that block runs.

A skipped block outputs ``shortcut(x)`` with no ReLU (BlockDrop's rule). The CIFAR backbones and the
ResNet-8 policy use BlockDrop's parameter-free shortcut by default (``shortcut="avgpool"``: 2x2
average pool, zero channels appended; ``ponder.models.resnet``). ``forward(x)`` returns
``DynamicOutput(logits, macs, gates=[B, blocks], extras={"probs", "sample_probs", "log_prob"})``;
``macs`` charges each sample for the blocks it ran plus the policy (ledger units ``stem``,
``blocks.i``, ``blocks.i.skip``, ``policy``, ``head``). At test time a block runs iff its keep
probability is ``>= threshold`` (the family's native knob, 0.5 by default; :meth:`set_budget` moves it
to reach a mean MACs per image on held-out images).

Weights: keys are ``backbone.<ResNet key>`` and ``policy.*`` / ``gates.*``. Loading a plain
``resnet*_cifar`` / torchvision ResNet state dict (no ``backbone.`` prefix, e.g. through
``train.init_from``) fills the backbone and leaves the policy as initialised.
"""

from __future__ import annotations

import torch
import torch.nn as nn
from torch import Tensor

from ponder.cost import count_macs
from ponder.models.base import example_input
from ponder.models.resnet import IMAGENET_LAYOUTS, BasicBlock, CifarResNet, ImageNetResNet, ResNet
from ponder.models.skipping import SkippingModel
from ponder.nn.policy import PolicyDecision, PooledLinearGates, ResNetPolicy, bernoulli_log_prob, decide_blocks
from ponder.output import DynamicOutput
from ponder.registry import register_model
from ponder.weights import load_init_weights


class BlockDropModel(SkippingModel):
    """What both variants share beyond the skipping family: the curriculum state and the output."""

    paper = "Wu et al., CVPR 2018 (BlockDrop)"
    own_prefixes = ("policy.", "gates.", "first_decided")

    def __init__(self, backbone: ResNet, threshold: float = 0.5):
        super().__init__(backbone, skipped="shortcut", threshold=threshold)
        # curriculum learning: blocks before this index are always kept (saved with the weights)
        self.register_buffer("first_decided", torch.zeros((), dtype=torch.long))

    def set_curriculum(self, num_decided: int | None) -> None:
        """Let the policy decide only the last ``num_decided`` blocks (``None`` = all); the rest are kept."""
        n = self.num_blocks if num_decided is None else max(1, min(int(num_decided), self.num_blocks))
        self.first_decided.fill_(self.num_blocks - n)

    def decided(self) -> Tensor:
        """``[blocks]`` bool: which blocks the policy decides (curriculum)."""
        return torch.arange(self.num_blocks, device=self.first_decided.device) >= self.first_decided

    def _decided_mask(self) -> Tensor | None:
        """:meth:`decided`, or ``None`` when the policy decides every block (the common, faster case)."""
        return None if int(self.first_decided) == 0 else self.decided()

    def profile_blocks(self, input_size: tuple[int, int, int]) -> list[dict]:
        return super().profile_blocks(input_size) + [{"name": "policy", "macs": self.ledger(input_size)["policy"]}]

    def _output(self, x: Tensor, logits: Tensor, dec: PolicyDecision) -> DynamicOutput:
        return DynamicOutput(logits=logits, macs=self.charge(x, dec.keep), gates=dec.keep.detach(),
                             extras={"probs": dec.probs, "sample_probs": dec.sample_probs, "log_prob": dec.log_prob})


class BlockDropResNet(BlockDropModel):
    """BlockDrop: ``policy(x) -> probs [B, blocks]`` once, then the backbone runs the kept blocks."""

    def __init__(self, backbone: ResNet, policy: ResNetPolicy, threshold: float = 0.5):
        super().__init__(backbone, threshold)
        self.policy = policy

    def measure_decision_units(self, input_size: tuple[int, int, int]) -> dict[str, int]:
        return {"policy": count_macs(self.policy, example_input(self, input_size))}

    def init_policy_trunk(self, source: str) -> None:
        """Initialise the policy trunk from a larger ResNet of the same family (run dir or weights file),
        e.g. the ImageNet ResNet-10 from torchvision ResNet-18 weights: the stem and the first block of
        each stage, as BlockDrop does. Raises if a trunk weight is missing from ``source``."""
        missing, _ = load_init_weights(self.policy.trunk, source)
        if missing:
            raise ValueError(f"policy_init {source} lacks {len(missing)} policy-trunk weights ({missing[:3]}); "
                             f"give a ResNet with the same stem and stage widths (ResNet-18 for ResNet-10)")

    def forward(self, x: Tensor, sample: bool = False, alpha: float = 1.0) -> DynamicOutput:
        """``x [B, C, H, W]``; ``sample=True`` draws decisions from the ``alpha``-bounded policy (training)."""
        self.check_input(x)
        probs = self.policy(x)
        forced = self.forced_keep(x)
        if forced is not None:
            dec = PolicyDecision(forced, probs, probs, bernoulli_log_prob(probs, forced).sum(1))
        else:
            dec = decide_blocks(probs, sample=sample, alpha=alpha, threshold=self.threshold,
                                decided=self._decided_mask())
        h = self.skipper.run_blocks(self.backbone.blocks, self.backbone.stem(x), dec.keep)
        return self._output(x, self.backbone.head(h), dec)


class BlockDropSeqResNet(BlockDropModel):
    """BlockDrop-seq: before block ``i``, ``Linear(C_i -> 2)`` on its pooled input decides whether it runs."""

    def __init__(self, backbone: ResNet, threshold: float = 0.5):
        super().__init__(backbone, threshold)
        channels = [_in_channels(b) for b in backbone.blocks]
        self.gates = PooledLinearGates(channels)

    def measure_decision_units(self, input_size: tuple[int, int, int]) -> dict[str, int]:
        h = self.backbone.stem(example_input(self, input_size))
        total = 0
        for i, block in enumerate(self.backbone.blocks):
            total += count_macs(self.gates, i, h)
            h = block(h)
        return {"policy": total}

    def forward(self, x: Tensor, sample: bool = False, alpha: float = 1.0) -> DynamicOutput:
        """``x [B, C, H, W]``; ``sample=True`` draws each decision from the ``alpha``-bounded gate (training)."""
        self.check_input(x)
        decided = self._decided_mask()
        forced = self.forced_keep(x)
        h = self.backbone.stem(x)
        cols: list[PolicyDecision] = []
        for i, block in enumerate(self.backbone.blocks):
            p = self.gates(i, h).unsqueeze(1)
            if forced is not None:
                k = forced[:, i : i + 1]
                dec = PolicyDecision(k, p, p, bernoulli_log_prob(p, k).sum(1))
            else:
                dec = decide_blocks(p, sample=sample, alpha=alpha, threshold=self.threshold,
                                    decided=None if decided is None else decided[i : i + 1])
            cols.append(dec)
            h = self.skipper.run_block(block, h, dec.keep[:, 0])
        dec = PolicyDecision(keep=torch.cat([c.keep for c in cols], 1), probs=torch.cat([c.probs for c in cols], 1),
                             sample_probs=torch.cat([c.sample_probs for c in cols], 1),
                             log_prob=torch.stack([c.log_prob for c in cols], 1).sum(1))
        return self._output(x, self.backbone.head(h), dec)


def _in_channels(block: nn.Module) -> int:
    return block.conv1.in_channels


def cifar_policy(num_blocks: int, in_chans: int = 3, init_keep_prob: float | None = None) -> ResNetPolicy:
    """BlockDrop's CIFAR policy: a ResNet-8 (one BasicBlock per stage, BlockDrop's avg-pool shortcuts) on the
    full input."""
    return ResNetPolicy(CifarResNet(8, num_classes=1, shortcut="avgpool", in_chans=in_chans), 64, num_blocks,
                        init_keep_prob=init_keep_prob)


def imagenet_policy(num_blocks: int, in_chans: int = 3) -> ResNetPolicy:
    """BlockDrop's ImageNet policy: a ResNet-10 (BasicBlocks [1, 1, 1, 1]) on the input pooled by 2 (224 -> 112 px)."""
    trunk = ImageNetResNet(BasicBlock, [1, 1, 1, 1], num_classes=1, in_chans=in_chans)
    return ResNetPolicy(trunk, 512, num_blocks, downsample=2)


def _cifar_blockdrop(depth: int, num_classes: int, shortcut: str, threshold: float,
                     in_chans: int = 3, init_keep_prob: float | None = None) -> BlockDropResNet:
    backbone = CifarResNet(depth, num_classes=num_classes, shortcut=shortcut, in_chans=in_chans)
    return BlockDropResNet(backbone, cifar_policy(len(backbone.blocks), in_chans, init_keep_prob), threshold)


@register_model
def blockdrop_resnet32_cifar(num_classes: int = 10, shortcut: str = "avgpool", threshold: float = 0.5,
                             in_chans: int = 3, init_keep_prob: float | None = None) -> BlockDropResNet:
    """BlockDrop on CIFAR ResNet-32 (15 blocks), ResNet-8 policy on the 32x32 input."""
    return _cifar_blockdrop(32, num_classes, shortcut, threshold, in_chans, init_keep_prob)


@register_model
def blockdrop_resnet110_cifar(num_classes: int = 10, shortcut: str = "avgpool", threshold: float = 0.5,
                             in_chans: int = 3, init_keep_prob: float | None = None) -> BlockDropResNet:
    """BlockDrop on CIFAR ResNet-110 (54 blocks), ResNet-8 policy on the 32x32 input."""
    return _cifar_blockdrop(110, num_classes, shortcut, threshold, in_chans, init_keep_prob)


@register_model
def blockdrop_resnet101(num_classes: int = 1000, threshold: float = 0.5,
                        policy_init: str | None = None) -> BlockDropResNet:
    """BlockDrop on ImageNet ResNet-101 (33 blocks; torchvision keys under ``backbone.``), ResNet-10 policy
    at 112 px; ``policy_init``: ResNet-18 weights (torchvision layout) for the policy's stem and first blocks."""
    backbone = ImageNetResNet(*IMAGENET_LAYOUTS[101], num_classes=num_classes)
    model = BlockDropResNet(backbone, imagenet_policy(len(backbone.blocks)), threshold)
    if policy_init:
        model.init_policy_trunk(policy_init)
    return model


@register_model
def blockdrop_seq_resnet110_cifar(num_classes: int = 10, shortcut: str = "avgpool",
                                  threshold: float = 0.5) -> BlockDropSeqResNet:
    """BlockDrop-seq on CIFAR ResNet-110: per-block ``Linear(C -> 2)`` policies on the pooled block input."""
    return BlockDropSeqResNet(CifarResNet(110, num_classes=num_classes, shortcut=shortcut), threshold)
