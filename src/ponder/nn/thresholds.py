"""Thresholds: a probability threshold as a logit, and exit thresholds for budgeted batch
classification (the official MSDNet procedure, vectorized).

:func:`probability_logit` is the one place a probability (a gate's keep threshold, a mask threshold, an
initial keep probability) becomes a logit, so every family tests ``sigmoid(z) >= t`` as ``z >= logit(t)``.

Used by the early-exit models' budget knob, the ``budgeted`` protocol and L2W's meta loss
(:func:`assign_by_proportions`: each exit's most confident share of a half-batch, by exact counts).

Tables are ``conf [K, N]``: the max-softmax of exit ``k`` for sample ``i``; ``costs [K]`` are the
cumulative MACs of each exit. Thresholds are fitted on a held-out split and applied to the test set.
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import torch
from torch import Tensor


def probability_logit(p: float) -> float:
    """``log(p / (1 - p))``, the logit at which ``sigmoid`` equals ``p`` in [0, 1]: ``-inf`` at 0, ``+inf`` at 1.

    ``sigmoid(z) >= p`` iff ``z >= probability_logit(p)``, exact where ``sigmoid`` saturates.
    """
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"a probability threshold must be in [0, 1], got {p!r}")
    if p == 0.0:
        return -math.inf
    if p == 1.0:
        return math.inf
    return math.log(p) - math.log1p(-p)


def p_grid(points: int = 39, denominator: float = 20.0) -> list[float]:
    """The official grid of ratios ``q = p / 20`` for ``p = 1..points`` (IMTA uses 40 points)."""
    return [p / denominator for p in range(1, points + 1)]


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


def fit_thresholds(conf: Tensor, proportions: Tensor, between: bool = False) -> list[float]:
    """Thresholds ``[K]`` so that about ``floor(N P[k])`` held-out samples exit at ``k``.

    Exit ``k`` (in order) takes the ``floor(N P[k])`` most confident samples not yet taken: its
    threshold is that many-th largest confidence among them (ties may let more exit), or with
    ``between`` the midpoint between it and the next one down, so that no held-out sample sits on a
    threshold (where float rounding in another executor could move it across). If the count is 0 or
    fewer samples are left, the threshold is ``+inf`` (nobody exits there). The last threshold is
    ``-inf`` (everything left exits at the last exit).
    """
    num_exits, n = conf.shape
    if proportions.shape[0] != num_exits:
        raise ValueError(f"proportions has {proportions.shape[0]} entries for {num_exits} exits")
    conf = conf.to(torch.float32)
    taken = torch.zeros(n, dtype=torch.bool)
    out: list[float] = []
    for k in range(num_exits - 1):
        n_k = int(math.floor(n * float(proportions[k])))
        free = conf[k][~taken]
        if n_k == 0 or n_k > free.numel():
            t = math.inf
        elif between and n_k < free.numel():
            top = torch.topk(free, n_k + 1).values
            t = 0.5 * (float(top[-2]) + float(top[-1]))
        else:
            t = float(torch.topk(free, n_k).values[-1])
        out.append(t)
        taken |= conf[k] >= t
    out.append(-math.inf)
    return out


def assign_exits(conf: Tensor, thresholds: Sequence[float]) -> Tensor:
    """Exit index ``[N]`` (0-based): the first ``k`` with ``conf[k, i] >= thresholds[k]``."""
    t = torch.tensor(list(thresholds), dtype=torch.float32).view(-1, 1)
    passed = conf.to(torch.float32) >= t
    passed[-1] = True
    return passed.to(torch.int8).argmax(dim=0)


def expected_macs(exit_index: Tensor, costs: Tensor) -> float:
    """Mean cumulative MACs of the exits taken."""
    return float(costs.to(torch.float64)[exit_index].mean())


def thresholds_for_macs(conf: Tensor, costs: Tensor, target_macs: float, iters: int = 60,
                        closest: bool = False) -> list[float]:
    """Direct mode: thresholds whose expected MACs on ``conf``'s split is the largest not above ``target_macs``
    (with ``closest``: the nearest to it, above or below, and thresholds between held-out confidences).

    Searches the geometric proportion family ``q`` by bisection on ``log q``; below the first exit's cost
    everyone exits at exit 1. With ``closest`` the expected MACs need not be monotone in ``q`` (ties,
    whole-sample counts), so a grid of ``q`` is scanned first and the bisection then refines around the
    best grid point.
    """
    costs = costs.to(torch.float64)
    if target_macs < float(costs[0]):
        return [-math.inf] * conf.shape[0]  # everybody at exit 1: the cheapest possible

    def spent(log_q: float) -> tuple[float, list[float]]:
        t = fit_thresholds(conf, exit_proportions(math.exp(log_q), conf.shape[0]), between=closest)
        return expected_macs(assign_exits(conf, t), costs), t

    lo, hi = math.log(1e-4), math.log(1e4)
    if not closest:
        best = [-math.inf] * conf.shape[0]
        for _ in range(iters):
            mid = 0.5 * (lo + hi)
            macs, t = spent(mid)
            if macs <= target_macs:
                best, lo = t, mid
            else:
                hi = mid
        return best
    grid = [lo + (hi - lo) * i / 200 for i in range(201)]
    scored = [(abs(m - target_macs), i, t) for i, (m, t) in enumerate(spent(g) for g in grid)]
    gap, i, best = min(scored, key=lambda r: (r[0], r[1]))
    a, b = grid[max(i - 1, 0)], grid[min(i + 1, len(grid) - 1)]
    for _ in range(iters // 2):  # refine between the neighbours of the best grid point
        mid = 0.5 * (a + b)
        macs, t = spent(mid)
        if abs(macs - target_macs) < gap:
            gap, best = abs(macs - target_macs), t
        if macs <= target_macs:
            a = mid
        else:
            b = mid
    return best


def budget_curve(val_conf: Tensor, test_conf: Tensor, test_correct: Tensor, costs: Tensor,
                 grid: Sequence[float], val_correct: Tensor | None = None,
                 official_float32: bool = False) -> list[dict]:
    """One point per ``q``: thresholds fitted on ``val_conf [K, Nv]``, applied to ``test_conf [K, Nt]``.

    ``test_correct [K, Nt]`` (bool) says whether exit ``k`` is right on test sample ``i``. Returns
    dicts with ``q``, ``thresholds``, ``accuracy`` (%), ``expected_macs``, ``exit_counts`` (test) and,
    with ``val_correct``, ``val_accuracy``.
    """
    num_exits = val_conf.shape[0]
    points = []
    for q in grid:
        t = fit_thresholds(val_conf, exit_proportions(q, num_exits, official_float32))
        idx = assign_exits(test_conf, t)
        acc = test_correct.gather(0, idx.view(1, -1))[0].double().mean().item() * 100
        point = {"q": q, "thresholds": [json_float(v) for v in t], "accuracy": acc,
                 "expected_macs": expected_macs(idx, costs),
                 "exit_counts": np.bincount(idx.numpy(), minlength=num_exits).tolist()}
        if val_correct is not None:
            vidx = assign_exits(val_conf, t)
            point["val_accuracy"] = val_correct.gather(0, vidx.view(1, -1))[0].double().mean().item() * 100
        points.append(point)
    return points


def json_float(v: float) -> float | str:
    """JSON-safe threshold: ``"inf"`` / ``"-inf"`` for infinities."""
    return v if math.isfinite(v) else ("inf" if v > 0 else "-inf")


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
