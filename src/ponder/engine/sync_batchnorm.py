"""Synchronised BatchNorm for DDP on every device (``train.sync_batchnorm``).

Under DDP each rank normally normalises with the statistics of its own part of the batch, so a
run on N processes trains another network than one process on the same global batch.
:func:`convert_sync_batchnorm` makes the model's ``BatchNorm1d/2d/3d`` layers normalise with the
mean and (biased) variance of the global batch and keep running statistics of it, as one
process would, up to float rounding. Unlike ``torch.nn.SyncBatchNorm`` it also runs on CPU
(gloo); its gradient goes through a differentiable all-reduce
(:func:`~ponder.engine.distributed.all_reduce_sum`). The
layers keep their class's parameters, buffers and state-dict keys (they become subclasses of
their own class), so checkpoints are unchanged; outside training or in one process they are
plain BatchNorm.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn as nn
from torch import Tensor

from ponder.engine.distributed import all_reduce_sum


def _world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


class _GlobalBatchStatistics:
    """Mixin for a BatchNorm class: training-mode statistics over every rank's batch."""

    def forward(self, input: Tensor) -> Tensor:
        if not self.training or _world_size() == 1:
            return super().forward(input)
        self._check_input_dim(input)
        dims = [0, *range(2, input.dim())]
        shape = [1, -1] + [1] * (input.dim() - 2)
        x = input.float()
        count = torch.tensor([x.numel() // x.shape[1]], dtype=x.dtype, device=x.device)
        totals = all_reduce_sum(torch.cat([x.sum(dims), count]))
        n = float(totals[-1].detach())
        if n <= 1:
            raise ValueError(f"{type(self).__name__} needs more than one value per channel over all ranks' batches")
        mean = totals[:-1] / n
        var = all_reduce_sum(((x - mean.view(shape)) ** 2).sum(dims)) / n
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                f = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
                self.running_mean.mul_(1 - f).add_(mean.detach().to(self.running_mean.dtype), alpha=f)
                unbiased = var.detach() * (n / (n - 1))
                self.running_var.mul_(1 - f).add_(unbiased.to(self.running_var.dtype), alpha=f)
        y = (x - mean.view(shape)) * torch.rsqrt(var.view(shape) + self.eps)
        if self.affine:
            y = y * self.weight.view(shape) + self.bias.view(shape)
        return y.to(input.dtype)


class SyncedBatchNorm1d(_GlobalBatchStatistics, nn.BatchNorm1d):
    """``BatchNorm1d`` with global-batch statistics under DDP."""


class SyncedBatchNorm2d(_GlobalBatchStatistics, nn.BatchNorm2d):
    """``BatchNorm2d`` with global-batch statistics under DDP."""


class SyncedBatchNorm3d(_GlobalBatchStatistics, nn.BatchNorm3d):
    """``BatchNorm3d`` with global-batch statistics under DDP."""


_SYNCED: dict[type, type] = {nn.BatchNorm1d: SyncedBatchNorm1d, nn.BatchNorm2d: SyncedBatchNorm2d,
                             nn.BatchNorm3d: SyncedBatchNorm3d}


def convert_sync_batchnorm(model: nn.Module) -> int:
    """Make every plain ``BatchNorm1d/2d/3d`` of ``model`` synchronised, in place (the modules
    stay the same objects, so references to them stay valid); returns how many were converted.
    Subclasses with a forward of their own are left alone."""
    converted = 0
    for module in model.modules():
        synced = _SYNCED.get(type(module))
        if synced is not None:
            module.__class__ = synced
            converted += 1
    return converted
