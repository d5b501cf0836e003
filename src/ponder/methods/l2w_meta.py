"""L2W (Han et al., ECCV 2022) as steps: weighted exit losses, the meta step, one training iteration.

A mini-batch is split into halves ``T`` (train) and ``M`` (meta). Every ``meta_interval``
iterations the weight prediction network (WPN, :class:`ponder.nn.wpn.WeightPredictionNetwork`) is
meta-learned, then the backbone takes its real step on ``T`` with the updated WPN's weights:

1. a *virtual* SGD step of the backbone on ``T`` with the WPN-weighted loss
   ``L_T(w) = sum_k mean_i w[i,k] l[i,k]``: ``theta_hat = theta - lr * D(grad L_T)``, where ``D`` is
   the real optimizer's update (learning rate, momentum buffer, dampening, Nesterov, weight decay;
   :mod:`ponder.methods.virtual_sgd`); BN statistics of the real model are not touched;
2. the *meta loss* ``L_M`` on ``M`` at ``theta_hat``: each sample is assigned the exit the budgeted
   test would give it (target fractions ``P_k ~ q^k``, exit 1 takes its most confident share, ...
   the last exit the rest: :func:`ponder.nn.thresholds.assign_by_proportions`), and ``L_M`` is the
   sum over exits of the mean cross-entropy of exit ``k`` on its samples;
3. an update of the WPN alone with ``dL_M / dphi`` (its own optimizer, Adam in the paper).

**How the meta-gradient is computed.** ``theta_hat`` is affine in the gradient ``g = grad L_T``,
and ``g`` is linear in the weights, so with ``u = dL_M / dg`` (a backward pass from ``L_M`` through
the virtual step, first order) the chain rule gives ``dL_M / dw[i,k] = (J u)[i,k] / N``, where
``J u`` is the Jacobian-vector product of the per-sample, per-exit losses ``l`` at ``theta`` in
the direction ``u`` (forward-mode AD, :func:`loss_jvp`), and ``dL_M / dphi`` is one backward pass
through the WPN. No second-order backward is needed, the forward pass on ``T`` is shared by the
virtual and the real step, and across processes every collective is a plain all-reduce (the
virtual gradient, ``u``, the exit confidences of ``M``, a few means), so 2 processes compute what
1 process computes at the same global batch.

The model runs its compute-all executor in training mode (``exit_logits`` holds every exit).
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch
import torch.autograd.forward_ad as fwAD
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor
from torch.func import functional_call

from ponder.dist import unwrap
from ponder.methods.virtual_sgd import virtual_sgd_step
from ponder.models.base import PonderModel
from ponder.nn.thresholds import assign_by_proportions, exit_proportions
from ponder.nn.wpn import WeightPredictionNetwork, centre
from ponder.output import DynamicOutput

ORDERS = ("alternate", "both")

LossFn = Callable[[DynamicOutput, Tensor], Tensor]
"""``(output, targets [B]) -> [B, K]``: the per-sample loss of each exit that the WPN weights."""


def exit_confidences(exit_logits: Sequence[Tensor]) -> Tensor:
    """Each exit's max-softmax ``[B, K]`` (detached) for ``exit_logits`` ``K x [B, classes]``."""
    with torch.no_grad():
        return torch.stack([z.softmax(dim=1).amax(dim=1) for z in exit_logits], dim=1)


def exit_losses(exit_logits: Sequence[Tensor], targets: Tensor) -> tuple[Tensor, Tensor]:
    """``(losses [B, K], confidences [B, K])``: per-sample cross-entropy of each exit (with its graph)
    and each exit's max-softmax (detached), for ``exit_logits`` ``K x [B, classes]`` and ``targets [B]``."""
    losses = torch.stack([F.cross_entropy(z, targets, reduction="none") for z in exit_logits], dim=1)
    return losses, exit_confidences(exit_logits)


def cross_entropy_losses(out: DynamicOutput, targets: Tensor) -> Tensor:
    """The default :data:`LossFn`: per-sample cross-entropy of each exit ``[B, K]``."""
    return exit_losses(out.exit_logits, targets)[0]


def weighted_exit_loss(losses: Tensor, weights: Tensor) -> Tensor:
    """``sum_k mean_i weights[i, k] * losses[i, k]`` for ``[B, K]`` tensors (all weights 1: the plain multi-exit loss)."""
    return (weights * losses).mean(dim=0).sum()


