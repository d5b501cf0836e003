"""RANet: resolution-adaptive multi-exit network (Yang et al., CVPR 2020).

Implemented from the architecture facts in ``shared/reference/early_exit.md`` section 2 (the
official RANet-pytorch code carries no licence and is not used). ``S = len(scale_list)`` scale
flows run one after the other, lowest resolution first; flow ``i`` has
``n_i = n_blocks + block_step * i`` blocks, the first ``n_{i-1}`` of which are *fusion* blocks
that read the states of the coarser flow's block of the same index; every *normal* block is
followed by an exit, so there are ``n_blocks + block_step * (S - 1)`` exits.

Cost convention. ``macs`` (the ledger, ``DynamicOutput.macs``, ``profile_exits()[k]["macs"]``)
are conv + linear MACs as counted by ``FlopCounterMode``, like every other ponder model; the
paper's official ``op_counter`` figure is ``macs_official``. Neither counts the bilinear
resizes of the fusion blocks (``FlopCounterMode`` and the official counter both skip them), so
RANet reports them as a separate item ``interp_macs``: cumulative per exit,
``INTERP_MACS_PER_ELEMENT = 4`` MACs per output element of each resize that changes the size
(a same-size resize is the identity and is skipped). For Model-C-1 they add 0.4 %.

Official argument names -> ours: ``scale_list``, ``grFactor -> gr_factor``, ``bnFactor ->
bn_factor``, ``nBlocks -> n_blocks``, ``block_step``, ``step``, ``stepmode`` (``even`` | ``lg``),
``nChannels -> n_channels``, ``growthRate -> growth_rate``, ``compress_factor``, ``reduction``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal, Sequence

import torch
import torch.nn as nn
from torch import Tensor
from torch.utils._python_dispatch import TorchDispatchMode, _disable_current_modes

from ponder.models.base import example_input
from ponder.models.multi_exit import MultiExitModel
from ponder.models.exit_head import ExitHead
from ponder.models.ranet_blocks import INTERP_MACS_PER_ELEMENT, FusionBlock, NormalBlock, RANetStem
from ponder.nn.exits import gradient_rescale
from ponder.registry import register_model

IntList = Sequence[int] | str


@dataclass(frozen=True)
class BlockSpec:
    """One block of a RANet flow, as the builder plans it.

    ``index`` is 1-based within the flow; ``state_channels`` are the widths of the states
    ``s_0..s_L`` (what the next finer flow's fusion block of the same index reads);
    ``out_channels`` is the width after the fusion compress concat and the transition.
    """

    flow: int
    index: int
    fusion: bool
    layers: int
    down: bool
    trans: bool
    in_channels: int
    out_channels: int
    state_channels: tuple[int, ...]

    @property
    def code(self) -> str:
        """The reference notation: ``F``/``N``, layer count, ``↓`` for a down block, ``T`` for a transition."""
        return f"{'F' if self.fusion else 'N'}{self.layers}{'↓' if self.down else ''}{'T' if self.trans else ''}"


def _ints(value: IntList, name: str) -> tuple[int, ...]:
    """``"1-2-3"`` or ``[1, 2, 3]`` -> ``(1, 2, 3)``."""
    try:
        return tuple(int(v) for v in (value.split("-") if isinstance(value, str) else value))
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a list of integers such as [1, 2, 3] or '1-2-3', got {value!r}") from None


def ranet_plan(scale_list: IntList, gr_factor: IntList, n_blocks: int = 2, block_step: int = 2,
               step: int = 4, stepmode: str = "even", n_channels: int = 16, growth_rate: int = 6,
               compress_factor: float = 0.25, reduction: float = 0.5) -> list[list[BlockSpec]]:
    """The block plan of every flow (lowest resolution first), following the reference rules.

    Block ``k`` (1-based) has ``step`` layers (``even``) or ``k * step`` (``lg``); fusion blocks
    are ``1..n_{i-1}``; flow ``i`` halves its resolution at the blocks among the last
    ``scale_list[i] - 1`` entries of ``[0, n_0, ..., n_{i-1}]`` and has a transition after
    block ``floor(m * n_i / scale_list[i])`` for ``m = 1 .. scale_list[i] - 1``.
    """
    levels, grs = _ints(scale_list, "scale_list"), _ints(gr_factor, "gr_factor")
    if len(levels) != len(grs):
        raise ValueError(f"scale_list {levels} and gr_factor {grs} must have one entry per flow")
    if levels[0] != 1 or any(b - a not in (0, 1) for a, b in zip(levels, levels[1:])):
        raise ValueError(f"scale_list must start at 1 and grow by 0 or 1 per flow (e.g. 1-2-3, 1-2-2-3), got {levels}")
    if stepmode not in ("even", "lg"):
        raise ValueError(f"stepmode must be 'even' or 'lg' (linear growth), got {stepmode!r}")
    if min(n_blocks, step) < 1 or block_step < 0:
        raise ValueError(f"n_blocks and step must be >= 1 and block_step >= 0, got {n_blocks}, {step}, {block_step}")
    counts = [n_blocks + block_step * i for i in range(len(levels))]
    ends = [0] + counts[:-1]  # N_i: number of fusion blocks of flow i
    flows: list[list[BlockSpec]] = []
    for i, (level, gr) in enumerate(zip(levels, grs)):
        growth, c = growth_rate * gr, n_channels * gr
        if i > 0 and not 1 <= math.floor(growth * compress_factor) < growth:
            raise ValueError(f"compress_factor {compress_factor} leaves flow {i} (growth {growth}) with no "
                             f"channels from one side; use a growth rate or factor giving 1 <= floor(g*cf) < g")
        downs = set(ends[: i + 1][len(ends[: i + 1]) - (level - 1):]) if level > 1 else set()
        transitions = {math.floor(m * counts[i] / level) for m in range(1, level)}
        specs = []
        for k in range(1, counts[i] + 1):
            layers = step if stepmode == "even" else k * step
            states = tuple(c + j * growth for j in range(layers + 1))
            fusion = k <= ends[i]
            out = states[-1] + (math.floor(states[-1] * compress_factor) if fusion else 0)
            if k in transitions:
                out = math.floor(reduction * out)
            specs.append(BlockSpec(i, k, fusion, layers, k in downs, k in transitions, c, out, states))
            c = out
        flows.append(specs)
    return flows


class _BilinearCounter(TorchDispatchMode):
    """Counts the output elements of every bilinear resize that runs inside it."""

    def __init__(self) -> None:
        super().__init__()
        self.elements = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        out = func(*args, **(kwargs or {}))
        if func.overloadpacket is torch.ops.aten.upsample_bilinear2d:
            self.elements += out.numel()
        return out


class RANet(MultiExitModel):
    """Resolution-adaptive network; exits are numbered 0..num_exits-1 in execution order.

    Block ``k`` of the multi-exit contract (:class:`~ponder.nn.exits.MultiExitModel`) is
    everything between exit ``k-1`` and exit ``k``: the whole stem and flow 0's first block
    for ``k = 0``; all fusion blocks of a flow plus its first normal block when exit ``k`` is
    the flow's first; otherwise one normal block. The state passed between blocks is a dict:
    ``x`` (current flow output), ``pending`` (stem outputs of flows not started yet) and
    ``states`` (the current flow's block states, kept for the next finer flow).

    Args:
        scale_list, gr_factor, bn_factor: per flow (lowest resolution first): resolution level
            (starting at 1, steps of 0 or 1), width factor and bottleneck factor; lists or
            ``"1-2-3"`` strings.
        n_blocks, block_step: flow ``i`` has ``n_blocks + block_step * i`` blocks.
        step, stepmode: layers per block: ``step`` (``"even"``) or ``k * step`` for block ``k`` (``"lg"``).
        n_channels, growth_rate: base width and growth, times ``gr_factor[i]`` in flow ``i``.
        compress_factor: share of each fusion layer's new channels that comes from the coarser flow.
        reduction: transition compression.
        head_width: hidden width of the exit heads (128 on CIFAR); ``None`` keeps the input width (ImageNet).
        imagenet_stem: 7x7/2 conv + max-pool stem and 224x224 default input (else a 3x3 stem, 32x32).
        init: ``"msr"`` (paper init everywhere) or ``"official"`` (stem left at PyTorch's default, as the official code).
        collaboration: add IMTA collaboration heads (stage 2 of ``method: multi_exit``).
    """

    paper = "Yang et al., CVPR 2020 (RANet)"

    def __init__(self, scale_list: IntList = (1, 2, 3), gr_factor: IntList = (4, 2, 1),
                 bn_factor: IntList = (4, 2, 1), n_blocks: int = 2, block_step: int = 2, step: int = 4,
                 stepmode: Literal["even", "lg"] = "even", n_channels: int = 16, growth_rate: int = 6,
                 compress_factor: float = 0.25, reduction: float = 0.5, num_classes: int = 10,
                 head_width: int | None = 128, imagenet_stem: bool = False, in_chans: int = 3,
                 init: Literal["msr", "official"] = "msr", collaboration: bool = False):
        super().__init__()
        levels, grs, bns = (_ints(scale_list, "scale_list"), _ints(gr_factor, "gr_factor"),
                            _ints(bn_factor, "bn_factor"))
        if len(bns) != len(levels):
            raise ValueError(f"bn_factor {bns} must have one entry per flow of scale_list {levels}")
        if init not in ("msr", "official"):
            raise ValueError(f"init must be 'msr' (every conv) or 'official' (stem left at PyTorch default), got {init!r}")
        self.plan = ranet_plan(levels, grs, n_blocks, block_step, step, stepmode, n_channels, growth_rate,
                               compress_factor, reduction)
        self.num_classes = num_classes
        self.default_input_size = (in_chans, 224, 224) if imagenet_stem else (in_chans, 32, 32)
        strides = [2 if levels[j] != levels[j + 1] else 1 for j in range(len(levels) - 1)]
        self.stem = RANetStem(in_chans, [n_channels * g for g in grs], strides, imagenet_stem)
        self.flows = nn.ModuleList()
        for i, specs in enumerate(self.plan):
            self.flows.append(nn.ModuleList(
                self._block(spec, self.plan[i - 1][spec.index - 1] if spec.fusion else None,
                            growth_rate * grs[i], compress_factor, bns[i], bns[i - 1])
                for spec in specs))
        self.heads = nn.ModuleList(
            ExitHead(spec.out_channels, head_width, num_classes)
            for specs in self.plan for spec in specs if not spec.fusion)
        self.num_exits = len(self.heads)
        # exit k runs blocks (flow, [block indices]) of self._segments[k]
        self._segments: list[tuple[int, list[int]]] = []
        for i, specs in enumerate(self.plan):
            first = sum(s.fusion for s in specs)
            self._segments.append((i, list(range(first + 1))))
            self._segments += [(i, [b]) for b in range(first + 1, len(specs))]
        self._interp: dict[tuple[int, int, int], list[int]] = {}
        self._init_weights(official=init == "official")
        if collaboration:  # IMTA stage 2 heads (see ponder.methods.multi_exit)
            self.enable_collaboration()

    @staticmethod
    def _block(spec: BlockSpec, coarse: BlockSpec | None, growth: int, compress: float,
               width: int, coarse_width: int) -> nn.Module:
        trans_out = spec.out_channels if spec.trans else None
        if coarse is None:
            return NormalBlock(spec.in_channels, spec.layers, growth, width, trans_out)
        return FusionBlock(spec.in_channels, coarse.state_channels, growth, compress, width, coarse_width,
                           spec.down, trans_out)

    def _init_weights(self, official: bool) -> None:
        """MSR init: conv N(0, sqrt(2 / (k_h k_w C_out))), BN 1/0, Linear bias 0 (stem skipped if ``official``)."""
        skip = set(self.stem.modules()) if official else set()
        for m in self.modules():
            if m in skip:
                continue
            if isinstance(m, nn.Conv2d):
                fan_out = m.kernel_size[0] * m.kernel_size[1] * m.out_channels
                nn.init.normal_(m.weight, 0.0, math.sqrt(2.0 / fan_out))
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.zeros_(m.bias)

    # ---- the multi-exit contract ------------------------------------------------------------
    def run_block(self, k: int, state: Any) -> dict[str, Any]:
        """Block ``k``: image ``x [B, C, H, W]`` (k = 0) or the previous state -> the next state."""
        flow, blocks = self._segments[k]
        if k == 0:
            feats = self.stem(state)
            state = {"x": feats[0], "pending": feats[1:], "states": []}
        x, pending, states = state["x"], state["pending"], state["states"]
        coarse: list[list[Tensor]] = []
        if blocks[0] == 0 and flow > 0:  # a new flow starts from its stem output
            x, pending, coarse, states = pending[0], pending[1:], states, []
        keep = flow < len(self.plan) - 1  # the finest flow's states feed nobody
        for b in blocks:
            x, s = self.flows[flow][b](x, coarse[b] if self.plan[flow][b].fusion else None)
            if keep:
                states = states + [s]
        return {"x": x, "pending": pending, "states": states}

    def exit_features(self, k: int, state: Any) -> Tensor:
        """Pooled feature ``[B, C_k]`` of exit ``k`` from the state's ``x [B, C, 8, 8]`` (CIFAR)."""
        return self.heads[k].features(state["x"])

    def exit_classifier(self, k: int, feat: Tensor) -> Tensor:
        return self.heads[k].linear(feat)

    def exit_outputs(self, k: int, state: Any) -> tuple[Tensor, Tensor]:
        return self.heads[k].classify(state["x"])

    def exit_feature_dims(self) -> list[int]:
        return [h.width for h in self.heads]

    def stage_modules(self, k: int) -> list[nn.Module]:
        flow, blocks = self._segments[k]
        return ([self.stem] if k == 0 else []) + [self.flows[flow][b] for b in blocks]

    def exit_modules(self, k: int) -> list[nn.Module]:
        return [self.heads[k]]

    def scale_gradient(self, state: Any, scale: float) -> Any:
        """Gradient equilibrium rescales only what the exits read: the current flow output ``x``."""
        return {**state, "x": gradient_rescale(state["x"], scale)}

    # ---- structure and costs ------------------------------------------------------------
    def exit_channels(self) -> list[int]:
        """Width of the tensor each exit head reads (the reference's "exit input widths")."""
        return [s.out_channels for specs in self.plan for s in specs if not s.fusion]

    def interp_macs(self, input_size: tuple[int, int, int] | None = None) -> list[int]:
        """Cumulative bilinear-resize MACs up to each exit (4 per output element), at batch 1."""
        size = tuple(int(s) for s in (input_size or self.default_input_size))
        if size not in self._interp:
            x = example_input(self, size)  # type: ignore[arg-type]
            was_training = self.training
            self.eval()
            out, state = [], x
            try:
                with _disable_current_modes(), torch.no_grad(), _BilinearCounter() as counter:
                    for k in range(self.num_exits):
                        state = self.run_block(k, state)
                        out.append(counter.elements * INTERP_MACS_PER_ELEMENT)
            finally:
                self.train(was_training)
            self._interp[size] = out  # type: ignore[index]
        return list(self._interp[size])  # type: ignore[index]

    def profile_exits(self, input_size: tuple[int, int, int]) -> list[dict[str, int]]:
        """Per exit: cumulative ``params``, ``macs`` (conv + linear) and ``interp_macs`` (bilinear resizes)."""
        rows = super().profile_exits(input_size)
        for row, interp in zip(rows, self.interp_macs(input_size)):
            row["interp_macs"] = interp
        return rows


_CIFAR_BUDGETED = dict(n_blocks=2, block_step=2, step=2, stepmode="lg", n_channels=16, growth_rate=6,
                       compress_factor=0.25, reduction=0.5, head_width=128)


@register_model
def ranet_cifar_c1(num_classes: int = 10, **kw: Any) -> RANet:
    """RANet Model-C-1 (paper's CIFAR budgeted model, 6 exits): scales 1-2-3, factors 4-2-1, step 2 lg."""
    return RANet(**{**_CIFAR_BUDGETED, "scale_list": (1, 2, 3), "gr_factor": (4, 2, 1), "bn_factor": (4, 2, 1),
                    **kw}, num_classes=num_classes)


@register_model
def ranet_cifar_c2(num_classes: int = 10, **kw: Any) -> RANet:
    """RANet Model-C-2 (paper's CIFAR budgeted model, 8 exits): scales 1-2-2-3, factors 4-2-2-1, step 2 lg."""
    return RANet(**{**_CIFAR_BUDGETED, "scale_list": (1, 2, 2, 3), "gr_factor": (4, 2, 2, 1),
                    "bn_factor": (4, 2, 2, 1), **kw}, num_classes=num_classes)


@register_model
def ranet_cifar_anytime(num_classes: int = 10, **kw: Any) -> RANet:
    """RANet CIFAR anytime setting (8 exits): scales 1-2-3-3, factors 4-2-1-1, step 4 even."""
    return RANet(**{**_CIFAR_BUDGETED, "scale_list": (1, 2, 3, 3), "gr_factor": (4, 2, 1, 1),
                    "bn_factor": (4, 2, 1, 1), "step": 4, "stepmode": "even", **kw}, num_classes=num_classes)


@register_model
def ranet_imagenet(num_classes: int = 1000, **kw: Any) -> RANet:
    """RANet ImageNet (8 exits; official README): scales 1-2-3-4, factors 4-2-2-1, 32 channels, growth 16, step 8 even.

    ``n_channels=64`` gives the anytime model of the README plot.
    """
    return RANet(**{"scale_list": (1, 2, 3, 4), "gr_factor": (4, 2, 2, 1), "bn_factor": (4, 2, 2, 1),
                    "n_blocks": 2, "block_step": 2, "step": 8, "stepmode": "even", "n_channels": 32,
                    "growth_rate": 16, "compress_factor": 0.25, "reduction": 0.5, "head_width": None,
                    "imagenet_stem": True, **kw}, num_classes=num_classes)
