"""BlockDrop's training objective: REINFORCE with a self-critical baseline, in two stages.

Per step the policy samples keep decisions ``u ~ Bernoulli(p')`` from the exploration-bounded
probabilities ``p' = alpha * p + (1 - alpha) * (1 - p)`` and the network runs under ``u``; a second,
gradient-free run uses the greedy decisions (``p >= 0.5``). With ``K`` blocks, the reward is
``R(u) = 1 - (|u| / K)^2`` if the prediction is correct, else ``-penalty`` (the paper's gamma), and
the advantage is ``R(u_sampled) - R(u_greedy)`` (self-critical baseline).

- ``stage="curriculum"`` (policy only; backbone frozen, in eval mode, not optimised): at epoch
  ``e`` the policy decides only the last ``(e + 1) * blocks_per_epoch`` blocks, the earlier ones are
  kept; ``loss = [sum_b -log pi(u_b) * A_b - beta * sum_b H(p'_b)] / B`` with the entropy term
  ``H = -sum_blocks p' log p'`` (paper defaults: penalty 1, beta 0.1, alpha 0.8; Adam lr 1e-3).
- ``stage="finetune"`` (policy and backbone, all blocks decided):
  ``loss = sum_b -log pi(u_b) * A_b + mean CE(f(x; u_sampled), y)`` (the policy-gradient term is
  summed over the batch, as in the official code: ``pg_reduction="sum"``; defaults penalty 5,
  beta 0; Adam lr 1e-4).
- ``stage="both"``: curriculum for ``curriculum_epochs`` epochs, then fine-tuning, in one run (the
  optimiser holds every parameter; the frozen backbone has no gradients during the curriculum, so
  Adam leaves it alone). A multistep schedule with a milestone at ``curriculum_epochs`` and gamma
  0.1 gives the stages' learning rates 1e-3 and 1e-4.
"""

from __future__ import annotations

from typing import Any, Iterable

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from ponder.dist import unwrap
from ponder.methods.base import Method, StepOutput, register_method
from ponder.models.blockdrop import BlockDropModel
from ponder.nn.policy import PROB_EPS, bound_probs

STAGES = ("curriculum", "finetune", "both")
_DEFAULTS = {  # the papers' / official code's per-stage defaults
    "curriculum": {"penalty": 1.0, "beta": 0.1, "pg_reduction": "mean"},
    "finetune": {"penalty": 5.0, "beta": 0.0, "pg_reduction": "sum"},
}


def blockdrop_reward(correct: Tensor, keep: Tensor, penalty: float) -> Tensor:
    """``[B]`` rewards: ``1 - (kept / K)^2`` where ``correct [B]`` else ``-penalty``; ``keep [B, K]`` 0/1."""
    frac = keep.float().sum(1) / keep.shape[1]
    return torch.where(correct, 1 - frac**2, torch.full_like(frac, -float(penalty)))


def bounded_entropy(sample_probs: Tensor) -> Tensor:
    """``[B]`` BlockDrop's entropy bonus ``-sum_blocks p' log p'`` (only this term, ``p'`` clamped)."""
    eps = max(PROB_EPS, torch.finfo(sample_probs.dtype).eps)
    p = sample_probs.clamp(eps, 1 - eps)
    return -(p * torch.log(p)).sum(1)


