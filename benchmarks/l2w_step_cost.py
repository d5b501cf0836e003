"""Training cost of L2W against plain multi-exit training, and where its time goes.

Usage: python benchmarks/l2w_step_cost.py [--model msdnet_cifar_budgeted] [--batch 64] [--repeats 5]
           [--cycle 100] [--cycle-repeats 2] [--device cpu] [--threads 1]

On random CIFAR-sized data, with the official order (both halves train, so the backbone takes the
same steps as plain training at half the batch), interleaved round by round:

- per iteration: plain (two SGD steps on the halves), L2W with a meta step (I = 1) and L2W without
  one (the iterations between meta steps);
- per cycle of ``--cycle`` iterations (an epoch's worth at I = 100): ``--cycle`` plain iterations
  against ``--cycle`` L2W iterations with ``meta_interval = --cycle`` (one meta step per cycle),
  interleaved iteration by iteration and summed;
- the parts of one order of a meta iteration: the shared forward pass, the virtual step's backward
  pass, the meta forward pass through the virtual parameters, the meta backward pass to the virtual
  gradient, the Jacobian-vector product, the WPN's update, and the real step's backward pass.

Prints medians in ms with the spread (lowest-highest) and the ratios to plain, in wall-clock time and
in this process's CPU time (which other processes on a shared machine disturb less; use one thread).
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from typing import Callable

import torch

from ponder import create_model
from ponder.config import OptimConfig
from ponder.engine.optim import build_optimizer
from ponder.methods.l2w_meta import (build_wpn_optimizer, exit_losses, functional_forward, l2w_iteration, loss_jvp,
                                     meta_loss, weighted_exit_loss)
from ponder.methods.virtual_sgd import virtual_sgd_step
from ponder.nn.thresholds import exit_proportions
from ponder.nn.wpn import WeightPredictionNetwork, centre


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _fmt(ts: list[float], base: float) -> str:
    m = statistics.median(ts)
    return f"{1e3 * m:9.0f} ms [{1e3 * min(ts):.0f}-{1e3 * max(ts):.0f}] x{m / base:.2f}"


class Clock:
    """Wall-clock and CPU time of a stretch of code, accumulated per name."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.wall: dict[str, list[float]] = {}
        self.cpu: dict[str, list[float]] = {}

    def time(self, name: str, fn: Callable[[], None], add: bool = False) -> None:
        _sync(self.device)
        w, c = time.perf_counter(), time.process_time()
        fn()
        _sync(self.device)
        w, c = time.perf_counter() - w, time.process_time() - c
        for store, v in ((self.wall, w), (self.cpu, c)):
            runs = store.setdefault(name, [])
            if add and runs:
                runs[-1] += v
            else:
                runs.append(v)

    def line(self, name: str, base: str) -> str:
        return (f"{_fmt(self.wall[name], statistics.median(self.wall[base]))} | "
                f"{_fmt(self.cpu[name], statistics.median(self.cpu[base]))}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="msdnet_cifar_budgeted")
    ap.add_argument("--batch", type=int, default=64, help="L2W batch (two halves); plain steps take half")
    ap.add_argument("--repeats", type=int, default=5, help="rounds of the per-iteration timings")
    ap.add_argument("--cycle", type=int, default=100, help="iterations per cycle (I of the cycle timing; 0: skip)")
    ap.add_argument("--cycle-repeats", type=int, default=2)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    torch.manual_seed(0)
    model = create_model(args.model, num_classes=10).to(device).train()
    opt = build_optimizer([{"params": list(model.parameters())}], model, OptimConfig(lr=0.01))
    wpn = WeightPredictionNetwork(model.num_exits).to(device)
    wpn_opt = build_wpn_optimizer(wpn)
    x = torch.randn(args.batch, *model.default_input_size, device=device)
    y = torch.randint(0, 10, (args.batch,), device=device)
    half = args.batch // 2
    P = exit_proportions(0.75, model.num_exits)

    def plain() -> None:
        for sl in (slice(0, half), slice(half, None)):
            losses, _ = exit_losses(model(x[sl]).exit_logits, y[sl])
            opt.zero_grad(set_to_none=True)
            losses.mean(dim=0).sum().backward()
            opt.step()

    def l2w(iteration: int, interval: int) -> None:
        l2w_iteration(model, opt, wpn, wpn_opt, x, y, iteration=iteration, meta_interval=interval, orders="both")

    parts: dict[str, list[float]] = {k: [] for k in ("shared forward", "virtual backward", "virtual step + meta forward",
                                                     "meta backward", "Jacobian-vector product", "WPN update",
                                                     "real backward + step")}

    def meta_parts() -> None:
        """One order of a meta iteration, piece by piece (what l2w_iteration runs, one process)."""
        ts = [time.process_time()]

        def mark() -> None:
            _sync(device)
            ts.append(time.process_time())

        params = dict(model.named_parameters())
        out = model(x[:half])
        losses, conf = exit_losses(out.exit_logits, y[:half])
        mark()
        v = wpn.outputs(losses, conf)
        w = 1.0 + wpn.delta * centre(v.detach(), wpn.normalisation)
        grads = torch.autograd.grad(weighted_exit_loss(losses, w), list(params.values()), retain_graph=True)
        mark()
        g = {n: gr.requires_grad_() for n, gr in zip(params, grads)}
        theta = {n: p.detach() for n, p in params.items()}
        meta = meta_loss(functional_forward(model, virtual_sgd_step(opt, params, g, start=theta), x[half:]).exit_logits,
                         y[half:], P)
        mark()
        u = dict(zip(g, torch.autograd.grad(meta, list(g.values()))))
        mark()
        d_w = loss_jvp(model, theta, u, x[:half], y[:half]) / half
        mark()
        wpn_opt.zero_grad(set_to_none=True)
        (wpn.delta * centre(d_w, wpn.normalisation) * v).sum().backward(inputs=list(wpn.parameters()))
        wpn_opt.step()
        mark()
        with torch.no_grad():
            w = wpn(losses, conf)
        opt.zero_grad(set_to_none=True)
        weighted_exit_loss(losses, w).backward()
        opt.step()
        mark()
        for name, a, b in zip(parts, ts, ts[1:]):
            parts[name].append(b - a)

    runs: dict[str, Callable[[], None]] = {"plain (2 steps of B/2)": plain, "L2W, meta step (I = 1)": lambda: l2w(0, 1),
                                           "L2W, no meta step": lambda: l2w(1, 2)}
    clock = Clock(device)
    for fn in runs.values():  # warm-up (ledger, allocator)
        fn()
    meta_parts()
    for v in parts.values():
        v.clear()
    for _ in range(args.repeats):
        for name, fn in runs.items():
            clock.time(name, fn)
        meta_parts()
    plain_cycle, l2w_cycle = f"plain, {args.cycle} iterations", f"L2W I = {args.cycle}, {args.cycle} iterations"
    for _ in range(args.cycle_repeats if args.cycle else 0):
        for i in range(args.cycle):
            clock.time(plain_cycle, plain, add=i > 0)
            clock.time(l2w_cycle, lambda: l2w(i, args.cycle), add=i > 0)

    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"{args.model}, batch {args.batch} (halves of {half}), {device}, threads {torch.get_num_threads()}; "
          f"load average {load:.2f}")
    print(f"  median [lowest-highest] of {args.repeats} interleaved rounds: wall-clock | CPU time")
    for name in runs:
        print(f"  {name:30s} {clock.line(name, 'plain (2 steps of B/2)')}")
    if args.cycle:
        print(f"  per cycle, median of {args.cycle_repeats} (interleaved iteration by iteration):")
        for name in (plain_cycle, l2w_cycle):
            print(f"  {name:30s} {clock.line(name, plain_cycle)}")
    base = statistics.median(clock.cpu["plain (2 steps of B/2)"])
    print(f"  one order of a meta iteration, CPU time (a plain step on a half: {1e3 * base / 2:.0f} ms):")
    for name, ts in parts.items():
        m = statistics.median(ts)
        print(f"    {name:30s} {1e3 * m:7.0f} ms  x{m / (base / 2):.2f} of a plain step")


if __name__ == "__main__":
    main()
