"""The ``budget`` protocol: accuracy against mean MACs per image for any dynamic model, one knob for all.

For each target budget the model's :meth:`~ponder.models.base.DynamicModel.set_budget` moves its native
knob (exit thresholds, keep threshold, halting threshold, budget choice) to reach that mean MACs on
the **held-out** split (never the test set); the test set is then evaluated once at that setting with
the sparse executor. One point per target: the target, the knob value, the held-out MACs reached, and
the test accuracy and MACs mean / std.

Options (``ctx.options``): ``targets`` (a list of MACs per image) or ``fractions`` (of the dense
model's MACs; default 0.3, 0.4, ... 1.0); ``calibration_images`` (held-out images used, default 512).
A model with a discrete knob (``knob.choices``: the budgets of the multi-target model) gives, unless
``targets`` or ``fractions`` are named, one point per choice (its held-out MACs as the target).
Writes ``eval_budget.json`` (and ``budget_curve.png`` with matplotlib) in ``ctx.out_dir``.
"""

from __future__ import annotations

import json
from typing import Any, Iterable

import torch

from ponder.evaluate.protocols import EvalContext, register_protocol
from ponder.evaluate.records import collect
from ponder.models.base import DynamicModel
from ponder.nn.executor import get_executor, set_executor

DEFAULT_FRACTIONS = tuple(round(0.1 * i, 1) for i in range(3, 11))


def held_out_images(loader: Iterable, limit: int) -> torch.Tensor:
    """The first ``limit`` images of ``loader`` as one CPU tensor ``[N, C, H, W]``."""
    parts, n = [], 0
    for batch in loader:
        parts.append(batch[0][: limit - n].cpu())
        n += parts[-1].shape[0]
        if n >= limit:
            break
    if not parts:
        raise ValueError("the held-out split is empty; train with data.val_size > 0")
    return torch.cat(parts)


def calibrate_on(model: DynamicModel, loader: Iterable | None, limit: int = 512) -> int:
    """Calibrate ``model``'s budget knob on up to ``limit`` images of the held-out ``loader``; returns how many."""
    if loader is None:
        raise ValueError("a budget is fitted on the held-out split, but this run has none; train with "
                         "data.val_size > 0 (e.g. 5000 on CIFAR), or set the model's native knob instead")
    images = held_out_images(loader, limit)
    model.calibrate(images)
    return images.shape[0]


@register_protocol("budget")
def budget(ctx: EvalContext) -> dict:
    """The accuracy-vs-MACs curve from held-out budgets (module docstring)."""
    model = getattr(ctx.model, "module", ctx.model)
    if not isinstance(model, DynamicModel):
        raise ValueError(f"protocol 'budget' needs a dynamic model; {type(model).__name__} is static "
                         f"(use protocol 'standard')")
    n_cal = calibrate_on(model, ctx.val_loader, int(ctx.options.get("calibration_images", 512)))
    dense = model.dense_macs()
    targets = ctx.options.get("targets")
    choices = model.knob.choices if targets is None and "fractions" not in ctx.options else None
    if choices is not None:
        targets = [model.held_out_macs(c) for c in choices]
    elif targets is None:
        targets = [f * model.dense_macs() for f in ctx.options.get("fractions", DEFAULT_FRACTIONS)]
    before_knob, before_executor = model.get_knob(), get_executor(model)
    points = []
    try:
        set_executor(model, "sparse")
        for target in targets:
            reached = model.set_budget(float(target))
            rec = collect(model, ctx.test_loader, ctx.device, desc=f"budget {float(target):.3g}")
            s = rec.summary()
            points.append({"target_macs": float(target), "knob": _plain(model.get_knob()), "held_out_macs": reached,
                           "accuracy": s["accuracy"], "macs_mean": s["macs_mean"], "macs_std": s["macs_std"]})
    finally:
        model.set_knob(before_knob)
        set_executor(model, before_executor)
    report: dict[str, Any] = {"protocol": "budget", "model": ctx.config.model.name, "family": model.family,
                              "knob": model.knob.name, "calibration_images": n_cal, "dense_macs": dense,
                              "macs_unit": "conv+linear MACs", "points_by": "target" if choices is None else "choice",
                              "points": points}
    ctx.out_dir.mkdir(parents=True, exist_ok=True)
    (ctx.out_dir / "eval_budget.json").write_text(json.dumps(report, indent=2) + "\n")
    _plot(report, ctx)
    return report


def _plain(value: Any) -> Any:
    """A knob value for JSON (lists of floats; infinities as strings)."""
    from ponder.nn.thresholds import json_float

    if isinstance(value, (list, tuple)):
        return [json_float(float(v)) for v in value]
    return value


def _plot(report: dict[str, Any], ctx: EvalContext) -> None:
    from ponder.plot import accuracy_vs_macs, have_matplotlib

    if not have_matplotlib():
        return
    series = {f"{report['model']} (held-out budgets)": [(p["macs_mean"], 100 * p["accuracy"]) for p in report["points"]]}
    accuracy_vs_macs(series, ctx.out_dir / "budget_curve.png", title="accuracy vs MACs (budget knob)")
