"""Image transforms on tensors (no torchvision), for one image ``[C,H,W]`` or a batch ``[B,C,H,W]``.

Images enter as ``uint8`` (0..255); geometric transforms keep ``uint8``; :class:`Normalize`
turns them into ``float32`` ``(x / 255 - mean) / std``. Random transforms draw from the
``generator`` they are given, one draw per image, all images of a batch at once: a
:class:`SampleRNG` (one random stream per image: what an image gets depends on its own seed
only, never on the batch it comes in or how many processes share the data set; the data sets
use it), a ``torch.Generator`` (one stream for the batch) or ``None`` (the global torch RNG).
"""

from __future__ import annotations

import math
from typing import Sequence, Union

import numpy as np
import torch
import torch.nn.functional as F

from ponder.data.errors import DataError

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)


def _splitmix64(x: np.ndarray) -> np.ndarray:
    """SplitMix64's output function on ``uint64`` values (wrapping arithmetic)."""
    z = x + _GOLDEN
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


class SampleRNG:
    """One counter-based random stream per image: the ``k``-th number drawn for image ``i``
    depends only on ``(seeds[i], k)``, so an image is augmented the same whether it is fetched
    alone or in any batch, on any rank.

    ``seeds``: one non-negative integer below ``2**64`` per image (the sampler's sample seeds).
    """

    def __init__(self, seeds: Sequence[int]) -> None:
        self._keys = _splitmix64(np.asarray(list(seeds), dtype=np.uint64))
        self._drawn = np.zeros(len(self._keys), dtype=np.uint64)

    def __len__(self) -> int:
        return len(self._keys)

    def uniform(self, index: Sequence[int] | None = None) -> torch.Tensor:
        """``float64 [n]`` in ``[0, 1)``: the next number of every image (or of the images at ``index``)."""
        idx = np.arange(len(self._keys)) if index is None else np.asarray(index, dtype=np.int64)
        bits = _splitmix64(self._keys[idx] ^ _splitmix64(self._drawn[idx]))
        self._drawn[idx] += np.uint64(1)
        return torch.from_numpy((bits >> np.uint64(11)).astype(np.float64) * 2.0**-53)


RandomSource = Union[SampleRNG, torch.Generator, None]


def _rand(n: int, rng: RandomSource, index: Sequence[int] | None = None) -> torch.Tensor:
    """``[n]`` uniform numbers in ``[0, 1)``, one per image (images ``index`` of a :class:`SampleRNG`)."""
    if isinstance(rng, SampleRNG):
        u = rng.uniform(index)
        if u.numel() != n:
            raise DataError(f"a SampleRNG for {u.numel()} images was asked for {n} numbers; give one seed per image")
        return u
    return torch.rand(n, generator=rng, dtype=torch.float64)


def _randint(high: int, n: int, rng: RandomSource, index: Sequence[int] | None = None) -> torch.Tensor:
    """``int64 [n]`` uniform in ``0..high-1``, one per image."""
    return (_rand(n, rng, index) * high).long().clamp_(max=high - 1)

Stats = tuple[tuple[float, ...], tuple[float, ...]]  # (mean, std) per channel, on x / 255

CIFAR_STATS: dict[str, Stats] = {
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
}
IMAGENET_STATS = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))


def normalize_stats(value: Sequence[Sequence[float]] | None, default: Stats) -> Stats:
    """The ``data.normalize`` setting ``[mean, std]`` (one value per channel, on ``x / 255``) as
    ``(mean, std)``, or ``default`` when it is ``None``. ``[[0, 0, 0], [1, 1, 1]]`` feeds raw ``[0, 1]`` pixels."""
    if value is None:
        return default
    try:
        mean, std = (tuple(float(v) for v in part) for part in value)
    except (TypeError, ValueError):
        mean = std = ()
    if not mean or len(mean) != len(std) or min(std) <= 0:
        raise DataError(f"data.normalize must be [mean, std] with one value per channel and std > 0, "
                        f"e.g. [[0.5, 0.5, 0.5], [0.25, 0.25, 0.25]], got {value!r}")
    return mean, std


