"""Data: CIFAR-10/100 (official python format, restricted unpickling), long-tailed CIFAR, a seeded
held-out split, ImageFolder, tensor transforms and an offline demo set (scikit-learn's digits).

Entry points: :func:`build_datasets` (``DataConfig`` -> :class:`DataBundle`) and
:func:`build_loaders` (-> train / val / test ``DataLoader``).
"""

from ponder.data.cifar import download_cifar, find_cifar_dir, load_cifar_split
from ponder.data.datasets import DATASETS, DataBundle, TensorImageDataset, build_datasets
from ponder.data.digits import load_digits
from ponder.data.errors import DataError
from ponder.data.imagefolder import IMG_EXTENSIONS, ImageFolder
from ponder.data.loaders import EpochSampler, build_loaders
from ponder.data.safe_pickle import safe_load
from ponder.data.splits import long_tail_indices, train_val_split
from ponder.data.transforms import cifar_transforms, imagenet_transforms

__all__ = [
    "DATASETS", "DataBundle", "DataError", "EpochSampler", "IMG_EXTENSIONS", "ImageFolder", "TensorImageDataset",
    "build_datasets", "build_loaders", "cifar_transforms", "download_cifar", "find_cifar_dir", "imagenet_transforms",
    "load_cifar_split", "load_digits", "long_tail_indices", "safe_load", "train_val_split",
]
