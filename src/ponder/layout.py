"""Memory-format tests shared by the executors."""

from __future__ import annotations

import torch
from torch import Tensor


def is_channels_last(t: Tensor) -> bool:
    """True when ``t`` (4-D) is laid out channels-last and not also plain-contiguous.

    Tensors with one channel or a 1x1 map satisfy both layouts; they count as NCHW here.
    """
    return t.dim() == 4 and not t.is_contiguous() and t.is_contiguous(memory_format=torch.channels_last)
