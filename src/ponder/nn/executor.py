"""Switching a dynamic model between its executors with one call.

``masked``: dense compute multiplied by the decisions (differentiable; used to train).
``sparse``: skipped computation really is skipped (what speed is measured on).
For hard decisions both give the same outputs.
"""

from __future__ import annotations

import torch.nn as nn

EXECUTORS = ("masked", "sparse")


def set_executor(model: nn.Module, executor: str) -> nn.Module:
    """Set ``executor`` on every submodule that has one; returns ``model``.

    Raises ``ValueError`` for an unknown name or a model with no dynamic parts.
    """
    if executor not in EXECUTORS:
        raise ValueError(f"executor must be one of {EXECUTORS}, got {executor!r}")
    found = False
    for m in model.modules():
        if hasattr(m, "executor"):
            m.executor = executor
            found = True
    if not found:
        raise ValueError(f"{type(model).__name__} has no dynamic parts: there is no executor to switch")
    return model


def get_executor(model: nn.Module) -> str | None:
    """The executor of the first dynamic submodule, or ``None`` for a static model."""
    for m in model.modules():
        if hasattr(m, "executor"):
            return m.executor
    return None
