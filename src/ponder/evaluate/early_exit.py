"""Early-exit evaluation protocols: ``anytime`` and ``budgeted`` (budgeted batch classification).

Both run the compute-all executor once per split and cache the per-exit outputs under
``out_dir/cache``, keyed to a hash of the model's weights and the data split, so a cache is
never reused for another checkpoint or another split.

Options (``ctx.options``):

- ``budgeted``: ``calibration`` = ``"val"`` (default: the held-out split, evaluation transforms)
  or ``"test"`` (official quirk 2, flagged in the JSON); ``score`` = ``"test"`` (default) or
  ``"val"``: the curve scored on the held-out split itself, the test set never read (for choosing
  training settings such as L2W's ``q``; ``ponder sweep``); ``grid_points`` (39; IMTA 40);
  ``official_float32`` (bit-exact official exit proportions); ``target_macs`` (list of mean-MACs
  targets for the direct "target MACs -> thresholds" mode).
- both: ``no_cache`` to recompute.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path
from typing import Any

import torch
import yaml
from torch import Tensor

from ponder.evaluate.protocols import EvalContext, register_protocol
from ponder.evaluate.records import Records, collect, load_records, save_records
from ponder.models.multi_exit import MultiExitModel
from ponder.nn.executor import set_executor
from ponder.nn.thresholds import assign_exits, budget_curve, expected_macs, json_float, p_grid, thresholds_for_macs
from ponder.plot import have_matplotlib, pyplot, save_figure


@torch.no_grad()
def collect_exit_outputs(model: MultiExitModel, loader: Any, device: Any) -> Records:
    """:func:`~ponder.evaluate.records.collect` with the compute-all executor and no thresholds or forced
    decisions: records with every exit's confidence and prediction (``exit_conf`` / ``exit_pred`` ...)."""
    saved = (model.executor, model.thresholds, model.forced)
    set_executor(model, "masked")
    model.forced = None
    model.set_thresholds(None)
    try:
        return collect(model, loader, device, desc="exits")
    finally:
        set_executor(model, saved[0])
        model.forced = saved[2]
        model.set_thresholds(saved[1])


