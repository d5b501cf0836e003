"""Training the budget-aware multi-target model (Zampokas, Bouganis & Tzovaras, BMVC 2024).

Round-robin: iteration ``k`` trains only budget ``b = k mod n`` (``ctx.iteration``, so the order survives a
resume), with that budget's mask units and BatchNorms selected, on::

    L = w_b * [ CE(s, y) + 10 * L_sparsity(theta_b) + alpha_kd * T^2 * KL(softmax(t / T) || softmax(s / T)) ]

``L_sparsity`` is DynConv's criterion (:func:`ponder.methods.dynconv.sparsity_loss`) with the budget's
target; ``t`` are a frozen teacher's logits (``teacher``: a dense base run, or one run per budget, e.g. the
single-budget DynConv models; none by default), ``T = 10`` (the paper's best), ``alpha_kd = 0.01``. The
Gumbel temperature, noise and bound annealing follow DynConv's schedule.

**Target-aware loss weights.** After every epoch each budget's accuracy ``acc_b`` is measured on the
held-out split (``ctx.collect``) and the weights are recomputed from its gap to the budget's target
accuracy ``tgt_b`` (a single-budget model's accuracy): ``r_b = (tgt_b - acc_b)^2`` (``awareness="l2"``,
the default), ``1 - acc_b / tgt_b`` (``"l1"``) and ``w_b = n * r_b / sum_b' r_b'``; ``"none"`` keeps every
``w_b = 1``. All weights are 1 in the first epoch, and whenever every ``r_b`` is 0. ``l2`` weighs any gap,
whichever its sign; ``l1`` follows the official formula, so a budget that beats its target while another
lags gets a negative weight (its loss is pushed up) - kept as published, for the ablation.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
from torch import Tensor

from ponder.methods.base import StepOutput, register_method
from ponder.methods.distill import kd_loss, load_teacher
from ponder.methods.dynconv import ANNEAL_FRACTION, SPARSITY_WEIGHT, DynConvSparsity
from ponder.models.dynconv_multi import MultiBudgetMixin

AWARENESS = ("l2", "l1", "none")
KD_WEIGHT = 0.01
KD_TEMPERATURE = 10.0


def awareness_weights(accuracy: list[float], targets: list[float] | None, metric: str) -> list[float]:
    """Loss weights ``w_b`` from held-out accuracies and target accuracies (module docstring)."""
    n = len(accuracy)
    if metric not in AWARENESS:
        raise ValueError(f"awareness must be one of {AWARENESS}, got {metric!r}")
    if metric == "none":
        return [1.0] * n
    if targets is None or len(targets) != n:
        raise ValueError(f"awareness {metric!r} needs one target accuracy per budget ({n}), got {targets!r}")
    if metric == "l2":
        r = [(t - a) ** 2 for a, t in zip(accuracy, targets)]
    else:
        r = [1.0 - a / t for a, t in zip(accuracy, targets)]
    total = sum(r)
    if total == 0.0:
        return [1.0] * n
    return [n * x / total for x in r]


def run_accuracy(run_dir: str | Path) -> float:
    """The held-out accuracy (``val_acc``) of a run's last epoch, from its ``metrics.jsonl``."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        raise ValueError(f"target accuracy run {run_dir} has no metrics.jsonl; give a finished `ponder train` run "
                         f"or the accuracy as a number")
    lines = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    accs = [r["val_acc"] for r in lines if "val_acc" in r]
    if not accs:
        raise ValueError(f"run {run_dir} measured no held-out accuracy (val_acc); train it with data.val_size > 0 "
                         f"or give the accuracy as a number")
    return float(accs[-1])