@register_method
class BlockDrop(Method):
    """BlockDrop's curriculum (policy only) and/or joint fine-tuning stage; see the module docstring.

    Options: ``stage`` ("curriculum" | "finetune" | "both": curriculum for ``curriculum_epochs``
    epochs, then fine-tuning, in one run), ``penalty`` (gamma >= 0), ``beta`` (entropy bonus) and
    ``pg_reduction`` ("mean" | "sum"; ``None`` = each stage's paper default), ``alpha``
    (exploration bound, 0.8), ``blocks_per_epoch`` (curriculum speed; 1 = the paper's).
    """

    name = "blockdrop"

    def __init__(self, model: nn.Module, stage: str = "curriculum", penalty: float | None = None,
                 alpha: float = 0.8, beta: float | None = None, blocks_per_epoch: int = 1,
                 pg_reduction: str | None = None, curriculum_epochs: int | None = None) -> None:
        super().__init__(model)
        if stage not in STAGES:
            raise ValueError(f"blockdrop stage must be one of {STAGES}, got {stage!r}")
        if (stage == "both") != (curriculum_epochs is not None):
            raise ValueError("curriculum_epochs is needed with (and only with) stage='both'")
        net = unwrap(model)
        if not isinstance(net, BlockDropModel):
            raise ValueError(f"method 'blockdrop' needs a BlockDrop model (blockdrop_*), got {type(net).__name__}")
        self.stage, self.curriculum_epochs = stage, curriculum_epochs
        self.penalty, self.beta, self.pg_reduction = penalty, beta, pg_reduction
        self.alpha = float(alpha)
        self.blocks_per_epoch = int(blocks_per_epoch)
        bound_probs(torch.zeros(1), self.alpha)  # validates alpha
        if penalty is not None and penalty < 0:
            raise ValueError(f"penalty (the paper's gamma) must be >= 0, got {penalty}; it is subtracted for wrong predictions")
        if pg_reduction not in (None, "mean", "sum"):
            raise ValueError(f"pg_reduction must be 'mean' or 'sum', got {pg_reduction!r}")
        if self.blocks_per_epoch < 1:
            raise ValueError(f"blocks_per_epoch must be >= 1, got {blocks_per_epoch}")
        # with stage='both' the backbone stays trainable until the trainer has built its optimizer
        self._apply_stage(net, freeze=stage != "both")

    def current_stage(self) -> str:
        """``"curriculum"`` or ``"finetune"`` at the current epoch."""
        if self.stage != "both":
            return self.stage
        return "curriculum" if self.epoch < self.curriculum_epochs else "finetune"

    def option(self, key: str) -> Any:
        """``penalty`` / ``beta`` / ``pg_reduction`` for the current stage (given value or paper default)."""
        value = getattr(self, key)
        return _DEFAULTS[self.current_stage()][key] if value is None else value

    def _apply_stage(self, net: nn.Module, freeze: bool = True) -> None:
        curriculum = self.current_stage() == "curriculum"
        if freeze:
            net.backbone.requires_grad_(not curriculum)
        if curriculum:
            net.backbone.eval()  # frozen: BN statistics stay those of the trained ResNet
        net.set_curriculum((self.epoch + 1) * self.blocks_per_epoch if curriculum else None)

    def param_groups(self, model: nn.Module) -> Iterable[dict[str, Any]]:
        """Curriculum: the policy only; fine-tuning (and 'both'): policy and backbone."""
        net = unwrap(model)
        if self.stage != "curriculum":
            return [{"params": list(net.parameters())}]
        backbone = {id(p) for p in net.backbone.parameters()}
        return [{"params": [p for p in net.parameters() if id(p) not in backbone]}]

    def on_epoch_start(self, epoch: int, num_epochs: int) -> None:
        super().on_epoch_start(epoch, num_epochs)
        self._apply_stage(unwrap(self.model))

    def training_step(self, model: nn.Module, images: Tensor, targets: Tensor) -> StepOutput:
        net = unwrap(model)
        self._apply_stage(net)
        penalty, beta = float(self.option("penalty")), float(self.option("beta"))
        out = model(images, sample=True, alpha=self.alpha)
        with torch.no_grad():
            greedy = model(images)
            correct = out.logits.argmax(1) == targets
            correct_greedy = greedy.logits.argmax(1) == targets
            reward = blockdrop_reward(correct, out.gates, penalty)
            baseline = blockdrop_reward(correct_greedy, greedy.gates, penalty)
            advantage = reward - baseline
        pg = -(out.extras["log_prob"] * advantage)
        loss = pg.sum() if self.option("pg_reduction") == "sum" else pg.mean()
        entropy = bounded_entropy(out.extras["sample_probs"])
        if beta:
            loss = loss - beta * entropy.mean()
        metrics = {
            "reward": reward.mean().item(), "advantage": advantage.mean().item(),
            "acc": correct.float().mean().item(), "acc_greedy": correct_greedy.float().mean().item(),
            "blocks": out.gates.sum(1).mean().item(), "blocks_greedy": greedy.gates.sum(1).mean().item(),
            "entropy": entropy.mean().item(), "decided": float(net.decided().sum().item()),
        }
        if self.current_stage() == "finetune":
            ce = F.cross_entropy(out.logits, targets)
            loss = loss + ce
            metrics["ce"] = ce.item()
        return StepOutput(loss=loss, metrics=metrics, output=out)

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "stage": self.current_stage()}
