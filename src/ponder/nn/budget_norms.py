"""Per-budget BatchNorm layers for residual blocks whose convolutions are shared (budget-aware multi-target).

One network serves several compute budgets: its convolution weights are shared, but each budget sees
other active positions, so each keeps its own BatchNorm statistics (``bn1``, ``bn2`` and, in a
Bottleneck, ``bn3`` of every block; the stem's and the projection shortcuts' BatchNorms run densely
and stay shared). With ``share_affine`` the budgets' BatchNorms hold the *same* affine parameter
objects (the official code's choice when starting from a pre-trained dense network) and differ only
in their running statistics; without it each budget has its own affine parameters too.

:class:`BudgetNorms` owns the layers (``sets.<budget>.<block>.<bn1|bn2|bn3>``) and *installs* one
budget's into the blocks: the blocks then hold them as plain attributes, not as registered submodules,
so every execution path that reads ``block.bn1`` (the masked reference, BN folding, the sparse kernels)
uses the selected budget's, and the state dict holds each layer once. A dense ResNet's state dict
(``<block path>.bn1.running_mean`` ...) loads into every budget (:meth:`BudgetNorms.dense_keys_hook`).
"""

from __future__ import annotations

import copy
from typing import Any, Sequence

import torch.nn as nn

NORM_NAMES = ("bn1", "bn2", "bn3")


class BudgetNorms(nn.Module):
    """``budgets`` sets of the branch BatchNorms of ``blocks`` (their paths in the model: ``paths``).

    Built from the blocks' own BatchNorms (which it takes out of the blocks: every budget starts as a copy
    of them); :meth:`install` puts one budget's layers into the blocks. Budget 0 is installed at first.
    """

    def __init__(self, blocks: Sequence[nn.Module], paths: Sequence[str], budgets: int,
                 share_affine: bool = True) -> None:
        super().__init__()
        if budgets < 1:
            raise ValueError(f"a multi-budget network needs at least one budget, got {budgets}")
        names = [tuple(n for n in NORM_NAMES if isinstance(getattr(b, n, None), nn.BatchNorm2d)) for b in blocks]
        base = [{n: getattr(b, n) for n in ns} for b, ns in zip(blocks, names)]
        self.sets = nn.ModuleList(
            nn.ModuleList(nn.ModuleDict({n: copy.deepcopy(bn) for n, bn in norms.items()}) for norms in base)
            for _ in range(budgets))
        if share_affine:  # every budget's layer holds the first budget's parameter objects
            for k in range(1, budgets):
                for first, own in zip(self.sets[0], self.sets[k]):
                    for n in own:
                        own[n].weight, own[n].bias = first[n].weight, first[n].bias
        for b, ns in zip(blocks, names):
            for n in ns:
                del b._modules[n]
        self.share_affine = share_affine
        self.__dict__["blocks"] = list(blocks)  # not submodules: their parameters belong to the model
        self.paths = list(paths)
        self.index = -1
        self.install(0)

    @property
    def budgets(self) -> int:
        return len(self.sets)

    def install(self, k: int) -> None:
        """Make budget ``k``'s BatchNorms the blocks' ``bn1`` / ``bn2`` / ``bn3``."""
        if not 0 <= k < len(self.sets):
            raise ValueError(f"budget index must be in [0, {len(self.sets) - 1}], got {k}")
        if k == self.index:
            return
        for block, norms in zip(self.blocks, self.sets[k]):
            for n, bn in norms.items():
                block.__dict__[n] = bn
        self.index = k

    def dense_keys_hook(self, prefix_of_model: str, state_dict: dict[str, Any]) -> None:
        """Rewrite a dense ResNet's BatchNorm keys (``<path>.bn1.*``) in ``state_dict`` into every budget's
        keys (``<norms prefix>sets.<k>.<i>.bn1.*``) where those are absent (e.g. ``train.init_from`` a dense run)."""
        own = prefix_of_model + "norms.sets."
        for i, (path, norms) in enumerate(zip(self.paths, self.sets[0])):
            for n, bn in norms.items():
                for key in list(bn.state_dict()):
                    dense = f"{prefix_of_model}{path}.{n}.{key}"
                    if dense not in state_dict:
                        continue
                    value = state_dict.pop(dense)
                    for k in range(len(self.sets)):
                        state_dict.setdefault(f"{own}{k}.{i}.{n}.{key}", value)
