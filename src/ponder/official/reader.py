"""Read a ``torch.save`` checkpoint without running code from it.

Two containers are accepted, recognised by their first bytes:

- the zip archive ``torch.save`` writes since PyTorch 1.6 (``PK\\x03\\x04``);
- the legacy stream of PyTorch 0.x - 1.5: a protocol-2 pickle of the magic number
  ``0x1950a86a20f9469cfc6c`` first, then the protocol version, the system info, the object
  pickle and the raw storages (what the released MSDNet, RANet, BlockDrop and SkipNet files are).

Both are read with ``torch.load(weights_only=True)``: the restricted unpickler rebuilds tensors,
numbers, strings, lists and dicts and refuses every other global before importing it. Storages
tagged ``cuda:0`` are mapped to ``map_location``. A Python 2 pickle whose ``str`` values hold
bytes that are not UTF-8 is read again with ``encoding="latin1"`` (what ``torch.load``'s
documentation prescribes for Python 2 files).
"""

from __future__ import annotations

import pickle
import re
import warnings
from pathlib import Path
from typing import Any

import torch

from ponder.official.layout import OfficialCheckpointError

ZIP_MAGIC = b"PK\x03\x04"
# pickle protocol 2 (\x80\x02), LONG1 of 10 bytes (\x8a\x0a), 0x1950a86a20f9469cfc6c little-endian
LEGACY_MAGIC = b"\x80\x02\x8a\x0a" + (0x1950A86A20F9469CFC6C).to_bytes(10, "little")

EXPECTED = ("expected a checkpoint written by torch.save: a zip archive (PyTorch >= 1.6) or the "
            "legacy torch.save stream (PyTorch 0.x to 1.5)")


def container(path: str | Path) -> str:
    """``"zip"`` or ``"legacy"`` from the file's first bytes; anything else raises
    :class:`OfficialCheckpointError` naming what was expected."""
    path = Path(path)
    if not path.is_file():
        what = "is a directory" if path.is_dir() else "does not exist"
        raise OfficialCheckpointError(f"checkpoint {path} {what}; give the path of an official checkpoint file "
                                      f"(e.g. model_best.pth.tar or ckpt_E_*.t7)")
    with open(path, "rb") as f:
        head = f.read(len(LEGACY_MAGIC))
    if head.startswith(ZIP_MAGIC):
        return "zip"
    if head == LEGACY_MAGIC:
        return "legacy"
    raise OfficialCheckpointError(f"{path} is not a PyTorch checkpoint: {EXPECTED}")


def read_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> Any:
    """The object a ``torch.save`` checkpoint holds (dicts of tensors, numbers and strings), loaded
    with ``weights_only=True`` onto ``map_location``; raises :class:`OfficialCheckpointError` for a
    file of another format, a damaged one, or one that pickles anything but plain data."""
    kind = container(path)
    try:
        return _load(path, map_location, "utf-8")
    except UnicodeDecodeError:  # a Python 2 str with non-UTF-8 bytes
        try:
            return _load(path, map_location, "latin1")
        except Exception as e:  # noqa: BLE001 - reported as one sentence below
            raise _refusal(path, kind, e) from None
    except Exception as e:  # noqa: BLE001 - torch raises many types for bad files
        raise _refusal(path, kind, e) from None


def _load(path: str | Path, map_location: str | torch.device, encoding: str) -> Any:
    with warnings.catch_warnings():
        # torch warns that pickle arguments need weights_only=False, yet it honours the encoding
        warnings.filterwarnings("ignore", message="pickle_load_args only works")
        return torch.load(path, map_location=map_location, weights_only=True, encoding=encoding)


def _refusal(path: str | Path, kind: str, error: Exception) -> OfficialCheckpointError:
    """One sentence for a file ``torch.load(weights_only=True)`` could not read."""
    text = str(error)
    found = re.search(r"Unsupported global: GLOBAL ([\w.]+)", text) or re.search(r"GLOBAL ([\w.]+)", text)
    if isinstance(error, pickle.UnpicklingError) and found:
        return OfficialCheckpointError(
            f"{path} pickles {found.group(1)}, not only tensors, numbers, strings and dicts; ponder reads "
            f"checkpoints with weights_only=True and never runs code from a file, so it refuses this one")
    if isinstance(error, pickle.UnpicklingError) or "weights_only" in text.lower():
        return OfficialCheckpointError(
            f"{path} holds objects other than tensors, numbers, strings and dicts; ponder reads checkpoints "
            f"with weights_only=True and never runs code from a file, so it refuses this one")
    what = "zip archive" if kind == "zip" else "legacy torch.save stream"
    return OfficialCheckpointError(f"{path} starts like a {what} but cannot be read ({_first_line(text)}); "
                                   f"the file is damaged or truncated: download it again")


def _first_line(text: str) -> str:
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    return lines[0].rstrip(".") if lines else "unknown error"
