"""L2W's meta-gradient by the paper's formula, with second-order autograd: the reference that the
library's first-order formulation (``ponder.methods.l2w_meta``: a backward pass through the virtual
step and a Jacobian-vector product) is held to.

``virtual_parameters`` takes a differentiable virtual step (``create_graph=True``); ``meta_gradient``
back-propagates the meta loss through it to the WPN. Slow, direct, one process.
"""

from __future__ import annotations

import torch
import torch.nn as nn
from torch import Tensor

from ponder.dist import unwrap
from ponder.methods.l2w_meta import (cross_entropy_losses, exit_confidences, functional_forward, meta_loss,
                                     weighted_exit_loss)
from ponder.methods.virtual_sgd import virtual_sgd_step
from ponder.nn.wpn import WeightPredictionNetwork


def virtual_parameters(model: nn.Module, optimizer: torch.optim.Optimizer, wpn: WeightPredictionNetwork,
                       images: Tensor, targets: Tensor, losses_of=cross_entropy_losses) -> tuple[dict[str, Tensor], Tensor]:
    """``(theta_hat, weights [B, K])``: the parameters after a virtual step of the real SGD ``optimizer`` on
    the WPN-weighted loss, differentiable in the WPN's parameters; nothing of the model or optimizer changes."""
    net = unwrap(model)
    params = dict(net.named_parameters())
    theta = {n: p.detach().requires_grad_(p.requires_grad) for n, p in params.items()}
    out = functional_forward(net, theta, images)
    losses = losses_of(out, targets)
    weights = wpn(losses, exit_confidences(out.exit_logits))
    trainable = [n for n, t in theta.items() if t.requires_grad]
    grads = torch.autograd.grad(weighted_exit_loss(losses, weights), [theta[n] for n in trainable],
                                create_graph=True, allow_unused=True)
    return virtual_sgd_step(optimizer, params, dict(zip(trainable, grads)), start=theta), weights


def meta_gradient(model, optimizer, wpn, train_images, train_targets, meta_images, meta_targets, proportions,
                  losses_of=cross_entropy_losses) -> tuple[list[Tensor], Tensor]:
    """``(gradients of the meta loss w.r.t. wpn.parameters(), meta loss)`` by second-order autograd."""
    theta_hat, _ = virtual_parameters(model, optimizer, wpn, train_images, train_targets, losses_of)
    out = functional_forward(unwrap(model), theta_hat, meta_images)
    loss = meta_loss(out.exit_logits, meta_targets, proportions)
    wpn_params = list(wpn.parameters())
    grads = torch.autograd.grad(loss, wpn_params, allow_unused=True)
    return [torch.zeros_like(p) if g is None else g for p, g in zip(wpn_params, grads)], loss.detach()
