"""The one switch for every fast path: ``PONDER_FAST=0`` in the environment, or :func:`set_enabled`."""

from __future__ import annotations

import os
from contextlib import contextmanager
from typing import Iterator

from torch import Tensor
import torch
from torch.utils._python_dispatch import _get_current_dispatch_mode

_OFF_VALUES = ("0", "off", "false", "no")
_ENABLED: list[bool] = [os.environ.get("PONDER_FAST", "1").strip().lower() not in _OFF_VALUES]


def enabled() -> bool:
    """Whether fast paths run (compiled kernels, timed routes, folded and packed weight caches, exit-head plans).

    Off, every operation runs its plain PyTorch reference: same results up to float rounding, same
    decisions and costs, only slower.
    """
    return _ENABLED[0]


def set_enabled(flag: bool) -> None:
    """Turn fast paths on or off for this process (the environment variable ``PONDER_FAST`` sets the start value)."""
    _ENABLED[0] = bool(flag)


@contextmanager
def disabled() -> Iterator[None]:
    """Run a block with fast paths off (restored afterwards)."""
    before = _ENABLED[0]
    _ENABLED[0] = False
    try:
        yield
    finally:
        _ENABLED[0] = before


def cpu_inference(t: Tensor) -> bool:
    """Fast paths on, no autograd, no dispatch mode (a ``FlopCounterMode`` cannot see inside a kernel), ``t`` on the CPU."""
    return (_ENABLED[0] and not torch.is_grad_enabled() and t.device.type == "cpu"
            and _get_current_dispatch_mode() is None)
