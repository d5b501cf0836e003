"""ACT and SACT residual networks (Figurnov et al., CVPR 2017) on the library's ResNets.

Each ResNet stage is one ACT block over its residual units. After every unit but the last
a halting branch scores the unit's output; the stage output is the mean-field sum of the
unit outputs weighted by the halting distribution (:mod:`ponder.nn.halting`).

* **ACT** (``act_*``): one halting decision per image. Units run only for the images that
  are still running (``sparse`` executor: the batch is sub-selected; ``masked``: every image
  runs every unit and the halted ones are masked out, the official ``act`` variant).
* **SACT** (``sact_*``): one decision per spatial position. Unit 1 of every stage runs
  densely; unit ``l >= 2`` runs only at the positions still active (``masked``: dense compute
  selected by the mask, used for training; ``sparse``: convolutions at active positions
  only, via :mod:`ponder.nn.sparse_conv`, with the conv that feeds a 3x3 on the dilated mask).
  Halted positions copy their input forward. The sparse executor keeps the stage in channels-last
  layout (the sparse kernel's) and runs every unit with BN folded into its convs (unit 1 through
  :func:`dense_unit_channels_last`); the halting branches and the mean-field sum then read and
  update channels-last maps in place.

The models subclass :class:`~ponder.models.resnet.CifarResNet` /
:class:`~ponder.models.resnet.ImageNetResNet`, so their ``state_dict`` is the dense ResNet's
(torchvision keys for the ImageNet ones) plus ``halting.<stage>.<unit>.*``. A dense checkpoint
loads with ``strict=False`` (``train.init_from`` does this; the halting branches keep their
fresh initialisation, as in the reference's fine-tuning), or with :func:`load_dense_weights`,
which checks that only halting keys are missing. All networks are fully convolutional: a model
trained at 224 px evaluates at 352 px (its ledger is measured per input size).

Per-sample MACs come from the ledger: stem + head + dense first units + per active position
cost of every later unit (:func:`ponder.nn.sparse_cost.residual_macs`: dilated-mask positions
for ``conv1``) + every halting branch that was evaluated for the image. SACT evaluates its
halting branch densely over the map whenever any position of the image is still active (a
``C -> 1`` 3x3 conv, under 1.5 % of a unit: a dense conv is faster than gathering it); the
reference counts it at active positions only, so our per-image MACs are slightly higher.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn as nn
from torch import Tensor

from ponder import fast
from ponder.cost import CostLedger, eval_unit_macs
from ponder.models.base import Knob, example_input
from ponder.models.resnet import (
    IMAGENET_LAYOUTS,
    BasicBlock,
    Bottleneck,
    CifarResNet,
    ImageNetResNet,
    ResidualBlock,
    Shortcut,
    _MethodUnit,
)
from ponder.models.spatial import DenseResNetKernels, DenseResNetView, SpatialModel, block_input_sizes
from ponder.nn.dense_units import dense_unit_channels_last, stem_on_kernels
from ponder.nn.forced import sample_keys
from ponder.nn.halting import HALT_EPS, ACTAccumulator, HaltingBranch, SpatialHaltingBranch
from ponder.nn.sparse_cost import position_units, unit_masks_and_macs
from ponder.nn.sparse_residual import get_default_break_even, plan_unit, sparse_residual
from ponder.nn.sparse_units import masked_residual
from ponder.output import DynamicOutput
from ponder.registry import register_model


def _out_channels(block: ResidualBlock) -> int:
    return block.conv3.out_channels if isinstance(block, Bottleneck) else block.conv2.out_channels


class ACTResNetMixin(SpatialModel):
    """ACT / SACT forward, ledger and bench hooks over a ResNet's stages (mixed into a ResNet class).

    Native knob: the halting threshold (default ``1 - eps = 0.99``): a position (ACT: an image) halts
    once its cumulative halting score reaches it; lower halts earlier and costs less.
    """

    paper = "Figurnov et al., CVPR 2017 (SACT)"
    knob = Knob("halt_threshold", 0.0, 1.0, 1.0 - HALT_EPS, macs_rise=True,
                doc="a position (ACT: an image) halts once its cumulative halting score reaches this")
    spatial: bool
    halting: nn.ModuleList
    blocks: list[ResidualBlock]

    def _init_act(self, spatial: bool) -> None:
        self.spatial = spatial
        self.executor = "masked"
        self.break_even: float | str | None = "default"  # sparse_residual's dense fall-back (None: always sparse)
        self.halt_eps = HALT_EPS
        branch = SpatialHaltingBranch if spatial else HaltingBranch
        self.halting = nn.ModuleList(
            nn.ModuleList(branch(_out_channels(b)) for b in list(stage)[:-1]) for stage in self.stages())

    def stages(self) -> list[nn.Sequential]:
        """The ResNet stages (``layer1``, ``layer2``, ...): one ACT block each."""
        return [getattr(self, f"layer{i}") for i in range(1, 5) if hasattr(self, f"layer{i}")]

    def get_knob(self) -> float:
        """The halting threshold ``1 - eps``."""
        return 1.0 - self.halt_eps

    def set_knob(self, value: float) -> None:
        self.halt_eps = 1.0 - self.knob.checked(self, value, "halting threshold")

    # ---------------------------------------------------------------- forward
    def forward(self, x: Tensor) -> DynamicOutput:
        """ACT / SACT forward: logits, per-sample MACs, per-stage ponder maps, per-unit masks."""
        self.check_input(x)
        led = self.ledger_for(x)
        keys = sample_keys(x) if self.forced is not None else None
        macs = torch.full((x.shape[0],), float(led["stem"] + led["head"]), dtype=torch.float64, device=x.device)
        h = stem_on_kernels(self, x) if self.spatial and self.executor == "sparse" and not self.training \
            else self.stem(x)
        ponder, n_maps, masks, ran = [], [], [], []
        first = 0
        for s, stage in enumerate(self.stages()):
            blocks = list(stage)
            if self.spatial:
                fused = self.executor == "sparse" and not self.training and fast.sact_step_applies(h)
                stage = self._sact_stage_fused if fused else self._sact_stage
                h, res, stage_masks, stage_macs = stage(s, first, blocks, h, led, keys)
                masks.extend(stage_masks)
            else:
                h, res, stage_ran, stage_macs = self._act_stage(s, first, blocks, h, led, keys)
                ran.append(stage_ran)
            macs = macs + stage_macs
            ponder.append(res.ponder_cost)
            n_maps.append(res.n)
            first += len(blocks)
        logits = self.head(h)
        cost = sum(p.flatten(1).mean(1) if p.dim() > 1 else p for p in ponder)
        return DynamicOutput(
            logits=logits, macs=macs, ponder=ponder,
            masks=masks if self.spatial else None,
            gates=None if self.spatial else torch.cat(ran, 1).float(),
            extras={"ponder_cost": cost, "units_run": n_maps},
        )

    def _act_stage(self, s: int, first: int, blocks: list[ResidualBlock], x: Tensor, led: CostLedger,
                   keys: Tensor | None):
        """One ACT block with a decision per image; returns (output, ACTResult, ran [B, L], macs [B])."""
        b, num = x.shape[0], len(blocks)
        acc = ACTAccumulator(num, (b,), x.device, eps=self.halt_eps)
        keep = None if keys is None else self.forced_images(keys, s)
        fast = self.executor == "sparse" and not torch.is_grad_enabled()
        for l, block in enumerate(blocks):
            branch = self.halting[s][l] if l < num - 1 else None
            run = acc.running
            h = None
            if l == 0:
                x = block(x)
                h = branch(x) if branch is not None else None
            elif not bool(run.any()):
                if fast:  # every image halted: the remaining units run nowhere
                    acc.finish_halted()
                    break
                h = torch.zeros(b, device=x.device) if branch is not None else None
            elif self.executor == "sparse":
                idx = run.nonzero()[:, 0]
                xs = block(x.index_select(0, idx))
                x = x.index_copy(0, idx, xs)
                if branch is not None:
                    hs = branch(xs)
                    h = hs.new_zeros(b).index_copy(0, idx, hs)
            else:
                x = torch.where(run[:, None, None, None], block(x), x)
                h = branch(x) if branch is not None else None
            if keep is not None and h is not None:
                h = (~keep).to(h.dtype) if l == 0 else torch.zeros_like(h)
            acc.step(x, h)
        res = acc.result()
        ran = acc.ran_units
        names = tuple(f"blocks.{first + l}" for l in range(num)) + tuple(f"halt.{first + l}" for l in range(num - 1))
        return res.output, res, ran, led.charge(names, torch.cat([ran, ran[:, :-1]], 1))

    def _sact_stage(self, s: int, first: int, blocks: list[ResidualBlock], x: Tensor, led: CostLedger,
                    keys: Tensor | None):
        """One SACT block with a decision per position; returns (output, ACTResult, masks, macs [B])."""
        num = len(blocks)
        if self.executor == "sparse" and not self.training:  # the sparse units work and return channels-last
            x = dense_unit_channels_last(blocks[0], x)
        else:
            x = blocks[0](x)  # unit 1 runs densely (it may change the resolution)
        b, _, hgt, wid = x.shape
        acc = ACTAccumulator(num, (b, hgt, wid), x.device, eps=self.halt_eps)
        keep = None if keys is None else self.forced_positions(keys, (hgt, wid), s)
        macs = torch.full((b,), float(led[f"blocks.{first}"]), dtype=torch.float64, device=x.device)
        masks = [torch.ones(b, hgt, wid, dtype=torch.bool, device=x.device)]
        h = None
        if num > 1:
            h = self.halting[s][0](x)
            macs = macs + led[f"halt.{first}"]
            if keep is not None:
                h = (~keep).to(h.dtype)
        acc.step(x, h)
        fast = self.executor == "sparse" and not torch.is_grad_enabled()
        for l in range(1, num):
            branch = self.halting[s][l] if l < num - 1 else None
            mask = acc.running
            active = bool(mask.any())
            if fast and not active:  # every position halted: the remaining units run nowhere
                masks.extend([mask] * (num - l))
                acc.finish_halted()
                break
            masks.append(mask)
            in_size = tuple(x.shape[1:])
            h = None
            if active:
                # the first conv's (dilated) mask, shared by the kernel and the ledger, and the unit's MACs
                conv1_mask, unit_macs = unit_masks_and_macs(
                    blocks[l], in_size, mask, led, f"blocks.{first + l}",
                    f"halt.{first + l}" if branch is not None else None)
                if self.executor == "sparse":
                    # x is this stage's own intermediate (already accumulated): the unit may overwrite it
                    x = sparse_residual(blocks[l], x, mask, break_even=self.break_even, first=conv1_mask,
                                        overwrite=True)
                else:
                    x = masked_residual(blocks[l], x, mask)
                macs = macs + unit_macs
                if branch is not None:
                    h = branch(x)
            elif branch is not None:
                h = torch.zeros(b, hgt, wid, device=x.device)
            if keep is not None and h is not None:
                h = torch.zeros_like(h)
            acc.step(x, h)
        res = acc.result()
        return res.output, res, masks, macs

    def _sact_stage_fused(self, s: int, first: int, blocks: list[ResidualBlock], x: Tensor, led: CostLedger,
                          keys: Tensor | None):
        """:meth:`_sact_stage` at inference on the compiled kernels (the caller checked
        :func:`ponder.fast.sact_step_applies`): after each unit one call computes its halting scores, the ACT
        step and the next unit's dilated mask, MACs and active counts (:meth:`ACTAccumulator.step_fused`), so a
        unit costs its dense fall-back (or its sparse kernel) plus that call. The units' break-even fractions
        and dense fall-backs are prepared once per input shape (:func:`ponder.nn.sparse_residual.plan_unit`,
        a :func:`ponder.fast.prepared` plan), so no unit looks up a route or a folded weight per call."""
        num = len(blocks)
        x = dense_unit_channels_last(blocks[0], x)
        be = get_default_break_even() if self.break_even == "default" else self.break_even
        units = fast.prepared(self, ("sact", s, tuple(x.shape), torch.get_num_threads(), be),
                              lambda: [None] + [plan_unit(blk, x, "shortcut", be) for blk in blocks[1:]])
        b, _, hgt, wid = x.shape
        acc = ACTAccumulator(num, (b, hgt, wid), x.device, eps=self.halt_eps)
        keep = None if keys is None else self.forced_positions(keys, (hgt, wid), s)
        costs = self._stage_costs(led, first, num)
        macs = torch.full((b,), costs[0], dtype=torch.float64, device=x.device)
        masks = [torch.ones(b, hgt, wid, dtype=torch.bool, device=x.device)]
        forced = None if keep is None else ((~keep).to(torch.float32), torch.zeros(b, hgt, wid, device=x.device))
        branches = list(self.halting[s])  # (a list: ModuleList indexing costs microseconds per unit)
        halting = branches[0].folded_weights() if num > 1 else None
        step = acc.step_fused(x, halting, None if forced is None else forced[0], costs[1] if num > 1 else None)
        assert step is not None  # (the caller checked the kernel applies)
        for l in range(1, num):
            conv1_mask, unit_macs, n_mask, n_first = step
            mask = acc.running
            if n_mask == 0:  # every position halted: the remaining units run nowhere
                masks.extend([mask] * (num - l))
                acc.finish_halted()
                break
            masks.append(mask)
            x = sparse_residual(blocks[l], x, mask, break_even=self.break_even, first=conv1_mask, overwrite=True,
                                active=(n_mask, n_first), plan=units[l])
            macs = macs + unit_macs
            last = l == num - 1
            halting = None if last else branches[l].folded_weights()
            step = acc.step_fused(x, halting, None if forced is None or last else forced[1],
                                  None if last else costs[l + 1])
        res = acc.result()
        return res.output, res, masks, macs

    def _stage_costs(self, led: CostLedger, first: int, num: int) -> list:
        """Per unit of the stage starting at block ``first``: unit 0's MACs (dense unit and halting branch), then per
        later unit ``(shortcut, first conv per position, other convs per position, halting branch)`` (cached)."""
        plans = self.__dict__.setdefault("_stage_plans", {})
        key = (led.input_size, first)
        if key not in plans:
            halt = [float(led[f"halt.{first + l}"]) if l < num - 1 else 0.0 for l in range(num)]
            plans[key] = [float(led[f"blocks.{first}"]) + halt[0]] + [
                (float(led[f"blocks.{first + l}.skip"]), float(led[f"blocks.{first + l}.first"]),
                 float(led[f"blocks.{first + l}.rest"]), halt[l]) for l in range(1, num)]
        return plans[key]

    # ---------------------------------------------------------------- cost
    def measure_ledger(self, input_size: tuple[int, int, int]) -> CostLedger:
        """Unit costs at batch 1: ``stem``, ``head``, ``blocks.i`` (dense unit) and ``halt.i`` (halting branch).

        SACT units after the first of a stage are charged per active position: ``blocks.i.skip`` (the
        shortcut, dense), ``blocks.i.first`` per position of the first conv's (dilated) mask and
        ``blocks.i.rest`` per active position (:func:`~ponder.nn.sparse_cost.position_units`)."""
        x = example_input(self, input_size)
        units: dict[str, nn.Module] = {"stem": _MethodUnit(self.stem), "head": _MethodUnit(self.head)}
        i = 0
        for s, stage in enumerate(self.stages()):
            for l, block in enumerate(stage):
                units[f"blocks.{i}"] = block
                if l < len(stage) - 1:
                    units[f"halt.{i}"] = self.halting[s][l]
                i += 1

        def run() -> None:
            h = units["stem"](x)
            for i, block in enumerate(self.blocks):
                h = block(h)
                if f"halt.{i}" in units:
                    units[f"halt.{i}"](h)
            units["head"](h)

        costs = eval_unit_macs(self, run, units)
        total = costs.pop("total")
        if self.spatial:  # units after the first of a stage also run per active position
            sizes = block_input_sizes(self, input_size)
            i = 0
            for stage in self.stages():
                for l, block in enumerate(stage):
                    if l > 0:
                        costs.update(position_units(f"blocks.{i}", block, sizes[i]))
                    i += 1
        return CostLedger(input_size=tuple(input_size), units=costs, total=total)

    # ---------------------------------------------------------------- bench hooks
    def dense_baseline(self) -> nn.Module:
        """The plain ResNet with the same weights (every unit dense, no halting branches)."""
        return DenseResNetView(self)

    def dense_baseline_kernels(self) -> nn.Module:
        """The plain ResNet run on the sparse executor's kernels (``ponder bench`` times it as ``dense*``)."""
        return DenseResNetKernels(self)


