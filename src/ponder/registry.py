"""Model registry: ``@register_model``, ``create_model(name, **kw)``, ``list_models(pattern)``."""

from __future__ import annotations

import fnmatch
from typing import Callable, TypeVar

import torch.nn as nn

_MODELS: dict[str, Callable[..., nn.Module]] = {}

F = TypeVar("F", bound=Callable[..., nn.Module])


class UnknownModelError(KeyError):
    """Raised when a model name is not registered."""

    def __str__(self) -> str:  # KeyError quotes its message; keep it a plain sentence
        return str(self.args[0])


def register_model(fn: F) -> F:
    """Register a model factory under its function name (timm style)."""
    name = fn.__name__
    if name in _MODELS:
        raise ValueError(f"model {name!r} is registered twice")
    _MODELS[name] = fn
    return fn


def _ensure_builtin_models() -> None:
    import ponder.models  # noqa: F401  (registers the built-in models)


def list_models(pattern: str | None = None) -> list[str]:
    """Sorted registered names, optionally filtered by a shell-style ``pattern``."""
    _ensure_builtin_models()
    names = sorted(_MODELS)
    if pattern:
        names = [n for n in names if fnmatch.fnmatch(n, pattern)]
    return names


def create_model(name: str, **kwargs) -> nn.Module:
    """Build a registered model; ``None`` keyword values are dropped so model defaults hold."""
    _ensure_builtin_models()
    if name not in _MODELS:
        close = [n for n in _MODELS if name.split("_")[0] in n][:5]
        hint = f" Did you mean one of {close}?" if close else ""
        raise UnknownModelError(
            f"unknown model {name!r}; run `ponder models` to list the {len(_MODELS)} registered names.{hint}"
        )
    kwargs = {k: v for k, v in kwargs.items() if v is not None}
    return _MODELS[name](**kwargs)
