"""Speed of the sparse spatial executor versus dense, on CPU (or any device).

Part 1 (``resnet50``): torchvision-layout ResNet-50 at 224 px, batch 1. Stages 2-4: the first unit
of each stage runs densely (as in SACT), every later unit is applied only at the active positions
of a spatially coherent random mask with ``--density`` of the positions active; stem, stage 1 and
head are dense (``--mask-first-unit`` masks the strided first units too, as DynConv does). Prints dense / sparse time, speed-up, MAC ratio (dense MACs / sparse-ledger MACs)
and efficiency = speed-up / MAC ratio.

Part 2 (``cifar``): CIFAR ResNet-32 (16/32/64 channels) units and the whole network with all
non-first units masked, at several densities: dense versus the sparse executor with its automatic
fall-back (``break_even="auto"``) and versus always-sparse (``break_even=None``).

    OMP_NUM_THREADS=1 python benchmarks/sparse_conv_speed.py --threads 1
    python benchmarks/sparse_conv_speed.py --threads 2 --parts resnet50

Timings are the minimum and median over interleaved repetitions after warm-up (warm-up also
runs the break-even calibration). On a shared host expect a few percent of noise. "dense" is the
fastest of the dense network as PyTorch runs it (NCHW or channels-last modules) and the dense
network on the executor's own kernels (BN folded, 1x1 convs as row GEMMs on the faster backend:
``ponder.nn.dense_units.resnet_on_kernels``), so the speed-ups are owed to sparsity alone.
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Callable

import torch
from torch import Tensor

import ponder
from ponder.bench import keep_freed_memory
from ponder.nn.dense_units import dense_unit_channels_last, resnet_on_kernels
from ponder.nn.sparse_cost import residual_macs
from ponder.fast.routes import stored_routes
from ponder.nn.sparse_fallback import coherent_mask
from ponder.nn.sparse_residual import masked_residual, sparse_residual


def stages_of(model) -> list[torch.nn.Sequential]:
    return [getattr(model, f"layer{i}") for i in range(1, 5) if hasattr(model, f"layer{i}")]


def stage_masks(model, x: Tensor, density: float, masked_stages: list[int], seed: int) -> dict[int, Tensor]:
    """One coherent mask per masked stage, on that stage's output grid (shared by its units)."""
    g = torch.Generator().manual_seed(seed)
    masks, h = {}, model.stem(x)
    for i, stage in enumerate(stages_of(model)):
        h = stage[0](h)
        if i in masked_stages:
            masks[i] = coherent_mask((h.shape[0], h.shape[2], h.shape[3]), density, g)
        for block in stage[1:]:
            h = block(h)
    return masks


def spatial_forward(model, x: Tensor, masks: dict[int, Tensor], executor: str, break_even,
                    first: bool = False) -> Tensor:
    """Logits of ``model`` with every unit after the first of a masked stage applied at its mask
    (SACT: the first unit of a stage runs densely; ``first=True`` masks it too, as DynConv)."""
    h = model.stem(x)
    for i, stage in enumerate(stages_of(model)):
        for j, block in enumerate(stage):
            if i not in masks or (j == 0 and not first):
                h = block(h)
            elif executor == "sparse":
                h = sparse_residual(block, h, masks[i], break_even=break_even)
            else:
                h = masked_residual(block, h, masks[i])
    return model.head(h)


def spatial_macs(model, x: Tensor, masks: dict[int, Tensor], first: bool = False) -> float:
    """Ledger MACs per sample (mean over the batch) of :func:`spatial_forward`."""
    dense = float(ponder.profile(model, tuple(x.shape[1:])).macs)
    saved, h = 0.0, model.stem(x)
    for i, stage in enumerate(stages_of(model)):
        for j, block in enumerate(stage):
            if i in masks and (j > 0 or first):
                size = tuple(h.shape[1:])
                full = torch.ones_like(masks[i])
                saved += float((residual_macs(block, size, full) - residual_macs(block, size, masks[i])).mean())
            h = block(h)
    return dense - saved


CLOCK = [time.perf_counter]


