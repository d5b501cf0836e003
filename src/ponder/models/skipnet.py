"""SkipNet (Wang et al., ECCV 2018): gated CIFAR ResNets with sequential per-block gates.

Placement: block 0 always runs; gate ``j`` (``j = 0 .. N-2``) reads the output of block ``j``
and decides whether block ``j + 1`` runs (the gate after the last block would be discarded, so
it is not evaluated). A kept block outputs ``relu(shortcut(x) + branch(x))``; a skipped block
outputs ``shortcut(x)``: the input itself, or its 1x1 projection + BN (no ReLU) where the shape
changes. Gates: ``"ffgate1"`` / ``"ffgate2"`` (feed-forward, one per gated block) or ``"rnn"``
(per-block projection into one LSTM cell shared by all gates); see :mod:`ponder.nn.gates`.

Decisions are sequential, so the sparse executor decides column by column and runs each block
only on the samples that keep it (:class:`ponder.nn.skip.BlockSkipper`). Each sample pays the
stem, head, every gate, and per block either the block or its projection shortcut.

Native knob: keep block iff ``p >= threshold`` (default 0.5); :meth:`SkipNet.set_budget` moves it to
reach a mean MACs per image on held-out images.
Weights: ``backbone.<ResNet key>`` and ``gate_bank.*``; a plain option-B CIFAR ResNet state dict
(e.g. a ``resnet110_cifar`` run with ``shortcut: B`` via ``train.init_from``) fills the backbone.
"""

from __future__ import annotations

import functools
from typing import Callable

import torch
import torch.nn as nn
from torch import Tensor

from ponder.cost import count_macs
from ponder.models.base import example_input
from ponder.models.resnet import IMAGENET_LAYOUTS, CifarResNet, ImageNetResNet, ResNet
from ponder.models.skipping import SkippingModel
from ponder.nn import skip_kernels
from ponder.nn.dense_units import dense_unit_channels_last, stem_on_kernels
from ponder.nn.gates import DECISION_MODES, GateBank, decide, make_gate_bank
from ponder.nn.thresholds import probability_logit
from ponder.output import DynamicOutput
from ponder.registry import register_model


