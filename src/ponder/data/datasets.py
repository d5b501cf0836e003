"""In-memory image datasets, the :class:`DataBundle`, and ``build_datasets(cfg, seed)``."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch
from torch.utils.data import Dataset

from ponder.data.cifar import CIFAR, load_cifar_split
from ponder.data.digits import DIGITS_CLASSES, digits_split, digits_stats, digits_transforms, load_digits
from ponder.data.errors import DataError
from ponder.data.imagefolder import ImageFolder, find_classes
from ponder.data.splits import long_tail_indices, train_val_split
from ponder.data.transforms import SampleRNG, Transform, cifar_transforms, imagenet_transforms, normalize_stats

DATASETS = ("cifar10", "cifar100", "imagefolder", "digits")
DEFAULT_IMAGE_SIZE = 224  # imagefolder crops when neither the recipe nor the model gives a size


class TensorImageDataset(Dataset):
    """Images held in memory as ``uint8 [N,C,H,W]`` with ``int64 [N]`` labels.

    ``dataset[key] -> (image, label)`` where ``image`` is ``transform(uint8 [C,H,W])``. A key is an
    index or ``(index, seed)`` (see :class:`ponder.data.EpochSampler`). A ``DataLoader`` fetches a
    whole batch through ``__getitems__``, which transforms the batch in one vectorized call, so
    augmentation costs little per epoch; each image draws from its own seed's stream
    (:class:`~ponder.data.transforms.SampleRNG`), so it is augmented the same in any batch.
    """

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, transform: Transform | None = None) -> None:
        if images.dtype != torch.uint8 or images.dim() != 4:
            raise DataError(f"TensorImageDataset needs uint8 images [N,C,H,W], got {images.dtype} {tuple(images.shape)}")
        if labels.shape != (images.shape[0],):
            raise DataError(f"TensorImageDataset got {images.shape[0]} images but labels of shape {tuple(labels.shape)}")
        self.images, self.targets, self.transform = images, labels.to(torch.int64), transform

    def __len__(self) -> int:
        return self.images.shape[0]

    def _apply(self, x: torch.Tensor, seeds: list[int] | None) -> torch.Tensor:
        """``transform`` of a batch ``x [B,C,H,W]``, image ``i`` drawing from ``seeds[i]``'s stream."""
        if self.transform is None:
            return x
        return self.transform(x, SampleRNG(seeds) if seeds is not None else None)

    def __getitem__(self, key: Any) -> tuple[torch.Tensor, int]:
        index, seed = key if isinstance(key, tuple) else (key, None)
        image = self._apply(self.images[index].unsqueeze(0), None if seed is None else [seed])[0]
        return image, int(self.targets[index])

    def __getitems__(self, keys: Sequence[Any]) -> list[tuple[torch.Tensor, int]]:
        if not keys:
            return []
        tagged = isinstance(keys[0], tuple)
        idx = torch.tensor([k[0] for k in keys] if tagged else list(keys), dtype=torch.int64)
        images = self._apply(self.images[idx], [k[1] for k in keys] if tagged else None)
        return list(zip(images.unbind(0), self.targets[idx].tolist()))

    def subset(self, indices: torch.Tensor | Sequence[int], transform: Transform | None = None) -> "TensorImageDataset":
        """The images at ``indices`` (copied) with ``transform``."""
        idx = torch.as_tensor(indices, dtype=torch.int64)
        return TensorImageDataset(self.images[idx], self.targets[idx], transform)


@dataclass
class DataBundle:
    """Everything a run needs from its data: the three splits and their description."""

    train: Dataset
    val: Dataset | None          # held-out split carved from train (eval transforms); None when val_size == 0
    test: Dataset
    num_classes: int
    input_size: tuple[int, int, int]  # (C, H, W) of one transformed image
    classes: list[str]


def _root(cfg: Any) -> Path:
    if not cfg.data_dir:
        raise DataError(f"data.data_dir is not set for data set {cfg.dataset!r}; pass --data-dir pointing at the data folder")
    return Path(cfg.data_dir).expanduser()


def _load(cfg: Any) -> tuple[Any, Any, Transform, Transform, list[str], tuple[int, int, int]]:
    """(full train set, test set, train transform, eval transform, classes, input size)."""
    name = cfg.dataset
    if name in CIFAR:
        root = _root(cfg)
        xtr, ytr, classes = load_cifar_split(root, name, train=True)
        xte, yte, _ = load_cifar_split(root, name, train=False)
        train_tf, eval_tf = cifar_transforms(name, True, cfg.normalize), cifar_transforms(name, False, cfg.normalize)
        return TensorImageDataset(xtr, ytr), TensorImageDataset(xte, yte, eval_tf), train_tf, eval_tf, classes, (3, 32, 32)
    if name == "digits":
        images, labels = load_digits()
        tr, te = digits_split(len(labels))
        mean, std = normalize_stats(cfg.normalize, digits_stats(images[tr]))
        eval_tf = digits_transforms(False, mean, std)
        full = TensorImageDataset(images[tr], labels[tr])
        test = TensorImageDataset(images[te], labels[te], eval_tf)
        return full, test, digits_transforms(True, mean, std), eval_tf, list(DIGITS_CLASSES), (1, 16, 16)
    if name == "imagefolder":
        root = _root(cfg)
        full = ImageFolder(root / "train")
        val_classes, _ = find_classes(root / "val")
        if val_classes != full.classes:
            raise DataError(f"{root / 'val'} has classes that differ from {root / 'train'}; both need the same class folders")
        size = cfg.image_size or DEFAULT_IMAGE_SIZE
        eval_tf = imagenet_transforms(False, size, resize=round(size * 256 / 224), stats=cfg.normalize)
        test = ImageFolder(root / "val", eval_tf, classes=full.classes)
        return full, test, imagenet_transforms(True, size, stats=cfg.normalize), eval_tf, full.classes, (3, size, size)
    raise DataError(f"unknown data set {name!r}; valid: {', '.join(DATASETS)}")


def build_datasets(cfg: Any, seed: int) -> DataBundle:
    """Build train / held-out val / test datasets from a :class:`ponder.config.DataConfig`.

    Order: load the training set; carve ``cfg.val_size`` images for ``val`` (seeded by ``seed``,
    eval transforms); long-tail the rest when ``cfg.long_tail_ratio`` is set (class ``c`` keeps
    ``floor(N_c * ratio**(-c/(K-1)))``; val and test untouched); keep the first ``cfg.limit_train`` of it;
    train transforms when ``cfg.augment`` else eval transforms.
    """
    full, test, train_tf, eval_tf, classes, input_size = _load(cfg)
    n = len(full)
    if cfg.val_size:
        train_idx, val_idx = train_val_split(n, cfg.val_size, seed)
    else:
        train_idx, val_idx = torch.arange(n), None
    if cfg.long_tail_ratio is not None:
        train_idx = train_idx[long_tail_indices(full.targets[train_idx], cfg.long_tail_ratio, len(classes))]
    if cfg.limit_train is not None:
        if cfg.limit_train <= 0:
            raise DataError(f"data.limit_train={cfg.limit_train} must be a positive number of images (or null for all)")
        train_idx = train_idx[: cfg.limit_train]
    return DataBundle(
        train=full.subset(train_idx, train_tf if cfg.augment else eval_tf),
        val=full.subset(val_idx, eval_tf) if val_idx is not None else None,
        test=test,
        num_classes=len(classes),
        input_size=input_size,
        classes=list(classes),
    )
