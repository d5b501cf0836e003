"""Latency overhead of SkipNet's gates (FFGate-I, FFGate-II, recurrent) over the ungated ResNet.

Every block is kept (``force_keep_rate(1.0)``, sparse executor), so the difference to the plain
backbone is the gates' cost alone. One intra-op thread; medians of interleaved rounds (shared
machines are noisy: repeat and compare medians). Optionally also times the sparse executor at a
random keep rate, gates included, against the dense ResNet.

    python benchmarks/gate_overhead.py --depth 110 --batches 1 64
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from ponder.bench import keep_freed_memory
from ponder.models.skipnet import SkipNet
from ponder.nn.executor import set_executor
from ponder.nn.gates import GATE_TYPES
from ponder.registry import create_model


def time_ms(fn, x: torch.Tensor, reps: int) -> float:
    """Mean milliseconds of ``reps`` calls of ``fn(x)`` (no grad)."""
    with torch.inference_mode():
        start = time.perf_counter()
        for _ in range(reps):
            fn(x)
        return (time.perf_counter() - start) * 1e3 / reps


def build(depth: int, gate_type: str, keep_rate: float) -> SkipNet:
    torch.manual_seed(0)
    model = create_model(f"skipnet_resnet{depth}_cifar", gate_type=gate_type).eval()
    set_executor(model, "sparse")
    model.force_keep_rate(keep_rate, seed=0)
    return model


def run(depth: int, batches: list[int], rounds: int, keep_rate: float) -> list[dict]:
    """One row per (batch, gate type): dense and gated medians, overhead and gate MAC share."""
    models = {g: build(depth, g, 1.0) for g in GATE_TYPES}
    dense = models["rnn"].dense_baseline()
    rows = []
    for batch in batches:
        x = torch.randn(batch, 3, 32, 32)
        reps = max(1, 64 // batch)
        fns = {"dense": dense.forward_logits, **models}
        if keep_rate < 1.0:
            fns.update({f"{g}@{keep_rate}": build(depth, g, keep_rate) for g in GATE_TYPES})
        for fn in fns.values():  # warm-up
            time_ms(fn, x, 1)
        times: dict[str, list[float]] = {k: [] for k in fns}
        for _ in range(rounds):
            for k, fn in fns.items():
                times[k].append(time_ms(fn, x, reps))
        med = {k: statistics.median(v) for k, v in times.items()}
        for g in GATE_TYPES:
            led = models[g].ledger((3, 32, 32))
            gate_macs = sum(led[n] for n in models[g].gate_names)
            row = {"batch": batch, "gate": g, "dense_ms": round(med["dense"], 3), "gated_ms": round(med[g], 3),
                   "overhead": round(med[g] / med["dense"] - 1, 4),
                   "gate_mac_share": round(gate_macs / (led.total - gate_macs), 4),
                   "spread_dense": round((max(times["dense"]) - min(times["dense"])) / med["dense"], 3)}
            if keep_rate < 1.0:
                row[f"sparse_ms@{keep_rate}"] = round(med[f"{g}@{keep_rate}"], 3)
                row[f"speedup@{keep_rate}"] = round(med["dense"] / med[f"{g}@{keep_rate}"], 3)
            rows.append(row)
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--depth", type=int, default=110, choices=[38, 74, 110])
    p.add_argument("--batches", type=int, nargs="+", default=[1, 64])
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--keep-rate", type=float, default=1.0, help="also time random decisions at this rate")
    p.add_argument("--json", action="store_true", help="print JSON rows instead of a table")
    args = p.parse_args()
    keep_freed_memory()  # time kernels, not page faults (ponder.bench)
    torch.set_num_threads(1)
    rows = run(args.depth, args.batches, args.rounds, args.keep_rate)
    if args.json:
        print(json.dumps(rows, indent=1))
        return
    extra = [k for k in rows[0] if "@" in k]
    cols = ["batch", "gate", "dense_ms", "gated_ms", "overhead", "gate_mac_share", "spread_dense", *extra]
    print(f"SkipNet ResNet-{args.depth} (CIFAR), all blocks kept, sparse executor, 1 thread, "
          f"median of {args.rounds} interleaved rounds")
    print(" | ".join(cols))
    for r in rows:
        print(" | ".join(f"{r[c]:+.1%}" if c == "overhead" else str(r[c]) for c in cols))


if __name__ == "__main__":
    main()