class SkipNet(SkippingModel):
    """A ResNet whose blocks 1..N-1 are gated by the previous block's output.

    ``forward(x [B, C, H, W]) -> DynamicOutput`` with ``gates [B, N]`` (column 0 always 1) and
    extras ``gate_logits`` / ``gate_probs`` / ``gate_actions`` ``[B, N-1]`` (one column per gate;
    keep probability = sigmoid(logit)) and, in training, ``gate_log_probs`` (log pi(action)).

    ``decision_mode`` (set by the training method): ``"straight_through"`` (SP),
    ``"sample"`` (HRL) or ``"soft"``; ``eval()`` always thresholds the keep probability.

    ``init_keep_prob`` (library option, not in the paper; ``None`` = PyTorch's default biases):
    start every gate's final bias at this keep probability. With hard straight-through gates a
    block whose gate starts closed gets no gradient, so gates that start near or below 0.5 can
    stay closed; 0.9 starts with (almost) every block open.
    """

    paper = "Wang et al., ECCV 2018 (SkipNet)"
    own_prefixes = ("gate_bank.",)

    def __init__(self, backbone: ResNet, gate_type: str = "rnn", threshold: float = 0.5,
                 init_keep_prob: float | None = None, executor: str = "masked"):
        if len(backbone.blocks) < 2:
            raise ValueError(f"SkipNet needs a backbone with at least 2 blocks, got {len(backbone.blocks)}")
        super().__init__(backbone, skipped="shortcut", mix="outside", threshold=threshold)
        self.skipper.executor = executor
        self.gate_type = gate_type
        self.gate_bank: GateBank = make_gate_bank(gate_type, self._gate_channels())
        if init_keep_prob is not None:
            self.gate_bank.bias_towards_keep(init_keep_prob)
        self.decision_mode = "straight_through"

    def _gate_channels(self) -> list[int]:
        """Channels of the map each gate reads: the output of blocks 0 .. N-2 (a block's last conv,
        branch or projection, has its output width)."""
        return [[m for m in b.modules() if isinstance(m, nn.Conv2d)][-1].out_channels
                for b in self.backbone.blocks[:-1]]

    @property
    def gate_names(self) -> list[str]:
        """Ledger units of the gates; ``gates.j`` decides block ``j + 1``."""
        return [f"gates.{j}" for j in range(self.num_blocks - 1)]

    # forward ---------------------------------------------------------------------------------
    def forward(self, x: Tensor) -> DynamicOutput:
        self.check_input(x)
        if self.decision_mode not in DECISION_MODES:
            raise ValueError(f"decision_mode must be one of {DECISION_MODES}, got {self.decision_mode!r}")
        blocks = self.backbone.blocks
        forced = self.forced_keep(x, first=1)
        if (x.shape[0] == 1 and not self.training and self.skipper.executor == "sparse"
                and skip_kernels.applies(blocks[0], x)):
            return self._infer_one(x, forced)
        h = blocks[0](self.backbone.stem(x))
        state = self.gate_bank.init_state(h)
        gate_logits, actions, log_probs = [], [], []
        for j, block in enumerate(blocks[1:]):
            logit, state = self.gate_bank.step(j, h, state)
            d = decide(logit, mode=self.decision_mode, threshold=self.threshold, training=self.training,
                       forced=None if forced is None else forced[:, j])
            h = self.skipper.run_block(block, h, d.mask)
            gate_logits.append(logit)
            actions.append(d.action)
            log_probs.append(d.log_prob)
        logits = self.backbone.head(h)
        actions_t = torch.stack(actions, 1)
        gates = torch.cat([actions_t.new_ones(x.shape[0], 1), actions_t], 1)
        logits_t = torch.stack(gate_logits, 1)
        extras = {"gate_logits": logits_t, "gate_probs": torch.sigmoid(logits_t), "gate_actions": actions_t}
        if self.training:
            extras["gate_log_probs"] = torch.stack(log_probs, 1)
        return DynamicOutput(logits=logits, macs=self.charge(x, gates), gates=gates, extras=extras)

    def _infer_one(self, x: Tensor, forced: Tensor | None) -> DynamicOutput:
        """Inference for one image on the sparse executor's kernels and the model's batch-1 plan
        (:func:`ponder.fast.prepared`): every block's options bound to their kernels once
        (:func:`ponder.nn.skip_kernels.bound_options`); per gate one step and one read of its logit."""
        h = dense_unit_channels_last(self.backbone.blocks[0], stem_on_kernels(self.backbone, x))
        steps, runners = self.batch_one_plan(h, self.backbone.blocks[1:], 2, self.gate_bank.bound_steps)
        picks = None if forced is None else (forced[0] > 0.5).tolist()
        bar = torch.tensor(probability_logit(self.threshold), dtype=x.dtype).item()  # as decide() compares: in x's dtype
        state = self.gate_bank.init_state(h)
        gate_logits, actions = [], []
        for j, (step, options) in enumerate(zip(steps, runners)):
            logit, state = step(h, state)
            keep = picks[j] if picks is not None else logit.item() >= bar  # decide()'s eval rule
            h = options[int(keep)](h)
            gate_logits.append(logit)
            actions.append(float(keep))
        actions_t = torch.tensor([actions], dtype=x.dtype, device=x.device)
        gates = torch.cat([actions_t.new_ones(1, 1), actions_t], 1)
        logits_t = torch.stack(gate_logits, 1)
        extras = {"gate_logits": logits_t, "gate_probs": torch.sigmoid(logits_t), "gate_actions": actions_t}
        return DynamicOutput(logits=self.backbone.head(h), macs=self.charge(x, gates), gates=gates, extras=extras)

    # cost ------------------------------------------------------------------------------------
    def measure_decision_units(self, input_size: tuple[int, int, int]) -> dict[str, int]:
        """``gates.j`` for every gate, at batch 1 on the dense path."""
        units = {}
        h = self.backbone.blocks[0](self.backbone.stem(example_input(self, input_size)))
        state = self.gate_bank.init_state(h)
        for j, block in enumerate(self.backbone.blocks[1:]):
            units[f"gates.{j}"] = count_macs(self.gate_bank.step, j, h, state)
            _, state = self.gate_bank.step(j, h, state)
            h = block(h)
        return units

    def profile_blocks(self, input_size: tuple[int, int, int]) -> list[dict]:
        """Per block: ``macs`` when run, ``skip_macs`` when skipped, ``gate_macs`` of the gate deciding it."""
        led = self.ledger(input_size)
        return [dict(row, gate_macs=led[f"gates.{i - 1}"] if i > 0 else 0)
                for i, row in enumerate(super().profile_blocks(input_size))]


def _register(name: str, backbone: Callable[..., ResNet], classes: int, doc: str):
    """Register ``name``: SkipNet on ``backbone(num_classes=..., **kw)`` (its options after the gates')."""

    def factory(num_classes: int = classes, gate_type: str = "rnn", threshold: float = 0.5,
                init_keep_prob: float | None = None, **kw) -> SkipNet:
        return SkipNet(backbone(num_classes=num_classes, **kw), gate_type=gate_type, threshold=threshold,
                       init_keep_prob=init_keep_prob)

    factory.__name__, factory.__doc__ = name, doc
    return register_model(factory)


def _skipnet(depth: int, doc_gate: str):
    return _register(f"skipnet_resnet{depth}_cifar", functools.partial(CifarResNet, depth, shortcut="B"), 10,
                     f"SkipNet on CIFAR ResNet-{depth} (projection shortcuts); gate_type 'rnn' (default, "
                     f"recommended), 'ffgate1' or 'ffgate2' (the paper used {doc_gate} for this depth).")


def _skipnet_imagenet(depth: int):
    block, layers = IMAGENET_LAYOUTS[depth]
    return _register(f"skipnet_resnet{depth}", functools.partial(ImageNetResNet, block, layers), 1000,
                     f"SkipNet on ImageNet ResNet-{depth} (torchvision layout, keys under ``backbone.``; "
                     f"{sum(layers) - 1} gated blocks); gate_type 'rnn' (default: the only gate the paper "
                     f"uses on ImageNet), 'ffgate1' or 'ffgate2'.")


skipnet_resnet38_cifar = _skipnet(38, "FFGate-I")
skipnet_resnet74_cifar = _skipnet(74, "FFGate-I")
skipnet_resnet110_cifar = _skipnet(110, "FFGate-II")
skipnet_resnet18 = _skipnet_imagenet(18)
skipnet_resnet34 = _skipnet_imagenet(34)
skipnet_resnet50 = _skipnet_imagenet(50)
skipnet_resnet101 = _skipnet_imagenet(101)
skipnet_resnet152 = _skipnet_imagenet(152)
