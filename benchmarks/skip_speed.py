"""Measured speed of block skipping: BlockDrop's sparse executor vs the dense ResNet (CPU, 1 thread).

For each batch size: ResNet-110 (CIFAR) with random per-sample keep decisions at ``--keep-rate``
(``force_keep_rate``: the policy still runs and is timed and charged), timed against the dense
backbone. Prints one JSON line per configuration with ``dense_ms``, ``dynamic_ms`` (sparse executor,
policy included), ``speedup``, ``mac_ratio`` (dense MACs / mean dynamic MACs incl. the policy),
``efficiency`` = speedup / mac_ratio, ``masked_ms`` (the masked executor: never use it for speed),
and the split of the dynamic time into ``policy_ms`` and ``skip_ms`` (blocks under the decisions,
no policy) with ``speedup_without_policy``.

    OMP_NUM_THREADS=1 python benchmarks/skip_speed.py [--model blockdrop_resnet110_cifar]
        [--keep-rate 0.3] [--batches 64 1] [--repeats 10]

Timings are medians of interleaved rounds; on a shared machine expect +-10-15 % noise.
"""

from __future__ import annotations

import argparse
import json

import torch

from ponder.bench import as_dict, bench_dynamic, keep_freed_memory, time_interleaved, torch_threads
from ponder.nn.executor import set_executor
from ponder.registry import create_model


def policy_split(model, batches: list[torch.Tensor], repeats: int) -> dict[str, float]:
    """Median ms per batch of the policy alone and of the backbone under fixed decisions (no policy)."""
    backbone = model.backbone
    with torch.inference_mode():
        decisions = [model(b).gates for b in batches]

        def policy() -> None:
            for b in batches:
                model.policy(b)

        def skip() -> None:
            for b, keep in zip(batches, decisions):
                backbone.head(model.skipper.run_blocks(backbone.blocks, backbone.stem(b), keep))

        ms = time_interleaved({"policy": policy, "skip": skip}, repeats=repeats, warmup=1)
    return {"policy_ms": ms["policy"] / len(batches), "skip_ms": ms["skip"] / len(batches)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="blockdrop_resnet110_cifar")
    parser.add_argument("--keep-rate", type=float, default=0.3)
    parser.add_argument("--batches", type=int, nargs="+", default=[64, 1])
    parser.add_argument("--images", type=int, default=128, help="images per timed round (split into batches)")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    keep_freed_memory()  # time kernels, not page faults (ponder.bench)
    torch.manual_seed(0)
    model = create_model(args.model).eval()
    with torch_threads(args.threads):
        for batch in args.batches:
            n = max(1, args.images // batch) if batch > 1 else min(args.images, 32)
            batches = [torch.randn(batch, 3, 32, 32) for _ in range(n)]
            model.force_keep_rate(args.keep_rate, seed=0)
            result = as_dict(bench_dynamic(model, args.model, batches, args.threads,
                                           mode=f"keep-rate {args.keep_rate}", repeats=args.repeats))
            set_executor(model, "sparse")
            split = policy_split(model, batches, args.repeats)
            result.update(split, speedup_without_policy=result["dense_ms"] / split["skip_ms"],
                          keep_rate=args.keep_rate, executor="sparse")
            print(json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in result.items()}), flush=True)


if __name__ == "__main__":
    main()
