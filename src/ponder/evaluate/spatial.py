"""The ``spatial`` protocol: accuracy, per-image MACs mean +- std and ponder cost per ACT block.

Options (``ctx.options``): ``image_size`` (int) resizes every test image (bilinear) before the
forward pass, e.g. 352 to evaluate a model trained at 224 px as in the SACT paper;
``executor`` (``masked`` | ``sparse``) switches the model's executor for the evaluation;
``knob`` sets the model's native knob for the evaluation (a halting or mask threshold; a budget of the
multi-target model, e.g. ``knob=0.3``), restored afterwards.
"""

from __future__ import annotations

import json
from typing import Any, Iterable, Iterator

import torch
import torch.nn as nn
import torch.nn.functional as F

from ponder.evaluate.protocols import EvalContext, register_protocol
from ponder.evaluate.records import Records, collect
from ponder.models.base import DynamicModel
from ponder.nn.executor import get_executor, set_executor


def resized(loader: Iterable, image_size: int | None) -> Iterable:
    """``loader``'s ``(images, targets)`` batches with the images resized to ``image_size`` (bilinear,
    antialiased); ``loader`` itself when ``image_size`` is ``None``."""
    if image_size is None:
        return loader

    class _Resized:
        def __iter__(self) -> Iterator:
            for batch in loader:
                yield (F.interpolate(batch[0], size=(image_size, image_size), mode="bilinear", align_corners=False,
                                     antialias=True), batch[1])

    return _Resized()


def spatial_summary(records: Records) -> dict[str, Any]:
    """Accuracy, MACs mean / std (population, over images) / min / max, ``ponder_cost`` (mean per image
    of the summed ponder cost), ``ponder_cost_per_stage``, ``units_run_per_stage`` (mean halting step
    N, SACT: over positions) and, where masks were recorded, ``active_fraction_per_unit``."""
    if records.ponder is None and records.active is None:
        raise ValueError("protocol 'spatial' needs a spatial model (masks or ponder maps in its output); "
                         "use protocol 'standard'")
    if len(records) == 0:
        raise ValueError("protocol 'spatial' got an empty test loader; check the data configuration")
    report: dict[str, Any] = dict(records.summary())
    report.update(macs_min=records.macs.min().item(), macs_max=records.macs.max().item())
    if records.ponder is not None:
        report["ponder_cost"] = records.ponder.sum(1).mean().item()
        report["ponder_cost_per_stage"] = records.ponder.mean(0).tolist()
    if records.units_run is not None:
        report["units_run_per_stage"] = records.units_run.mean(0).tolist()
    if records.active is not None:
        report["active_fraction_per_unit"] = [round(v, 6) for v in records.active.mean(0).tolist()]
    return report


def spatial_report(model: nn.Module, loader: Iterable, device: torch.device | str,
                   image_size: int | None = None) -> dict[str, Any]:
    """:func:`spatial_summary` of ``model`` over ``loader`` (images resized to ``image_size`` if given),
    plus ``input_size`` and ``dense_macs`` (every unit run)."""
    records = collect(model, resized(loader, image_size), device, desc="spatial")
    report = spatial_summary(records)
    size = _first_size(resized(loader, image_size))
    report["input_size"] = list(size)
    report["dense_macs"] = model.ledger(size).total
    return report


def _first_size(loader: Iterable) -> tuple[int, int, int]:
    for batch in loader:
        return tuple(batch[0].shape[1:])  # type: ignore[return-value]
    raise ValueError("protocol 'spatial' got an empty test loader; check the data configuration")


@register_protocol("spatial")
def spatial(ctx: EvalContext) -> dict:
    """Evaluate on the test loader; writes ``eval_spatial.json`` in ``ctx.out_dir``."""
    executor = ctx.options.get("executor")
    before = get_executor(ctx.model)
    model = getattr(ctx.model, "module", ctx.model)
    knob = ctx.options.get("knob")
    if knob is not None and not isinstance(model, DynamicModel):
        raise ValueError(f"option knob needs a dynamic model; {type(model).__name__} has no knob")
    knob_before = model.get_knob() if knob is not None else None
    if executor is not None:
        set_executor(ctx.model, executor)
    try:
        if knob is not None:
            model.set_knob(knob)
        image_size = ctx.options.get("image_size")
        report = {"protocol": "spatial", "model": ctx.config.model.name, "executor": get_executor(ctx.model),
                  **spatial_report(ctx.model, ctx.test_loader, ctx.device,
                                   int(image_size) if image_size is not None else None)}
        if knob is not None:
            report["knob"] = {"name": model.knob.name, "value": model.get_knob()}
    finally:
        if executor is not None and before is not None:
            set_executor(ctx.model, before)
        if knob is not None:
            model.set_knob(knob_before)
    ctx.out_dir.mkdir(parents=True, exist_ok=True)
    suffix = f"_{int(ctx.options['image_size'])}px" if ctx.options.get("image_size") else ""
    suffix += f"_knob{knob}" if knob is not None else ""
    (ctx.out_dir / f"eval_spatial{suffix}.json").write_text(json.dumps(report, indent=2) + "\n")
    return report
