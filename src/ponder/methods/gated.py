"""What the training methods of gated ResNets share (ConvNet-AIG, SP-Net, CoDiNet, RDI-Net): the model
check, the target-rate loss, the router learning-rate group, logged metrics and augmented views."""

from __future__ import annotations

from typing import Any, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from ponder.dist import unwrap
from ponder.models.gated import GatedResNet
from ponder.output import DynamicOutput


def require_gated(model: nn.Module, method: str) -> GatedResNet:
    """The :class:`GatedResNet` inside ``model`` (DDP-wrapped or not), or one clear error."""
    net = unwrap(model)
    if not isinstance(net, GatedResNet):
        raise ValueError(f"method {method!r} trains a gated ResNet (aig_*, spnet_*, codinet_*, rdinet_*), "
                         f"got {type(net).__name__}")
    return net


def rate_targets(net: GatedResNet, target: float | None, targets: Sequence[float] | None) -> list[float]:
    """Per-router targets: ``targets`` as given (one per block), else the model's schedule at ``target``."""
    if targets is not None:
        if len(targets) != net.num_blocks:
            raise ValueError(f"targets needs one open rate per block ({net.num_blocks}), got {len(targets)}")
        out = [float(t) for t in targets]
    else:
        out = net.target_rates(float(target if target is not None else 1.0))
    if not all(0.0 <= t <= 1.0 for t in out):
        raise ValueError(f"target open rates must be in [0, 1], got {out}")
    return out


def target_rate_loss(usage: Tensor, targets: Sequence[float], weight: float = 1.0) -> Tensor:
    """ConvNet-AIG's target-rate loss ``weight / L * sum_{l: t_l < 1} (t_l - mean_b usage[b, l])^2``.

    ``usage [B, L]``: each router's executed share per sample (hard forward, straight-through gradient);
    routers targeted at 1 are left out of the sum, but ``L`` counts every router.
    """
    t = torch.as_tensor(list(targets), dtype=usage.dtype, device=usage.device)
    if t.numel() != usage.shape[1]:
        raise ValueError(f"{t.numel()} targets for {usage.shape[1]} routers")
    rate = usage.mean(0)
    terms = torch.where(t < 1, (t - rate) ** 2, torch.zeros_like(rate))
    return weight * terms.sum() / usage.shape[1]


def router_lr_groups(net: GatedResNet, lr_scale: float) -> list[dict[str, Any]]:
    """Parameter groups: the routers' final layers at ``lr_scale`` times the learning rate (ConvNet-AIG's
    ``lrfact``), everything else at the run's."""
    final = {id(p) for layer in net.routers.final_layers() for p in layer.parameters()}
    params = [p for p in net.parameters() if p.requires_grad]
    return [{"params": [p for p in params if id(p) not in final]},
            {"params": [p for p in params if id(p) in final], "lr_scale": float(lr_scale)}]


def gated_metrics(out: DynamicOutput, targets: Tensor) -> dict[str, float]:
    """``acc``, ``macs`` (mean per image) and ``open`` (mean executed share of the blocks) of one batch."""
    with torch.no_grad():
        return {"acc": (out.logits.argmax(1) == targets).float().mean().item(), "macs": out.macs.mean().item(),
                "open": out.extras["usage"].float().mean().item()}


def shifted_views(images: Tensor, padding: int = 4) -> Tensor:
    """Another augmentation of each image ``[B, C, H, W]``: a random translation by up to ``padding`` pixels
    (zero fill) and a random horizontal flip, drawn per image from the global torch RNG (so a resumed run
    draws the same). The second views of RDI-Net and CoDiNet's copies."""
    b, _, h, w = images.shape
    padded = F.pad(images, (padding, padding, padding, padding))
    dy = torch.randint(0, 2 * padding + 1, (b,), device=images.device)
    dx = torch.randint(0, 2 * padding + 1, (b,), device=images.device)
    flip = torch.rand(b, device=images.device) < 0.5
    rows = (dy[:, None] + torch.arange(h, device=images.device))[:, None, :, None]
    cols = (dx[:, None] + torch.arange(w, device=images.device))[:, None, None, :]
    batch = torch.arange(b, device=images.device)[:, None, None, None]
    chans = torch.arange(images.shape[1], device=images.device)[None, :, None, None]
    out = padded[batch, chans, rows, cols]
    return torch.where(flip[:, None, None, None], out.flip(3), out)
