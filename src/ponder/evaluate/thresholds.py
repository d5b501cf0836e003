"""Exit thresholds for budgeted batch classification (the official MSDNet procedure, vectorized).

Tables are ``conf [K, N]``: the max-softmax of exit ``k`` for sample ``i``; ``costs [K]`` are the
cumulative MACs of each exit. Thresholds are fitted on a held-out split and applied to the test set.
The exit proportions ``P[k]`` themselves come from :mod:`ponder.budget`.
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import torch
from torch import Tensor

from ponder.budget import exit_proportions


def p_grid(points: int = 39, denominator: float = 20.0) -> list[float]:
    """The official grid of ratios ``q = p / 20`` for ``p = 1..points`` (IMTA uses 40 points)."""
    return [p / denominator for p in range(1, points + 1)]


def fit_thresholds(conf: Tensor, proportions: Tensor) -> list[float]:
    """Thresholds ``[K]`` so that about ``floor(N P[k])`` held-out samples exit at ``k``.

    Exit ``k`` (in order) takes the ``floor(N P[k])`` most confident samples not yet taken: its
    threshold is that many-th largest confidence among them (ties may let more exit). If the count
    is 0 or fewer samples are left, the threshold is ``+inf`` (nobody exits there). The last
    threshold is ``-inf`` (everything left exits at the last exit).
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


def thresholds_for_macs(conf: Tensor, costs: Tensor, target_macs: float, iters: int = 60) -> list[float]:
    """Direct mode: thresholds whose expected MACs on ``conf``'s split is the largest not above ``target_macs``.

    Searches the geometric proportion family ``q`` by bisection on ``log q``; below the first
    exit's cost everyone exits at exit 1.
    """
    costs = costs.to(torch.float64)
    lo, hi = math.log(1e-4), math.log(1e4)
    best = [-math.inf] * conf.shape[0]  # everybody at exit 1: the cheapest possible
    if target_macs < float(costs[0]):
        return best
    for _ in range(iters):
        mid = 0.5 * (lo + hi)
        t = fit_thresholds(conf, exit_proportions(math.exp(mid), conf.shape[0]))
        if expected_macs(assign_exits(conf, t), costs) <= target_macs:
            best, lo = t, mid
        else:
            hi = mid
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
