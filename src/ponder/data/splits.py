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


def long_tail_indices(labels: torch.Tensor, ratio: float, num_classes: int | None = None) -> torch.Tensor:
    """Long-tailed subset with imbalance ratio ``ratio``: class ``c`` keeps its first ``floor(N_c * mu**c)``
    images (file order), ``mu = ratio ** (-1 / (K - 1))``, so the last class keeps ``1 / ratio`` of its images.

    ``labels`` is ``int64 [N]``; returns the kept indices (sorted ``int64``). ``ratio >= 1`` (1 keeps
    everything). ``mu**c`` is computed as ``ratio ** (-c / (K - 1))`` so that the last class keeps
    exactly ``N_{K-1} / ratio`` images when that is whole (``mu**9`` in floating point can lose one).
    """
    if not ratio >= 1.0:
        raise DataError(f"data.long_tail_ratio={ratio} must be >= 1: the size of the first class over the last "
                        f"(e.g. 100 keeps 1/100 of the last class)")
    k = int(num_classes if num_classes is not None else int(labels.max()) + 1)
    if k < 2:
        raise DataError(f"a long-tailed subset needs at least 2 classes, got {k}")
    keep = []
    for c in range(k):
        idx = (labels == c).nonzero().flatten()
        keep.append(idx[: math.floor(len(idx) * float(ratio) ** (-c / (k - 1)) + 1e-9)])
    return torch.cat(keep).sort().values
