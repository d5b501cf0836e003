"""Reading model weights: a run directory's ``weights.safetensors``, a safetensors file or a state dict.

The one place weight files are read, for the engine (runs, resume, ``train.init_from``) and for model
options that start from other weights (BlockDrop's ``policy_init``). ``.pt`` / ``.pth`` files are read
with ``weights_only=True``: no file can run code.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn as nn

WEIGHTS_FILE = "weights.safetensors"


class RunDirError(ValueError):
    """A run directory is missing, incomplete or holds a corrupt file."""


def first_line(error: BaseException) -> str:
    """The first line of an exception's message (its type name when the message is empty)."""
    lines = str(error).strip().splitlines()
    return lines[0] if lines else type(error).__name__


def read_weights(path: str | Path, device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    """Tensors of a safetensors file; a missing or corrupt file raises :class:`RunDirError`."""
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise RunDirError(f"weights file {path} does not exist; train the run first or pass the right directory")
    try:
        return load_file(str(path), device=str(device))
    except Exception as e:  # safetensors raises its own error types for truncated / malformed files
        raise RunDirError(f"weights file {path} is corrupt or not a safetensors file ({e}); re-train or restore it") from None


def load_init_weights(model: nn.Module, source: str | Path) -> tuple[list[str], list[str]]:
    """Load a run directory's or a weights file's tensors into ``model`` with ``strict=False``.

    ``source`` is a run dir (its ``weights.safetensors``), a ``.safetensors`` file or a
    ``.pt/.pth`` state dict (read with ``weights_only=True``). Tensors whose shape differs
    from the model's are skipped and reported as missing. Returns ``(missing, unexpected)`` keys.
    """
    source = Path(source)
    if source.is_dir():
        source = source / WEIGHTS_FILE
    if source.suffix == ".safetensors":
        state = read_weights(source)
    elif source.is_file():
        try:
            state = torch.load(source, map_location="cpu", weights_only=True)
        except Exception as e:
            raise RunDirError(f"train.init_from file {source} cannot be read as a state dict ({first_line(e)})") from None
        state = state.get("state_dict", state) if isinstance(state, dict) else state
    else:
        raise RunDirError(f"train.init_from {source} does not exist; give a run directory or a weights file")
    own = model.state_dict()
    fitting = {k: v for k, v in state.items() if k not in own or own[k].shape == v.shape}
    result = model.load_state_dict(fitting, strict=False)
    return list(result.missing_keys), list(result.unexpected_keys)
