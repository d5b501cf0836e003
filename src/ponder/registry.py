"""Model registry: ``@register_model``, ``create_model(name, **kw)``, ``list_models(pattern)``, ``model_info``.

Listing is instant: nothing is built to list. Each entry knows its factory's module, the class it
returns (from the factory's return annotation), and through that class the model's family and paper.
"""

from __future__ import annotations

import fnmatch
import inspect
import typing
from dataclasses import dataclass
from typing import Any, Callable, TypeVar

import torch.nn as nn

_MODELS: dict[str, Callable[..., nn.Module]] = {}

#: the families every model belongs to (``PonderModel.family``)
FAMILIES = ("static", "early_exit", "skipping", "spatial")

F = TypeVar("F", bound=Callable[..., nn.Module])


class UnknownModelError(KeyError):
    """Raised when a model name is not registered."""

    def __str__(self) -> str:  # KeyError quotes its message; keep it a plain sentence
        return str(self.args[0])


@dataclass(frozen=True)
class ModelInfo:
    """What the registry knows about a model without building it."""

    name: str
    family: str  # static | early_exit | skipping | spatial
    paper: str
    cls: type
    module: str
    summary: str  # the factory docstring's first sentence


def register_model(fn: F) -> F:
    """Register a model factory under its function name (timm style); annotate its return type with the
    model class so listing needs no build."""
    name = fn.__name__
    if name in _MODELS:
        raise ValueError(f"model {name!r} is registered twice")
    _MODELS[name] = fn
    return fn


def _ensure_builtin_models() -> None:
    import ponder.models  # noqa: F401  (the plugin import: registers the built-in models)


def list_models(pattern: str | None = None) -> list[str]:
    """Sorted registered names, optionally filtered by a shell-style ``pattern``."""
    _ensure_builtin_models()
    names = sorted(_MODELS)
    if pattern:
        names = [n for n in names if fnmatch.fnmatch(n, pattern)]
    return names


def model_info(name: str) -> ModelInfo:
    """:class:`ModelInfo` of a registered model (its factory's return class, family, paper, docstring)."""
    fn = _factory(name)
    cls = typing.get_type_hints(fn).get("return")
    if not isinstance(cls, type):
        raise TypeError(f"model factory {name} must annotate its return type with the model class")
    doc = inspect.getdoc(fn) or ""
    return ModelInfo(name=name, family=getattr(cls, "family", "static"), paper=getattr(cls, "paper", ""), cls=cls,
                     module=fn.__module__, summary=doc.split("\n\n")[0].replace("\n", " "))


def create_model(name: str, **kwargs: Any) -> nn.Module:
    """Build a registered model; ``None`` keyword values are dropped so model defaults hold."""
    kwargs = {k: v for k, v in kwargs.items() if v is not None}
    return _factory(name)(**kwargs)


def _factory(name: str) -> Callable[..., nn.Module]:
    _ensure_builtin_models()
    if name not in _MODELS:
        close = [n for n in _MODELS if name.split("_")[0] in n][:5]
        hint = f" Did you mean one of {close}?" if close else ""
        raise UnknownModelError(
            f"unknown model {name!r}; run `ponder models` to list the {len(_MODELS)} registered names.{hint}"
        )
    return _MODELS[name]