class Processes:
    """How a step sees the other processes of a run; this default is one process (every sum is the identity).

    :class:`ponder.methods.l2w.L2W` lends the trainer's collectives through a subclass; every
    collective used is a plain sum (all-reduce) of a tensor with the same shape on every process.
    """

    rank, world_size = 0, 1

    def sum(self, t: Tensor) -> Tensor:
        """``t`` summed over processes."""
        return t

    def interleave(self, t: Tensor) -> Tensor:
        """``t [..., n]`` of every process as ``[..., n * world_size]`` in the order of the global batch:
        local sample ``j`` of process ``r`` at ``j * world_size + r`` (each process takes every
        ``world_size``-th sample of the global batch)."""
        if self.world_size == 1:
            return t
        slots = t.new_zeros(*t.shape, self.world_size)
        slots[..., self.rank] = t
        return self.sum(slots).flatten(-2)

    def local(self, t: Tensor) -> Tensor:
        """This process's samples of an interleaved ``t [..., n * world_size]``."""
        return t[..., self.rank :: self.world_size]


def _sum_all(procs: Processes, tensors: Sequence[Tensor]) -> list[Tensor]:
    """Each of ``tensors`` summed over processes, in one collective (a flat buffer)."""
    if procs.world_size == 1:
        return list(tensors)
    flat = procs.sum(torch.cat([t.reshape(-1) for t in tensors]))
    out, i = [], 0
    for t in tensors:
        out.append(flat[i : i + t.numel()].view_as(t))
        i += t.numel()
    return out


def _meta_loss(exit_logits: Sequence[Tensor], targets: Tensor, proportions: Tensor, procs: Processes) -> Tensor:
    """This process's share of the meta loss: samples are assigned over the global meta half, and
    exit ``k``'s cross-entropies are summed and divided by its global count (the shares sum to the loss)."""
    conf = exit_confidences(exit_logits).t().contiguous()  # [K, m]
    assigned = procs.local(assign_by_proportions(procs.interleave(conf), proportions))
    mine = F.one_hot(assigned, len(exit_logits)).to(conf.dtype)  # [m, K]
    counts = procs.sum(mine.sum(dim=0)).clamp(min=1)
    ce = torch.stack([F.cross_entropy(z, targets, reduction="none") for z in exit_logits], dim=1)
    return ((ce * mine).sum(dim=0) / counts).sum()


def meta_loss(exit_logits: Sequence[Tensor], targets: Tensor, proportions: Tensor) -> Tensor:
    """Cross-entropy of each sample at the exit the budgeted test would give it, summed over exits.

    ``exit_logits`` ``K x [N, classes]``, ``targets [N]``, ``proportions [K]`` (CPU, e.g.
    :func:`ponder.nn.thresholds.exit_proportions`). Samples are assigned by the exits' max-softmax
    (no gradient through the assignment); exit ``k`` contributes the mean cross-entropy over its
    samples, 0 when it has none (official L2W).
    """
    return _meta_loss(exit_logits, targets, proportions, Processes())


def functional_forward(net: nn.Module, params: dict[str, Tensor], images: Tensor) -> DynamicOutput:
    """``net(images)`` with ``params`` in place of its parameters and copies of its buffers (BN
    statistics of ``net`` stay as they are). A ponder model's cost ledger (measured on first use,
    without autograd) is measured beforehand with its own parameters."""
    if isinstance(net, PonderModel):
        net.ledger_for(images)
    buffers = {name: b.clone() for name, b in net.named_buffers()}
    return functional_call(net, {**params, **buffers}, (images,))


def loss_jvp(net: nn.Module, params: dict[str, Tensor], tangents: dict[str, Tensor], images: Tensor,
             targets: Tensor, losses_of: LossFn = cross_entropy_losses) -> Tensor:
    """Jacobian-vector product ``[B, K]``: the derivative of ``losses_of(net(images), targets)`` at the
    parameters ``params`` (every parameter, by name) in the direction ``tangents`` (a subset, by name).

    Forward-mode AD through ``net`` in its current mode, with copies of its buffers; no graph is
    built. Runs with autograd enabled, so the model takes its training code paths (and IMTA's
    gradient rescaling, whose tangent is rescaled as its gradient is).
    """
    with torch.enable_grad(), fwAD.dual_level():
        duals = {n: fwAD.make_dual(p, tangents[n]) if n in tangents else p for n, p in params.items()}
        losses = losses_of(functional_forward(net, duals, images), targets)
        tangent = fwAD.unpack_dual(losses).tangent
    return torch.zeros_like(losses.detach()) if tangent is None else tangent.detach()


