"""DynConv residual networks (Verelst & Tuytelaars, CVPR 2020) on the library's ResNets.

Every residual block (the first of each stage included) is conditional: a mask unit
(:class:`~ponder.nn.mask_unit.MaskUnit`: a 3x3 conv plus a global-pool term, one channel) reads the
block input and decides, per position of the block's output grid, whether the residual branch runs there::

    out = relu(shortcut(x) + mask * branch(x))          (inactive positions: relu(shortcut(x)))

The branch's first conv runs on the dilated mask (every position the following 3x3 conv reads: the 3x3
dilation for a BasicBlock's conv1; for a Bottleneck's 1x1 conv1 the mask placed on the input grid and
dilated, DynConv's ``ExpandMask``), the other convs on the mask. Stem, shortcuts (1x1 projections where
the shape changes) and head run densely.

* Training (``executor="masked"``): hard 0/1 masks from the binary Gumbel-sigmoid with a straight-through
  gradient (temperature :attr:`DynConvMixin.gumbel_temperature`, noise :attr:`DynConvMixin.gumbel_noise`,
  both set by the ``dynconv`` method's schedule); the branch is computed densely and masked.
* Inference: ``mask = sigmoid(logit) >= threshold`` (the native knob, default 0.5, i.e. ``logit >= 0``); the
  ``sparse`` executor computes the branch convs at the active positions only
  (:func:`ponder.nn.sparse_residual.sparse_residual` with ``inactive="relu"``, sharing SACT's kernels and
  its measured fall-back to the dense unit).

Per-sample MACs come from the ledger, as DynConv counts them: stem + head + every mask unit (dense) + per
block its shortcut + the first conv per dilated-mask position + the other convs per active position
(:func:`ponder.nn.sparse_cost.unit_masks_and_macs`). In training, ``extras["sparsity"]`` holds what the
sparsity criterion needs (:mod:`ponder.methods.dynconv`): per block the conditional MACs spent over the
batch, differentiable through the straight-through masks, and the dense ones.

The models subclass :class:`~ponder.models.resnet.CifarResNet` / :class:`~ponder.models.resnet.ImageNetResNet`;
their ``state_dict`` is the ResNet's plus ``mask_units.<budget>.<block>.*``, so a dense checkpoint of the
same ResNet loads with ``train.init_from`` (the mask units keep their fresh initialisation).
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch
import torch.nn as nn
from torch import Tensor

from ponder.cost import CostLedger, eval_unit_macs
from ponder.models.base import Knob, example_input
from ponder.models.resnet import (IMAGENET_LAYOUTS, BasicBlock, Bottleneck, CifarResNet, ImageNetResNet, ResidualBlock,
                                  Shortcut, _MethodUnit)
from ponder.models.spatial import DenseResNetKernels, DenseResNetView, SpatialModel, block_input_sizes
from ponder.nn.dense_units import stem_on_kernels
from ponder.nn.forced import sample_keys
from ponder.nn.mask_unit import MaskUnit, gumbel_mask, threshold_mask
from ponder.nn.thresholds import probability_logit
from ponder.nn.sparse_cost import position_units, unit_masks_and_macs
from ponder.nn.sparse_residual import sparse_residual
from ponder.nn.sparse_units import first_conv_mask, is_basic, masked_residual, output_hw, soft_first_conv_mask, unit_info
from ponder.output import DynamicOutput
from ponder.registry import register_model


def check_budgets(budgets: Sequence[float]) -> tuple[float, ...]:
    """``budgets`` as a tuple after checking it is a non-empty increasing list of fractions in (0, 1]."""
    values = tuple(budgets) if isinstance(budgets, (list, tuple)) else (budgets,)
    ok = values and all(isinstance(b, (int, float)) and not isinstance(b, bool) and 0.0 < b <= 1.0 for b in values)
    if not ok or any(a >= b for a, b in zip(values, values[1:])):
        raise ValueError(f"budgets must be increasing fractions of the conditional MACs in (0, 1], e.g. [0.3, 0.5, 0.7]; "
                         f"got {budgets!r}")
    return tuple(float(b) for b in values)


class DynConvMixin(SpatialModel):
    """DynConv's forward, ledger and hooks over a ResNet's blocks (mixed into a ResNet class).

    ``budgets``: the sparsity targets the mask units are trained for (one for DynConv; the multi-target
    model has one mask unit per block and budget, :mod:`ponder.models.dynconv_multi`); ``budget_index``
    picks the set in use. Native knob: the mask threshold on ``sigmoid(logit)`` (default 0.5); higher
    keeps fewer positions and costs less.
    """

    paper = "Verelst & Tuytelaars, CVPR 2020 (DynConv)"
    knob = Knob("mask_threshold", 0.0, 1.0, 0.5, macs_rise=False,
                doc="a position is active where sigmoid(mask logit) >= this")
    budgets: tuple[float, ...]
    mask_units: nn.ModuleList
    blocks: list[ResidualBlock]

    def _init_dynconv(self, budgets: Sequence[float]) -> None:
        self.budgets = check_budgets(budgets)
        self.executor = "masked"
        self.break_even: float | str | None = "default"  # sparse_residual's dense fall-back (None: always sparse)
        self.threshold = 0.5
        self.gumbel_temperature = 1.0  # training: set by the dynconv / multi_target method's schedule
        self.gumbel_noise = True
        self.budget_index = 0
        self.mask_units = nn.ModuleList(
            nn.ModuleList(MaskUnit(b.conv1.in_channels, unit_info(b).stride) for b in self.blocks)
            for _ in self.budgets)

    # ---------------------------------------------------------------- knob
    def get_knob(self) -> float:
        """The mask threshold on ``sigmoid(logit)``."""
        return self.threshold

    def set_knob(self, value: float) -> None:
        self.threshold = self.knob.checked(self, value, "mask threshold")

    # ---------------------------------------------------------------- forward
    def forward(self, x: Tensor) -> DynamicOutput:
        """Logits, per-sample MACs, per-block masks ``[B, Ho, Wo]`` (bool); in training also ``extras["sparsity"]``."""
        self.check_input(x)
        led = self.ledger_for(x)
        keys = sample_keys(x) if self.forced is not None else None
        sparse = self.executor == "sparse" and not self.training
        criterion = self.training and torch.is_grad_enabled()
        macs = torch.full((x.shape[0],), float(led["stem"] + led["head"]), dtype=torch.float64, device=x.device)
        h = stem_on_kernels(self, x) if sparse else self.stem(x)
        units = self.mask_units[self.budget_index]
        masks, spent, dense = [], [], []
        for i, block in enumerate(self.blocks):
            in_size = tuple(h.shape[1:])
            forced = None if keys is None else self.forced_positions(keys, output_hw(block, in_size[1:]), i)
            if sparse:
                hard, first, unit_macs, active = self._decide(i, block, units[i], h, led, forced)
                h = sparse_residual(block, h, hard, "relu", self.break_even, first=first, overwrite=True,
                                    active=active)
            else:
                logits = units[i](h)
                soft = gumbel_mask(logits, self.gumbel_temperature, self.gumbel_noise) \
                    if self.training and forced is None else None
                hard = forced if forced is not None else \
                    threshold_mask(logits, self.threshold) if soft is None else soft.detach() > 0.5
                first, unit_macs = unit_masks_and_macs(block, in_size, hard, led, f"blocks.{i}")
                unit_macs = unit_macs + led[f"mask.{i}"]
                h = masked_residual(block, h, hard if soft is None else soft, "relu")
                if criterion:
                    m = hard.to(h.dtype) if soft is None else soft
                    f = soft_first_conv_mask(block, m, (in_size[1], in_size[2]))
                    per_first, per_rest = led[f"blocks.{i}.first"], led[f"blocks.{i}.rest"]
                    spent.append(f.sum() * per_first + m.sum() * per_rest)
                    dense.append(float(f.numel() * per_first + m.numel() * per_rest))
            macs = macs + unit_macs
            masks.append(hard)
        extras = {"budget": self.budget_index}
        if criterion:
            extras["sparsity"] = (torch.stack(spent), torch.tensor(dense, dtype=spent[0].dtype, device=x.device))
        return DynamicOutput(logits=self.head(h), macs=macs, masks=masks, extras=extras)

    def _decide(self, i: int, block: ResidualBlock, unit: MaskUnit, h: Tensor, led: CostLedger,
                forced: Tensor | None) -> tuple[Tensor, Tensor, Tensor, tuple[int, int] | None]:
        """Block ``i``'s decision at inference: ``(mask, first-conv mask, per-sample MACs [B] with the mask unit's,
        (active positions, first-conv positions) over the batch or None)``, in one compiled call where it applies
        (:meth:`MaskUnit.decide`), else by the mask unit's forward and PyTorch ops."""
        base, per_first, per_rest, same_grid = self._decision_costs(led)[i]
        decided = unit.decide(h, probability_logit(self.threshold), forced, same_grid, base, per_first, per_rest)
        if decided is None:
            logits = unit(h)  # run (and paid for) under forced decisions too
            hard = forced if forced is not None else threshold_mask(logits, self.threshold)
            first, unit_macs = unit_masks_and_macs(block, tuple(h.shape[1:]), hard, led, f"blocks.{i}")
            return hard, first, unit_macs + led[f"mask.{i}"], None
        hard, first, unit_macs, n_mask, n_first = decided
        if first is None:  # a strided Bottleneck: its first conv runs on the input grid
            first = first_conv_mask(block, hard, (h.shape[2], h.shape[3]))
            per_sample = first.flatten(1).sum(1)
            unit_macs = unit_macs + per_sample.to(torch.float64) * per_first
            n_first = int(per_sample.sum())
        return hard, first, unit_macs, (n_mask, n_first)

    def _decision_costs(self, led: CostLedger) -> list[tuple[float, float, float, bool]]:
        """Per block, for its decision at ``led``'s input size: ``(shortcut + mask unit MACs, MACs per first-conv
        position, per other active position, whether the first conv runs on the mask's own grid)``; cached."""
        plans = self.__dict__.setdefault("_decision_plans", {})
        plan = plans.get(led.input_size)
        if plan is None:
            plan = plans[led.input_size] = [
                (float(led[f"blocks.{i}.skip"] + led[f"mask.{i}"]), float(led[f"blocks.{i}.first"]),
                 float(led[f"blocks.{i}.rest"]), is_basic(block) or unit_info(block).stride == 1)
                for i, block in enumerate(self.blocks)]
        return plan

    # ---------------------------------------------------------------- cost
    def measure_ledger(self, input_size: tuple[int, int, int]) -> CostLedger:
        """Unit costs at batch 1: ``stem``, ``head``, ``blocks.i`` (the dense unit), ``mask.i`` (its mask unit,
        dense) and the per-position units ``blocks.i.skip`` / ``.first`` / ``.rest``
        (:func:`~ponder.nn.sparse_cost.position_units`). ``total``: every unit and mask unit run densely."""
        x = example_input(self, input_size)
        masks = self.mask_units[self.budget_index]
        units: dict[str, nn.Module] = {"stem": _MethodUnit(self.stem), "head": _MethodUnit(self.head)}
        for i, block in enumerate(self.blocks):
            units[f"blocks.{i}"], units[f"mask.{i}"] = block, masks[i]

        def run() -> None:
            h = units["stem"](x)
            for i, block in enumerate(self.blocks):
                units[f"mask.{i}"](h)
                h = block(h)
            units["head"](h)

        costs = eval_unit_macs(self, run, units)
        total = costs.pop("total")
        for i, (block, size) in enumerate(zip(self.blocks, block_input_sizes(self, input_size))):
            costs.update(position_units(f"blocks.{i}", block, size))
        return CostLedger(input_size=tuple(input_size), units=costs, total=total)

    def conditional_macs(self, input_size: tuple[int, int, int] | None = None) -> tuple[int, int]:
        """``(unconditional, conditional)`` MACs per image when every position is active: the conditional part is
        the residual branches' convs (what the sparsity targets are fractions of), the rest stem, head,
        shortcuts and mask units."""
        led = self.ledger(tuple(input_size or self.default_input_size))
        branches = sum(led[f"blocks.{i}"] - led[f"blocks.{i}.skip"] for i in range(len(self.blocks)))
        return led.total - branches, branches

    # ---------------------------------------------------------------- bench hooks
    def dense_baseline(self) -> nn.Module:
        """The plain ResNet with the same weights (every block dense, no mask units)."""
        return DenseResNetView(self)

    def dense_baseline_kernels(self) -> nn.Module:
        """The plain ResNet run on the sparse executor's kernels (``ponder bench`` times it as ``dense*``)."""
        return DenseResNetKernels(self)


