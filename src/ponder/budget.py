"""Budgeted exit proportions: how many samples each exit takes under the ratio ``q``.

The budgeted-batch protocol (MSDNet, RANet, IMTA, L2W) sends a fraction ``P[k] = q^k / sum_j q^j``
of the samples to exit ``k`` (1-based), each exit taking its most confident share of the samples
not yet taken. :mod:`ponder.evaluate.thresholds` turns this into thresholds on a held-out split;
L2W's meta loss (:mod:`ponder.methods.l2w_meta`) uses :func:`assign_by_proportions` on a half-batch.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


def exit_proportions(q: float, num_exits: int, official_float32: bool = False) -> Tensor:
    """Target fractions ``P[k] = q^k / sum_j q^j`` (k = 1..K) as float64 ``[K]``.

    ``official_float32`` computes ``exp(k log q)`` in float32 and normalises in float32, as the
    official code does (``floor(N P_k)`` can then differ by one from exact arithmetic).
    """
    if q <= 0:
        raise ValueError(f"the proportion ratio q must be > 0, got {q}")
    k = torch.arange(1, num_exits + 1, dtype=torch.float64)
    if official_float32:
        p = torch.exp(k.float() * torch.log(torch.tensor(q, dtype=torch.float32)))
        return (p / p.sum()).double()
    p = torch.exp(k * math.log(q))
    return p / p.sum()


def assign_by_proportions(conf: Tensor, proportions: Tensor) -> Tensor:
    """Exit index ``[N]`` (0-based) for confidences ``conf [K, N]`` and target fractions ``proportions [K]``.

    Exit ``k < K-1`` (in order) takes the ``floor(N * proportions[k])`` samples with the highest
    ``conf[k]`` among those no earlier exit took (ties broken by ``torch.topk``); the last exit takes
    the rest. Exact counts, no thresholds; runs on ``conf``'s device without host synchronisation.
    """
    num_exits, n = conf.shape
    if proportions.shape != (num_exits,):
        raise ValueError(f"proportions has shape {list(proportions.shape)} for {num_exits} exits")
    exit_index = torch.full((n,), num_exits - 1, dtype=torch.long, device=conf.device)
    free = torch.ones(n, dtype=torch.bool, device=conf.device)
    for k in range(num_exits - 1):
        count = math.floor(n * float(proportions[k]))
        if count == 0:
            continue
        chosen = conf[k].masked_fill(~free, -math.inf).topk(count).indices
        exit_index[chosen] = k
        free[chosen] = False
    return exit_index
