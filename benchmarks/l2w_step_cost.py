"""Cost of one L2W training iteration against plain multi-exit training, and where its time goes.

Usage: python benchmarks/l2w_step_cost.py [--model msdnet_cifar_budgeted] [--batch 128] [--repeats 5]
           [--device cpu] [--threads 1]

Times, on random CIFAR-sized data with the official order (both halves train, so the backbone takes
the same steps as plain training at half the batch): plain (two SGD steps on the halves), L2W with
a meta step every iteration (I = 1) and L2W without one (the iterations between meta steps, whose
share is (I - 1) / I), interleaved round by round; then the parts of a meta step: the virtual step
(forward + create_graph backward), the forward through the virtual parameters, and the meta backward
to the WPN. Prints medians in ms and the ratios to plain.
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Callable

import torch

from ponder import create_model
from ponder.nn.thresholds import exit_proportions
from ponder.config import OptimConfig
from ponder.engine.optim import build_optimizer
from ponder.methods.l2w_meta import (build_wpn_optimizer, exit_losses, functional_forward, l2w_iteration,
                                     meta_loss, virtual_parameters)
from ponder.nn.wpn import WeightPredictionNetwork


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="msdnet_cifar_budgeted")
    ap.add_argument("--batch", type=int, default=128, help="L2W batch (two halves); plain steps take half")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    torch.manual_seed(0)
    model = create_model(args.model, num_classes=10).to(device).train()
    opt = build_optimizer([{"params": list(model.parameters())}], model, OptimConfig(lr=0.1))
    wpn = WeightPredictionNetwork(model.num_exits).to(device)
    wpn_opt = build_wpn_optimizer(wpn)
    x = torch.randn(args.batch, *model.default_input_size, device=device)
    y = torch.randint(0, 10, (args.batch,), device=device)
    half = args.batch // 2

    def plain() -> None:
        for sl in (slice(0, half), slice(half, None)):
            losses, _ = exit_losses(model(x[sl]).exit_logits, y[sl])
            opt.zero_grad(set_to_none=True)
            losses.mean(dim=0).sum().backward()
            opt.step()

    def l2w(meta: bool) -> Callable[[], None]:
        return lambda: l2w_iteration(model, opt, wpn, wpn_opt, x, y, iteration=0 if meta else 1,
                                     meta_interval=1 if meta else 2, orders="both")

    P = exit_proportions(0.75, model.num_exits)
    parts: dict[str, list[float]] = {"virtual step": [], "meta forward": [], "meta backward": []}

    def meta_parts() -> None:
        t0 = time.perf_counter()
        theta_hat, _ = virtual_parameters(model, opt, wpn, x[:half], y[:half])
        _sync(device)
        t1 = time.perf_counter()
        out = functional_forward(model, theta_hat, x[half:])
        loss = meta_loss(out.exit_logits, y[half:], P)
        _sync(device)
        t2 = time.perf_counter()
        torch.autograd.grad(loss, list(wpn.parameters()), allow_unused=True)
        _sync(device)
        t3 = time.perf_counter()
        for name, v in zip(parts, (t1 - t0, t2 - t1, t3 - t2)):
            parts[name].append(v)

    runs = {"plain (2 steps of B/2)": plain, "L2W, meta step (I = 1)": l2w(True), "L2W, no meta step": l2w(False)}
    times: dict[str, list[float]] = {k: [] for k in runs}
    for fn in runs.values():  # warm-up (ledger, allocator)
        fn()
    for _ in range(args.repeats):
        for name, fn in runs.items():
            _sync(device)
            t = time.perf_counter()
            fn()
            _sync(device)
            times[name].append(time.perf_counter() - t)
        meta_parts()
    base = statistics.median(times["plain (2 steps of B/2)"])
    print(f"{args.model}, batch {args.batch} (halves of {half}), {device}, threads {torch.get_num_threads()}, "
          f"median of {args.repeats}")
    for name, ts in times.items():
        m = statistics.median(ts)
        print(f"  {name:28s} {1e3 * m:9.1f} ms  x{m / base:.2f}")
    print("  per meta step (one order):")
    for name, ts in parts.items():
        print(f"    {name:26s} {1e3 * statistics.median(ts):9.1f} ms")


if __name__ == "__main__":
    main()