class ACTCifarResNet(ACTResNetMixin, CifarResNet):
    """CIFAR ResNet (6n+2, BasicBlocks) with ACT (``spatial=False``) or SACT (``spatial=True``) per stage."""

    def __init__(self, depth: int = 32, num_classes: int = 10, spatial: bool = True, shortcut: Shortcut = "A",
                 **kw) -> None:
        CifarResNet.__init__(self, depth, num_classes=num_classes, shortcut=shortcut, **kw)
        self._init_act(spatial)


class ACTImageNetResNet(ACTResNetMixin, ImageNetResNet):
    """torchvision-layout ResNet with ACT (``spatial=False``) or SACT (``spatial=True``) per stage."""

    def __init__(self, block: type[BasicBlock] | type[Bottleneck], layers: list[int], num_classes: int = 1000,
                 spatial: bool = True, **kw) -> None:
        ImageNetResNet.__init__(self, block, layers, num_classes=num_classes, **kw)
        self._init_act(spatial)


def load_dense_weights(model: ACTResNetMixin, source: str | Path | dict[str, Tensor]) -> list[str]:
    """Load a dense ResNet ``state_dict`` (or a torchvision ``.pth`` / ``.safetensors`` file) into an ACT/SACT model.

    Every backbone key must match; only ``halting.*`` keys may be missing (they keep their fresh
    initialisation). Returns the missing (halting) keys.
    """
    if isinstance(source, dict):
        state = source
    elif str(source).endswith(".safetensors"):
        from safetensors.torch import load_file

        state = load_file(str(source))
    else:
        state = torch.load(str(source), map_location="cpu", weights_only=True)
    result = model.load_state_dict(state, strict=False)
    bad = [k for k in result.missing_keys if not k.startswith("halting.")]
    if bad or result.unexpected_keys:
        raise ValueError(f"dense weights do not fit {type(model).__name__}: missing {bad[:5]}, unexpected "
                         f"{result.unexpected_keys[:5]}; use a ResNet of the same depth and number of classes")
    return list(result.missing_keys)


