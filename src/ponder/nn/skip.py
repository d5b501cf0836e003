"""Skippable residual blocks: run a ResNet's blocks under per-sample keep decisions.

Every block-skipping model (BlockDrop, SkipNet, ConvNet-AIG, SP-Net, CoDiNet/RDI-Net routers)
runs ``ponder.models.resnet`` blocks (``ResidualBlock`` with ``.branch(x)`` / ``.shortcut(x)``)
through one :class:`BlockSkipper`. A keep decision is ``[B]`` per block (1 = run the block),
or ``[B, blocks]`` for all blocks at once.

What a *skipped* block outputs differs between papers (``skipped=``):

- ``"shortcut"``: ``shortcut(x)``, no ReLU (BlockDrop, SkipNet);
- ``"relu_shortcut"``: ``relu(shortcut(x))`` (ConvNet-AIG, SP-Net, RDI-Net's skip).

A kept block outputs ``relu(shortcut(x) + branch(x))``. Executors (``executor`` attribute,
switched with :func:`ponder.nn.executor.set_executor`):

- ``"masked"``: every block runs on every sample and the decision mixes the results; it is
  differentiable w.r.t. soft decisions ``k`` in [0, 1]. How soft decisions mix (``mix=``):
  ``"outside"`` = ``k * relu(sc + f) + (1 - k) * skipped(x)`` (BlockDrop, SkipNet);
  ``"inside"`` = ``relu(sc + k * f)`` (ConvNet-AIG; needs ``skipped="relu_shortcut"``).
- ``"sparse"``: really skips work. A uniform column runs the plain block (all keep) or only
  the skipped path (all drop), which is also the batch-1 path (no gather); a mixed column
  gathers the kept samples, runs the branch on them and scatters back (the shortcut runs on
  every sample, as skipped samples need it). Decisions are thresholded at 0.5.

For hard decisions all executors give the same outputs in ``eval()`` mode. (In ``train()`` mode
BatchNorm batch statistics differ: the sparse executor normalises over the kept samples only.)

Cost: a sample pays ledger unit ``blocks.i`` when it runs block ``i`` and ``blocks.i.skip`` (the
projection shortcut, 0 for identity / zero-pad / avg-pool shortcuts) when it skips it (:func:`skip_units`);
:meth:`ponder.models.skipping.SkippingModel.charge` adds them up through the ledger.
"""

from __future__ import annotations

from typing import Literal, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from ponder.cost import eval_unit_macs
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
                 executor: str = "masked"):
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

    def extra_repr(self) -> str:
        return f"skipped={self.skipped!r}, mix={self.mix!r}, executor={self.executor!r}"

    def skip_output(self, block: ResidualBlock, x: Tensor) -> Tensor:
        """What a skipped ``block`` outputs for ``x [B, C, H, W]``."""
        sc = block.shortcut(x)
        return F.relu(sc) if self.skipped == "relu_shortcut" else sc

    # one block ---------------------------------------------------------------------------
    def run_block(self, block: ResidualBlock, x: Tensor, keep: Tensor | None) -> Tensor:
        """Output of ``block`` on ``x [B, C, H, W]`` under ``keep [B]`` (``None`` = keep all)."""
        if keep is None:
            return block(x)
        if keep.shape != (x.shape[0],):
            raise ValueError(f"keep must have shape [batch] = [{x.shape[0]}], got {list(keep.shape)}")
        if self.executor == "masked":
            return self._masked(block, x, keep)
        if self.executor == "sparse":
            hard = keep > 0.5
            return self._sparse(block, x, hard, int(hard.sum()))
        raise ValueError(f"executor must be 'masked' or 'sparse', got {self.executor!r}")

    def _masked(self, block: ResidualBlock, x: Tensor, keep: Tensor) -> Tensor:
        k = keep.to(x.dtype).view(-1, 1, 1, 1)
        sc, f = block.shortcut(x), block.branch(x)
        if self.mix == "inside":
            return F.relu(sc + k * f)
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
        for i, block in enumerate(blocks):
            x = self._sparse(block, x, hard[:, i], counts[i], own=x is not given)
        return x


# cost ------------------------------------------------------------------------------------
def skip_units(backbone: ResNet, input_size: tuple[int, int, int]) -> dict[str, int]:
    """MACs one sample pays when it *skips* each block: ``{"blocks.i.skip": macs}``.

    That is the block's shortcut (a 1x1 projection costs; identity / zero-pad / avg-pool cost 0),
    measured at batch 1 with ``FlopCounterMode`` on a dense forward.
    """
    p = next(backbone.parameters())
    x = torch.zeros(1, *input_size, device=p.device, dtype=p.dtype)
    units: dict[str, nn.Module] = {f"blocks.{i}.skip": b.downsample for i, b in enumerate(backbone.blocks)
                                   if b.downsample is not None}

    def run() -> None:
        backbone.forward_logits(x)

    spent = eval_unit_macs(backbone, run, units)
    return {f"blocks.{i}.skip": spent.get(f"blocks.{i}.skip", 0) for i in range(len(backbone.blocks))}


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