class Transform:
    """Base class: ``t(x, generator=None)`` maps ``[C,H,W]`` or ``[B,C,H,W]`` to the same rank."""

    def __call__(self, x: torch.Tensor, generator: RandomSource = None) -> torch.Tensor:
        batched = x.dim() == 4
        if x.dim() not in (3, 4):
            raise DataError(f"{type(self).__name__} expects an image [C,H,W] or a batch [B,C,H,W], got shape {tuple(x.shape)}")
        out = self.apply(x if batched else x.unsqueeze(0), generator)
        return out if batched else out.squeeze(0)

    def apply(self, x: torch.Tensor, generator: RandomSource) -> torch.Tensor:
        """Transform a batch ``[B,C,H,W]``."""
        raise NotImplementedError

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v}" for k, v in vars(self).items() if not k.startswith("_"))
        return f"{type(self).__name__}({args})"


class Compose(Transform):
    """Apply transforms in order, all drawing from the same generator."""

    def __init__(self, *transforms: Transform) -> None:
        self.transforms = list(transforms)

    def apply(self, x: torch.Tensor, generator: RandomSource) -> torch.Tensor:
        for t in self.transforms:
            x = t.apply(x, generator)
        return x


class RandomCrop(Transform):
    """Zero-pad by ``padding`` on every side, then crop ``size x size`` at a random offset per image."""

    def __init__(self, size: int, padding: int = 0) -> None:
        self.size, self.padding = size, padding

    def apply(self, x: torch.Tensor, generator: RandomSource) -> torch.Tensor:
        p, s = self.padding, self.size
        if p:
            x = F.pad(x, (p, p, p, p))
        b, c, h, w = x.shape
        if h < s or w < s:
            raise DataError(f"RandomCrop({s}) got a {h - 2 * p}x{w - 2 * p} image padded to {h}x{w}; it is too small")
        dy = _randint(h - s + 1, b, generator)
        dx = _randint(w - s + 1, b, generator)
        ar = torch.arange(s)
        rows = (dy[:, None] + ar)[:, None, :, None]
        cols = (dx[:, None] + ar)[:, None, None, :]
        return x[torch.arange(b)[:, None, None, None], torch.arange(c)[None, :, None, None], rows, cols]


class RandomHorizontalFlip(Transform):
    """Mirror each image left-right with probability ``p``."""

    def __init__(self, p: float = 0.5) -> None:
        self.p = p

    def apply(self, x: torch.Tensor, generator: RandomSource) -> torch.Tensor:
        flip = _rand(x.shape[0], generator) < self.p
        return torch.where(flip[:, None, None, None], x.flip(-1), x)


class Normalize(Transform):
    """``uint8`` image -> ``float32`` ``(x / 255 - mean) / std`` per channel."""

    def __init__(self, mean: Sequence[float], std: Sequence[float]) -> None:
        self.mean, self.std = tuple(mean), tuple(std)
        self._shift = torch.tensor(self.mean).mul(255.0).view(1, -1, 1, 1)
        self._scale = 1.0 / torch.tensor(self.std).mul(255.0).view(1, -1, 1, 1)

    def apply(self, x: torch.Tensor, generator: RandomSource) -> torch.Tensor:
        if x.dtype != torch.uint8:
            raise DataError(f"Normalize expects uint8 images (0..255), got {x.dtype}; put it last in the pipeline")
        if x.shape[1] != self._shift.shape[1]:
            raise DataError(f"Normalize has {self._shift.shape[1]} channel statistics but the image has {x.shape[1]} channels")
        return (x.to(torch.float32) - self._shift) * self._scale


