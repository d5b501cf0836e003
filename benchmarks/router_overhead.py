"""Latency overhead of the gated ResNets' routers (ConvNet-AIG, SP-Net, CoDiNet, RDI-Net) over the dense ResNet.

Every block is kept (``force_keep_rate(1.0)``, sparse executor: the routers still run and are paid for), so
the difference to the dense network is the routers' cost and the per-block bookkeeping. Timed against the
plain dense backbone (``dense``) and the same dense network on the sparse executor's kernels (``dense*``,
BN folded, channels-last: the overhead owed to the routers alone). Medians of interleaved rounds, torch's
default thread count unless ``--threads``; shared machines are noisy: check ``uptime``, repeat, compare medians.

    python benchmarks/router_overhead.py --batches 1 64 [--threads 1]
    python benchmarks/router_overhead.py --models aig_resnet50 aig_resnet101 spnet_resnet50 --batches 1 --images 2
"""

from __future__ import annotations

import argparse
import json
import statistics

import torch

from ponder.bench import keep_freed_memory, time_rounds, torch_threads
from ponder.nn.executor import set_executor
from ponder.registry import create_model

CIFAR_110 = ("aig_resnet110_cifar", "spnet_resnet110_cifar", "codinet_resnet110_cifar", "rdinet_resnet110_cifar")


def build(name: str):
    torch.manual_seed(0)
    model = create_model(name).eval()
    set_executor(model, "sparse")
    model.force_keep_rate(1.0, seed=0)
    return model


def run(names: list[str], batches: list[int], rounds: int, threads: int | None, images: int = 64) -> list[dict]:
    """One row per (batch, model): dense, dense* and gated medians (ms per image) and the overheads."""
    models = {f: build(f) for f in names}
    rows = []
    with torch_threads(threads):
        for batch in batches:
            n = max(1, images // batch)
            xs = {f: [torch.randn(batch, *m.default_input_size, generator=torch.Generator().manual_seed(i))
                      for i in range(n)] for f, m in models.items()}
            fns = {}
            for f, m in models.items():
                dense, kernels = m.dense_baseline(), m.dense_baseline_kernels()
                fns[f"{f}:dense"] = lambda d=dense, f=f: [d(x) for x in xs[f]]
                fns[f"{f}:dense*"] = lambda d=kernels, f=f: [d(x) for x in xs[f]]
                fns[f] = lambda m=m, f=f: [m(x) for x in xs[f]]
            times = time_rounds(fns, repeats=rounds, warmup=2)
            med = {k: statistics.median(v) / (n * batch) for k, v in times.items()}
            for f, m in models.items():
                led = m.ledger(tuple(m.default_input_size))
                router_macs = sum(led[f"routers.{i}"] for i in range(m.num_blocks))
                rows.append({"batch": batch, "model": f, "threads": torch.get_num_threads(),
                             "dense_ms": round(med[f"{f}:dense"], 4), "dense*_ms": round(med[f"{f}:dense*"], 4),
                             "gated_ms": round(med[f], 4),
                             "overhead_vs_dense": round(med[f] / med[f"{f}:dense"] - 1, 4),
                             "overhead_vs_dense*": round(med[f] / med[f"{f}:dense*"] - 1, 4),
                             "router_mac_share": round(router_macs / (led.total - router_macs), 5)})
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="+", default=list(CIFAR_110), help="registered gated models")
    p.add_argument("--batches", type=int, nargs="+", default=[1, 64])
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--images", type=int, default=64, help="images per timed round (split into batches)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--json", action="store_true", help="print JSON rows instead of a table")
    args = p.parse_args()
    keep_freed_memory()  # time kernels, not page faults (ponder.bench)
    rows = run(args.models, args.batches, args.rounds, args.threads, args.images)
    if args.json:
        print(json.dumps(rows, indent=1))
        return
    cols = list(rows[0])
    print(f"gated ResNets, all blocks kept, sparse executor, ms per image, median of {args.rounds} interleaved rounds")
    print(" | ".join(cols))
    for r in rows:
        print(" | ".join(f"{r[c]:+.1%}" if c.startswith("overhead") else str(r[c]) for c in cols))


if __name__ == "__main__":
    main()
