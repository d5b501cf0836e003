"""Choosing between equivalent computations by timing them on this machine."""

from __future__ import annotations

import time
from typing import Callable, Sequence

import torch
from torch.utils._python_dispatch import _disable_current_modes


def fastest(routes: Sequence[Callable[[], object]], rounds: int = 4) -> int:
    """Index of the fastest of ``routes`` (callables computing the same thing).

    Every route runs ``rounds`` times, interleaved; each keeps its minimum wall time (so the first
    round only warms up); ties go to the earlier route. Runs without autograd and outside any
    enclosing dispatch mode, so a ``FlopCounterMode`` around the caller does not count it.
    """
    best = [float("inf")] * len(routes)
    with _disable_current_modes(), torch.no_grad():
        for _ in range(rounds):
            for i, route in enumerate(routes):
                t0 = time.perf_counter()
                route()
                best[i] = min(best[i], time.perf_counter() - t0)
    return min(range(len(routes)), key=best.__getitem__)
