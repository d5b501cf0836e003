"""Real early exit vs the full network: measured speed-up next to the MAC ratio.

For a multi-exit model (default ``msdnet_cifar_budgeted``) this times

- ``dense``: ``model.dense_baseline()``, every block and only the last exit (no early exit);
- ``dynamic``: the sparse executor, where samples that exit leave the batch,

on the same random images, and prints ``dense_ms``, ``dynamic_ms`` (per batch), ``speedup``,
``mac_ratio = dense MACs / mean dynamic MACs`` (the ideal speed-up) and
``efficiency = speedup / mac_ratio``. Exits are forced with ``force_keep_rate(r)``: a fraction
``r`` of the samples reaching each exit continues (a seeded per-sample hash), so with the default
``r = 0.7071`` about half the samples have exited by exit 2 (``1 - r^2``). ``--thresholds`` uses
max-softmax thresholds instead (e.g. from ``ponder eval RUN --protocol budgeted``).

    OMP_NUM_THREADS=1 python benchmarks/early_exit_speed.py --batch-sizes 64 1
    python benchmarks/early_exit_speed.py --checkpoint runs/msdnet_cpu --thresholds 0.6 0.6 0.6 0.6

Timings are medians of interleaved repeats; on a shared machine expect several % of noise.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from ponder.bench import keep_freed_memory
from ponder import create_model
from ponder.nn import set_executor


def _time_batches(fn, batches: list[torch.Tensor]) -> float:
    start = time.perf_counter()
    for x in batches:
        fn(x)
    return (time.perf_counter() - start) / len(batches) * 1e3


def measure(model, batch_size: int, num_images: int, repeats: int, seed: int = 0) -> dict:
    """Per-batch dense and dynamic milliseconds (medians over ``repeats``) and the MAC figures."""
    g = torch.Generator().manual_seed(seed)
    n = max(batch_size, num_images // batch_size * batch_size)
    batches = list(torch.randn(n, *model.default_input_size, generator=g).split(batch_size))
    dense = model.dense_baseline()
    with torch.inference_mode():
        set_executor(model, "sparse")
        outs = [model(x) for x in batches]  # warm-up + exit statistics
        exit_index = torch.cat([o.exit_index for o in outs])
        dyn_macs = torch.cat([o.macs for o in outs]).mean().item()
        for x in batches[:2]:
            dense(x)
        dense_t, dyn_t = [], []
        for _ in range(repeats):  # interleaved, so drifts in machine load hit both alike
            dense_t.append(_time_batches(dense, batches))
            dyn_t.append(_time_batches(model, batches))
    dense_ms, dynamic_ms = statistics.median(dense_t), statistics.median(dyn_t)
    mac_ratio = model.dense_macs() / dyn_macs
    speedup = dense_ms / dynamic_ms
    counts = torch.bincount(exit_index, minlength=model.num_exits)
    return {"batch_size": batch_size, "images": n, "dense_ms": dense_ms, "dynamic_ms": dynamic_ms,
            "speedup": speedup, "dense_macs": model.dense_macs(), "mean_dynamic_macs": dyn_macs,
            "mac_ratio": mac_ratio, "efficiency": speedup / mac_ratio,
            "exit_fractions": (counts.double() / counts.sum()).tolist(),
            "spread_dense_ms": [min(dense_t), max(dense_t)], "spread_dynamic_ms": [min(dyn_t), max(dyn_t)]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="msdnet_cifar_budgeted")
    ap.add_argument("--num-classes", type=int, default=10)
    ap.add_argument("--checkpoint", help="run directory whose weights to load (default: random weights)")
    ap.add_argument("--keep-rate", type=float, default=0.7071)
    ap.add_argument("--thresholds", type=float, nargs="+", help="max-softmax thresholds instead of --keep-rate")
    ap.add_argument("--batch-sizes", type=int, nargs="+", default=[64, 1])
    ap.add_argument("--images", type=int, default=512, help="images per timed pass (batch 1 uses a quarter)")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    keep_freed_memory()  # time kernels, not page faults (ponder.bench)
    torch.set_num_threads(args.threads)
    if args.checkpoint:
        from ponder.engine import load_run

        model, _ = load_run(args.checkpoint)
    else:
        torch.manual_seed(0)
        model = create_model(args.model, num_classes=args.num_classes)
    model.eval()
    if args.thresholds:
        model.set_thresholds(args.thresholds)
    else:
        model.force_keep_rate(args.keep_rate, seed=0)
    rows = [measure(model, b, args.images if b > 1 else args.images // 4, args.repeats) for b in args.batch_sizes]
    if args.json:
        print(json.dumps(rows, indent=2))
        return
    print(f"{args.model}: threads={args.threads}, "
          + (f"thresholds={args.thresholds}" if args.thresholds else f"keep_rate={args.keep_rate}"))
    print("batch  dense_ms  dynamic_ms  speedup  mac_ratio  efficiency  exit fractions")
    for r in rows:
        print(f"{r['batch_size']:>5}  {r['dense_ms']:8.2f}  {r['dynamic_ms']:10.2f}  {r['speedup']:7.3f}  "
              f"{r['mac_ratio']:9.3f}  {r['efficiency']:10.3f}  {[round(f, 3) for f in r['exit_fractions']]}")


if __name__ == "__main__":
    main()
