"""The ``spatial`` protocol: accuracy, per-image MACs mean +- std and ponder cost per ACT block.

Options (``ctx.options``): ``image_size`` (int) resizes every test image (bilinear) before the
forward pass, e.g. 352 to evaluate a model trained at 224 px as in the SACT paper;
``executor`` (``masked`` | ``sparse``) switches the model's executor for the evaluation.
"""

from __future__ import annotations

import json
from typing import Any, Iterable

import torch
import torch.nn as nn
import torch.nn.functional as F

from ponder.evaluate.protocols import EvalContext, register_protocol
from ponder.nn.executor import get_executor, set_executor


@torch.no_grad()
def spatial_report(model: nn.Module, loader: Iterable, device: torch.device | str,
                   image_size: int | None = None) -> dict[str, Any]:
    """Evaluate an ACT/SACT model over ``loader`` of ``(images [B, C, H, W], targets [B])``.

    Returns ``accuracy``, ``macs_mean`` / ``macs_std`` (population std over images) / min / max,
    ``dense_macs`` (every unit run), ``ponder_cost`` (mean per image of the summed ponder cost),
    ``ponder_cost_per_stage``, ``units_run_per_stage`` (mean halting step N, SACT: over positions)
    and, for SACT, ``active_fraction_per_unit`` (mean fraction of positions each unit ran at).
    """
    was_training = model.training
    model.eval()
    correct, macs, cost = [], [], []
    stage_rho: list[float] = []
    stage_n: list[float] = []
    active: list[float] = []
    n_images, size = 0, None
    try:
        for images, targets in loader:
            images, targets = images.to(device), targets.to(device)
            if image_size is not None:
                images = F.interpolate(images, size=(image_size, image_size), mode="bilinear",
                                       align_corners=False, antialias=True)
            size = tuple(images.shape[1:])
            out = model(images)
            if out.ponder is None or "ponder_cost" not in out.extras:
                raise ValueError(f"protocol 'spatial' needs an ACT/SACT model (ponder maps in the output); "
                                 f"{type(model).__name__} reports none: use protocol 'standard'")
            b = images.shape[0]
            correct.append((out.logits.argmax(1) == targets).cpu())
            macs.append(out.macs.double().cpu())
            cost.append(out.extras["ponder_cost"].double().cpu())
            rho = [p.double().flatten(1).mean(1).sum().item() if p.dim() > 1 else p.double().sum().item()
                   for p in out.ponder]
            n = [u.double().flatten(1).mean(1).sum().item() if u.dim() > 1 else u.double().sum().item()
                 for u in out.extras["units_run"]]
            stage_rho = [a + r for a, r in zip(stage_rho, rho)] if stage_rho else rho
            stage_n = [a + r for a, r in zip(stage_n, n)] if stage_n else n
            if out.masks is not None:
                act = [m.double().mean().item() * b for m in out.masks]
                active = [a + r for a, r in zip(active, act)] if active else act
            n_images += b
    finally:
        model.train(was_training)
    if n_images == 0:
        raise ValueError("protocol 'spatial' got an empty test loader; check the data configuration")
    macs_t = torch.cat(macs)
    report: dict[str, Any] = {
        "n": n_images,
        "input_size": list(size) if size else None,
        "accuracy": torch.cat(correct).double().mean().item(),
        "macs_mean": macs_t.mean().item(),
        "macs_std": macs_t.std(unbiased=False).item(),
        "macs_min": macs_t.min().item(),
        "macs_max": macs_t.max().item(),
        "ponder_cost": torch.cat(cost).mean().item(),
        "ponder_cost_per_stage": [v / n_images for v in stage_rho],
        "units_run_per_stage": [v / n_images for v in stage_n],
    }
    if hasattr(model, "ledger") and size is not None:
        report["dense_macs"] = model.ledger(size).total
    if active:
        report["active_fraction_per_unit"] = [round(v / n_images, 6) for v in active]
    return report


@register_protocol("spatial")
def spatial(ctx: EvalContext) -> dict:
    """Evaluate on the test loader; writes ``eval_spatial.json`` in ``ctx.out_dir``."""
    executor = ctx.options.get("executor")
    before = get_executor(ctx.model)
    if executor is not None:
        set_executor(ctx.model, executor)
    try:
        image_size = ctx.options.get("image_size")
        report = {"protocol": "spatial", "model": ctx.config.model.name, "executor": get_executor(ctx.model),
                  **spatial_report(ctx.model, ctx.test_loader, ctx.device,
                                   int(image_size) if image_size is not None else None)}
    finally:
        if executor is not None and before is not None:
            set_executor(ctx.model, before)
    ctx.out_dir.mkdir(parents=True, exist_ok=True)
    suffix = f"_{int(ctx.options['image_size'])}px" if ctx.options.get("image_size") else ""
    (ctx.out_dir / f"eval_spatial{suffix}.json").write_text(json.dumps(report, indent=2) + "\n")
    return report
