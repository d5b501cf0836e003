"""Evaluation protocols used by ``ponder eval RUN_DIR --protocol NAME``.

A protocol is ``fn(ctx: EvalContext) -> dict`` (JSON-serialisable results). Families
register theirs (anytime, budgeted, skip, spatial) with :func:`register_protocol`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch.nn as nn

from ponder.config import RunConfig


@dataclass
class EvalContext:
    """What a protocol gets: the trained model (eval mode), its run, and data loaders."""

    model: nn.Module
    config: RunConfig
    run_dir: Path
    out_dir: Path
    test_loader: Any
    val_loader: Any | None
    device: Any
    options: dict[str, Any] = field(default_factory=dict)


Protocol = Callable[[EvalContext], dict]
_PROTOCOLS: dict[str, Protocol] = {}


def register_protocol(name: str) -> Callable[[Protocol], Protocol]:
    def deco(fn: Protocol) -> Protocol:
        if name in _PROTOCOLS:
            raise ValueError(f"protocol {name!r} is registered twice")
        _PROTOCOLS[name] = fn
        return fn

    return deco


def get_protocol(name: str) -> Protocol:
    import ponder.evaluate  # noqa: F401  (registers built-in protocols)

    if name not in _PROTOCOLS:
        raise ValueError(f"unknown protocol {name!r}; known: {', '.join(sorted(_PROTOCOLS))}")
    return _PROTOCOLS[name]


def list_protocols() -> list[str]:
    import ponder.evaluate  # noqa: F401

    return sorted(_PROTOCOLS)
