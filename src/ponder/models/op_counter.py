"""MSDNet's official ``op_counter`` convention, for comparing per-exit costs with the papers.

It counts conv weights, ReLU (input numel), pooling (``C H_out W_out k^2``) and Linear
(``in*out + out``); BN, concatenation and functional ops (e.g. interpolation) count 0. This is the
convention of the numbers the MSDNet / RANet / IMTA / L2W papers print; ponder's ledger counts
conv + linear MACs (:mod:`ponder.cost`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn as nn
from torch import Tensor

if TYPE_CHECKING:
    from ponder.models.multi_exit import MultiExitModel


def _official_ops(module: nn.Module, inp: Tensor, out: Tensor) -> int:
    """One leaf module's count under the official MSDNet ``op_counter`` convention."""
    if isinstance(module, nn.Conv2d):
        kh, kw = module.kernel_size
        return module.in_channels * module.out_channels * kh * kw * out.shape[2] * out.shape[3] // module.groups
    if isinstance(module, nn.ReLU):
        return inp.numel()
    if isinstance(module, (nn.AvgPool2d, nn.MaxPool2d)):
        k = module.kernel_size if isinstance(module.kernel_size, int) else module.kernel_size[0]
        return out.shape[1] * out.shape[2] * out.shape[3] * k * k
    if isinstance(module, nn.AdaptiveAvgPool2d):
        return inp.numel()
    if isinstance(module, nn.Linear):
        return module.in_features * module.out_features + module.out_features
    return 0


def official_op_counts(model: "MultiExitModel", input_size: tuple[int, int, int]) -> list[int]:
    """Cumulative per-exit cost in the official MSDNet ``op_counter`` convention (batch 1).

    Counts conv weights, ReLU (input numel), pooling (``C H_out W_out k^2``) and Linear
    (``in*out + out``); BN, concatenation and functional ops (e.g. interpolation) count 0.
    This is the convention of the numbers the MSDNet / RANet / IMTA / L2W papers print.
    """
    total = [0]
    leaves = [m for m in model.modules() if next(m.children(), None) is None]
    handles = [m.register_forward_hook(lambda mod, i, o: total.__setitem__(0, total[0] + _official_ops(mod, i[0], o)))
               for m in leaves]
    was_training = model.training
    model.eval()
    out = []
    try:
        with torch.enable_grad():  # the module path (without autograd, exit heads fold BN and skip the hooks)
            p = next(model.parameters())
            state, carry = torch.zeros(1, *input_size, device=p.device, dtype=p.dtype), None
            for k in range(model.num_exits):
                state = model.run_block(k, state)
                _, _, carry = model._exit(k, state, carry)
                out.append(total[0])
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    return out
