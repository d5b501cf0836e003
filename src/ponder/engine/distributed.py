"""Multi-process training under ``torchrun``: process group, DDP wrapping, cross-rank reductions.

``torchrun --nproc_per_node N ...`` sets ``WORLD_SIZE``, ``RANK`` and ``LOCAL_RANK``;
:func:`init_distributed` reads them and joins the process group (NCCL on CUDA, gloo on
CPU). Only rank 0 writes files and shows progress; metrics are averaged over ranks.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
import torch.nn as nn


@dataclass(frozen=True)
class DistInfo:
    """Where this process sits: ``rank`` of ``world_size`` processes (``local_rank`` on its node)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def env_world_size() -> int:
    """``WORLD_SIZE`` from the environment (1 when not launched by torchrun)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def resolve_device(name: str, info: DistInfo | None = None) -> torch.device:
    """``auto`` -> CUDA when available, else CPU; under torchrun each rank takes ``cuda:LOCAL_RANK``."""
    name = name.lower()
    if name not in ("auto", "cpu", "cuda") and not name.startswith("cuda:"):
        raise ValueError(f"unknown train.device {name!r}; use auto, cpu or cuda")
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ValueError("train.device is cuda but no CUDA device is available; set train.device=cpu")
        if name == "cuda":
            return torch.device("cuda", info.local_rank if info else torch.cuda.current_device())
    return torch.device(name)


def init_distributed(device_name: str = "auto") -> tuple[DistInfo, torch.device]:
    """Join the torchrun process group when ``WORLD_SIZE > 1``; returns this rank's info and device."""
    world = env_world_size()
    if world <= 1:
        return DistInfo(), resolve_device(device_name)
    for var in ("RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        if var not in os.environ:
            raise RuntimeError(f"WORLD_SIZE={world} but {var} is not set; launch multi-process training with torchrun")
    info = DistInfo(int(os.environ["RANK"]), world, int(os.environ["LOCAL_RANK"]))
    device = resolve_device(device_name, info)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        kwargs = {"device_id": device} if device.type == "cuda" else {}
        dist.init_process_group(backend=backend, **kwargs)
    return info, device


def shutdown_distributed() -> None:
    """Leave the process group (no-op when not initialised).

    Every rank waits at a barrier first, so no rank tears down its gloo threads while a peer is
    still talking to it (seen as ``terminate called without an active exception`` in a peer).
    """
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def is_static_model(model: nn.Module) -> bool:
    """True for static ponder models, whose every parameter gets a gradient in every step."""
    from ponder.models.base import PonderModel

    return isinstance(model, PonderModel) and not model.is_dynamic


def wrap_ddp(model: nn.Module, device: torch.device, find_unused_parameters: bool | None = None) -> nn.Module:
    """Wrap ``model`` in DistributedDataParallel.

    ``find_unused_parameters=None`` (auto) turns it on for every model but the static
    ResNets: dynamic models skip blocks, exits or policies, leaving parameters without grads.
    """
    from torch.nn.parallel import DistributedDataParallel

    if find_unused_parameters is None:
        find_unused_parameters = not is_static_model(model)
    ids = [device.index] if device.type == "cuda" else None
    return DistributedDataParallel(model, device_ids=ids, find_unused_parameters=find_unused_parameters)


def all_reduce_sums(values: dict[str, float], device: torch.device) -> dict[str, float]:
    """Sum each scalar over ranks (identity when not distributed); keys must match across ranks."""
    if not (dist.is_available() and dist.is_initialized()) or not values:
        return dict(values)
    keys = sorted(values)
    t = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return dict(zip(keys, t.tolist()))


def all_true(flag: bool, device: torch.device) -> bool:
    """Whether ``flag`` holds on every rank."""
    if not (dist.is_available() and dist.is_initialized()):
        return flag
    t = torch.tensor([1 if flag else 0], dtype=torch.int32, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return bool(t.item())


class _AllReduceSum(torch.autograd.Function):
    """Sum over ranks whose gradient is the sum over ranks of the incoming gradients."""

    @staticmethod
    def forward(ctx: Any, tensor: torch.Tensor) -> torch.Tensor:
        out = tensor.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(out)
        return out

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
        return _AllReduceSum.apply(grad)


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum of ``tensor`` over ranks, differentiable: rank ``r``'s input gets the sum over ranks of
    the gradients of the output (every rank must back-propagate through it). Identity in one process."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return tensor
    return _AllReduceSum.apply(tensor)


def broadcast_buffers(model: nn.Module, src: int = 0) -> None:
    """Copy rank ``src``'s buffers (BN running statistics) to every rank, so all ranks evaluate
    the model that rank 0 saves (DDP syncs them only at the start of each training forward)."""
    if not (dist.is_available() and dist.is_initialized()):
        return
    for buf in model.buffers():
        dist.broadcast(buf, src)


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
