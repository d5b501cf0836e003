"""The block-skipping family's base: a ResNet whose residual blocks run under per-sample keep decisions.

BlockDrop, SkipNet (and the learned-gate models built on them) subclass :class:`SkippingModel`, which
owns what they share: the backbone and the :class:`~ponder.nn.skip.BlockSkipper` (masked and sparse
executors), the native knob (a block runs iff its keep probability is ``>= threshold``), forced keep
decisions for benchmarks, the cost ledger and its one charge, the dense baseline (the backbone), and
loading a plain ResNet checkpoint into the backbone.

Ledger units: the backbone's ``stem``, ``blocks.i`` and ``head``; ``blocks.i.skip`` (what skipping block
``i`` costs: its projection shortcut, 0 for identity / parameter-free shortcuts, or the model's own skip
path: :meth:`SkippingModel.skip_paths_by_block`); ``blocks.i.half`` for models whose blocks can run their
first conv only (:attr:`SkippingModel.has_half_option`); and the decision networks' units
(:meth:`SkippingModel.measure_decision_units`: ``policy``, ``gates.j``, ``routers.j`` ...). A sample pays
``stem + head + decisions + sum_i (blocks.i if kept, blocks.i.half if half, else blocks.i.skip)``.
"""

from __future__ import annotations

from typing import Any, Callable, ClassVar, Mapping, Sequence

import torch
import torch.nn as nn
from torch import Tensor

from ponder import fast
from ponder.cost import CostLedger
from ponder.models.act import DenseResNetKernels
from ponder.models.base import DynamicModel, Knob
from ponder.models.resnet import ResNet
from ponder.nn import skip_kernels
from ponder.nn.forced import keep_matrix, sample_keys
from ponder.nn.protocols import ResidualBlock
from ponder.nn.skip import BlockSkipper, SkippedOutput, SoftMix, half_units, skip_units


