"""What the trainer lends a method's hooks: :class:`TrainContext`.

Simple methods never see it: they implement ``Method.training_step`` and the trainer does the
rest. Methods with steps of their own (several optimizer steps per batch, virtual steps,
networks or optimizers of their own, EMA teachers, a choice per iteration, measurements on the
held-out split) implement the hooks of :class:`ponder.methods.base.Method` and use the context
to back-propagate, step, synchronise and evaluate the way the trainer does: with AMP, DDP, the
non-finite checks, and state that resume restores exactly.
"""

from __future__ import annotations

import math
from contextlib import nullcontext
from typing import TYPE_CHECKING, Any, Callable, ContextManager, Iterable, TypeVar

import torch
import torch.distributed as dist
import torch.nn as nn
from torch import Tensor

from ponder.dist import gather_objects
from ponder.engine.distributed import DistInfo, all_reduce_sum, all_true, broadcast_buffers

if TYPE_CHECKING:
    from ponder.config import RunConfig
    from ponder.engine.optim import LRSchedule
    from ponder.engine.trainer import Trainer
    from ponder.evaluate.records import Records

M = TypeVar("M", bound=nn.Module)
O = TypeVar("O", bound=torch.optim.Optimizer)


class TrainContext:
    """The trainer's state and helpers, as a method's hooks see them (one per :class:`Trainer`).

    Attributes (read-only, always current):
        net: the model as it is trained: DDP-wrapped under ``torchrun``, else the model itself.
            Forward passes that are back-propagated with :meth:`backward` go through it.
        model: the unwrapped model (its attributes, ``functional_call``, forwards that are not
            back-propagated through DDP, such as a virtual step).
        optimizer: the run's optimizer over ``Method.param_groups``; its groups' ``lr`` are set
            by the run's schedule before each batch.
        scaler: the ``GradScaler`` (disabled unless CUDA AMP).
        schedule: the run's :class:`~ponder.engine.optim.LRSchedule` (``schedule.factor(i)``).
        config, device, dist: the run config, this process's device and :class:`DistInfo`.
        epoch: the 0-based epoch being trained (in ``on_epoch_end``: the one just trained).
        num_epochs, steps_per_epoch: the run's length (batches per epoch).
        iteration: the 0-based global index of the current batch (equal on every rank; what the
            LR schedule follows); batch_index: its index within the epoch.
        lr, lr_factor: the first group's current learning rate and the schedule's factor.
        train_loader, val_loader, test_loader: the run's loaders (val: the held-out split, or None).
    """

    def __init__(self, trainer: Trainer) -> None:
        self._trainer = trainer

    # ------------------------------------------------------------------ what is trained

    @property
    def net(self) -> nn.Module:
        return self._trainer.net

    @property
    def model(self) -> nn.Module:
        return self._trainer.model

    @property
    def optimizer(self) -> torch.optim.Optimizer:
        return self._trainer.optimizer

    @property
    def scaler(self) -> torch.amp.GradScaler:
        return self._trainer.scaler

    @property
    def schedule(self) -> LRSchedule:
        return self._trainer.schedule

    @property
    def config(self) -> RunConfig:
        return self._trainer.config

    @property
    def device(self) -> torch.device:
        return self._trainer.device

    @property
    def dist(self) -> DistInfo:
        return self._trainer.dist

    # ------------------------------------------------------------------ where the run is

    @property
    def epoch(self) -> int:
        return self._trainer.epoch

    @property
    def num_epochs(self) -> int:
        return self._trainer.config.train.epochs

    @property
    def steps_per_epoch(self) -> int:
        return self._trainer.steps_per_epoch

    @property
    def iteration(self) -> int:
        return self._trainer.step

    @property
    def batch_index(self) -> int:
        return self._trainer.batch_index

    @property
    def lr(self) -> float:
        return float(self.optimizer.param_groups[0]["lr"])

    @property
    def lr_factor(self) -> float:
        return self.schedule.factor(self.iteration)

    @property
    def train_loader(self) -> Iterable:
        return self._trainer.train_loader

    @property
    def val_loader(self) -> Iterable | None:
        return self._trainer.val_loader

    @property
    def test_loader(self) -> Iterable | None:
        return self._trainer.test_loader

    # ------------------------------------------------------------------ stepping

    def autocast(self) -> ContextManager[Any]:
        """Mixed precision for forward passes when the run uses AMP (CUDA), else a no-op."""
        return torch.autocast("cuda", dtype=torch.float16) if self._trainer.amp else nullcontext()

    def backward(self, loss: Tensor, inputs: Iterable[Tensor] | None = None, retain_graph: bool = False) -> float:
        """Back-propagate the scalar ``loss`` (scaled under AMP); returns its value.

        Raises :class:`~ponder.engine.trainer.NonFiniteLossError` on every rank when ``loss`` is
        NaN or infinite on any rank (before anything is changed). ``inputs`` limits the tensors
        that receive gradients (e.g. a method-owned network's parameters, so that a meta loss
        leaves the model's gradients, and DDP's hooks, alone).
        """
        value = float(loss.detach().float().item())
        if not all_true(math.isfinite(value), self.device):
            raise self._trainer.non_finite_error(value)
        wanted = list(inputs) if inputs is not None else None
        self.scaler.scale(loss).backward(inputs=wanted, retain_graph=retain_graph)
        return value

    def step(self, optimizer: torch.optim.Optimizer | None = None) -> None:
        """One step of ``optimizer`` (default: the run's) through the grad scaler.

        A method-owned optimizer's gradients are averaged over ranks first (DDP averages only
        the model's); the scaler is updated after every step, so several steps per batch are fine.
        """
        optimizer = optimizer if optimizer is not None else self.optimizer
        if optimizer is not self.optimizer:
            self.all_reduce_grads(p for group in optimizer.param_groups for p in group["params"])
        self.scaler.step(optimizer)
        self.scaler.update()

    def optimize(self, loss: Tensor, optimizer: torch.optim.Optimizer | None = None) -> float:
        """Zero ``optimizer``'s gradients, back-propagate ``loss`` and step; returns the loss value.

        With the run's optimizer this is exactly the step of a simple method. With a method-owned
        optimizer only its parameters receive gradients (``backward(inputs=...)``).
        """
        optimizer = optimizer if optimizer is not None else self.optimizer
        optimizer.zero_grad(set_to_none=True)
        own = optimizer is not self.optimizer
        params = [p for group in optimizer.param_groups for p in group["params"] if p.requires_grad] if own else None
        value = self.backward(loss, inputs=params)
        self.step(optimizer)
        return value

    # ------------------------------------------------------------------ synchronising ranks

    def all_reduce_grads(self, params: Iterable[Tensor]) -> None:
        """Average ``.grad`` of ``params`` over ranks in place (no-op in one process).

        A parameter without a gradient on some ranks counts as zero there; one without a
        gradient on every rank keeps none (so an optimizer still skips it).
        """
        if not self.dist.enabled:
            return
        params = list(params)
        has_grad = torch.tensor([p.grad is not None for p in params], dtype=torch.int32, device=self.device)
        dist.all_reduce(has_grad)
        for p, flag in zip(params, has_grad.tolist()):
            if not flag:
                continue
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            dist.all_reduce(p.grad)
            p.grad.div_(self.dist.world_size)

    def all_reduce_mean(self, tensor: Tensor) -> Tensor:
        """Mean of ``tensor`` over ranks, differentiable (its gradient is reduced as well).

        E.g. the gradient of a virtual step, so that every rank takes the step of the global batch.
        """
        if not self.dist.enabled:
            return tensor
        return all_reduce_sum(tensor) / self.dist.world_size

    def gather(self, obj: Any) -> list[Any]:
        """Every rank's picklable ``obj`` in rank order (``[obj]`` in one process)."""
        return gather_objects(obj)

    # ------------------------------------------------------------------ method-owned state

    def add_module(self, name: str, module: M) -> M:
        """Own ``module`` for the method: moved to the device, made equal on every rank (rank 0's
        parameters and buffers), saved in ``state.pt`` and restored on resume. Returns it."""
        module = module.to(self.device)
        if self.dist.enabled:
            with torch.no_grad():
                for p in module.parameters():
                    dist.broadcast(p.data, 0)
            broadcast_buffers(module)
        self._trainer.register_owned("modules", name, module)
        return module

    def add_optimizer(self, name: str, optimizer: O, lr_factor: Callable[[int], float] | None = None) -> O:
        """Own ``optimizer`` for the method: saved in ``state.pt`` and restored on resume.

        With ``lr_factor`` each group's ``lr`` is set to its initial ``lr`` times
        ``lr_factor(iteration)`` before every batch (``ctx.schedule.factor`` follows the run's
        schedule). :meth:`step` averages its gradients over ranks. Returns it.
        """
        for group in optimizer.param_groups:
            group.setdefault("base_lr", group["lr"])
        self._trainer.register_owned("optimizers", name, optimizer, lr_factor)
        return optimizer

    # ------------------------------------------------------------------ held-out data

    def collect(self, loader: Iterable | None = None) -> Records:
        """Per-sample records of the model (eval mode, no gradients) over ``loader``, default the
        held-out split; under DDP each rank evaluates its shard and every rank gets all records.

        The model's buffers are made rank 0's first, so every rank measures the same model.
        """
        from ponder.evaluate.records import collect

        loader = loader if loader is not None else self.val_loader
        if loader is None:
            raise ValueError("this method reads the held-out split during training; set data.val_size > 0 in the recipe")
        if self.dist.enabled:
            broadcast_buffers(self.model)
        with torch.no_grad():
            return collect(self.net, loader, self.device, distributed=self.dist.enabled, progress=False)
