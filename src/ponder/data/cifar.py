"""CIFAR-10 / CIFAR-100 from the official python-format folders, read with a restricted unpickler.

``cifar-10-batches-py``: ``data_batch_1`` .. ``data_batch_5``, ``test_batch``, ``batches.meta``.
``cifar-100-python``: ``train``, ``test``, ``meta`` (the 100 fine labels are used).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ponder.data.download import fetch, safe_extract
from ponder.data.errors import DataError
from ponder.data.safe_pickle import safe_load

CIFAR_BASE_URL = "https://www.cs.toronto.edu/~kriz"


@dataclass(frozen=True)
class CifarSpec:
    title: str
    folder: str
    train_files: tuple[str, ...]
    test_file: str
    meta_file: str
    label_key: bytes
    names_key: bytes
    num_classes: int
    archive: str
    md5: str


CIFAR: dict[str, CifarSpec] = {
    "cifar10": CifarSpec(
        "CIFAR-10", "cifar-10-batches-py", tuple(f"data_batch_{i}" for i in range(1, 6)), "test_batch",
        "batches.meta", b"labels", b"label_names", 10, "cifar-10-python.tar.gz", "c58f30108f718f92721af3b95e74349a",
    ),
    "cifar100": CifarSpec(
        "CIFAR-100", "cifar-100-python", ("train",), "test", "meta", b"fine_labels", b"fine_label_names", 100,
        "cifar-100-python.tar.gz", "eb9058c3a382ffc7106e4002c42a8d85",
    ),
}


def _spec(name: str) -> CifarSpec:
    if name not in CIFAR:
        raise DataError(f"unknown CIFAR variant {name!r}; valid: {', '.join(CIFAR)}")
    return CIFAR[name]


def find_cifar_dir(root: str | Path, name: str) -> Path:
    """The official folder for ``name``: ``root`` itself when it holds the files, else ``root/<folder>``."""
    spec = _spec(name)
    root = Path(root).expanduser()
    for cand in (root, root / spec.folder):
        if (cand / spec.meta_file).is_file() and (cand / spec.test_file).is_file():
            return cand
    raise DataError(
        f"{spec.title} not found at {root}: expected the official python-format folder {spec.folder} "
        f"(or its files {spec.meta_file}, {spec.test_file}, ...) there; pass --data-dir pointing at it, or "
        f"download it with ponder.data.download_cifar({str(root)!r}, {name!r})"
    )


def _read_batch(path: Path, label_key: bytes) -> tuple[np.ndarray, np.ndarray]:
    d = safe_load(path)
    if not isinstance(d, dict) or b"data" not in d or label_key not in d:
        keys = sorted(k.decode("latin1") if isinstance(k, bytes) else str(k) for k in d) if isinstance(d, dict) else []
        raise DataError(f"{path} is not a CIFAR batch: expected keys data and {label_key.decode()}, found {keys or type(d).__name__}")
    data, labels = d[b"data"], d[label_key]
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
        shape = getattr(data, "shape", None)
        raise DataError(f"{path} is malformed: data must be a uint8 array of shape [N, 3072], got {type(data).__name__} {shape}")
    try:
        labels = np.asarray(labels, dtype=np.int64)
    except (TypeError, ValueError):
        raise DataError(f"{path} is malformed: its labels are not a list of integers") from None
    if labels.shape != (len(data),):
        raise DataError(f"{path} is malformed: {len(data)} images but labels of shape {tuple(labels.shape)}")
    return data, labels


def _read_classes(path: Path, key: bytes, num_classes: int) -> list[str]:
    d = safe_load(path)
    names = d.get(key) if isinstance(d, dict) else None
    if not isinstance(names, list) or len(names) != num_classes:
        raise DataError(f"{path} is malformed: expected {key.decode()} with {num_classes} class names")
    return [n.decode("utf-8") if isinstance(n, bytes) else str(n) for n in names]


def load_cifar_split(root: str | Path, name: str, train: bool) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """Read one split of CIFAR-10 (``name="cifar10"``) or CIFAR-100 (``"cifar100"``, fine labels).

    ``root`` is the official folder or its parent. Returns images ``uint8 [N, 3, 32, 32]``,
    labels ``int64 [N]`` and the class names (``list[str]``, index = label).
    """
    spec = _spec(name)
    folder = find_cifar_dir(root, name)
    classes = _read_classes(folder / spec.meta_file, spec.names_key, spec.num_classes)
    parts = [_read_batch(folder / f, spec.label_key) for f in (spec.train_files if train else (spec.test_file,))]
    data = np.concatenate([p[0] for p in parts])
    labels = np.concatenate([p[1] for p in parts])
    if labels.size and (labels.min() < 0 or labels.max() >= spec.num_classes):
        raise DataError(f"{folder} is malformed: labels outside 0..{spec.num_classes - 1}")
    images = torch.from_numpy(np.ascontiguousarray(data).reshape(-1, 3, 32, 32))
    return images, torch.from_numpy(labels), classes


def download_cifar(root: str | Path, name: str, base_url: str = CIFAR_BASE_URL, md5: str | None = None) -> Path:
    """Download the official archive into ``root``, verify its md5, unpack it; returns the data folder.

    Does nothing when the folder is already there. ``base_url`` points at a mirror (or a local
    test server); ``md5`` overrides the official checksum (only for such a mirror). Offline it
    raises :class:`DataError` saying how to get the files by hand.
    """
    spec = _spec(name)
    root = Path(root).expanduser()
    try:
        return find_cifar_dir(root, name)
    except DataError:
        pass
    archive = fetch(f"{base_url.rstrip('/')}/{spec.archive}", root / spec.archive, md5 or spec.md5)
    safe_extract(archive, root)
    return find_cifar_dir(root, name)