class DynConvCifarResNet(DynConvMixin, CifarResNet):
    """CIFAR ResNet (6n+2, BasicBlocks, 1x1-conv projection shortcuts by default) with DynConv masks.

    ``budget``: the fraction of the conditional MACs the ``dynconv`` method trains the masks for.
    """

    def __init__(self, depth: int = 32, num_classes: int = 10, budget: float = 0.5, shortcut: Shortcut = "B",
                 **kw) -> None:
        CifarResNet.__init__(self, depth, num_classes=num_classes, shortcut=shortcut, **kw)
        self._init_dynconv((budget,))


class DynConvImageNetResNet(DynConvMixin, ImageNetResNet):
    """torchvision-layout ResNet with DynConv masks on every block (fully convolutional)."""

    def __init__(self, block: type[BasicBlock] | type[Bottleneck], layers: list[int], num_classes: int = 1000,
                 budget: float = 0.5, **kw) -> None:
        ImageNetResNet.__init__(self, block, layers, num_classes=num_classes, **kw)
        self._init_dynconv((budget,))


def register_resnet_variant(prefix: str, cls: type[CifarResNet] | type[ImageNetResNet], depth: int,
                            doc: str) -> Callable[..., nn.Module]:
    """Register ``cls`` at ``depth``: a CIFAR ResNet as ``{prefix}_resnet{depth}_cifar`` (``cls(depth, **kw)``), an
    ImageNet one as ``{prefix}_resnet{depth}`` (``cls(block, layers, **kw)`` from
    :data:`ponder.models.resnet.IMAGENET_LAYOUTS`); the
    factory's return annotation is ``cls`` (what the registry lists without building).

    ``doc`` is a template: ``{depth}``, and ``{per_stage}`` (blocks per CIFAR stage) or ``{layers}`` and ``{block}``.
    """
    if issubclass(cls, CifarResNet):
        name, args, fields = f"{prefix}_resnet{depth}_cifar", (depth,), {"per_stage": (depth - 2) // 6}
    else:
        block, layers = IMAGENET_LAYOUTS[depth]
        name, args, fields = f"{prefix}_resnet{depth}", (block, layers), {"layers": layers, "block": block.__name__}

    def factory(num_classes: int | None = None, **kw) -> nn.Module:
        return cls(*args, **({} if num_classes is None else {"num_classes": num_classes}), **kw)

    factory.__name__, factory.__doc__ = name, doc.format(depth=depth, **fields)
    factory.__annotations__["return"] = cls
    return register_model(factory)


_CIFAR_DOC = ("DynConv CIFAR ResNet-{depth} ({per_stage} BasicBlocks per stage, 1x1-conv shortcuts; option budget, "
              "default 0.5).")
_IMAGENET_DOC = ("DynConv ResNet-{depth} (torchvision layout, {layers} {block} units; every block conditional; option "
                 "budget, default 0.5).")

dynconv_resnet20_cifar = register_resnet_variant("dynconv", DynConvCifarResNet, 20, _CIFAR_DOC)
dynconv_resnet32_cifar = register_resnet_variant("dynconv", DynConvCifarResNet, 32, _CIFAR_DOC)
dynconv_resnet50 = register_resnet_variant("dynconv", DynConvImageNetResNet, 50, _IMAGENET_DOC)
dynconv_resnet101 = register_resnet_variant("dynconv", DynConvImageNetResNet, 101, _IMAGENET_DOC)
