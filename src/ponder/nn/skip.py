"""Skippable residual blocks: run a ResNet's blocks under per-sample keep decisions.

Every block-skipping model (BlockDrop, SkipNet, ConvNet-AIG, SP-Net, CoDiNet, RDI-Net) runs
``ponder.models.resnet`` blocks (``ResidualBlock`` with ``.branch(x)`` / ``.shortcut(x)``)
through one :class:`BlockSkipper`. A keep decision is ``[B]`` per block (1 = run the block),
or ``[B, blocks]`` for all blocks at once.

What a *skipped* block outputs differs between papers (``skipped=``):

- ``"shortcut"``: ``shortcut(x)``, no ReLU (BlockDrop, SkipNet, CoDiNet's identity skips);
- ``"relu_shortcut"``: ``relu(shortcut(x))`` (ConvNet-AIG, SP-Net, RDI-Net's skip);
- a module of the model's own (``skip_path=`` of :meth:`BlockSkipper.run_block`), which replaces the
  rule for that block: CoDiNet's 1x1 conv + BN + ReLU on stride- or width-changing blocks.

A kept block outputs ``relu(shortcut(x) + branch(x))``. A third option (RDI-Net, ``half=`` of
:meth:`BlockSkipper.run_block`; BasicBlocks, soft mix ``"inside"``) runs the first conv only:
``relu(shortcut(x) + bn1(conv1(x)))``. Executors (``executor`` attribute, switched with
:func:`ponder.nn.executor.set_executor`):

- ``"masked"``: every block runs on every sample and the decision mixes the results; it is
  differentiable w.r.t. soft decisions ``k`` in [0, 1]. How soft decisions mix (``mix=``):
  ``"outside"`` = ``k * relu(sc + f) + (1 - k) * skipped(x)`` (BlockDrop, SkipNet, CoDiNet);
  ``"inside"`` = ``relu(sc + k * f [+ k_half * bn1(conv1(x))])`` (ConvNet-AIG, SP-Net, RDI-Net;
  needs ``skipped="relu_shortcut"``).
- ``"sparse"``: really skips work. A uniform column runs the plain block (all keep) or only
  the skipped path (all drop), which is also the batch-1 path (no gather); a mixed column
  gathers the kept samples, runs the branch on them and scatters back (the shortcut runs on
  every sample, as skipped samples need it; a skip path of the model's own runs on the skipped
  samples only). Decisions are thresholded at 0.5.

For hard decisions all executors give the same outputs in ``eval()`` mode. (In ``train()`` mode
BatchNorm batch statistics differ: the sparse executor normalises over the kept samples only.)

Cost: a sample pays ledger unit ``blocks.i`` when it runs block ``i``, ``blocks.i.half`` when it runs its
first conv only (:func:`half_units`: that conv plus the shortcut) and ``blocks.i.skip`` when it skips it
(:func:`skip_units`: the projection shortcut or the model's skip path; 0 for identity / zero-pad /
avg-pool shortcuts); :meth:`ponder.models.skipping.SkippingModel.charge` adds them up through the ledger.
"""

from __future__ import annotations

from typing import Literal, Mapping, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from ponder.cost import count_macs, eval_unit_macs
from ponder.nn import skip_kernels
from ponder.nn.protocols import ResidualBlock, ResNet


SkippedOutput = Literal["shortcut", "relu_shortcut"]
SoftMix = Literal["outside", "inside"]
SKIPPED_OUTPUTS = ("shortcut", "relu_shortcut")


