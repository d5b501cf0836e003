"""L2W (Han et al., ECCV 2022) as pure steps: weighted exit losses, the meta step, one training iteration.

A mini-batch is split into halves ``T`` (train) and ``M`` (meta). Every ``meta_interval``
iterations the weight prediction network (WPN, :class:`ponder.nn.wpn.WeightPredictionNetwork`) is
meta-learned:

1. a *virtual* SGD step of the backbone on ``T`` with the WPN-weighted loss
   ``sum_k mean_i w[i,k] CE_k(x_i)``, built with ``torch.func.functional_call`` from the real
   optimizer's learning rate, momentum buffers and weight decay (:mod:`ponder.methods.virtual_sgd`),
   differentiable in the WPN's parameters; BN statistics of the real model are not touched;
2. the *meta loss* on ``M`` through the virtual parameters: each sample is assigned an exit as the
   budgeted-batch test would assign it (target fractions ``P_k ~ q^k``, exit 1 takes its most
   confident share, ... the last exit the rest: :func:`ponder.nn.thresholds.assign_by_proportions`), and
   the loss is the sum over exits of the mean cross-entropy of exit ``k`` on its samples;
3. an update of the WPN alone with that loss's gradient (its own optimizer, Adam in the paper).

Then the real backbone step on ``T`` with the weights of the updated WPN (detached). The model
runs its compute-all executor in training mode (``exit_logits`` holds every exit).
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor
from torch.func import functional_call

from ponder.nn.thresholds import assign_by_proportions, exit_proportions
from ponder.dist import unwrap
from ponder.methods.virtual_sgd import virtual_sgd_step
from ponder.models.base import PonderModel
from ponder.nn.wpn import WeightPredictionNetwork
from ponder.output import DynamicOutput

ORDERS = ("alternate", "both")


def exit_losses(exit_logits: Sequence[Tensor], targets: Tensor) -> tuple[Tensor, Tensor]:
    """``(losses [B, K], confidences [B, K])``: per-sample cross-entropy of each exit (with its graph)
    and each exit's max-softmax (detached), for ``exit_logits`` ``K x [B, classes]`` and ``targets [B]``."""
    losses = torch.stack([F.cross_entropy(z, targets, reduction="none") for z in exit_logits], dim=1)
    with torch.no_grad():
        conf = torch.stack([z.softmax(dim=1).amax(dim=1) for z in exit_logits], dim=1)
    return losses, conf


def weighted_exit_loss(losses: Tensor, weights: Tensor) -> Tensor:
    """``sum_k mean_i weights[i, k] * losses[i, k]`` for ``[B, K]`` tensors (all weights 1: the plain multi-exit loss)."""
    return (weights * losses).mean(dim=0).sum()


def meta_loss(exit_logits: Sequence[Tensor], targets: Tensor, proportions: Tensor) -> Tensor:
    """Cross-entropy of each sample at the exit the budgeted test would give it, summed over exits.

    ``exit_logits`` ``K x [N, classes]``, ``targets [N]``, ``proportions [K]`` (CPU, e.g.
    :func:`ponder.nn.thresholds.exit_proportions`). Samples are assigned by the exits' max-softmax
    (no gradient through the assignment); exit ``k`` contributes the mean cross-entropy over its
    samples, 0 when it has none (official L2W).
    """
    conf = torch.stack([z.detach().softmax(dim=1).amax(dim=1) for z in exit_logits])
    assigned = assign_by_proportions(conf, proportions)
    total = exit_logits[0].new_zeros(())
    for k, z in enumerate(exit_logits):
        mine = (assigned == k).to(z.dtype)
        total = total + (F.cross_entropy(z, targets, reduction="none") * mine).sum() / mine.sum().clamp(min=1)
    return total


def functional_forward(net: nn.Module, params: dict[str, Tensor], images: Tensor) -> DynamicOutput:
    """``net(images)`` with ``params`` in place of its parameters and copies of its buffers (BN
    statistics of ``net`` stay as they are). A ponder model's cost ledger (measured on first use,
    without autograd) is measured beforehand with its own parameters."""
    if isinstance(net, PonderModel):
        net.ledger_for(images)
    buffers = {name: b.clone() for name, b in net.named_buffers()}
    return functional_call(net, {**params, **buffers}, (images,))


def virtual_parameters(model: nn.Module, optimizer: torch.optim.Optimizer, wpn: WeightPredictionNetwork,
                       images: Tensor, targets: Tensor) -> tuple[dict[str, Tensor], Tensor]:
    """``(theta_hat, weights [B, K])``: the backbone's parameters after a virtual step of the real SGD
    ``optimizer`` on the WPN-weighted loss of ``images [B, C, H, W]``, ``targets [B]``.

    ``theta_hat`` (name -> tensor, every parameter of the unwrapped model) is differentiable in the
    WPN's parameters; nothing of the model, its buffers or the optimizer changes.
    """
    net = unwrap(model)
    params = dict(net.named_parameters())
    theta = {n: p.detach().requires_grad_(p.requires_grad) for n, p in params.items()}
    out = functional_forward(net, theta, images)
    losses, conf = exit_losses(out.exit_logits, targets)
    weights = wpn(losses, conf)
    trainable = [n for n, t in theta.items() if t.requires_grad]
    grads = torch.autograd.grad(weighted_exit_loss(losses, weights), [theta[n] for n in trainable],
                                create_graph=True, allow_unused=True)
    return virtual_sgd_step(optimizer, params, dict(zip(trainable, grads)), start=theta), weights


