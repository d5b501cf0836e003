"""``ponder demo``: train small models offline, then print accuracy, MACs and measured speed.

Default data: scikit-learn's handwritten digits (ships inside scikit-learn: nothing is
downloaded). ``--data-dir DIR`` uses CIFAR-10 (official python format) instead.
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ponder.config import RunConfig, config_from_dict


@dataclass
class DemoEntry:
    """One model of the demo: what to build and how to train it."""

    label: str
    family: str
    model: str
    model_kwargs: dict[str, Any] = field(default_factory=dict)
    method: str = "cross_entropy"
    method_kwargs: dict[str, Any] = field(default_factory=dict)
    epochs: int = 15
    init_from: str | None = None  # label of an earlier entry whose weights start this one
    optim: dict[str, Any] = field(default_factory=lambda: {"name": "sgd", "lr": 0.1, "momentum": 0.9,
                                                           "nesterov": True, "weight_decay": 5e-4})
    budget_fraction: float | None = None  # early exit: target mean MACs as a fraction of the last exit's


def demo_entries(dataset: str) -> list[DemoEntry]:
    """The models the demo trains, in order (a static baseline, then one per family)."""
    digits = dataset == "digits"
    chans = {"in_chans": 1 if digits else 3}
    # MSDNet's heads need an 8x8 coarsest scale: two scales (16, 8) on 16x16 digits, three on CIFAR
    scales = {"gr_factor": [1, 2], "bn_factor": [1, 2]} if digits else {}
    return [
        DemoEntry("ResNet-20", "static", "resnet20_cifar", dict(chans), epochs=10),
        # BlockDrop's shortcut, so that BlockDrop-32 below starts from this network
        DemoEntry("ResNet-32", "static", "resnet32_cifar", {**chans, "shortcut": "avgpool"}, epochs=10),
        DemoEntry("MSDNet (5 exits)", "early exit", "msdnet_cifar_budgeted", {**chans, **scales},
                  method="multi_exit", epochs=10, budget_fraction=0.5),
        DemoEntry("BlockDrop-32", "block skip", "blockdrop_resnet32_cifar", {**chans, "init_keep_prob": 0.6},
                  method="blockdrop",
                  method_kwargs={"stage": "both", "curriculum_epochs": 3, "blocks_per_epoch": 5, "alpha": 0.8,
                                 "penalty": 5.0},
                  epochs=8, init_from="ResNet-32",
                  optim={"name": "adam", "lr": 1e-3, "weight_decay": 0.0}),
        DemoEntry("SACT-32", "spatial", "sact_resnet32_cifar", dict(chans), method="ponder_cost",
                  method_kwargs={"tau": 0.1}, epochs=10),
    ]


DEMO_VAL_SIZE = 200  # held-out images (from train) that early-exit thresholds are fitted on


def demo_config(entry: DemoEntry, dataset: str, data_dir: str | None, epochs: int) -> RunConfig:
    return config_from_dict({
        "model": {"name": entry.model, "kwargs": dict(entry.model_kwargs)},
        "data": {"dataset": dataset, "data_dir": data_dir, "batch_size": 64, "eval_batch_size": 256,
                 "val_size": DEMO_VAL_SIZE if entry.budget_fraction else 0},
        "optim": dict(entry.optim),
        "schedule": {"name": "cosine", "warmup_epochs": 1 if epochs > 3 and entry.optim["name"] == "sgd" else 0},
        "method": {"name": entry.method, "kwargs": dict(entry.method_kwargs)},
        "train": {"epochs": epochs, "seed": 0},
    })


def fit_exit_budget(model: torch.nn.Module, val_loader: Any, fraction: float) -> float:
    """Set a multi-exit model's budget on held-out images to ``fraction`` x its full cost (the model's one
    budget knob: :meth:`~ponder.models.base.DynamicModel.set_budget`); returns the held-out mean MACs.
    The test set is never looked at."""
    from ponder.evaluate.budget import calibrate_on

    calibrate_on(model, val_loader, limit=DEMO_VAL_SIZE)
    return model.set_budget(fraction * model.exit_costs()[-1])


def measure_ms_per_image(model: torch.nn.Module, images: torch.Tensor, batch: int = 64, repeats: int = 3) -> float:
    """Median ms per image of ``model`` over ``images [N, C, H, W]`` in batches (sparse executor if dynamic)."""
    from ponder.bench import time_interleaved
    from ponder.nn.executor import get_executor, set_executor

    if get_executor(model) is not None:
        set_executor(model, "sparse")
    model.eval()
    batches = list(images.split(batch))
    ms = time_interleaved({"m": lambda: [model(b) for b in batches]}, repeats=repeats, warmup=1)["m"]
    return ms / images.shape[0]


def run_demo(data_dir: str | None = None, out_dir: str | Path = "runs/demo", epochs: int | None = None,
             quick: bool = False) -> list[dict[str, Any]]:
    """Train every demo entry, evaluate it on the test split, print the table; returns its rows."""
    from ponder.data import build_loaders
    from ponder.engine import load_run_with_data, train
    from ponder.evaluate.records import collect

    dataset = "cifar10" if data_dir else "digits"
    out_dir = Path(out_dir)
    rows: list[dict[str, Any]] = []
    runs: dict[str, Path] = {}
    t_start = time.perf_counter()
    for entry in demo_entries(dataset):
        n_epochs = 1 if quick else (epochs or entry.epochs)
        cfg = demo_config(entry, dataset, data_dir, n_epochs)
        if entry.init_from:
            cfg.train.init_from = str(runs[entry.init_from])
        run_dir = out_dir / entry.model
        _clear_previous_demo_run(run_dir)
        print(f"[demo] training {entry.label} ({entry.model}, {entry.method}, {n_epochs} epochs) -> {run_dir}", flush=True)
        train(cfg, run_dir)
        runs[entry.label] = run_dir
        model, cfg, bundle = load_run_with_data(run_dir)
        _, val_loader, test_loader = build_loaders(bundle, cfg.data, seed=cfg.train.seed)
        model.eval()
        if entry.budget_fraction is not None:
            fit_exit_budget(model, val_loader, entry.budget_fraction)
        rec = collect(model, test_loader, torch.device("cpu"))
        summary = rec.summary()
        images = torch.cat([x for x, _ in test_loader])
        ms = measure_ms_per_image(model, images)
        rows.append({"model": entry.label, "name": entry.model, "family": entry.family,
                     "accuracy": 100.0 * summary["accuracy"], "macs_mean": summary["macs_mean"],
                     "macs_std": summary["macs_std"], "ms_per_image": ms})
        _save_result(run_dir, cfg, model, rec, ms)
    print_table(rows, dataset, time.perf_counter() - t_start)
    (out_dir / "demo.json").write_text(json.dumps(rows, indent=1))
    _plot(rows, out_dir, dataset)
    return rows


def _save_result(run_dir: Path, cfg: RunConfig, model: torch.nn.Module, rec: Any, ms: float) -> None:
    """The entry's test result as data (``RUN/results/demo.json``), for ``ponder report runs/demo``."""
    from ponder.results import Latency, new_result, save_result

    s = rec.summary()
    latency = Latency(mode="demo", executor="sparse" if model.is_dynamic else "dense", baseline=None, device="cpu",
                      batch=64, threads=torch.get_num_threads(), ms_per_batch=ms * 64, ms_per_image=ms)
    save_result(run_dir, new_result(run_dir, cfg, model, kind="demo", protocol="standard", images=len(rec),
                                    accuracy=s["accuracy"], macs_mean=s["macs_mean"], macs_std=s["macs_std"],
                                    latency=latency))