def bench(fns: dict[str, Callable[[], object]], reps: int, warmup: int = 2) -> dict[str, tuple[float, float]]:
    """``{name: (min_ms, median_ms)}`` over ``reps`` interleaved rounds (clock: ``--clock``)."""
    clock = CLOCK[0]
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(reps):
        for k, fn in fns.items():
            t0 = clock()
            fn()
            times[k].append((clock() - t0) * 1e3)
    return {k: (min(v), statistics.median(v)) for k, v in times.items()}


def run_resnet50(args) -> None:
    model = ponder.create_model("resnet50").eval()
    x = torch.randn(args.batch, 3, 224, 224)
    masks = stage_masks(model, x, args.density, [1, 2, 3], args.seed)
    xc = x.contiguous(memory_format=torch.channels_last)
    model_cl = ponder.create_model("resnet50").eval()
    model_cl.load_state_dict(model.state_dict())
    model_cl = model_cl.to(memory_format=torch.channels_last)
    first = args.mask_first_unit
    err = (spatial_forward(model, x, masks, "sparse", None, first)
           - spatial_forward(model, x, masks, "masked", None, first)).abs().max()
    fns = {
        "dense NCHW": lambda: model.forward_logits(x),
        "dense channels_last": lambda: model_cl.forward_logits(xc),
        "dense on kernels": lambda: resnet_on_kernels(model_cl, xc),
        "sparse (auto fall-back)": lambda: spatial_forward(model_cl, xc, masks, "sparse", "auto", first),
        "sparse (always)": lambda: spatial_forward(model_cl, xc, masks, "sparse", None, first),
        "masked dense": lambda: spatial_forward(model_cl, xc, masks, "masked", None, first),
    }
    res = bench(fns, args.reps)
    dense_ms = min(res["dense NCHW"][0], res["dense channels_last"][0], res["dense on kernels"][0])
    dense_macs, dyn_macs = float(ponder.profile(model, (3, 224, 224)).macs), spatial_macs(model, x, masks, first)
    mac_ratio = dense_macs / dyn_macs
    dens = {i + 1: round(float(m.float().mean()), 3) for i, m in masks.items()}
    print(f"\n== ResNet-50, 224 px, batch {args.batch}, threads {torch.get_num_threads()}, clock {args.clock}, "
          f"stage densities {dens} ({'all units' if first else 'units after the first'}), reps {args.reps} ==")
    print(f"max |sparse - masked| logits: {err:.2e}")
    print(f"dense MACs {dense_macs / 1e9:.3f} G, sparse-ledger MACs {dyn_macs / 1e9:.3f} G, mac_ratio {mac_ratio:.3f}")
    print(f"{'executor':26s} {'min ms':>9s} {'median ms':>10s} {'speedup':>8s} {'efficiency':>10s}")
    for k, (mn, md) in res.items():
        sp = dense_ms / mn
        print(f"{k:26s} {mn:9.2f} {md:10.2f} {sp:8.3f} {sp / mac_ratio:10.3f}")


