"""Restricted unpickling for the official CIFAR python files: no file can run code.

The official ``cifar-10-batches-py`` / ``cifar-100-python`` files are protocol-2 pickles of
dicts holding byte strings, lists of ints and one numpy ``uint8`` array. Rebuilding that array
needs exactly three globals (``numpy.core.multiarray._reconstruct``, ``numpy.ndarray``,
``numpy.dtype``); protocol-2 pickles written by Python 3 (re-saved copies, the test
fixtures) also spell ``bytes`` values as ``_codecs.encode(text, "latin1")``. Every other
global is refused before it is imported, so a crafted file (``os.system``, ``eval``, ...)
raises :class:`DataError` and runs nothing.
"""

from __future__ import annotations

import _codecs
import io
import pickle
from pathlib import Path
from typing import Any

import numpy as np

from ponder.data.errors import DataError

try:  # numpy >= 2 moved the implementation; pickles may name either module
    from numpy._core.multiarray import _reconstruct
except ImportError:  # pragma: no cover - numpy < 2
    from numpy.core.multiarray import _reconstruct  # type: ignore[no-redef]

_ALLOWED: dict[tuple[str, str], Any] = {
    ("numpy.core.multiarray", "_reconstruct"): _reconstruct,
    ("numpy._core.multiarray", "_reconstruct"): _reconstruct,
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
    ("_codecs", "encode"): _codecs.encode,
}


class _RestrictedUnpickler(pickle.Unpickler):
    def __init__(self, file: io.BufferedIOBase, path: Path) -> None:
        super().__init__(file, encoding="bytes")
        self._path = path

    def find_class(self, module: str, name: str) -> Any:
        obj = _ALLOWED.get((module, name))
        if obj is None:
            raise DataError(
                f"{self._path} refuses to load: it asks to import {module}.{name}, which a CIFAR "
                "file never needs (only numpy array reconstruction is allowed); replace it with "
                "the official download"
            )
        return obj

    def persistent_load(self, pid: Any) -> Any:
        raise DataError(f"{self._path} refuses to load: it uses persistent ids, which a CIFAR file never does")


def safe_load(path: str | Path) -> Any:
    """Unpickle ``path`` allowing only numpy array reconstruction (byte-string keys kept as bytes).

    Raises :class:`DataError` naming the file when it is unsafe, truncated or not a pickle.
    """
    path = Path(path)
    try:
        with open(path, "rb") as f:
            return _RestrictedUnpickler(f, path).load()
    except DataError:
        raise
    except FileNotFoundError:
        raise DataError(f"{path} does not exist; re-download the data set or fix --data-dir") from None
    except Exception as e:  # EOFError, UnpicklingError, numpy errors on bad array state, ...
        reason = f"{type(e).__name__}: {e}".splitlines()[0]
        raise DataError(f"{path} is truncated or not a CIFAR pickle ({reason}); re-download it") from None