def _clear_previous_demo_run(run_dir: Path) -> None:
    """The demo owns its run folders: an earlier demo run there is replaced."""
    if (run_dir / "config.yaml").is_file():
        shutil.rmtree(run_dir)


def print_table(rows: list[dict[str, Any]], dataset: str, seconds: float) -> None:
    from ponder.cost import format_count

    print(f"\n{dataset} test set, {seconds:.0f} s in all (MACs: conv + linear multiply-accumulates; "
          f"ms measured at batch 64 on {torch.get_num_threads()} thread{'s' if torch.get_num_threads() != 1 else ''})")
    print(f"{'model':22s} {'family':12s} {'acc %':>6s} {'MACs/image (mean ± std)':>24s} {'ms/image':>9s}")
    for r in rows:
        macs = f"{format_count(r['macs_mean'])} ± {format_count(r['macs_std'])}"
        print(f"{r['model']:22s} {r['family']:12s} {r['accuracy']:6.1f} {macs:>24s} {r['ms_per_image']:9.3f}")


def _plot(rows: list[dict[str, Any]], out_dir: Path, dataset: str) -> None:
    from ponder.plot import accuracy_vs_macs, have_matplotlib

    if not have_matplotlib():
        print("(matplotlib not installed: no plot; pip install ponder[plot])")
        return
    path = accuracy_vs_macs({r["model"]: [(r["macs_mean"], r["accuracy"])] for r in rows},
                            out_dir / "accuracy_vs_macs.png", title=f"ponder demo ({dataset})")
    print(f"plot: {path}")
