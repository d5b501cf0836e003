"""Spatial models against their dense ResNets: ``ponder bench`` over models, keep rates and batch sizes.

Runs ``ponder bench MODEL --keep-rate R --batch B --threads T --json`` for every combination (one process
each, the dense baseline interleaved with the dynamic model inside it), writes one JSON line per run to
``--out`` and prints a Markdown table: median ms per batch of the dense ResNet (plain PyTorch), of the same
dense network on the sparse executor's kernels (``dense*``) and of the dynamic model, the speed-up over
each with the lowest and highest single-round ratio, the MAC ratio and the efficiency (speed-up / MAC ratio).

    OMP_NUM_THREADS=1 python benchmarks/spatial_speed.py --out results/dynconv/speed_cifar.jsonl
    OMP_NUM_THREADS=1 python benchmarks/spatial_speed.py --models dynconv_resnet50 --keep-rates 0.5 \
        --batches 1 8 --images 8 --repeats 5 --out results/dynconv/speed_resnet50.jsonl
    python benchmarks/spatial_speed.py --table results/dynconv/speed_cifar.jsonl    # the table of stored runs
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

CIFAR_MODELS = ["sact_resnet32_cifar", "dynconv_resnet32_cifar", "dynconv_multi_resnet32_cifar"]


def bench(model: str, rate: float, batch: int, threads: int, images: int, repeats: int) -> dict:
    """One ``ponder bench --json`` run's result."""
    cmd = [sys.executable, "-m", "ponder.cli", "bench", model, "--keep-rate", str(rate), "--batch", str(batch),
           "--threads", str(threads), "--images", str(max(images, batch)), "--repeats", str(repeats), "--json"]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return json.loads(out[out.index("{"):])


def row(r: dict) -> str:
    """One Markdown table row of a bench result."""
    lo, hi = r["speedup_range"]
    star = "" if r.get("dense_kernels_ms") is None else \
        f"{r['dense_kernels_ms']:.2f} | {r['speedup_vs_kernels']:.2f}x"
    return (f"| {r['model']} | {r['mode'].removeprefix('keep-rate ')} | {r['batch']} | {r['dense_ms']:.2f} | {star} | "
            f"{r['dynamic_ms']:.2f} | **{r['speedup']:.2f}x** ({lo:.2f}-{hi:.2f}) | {r['mac_ratio']:.2f}x | "
            f"{r['efficiency']:.2f} |")


HEADER = ("| model | keep rate | batch | dense ms | dense* ms | vs dense* | dynamic ms | speed-up (rounds) | "
          "MAC ratio | efficiency |\n|---|---|---|---|---|---|---|---|---|---|")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="+", default=CIFAR_MODELS)
    p.add_argument("--keep-rates", type=float, nargs="+", default=[0.1, 0.5, 0.9, 1.0])
    p.add_argument("--batches", type=int, nargs="+", default=[1, 64])
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--images", type=int, default=64, help="images per timed round (ponder bench --images)")
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--out", type=Path, help="append one JSON line per run here")
    p.add_argument("--table", type=Path, nargs="+", help="print the table of these stored runs (JSON lines), run nothing")
    args = p.parse_args()
    print(HEADER, flush=True)
    if args.table:
        for path in args.table:
            for line in path.read_text().splitlines():
                if line.strip():
                    print(row(json.loads(line)))
        return
    for model in args.models:
        for batch in args.batches:
            for rate in args.keep_rates:
                r = bench(model, rate, batch, args.threads, args.images, args.repeats)
                if args.out:
                    with args.out.open("a") as f:
                        f.write(json.dumps(r) + "\n")
                print(row(r), flush=True)


if __name__ == "__main__":
    main()
