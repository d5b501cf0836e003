"""What every repository's mapping file shares: the error type, the mapped result and state-dict helpers."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping

import torch
from torch import Tensor


class OfficialCheckpointError(ValueError):
    """A file that is not a readable official checkpoint, or one that does not fit the ponder model."""


@dataclass
class Mapped:
    """An official checkpoint mapped onto a ponder model (what each repository's ``map_checkpoint`` returns).

    ``state`` holds ponder ``state_dict`` keys (BatchNorm ``num_batches_tracked`` may be missing:
    files older than PyTorch 0.4.1 have none). ``dataset`` and ``normalize`` are the run's
    ``data.dataset`` / ``data.normalize`` (the official preprocessing; ``None`` = ponder's default).
    ``info`` keeps the file's own numbers (epoch, accuracy, ...); ``notes`` say what was dropped or assumed.
    """

    repository: str
    model: str
    kwargs: dict[str, Any]
    state: dict[str, Tensor]
    dataset: str
    normalize: list[list[float]] | None = None
    notes: list[str] = field(default_factory=list)
    info: dict[str, Any] = field(default_factory=dict)


def tensor_dict(obj: Any) -> dict[str, Tensor] | None:
    """``obj`` as a state dict (a non-empty mapping of string keys to tensors), else ``None``."""
    if isinstance(obj, Mapping) and obj and all(isinstance(k, str) and isinstance(v, Tensor) for k, v in obj.items()):
        return dict(obj)
    return None


def find_state_dict(obj: Any, depth: int = 3) -> dict[str, Tensor] | None:
    """The state dict in a checkpoint: ``obj`` itself or one nested under ``state_dict``, ``model``,
    ``model_state_dict`` or ``net`` (up to ``depth`` levels), with ``module.`` prefixes removed."""
    state = tensor_dict(obj)
    if state is not None:
        return strip_module(state)
    if depth == 0 or not isinstance(obj, Mapping):
        return None
    for key in ("state_dict", "model", "model_state_dict", "net"):
        if key in obj:
            found = find_state_dict(obj[key], depth - 1)
            if found is not None:
                return found
    return None


def strip_module(state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Remove the ``module.`` prefix(es) ``DataParallel`` / DDP give every key (only when all keys have it)."""
    state = dict(state)
    while state and all(k.startswith("module.") for k in state):
        state = {k[len("module."):]: v for k, v in state.items()}
    return state


def indices(keys: Iterable[str], pattern: str) -> list[int]:
    """Sorted distinct integers captured by ``pattern``'s first group in ``keys`` (``re.match``)."""
    rx = re.compile(pattern)
    return sorted({int(m.group(1)) for k in keys if (m := rx.match(k))})


def plain_values(obj: Any, names: Iterable[str]) -> dict[str, Any]:
    """The entries ``names`` of a checkpoint dict that are plain numbers or strings (0-dim tensors as numbers)."""
    out: dict[str, Any] = {}
    if not isinstance(obj, Mapping):
        return out
    for name in names:
        value = obj.get(name)
        if isinstance(value, Tensor) and value.numel() == 1:
            value = value.item()
        if isinstance(value, (int, float, str)):
            out[name] = value
    return out


def model_shapes(name: str, kwargs: Mapping[str, Any]) -> dict[str, torch.Size]:
    """Key -> shape of ``create_model(name, **kwargs).state_dict()`` (built on the CPU: on the meta
    device the weight initialisation of a RANet takes longer than a real build)."""
    from ponder.registry import create_model

    with torch.random.fork_rng(devices=[]):  # building draws initial weights: leave the caller's RNG alone
        model = create_model(name, **kwargs)
    return {k: v.shape for k, v in model.state_dict().items()}


def fits(state: Mapping[str, Tensor], name: str, kwargs: Mapping[str, Any]) -> bool:
    """Whether ``state`` has exactly the keys and shapes of that ponder model (``num_batches_tracked`` optional)."""
    try:
        shapes = model_shapes(name, kwargs)
    except (TypeError, ValueError):  # options the model refuses
        return False
    needed = {k for k in shapes if not k.endswith("num_batches_tracked")}
    return needed <= set(state) <= set(shapes) and all(state[k].shape == shapes[k] for k in state)


def cifar_dataset(num_classes: int, notes: list[str]) -> str:
    """``cifar10`` / ``cifar100`` for 10 / 100 classes; otherwise ``imagefolder`` with a note to set it."""
    if num_classes in (10, 100):
        return f"cifar{num_classes}"
    notes.append(f"{num_classes} classes match neither CIFAR-10 nor CIFAR-100: data.dataset is set to "
                 f"imagefolder; edit config.yaml to name your data set")
    return "imagefolder"