class SkippingModel(DynamicModel):
    """A :class:`~ponder.models.resnet.ResNet` backbone whose blocks are kept or skipped per sample.

    Subclasses build their decision networks, implement ``forward`` (calling :meth:`forced_keep`,
    ``self.skipper`` and :meth:`charge`) and :meth:`measure_decision_units`; ``own_prefixes`` lists the
    ``state_dict`` prefixes of their own weights besides ``backbone.``.
    """

    family = "skipping"
    knob = Knob("threshold", 0.0, 1.0, 0.5, macs_rise=False,
                doc="a block runs iff its keep probability is >= threshold (0 keeps every block)")
    own_prefixes: ClassVar[tuple[str, ...]] = ()

    def __init__(self, backbone: ResNet, skipped: SkippedOutput = "shortcut", mix: SoftMix | None = None,
                 threshold: float = 0.5) -> None:
        super().__init__()
        self.backbone = backbone
        self.num_classes = backbone.num_classes
        self.default_input_size = backbone.default_input_size
        self.skipper = BlockSkipper(skipped=skipped, mix=mix)
        self.threshold = 0.5
        self.set_knob(threshold)

    @property
    def num_blocks(self) -> int:
        return len(self.backbone.blocks)

    @property
    def has_half_option(self) -> bool:
        """Whether a block can run its first conv only (RDI-Net): the ledger then has ``blocks.i.half``."""
        return False

    def skip_paths_by_block(self) -> dict[int, nn.Module]:
        """The model's own skip modules by block index (CoDiNet's projections); a skipped block without one
        outputs the skipper's rule (:mod:`ponder.nn.skip`)."""
        return {}

    # ---- knob, baseline, forced decisions --------------------------------------------------
    def get_knob(self) -> float:
        """The keep threshold: a block runs iff its keep probability is ``>= threshold``."""
        return self.threshold

    def set_knob(self, value: float) -> None:
        self.threshold = self.knob.checked(self, value, "keep threshold")

    def dense_baseline(self) -> ResNet:
        """The backbone ResNet: every block, no decision network."""
        return self.backbone

    def dense_baseline_kernels(self) -> nn.Module:
        """The backbone on the sparse executor's inference kernels (BN folded, channels-last;
        :mod:`ponder.nn.skip_kernels`): ``ponder bench``'s ``dense*``, the speed-up owed to skipping alone."""
        return DenseResNetKernels(self.backbone)

    def forced_keep(self, x: Tensor, first: int = 0) -> Tensor | None:
        """Forced keep decisions ``[B, num_blocks - first]`` (float 0/1) for blocks ``first..``, or ``None``
        when the learned decisions rule (:meth:`force_keep_rate`)."""
        if self.forced is None:
            return None
        keys = sample_keys(x)
        n = self.num_blocks - first
        return keep_matrix(keys, n, self.forced.rate, self.forced.seed, first=first).to(x.dtype)

    # ---- batch-1 inference -------------------------------------------------------------------
    def batch_one_plan(self, h: Tensor, blocks: Sequence[ResidualBlock], num_options: int,
                       steps: Callable[[], list], skip_paths: Mapping[int, nn.Module] | None = None
                       ) -> tuple[list, list[list[skip_kernels.Runner]]]:
        """The model's batch-1 plan (:func:`ponder.fast.prepared`) for channels-last inputs shaped like ``h``
        entering ``blocks``: ``steps()`` (its routers' or gates' bound steps) and each block's option runners
        (:func:`ponder.nn.skip_kernels.bound_options`; ``skip_paths`` by index into ``blocks``), built once
        per shape, thread count and skip rule and reused while the model is unchanged."""
        relu, nonnegative = self.skipper.skipped == "relu_shortcut", self.skipper.nonnegative
        paths = skip_paths or {}

        def build() -> tuple[list, list[list[skip_kernels.Runner]]]:  # (holds submodules, never the model)
            runners, x = [], h
            for i, block in enumerate(blocks):
                runners.append(skip_kernels.bound_options(block, x, num_options, relu=relu, nonnegative=nonnegative,
                                                          skip_path=paths.get(i)))
                x = runners[-1][-1](x)
            return steps(), runners

        return fast.prepared(self, ("batch1", tuple(h.shape), torch.get_num_threads(), relu, nonnegative), build)

    # ---- cost ------------------------------------------------------------------------------
    def measure_decision_units(self, input_size: tuple[int, int, int]) -> dict[str, int]:  # pragma: no cover
        """MACs of each decision unit (``policy``, ``gates.j`` ...) for one ``(C, H, W)`` sample, in eval mode."""
        raise NotImplementedError

    def measure_ledger(self, input_size: tuple[int, int, int]) -> CostLedger:
        base = self.backbone.ledger(input_size)
        units = dict(base.units)
        units.update(skip_units(self.backbone, input_size, self.skip_paths_by_block()))
        if self.has_half_option:
            units.update(half_units(self.backbone, input_size))
        modes = {m: m.training for m in self.modules()}  # restored one by one: parts may differ (frozen backbone)
        self.eval()
        try:
            with torch.no_grad():
                decisions = self.measure_decision_units(input_size)
        finally:
            for m, training in modes.items():
                m.training = training
        units.update(decisions)
        return CostLedger(input_size=input_size, units=units, total=base.total + sum(decisions.values()))

    def charge(self, x: Tensor, keep: Tensor, half: Tensor | None = None) -> Tensor:
        """Per-sample MACs ``[B]`` (float64) of inputs like ``x`` under hard decisions ``keep [B, blocks]``
        (and ``half [B, blocks]``: first conv only, for models with that option): stem, head and every
        decision unit, plus per block the block, its first conv or its skip path."""
        led = self.ledger_for(x)
        names = self._charge_names(led)
        full = (keep > 0.5).to(torch.float64)
        parts = [full]
        if self.has_half_option:
            first = torch.zeros_like(full) if half is None else (half > 0.5).to(torch.float64)
            parts += [1.0 - full - first, first]
        else:
            parts.append(1.0 - full)
        fixed = len(names) - sum(p.shape[1] for p in parts)
        parts.append(torch.ones(keep.shape[0], fixed, dtype=torch.float64, device=keep.device))
        return led.charge(names, torch.cat(parts, 1))

    def _charge_names(self, led: CostLedger) -> tuple[str, ...]:
        cached = getattr(self, "_names", None)
        if cached is None or cached[0] is not led:
            per_block = [[f"blocks.{i}{suffix}" for i in range(self.num_blocks)]
                         for suffix in ("", ".skip") + ((".half",) if self.has_half_option else ())]
            taken = {n for names in per_block for n in names}
            fixed = [n for n in led.units if n not in taken]
            cached = self._names = (led, tuple(n for names in per_block for n in names) + tuple(fixed))
        return cached[1]

    def profile_blocks(self, input_size: tuple[int, int, int]) -> list[dict]:
        """Per block: ``macs`` when run, ``skip_macs`` when skipped (and ``half_macs``: first conv only)."""
        led = self.ledger(input_size)
        rows = [{"name": f"blocks.{i}", "macs": led[f"blocks.{i}"], "skip_macs": led[f"blocks.{i}.skip"]}
                for i in range(self.num_blocks)]
        if self.has_half_option:
            for i, row in enumerate(rows):
                row["half_macs"] = led[f"blocks.{i}.half"]
        return rows

    # ---- weights ---------------------------------------------------------------------------
    def load_state_dict(self, state_dict: Mapping[str, Any], strict: bool = True, assign: bool = False):
        """Load this model's state dict, or a plain ResNet's (keys without ``backbone.``) into the backbone."""
        if state_dict and not any(k.startswith(("backbone.",) + self.own_prefixes) for k in state_dict):
            return self.backbone.load_state_dict(state_dict, strict=strict, assign=assign)
        return super().load_state_dict(state_dict, strict=strict, assign=assign)