def weights_fingerprint(model: torch.nn.Module) -> str:
    """SHA-256 (hex, 16 chars) of every ``state_dict`` tensor's name, shape and bytes."""
    h = hashlib.sha256()
    for name, t in model.state_dict().items():
        h.update(name.encode())
        h.update(str(tuple(t.shape)).encode())
        h.update(t.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def _data_fingerprint(ctx: EvalContext, split: str, loader: Any) -> str:
    """Hash of the split name, the data config, the split size and the first batch's contents."""
    data = dataclasses.asdict(ctx.config.data) if dataclasses.is_dataclass(ctx.config.data) else {}
    n = len(loader.dataset) if hasattr(loader, "dataset") else len(loader)
    raw = json.dumps({"split": split, "data": data, "n": n, "seed": ctx.config.train.seed}, sort_keys=True, default=str)
    h = hashlib.sha256(raw.encode())
    for batch in loader:
        h.update(batch[0].detach().cpu().contiguous().numpy().tobytes())
        h.update(batch[1].detach().cpu().contiguous().numpy().tobytes())
        break
    return h.hexdigest()[:16]


def cached_exit_outputs(ctx: EvalContext, split: str, loader: Any) -> Records:
    """:func:`collect_exit_outputs`, cached under ``out_dir/cache`` keyed to (weights, split, data)."""
    model = _multi_exit(ctx)
    key = f"{split}-{weights_fingerprint(model)}-{_data_fingerprint(ctx, split, loader)}"
    path = Path(ctx.out_dir) / "cache" / f"exits-{key}.safetensors"
    if path.is_file() and not ctx.options.get("no_cache"):
        return load_records(path)
    out = collect_exit_outputs(model, loader, ctx.device)
    save_records(out, path)
    return out


def _multi_exit(ctx: EvalContext) -> MultiExitModel:
    model = getattr(ctx.model, "module", ctx.model)
    if not isinstance(model, MultiExitModel):
        raise ValueError(f"early-exit protocols need a multi-exit model (MSDNet, RANet), got {type(model).__name__}")
    return model


def _input_size(ctx: EvalContext, model: MultiExitModel) -> tuple[int, int, int]:
    size = ctx.options.get("input_size")
    return tuple(int(s) for s in size) if size else model.default_input_size  # type: ignore[return-value]


def _write(ctx: EvalContext, name: str, result: dict) -> None:
    out = Path(ctx.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / name).write_text(json.dumps(result, indent=2))


@register_protocol("anytime")
def anytime(ctx: EvalContext) -> dict:
    """Top-1 / top-5 of every exit on the test set, each with its cumulative MACs and params.

    Also reports the running-ensemble accuracy (mean of the softmaxes of exits ``1..k``, as the Lua code).
    """
    model = _multi_exit(ctx)
    prof = model.profile_exits(_input_size(ctx, model))
    outs = cached_exit_outputs(ctx, "test", ctx.test_loader)
    correct = outs.exit_correct
    ensemble = outs.ensemble_pred == outs.targets.view(-1, 1)
    exits = [{"exit": k + 1, "macs": prof[k]["macs"], "params": prof[k]["params"],
              "top1": correct[:, k].double().mean().item() * 100,
              "top5": outs.exit_top5[:, k].double().mean().item() * 100,
              "ensemble_top1": ensemble[:, k].double().mean().item() * 100}
             for k in range(model.num_exits)]
    result = {"protocol": "anytime", "num_test": len(outs), "macs_unit": "conv+linear MACs", "exits": exits}
    _write(ctx, "anytime.json", result)
    _plot_anytime(ctx, exits)
    return result


@register_protocol("budgeted")
def budgeted(ctx: EvalContext) -> dict:
    """Budgeted batch classification: thresholds fitted on the held-out split, applied to the test set.

    One point per ``q`` of the geometric p-grid (official procedure), plus the direct
    ``target_macs`` mode. Thresholds never come from the test set unless ``calibration="test"``
    (official quirk, flagged as such).
    """
    model = _multi_exit(ctx)
    calibration = str(ctx.options.get("calibration", "val"))
    score = str(ctx.options.get("score", "test"))
    if score not in ("test", "val"):
        raise ValueError(f"score must be 'test' or 'val' (the held-out split, for tuning), got {score!r}")
    if score == "val" and calibration != "val":
        raise ValueError("score=val scores the curve on the held-out split, so its thresholds come from there too; "
                         "drop calibration=test")
    if calibration == "val":
        if ctx.val_loader is None:
            raise ValueError("the budgeted protocol fits thresholds on the held-out split but this run has none; "
                             "train with data.val_size > 0 (e.g. 5000 on CIFAR) or pass calibration=test "
                             "(official quirk, tunes on the test set)")
        val = cached_exit_outputs(ctx, "val", ctx.val_loader)
    elif calibration == "test":
        val = cached_exit_outputs(ctx, "test", ctx.test_loader)
    else:
        raise ValueError(f"calibration must be 'val' or 'test' (official quirk), got {calibration!r}")
    test = val if score == "val" else cached_exit_outputs(ctx, "test", ctx.test_loader)
    costs = torch.tensor([p["macs"] for p in model.profile_exits(_input_size(ctx, model))], dtype=torch.float64)
    grid = p_grid(int(ctx.options.get("grid_points", 39)))
    official = str(ctx.options.get("official_float32", False)).lower() in ("1", "true", "yes")
    val_conf, test_conf = val.exit_conf.t(), test.exit_conf.t()  # [K, N]
    test_correct = test.exit_correct.t()
    points = budget_curve(val_conf, test_conf, test_correct, costs, grid, val_correct=val.exit_correct.t(),
                          official_float32=official)
    direct = []
    for target in _as_list(ctx.options.get("target_macs")):
        t = thresholds_for_macs(val_conf, costs, float(target))
        idx = assign_exits(test_conf, t)
        direct.append({"target_macs": float(target), "thresholds": [json_float(v) for v in t],
                       "expected_macs": expected_macs(idx, costs),
                       "accuracy": test_correct.gather(0, idx.view(1, -1))[0].double().mean().item() * 100})
    model.calibrate_confidences(val_conf, _input_size(ctx, model))
    result = {"protocol": "budgeted", "calibration": calibration,
              "calibration_note": "held-out split, evaluation transforms" if calibration == "val"
              else "OFFICIAL QUIRK: thresholds tuned on the test set",
              "num_val": len(val), "num_test": len(test),
              "exit_macs": costs.tolist(), "macs_unit": "conv+linear MACs", "points": points,
              "target_macs": direct}
    if score == "val":  # accuracy and MACs of every point are the held-out split's; no test image was read
        result.update(split="val", num_test=0, n=len(val))
    _write(ctx, "budgeted-val.json" if score == "val" else "budgeted.json", result)
    _plot_budgeted(ctx, points, costs, test, split="held-out" if score == "val" else "test")
    return result


def _as_list(value: Any) -> list[float]:
    """An option given as a number, a list, or a string such as ``"20e6"`` / ``"[1e7, 2e7]"``."""
    if value is None:
        return []
    if isinstance(value, str):
        value = yaml.safe_load(value)
    return [float(v) for v in (value if isinstance(value, (list, tuple)) else [value])]


def _pyplot():
    """pyplot, or None when matplotlib is not installed (the plots are optional)."""
    return pyplot() if have_matplotlib() else None


def _plot_anytime(ctx: EvalContext, exits: list[dict]) -> None:
    plt = _pyplot()
    if plt is None:
        return
    fig, ax = plt.subplots(figsize=(5, 3.5))
    ax.plot([e["macs"] / 1e6 for e in exits], [e["top1"] for e in exits], "o-", label="exit k")
    ax.set_xlabel("cumulative MACs (M)")
    ax.set_ylabel("top-1 (%)")
    ax.set_title("anytime prediction")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    save_figure(fig, Path(ctx.out_dir) / "anytime.png")


def _plot_budgeted(ctx: EvalContext, points: list[dict], costs: Tensor, test: Records, split: str = "test") -> None:
    plt = _pyplot()
    if plt is None:
        return
    fig, ax = plt.subplots(figsize=(5, 3.5))
    ax.plot([p["expected_macs"] / 1e6 for p in points], [p["accuracy"] for p in points], ".-", label="budgeted (p-grid)")
    ax.plot((costs / 1e6).tolist(), (test.exit_correct.double().mean(0) * 100).tolist(), "s", label="single exit")
    ax.set_xlabel("mean MACs per image (M)")
    ax.set_ylabel(f"{split} top-1 (%)")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    name = "budgeted" if split == "test" else "budgeted-val"
    save_figure(fig, Path(ctx.out_dir) / f"{name}.png")
    picks = [points[i] for i in sorted({0, len(points) // 4, len(points) // 2, len(points) - 1})]
    fig, ax = plt.subplots(figsize=(5, 3.5))
    width = 0.8 / len(picks)
    k = len(picks[0]["exit_counts"])
    for j, p in enumerate(picks):
        ax.bar([i + 1 + (j - len(picks) / 2 + 0.5) * width for i in range(k)], p["exit_counts"], width,
               label=f"q={p['q']:.2f} ({p['expected_macs'] / 1e6:.1f}M)")
    ax.set_xlabel("exit")
    ax.set_ylabel(f"{split} samples")
    ax.legend(fontsize=7)
    fig.tight_layout()
    save_figure(fig, Path(ctx.out_dir) / ("exit_histogram.png" if split == "test" else "exit_histogram-val.png"))