def meta_surrogate(model: nn.Module, optimizer: torch.optim.Optimizer, wpn: WeightPredictionNetwork,
                   losses: Tensor, confidences: Tensor, leaves: dict[str, Tensor], train_images: Tensor,
                   train_targets: Tensor, meta_images: Tensor, meta_targets: Tensor, proportions: Tensor,
                   losses_of: LossFn = cross_entropy_losses, procs: Processes | None = None,
                   loss_scale: float = 1.0) -> tuple[Tensor, Tensor]:
    """``(surrogate, meta loss)``: a scalar whose gradient with respect to the WPN's parameters is
    the meta-gradient ``dL_M / dphi`` (summed over processes: this process's share), and ``L_M``
    (detached, the whole batch's). See the module doc for the formulation.

    Args:
        model: the backbone (DDP-wrapped or not); its parameters and the SGD ``optimizer``'s state
            define the virtual step, which steps the parameters that require gradients.
        losses: ``losses_of`` of the train half ``[n, K]``, with a graph to ``leaves``
            (name -> the tensor standing for that parameter: the parameter itself, or a detached copy).
        confidences: the train half's exit confidences ``[n, K]`` (the WPN's ``conf`` input).
        train_images / train_targets: the train half (again, for the Jacobian-vector product).
        meta_images / meta_targets: the meta half; ``proportions [K]`` the target exit fractions.
        procs: the processes the batch is split over (default: one).
        loss_scale: multiplies the train loss before its backward pass (AMP's loss scale; the
            gradient is divided by it again).
    """
    procs = procs or Processes()
    net = unwrap(model)
    params = {n: p for n, p in net.named_parameters()}
    names = [n for n, p in params.items() if p.requires_grad]
    n_all = float(procs.sum(losses.new_tensor(float(losses.shape[0]), dtype=torch.float64)))

    def batch_mean(t: Tensor) -> Tensor:
        return procs.sum(t.sum(dim=0, keepdim=True)) / n_all

    v = wpn.outputs(losses, confidences)  # [n, K], with a graph to the WPN
    weights = 1.0 + wpn.delta * centre(v.detach(), wpn.normalisation, batch_mean)
    train_loss = (weights * losses).sum() / n_all
    grads = torch.autograd.grad(train_loss * loss_scale, [leaves[n] for n in names], retain_graph=True,
                                allow_unused=True)
    used = [n for n, g in zip(names, grads) if g is not None]
    local = [g for g in grads if g is not None]
    total = _sum_all(procs, local)
    g_leaf = {n: (g.detach() / loss_scale if loss_scale != 1 else g.detach()).requires_grad_()
              for n, g in zip(used, total)}

    theta = {n: p.detach() for n, p in params.items()}
    stepped = virtual_sgd_step(optimizer, {n: params[n] for n in used}, g_leaf, start=theta)
    out = functional_forward(net, {**theta, **stepped}, meta_images)
    share = _meta_loss(out.exit_logits, meta_targets, proportions, procs)
    u_local = torch.autograd.grad(share, list(g_leaf.values()), allow_unused=True)
    u_local = [torch.zeros_like(g) if u is None else u for g, u in zip(g_leaf.values(), u_local)]
    u = dict(zip(used, _sum_all(procs, u_local)))

    d_weights = loss_jvp(net, theta, u, train_images, train_targets, losses_of) / n_all  # dL_M / dw [n, K]
    coeff = wpn.delta * centre(d_weights.to(v.dtype), wpn.normalisation, batch_mean)
    return (coeff * v).sum(), procs.sum(share.detach())


def meta_gradient(model: nn.Module, optimizer: torch.optim.Optimizer, wpn: WeightPredictionNetwork,
                  train_images: Tensor, train_targets: Tensor, meta_images: Tensor, meta_targets: Tensor,
                  proportions: Tensor, losses_of: LossFn = cross_entropy_losses) -> tuple[list[Tensor], Tensor]:
    """``(gradients, meta loss)``: the gradient of the meta loss on the meta half with respect to each
    of ``wpn.parameters()`` (in order), through a virtual step on the train half (one process;
    nothing of the model, its BN statistics or the optimizer changes)."""
    net = unwrap(model)
    leaves = {n: p.detach().requires_grad_(p.requires_grad) for n, p in net.named_parameters()}
    out = functional_forward(net, leaves, train_images)
    surrogate, loss = meta_surrogate(model, optimizer, wpn, losses_of(out, train_targets),
                                     exit_confidences(out.exit_logits), leaves, train_images, train_targets,
                                     meta_images, meta_targets, proportions, losses_of)
    wpn_params = list(wpn.parameters())
    grads = torch.autograd.grad(surrogate, wpn_params, allow_unused=True)
    return [torch.zeros_like(p) if g is None else g for p, g in zip(wpn_params, grads)], loss