def meta_gradient(model: nn.Module, optimizer: torch.optim.Optimizer, wpn: WeightPredictionNetwork,
                  train_images: Tensor, train_targets: Tensor, meta_images: Tensor, meta_targets: Tensor,
                  proportions: Tensor) -> tuple[list[Tensor], Tensor]:
    """``(gradients, meta loss)``: the gradient of the meta loss on the meta half with respect to each
    of ``wpn.parameters()`` (in order), through a virtual step on the train half (see the module doc)."""
    theta_hat, _ = virtual_parameters(model, optimizer, wpn, train_images, train_targets)
    out = functional_forward(unwrap(model), theta_hat, meta_images)
    loss = meta_loss(out.exit_logits, meta_targets, proportions)
    wpn_params = list(wpn.parameters())
    grads = torch.autograd.grad(loss, wpn_params, allow_unused=True)
    return [torch.zeros_like(p) if g is None else g for p, g in zip(wpn_params, grads)], loss.detach()


def meta_update(model: nn.Module, optimizer: torch.optim.Optimizer, wpn: WeightPredictionNetwork,
                wpn_optimizer: torch.optim.Optimizer, train_images: Tensor, train_targets: Tensor,
                meta_images: Tensor, meta_targets: Tensor, proportions: Tensor,
                sync_grads: Callable[[list[Tensor]], None] | None = None) -> Tensor:
    """One WPN update: :func:`meta_gradient`, then ``sync_grads`` on the gradients (e.g. an all-reduce
    mean across processes), then ``wpn_optimizer.step()``. Returns the meta loss (detached)."""
    grads, loss = meta_gradient(model, optimizer, wpn, train_images, train_targets, meta_images, meta_targets,
                                proportions)
    if sync_grads is not None:
        sync_grads(grads)
    for p, g in zip(wpn.parameters(), grads):
        p.grad = g
    wpn_optimizer.step()
    wpn_optimizer.zero_grad(set_to_none=True)
    return loss


def weighted_training_loss(model: nn.Module, wpn: WeightPredictionNetwork, images: Tensor,
                           targets: Tensor) -> tuple[Tensor, Tensor, DynamicOutput]:
    """``(loss, weights [B, K], output)``: the real forward of ``model`` and its loss weighted by the
    WPN's current weights, which carry no gradient (the backbone step)."""
    out = model(images)
    losses, conf = exit_losses(out.exit_logits, targets)
    with torch.no_grad():
        weights = wpn(losses, conf)
    return weighted_exit_loss(losses, weights), weights, out


def build_wpn_optimizer(wpn: WeightPredictionNetwork, lr: float = 1e-4, weight_decay: float = 1e-4) -> torch.optim.Adam:
    """The paper's WPN optimizer: Adam, lr 1e-4, weight decay 1e-4; its group carries ``base_lr`` so
    :class:`ponder.engine.optim.LRSchedule` can decay it (cosine over training in the paper)."""
    return torch.optim.Adam([{"params": list(wpn.parameters()), "base_lr": lr}], lr=lr, weight_decay=weight_decay)


def l2w_iteration(model: nn.Module, optimizer: torch.optim.Optimizer, wpn: WeightPredictionNetwork,
                  wpn_optimizer: torch.optim.Optimizer, images: Tensor, targets: Tensor, iteration: int,
                  q: float = 0.75, meta_interval: int = 1, orders: str = "alternate",
                  sync_grads: Callable[[list[Tensor]], None] | None = None) -> dict[str, float]:
    """One L2W training iteration on ``images [B, C, H, W]``, ``targets [B]``; returns scalars to log.

    The batch is split into halves (first ``B // 2``, rest). ``orders="alternate"``: the train half is
    the first on even ``iteration`` and the second on odd ones (one backbone step per iteration,
    as many as plain training); ``"both"`` (official code): both orders in turn, two backbone steps of
    half a batch each. Each order: when ``iteration % meta_interval == 0`` a :func:`meta_update`
    (target exit fractions ``P_k ~ q^k``), then a real step of ``optimizer`` on the train half with
    the updated WPN's weights.
    """
    if orders not in ORDERS:
        raise ValueError(f"orders must be one of {', '.join(ORDERS)}, got {orders!r}")
    if meta_interval < 1:
        raise ValueError(f"meta_interval must be a positive number of iterations, got {meta_interval}")
    half = images.shape[0] // 2
    if half == 0:
        raise ValueError("L2W splits each batch into two halves and needs at least 2 samples per batch")
    halves = [(images[:half], targets[:half]), (images[half:], targets[half:])]
    pairs = [(0, 1), (1, 0)] if orders == "both" else [(iteration % 2, 1 - iteration % 2)]
    proportions = exit_proportions(q, wpn.num_exits)
    metrics: dict[str, float] = {}
    for t, m in pairs:
        if iteration % meta_interval == 0:
            metrics["meta_loss"] = float(meta_update(model, optimizer, wpn, wpn_optimizer, *halves[t], *halves[m],
                                                     proportions, sync_grads))
        loss, weights, _ = weighted_training_loss(model, wpn, *halves[t])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        metrics["loss"] = float(loss.detach())
        metrics.update({f"weight_exit{k + 1}": float(v) for k, v in enumerate(weights.mean(dim=0))})
    return metrics
