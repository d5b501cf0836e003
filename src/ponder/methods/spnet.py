"""SP-Net's training (Wang et al., ECCV 2022), as a method for any gated ResNet.

"Slowly progressing" dynamic inference: the routers and the features should not change course abruptly.
Applied to ``spnet_*`` models (SP-Net with its own router) or to ConvNet-AIG, CoDiNet and RDI-Net models
(SP-Net on their backbones and routers: the paper's Table 3). Per step, with ``s`` the student (the
model), ``t`` the slowly progressing auxiliary module (an EMA copy of the model, without gradient, in
train mode so that its BatchNorm statistics come from its own forward passes) and heads indexed from the
final one backwards (``s_0`` final, ``s_1`` after the second-to-last stage, ...)::

    L_ce   = sum_j w_j CE(s_j)                                        (multi-stage classification)
    L_kd   = beta * kd_base * sum_j w_j MSE(s_j, t_0)                 (the auxiliary module guides the outputs)
    L_path = alpha * path_base * MSE(router logits of s, router logits of t)   (... and the routers)
    L_feat = gamma * sum_stages mean_b (1 - cos(d1, d2))              (feature evolution)
             d1 = pool(f_mid) - pool(f_first), d2 = pool(f_last) - pool(f_mid): the first, middle
             (index n // 2) and last block outputs of a stage of n >= 3 blocks
    L_rate = rate_weight / L * sum_{l: t_l < 1} (t_l - z_l)^2          (ConvNet-AIG's target-rate loss)
    L = L_ce + L_kd + L_path + L_feat + L_rate

then gradients are clamped elementwise to ``+-grad_clamp``, the optimizer steps, and the auxiliary module
follows: ``theta_t <- m theta_t + (1 - m) theta_s`` (parameters only). The stage heads (global pool ->
Linear; on ImageNet-width stages a Linear to the final width first) are the method's own: trained with the
model, saved and resumed with the run, not part of the model (evaluation uses the final head only).

The paper's three coefficients: ``alpha`` (default 1.0) weighs the auxiliary module's guidance of the
routers, ``beta`` (0.5) its guidance of the outputs, ``gamma`` (1e-4) the feature-evolution loss. The
official code names none of them; with ``kd_base = 0.2`` and ``path_base = 0.1`` the paper's best values
give exactly the official code's loss (KD 0.1, router consistency 0.1, feature evolution 1e-4).
"""

from __future__ import annotations

import copy
from typing import TYPE_CHECKING, Any, Iterable, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from ponder.methods.base import Method, StepOutput, register_method
from ponder.methods.gated import gated_metrics, rate_targets, require_gated, target_rate_loss
from ponder.models.gated import GatedResNet

if TYPE_CHECKING:
    from ponder.engine.context import TrainContext


@torch.no_grad()
def ema_update(teacher: nn.Module, student: nn.Module, momentum: float) -> None:
    """``theta_t <- momentum * theta_t + (1 - momentum) * theta_s`` for every parameter (buffers untouched)."""
    for t, s in zip(teacher.parameters(), student.parameters()):
        t.mul_(momentum).add_(s.detach(), alpha=1.0 - momentum)


