"""Forced decisions for benchmarks: a pure function of (seed, sample, unit), the same in every executor.

``force_keep_rate(rate, seed)`` replaces a dynamic model's learned decisions by random ones that keep a
fraction ``rate`` of the units (blocks, exits, positions), to time executors on untrained models.
Every family draws them here, from a hash of each sample's *content* (:func:`sample_keys`), so a
sample gets the same decisions whichever batch it is in, in whichever executor, in whichever call:
nothing advances between calls.

- :func:`keep_matrix` ``[B, units]``: keep unit ``u`` iff its uniform number is ``< rate``
  (blocks of a skipping model; "continue past exit k" of an early-exit model);
- :func:`keep_uniform` the same number for one sample on the host (the batch-1 early-exit test);
- :func:`keep_map` ``[B, H, W]``: spatially coherent blobs covering ``round(rate * H * W)`` positions
  of each sample, like the regions SACT and DynConv keep active.
"""

from __future__ import annotations

import functools
import weakref
from collections import OrderedDict

import torch
import torch.nn.functional as F
from torch import Tensor

PRIME = 2_147_483_647  # 2^31 - 1: modulus of the per-sample hash
HASHED_VALUES = 1024  # values of a sample the hash reads (evenly spaced)


def sample_keys(x: Tensor) -> Tensor:
    """A deterministic integer hash ``[B]`` (int64 in ``[0, 2^31-1)``) of each sample's content ``x [B, ...]``.

    Computed exactly in integer arithmetic, so a sample gets the same key whatever batch it
    is in and whichever executor runs it. Reads at most :data:`HASHED_VALUES` evenly spaced values of
    each sample (enough to tell real images apart; a 224 px image costs what a 32 px one does). The keys of the
    last input are kept while it lives unchanged (a benchmark times the same batches again and again).
    """
    if x.is_inference():  # (no version counter to tell an unchanged tensor: hashed every time)
        return _hash_samples(x)
    last = _LAST_KEYS[0]
    if last is not None and last[0]() is x and last[1] == x._version:  # the same batch again (a benchmark)
        return last[2]
    keys = _hash_samples(x)
    _LAST_KEYS[0] = (weakref.ref(x), x._version, keys)
    return keys


_LAST_KEYS: list = [None]  # (weak reference to the last input, its version, its keys)


def _hash_samples(x: Tensor) -> Tensor:
    flat = x.detach().reshape(x.shape[0], -1)
    step = max(1, flat.shape[1] // HASHED_VALUES)
    bits = flat[:, ::step].float().contiguous().view(torch.int32).to(torch.int64)
    bits = bits & 0xFFFFFFFF
    coeff = _hash_coefficients(bits.shape[1], x.device)
    return ((bits % PRIME) * coeff % PRIME).sum(1) % PRIME


@functools.lru_cache(maxsize=8)
def _hash_coefficients(n: int, device: torch.device) -> Tensor:
    gen = torch.Generator().manual_seed(0x5EED)
    return torch.randint(1, PRIME, (n,), generator=gen, dtype=torch.int64).to(device)


@functools.lru_cache(maxsize=1024)
def _coefficients(seed: int, unit: int) -> tuple[int, int]:
    gen = torch.Generator().manual_seed(seed * 1_000_003 + unit)
    a, b = (int(v) for v in torch.randint(1, PRIME, (2,), generator=gen))
    return a, b


@functools.lru_cache(maxsize=64)
def _coefficient_rows(seed: int, first: int, count: int, device: torch.device) -> tuple[Tensor, Tensor]:
    pairs = [_coefficients(seed, first + u) for u in range(count)]
    return (torch.tensor([p[0] for p in pairs], dtype=torch.int64, device=device),
            torch.tensor([p[1] for p in pairs], dtype=torch.int64, device=device))


def keep_uniforms(keys: Tensor, unit: int, seed: int) -> Tensor:
    """Uniform numbers ``[B]`` (float64 in ``[0, 1)``) for ``keys [B]``, one unit and seed."""
    a, b = _coefficients(int(seed), unit)
    return ((keys * a + b) % PRIME).double() / PRIME


def keep_uniform(key: int, unit: int, seed: int) -> float:
    """:func:`keep_uniforms` of one key, on the host: the same float64 (integers below 2^53, one
    correctly rounded division)."""
    a, b = _coefficients(int(seed), unit)
    return ((key * a + b) % PRIME) / PRIME


def keep_matrix(keys: Tensor, units: int, rate: float, seed: int, first: int = 0) -> Tensor:
    """Forced keep decisions ``[B, units]`` (bool): unit ``first + u`` is kept iff its uniform number is
    ``< rate`` (so ``rate`` 0 keeps nothing and 1 everything)."""
    a, b = _coefficient_rows(int(seed), first, units, keys.device)
    return ((keys[:, None] * a + b) % PRIME).double() / PRIME < rate


_MAPS: OrderedDict = OrderedDict()  # memo of keep_map: a pure function, asked again for every batch timed
MAPS_KEPT = 32


def keep_map(keys: Tensor, shape: tuple[int, int], rate: float, seed: int, unit: int, cell: int = 4) -> Tensor:
    """Forced active positions ``[B, H, W]`` (bool): ``round(rate * H * W)`` per sample, in coherent blobs.

    Smooth noise (a uniform number per ``cell x cell`` cell and sample, bilinearly upsampled, plus a
    tiny per-position term that breaks ties), thresholded at each sample's ``1 - rate`` quantile. The
    last :data:`MAPS_KEPT` results are kept (benchmarks time the same batches again and again).
    """
    memo = (keys.cpu().numpy().tobytes(), tuple(shape), float(rate), int(seed), int(unit), cell, str(keys.device))
    hit = _MAPS.get(memo)
    if hit is None:
        hit = _MAPS[memo] = _keep_map(keys, shape, rate, seed, unit, cell)
        if len(_MAPS) > MAPS_KEPT:
            _MAPS.popitem(last=False)
    return hit


def _keep_map(keys: Tensor, shape: tuple[int, int], rate: float, seed: int, unit: int, cell: int) -> Tensor:
    H, W = shape
    k = int(round(rate * H * W))
    if k <= 0:
        return torch.zeros(keys.shape[0], H, W, dtype=torch.bool, device=keys.device)
    h, w = max(H // cell, 1), max(W // cell, 1)
    base = 1 + 2 * int(unit)
    low = _uniform_grid(keys, seed, base * 65_537, h * w).view(-1, 1, h, w).float()
    smooth = F.interpolate(low, size=(H, W), mode="bilinear", align_corners=False)[:, 0]
    smooth = smooth + 1e-4 * _uniform_grid(keys, seed, (base + 1) * 65_537, H * W).view(-1, H, W).float()
    thresh = smooth.flatten(1).topk(k, dim=1).values[:, -1:, None]
    return smooth >= thresh


def _uniform_grid(keys: Tensor, seed: int, first: int, count: int) -> Tensor:
    """``[B, count]`` float64 uniforms for units ``first .. first + count - 1``."""
    a, b = _coefficient_rows(int(seed), first, count, keys.device)
    return ((keys[:, None] * a + b) % PRIME).double() / PRIME
