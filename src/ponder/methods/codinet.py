"""CoDiNet's training (Wang et al., TPAMI 2021): the FLOPs L1 loss and consistency / diversity of paths.

Each image of a batch appears ``repeats`` times in a row (the loader's view, then :func:`shifted_views`
copies). The *path* of a sample is its routers' option masks, ``[blocks x 2]`` flattened; ``c_i`` is the
mean path of image ``i``'s copies::

    L = CE + flops_weight * | mean_b sum_blocks g_b - target_rate * blocks |        (FLOPs L1)
          + condiv_weight * (L_intra + L_inter)                                  (ConDiv)
    L_intra = mean_{copies j of image i} max(0, ||p_j - c_i|| - margin_intra)^2  (consistency)
    L_inter = mean_{images i < k} max(0, margin_inter - ||c_i - c_k||)^2          (diversity)

``g_b`` is the executed (hard, straight-through) output of a router. The official code takes the absolute
value of the batch *sum* (``|sum_b sum_blocks g - num_target * B|``); here it is per image (the same
divided by the batch size, so a weight does not depend on the batch). ``soft=True`` trains with the soft
Gumbel-softmax mix instead of the hard sample. Weights and margins are library defaults (the paper's are
not in its released code).
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from ponder.methods.base import Method, StepOutput, register_method
from ponder.methods.gated import gated_metrics, require_gated, shifted_views


def flops_l1_loss(executed: Tensor, num_target: float) -> Tensor:
    """``| mean_b executed[b] - num_target |`` for executed blocks per sample ``executed [B]``."""
    return (executed.mean() - num_target).abs()


def consistency_diversity(paths: Tensor, repeats: int, margin_intra: float, margin_inter: float) -> tuple[Tensor, Tensor]:
    """``(L_intra, L_inter)`` of the module docstring for ``paths [N * repeats, D]`` (an image's copies in a row)."""
    if paths.shape[0] % repeats:
        raise ValueError(f"{paths.shape[0]} paths are not whole groups of {repeats} copies")
    groups = paths.view(-1, repeats, paths.shape[1])
    centres = groups.mean(1)
    intra = F.relu((groups - centres[:, None]).norm(dim=2) - margin_intra).pow(2).mean()
    n = centres.shape[0]
    if n < 2:
        return intra, intra.new_zeros(())
    i, k = torch.triu_indices(n, n, offset=1, device=paths.device)
    inter = F.relu(margin_inter - (centres[i] - centres[k]).norm(dim=1)).pow(2).mean()
    return intra, inter


@register_method
class CoDiNet(Method):
    """CoDiNet's objective (module docstring). Options: ``target_rate`` (executed share of the blocks the
    FLOPs loss aims at, 0.6), ``flops_weight`` (0.1), ``condiv_weight`` (0.1), ``repeats`` (copies per
    image, 2), ``margin_intra`` (1.0), ``margin_inter`` (2.0), ``soft`` (False), ``padding`` (4: the
    copies' random shift)."""

    name = "codinet"

    def __init__(self, model: nn.Module, target_rate: float = 0.6, flops_weight: float = 0.1,
                 condiv_weight: float = 0.1, repeats: int = 2, margin_intra: float = 1.0, margin_inter: float = 2.0,
                 soft: bool = False, padding: int = 4) -> None:
        super().__init__(model)
        net = require_gated(model, self.name)
        if repeats < 1:
            raise ValueError(f"codinet repeats (copies per image) must be >= 1, got {repeats}")
        if not 0.0 <= target_rate <= 1.0:
            raise ValueError(f"codinet target_rate must be in [0, 1], got {target_rate}")
        self.num_target = float(target_rate) * net.num_blocks
        self.flops_weight, self.condiv_weight = float(flops_weight), float(condiv_weight)
        self.repeats, self.margin_intra, self.margin_inter = int(repeats), float(margin_intra), float(margin_inter)
        self.padding = int(padding)
        net.train_decisions = "gumbel_soft" if soft else "gumbel"

    def copies(self, images: Tensor, targets: Tensor) -> tuple[Tensor, Tensor]:
        """Each image ``repeats`` times in a row: the given view, then shifted and flipped copies."""
        r = self.repeats
        x = images.repeat_interleave(r, 0)
        if r > 1:
            others = torch.arange(x.shape[0], device=x.device) % r != 0
            x = x.clone()
            x[others] = shifted_views(x[others], self.padding)
        return x, targets.repeat_interleave(r, 0)

    def training_step(self, model: nn.Module, images: Tensor, targets: Tensor) -> StepOutput:
        x, y = self.copies(images, targets)
        out = model(x)
        ce = F.cross_entropy(out.logits, y)
        masks = out.extras["router_masks"]
        flops = self.flops_weight * flops_l1_loss(masks[..., -1].sum(1), self.num_target)
        intra, inter = consistency_diversity(masks.flatten(1), self.repeats, self.margin_intra, self.margin_inter)
        loss = ce + flops + self.condiv_weight * (intra + inter)
        metrics = {"ce": ce.item(), "flops": flops.item(), "intra": intra.item(), "inter": inter.item(),
                   **gated_metrics(out, y)}
        return StepOutput(loss=loss, metrics=metrics, output=out)
