"""The ``standard`` protocol: test accuracy and per-sample MACs (+ block usage / exit histogram)."""

from __future__ import annotations

import json

import torch

from ponder.evaluate.protocols import EvalContext, register_protocol
from ponder.evaluate.records import Records, collect, save_records


def standard_report(records: Records) -> dict:
    """Accuracy, MACs mean/std/min/max; ``block_usage`` (fraction of samples running each block)
    when records carry ``gates``; ``exit_histogram`` (samples per exit) when they carry ``exit_index``."""
    report: dict = records.summary()
    if len(records):
        report["macs_min"] = records.macs.min().item()
        report["macs_max"] = records.macs.max().item()
    if records.gates is not None:
        usage = (records.gates > 0.5).double().mean(0)
        report["block_usage"] = [round(u, 6) for u in usage.tolist()]
        report["blocks_run_mean"] = (records.gates > 0.5).double().sum(1).mean().item()
    if records.exit_index is not None:
        counts = torch.bincount(records.exit_index, minlength=int(records.exit_index.max().item()) + 1 if len(records) else 0)
        report["exit_histogram"] = counts.tolist()
    return report


@register_protocol("standard")
def standard(ctx: EvalContext) -> dict:
    """Evaluate on the test loader; writes ``eval_standard.json`` and the per-sample records
    (``records_standard.safetensors``: prediction, MACs and decisions of every test image) in ``ctx.out_dir``."""
    records = collect(ctx.model, ctx.test_loader, ctx.device, desc="test")
    report = {"protocol": "standard", "model": ctx.config.model.name, **standard_report(records)}
    ctx.out_dir.mkdir(parents=True, exist_ok=True)
    (ctx.out_dir / "eval_standard.json").write_text(json.dumps(report, indent=2) + "\n")
    save_records(records, ctx.out_dir / "records_standard.safetensors")
    return report