@register_method
class MultiTarget(DynConvSparsity):
    """Round-robin multi-budget training with target-aware loss weights and distillation (module docstring)."""

    name = "multi_target"

    def __init__(self, model: nn.Module, awareness: str = "l2", target_accuracy: list[float | str] | None = None,
                 teacher: str | list[str] | None = None, kd_temperature: float = KD_TEMPERATURE,
                 kd_weight: float = KD_WEIGHT, weight: float = SPARSITY_WEIGHT, temperature: float | list[float] = 1.0,
                 temperature_milestones: list[float] | None = None, noise_off: float = 0.8,
                 anneal: float = ANNEAL_FRACTION, label_smoothing: float = 0.0) -> None:
        if not isinstance(model, MultiBudgetMixin):
            raise ValueError(f"method 'multi_target' trains the multi-budget models (dynconv_multi_* names); "
                             f"{type(model).__name__} is not one")
        super().__init__(model, weight=weight, temperature=temperature, temperature_milestones=temperature_milestones,
                         noise_off=noise_off, anneal=anneal, label_smoothing=label_smoothing)
        n = len(model.budgets)
        if awareness not in AWARENESS:
            raise ValueError(f"awareness must be one of {AWARENESS} (l2: squared accuracy gap), got {awareness!r}")
        self.targets = None if target_accuracy is None else [
            run_accuracy(t) if isinstance(t, str) else float(t) for t in target_accuracy]
        if awareness != "none" and (self.targets is None or len(self.targets) != n):
            raise ValueError(f"awareness {awareness!r} needs target_accuracy with one accuracy (or run directory) per "
                             f"budget {list(model.budgets)}; use awareness none to train without targets")
        teachers = [teacher] if isinstance(teacher, str) else list(teacher or [])
        if len(teachers) not in (0, 1, n):
            raise ValueError(f"teacher is one run directory (the dense base) or one per budget ({n}), got {teacher!r}")
        if kd_temperature <= 0 or kd_weight < 0:
            raise ValueError(f"kd_temperature must be > 0 and kd_weight >= 0, got {kd_temperature} and {kd_weight}")
        self.awareness, self.teacher_dirs = awareness, teachers
        self.kd_temperature, self.kd_weight = float(kd_temperature), float(kd_weight)
        self.loss_weights = [1.0] * n
        self.teachers: list[nn.Module] = []

    @property
    def budgets(self) -> tuple[float, ...]:
        return self.model.budgets

    def setup(self, ctx) -> None:
        """Load the frozen teachers on the run's device; check the held-out split is there when it is needed."""
        if self.awareness != "none" and ctx.val_loader is None:
            raise ValueError(f"awareness {self.awareness!r} measures each budget on the held-out split every epoch; "
                             f"set data.val_size > 0 in the recipe (or awareness none)")
        self.teachers = [load_teacher(t, ctx.device) for t in self.teacher_dirs]

    def teacher_logits(self, images: Tensor, budget: int) -> Tensor | None:
        """The frozen teacher's logits for ``budget`` (the one teacher, or the budget's own), or ``None``."""
        if not self.teachers:
            return None
        teacher = self.teachers[budget if len(self.teachers) > 1 else 0]
        with torch.no_grad():
            return teacher(images).logits

    def train_step(self, ctx, images: Tensor, targets: Tensor) -> StepOutput:
        """One iteration on budget ``ctx.iteration mod n``."""
        b = ctx.iteration % len(self.budgets)
        self.model.select_budget(b)
        with ctx.autocast():
            out = ctx.net(images)
            loss, metrics = self.objective(out, targets, self.budgets[b])
            teacher = self.teacher_logits(images, b)
            if teacher is not None:
                kd = kd_loss(out.logits.float(), teacher.float(), self.kd_temperature)
                loss = loss + self.kd_weight * kd
                metrics["kd"] = kd.item()
            loss = self.loss_weights[b] * loss
        ctx.optimize(loss)
        return StepOutput(loss=loss.detach(), metrics=metrics, output=out)

    def on_epoch_end(self, ctx) -> dict[str, Any]:
        """Each budget's held-out accuracy and MACs; the loss weights for the next epoch (logged as used)."""
        record: dict[str, Any] = {"loss_weights": list(self.loss_weights)}
        if ctx.val_loader is not None:
            accs, macs = [], []
            for b in range(len(self.budgets)):
                self.model.select_budget(b)
                summary = ctx.collect().summary()
                accs.append(summary["accuracy"])
                macs.append(summary["macs_mean"])
            self.loss_weights = awareness_weights(accs, self.targets, self.awareness)
            record.update(budget_acc=accs, budget_macs=macs)
        self.model.set_knob(self.model.knob.default)
        return record

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "loss_weights": list(self.loss_weights)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.loss_weights = [float(w) for w in state.get("loss_weights", self.loss_weights)]