def _resize(x: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """Bilinear (antialiased) resize of a ``uint8`` batch, rounded back to ``uint8``."""
    y = F.interpolate(x.float(), size=(h, w), mode="bilinear", align_corners=False, antialias=True)
    return y.round_().clamp_(0, 255).to(torch.uint8)


class Resize(Transform):
    """Resize so the shorter side is ``size`` (aspect ratio kept, longer side truncated to int)."""

    def __init__(self, size: int) -> None:
        self.size = size

    def apply(self, x: torch.Tensor, generator: RandomSource) -> torch.Tensor:
        h, w = x.shape[-2:]
        if h <= w:
            return _resize(x, self.size, int(self.size * w / h))
        return _resize(x, int(self.size * h / w), self.size)


class CenterCrop(Transform):
    """Crop the central ``size x size`` window (zero-padded first when the image is smaller)."""

    def __init__(self, size: int) -> None:
        self.size = size

    def apply(self, x: torch.Tensor, generator: RandomSource) -> torch.Tensor:
        s = self.size
        h, w = x.shape[-2:]
        if h < s or w < s:
            ph, pw = max(s - h, 0), max(s - w, 0)
            x = F.pad(x, (pw // 2, pw - pw // 2, ph // 2, ph - ph // 2))
            h, w = x.shape[-2:]
        top, left = int(round((h - s) / 2.0)), int(round((w - s) / 2.0))
        return x[..., top : top + s, left : left + s]


class RandomResizedCrop(Transform):
    """Crop a random area fraction in ``scale`` with aspect ratio in ``ratio`` (log-uniform), resize to ``size``.

    Ten tries for a window that fits; otherwise the whole image, center-cropped to the nearest
    allowed aspect ratio (the usual Inception-style recipe).
    """

    def __init__(self, size: int, scale: tuple[float, float] = (0.08, 1.0), ratio: tuple[float, float] = (3 / 4, 4 / 3)) -> None:
        self.size, self.scale, self.ratio = size, tuple(scale), tuple(ratio)

    def window(self, h: int, w: int, generator: RandomSource, index: int | None = None) -> tuple[int, int, int, int]:
        """``(top, left, height, width)`` of one random crop of an ``h x w`` image (image ``index``
        of a :class:`SampleRNG`)."""
        area = h * w
        log_lo, log_hi = math.log(self.ratio[0]), math.log(self.ratio[1])
        at = None if index is None else [index]
        for _ in range(10):
            u0, u1 = float(_rand(1, generator, at)), float(_rand(1, generator, at))
            target = area * (self.scale[0] + u0 * (self.scale[1] - self.scale[0]))
            aspect = math.exp(log_lo + u1 * (log_hi - log_lo))
            cw, ch = round(math.sqrt(target * aspect)), round(math.sqrt(target / aspect))
            if 0 < cw <= w and 0 < ch <= h:
                top = int(_randint(h - ch + 1, 1, generator, at))
                left = int(_randint(w - cw + 1, 1, generator, at))
                return top, left, ch, cw
        aspect = w / h
        if aspect < self.ratio[0]:
            cw, ch = w, round(w / self.ratio[0])
        elif aspect > self.ratio[1]:
            ch, cw = h, round(h * self.ratio[1])
        else:
            cw, ch = w, h
        return (h - ch) // 2, (w - cw) // 2, ch, cw

    def apply(self, x: torch.Tensor, generator: RandomSource) -> torch.Tensor:
        h, w = x.shape[-2:]
        out = []
        for i, img in enumerate(x):
            top, left, ch, cw = self.window(h, w, generator, i if isinstance(generator, SampleRNG) else None)
            out.append(_resize(img[None, :, top : top + ch, left : left + cw], self.size, self.size))
        return torch.cat(out)


def cifar_transforms(name: str, train: bool, stats: Sequence[Sequence[float]] | None = None) -> Transform:
    """CIFAR-10/100: train = pad-4 random crop 32 + horizontal flip + normalize; eval = normalize.

    ``stats``: ``[mean, std]`` in place of the data set's own (see :func:`normalize_stats`).
    """
    if name not in CIFAR_STATS:
        raise DataError(f"no CIFAR statistics for {name!r}; valid: {', '.join(CIFAR_STATS)}")
    norm = Normalize(*normalize_stats(stats, CIFAR_STATS[name]))
    return Compose(RandomCrop(32, padding=4), RandomHorizontalFlip(), norm) if train else Compose(norm)


def imagenet_transforms(train: bool, size: int = 224, resize: int = 256,
                        stats: Sequence[Sequence[float]] | None = None) -> Transform:
    """ImageNet: train = random-resized-crop ``size`` + flip + normalize; eval = resize ``resize`` + center crop ``size``.

    ``stats``: ``[mean, std]`` in place of the ImageNet statistics (see :func:`normalize_stats`).
    """
    norm = Normalize(*normalize_stats(stats, IMAGENET_STATS))
    if train:
        return Compose(RandomResizedCrop(size), RandomHorizontalFlip(), norm)
    return Compose(Resize(resize), CenterCrop(size), norm)
