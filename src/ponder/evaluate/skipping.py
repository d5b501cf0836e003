"""The ``skip`` protocol for block-skipping models (BlockDrop, SkipNet, ...): accuracy, per-image
MACs mean +- std, block usage, and the keep-threshold knob swept into an accuracy-vs-MACs curve.

Works for any model whose output carries ``gates [B, blocks]``; the sweep moves the native knob of a
:class:`~ponder.models.skipping.SkippingModel` (its keep threshold, restored afterwards).

Options (``ctx.options``): ``thresholds`` (list of floats; default 0.0, 0.1, ..., 0.9),
``executor`` (``sparse`` by default; in eval mode both executors give the same outputs).
Writes ``eval_skip.json`` and, with matplotlib, ``skip_curve.png`` in ``ctx.out_dir``.
"""

from __future__ import annotations

import json
from typing import Any, Iterable, Sequence

import torch
import torch.nn as nn

from ponder.evaluate.protocols import EvalContext, register_protocol
from ponder.evaluate.records import Records, collect
from ponder.nn.executor import get_executor, set_executor
from ponder.models.skipping import SkippingModel
from ponder.nn.skip import block_usage

DEFAULT_THRESHOLDS = tuple(round(0.1 * i, 1) for i in range(10))


def skip_report(records: Records, dense: Records | None = None) -> dict[str, Any]:
    """Accuracy, MACs mean/std and block-usage statistics of ``records``; with the dense baseline's
    records also its ``dense_accuracy``, ``dense_macs`` and ``mac_ratio`` (dense / mean dynamic MACs)."""
    if records.gates is None:
        raise ValueError("protocol 'skip' needs a block-skipping model (gates in its output); "
                         "use protocol 'standard' for this model")
    report: dict[str, Any] = records.summary()
    report.update(block_usage(records.gates))
    if dense is not None:
        d = dense.summary()
        report.update(dense_accuracy=d["accuracy"], dense_macs=d["macs_mean"],
                      mac_ratio=d["macs_mean"] / report["macs_mean"])
    return report


def threshold_sweep(model: nn.Module, loader: Iterable, device: torch.device | str,
                    thresholds: Sequence[float]) -> list[dict[str, float]]:
    """One point per keep threshold: ``threshold``, ``accuracy``, ``macs_mean``, ``macs_std``, ``blocks_mean``."""
    if not isinstance(model, SkippingModel):
        raise ValueError(f"{type(model).__name__} has no keep threshold to sweep (not a block-skipping model)")
    original = model.get_knob()
    points = []
    try:
        for t in thresholds:
            model.set_knob(float(t))
            rec = collect(model, loader, device, desc=f"threshold {t}")
            s = rec.summary()
            points.append({"threshold": float(t), "accuracy": s["accuracy"], "macs_mean": s["macs_mean"],
                           "macs_std": s["macs_std"], "blocks_mean": (rec.gates > 0.5).double().sum(1).mean().item()})
    finally:
        model.set_knob(original)
    return points


@register_protocol("skip")
def skip(ctx: EvalContext) -> dict:
    """Evaluate a block-skipping model on the test set and sweep its keep threshold."""
    model = ctx.model
    old_executor = get_executor(model)
    executor = ctx.options.get("executor", "sparse")
    if old_executor is not None:
        set_executor(model, executor)
    try:
        records = collect(model, ctx.test_loader, ctx.device, desc="test")
        dense = (collect(model.dense_baseline(), ctx.test_loader, ctx.device, desc="dense")
                 if isinstance(model, SkippingModel) else None)
        report: dict[str, Any] = {"protocol": "skip", "model": ctx.config.model.name, "executor": executor,
                                  "threshold": model.get_knob() if isinstance(model, SkippingModel) else None,
                                  **skip_report(records, dense)}
        if isinstance(model, SkippingModel):
            thresholds = ctx.options.get("thresholds", DEFAULT_THRESHOLDS)
            report["sweep"] = threshold_sweep(model, ctx.test_loader, ctx.device, thresholds)
    finally:
        if old_executor is not None:
            set_executor(model, old_executor)
    ctx.out_dir.mkdir(parents=True, exist_ok=True)
    if "sweep" in report:
        _plot(report, ctx)
    (ctx.out_dir / "eval_skip.json").write_text(json.dumps(report, indent=2) + "\n")
    return report


def _plot(report: dict[str, Any], ctx: EvalContext) -> None:
    from ponder.plot import accuracy_vs_macs, have_matplotlib

    if not have_matplotlib():
        return
    series = {f"{report['model']} (threshold sweep)": [(p["macs_mean"], 100 * p["accuracy"]) for p in report["sweep"]]}
    if "dense_macs" in report:
        series["dense backbone"] = [(report["dense_macs"], 100 * report["dense_accuracy"])]
    path = accuracy_vs_macs(series, ctx.out_dir / "skip_curve.png", title="block skipping: accuracy vs MACs")
    report["plot"] = str(path)
