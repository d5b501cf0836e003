"""Base class shared by every ponder model: input size, cost ledger, output contract."""

from __future__ import annotations

import torch
import torch.nn as nn
from torch import Tensor

from ponder.cost import CostLedger, LedgerCache
from ponder.output import DynamicOutput


class PonderModel(nn.Module):
    """A network whose ``forward(x [B, C, H, W])`` returns a :class:`DynamicOutput`.

    Subclasses set ``default_input_size`` and implement :meth:`measure_ledger`, which
    measures the per-sample MACs of each unit at batch 1 (see :mod:`ponder.cost`);
    :meth:`ledger` caches the result per input size.
    """

    default_input_size: tuple[int, int, int] = (3, 32, 32)
    num_classes: int

    def __init__(self) -> None:
        super().__init__()
        self._ledgers = LedgerCache(self.measure_ledger)

    def measure_ledger(self, input_size: tuple[int, int, int]) -> CostLedger:
        raise NotImplementedError

    def ledger(self, input_size: tuple[int, int, int]) -> CostLedger:
        """Unit costs for ``(C, H, W)`` inputs (measured once per size, then cached)."""
        return self._ledgers.get(input_size)

    def ledger_for(self, x: Tensor) -> CostLedger:
        """Unit costs for a batch ``x [B, C, H, W]``."""
        return self.ledger(tuple(x.shape[1:]))  # type: ignore[arg-type]

    def check_input(self, x: Tensor) -> None:
        """One clear error for inputs of the wrong rank or channel count."""
        c = self.default_input_size[0]
        if x.dim() != 4 or x.shape[1] != c:
            raise ValueError(
                f"{type(self).__name__} expects input of shape [batch, {c}, H, W], got {list(x.shape)}; "
                f"pass images with {c} channels (e.g. --input-size {' '.join(map(str, self.default_input_size))})."
            )

    def forward(self, x: Tensor) -> DynamicOutput:  # pragma: no cover - abstract
        raise NotImplementedError


def example_input(model: nn.Module, input_size: tuple[int, int, int]) -> Tensor:
    """A zero batch-1 input on the model's device, in its floating-point type (float64 models included)."""
    p = next(model.parameters(), None)
    if p is None:
        return torch.zeros(1, *input_size)
    return torch.zeros(1, *input_size, device=p.device, dtype=p.dtype if p.is_floating_point() else None)