class BlockSkipper(nn.Module):
    """Runs residual blocks under keep decisions with the ``masked`` or ``sparse`` executor.

    Holds no parameters (the blocks stay in their ResNet, so ``state_dict`` keys do not change);
    it carries the ``executor`` attribute and the paper's skipped-block rule.
    """

    def __init__(self, skipped: SkippedOutput = "shortcut", mix: SoftMix | None = None,
                 executor: str = "masked", nonnegative: bool = False):
        super().__init__()
        if skipped not in SKIPPED_OUTPUTS:
            raise ValueError(f"skipped must be one of {SKIPPED_OUTPUTS}, got {skipped!r}")
        mix = mix or ("inside" if skipped == "relu_shortcut" else "outside")
        if mix not in ("outside", "inside"):
            raise ValueError(f"mix must be 'outside' or 'inside', got {mix!r}")
        if mix == "inside" and skipped != "relu_shortcut":
            raise ValueError("mix='inside' (relu(sc + k * f)) only fits skipped='relu_shortcut'; "
                             "use mix='outside' with skipped='shortcut'")
        self.skipped, self.mix, self.executor = skipped, mix, executor
        self.nonnegative = nonnegative  # every block input is a ReLU output (lets inference skip relu(x) = x)

    def extra_repr(self) -> str:
        return f"skipped={self.skipped!r}, mix={self.mix!r}, executor={self.executor!r}"

    def skip_output(self, block: ResidualBlock, x: Tensor, skip_path: nn.Module | None = None) -> Tensor:
        """What a skipped ``block`` outputs for ``x [B, C, H, W]`` (``skip_path``: the model's own skip module)."""
        if skip_path is not None:
            return skip_path(x)
        sc = block.shortcut(x)
        return F.relu(sc) if self.skipped == "relu_shortcut" else sc

    def half_output(self, block: ResidualBlock, x: Tensor) -> Tensor:
        """The first-conv-only option: ``relu(shortcut(x) + bn1(conv1(x)))`` for ``x [B, C, H, W]``."""
        return F.relu(block.shortcut(x) + first_conv(block, x))

    # one block ---------------------------------------------------------------------------
    def run_block(self, block: ResidualBlock, x: Tensor, keep: Tensor | None, half: Tensor | None = None,
                  skip_path: nn.Module | None = None) -> Tensor:
        """Output of ``block`` on ``x [B, C, H, W]`` under ``keep [B]`` (``None`` = keep all).

        ``half [B]``: the first-conv-only option (RDI-Net), exclusive with ``keep`` (a sample runs the whole
        block, its first conv, or neither); ``skip_path``: what a skipped sample gets instead of the rule's
        output (CoDiNet's projection).
        """
        if keep is None:
            return block(x)
        for name, d in (("keep", keep), ("half", half)):
            if d is not None and d.shape != (x.shape[0],):
                raise ValueError(f"{name} must have shape [batch] = [{x.shape[0]}], got {list(d.shape)}")
        if half is not None and (self.mix != "inside" or skip_path is not None):
            raise ValueError("the first-conv-only option (half) needs mix='inside' and the rule's skipped output")
        if skip_path is not None and self.mix != "outside":
            raise ValueError("a skip path of the model's own needs mix='outside' (k * block + (1 - k) * skip)")
        if self.executor == "masked":
            return self._masked(block, x, keep, half, skip_path)
        if self.executor == "sparse":
            if skip_kernels.applies(block, x):
                option = (keep > 0.5).long() if half is None else (keep > 0.5).long() * 2 + (half > 0.5).long()
                k = 2 if half is None else 3
                return self.run_option(block, x, option, torch.bincount(option, minlength=k).tolist(), skip_path)
            if half is None and skip_path is None:
                hard = keep > 0.5
                return self._sparse(block, x, hard, int(hard.sum()))
            return self._sparse_options(block, x, keep > 0.5, None if half is None else half > 0.5, skip_path)
        raise ValueError(f"executor must be 'masked' or 'sparse', got {self.executor!r}")

    def run_option(self, block: ResidualBlock, x: Tensor, option: Tensor, counts: list[int],
                   skip_path: nn.Module | None = None, own: bool = False) -> Tensor:
        """Sparse inference (:mod:`ponder.nn.skip_kernels`): ``block`` on ``x`` under hard options ``option [B]``
        (long: 0 skip, ``K - 1`` whole block, 1 first conv only when ``K = 3``) with ``counts[k]`` samples
        taking option ``k``; returns a channels-last map. ``own``: ``x`` is the executor's own intermediate."""
        x = x.contiguous(memory_format=torch.channels_last)
        return skip_kernels.run_options(block, x, option, counts, relu=self.skipped == "relu_shortcut",
                                        nonnegative=self.nonnegative, own=own, skip_path=skip_path)

    def _masked(self, block: ResidualBlock, x: Tensor, keep: Tensor, half: Tensor | None = None,
                skip_path: nn.Module | None = None) -> Tensor:
        k = keep.to(x.dtype).view(-1, 1, 1, 1)
        sc = block.shortcut(x)
        if half is not None:
            first = first_conv(block, x)
            kh = half.to(x.dtype).view(-1, 1, 1, 1)
            return F.relu(sc + k * rest_of_branch(block, first) + kh * first)
        f = block.branch(x)
        if self.mix == "inside":
            return F.relu(sc + k * f)
        if skip_path is not None:
            skipped = skip_path(x)
        else:
            skipped = F.relu(sc) if self.skipped == "relu_shortcut" else sc
        return k * F.relu(sc + f) + (1 - k) * skipped

    def _sparse(self, block: ResidualBlock, x: Tensor, hard: Tensor, n_keep: int, own: bool = False) -> Tensor:
        """``block`` on the kept samples only. ``own``: ``x`` is the executor's own intermediate, so
        without autograd an identity-shortcut block writes the kept rows into ``x`` instead of a copy."""
        if n_keep == x.shape[0]:
            return block(x)
        if n_keep == 0:
            return self.skip_output(block, x)
        idx = hard.nonzero().squeeze(1)
        xi = x.index_select(0, idx)
        if block.downsample is None:  # identity: the kept rows' shortcut is xi itself
            sc, sci = x, xi
        else:
            sc = block.shortcut(x)  # every sample needs it; kept ones reuse their rows
            sci = sc.index_select(0, idx)
        kept = F.relu(sci + block.branch(xi))
        out = F.relu(sc) if self.skipped == "relu_shortcut" else sc
        # in place only without autograd, and never into the caller's tensor
        if torch.is_grad_enabled() or (out is x and not own):
            return out.index_copy(0, idx, kept.to(out.dtype))  # dtypes can differ under autocast
        return out.index_copy_(0, idx, kept.to(out.dtype))

    def _sparse_options(self, block: ResidualBlock, x: Tensor, full: Tensor, half: Tensor | None,
                        skip_path: nn.Module | None) -> Tensor:
        """The sparse executor with a first-conv-only option or a skip path of the model's own: each group
        of samples (full, half, skipped) runs its own computation on its rows only."""
        n = x.shape[0]
        rows = {"full": full.nonzero().squeeze(1)}
        if half is not None:
            rows["half"] = half.nonzero().squeeze(1)
        skipped = ~full if half is None else ~(full | half)
        rows["skip"] = skipped.nonzero().squeeze(1)
        sizes = {k: int(v.numel()) for k, v in rows.items()}
        if sizes["full"] == n:
            return block(x)
        if sizes.get("half", 0) == n:
            return self.half_output(block, x)
        if sizes["skip"] == n:
            return self.skip_output(block, x, skip_path)
        if skip_path is None:  # every sample needs the shortcut: the skipped ones get the rule's output
            sc = block.shortcut(x)
            out = F.relu(sc) if self.skipped == "relu_shortcut" else sc.clone()
            parts = {"full": lambda r: F.relu(sc.index_select(0, r) + block.branch(x.index_select(0, r))),
                     "half": lambda r: F.relu(sc.index_select(0, r) + first_conv(block, x.index_select(0, r)))}
        else:  # the skip path runs on the skipped samples, the block on the kept ones
            out = None
            parts = {"full": lambda r: block(x.index_select(0, r)),
                     "skip": lambda r: skip_path(x.index_select(0, r))}
        for name, part in parts.items():
            r = rows.get(name)
            if r is None or r.numel() == 0:
                continue
            y = part(r)
            if out is None:
                out = y.new_empty((n, *y.shape[1:]))
            out = out.index_copy(0, r, y.to(out.dtype)) if torch.is_grad_enabled() else out.index_copy_(0, r, y.to(out.dtype))
        return out

    # all blocks --------------------------------------------------------------------------
    def run_blocks(self, blocks: Sequence[ResidualBlock], x: Tensor, keep: Tensor | None) -> Tensor:
        """Run ``blocks`` in order on ``x`` under ``keep [B, len(blocks)]`` (``None`` = keep all)."""
        if keep is None:
            for block in blocks:
                x = block(x)
            return x
        if keep.shape != (x.shape[0], len(blocks)):
            raise ValueError(f"keep must have shape [batch, blocks] = [{x.shape[0]}, {len(blocks)}], "
                             f"got {list(keep.shape)}")
        if self.executor == "masked":
            for i, block in enumerate(blocks):
                x = self._masked(block, x, keep[:, i])
            return x
        if self.executor != "sparse":
            raise ValueError(f"executor must be 'masked' or 'sparse', got {self.executor!r}")
        hard = keep > 0.5
        counts = hard.sum(0).tolist()  # one host sync for the whole network
        given = x
        n = x.shape[0]
        for i, block in enumerate(blocks):
            if skip_kernels.applies(block, x):
                x = self.run_option(block, x, hard[:, i].long(), [n - counts[i], counts[i]], own=x is not given)
            else:
                x = self._sparse(block, x, hard[:, i], counts[i], own=x is not given)
        return x


