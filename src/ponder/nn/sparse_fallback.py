"""Measured break-even of the sparse executor: above it, a unit runs densely.

The sparse kernel pays gather/scatter and index overheads, so below some amount of work it is
slower than the dense conv. The break-even is expressed as a **work fraction** (the unit's sparse
branch MACs over its dense branch MACs, dilation included: see
:func:`ponder.nn.sparse_units.work_fraction`), which makes it nearly independent of how the mask
is shaped. :func:`calibrate_break_even` times the dense unit and the sparse unit at three
densities on this device, fits ``t_sparse = a + b * work`` and solves ``t_sparse = t_dense``; the
result is a stored route (:func:`ponder.fast.decide`) per (unit shape, input shape, memory format,
dtype, device, thread count): decided once per machine, the same in every process.
"""

from __future__ import annotations

import time
from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils._python_dispatch import _disable_current_modes

from ponder import fast
from ponder.layout import is_channels_last
from ponder.nn.sparse_units import dense_fallback, first_conv_mask, output_hw, run_sparse, unit_info, work_fraction
from ponder.nn.protocols import ResidualBlock


CALIBRATION_DENSITIES = (0.1, 0.35, 0.6)


def break_even_key(block: ResidualBlock, x: Tensor, inactive: str) -> tuple:
    """Route key: unit signature (conv shapes), input shape, layout, dtype, device, threads."""
    layout = is_channels_last(x)
    return (unit_info(block).signature, tuple(x.shape), layout, x.dtype, x.device, torch.get_num_threads(),
            inactive)


def coherent_mask(shape: tuple[int, int, int], density: float, generator: torch.Generator,
                  cell: int = 4, device: torch.device | str = "cpu") -> Tensor:
    """A spatially coherent random ``[B, H, W]`` bool mask with about ``density`` active positions.

    Smooth noise (uniform on a grid of ``cell``-pixel cells, bilinearly upsampled) thresholded at
    its ``1 - density`` quantile per sample: blobs like the regions SACT/DynConv keep active.
    """
    B, H, W = shape
    low = torch.rand(B, 1, max(H // cell, 1), max(W // cell, 1), generator=generator)
    smooth = F.interpolate(low, size=(H, W), mode="bilinear", align_corners=False)[:, 0]
    smooth = smooth + 1e-4 * torch.rand(B, H, W, generator=generator)  # break ties
    k = int(round(density * H * W))
    if k <= 0:
        return torch.zeros(B, H, W, dtype=torch.bool, device=device)
    thresh = smooth.flatten(1).topk(k, dim=1).values[:, -1:, None]
    return (smooth >= thresh).to(device)


def _timed(fn: Callable[[], object], device: torch.device) -> float:
    """Seconds one call takes: this thread's CPU time when single-threaded on CPU (robust to other
    processes sharing the host), else wall-clock time with device synchronisation."""
    single_cpu = device.type == "cpu" and torch.get_num_threads() == 1
    clock = time.thread_time if single_cpu else time.perf_counter
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    t0 = clock()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return clock() - t0


def calibrate_break_even(block: ResidualBlock, x: Tensor, inactive: str = "shortcut", reps: int = 5,
                         densities: tuple[float, ...] = CALIBRATION_DENSITIES, margin: float = 0.95) -> float:
    """Measured work fraction in [0, 1] below which the sparse unit beats the dense one on ``x``'s shape.

    Times the dense fall-back and the sparse kernel at ``densities`` (coherent masks), interleaved,
    ``reps`` rounds, keeping each one's minimum; fits ``t = a + b * work`` to the sparse times and
    returns the work at which ``t = margin * t_dense`` (the margin keeps noise from choosing a
    sparse run that is not clearly faster). Runs on random data of ``x``'s shape, layout and
    device (``x`` itself is not used); global RNG and any active ``FlopCounterMode`` are untouched.
    Not cached: see :func:`break_even_for`.
    """
    g = torch.Generator().manual_seed(0)
    with _disable_current_modes(), torch.no_grad():
        data = torch.randn(x.shape, generator=g).relu_().to(device=x.device, dtype=x.dtype)
        if is_channels_last(x):
            data = data.contiguous(memory_format=torch.channels_last)
        hw = (int(x.shape[2]), int(x.shape[3]))
        ho, wo = output_hw(block, hw)
        full = torch.ones(x.shape[0], ho, wo, dtype=torch.bool, device=x.device)
        runs: list[Callable[[], object]] = [lambda: dense_fallback(block, data, full, inactive)]
        works = []
        for d in densities:
            m = coherent_mask((x.shape[0], ho, wo), d, g, device=x.device)
            first = first_conv_mask(block, m, hw)
            works.append(work_fraction(block, int(first.sum()), int(m.sum()), first.numel(), m.numel()))
            # the sparse path pays for its dilated mask; the dense one does not need it
            runs.append(lambda m=m: run_sparse(block, data, m, first_conv_mask(block, m, hw), inactive))
        for run in runs:  # warm-up (allocator, folded weights)
            run()
        best = [float("inf")] * len(runs)
        for _ in range(reps):
            for i, run in enumerate(runs):
                best[i] = min(best[i], _timed(run, x.device))
    t_dense, times = margin * best[0], best[1:]
    w, t = torch.tensor(works, dtype=torch.float64), torch.tensor(times, dtype=torch.float64)
    slope = float(((w - w.mean()) * (t - t.mean())).sum() / ((w - w.mean()) ** 2).sum().clamp_min(1e-12))
    icpt = float(t.mean()) - slope * float(w.mean())
    if slope <= 0:  # noise swamped the trend: trust the measured points only
        return float(max((wi for wi, ti in zip(works, times) if ti < t_dense), default=0.0))
    return float(min(max((t_dense - icpt) / slope, 0.0), 1.0))


def break_even_for(block: ResidualBlock, x: Tensor, inactive: str = "shortcut") -> float:
    """:func:`calibrate_break_even` for this unit and input shape: a stored route, measured once per machine."""
    return float(fast.decide("break_even", break_even_key(block, x, inactive),
                             lambda: calibrate_break_even(block, x, inactive)))