def feature_evolution_loss(block_features: Sequence[Tensor], stage_sizes: Sequence[int]) -> Tensor:
    """SP-Net's feature-evolution loss ``sum_stages mean_b (1 - cos(d1, d2))`` (module docstring).

    ``block_features``: every block's output ``[B, C, H, W]`` in order; ``stage_sizes``: blocks per stage.
    Stages of fewer than 3 blocks have no middle block and are left out.
    """
    total = block_features[0].new_zeros(())
    start = 0
    for n in stage_sizes:
        if n >= 3:
            first, mid, last = (block_features[start + j].mean((2, 3)) for j in (0, n // 2, n - 1))
            total = total + (1.0 - F.cosine_similarity(mid - first, last - mid, dim=1)).mean()
        start += n
    return total


def stage_widths(net: GatedResNet) -> list[int]:
    """Channels of each stage's output."""
    widths, i = [], -1
    for n in net.backbone.stage_sizes:
        i += n
        block = net.backbone.blocks[i]
        widths.append(getattr(block, "bn3", block.bn2).num_features)
    return widths


class StageHeads(nn.Module):
    """Classifiers on the outputs of the stages before the last: ``forward(stage_features) -> [logits]``,
    from the second-to-last stage backwards (``count`` heads). Global average pool -> Linear, with a Linear
    to ``project`` channels first where given (SP-Net's ImageNet heads)."""

    def __init__(self, widths: Sequence[int], num_classes: int, count: int, project: int | None = None):
        super().__init__()
        if count > len(widths) - 1:
            raise ValueError(f"{count} stage heads asked for a network of {len(widths)} stages; give at most "
                             f"{len(widths)} stage weights (the final head included)")
        chosen = list(widths[:-1])[::-1][:count]
        self.heads = nn.ModuleList(
            nn.Sequential(nn.Linear(c, project), nn.Linear(project, num_classes)) if project else nn.Linear(c, num_classes)
            for c in chosen)

    def forward(self, stage_features: Sequence[Tensor]) -> list[Tensor]:
        earlier = list(stage_features[:-1])[::-1]
        return [head(f.mean((2, 3))) for head, f in zip(self.heads, earlier)]


@register_method
class SPNet(Method):
    """SP-Net's training on any gated ResNet (module docstring).

    Options: ``alpha``, ``beta``, ``gamma`` (the paper's coefficients, defaults 1.0 / 0.5 / 1e-4);
    ``target`` (overall open rate of the rate loss, 0.8; or ``targets``, one per router) and
    ``rate_weight`` (2); ``momentum`` of the auxiliary module (0.6: the official CIFAR scripts; ImageNet
    0.9); ``stage_weights`` (final head first: 1.0, 0.2, 0.1); ``kd_base`` (0.2) and ``path_base`` (0.1);
    ``grad_clamp`` (0.5; 0 turns it off); ``project`` (channels the earlier heads project to first:
    ``None`` = the final width on ImageNet-width networks (>= 1024 channels), none on CIFAR).
    """

    name = "spnet"

    def __init__(self, model: nn.Module, alpha: float = 1.0, beta: float = 0.5, gamma: float = 1e-4,
                 target: float = 0.8, targets: list[float] | None = None, rate_weight: float = 2.0,
                 momentum: float = 0.6, stage_weights: list[float] | None = None, kd_base: float = 0.2,
                 path_base: float = 0.1, grad_clamp: float = 0.5, project: int | None = None) -> None:
        super().__init__(model)
        net = require_gated(model, self.name)
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"spnet momentum must be in [0, 1), got {momentum}")
        if grad_clamp < 0:
            raise ValueError(f"spnet grad_clamp must be >= 0 (0 = off), got {grad_clamp}")
        weights = [1.0, 0.2, 0.1] if stage_weights is None else [float(w) for w in stage_weights]
        if not weights:
            raise ValueError("spnet stage_weights needs at least the final head's weight")
        self.alpha, self.beta, self.gamma = float(alpha), float(beta), float(gamma)
        self.targets = rate_targets(net, target, targets)
        self.rate_weight, self.momentum = float(rate_weight), float(momentum)
        self.stage_weights, self.kd_base, self.path_base = weights, float(kd_base), float(path_base)
        self.grad_clamp = float(grad_clamp)
        widths = stage_widths(net)
        if project is None and widths[-1] >= 1024:
            project = widths[-1]
        self.heads = StageHeads(widths, net.num_classes, len(weights) - 1, project)
        self.teacher: GatedResNet | None = None
        net.train_decisions = "gumbel"

    def param_groups(self, model: nn.Module) -> Iterable[dict[str, Any]]:
        params = [p for p in model.parameters() if p.requires_grad]
        return [{"params": params + list(self.heads.parameters())}]

    def setup(self, ctx: TrainContext) -> None:
        self.heads = ctx.add_module("stage_heads", self.heads)
        self.teacher = ctx.add_module("teacher", copy.deepcopy(ctx.model).requires_grad_(False))

    def losses(self, out: Any, teacher_out: Any, heads: list[Tensor], targets: Tensor,
               stage_sizes: Sequence[int]) -> dict[str, Tensor]:
        """Every term of the loss (module docstring) from the student's output (with features), the auxiliary
        module's output and the stage heads' logits."""
        logits = [out.logits] + heads
        w = self.stage_weights
        ref = teacher_out.logits.detach()
        terms = {
            "ce": sum(wj * F.cross_entropy(s, targets) for wj, s in zip(w, logits)),
            "kd": self.beta * self.kd_base * sum(wj * F.mse_loss(s, ref) for wj, s in zip(w, logits)),
            "path": self.alpha * self.path_base * F.mse_loss(out.extras["router_logits"],
                                                             teacher_out.extras["router_logits"].detach()),
            "feat": self.gamma * feature_evolution_loss(out.extras["block_features"], stage_sizes),
            "rate": target_rate_loss(out.extras["usage"], self.targets, self.rate_weight),
        }
        return terms

    def train_step(self, ctx: TrainContext, images: Tensor, targets: Tensor) -> StepOutput:
        assert self.teacher is not None, "setup(ctx) runs before the first step"
        self.teacher.train()
        self.heads.train()
        with ctx.autocast():
            out = ctx.net(images, features=True)
            with torch.no_grad():
                teacher_out = self.teacher(images)
            terms = self.losses(out, teacher_out, self.heads(out.extras["stage_features"]), targets,
                                ctx.model.backbone.stage_sizes)
            loss = sum(terms.values())
        ctx.optimizer.zero_grad(set_to_none=True)
        ctx.backward(loss)
        ctx.all_reduce_grads(self.heads.parameters())  # DDP averages the model's gradients only
        if self.grad_clamp:
            ctx.scaler.unscale_(ctx.optimizer)  # (no-op without AMP)
            for group in ctx.optimizer.param_groups:
                for p in group["params"]:
                    if p.grad is not None:
                        p.grad.clamp_(-self.grad_clamp, self.grad_clamp)
        ctx.step()
        metrics = {k: v.item() for k, v in terms.items()}
        return StepOutput(loss=loss.detach(), metrics={**metrics, **gated_metrics(out, targets)}, output=out)

    def after_step(self, ctx: TrainContext) -> None:
        assert self.teacher is not None
        ema_update(self.teacher, ctx.model, self.momentum)
