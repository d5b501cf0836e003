"""ImageFolder: ``root/<class>/**/<image>``, class indices identical to torchvision's.

Classes are the sorted sub-folder names (index = position); each class folder is walked
recursively in sorted order (links followed) and files with an image extension (any case)
are kept. Images are decoded with Pillow (``pip install ponder[images]``) to RGB ``uint8 [3,H,W]``.

A file that cannot be decoded (corrupt, truncated, a decompression bomb) raises a
:class:`DataError` naming it. Fetched in batches by a data loader (``__getitems__``, in loader
worker processes too) such a file comes back as a :class:`BadImage` in place of its sample, so
that the main process can stop with that one sentence or skip it
(see :func:`ponder.data.loaders.collate_samples`).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from ponder.data.errors import DataError
from ponder.data.transforms import SampleRNG, Transform

IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")


def find_classes(root: str | Path) -> tuple[list[str], dict[str, int]]:
    """Sorted class folder names under ``root`` and their indices."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"image folder {root} does not exist; pass --data-dir pointing at a folder with train/ and val/ inside")
    classes = sorted(e.name for e in os.scandir(root) if e.is_dir())
    if not classes:
        raise DataError(f"image folder {root} has no class sub-folders; put each class's images in root/<class>/")
    return classes, {c: i for i, c in enumerate(classes)}


def make_samples(root: str | Path, class_to_idx: dict[str, int], extensions: Sequence[str] = IMG_EXTENSIONS) -> list[tuple[str, int]]:
    """``(path, class index)`` for every image, class by class, files in sorted walk order."""
    exts = tuple(e.lower() for e in extensions)
    samples, empty = [], []
    for cls in sorted(class_to_idx, key=class_to_idx.__getitem__):
        folder = os.path.join(root, cls)
        found = [
            (os.path.join(dirpath, f), class_to_idx[cls])
            for dirpath, _, files in sorted(os.walk(folder, followlinks=True))
            for f in sorted(files)
            if f.lower().endswith(exts)
        ]
        if not found:
            empty.append(cls)
        samples += found
    if empty:
        raise DataError(f"image folder {root} has no {'/'.join(exts)} images for class(es) {', '.join(empty)}; remove the empty folders")
    return samples


SKIP_HINT = "or set data.skip_bad_images=true to skip unreadable images"


@dataclass(frozen=True)
class BadImage:
    """Stands in a batch for an image that could not be decoded: its file and the one-sentence reason."""

    path: str
    message: str


def decode_image(path: str) -> torch.Tensor:
    """Decode an image file to RGB ``uint8 [3,H,W]`` with Pillow; a bad file raises :class:`DataError` naming it."""
    try:
        from PIL import Image
    except ImportError:
        raise DataError("reading image folders needs Pillow; install it with: pip install ponder[images]") from None
    try:
        with Image.open(path) as im:
            arr = np.asarray(im.convert("RGB"), dtype=np.uint8)
    except Image.DecompressionBombError as e:
        raise DataError(f"{path} is refused as a decompression bomb ({e}); remove it, {SKIP_HINT}, or raise "
                        f"PIL.Image.MAX_IMAGE_PIXELS if the image is genuine") from None
    except (OSError, SyntaxError, ValueError) as e:  # Pillow's errors for corrupt and truncated files
        reason = str(e).splitlines()[0] if str(e).strip() else type(e).__name__
        raise DataError(f"{path} is not a readable image ({reason}); remove or replace it, {SKIP_HINT}") from None
    return torch.from_numpy(arr.copy()).permute(2, 0, 1).contiguous()


class ImageFolder(Dataset):
    """Images decoded on access; ``dataset[i] -> (float or uint8 [3,H,W], label)``.

    A key may be an index or ``(index, seed)`` (what :class:`ponder.data.EpochSampler` yields):
    a seed makes the random transform of that sample reproducible.
    """

    def __init__(self, root: str | Path, transform: Transform | None = None, classes: list[str] | None = None,
                 extensions: Sequence[str] = IMG_EXTENSIONS, samples: list[tuple[str, int]] | None = None) -> None:
        self.root = Path(root)
        self.transform = transform
        if classes is None:
            classes, _ = find_classes(self.root)
        self.classes = list(classes)
        self.class_to_idx = {c: i for i, c in enumerate(self.classes)}
        self.samples = samples if samples is not None else make_samples(self.root, self.class_to_idx, extensions)
        self.targets = torch.tensor([s[1] for s in self.samples], dtype=torch.int64)

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, key: Any) -> tuple[torch.Tensor, int]:
        index, seed = key if isinstance(key, tuple) else (key, None)
        path, label = self.samples[index]
        img = decode_image(path)
        if self.transform is not None:
            img = self.transform(img, SampleRNG([seed]) if seed is not None else None)
        return img, label

    def __getitems__(self, keys: Sequence[Any]) -> list[tuple[torch.Tensor, int] | BadImage]:
        """The samples of a batch; an image that cannot be decoded comes back as a :class:`BadImage`
        (an error raised here, in a loader worker, would reach the user as the worker's traceback)."""
        out: list[tuple[torch.Tensor, int] | BadImage] = []
        for key in keys:
            try:
                out.append(self[key])
            except DataError as e:
                index = key[0] if isinstance(key, tuple) else key
                out.append(BadImage(self.samples[index][0], str(e)))
        return out

    def subset(self, indices: torch.Tensor | Sequence[int], transform: Transform | None = None) -> "ImageFolder":
        """The samples at ``indices`` (same classes) with ``transform``."""
        picked = [self.samples[int(i)] for i in indices]
        return ImageFolder(self.root, transform, classes=self.classes, samples=picked)
