"""Latency overhead of the gated ResNets' routers (ConvNet-AIG, SP-Net, CoDiNet, RDI-Net) over the dense ResNet.

Every block is kept (``force_keep_rate(1.0)``, sparse executor: the routers still run and are paid for), so
the difference to the dense network is the routers' cost and the per-block bookkeeping. Timed against the
plain dense backbone (``dense``) and the same dense network on the sparse executor's kernels (``dense*``,
BN folded, channels-last: the overhead owed to the routers alone). Medians of interleaved rounds, torch's
default thread count unless ``--threads``; shared machines are noisy: check ``uptime``, repeat, compare medians.

    python benchmarks/router_overhead.py --depth 110 --batches 1 64 [--threads 1]
"""

from __future__ import annotations

import argparse
import json
import statistics

import torch

from ponder.bench import keep_freed_memory, time_rounds, torch_threads
from ponder.nn.executor import set_executor
from ponder.registry import create_model

FAMILIES = ("aig", "spnet", "codinet", "rdinet")


def build(family: str, depth: int):
    torch.manual_seed(0)
    model = create_model(f"{family}_resnet{depth}_cifar").eval()
    set_executor(model, "sparse")
    model.force_keep_rate(1.0, seed=0)
    return model


def run(depth: int, batches: list[int], rounds: int, threads: int | None) -> list[dict]:
    """One row per (batch, family): dense, dense* and gated medians (ms per image) and the overheads."""
    models = {f: build(f, depth) for f in FAMILIES}
    rows = []
    with torch_threads(threads):
        for batch in batches:
            n = max(1, 64 // batch)
            xs = [torch.randn(batch, 3, 32, 32, generator=torch.Generator().manual_seed(i)) for i in range(n)]
            fns = {}
            for f, m in models.items():
                dense, kernels = m.dense_baseline(), m.dense_baseline_kernels()
                fns[f"{f}:dense"] = lambda d=dense: [d(x) for x in xs]
                fns[f"{f}:dense*"] = lambda d=kernels: [d(x) for x in xs]
                fns[f] = lambda m=m: [m(x) for x in xs]
            times = time_rounds(fns, repeats=rounds, warmup=2)
            med = {k: statistics.median(v) / (n * batch) for k, v in times.items()}
            for f, m in models.items():
                led = m.ledger((3, 32, 32))
                router_macs = sum(led[f"routers.{i}"] for i in range(m.num_blocks))
                rows.append({"batch": batch, "model": f"{f}_resnet{depth}_cifar", "threads": torch.get_num_threads(),
                             "dense_ms": round(med[f"{f}:dense"], 4), "dense*_ms": round(med[f"{f}:dense*"], 4),
                             "gated_ms": round(med[f], 4),
                             "overhead_vs_dense": round(med[f] / med[f"{f}:dense"] - 1, 4),
                             "overhead_vs_dense*": round(med[f] / med[f"{f}:dense*"] - 1, 4),
                             "router_mac_share": round(router_macs / (led.total - router_macs), 5)})
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--depth", type=int, default=110, choices=[32, 110])
    p.add_argument("--batches", type=int, nargs="+", default=[1, 64])
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--json", action="store_true", help="print JSON rows instead of a table")
    args = p.parse_args()
    keep_freed_memory()  # time kernels, not page faults (ponder.bench)
    rows = run(args.depth, args.batches, args.rounds, args.threads)
    if args.json:
        print(json.dumps(rows, indent=1))
        return
    cols = list(rows[0])
    print(f"gated CIFAR ResNet-{args.depth}, all blocks kept, sparse executor, ms per image, "
          f"median of {args.rounds} interleaved rounds")
    print(" | ".join(cols))
    for r in rows:
        print(" | ".join(f"{r[c]:+.1%}" if c.startswith("overhead") else str(r[c]) for c in cols))


if __name__ == "__main__":
    main()