class Steps(Processes):
    """How :func:`l2w_iteration` runs the backbone's forward pass and takes optimizer steps; this
    default is one process in full precision. The trainer's method subclasses it with its
    :class:`~ponder.engine.TrainContext` (DDP, AMP, non-finite checks)."""

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        self.model, self.optimizer = model, optimizer

    def forward(self, images: Tensor) -> DynamicOutput:
        """The real forward pass, back-propagated by :meth:`optimize`."""
        return self.model(images)

    def optimize(self, loss: Tensor, optimizer: torch.optim.Optimizer | None = None) -> float:
        """Zero ``optimizer``'s gradients (default: the backbone's), back-propagate ``loss`` into its
        parameters only, and step; across processes the gradients are averaged before the step."""
        optimizer = optimizer or self.optimizer
        optimizer.zero_grad(set_to_none=True)
        params = [p for group in optimizer.param_groups for p in group["params"] if p.requires_grad]
        loss.backward(inputs=params)
        optimizer.step()
        return float(loss.detach())

    def loss_scale(self) -> float:
        """The factor a loss is multiplied by before a backward pass (AMP); 1 here."""
        return 1.0


def l2w_iteration(model: nn.Module, optimizer: torch.optim.Optimizer, wpn: WeightPredictionNetwork,
                  wpn_optimizer: torch.optim.Optimizer, images: Tensor, targets: Tensor, iteration: int,
                  q: float = 0.75, meta_interval: int = 1, orders: str = "alternate",
                  losses_of: LossFn = cross_entropy_losses, steps: Steps | None = None) -> dict[str, float]:
    """One L2W training iteration on ``images [B, C, H, W]``, ``targets [B]``; returns scalars to log.

    The batch is split into halves (first ``B // 2``, rest). ``orders="alternate"``: the train half is
    the first on even ``iteration`` and the second on odd ones (one backbone step per iteration,
    as many as plain training); ``"both"`` (official code): both orders in turn, two backbone steps of
    half a batch each. Each order: one forward pass on the train half; when
    ``iteration % meta_interval == 0`` the WPN's update (:func:`meta_surrogate`, ``P_k ~ q^k``); then
    the backbone's step with the updated WPN's weights (detached) through the same forward pass.

    A batch of one sample cannot be split: it takes one backbone step with the WPN's current
    weights and no meta step (so every image still trains the backbone once per epoch).
    ``steps``: how forward passes and steps run (default :class:`Steps`: one process).
    """
    if orders not in ORDERS:
        raise ValueError(f"orders must be one of {', '.join(ORDERS)}, got {orders!r}")
    if meta_interval < 1:
        raise ValueError(f"meta_interval must be a positive number of iterations, got {meta_interval}")
    steps = steps or Steps(model, optimizer)
    half = images.shape[0] // 2
    halves = [(images[:half], targets[:half]), (images[half:], targets[half:])]
    if half == 0:
        pairs: list[tuple[int, int | None]] = [(1, None)]
    elif orders == "both":
        pairs = [(0, 1), (1, 0)]
    else:
        pairs = [(iteration % 2, 1 - iteration % 2)]
    proportions = exit_proportions(q, wpn.num_exits)
    metrics: dict[str, float] = {}
    for t, m in pairs:
        out = steps.forward(halves[t][0])
        losses = losses_of(out, halves[t][1])
        conf = exit_confidences(out.exit_logits)
        if m is not None and iteration % meta_interval == 0:
            leaves = dict(unwrap(model).named_parameters())
            surrogate, value = meta_surrogate(model, optimizer, wpn, losses, conf, leaves, *halves[t], *halves[m],
                                              proportions, losses_of, steps, steps.loss_scale())
            steps.optimize(surrogate * steps.world_size, wpn_optimizer)  # the optimizer averages over processes
            metrics["meta_loss"] = float(value)
        n_all = float(steps.sum(losses.new_tensor(float(losses.shape[0]), dtype=torch.float64)))
        with torch.no_grad():
            weights = wpn(losses, conf, lambda x: steps.sum(x.sum(dim=0, keepdim=True)) / n_all)
        loss = weighted_exit_loss(losses, weights)
        metrics["loss"] = steps.optimize(loss)
        metrics.update({f"weight_exit{k + 1}": float(v) for k, v in enumerate(weights.mean(dim=0))})
    return metrics


def build_wpn_optimizer(wpn: WeightPredictionNetwork, lr: float = 1e-4, weight_decay: float = 1e-4) -> torch.optim.Adam:
    """The paper's WPN optimizer: Adam, lr 1e-4, weight decay 1e-4; its group carries ``base_lr`` so
    :class:`ponder.engine.optim.LRSchedule` can decay it (cosine over training in the paper)."""
    return torch.optim.Adam([{"params": list(wpn.parameters()), "base_lr": lr}], lr=lr, weight_decay=weight_decay)