def _register(name: str, cls: type, build, doc: str):
    def factory(num_classes: int | None = None, **kw) -> nn.Module:
        return build(**({} if num_classes is None else {"num_classes": num_classes}), **kw)

    factory.__name__, factory.__doc__ = name, doc
    factory.__annotations__["return"] = cls  # what the registry lists without building
    return register_model(factory)


def _cifar(depth: int, spatial: bool):
    kind = "SACT" if spatial else "ACT"
    return _register(f"{kind.lower()}_resnet{depth}_cifar", ACTCifarResNet,
                     lambda **kw: ACTCifarResNet(depth, spatial=spatial, **kw),
                     f"{kind} CIFAR ResNet-{depth} ({(depth - 2) // 6} units per stage, parameter-free shortcuts).")


def _imagenet(depth: int, spatial: bool):
    kind, layers = "SACT" if spatial else "ACT", IMAGENET_LAYOUTS[depth][1]
    return _register(f"{kind.lower()}_resnet{depth}", ACTImageNetResNet,
                     lambda **kw: ACTImageNetResNet(Bottleneck, layers, spatial=spatial, **kw),
                     f"{kind} ResNet-{depth} (torchvision layout, {layers} bottleneck units; fully convolutional).")


act_resnet32_cifar = _cifar(32, False)
act_resnet110_cifar = _cifar(110, False)
sact_resnet32_cifar = _cifar(32, True)
sact_resnet110_cifar = _cifar(110, True)
act_resnet50 = _imagenet(50, False)
act_resnet101 = _imagenet(101, False)
sact_resnet50 = _imagenet(50, True)
sact_resnet101 = _imagenet(101, True)
