"""Latency / throughput harness: static models, and dense vs dynamic executors.

Timing: warm-up calls, then ``repeats`` rounds in which every timed function runs once
(interleaved, so drift and noise hit all of them alike); the figure is the median.
``ponder bench`` first calls :func:`keep_freed_memory`, so that the figures measure kernels,
not the page faults of memory the allocator hands back to the OS and maps again.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import statistics
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from typing import Any, Callable, Iterator, Sequence

import torch
import torch.nn as nn
from torch import Tensor

from ponder.cost import count_macs
from ponder.models.base import DynamicModel, PonderModel
from ponder.nn.executor import set_executor


@contextmanager
def torch_threads(threads: int | None) -> Iterator[None]:
    """Temporarily set ``torch.set_num_threads``."""
    old = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(old)


_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc mallopt parameters


def keep_freed_memory() -> bool:
    """Make glibc's malloc keep freed memory in this process (trim threshold 1 GiB, mmap threshold 32 MiB).

    By default glibc maps each large block (activations of a batch) freshly and returns it on free,
    so every forward pass pays a page fault per 4 KiB it touches: on this project's CPU 15,000
    faults and about a quarter of the time of a dense MSDNet batch of 64, varying from run to run.
    Returns False (and changes nothing) where the C library is not glibc. Process-wide; the same
    setting (or jemalloc / tcmalloc) is worth having in any CPU inference server.
    """
    name = ctypes.util.find_library("c")
    try:
        mallopt = ctypes.CDLL(name).mallopt if name else None
    except (OSError, AttributeError):
        mallopt = None
    if mallopt is None:
        return False
    return bool(mallopt(_M_MMAP_THRESHOLD, 32 << 20)) and bool(mallopt(_M_TRIM_THRESHOLD, 1 << 30))


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_rounds(fns: dict[str, Callable[[], Any]], repeats: int = 10, warmup: int = 2,
                device: torch.device | str = "cpu") -> dict[str, list[float]]:
    """Wall-clock milliseconds of each zero-argument function in each of ``repeats`` interleaved rounds."""
    device = torch.device(device)
    times: dict[str, list[float]] = {k: [] for k in fns}
    with torch.inference_mode():
        for _ in range(warmup):
            for fn in fns.values():
                fn()
        for _ in range(repeats):
            for name, fn in fns.items():
                _sync(device)
                t0 = time.perf_counter()
                fn()
                _sync(device)
                times[name].append((time.perf_counter() - t0) * 1e3)
    return times


def time_interleaved(fns: dict[str, Callable[[], Any]], repeats: int = 10, warmup: int = 2,
                     device: torch.device | str = "cpu") -> dict[str, float]:
    """Median wall-clock milliseconds of each zero-argument function, interleaved rounds (:func:`time_rounds`)."""
    return {k: statistics.median(v) for k, v in time_rounds(fns, repeats, warmup, device).items()}


@dataclass
class StaticBench:
    model: str
    batch: int
    threads: int
    ms: float            # median over rounds, per batch
    images_per_s: float
    macs: int
    # fastest and slowest single round (ms per batch): how noisy ``ms`` is
    ms_range: tuple[float, float] = (0.0, 0.0)


@dataclass
class DynamicBench:
    model: str
    batch: int
    threads: int
    mode: str            # "keep-rate r" or "checkpoint"
    dense_ms: float      # per batch, dense baseline network
    dynamic_ms: float    # per batch, dynamic model on its sparse executor
    masked_ms: float | None  # per batch, masked executor (never use for speed)
    speedup: float       # dense_ms / dynamic_ms
    dense_macs: int      # per image
    dynamic_macs: float  # mean per image (decision cost included)
    dynamic_macs_std: float
    mac_ratio: float     # dense_macs / dynamic_macs: the ideal speed-up
    efficiency: float    # speedup / mac_ratio
    images_per_s: float
    # lowest and highest dense/dynamic time ratio of one interleaved round: how noisy ``speedup`` is
    speedup_range: tuple[float, float]
    # the dense network run with the sparse executor's own kernels (``dense_baseline_kernels()``;
    # None for models whose dense baseline already runs on them): the speed-up owed to sparsity alone
    dense_kernels_ms: float | None = None
    speedup_vs_kernels: float | None = None
    efficiency_vs_kernels: float | None = None
    speedup_vs_kernels_range: tuple[float, float] | None = None


def bench_static(model: nn.Module, name: str, batch: int, input_size: Sequence[int], threads: int,
                 repeats: int = 10, warmup: int = 2, device: str = "cpu") -> StaticBench:
    """Median ms per batch of ``model`` on random inputs ``[batch, *input_size]``."""
    model = model.eval().to(device)
    x = torch.randn(batch, *input_size, device=device)
    with torch_threads(threads):
        rounds = time_rounds({"model": lambda: model(x)}, repeats, warmup, device)["model"]
        used = torch.get_num_threads()
    ms = statistics.median(rounds)
    macs = model.ledger(tuple(input_size)).total if isinstance(model, PonderModel) else count_macs(model, x[:1])
    return StaticBench(name, batch, used, ms, batch / ms * 1e3, macs, (min(rounds), max(rounds)))


def bench_dynamic(model: nn.Module, name: str, batches: list[Tensor], threads: int, mode: str,
                  repeats: int = 10, warmup: int = 2, with_masked: bool = True,
                  device: str = "cpu") -> DynamicBench:
    """Dense baseline vs the dynamic model's sparse (and masked) executor on the same ``batches``.

    Written against the :class:`~ponder.models.base.DynamicModel` contract: ``dense_baseline()``; its
    decisions are whatever it is configured with (``force_keep_rate``, or the learned decisions at its
    knob or budget). A model whose sparse executor runs other kernels than its plain dense network also
    has a ``dense_baseline_kernels()`` (the dense network on those kernels); it is timed too.
    """
    if not isinstance(model, DynamicModel):
        raise ValueError(f"{name} is a static model: --keep-rate and --checkpoint need a dynamic model")
    model = model.eval().to(device)
    dense = model.dense_baseline().eval().to(device)
    batches = [b.to(device) for b in batches]

    def run(m: nn.Module) -> Callable[[], None]:
        return lambda: [m(b) for b in batches]

    with torch_threads(threads), torch.inference_mode():
        set_executor(model, "sparse")
        macs = torch.cat([model(b).macs for b in batches]).double()
        fns = {"dense": run(dense), "sparse": run(model)}
        kernels_net = model.dense_baseline_kernels()
        if kernels_net is not None:
            fns["kernels"] = run(kernels_net.eval().to(device))
        rounds = time_rounds(fns, repeats, warmup, device)
        ms = {k: statistics.median(v) for k, v in rounds.items()}
        masked_ms = None
        if with_masked:
            set_executor(model, "masked")
            masked_ms = time_interleaved({"masked": run(model)}, max(3, repeats // 2), 1, device)["masked"]
            set_executor(model, "sparse")
    n = len(batches)
    dense_macs = model.dense_macs(tuple(batches[0].shape[1:]))
    dyn = float(macs.mean())
    speedup = ms["dense"] / ms["sparse"]
    mac_ratio = dense_macs / dyn
    kernels = ms.get("kernels")
    return DynamicBench(
        model=name, batch=batches[0].shape[0], threads=threads or torch.get_num_threads(), mode=mode,
        dense_ms=ms["dense"] / n, dynamic_ms=ms["sparse"] / n,
        masked_ms=None if masked_ms is None else masked_ms / n, speedup=speedup, dense_macs=dense_macs,
        dynamic_macs=dyn, dynamic_macs_std=float(macs.std(unbiased=False)), mac_ratio=mac_ratio,
        efficiency=speedup / mac_ratio, images_per_s=batches[0].shape[0] / (ms["sparse"] / n) * 1e3,
        speedup_range=_ratio_extremes(rounds["dense"], rounds["sparse"]),
        dense_kernels_ms=None if kernels is None else kernels / n,
        speedup_vs_kernels=None if kernels is None else kernels / ms["sparse"],
        efficiency_vs_kernels=None if kernels is None else kernels / ms["sparse"] / mac_ratio,
        speedup_vs_kernels_range=None if kernels is None else _ratio_extremes(rounds["kernels"], rounds["sparse"]),
    )


def _ratio_extremes(base_ms: list[float], dynamic_ms: list[float]) -> tuple[float, float]:
    """Lowest and highest ``base / dynamic`` time ratio of a single interleaved round."""
    ratios = [b / d for b, d in zip(base_ms, dynamic_ms)]
    return min(ratios), max(ratios)


def as_dict(result: StaticBench | DynamicBench) -> dict[str, Any]:
    return asdict(result)
