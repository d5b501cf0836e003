"""Write small fake CIFAR folders in the official python format (for tests; no download).

``write_fake_cifar(root, "cifar10" | "cifar100", n_train, n_test, seed)`` writes
``root/cifar-10-batches-py`` (data_batch_1..5, test_batch, batches.meta) or
``root/cifar-100-python`` (train, test, meta): protocol-2 pickles of dicts with byte-string
keys, ``data`` a ``uint8 [N, 3072]`` array, labels plain int lists, like the real files.
Labels are balanced (``i % K``, shuffled); each image is noise around a per-class brightness,
so a small model can learn them.

``real_cifar10()`` finds the shared real CIFAR-10 subset (``shared/data/cifar-10-batches-py``, located
by :mod:`shared_dir`), or ``None`` when it is absent (tests then skip).
"""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np

from shared_dir import SHARED

_LAYOUT = {
    "cifar10": ("cifar-10-batches-py", 10, b"labels", b"label_names", "batches.meta"),
    "cifar100": ("cifar-100-python", 100, b"fine_labels", b"fine_label_names", "meta"),
}


def real_cifar10() -> Path | None:
    """The folder holding the shared real CIFAR-10 subset's ``cifar-10-batches-py``, or ``None``."""
    folder = SHARED / "data" / "cifar-10-batches-py" if SHARED else None
    return folder.parent if folder is not None and folder.is_dir() else None


def _dump(path: Path, obj: dict) -> None:
    with open(path, "wb") as f:
        pickle.dump(obj, f, protocol=2)


def fake_images(n: int, num_classes: int, rng: np.random.Generator) -> tuple[np.ndarray, list[int]]:
    """``(uint8 [n, 3072], labels)`` with balanced shuffled labels and class-dependent brightness."""
    labels = rng.permutation(np.arange(n) % num_classes)
    level = 40 + labels * (170 // max(num_classes - 1, 1))
    noise = rng.integers(-30, 31, size=(n, 3072))
    return np.clip(level[:, None] + noise, 0, 255).astype(np.uint8), [int(v) for v in labels]


def write_fake_cifar(root: str | Path, name: str, n_train: int, n_test: int, seed: int = 0) -> Path:
    """Write a fake official-format CIFAR folder under ``root``; returns the folder path."""
    folder_name, k, label_key, names_key, meta_name = _LAYOUT[name]
    folder = Path(root) / folder_name
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    names = [f"class{c}".encode() for c in range(k)]
    if name == "cifar10":
        _dump(folder / meta_name, {b"num_cases_per_batch": n_train // 5, names_key: names, b"num_vis": 3072})
        data, labels = fake_images(n_train, k, rng)
        for i, chunk in enumerate(np.array_split(np.arange(n_train), 5), start=1):
            _dump(folder / f"data_batch_{i}", {
                b"batch_label": f"training batch {i} of 5".encode(), label_key: [labels[j] for j in chunk],
                b"data": data[chunk], b"filenames": [f"img_{j}.png".encode() for j in chunk],
            })
        splits = [("test_batch", n_test)]
    else:
        _dump(folder / meta_name, {names_key: names, b"coarse_label_names": [f"super{c}".encode() for c in range(20)]})
        splits = [("train", n_train), ("test", n_test)]
    for fname, n in splits:
        data, labels = fake_images(n, k, rng)
        _dump(folder / fname, {
            b"batch_label": fname.encode(), label_key: labels, b"data": data,
            b"filenames": [f"img_{j}.png".encode() for j in range(n)],
            **({b"coarse_labels": [v // 5 for v in labels]} if name == "cifar100" else {}),
        })
    return folder
