"""L2W (Han et al., ECCV 2022) as a trainer method: ``method: {name: l2w, kwargs: {...}}``.

A thin :class:`~ponder.methods.base.Method` over :func:`ponder.methods.l2w_meta.l2w_iteration`:
the weight prediction network (WPN) and its Adam are method-owned (``ctx.add_module`` /
``ctx.add_optimizer`` with the run's cosine factor), so a resumed run continues exactly; the meta
step reads the run's real SGD optimizer; forward passes and steps go through the trainer's
context (DDP, AMP, non-finite checks), and every cross-process sum is ``ctx.all_reduce_mean``.

The per-exit losses are :meth:`MultiExit.exit_losses`, so the IMTA options work in both stages:
``gradient_equilibrium: true`` (stage 1) and ``collaboration: true`` with ``kd_gamma`` (stage 2:
only the collaboration heads train, and the virtual step steps only them).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
import torch.nn as nn
from torch import Tensor

from ponder.methods.base import StepOutput, register_method
from ponder.methods.l2w_meta import ORDERS, Steps, build_wpn_optimizer, l2w_iteration
from ponder.methods.multi_exit import MultiExit
from ponder.nn.wpn import WeightPredictionNetwork
from ponder.output import DynamicOutput

if TYPE_CHECKING:
    from ponder.engine.context import TrainContext


class ContextSteps(Steps):
    """:class:`~ponder.methods.l2w_meta.Steps` through the trainer: forward passes through ``ctx.net``
    under ``ctx.autocast()``, steps with ``ctx.optimize``, sums over ranks with ``ctx.all_reduce_mean``."""

    def __init__(self, ctx: TrainContext, prepare: Any) -> None:
        super().__init__(ctx.model, ctx.optimizer)
        self.ctx, self.prepare = ctx, prepare
        self.rank, self.world_size = ctx.dist.rank, ctx.dist.world_size

    def forward(self, images: Tensor) -> DynamicOutput:
        self.prepare(self.ctx.net)
        with self.ctx.autocast():
            return self.ctx.net(images)

    def optimize(self, loss: Tensor, optimizer: torch.optim.Optimizer | None = None) -> float:
        return self.ctx.optimize(loss, optimizer)

    def sum(self, t: Tensor) -> Tensor:
        return self.ctx.all_reduce_mean(t) * self.world_size if self.world_size > 1 else t

    def loss_scale(self) -> float:
        return float(self.ctx.scaler.get_scale()) if self.ctx.scaler.is_enabled() else 1.0


@register_method
class L2W(MultiExit):
    """Per-sample, per-exit loss weights from a meta-learned WPN (see :mod:`ponder.methods.l2w_meta`).

    Options (recipe ``method.kwargs``; paper values for CIFAR / ImageNet in brackets):
        wpn_depth, wpn_width: the WPN's hidden layers and width (1, 500).
        wpn_input: ``loss`` | ``conf`` | ``both`` (``loss``).
        normalisation: ``col`` | ``row`` | ``mat`` (``col`` / ``mat``); delta: the weights' spread (0.8 / 0.3).
        q: target exit fractions ``P_k ~ q^k`` of the meta loss (0.75; tune it on the held-out split).
        meta_interval: ``I``, a meta step every ``I`` iterations (1 / 100).
        orders: ``both`` (each half trains once per batch, official) | ``alternate``.
        wpn_lr, wpn_weight_decay: the WPN's Adam, cosine-decayed with the run's schedule (1e-4, 1e-4).
        label_smoothing and the IMTA options: as :class:`~ponder.methods.multi_exit.MultiExit`.

    The virtual step follows the run's optimizer, which must be SGD (``optim.name: sgd``). A batch
    of one image (a last short batch) takes one backbone step with the WPN's current weights and
    no meta step. The WPN's meta step runs in full precision under AMP.
    """

    name = "l2w"

    def __init__(self, model: nn.Module, wpn_depth: int = 1, wpn_width: int = 500, wpn_input: str = "loss",
                 normalisation: str = "col", delta: float = 0.8, q: float = 0.75, meta_interval: int = 1,
                 orders: str = "both", wpn_lr: float = 1e-4, wpn_weight_decay: float = 1e-4,
                 label_smoothing: float = 0.0, gradient_equilibrium: bool = False, collaboration: bool = False,
                 kd_gamma: float = 0.0, kd_temperature: float = 1.0, kd_reduction: str = "batchmean",
                 freeze_bn: bool = False) -> None:
        super().__init__(model, label_smoothing=label_smoothing, gradient_equilibrium=gradient_equilibrium,
                         collaboration=collaboration, kd_gamma=kd_gamma, kd_temperature=kd_temperature,
                         kd_reduction=kd_reduction, freeze_bn=freeze_bn)
        if orders not in ORDERS:
            raise ValueError(f"orders must be one of {', '.join(ORDERS)}, got {orders!r}")
        if meta_interval < 1 or q <= 0 or wpn_lr <= 0 or wpn_weight_decay < 0:
            raise ValueError(f"l2w needs meta_interval >= 1, q > 0, wpn_lr > 0 and wpn_weight_decay >= 0, "
                             f"got {meta_interval}, {q}, {wpn_lr}, {wpn_weight_decay}")
        num_exits = getattr(model, "module", model).num_exits
        self.wpn = WeightPredictionNetwork(num_exits, wpn_depth, wpn_width, wpn_input, normalisation, delta)
        self.q, self.meta_interval, self.orders = float(q), int(meta_interval), orders
        self.wpn_lr, self.wpn_weight_decay = float(wpn_lr), float(wpn_weight_decay)
        self.last_meta_loss = 0.0  # logged on every batch (the latest meta step's), so epoch means stay means

    def setup(self, ctx: TrainContext) -> None:
        if not isinstance(ctx.optimizer, torch.optim.SGD):
            raise ValueError(f"l2w's virtual step follows an SGD optimizer, got {type(ctx.optimizer).__name__}; "
                             f"set optim.name: sgd in the recipe")
        if ctx.config.train.sync_batchnorm and ctx.dist.enabled:
            raise ValueError("l2w's meta-gradient takes a forward-mode derivative, which synced BatchNorm does not "
                             "have; set train.sync_batchnorm: false")
        self.wpn = ctx.add_module("wpn", self.wpn)
        self.wpn_optimizer = ctx.add_optimizer(
            "wpn", build_wpn_optimizer(self.wpn, self.wpn_lr, self.wpn_weight_decay), lr_factor=ctx.schedule.factor)

    def train_step(self, ctx: TrainContext, images: Tensor, targets: Tensor) -> StepOutput:
        metrics = l2w_iteration(ctx.model, ctx.optimizer, self.wpn, self.wpn_optimizer, images, targets,
                                ctx.iteration, self.q, self.meta_interval, self.orders, self.exit_losses,
                                ContextSteps(ctx, self.prepare))
        self.last_meta_loss = metrics.pop("meta_loss", self.last_meta_loss)
        loss = metrics.pop("loss")
        return StepOutput(loss=torch.tensor(loss), metrics={"meta_loss": self.last_meta_loss, **metrics})

    def training_step(self, model: nn.Module, images: Tensor, targets: Tensor) -> StepOutput:
        raise NotImplementedError("method l2w trains through its train_step hook with a TrainContext; "
                                  "train it with ponder.engine.Trainer (ponder train)")

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "last_meta_loss": self.last_meta_loss}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.last_meta_loss = float(state.get("last_meta_loss", 0.0))