def first_conv(block: ResidualBlock, x: Tensor) -> Tensor:
    """A BasicBlock's first conv and BN, ``bn1(conv1(x))``: ``[B, C, H, W]`` -> ``[B, C', H', W']`` (the
    block's output shape, which the first-conv-only option adds to the shortcut)."""
    if hasattr(block, "conv3"):
        raise ValueError("the first-conv-only option (half) is defined for BasicBlocks (two 3x3 convs), not Bottlenecks")
    return block.bn1(block.conv1(x))


def rest_of_branch(block: ResidualBlock, first: Tensor) -> Tensor:
    """The rest of a BasicBlock's branch after :func:`first_conv`: ``bn2(conv2(relu(first)))``."""
    return block.bn2(block.conv2(F.relu(first)))


# cost ------------------------------------------------------------------------------------
def skip_units(backbone: ResNet, input_size: tuple[int, int, int],
               skip_paths: Mapping[int, nn.Module] | None = None) -> dict[str, int]:
    """MACs one sample pays when it *skips* each block: ``{"blocks.i.skip": macs}``.

    That is the block's shortcut (a 1x1 projection costs; identity / zero-pad / avg-pool cost 0), or the
    model's own skip path for the blocks in ``skip_paths`` (block index -> module), measured at batch 1
    with ``FlopCounterMode`` on a dense forward.
    """
    skip_paths = skip_paths or {}
    units: dict[str, nn.Module] = {f"blocks.{i}.skip": b.downsample for i, b in enumerate(backbone.blocks)
                                   if b.downsample is not None and i not in skip_paths}
    units.update({f"blocks.{i}.skip_path": m for i, m in skip_paths.items()})
    spent = _dense_units(backbone, input_size, units, run_skip_paths=skip_paths)
    return {f"blocks.{i}.skip": spent.get(f"blocks.{i}.skip_path" if i in skip_paths else f"blocks.{i}.skip", 0)
            for i in range(len(backbone.blocks))}


