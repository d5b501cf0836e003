"""Index-level splits: a seeded held-out validation split and long-tailed class subsampling."""

from __future__ import annotations

import math

import torch

from ponder.data.errors import DataError


def train_val_split(n: int, val_size: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Carve ``val_size`` random indices out of ``range(n)``; the same seed gives the same split.

    Returns ``(train_idx, val_idx)``, both sorted ``int64`` tensors, disjoint, covering ``range(n)``.
    """
    if not 0 <= val_size < n:
        raise DataError(f"data.val_size={val_size} must be between 0 and {n - 1} (the training set has {n} images)")
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    return perm[val_size:].sort().values, perm[:val_size].sort().values


def long_tail_indices(labels: torch.Tensor, mu: float, num_classes: int | None = None) -> torch.Tensor:
    """Long-tailed subset: class ``c`` keeps its first ``floor(N_c * mu**c)`` images (file order).

    ``labels`` is ``int64 [N]``; returns the kept indices (sorted ``int64``). ``mu`` in ``(0, 1]``;
    use :func:`mu_for_imbalance` to get ``mu`` from an imbalance ratio ``N_0 / N_{K-1}``.
    """
    if not 0.0 < mu <= 1.0:
        raise DataError(f"data.long_tail_mu={mu} must be in (0, 1]; e.g. mu_for_imbalance(100, 10) = {mu_for_imbalance(100, 10):.4f}")
    k = int(num_classes if num_classes is not None else int(labels.max()) + 1)
    keep = []
    for c in range(k):
        idx = (labels == c).nonzero().flatten()
        keep.append(idx[: math.floor(len(idx) * mu**c)])
    return torch.cat(keep).sort().values


def mu_for_imbalance(ratio: float, num_classes: int) -> float:
    """The ``mu`` for which the largest class is ``ratio`` times the smallest: ``ratio ** (-1 / (K - 1))``."""
    return float(ratio) ** (-1.0 / (num_classes - 1))