def run_cifar(args) -> None:
    model = ponder.create_model("resnet32_cifar").eval()
    x = torch.randn(args.cifar_batch, 3, 32, 32)
    print(f"\n== CIFAR ResNet-32, batch {args.cifar_batch}, threads {torch.get_num_threads()}, clock {args.clock}, "
          f"reps {args.reps} ==")
    print("units (stride 1, identity), time in ms (min over reps); dense = the faster of the unit on the same\n"
          "channels_last input and the unit on the executor's kernels (NCHW shown for reference);\n"
          "ratio = dense / executor (>= 1: not slower); work = sparse-ledger MACs / dense MACs of the unit")
    print(f"{'unit':16s} {'density':>7s} {'work':>6s} {'NCHW':>8s} {'dense':>8s} {'auto':>8s} {'always':>8s} "
          f"{'dense/auto':>10s} {'dense/always':>12s}")
    h, g = model.stem(x), torch.Generator().manual_seed(args.seed)
    worst = float("inf")
    for i, stage in enumerate(stages_of(model)):
        h = stage[0](h)
        block, hin, hnchw = stage[1], h.contiguous(memory_format=torch.channels_last), h.contiguous()
        for d in args.densities:
            m = coherent_mask((h.shape[0], h.shape[2], h.shape[3]), d, g)
            work = float(residual_macs(block, tuple(h.shape[1:]), m).sum()
                         / residual_macs(block, tuple(h.shape[1:]), torch.ones_like(m)).sum())
            r = bench({"dense NCHW": lambda: block(hnchw), "dense": lambda: block(hin),
                       "kernels": lambda: dense_unit_channels_last(block, hin),
                       "auto": lambda: sparse_residual(block, hin, m, break_even="auto"),
                       "always": lambda: sparse_residual(block, hin, m, break_even=None)}, args.reps)
            r["dense"] = min(r["dense"], r.pop("kernels"))
            worst = min(worst, r["dense"][0] / r["auto"][0])
            print(f"{f'stage{i + 1} {h.shape[1]}@{h.shape[2]}':16s} {float(m.float().mean()):7.2f} {work:6.2f} "
                  f"{r['dense NCHW'][0]:8.3f} {r['dense'][0]:8.3f} {r['auto'][0]:8.3f} {r['always'][0]:8.3f} "
                  f"{r['dense'][0] / r['auto'][0]:10.3f} {r['dense'][0] / r['always'][0]:12.3f}")
        for block in stage[1:]:
            h = block(h)
    print(f"worst unit dense/auto ratio: {worst:.3f}")
    print("whole network, all units after the first of each stage masked:")
    print(f"{'density':>7s} {'mac_ratio':>9s} {'NCHW':>8s} {'dense':>8s} {'auto':>8s} {'always':>8s} {'speedup(auto)':>13s} "
          f"{'efficiency':>10s}")
    xc = x.contiguous(memory_format=torch.channels_last)
    model_cl = ponder.create_model("resnet32_cifar").eval()
    model_cl.load_state_dict(model.state_dict())
    model_cl = model_cl.to(memory_format=torch.channels_last)
    dense_macs = float(ponder.profile(model, (3, 32, 32)).macs)
    for d in args.densities:
        masks = stage_masks(model, x, d, [0, 1, 2], args.seed)
        mac_ratio = dense_macs / spatial_macs(model, x, masks)
        r = bench({"dense NCHW": lambda: model.forward_logits(x), "dense": lambda: model_cl.forward_logits(xc),
                   "kernels": lambda: resnet_on_kernels(model_cl, xc),
                   "auto": lambda: spatial_forward(model_cl, xc, masks, "sparse", "auto"),
                   "always": lambda: spatial_forward(model_cl, xc, masks, "sparse", None)}, args.reps)
        r["dense"] = min(r["dense"], r.pop("kernels"))
        sp = r["dense"][0] / r["auto"][0]
        print(f"{d:7.2f} {mac_ratio:9.3f} {r['dense NCHW'][0]:8.2f} {r['dense'][0]:8.2f} {r['auto'][0]:8.2f} "
              f"{r['always'][0]:8.2f} "
              f"{sp:13.3f} {sp / mac_ratio:10.3f}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    p.add_argument("--parts", nargs="+", default=["resnet50", "cifar"], choices=["resnet50", "cifar"])
    p.add_argument("--density", type=float, default=0.5, help="ResNet-50: fraction of active positions")
    p.add_argument("--densities", type=float, nargs="+", default=[0.05, 0.1, 0.25, 0.5, 0.75, 0.9])
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--mask-first-unit", action="store_true",
                   help="ResNet-50: also mask the first (strided, projection) unit of stages 2-4 (DynConv style)")
    p.add_argument("--cifar-batch", type=int, default=64)
    p.add_argument("--reps", type=int, default=10)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--show-break-evens", action="store_true")
    p.add_argument("--clock", choices=["wall", "cpu"], default="wall",
                   help="wall: perf_counter; cpu: this thread's CPU time (1 thread only; robust on a shared host)")
    args = p.parse_args()
    if args.clock == "cpu":
        if args.threads != [1]:
            p.error("--clock cpu measures one thread's CPU time: use it with --threads 1")
        CLOCK[0] = time.thread_time
    torch.manual_seed(args.seed)
    torch.set_flush_denormal(True)
    keep_freed_memory()
    with torch.no_grad():
        for t in args.threads:
            torch.set_num_threads(t)
            for part in args.parts:
                {"resnet50": run_resnet50, "cifar": run_cifar}[part](args)
    if args.show_break_evens:
        for key, v in stored_routes().items():  # the break-evens this machine has measured (ponder kernels)
            if key.startswith("break_even|"):
                print(f"{key}: {v:.3f}")


if __name__ == "__main__":
    main()
