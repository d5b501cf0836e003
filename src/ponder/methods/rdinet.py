"""RDI-Net's training (Wang et al., ICCV 2021): three stages, a cost loss and an InfoNCE relation loss.

Stages (``stage``; ``"all"`` runs them in order in one run, ``stage_epochs = [n1, n2]`` epochs for the
first two and the rest for the third):

1. ``"sample"``: the network trains under uniformly random paths (each block: skip, first conv only or
   whole, with equal probability; cross-entropy); the routers are not used.
2. ``"router"``: the network is frozen (no gradients, BatchNorm in eval mode); the routers train with
   hard Gumbel samples on two views of each image (the loader's and :func:`shifted_views`)::

       L = mean_views CE + cost_weight * mean_b (c_b - target_rate)^2 + nce_weight * InfoNCE

   ``c_b`` is the sample's MACs over its blocks (their options' ledger costs) divided by the whole
   blocks' MACs. InfoNCE (the sample relation module): a path is the router logits ``[blocks, 3]``, L2-
   normalised per block and flattened (unit norm); the query is the first view's path, the positive the
   second view's, the negatives a queue of ``queue_size`` earlier second-view paths (a method-owned buffer,
   saved and resumed); ``CE([q.k+, q.queue] / temperature, 0)``.
3. ``"network"``: the routers are frozen and decide deterministically (argmax); the network trains with
   cross-entropy on the paths they choose.

Weights, temperature and the rate target are library defaults (the official code is not runnable).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from ponder.methods.base import Method, StepOutput, register_method
from ponder.methods.gated import gated_metrics, require_gated, shifted_views
from ponder.models.gated import GatedResNet

if TYPE_CHECKING:
    from ponder.engine.context import TrainContext

STAGES = ("sample", "router", "network", "all")
_DECISIONS = {"sample": "uniform", "router": "gumbel", "network": "argmax"}


def path_vectors(router_logits: Tensor) -> Tensor:
    """``[B, blocks * K]`` unit-norm paths from router logits ``[B, blocks, K]`` (L2-normalised per block)."""
    return F.normalize(router_logits, dim=2).flatten(1) / math.sqrt(router_logits.shape[1])


def info_nce(query: Tensor, positive: Tensor, negatives: Tensor, temperature: float) -> Tensor:
    """``mean_b CE([q.k+, q.n_1, ..., q.n_M] / temperature, 0)`` for ``query`` / ``positive`` ``[B, D]`` and
    ``negatives [M, D]``."""
    pos = (query * positive).sum(1, keepdim=True)
    logits = torch.cat([pos, query @ negatives.t()], 1) / temperature
    return F.cross_entropy(logits, torch.zeros(query.shape[0], dtype=torch.long, device=query.device))


def relative_cost(masks: Tensor, option_macs: Tensor) -> Tensor:
    """``[B]`` each sample's MACs over its blocks under option masks ``[B, blocks, K]`` (option costs
    ``option_macs [blocks, K]``), divided by the MACs of running every block whole."""
    macs = option_macs.to(masks.dtype)
    return (masks * macs).sum((1, 2)) / macs[:, -1].sum()


class PathQueue(nn.Module):
    """A ring buffer of ``size`` unit-norm paths ``[size, dim]`` (the InfoNCE negatives), started with random
    unit vectors; :meth:`push` overwrites the oldest."""

    def __init__(self, size: int, dim: int):
        super().__init__()
        self.register_buffer("paths", F.normalize(torch.randn(size, dim), dim=1))
        self.register_buffer("ptr", torch.zeros((), dtype=torch.long))

    @torch.no_grad()
    def push(self, paths: Tensor) -> None:
        """Store ``paths [n, dim]`` (detached) in place of the oldest ones (the last ``size`` when ``n > size``)."""
        size = self.paths.shape[0]
        paths = paths.detach().to(self.paths.dtype)[-size:]
        rows = (self.ptr + torch.arange(paths.shape[0], device=self.paths.device)) % size
        self.paths.index_copy_(0, rows, paths)
        self.ptr.copy_((self.ptr + paths.shape[0]) % size)


@register_method
class RDINet(Method):
    """RDI-Net's three stages (module docstring). Options: ``stage`` (``"sample"``, ``"router"``,
    ``"network"`` or ``"all"`` with ``stage_epochs``), ``target_rate`` (0.6), ``cost_weight`` (2.0),
    ``nce_weight`` (0.1), ``temperature`` (0.1), ``queue_size`` (65,536), ``padding`` (4: the second
    view's random shift)."""

    name = "rdinet"

    def __init__(self, model: nn.Module, stage: str = "all", stage_epochs: list[int] | None = None,
                 target_rate: float = 0.6, cost_weight: float = 2.0, nce_weight: float = 0.1,
                 temperature: float = 0.1, queue_size: int = 65536, padding: int = 4) -> None:
        super().__init__(model)
        net = require_gated(model, self.name)
        if stage not in STAGES:
            raise ValueError(f"rdinet stage must be one of {STAGES}, got {stage!r}")
        if (stage == "all") != (stage_epochs is not None):
            raise ValueError("rdinet stage_epochs ([epochs of stage 1, epochs of stage 2]) goes with (and only with) "
                             "stage='all'")
        if stage_epochs is not None and (len(stage_epochs) != 2 or min(stage_epochs) < 0):
            raise ValueError(f"rdinet stage_epochs must be two epoch counts >= 0, got {stage_epochs}")
        if temperature <= 0 or queue_size < 1:
            raise ValueError(f"rdinet needs temperature > 0 and queue_size >= 1, got {temperature}, {queue_size}")
        self.stage, self.stage_epochs = stage, [int(e) for e in stage_epochs] if stage_epochs else None
        self.target_rate, self.cost_weight, self.nce_weight = float(target_rate), float(cost_weight), float(nce_weight)
        self.temperature, self.queue_size, self.padding = float(temperature), int(queue_size), int(padding)
        self.queue: PathQueue | None = None
        self._apply_stage(net, freeze=stage != "all")  # 'all': everything in the optimizer, frozen per epoch

    def current_stage(self) -> str:
        """``"sample"``, ``"router"`` or ``"network"`` at the current epoch."""
        if self.stage != "all":
            return self.stage
        n1, n2 = self.stage_epochs
        return "sample" if self.epoch < n1 else "router" if self.epoch < n1 + n2 else "network"

    def _apply_stage(self, net: GatedResNet, freeze: bool = True) -> None:
        stage = self.current_stage()
        if freeze:
            net.backbone.requires_grad_(stage != "router")
            net.routers.requires_grad_(stage == "router")
        if stage == "router":
            net.backbone.eval()
        if stage == "network":
            net.routers.eval()
        net.train_decisions = _DECISIONS[stage]

    def setup(self, ctx: TrainContext) -> None:
        net = require_gated(ctx.model, self.name)
        self.queue = ctx.add_module("path_queue", PathQueue(self.queue_size, net.num_blocks * net.num_options))

    def on_epoch_start(self, epoch: int, num_epochs: int) -> None:
        super().on_epoch_start(epoch, num_epochs)
        self._apply_stage(require_gated(self.model, self.name))

    def training_step(self, model: nn.Module, images: Tensor, targets: Tensor) -> StepOutput:
        net = require_gated(model, self.name)
        self._apply_stage(net, freeze=False)  # the trainer puts the whole model in train mode every epoch
        out = model(images)
        ce = F.cross_entropy(out.logits, targets)
        metrics: dict[str, Any] = {"stage": float(STAGES.index(self.current_stage()))}
        if self.current_stage() != "router":
            return StepOutput(loss=ce, metrics={"ce": ce.item(), **metrics, **gated_metrics(out, targets)}, output=out)
        assert self.queue is not None, "setup(ctx) runs before the first step"
        second = model(shifted_views(images, self.padding))
        ce = 0.5 * (ce + F.cross_entropy(second.logits, targets))
        macs = net.option_macs(tuple(images.shape[1:])).to(images.device)
        masks = torch.cat([out.extras["router_masks"], second.extras["router_masks"]])
        cost = self.cost_weight * (relative_cost(masks, macs) - self.target_rate).pow(2).mean()
        q, k = path_vectors(out.extras["router_logits"]), path_vectors(second.extras["router_logits"])
        nce = self.nce_weight * info_nce(q, k, self.queue.paths.clone(), self.temperature)  # push writes in place
        self.queue.push(k)
        metrics.update(ce=ce.item(), cost=cost.item(), nce=nce.item(), **gated_metrics(out, targets))
        return StepOutput(loss=ce + cost + nce, metrics=metrics, output=out)

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "stage": self.current_stage()}