def half_units(backbone: ResNet, input_size: tuple[int, int, int]) -> dict[str, int]:
    """MACs one sample pays for the first-conv-only option of each block: ``{"blocks.i.half": macs}``
    (its first conv plus its shortcut; BasicBlocks only), measured at batch 1 on a dense forward in eval mode."""
    p = next(backbone.parameters())
    units = {}
    was_training = backbone.training
    backbone.eval()
    try:
        with torch.no_grad():
            h = backbone.stem(torch.zeros(1, *input_size, device=p.device, dtype=p.dtype))
            for i, block in enumerate(backbone.blocks):
                units[f"blocks.{i}.half"] = count_macs(lambda b=block, t=h: b.shortcut(t) + first_conv(b, t))
                h = block(h)
    finally:
        backbone.train(was_training)
    return units


def _dense_units(backbone: ResNet, input_size: tuple[int, int, int], units: Mapping[str, nn.Module],
                 run_skip_paths: Mapping[int, nn.Module] | None = None) -> dict[str, int]:
    """MACs spent in each of ``units`` during one dense batch-1 forward of ``backbone`` (eval mode); the
    modules of ``run_skip_paths`` run on their block's input as well."""
    p = next(backbone.parameters())
    x = torch.zeros(1, *input_size, device=p.device, dtype=p.dtype)
    extra = run_skip_paths or {}

    def run() -> None:
        h = backbone.stem(x)
        for i, block in enumerate(backbone.blocks):
            if i in extra:
                extra[i](h)
            h = block(h)

    was = {m: m.training for m in extra.values()}
    for m in extra.values():
        m.eval()
    try:
        return eval_unit_macs(backbone, run, units)
    finally:
        for m, training in was.items():
            m.train(training)


def block_usage(gates: Tensor) -> dict:
    """Block-usage statistics of hard decisions ``gates [N, blocks]`` (1 = ran).

    Returns ``per_block`` (fraction of samples running each block), ``blocks_mean`` /
    ``blocks_std`` (blocks run per sample, population std), ``keep_rate`` (mean fraction)
    and ``unique_policies`` (distinct decision vectors).
    """
    if gates.dim() != 2:
        raise ValueError(f"gates must have shape [samples, blocks], got {list(gates.shape)}")
    g = (gates > 0.5).to(torch.float64)
    per_sample = g.sum(1)
    n = g.shape[0]
    return {
        "per_block": g.mean(0).tolist() if n else [float("nan")] * g.shape[1],
        "blocks_mean": per_sample.mean().item() if n else float("nan"),
        "blocks_std": per_sample.std(unbiased=False).item() if n else float("nan"),
        "keep_rate": g.mean().item() if n else float("nan"),
        "num_blocks": g.shape[1],
        "unique_policies": int(torch.unique(g, dim=0).shape[0]) if n else 0,
    }
