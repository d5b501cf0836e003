"""Offline demo data: scikit-learn's handwritten digits (1,797 8x8 grayscale images, 10 classes).

The file ``sklearn/datasets/data/digits.csv.gz`` ships inside scikit-learn (``pip install
ponder[demo]``), so nothing is downloaded; it is read directly (scikit-learn itself is not
imported). Pixel values 0..16 are scaled to ``uint8`` 0..255 and upsampled 2x with nearest
neighbour to ``[1,16,16]`` (each pixel becomes an exact 2x2 block: no invented values).
The train/test split (1,397 / 400) is fixed by :data:`DIGITS_SPLIT_SEED`, not by the run seed,
so every run is scored on the same 400 test images.
"""

from __future__ import annotations

import gzip
import importlib.util
from pathlib import Path

import numpy as np
import torch

from ponder.data.errors import DataError
from ponder.data.transforms import Compose, Normalize, RandomCrop, Transform

DIGITS_TEST_SIZE = 400
DIGITS_SPLIT_SEED = 0
DIGITS_CLASSES = [str(i) for i in range(10)]


def digits_file() -> Path:
    """Path of ``digits.csv.gz`` inside the installed scikit-learn."""
    spec = importlib.util.find_spec("sklearn")
    if spec is None or spec.origin is None:
        raise DataError("the digits demo data set ships with scikit-learn, which is not installed; install it with: pip install ponder[demo]")
    path = Path(spec.origin).parent / "datasets" / "data" / "digits.csv.gz"
    if not path.is_file():
        raise DataError(f"{path} is missing from the installed scikit-learn; reinstall it with: pip install --force-reinstall scikit-learn")
    return path


def load_digits() -> tuple[torch.Tensor, torch.Tensor]:
    """All 1,797 digits: images ``uint8 [N,1,16,16]`` (0..255) and labels ``int64 [N]``."""
    path = digits_file()
    try:
        with gzip.open(path, "rt") as f:
            table = np.loadtxt(f, delimiter=",", dtype=np.float64)
    except (OSError, ValueError, EOFError) as e:
        raise DataError(f"{path} could not be read ({e}); reinstall scikit-learn") from None
    if table.ndim != 2 or table.shape[1] != 65:
        raise DataError(f"{path} is malformed: expected 65 columns (64 pixels + label), got shape {table.shape}")
    pixels = np.rint(table[:, :64] * (255.0 / 16.0)).clip(0, 255).astype(np.uint8).reshape(-1, 1, 8, 8)
    images = torch.from_numpy(pixels).repeat_interleave(2, dim=2).repeat_interleave(2, dim=3)
    return images.contiguous(), torch.from_numpy(table[:, 64].astype(np.int64))


def digits_split(n: int, test_size: int = DIGITS_TEST_SIZE, seed: int = DIGITS_SPLIT_SEED) -> tuple[torch.Tensor, torch.Tensor]:
    """Fixed ``(train_idx, test_idx)`` of the digits (sorted, disjoint)."""
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    return perm[test_size:].sort().values, perm[:test_size].sort().values


def digits_stats(images: torch.Tensor) -> tuple[tuple[float], tuple[float]]:
    """Mean and std (0..1 scale) of ``uint8 [N,1,H,W]`` images, for :class:`Normalize`."""
    x = images.double() / 255.0
    return (float(x.mean()),), (float(x.std()),)


def digits_transforms(train: bool, mean: tuple[float], std: tuple[float]) -> Transform:
    """Train: random shift by up to 2 pixels (pad 2 + crop 16; 1 pixel of the 8x8 original) + normalize.

    No flip: digits are not mirror-invariant. Eval: normalize.
    """
    norm = Normalize(mean, std)
    return Compose(RandomCrop(16, padding=2), norm) if train else Compose(norm)
