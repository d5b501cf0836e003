"""The ``ponder`` command: models, flops, train, eval, sweep, bench, report, convert, kernels, ponder-map, demo."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any, Callable, Sequence


class CLIError(Exception):
    """A user error: printed as one sentence, exit status 2."""


def _input_size(args: argparse.Namespace, model: Any) -> tuple[int, int, int]:
    size = tuple(args.input_size) if args.input_size else tuple(model.default_input_size)
    if len(size) != 3 or min(size) <= 0:
        raise CLIError(f"--input-size takes three positive integers C H W, got {list(size)}")
    if size[0] != model.default_input_size[0]:
        raise CLIError(f"{args.name} takes {model.default_input_size[0]}-channel input, "
                       f"got --input-size {' '.join(map(str, size))}")
    return size  # type: ignore[return-value]


def _check_counts(args: argparse.Namespace, minimum: dict[str, int]) -> None:
    """Refuse a count option below its minimum, e.g. ``--batch 0`` (``minimum``: attribute -> least value)."""
    for name, least in minimum.items():
        value = getattr(args, name, None)
        if value is not None and value < least:
            rule = "a positive integer" if least == 1 else f"an integer >= {least}"
            raise CLIError(f"--{name.replace('_', '-')} must be {rule}, got {value}")


def _model(args: argparse.Namespace) -> Any:
    import ponder

    _check_counts(args, {"num_classes": 1})
    kwargs = {"num_classes": getattr(args, "num_classes", None)}
    kwargs.update(_parse_options(getattr(args, "model_arg", [])))
    try:
        return ponder.create_model(args.name, **kwargs)
    except TypeError as e:  # a --model-arg the factory does not take
        raise CLIError(f"{args.name} does not accept these options ({e}); check --model-arg names") from None


def cmd_models(args: argparse.Namespace) -> None:
    import ponder
    from ponder.cost import format_count
    from ponder.registry import model_info

    names = ponder.list_models(args.pattern)
    if not names:
        raise CLIError(f"no model matches {args.pattern!r}; run `ponder models` without a pattern")
    rows = []
    for i, name in enumerate(names):
        info = model_info(name)
        row = {"name": name, "family": info.family, "paper": info.paper, "summary": info.summary}
        if args.macs:  # builds each model: seconds per ImageNet network
            print(f"\r[{i + 1}/{len(names)}] profiling {name:<32s}", end="", file=sys.stderr, flush=True)
            model = ponder.create_model(name)
            prof = ponder.profile(model, tuple(model.default_input_size), name=name)
            row.update(input_size=list(prof.input_size), params=prof.params, macs=prof.macs)
        rows.append(row)
    if args.macs:
        print(file=sys.stderr)
    if args.json:
        print(json.dumps(rows, indent=1))
        return
    if args.markdown:
        print(models_markdown(rows))
        return
    if args.macs:
        print(f"{'model':32s} {'family':11s} {'input':>11s} {'params':>9s} {'MACs':>9s}")
        for r in rows:
            size = "x".join(map(str, r["input_size"]))
            print(f"{r['name']:32s} {r['family']:11s} {size:>11s} {format_count(r['params']):>9s} "
                  f"{format_count(r['macs']):>9s}")
        return
    print(f"{'model':32s} {'family':11s} paper")
    for r in rows:
        print(f"{r['name']:32s} {r['family']:11s} {r['paper']}")
    print(f"({len(rows)} models; `ponder models --macs` adds params and MACs, `ponder flops NAME` the details)")


def models_markdown(rows: list[dict[str, Any]]) -> str:
    """The model table of the README: one row per family and paper, with the registered names."""
    order = {"static": 0, "early_exit": 1, "skipping": 2, "spatial": 3}
    groups: dict[tuple[str, str], list[str]] = {}
    for r in rows:
        groups.setdefault((r["family"], r["paper"]), []).append(r["name"])
    lines = ["| family | paper | models |", "|:---|:---|:---|"]
    for (family, paper), names in sorted(groups.items(), key=lambda g: (order.get(g[0][0], 9), g[0][1])):
        lines.append(f"| {family.replace('_', ' ')} | {paper} | {', '.join(f'`{n}`' for n in names)} |")
    return "\n".join(lines)


def cmd_flops(args: argparse.Namespace) -> None:
    import ponder
    from ponder.cost import format_count

    model = _model(args)
    prof = ponder.profile(model, _input_size(args, model), name=args.name)
    if args.json:
        print(json.dumps(prof.to_json()))
        return
    print(f"{args.name}  input {'x'.join(map(str, prof.input_size))}")
    print(f"  params  {prof.params:>16,d}  ({format_count(prof.params)})")
    print(f"  MACs    {prof.macs:>16,d}  ({format_count(prof.macs)}; FLOPs = 2 x MACs = {format_count(prof.flops)})")
    if prof.exits:
        official = all("macs_official" in e for e in prof.exits)  # multi-exit models: the papers' convention too
        print("  exit  cumulative params  cumulative MACs" + ("  official op_counter" if official else ""))
        for i, e in enumerate(prof.exits):
            print(f"  {i:>4d}  {e['params']:>17,d}  {e['macs']:>15,d}" + (f"  {e['macs_official']:>20,d}" if official else ""))
    if prof.budgets:
        base = prof.budgets[0]["base_params"]
        print(f"  the dense ResNet has {base:,d} params: this model adds {100 * (prof.params / base - 1):.1f} %")
        print("  budget  params (one budget's network)  nominal MACs (unconditional + budget x conditional)")
        for b in prof.budgets:
            print(f"  {b['budget']:>6.2f}  {b['params']:>31,d}  {b['macs']:>16,d}  ({format_count(b['macs'])})")
    if prof.blocks and args.blocks:
        print("  block  MACs")
        for b in prof.blocks:
            print(f"  {b['name']:>14s}  {b['macs']:>13,d}")


def cmd_train(args: argparse.Namespace) -> None:
    import os

    from ponder.config import load_config

    if not args.recipe and not args.resume:
        raise CLIError("give a RECIPE.yaml (or --resume RUN_DIR to continue a run)")
    config = load_config(args.recipe, args.set) if args.recipe else None
    if not args.out and not args.resume:
        raise CLIError("give --out DIR for a new run (or --resume RUN_DIR to continue one)")
    from ponder.engine import train

    run_dir = train(config, args.out or args.resume, resume=args.resume, data_dir=args.data_dir,
                    overwrite=args.overwrite)
    if os.environ.get("RANK", "0") == "0":
        print(f"run directory: {run_dir}")


def cmd_eval(args: argparse.Namespace) -> None:
    from ponder.engine import evaluate_run

    options = dict(_parse_options(args.option))
    result = evaluate_run(args.run_dir, protocol=args.protocol, data_dir=args.data_dir,
                          out_dir=args.out, options=options)
    print(json.dumps(result, indent=1) if args.json else _summary_text(result))


def _parse_options(items: Sequence[str]) -> list[tuple[str, Any]]:
    import yaml

    out = []
    for item in items or []:
        if "=" not in item:
            raise CLIError(f"option {item!r} must look like key=value")
        k, v = item.split("=", 1)
        if not k:
            raise CLIError(f"option {item!r} has no name before '='")
        out.append((k, yaml.safe_load(v)))
    return out


def _summary_text(result: dict) -> str:
    """A protocol's result for the terminal: one line per field; lists of records (exits, thresholds,
    budgets) in full, one record per line."""
    lines = []
    for k, v in result.items():
        if isinstance(v, float):
            lines.append(f"{k:24s} {v:.4f}")
        elif isinstance(v, (int, str)) or v is None:
            lines.append(f"{k:24s} {v}")
        elif isinstance(v, list) and v and all(isinstance(r, dict) for r in v):
            lines.append(f"{k}:")
            lines += ["  " + "  ".join(f"{f} {_short(x)}" for f, x in r.items()) for r in v]
        else:
            lines.append(f"{k:24s} {json.dumps(v)}")
    return "\n".join(lines)


def _short(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, list):
        return "[" + ", ".join(_short(x) for x in value) + "]"
    return str(value)


def cmd_bench(args: argparse.Namespace) -> None:
    import torch

    from ponder import bench
    from ponder.models.base import DynamicModel

    _check_counts(args, {"batch": 1, "images": 1, "repeats": 1, "warmup": 0, "threads": 1})
    if args.save and not args.checkpoint:
        raise CLIError("--save needs --checkpoint RUN_DIR: a saved result belongs to a run")
    bench.keep_freed_memory()
    if args.checkpoint:
        from ponder.data import build_loaders
        from ponder.engine import data_config_for, load_run_with_data
        from ponder.evaluate.budget import calibrate_on

        model, config, bundle = load_run_with_data(args.checkpoint, args.data_dir)
        data_cfg = data_config_for(config, args.data_dir)
        test = bundle.test
        if args.budget is not None:
            if not isinstance(model, DynamicModel):
                raise CLIError(f"{config.model.name} is static: it has no budget")
            if bundle.val is None:
                raise CLIError("--budget is fitted on the run's held-out split, but it has none "
                               "(data.val_size > 0 in its recipe); use --knob VALUE instead")
            _, val_loader, _ = build_loaders(bundle, data_cfg, seed=config.train.seed)
            calibrate_on(model.eval(), val_loader)
        n = max(args.batch, args.images)
        n_batches = max(1, n // args.batch)
        if n_batches * args.batch > len(test):
            raise CLIError(f"--images {n} needs more than the {len(test)} test images; lower --images")
        xs = torch.stack([test[i][0] for i in range(n_batches * args.batch)])
        batches = list(xs.split(args.batch))
        mode, name = "checkpoint", config.model.name
    else:
        model = _model(args)
        name = args.name
        size = _input_size(args, model)
        if not isinstance(model, DynamicModel):
            if args.keep_rate is not None or args.budget is not None or args.knob is not None:
                raise CLIError(f"{name} is a static model: --keep-rate, --budget and --knob need a dynamic model")
            result: Any = bench.bench_static(model, name, args.batch, size, args.threads, args.repeats, args.warmup)
            _print_bench(result, args.json)
            return
        if args.budget is not None:
            raise CLIError("--budget is fitted on a trained run's held-out split: give --checkpoint RUN_DIR, "
                           "or time an untrained model with --keep-rate r")
        if args.keep_rate is None and args.knob is None:
            raise CLIError(f"{name} is dynamic: give --keep-rate r (forced decisions) or --checkpoint RUN_DIR")
        if args.keep_rate is not None:
            if not 0.0 <= args.keep_rate <= 1.0:
                raise CLIError(f"--keep-rate must be in [0, 1], got {args.keep_rate}")
            model.force_keep_rate(args.keep_rate, seed=0)
        g = torch.Generator().manual_seed(0)
        n_batches = max(1, args.images // args.batch)
        batches = [torch.randn(args.batch, *size, generator=g) for _ in range(n_batches)]
        mode = f"keep-rate {args.keep_rate}" if args.keep_rate is not None else f"knob {args.knob}"
    if args.knob is not None:
        if not isinstance(model, DynamicModel):
            raise CLIError(f"{name} is static: it has no knob")
        model.set_knob(args.knob)
        mode += f", {model.knob.name} {args.knob}"
    if args.budget is not None:
        reached = model.set_budget(args.budget)
        mode += f", budget {args.budget:.4g} MACs (held-out mean {reached:.4g})"
    if isinstance(model, DynamicModel):
        result = bench.bench_dynamic(model, name, batches, args.threads, mode, args.repeats, args.warmup)
    else:  # a static run (--checkpoint): its time does not depend on the images
        result = bench.bench_static(model, name, args.batch, tuple(batches[0].shape[1:]), args.threads,
                                    args.repeats, args.warmup)
    _print_bench(result, args.json)
    if args.save:
        _save_bench(args, model, config, result, batches)


def _save_bench(args: argparse.Namespace, model: Any, config: Any, result: Any, batches: list) -> None:
    """``--save``: the benchmark as ``RUN_DIR/results/bench-b<batch>-t<threads>[-budget<b>].json``."""
    from ponder.bench import DynamicBench
    from ponder.results import result_from_bench, save_result

    images = sum(len(b) for b in batches) if isinstance(result, DynamicBench) else result.batch
    saved = result_from_bench(args.checkpoint, config, model, result, images=images,
                              input_size=tuple(batches[0].shape[1:]), rounds=args.repeats, budget=args.budget)
    print(f"saved {save_result(args.checkpoint, saved)}", file=sys.stderr)


def _knob_value(text: str) -> Any:
    """A ``--knob`` value: a number, or a YAML list of numbers (early-exit thresholds)."""
    import yaml

    value = yaml.safe_load(text)
    ok = isinstance(value, (int, float)) or (isinstance(value, list) and all(isinstance(v, (int, float)) for v in value))
    if isinstance(value, bool) or not ok:
        raise argparse.ArgumentTypeError(f"expected a number or a list of numbers, got {text!r}")
    return value


def _print_bench(result: Any, as_json: bool) -> None:
    from ponder.bench import as_dict
    from ponder.cost import format_count

    d = as_dict(result)
    if as_json:
        print(json.dumps(d))
        return
    print(f"{d['model']}  batch {d['batch']}  threads {d['threads']}")
    if "ms" in d:
        lo, hi = d["ms_range"]
        print(f"  {d['ms']:.2f} ms/batch  {d['images_per_s']:.0f} images/s  {format_count(d['macs'])} MACs/image"
              f"  (single rounds: {lo:.2f}-{hi:.2f} ms)")
        return
    print(f"  mode         {d['mode']}")
    print(f"  dense        {d['dense_ms']:.2f} ms/batch  ({format_count(d['dense_macs'])} MACs/image)")
    if d["dense_kernels_ms"] is not None:
        print(f"  dense*       {d['dense_kernels_ms']:.2f} ms/batch  (the same dense network on the sparse "
              f"executor's kernels)")
    print(f"  dynamic      {d['dynamic_ms']:.2f} ms/batch  ({format_count(d['dynamic_macs'])} "
          f"± {format_count(d['dynamic_macs_std'])} MACs/image)")
    if d["masked_ms"] is not None:
        print(f"  masked       {d['masked_ms']:.2f} ms/batch  (dense compute x mask: never faster)")
    print(f"  speedup {d['speedup']:.2f}x  mac_ratio {d['mac_ratio']:.2f}x  efficiency {d['efficiency']:.2f}"
          + _rounds(d["speedup_range"], d["mac_ratio"]))
    if d["dense_kernels_ms"] is not None:
        print(f"  vs dense*: speedup {d['speedup_vs_kernels']:.2f}x  efficiency {d['efficiency_vs_kernels']:.2f}"
              + _rounds(d["speedup_vs_kernels_range"], d["mac_ratio"]))


def _rounds(extremes: tuple[float, float], mac_ratio: float) -> str:
    lo, hi = extremes
    return f"  (single rounds: speedup {lo:.2f}-{hi:.2f}x, efficiency {lo / mac_ratio:.2f}-{hi / mac_ratio:.2f})"


def cmd_report(args: argparse.Namespace) -> None:
    from ponder.report import report_command

    markdown, notices = report_command(args.paths, out=args.out, docs=args.update_doc, check=args.check,
                                       points=args.points, batch=args.batch, x_scale=args.x_scale)
    print(markdown, end="")
    for line in notices:
        print(line, file=sys.stderr)


def cmd_sweep(args: argparse.Namespace) -> None:
    from ponder.engine import sweep
    from ponder.report import report_command

    spec = sweep.read_sweep_file(args.spec)
    if spec is not None:
        if args.grid or args.set or args.protocol or args.option or args.vary != "all":
            raise CLIError(f"{args.spec} is a sweep file: its runs name their grids, overrides and evaluations; "
                              f"--grid, --vary, --set, --protocol and --option apply to a recipe")
        spec["root"] = args.out or spec["root"]
        spec["seeds"] = list(range(args.seeds)) if args.seeds else spec["seeds"]
        runs = sweep.plan_file(spec, args.only)
        report_paths, report_out = sweep.file_report(spec) if args.only is None else ([], None)
    else:
        if not args.out:
            raise CLIError("a recipe sweep needs --out DIR (its runs go to DIR/<point>/s<seed>)")
        options = dict(_parse_options(args.option))
        evals = [sweep.evaluation(p, options) for p in args.protocol or ["standard"]]
        runs = sweep.plan_grid(args.spec, args.grid, args.seeds or 1, args.out, args.vary, args.set, evals)
        report_paths, report_out = [args.out], args.out
    if args.dry_run:
        print(sweep.describe(runs), end="")
        return
    sweep.run_sweep(runs, data_dir=args.data_dir, log=lambda line: print(line, file=sys.stderr, flush=True))
    if report_paths:
        markdown, notices = report_command(report_paths, out=report_out)
        print(markdown, end="")
        for line in notices:
            print(line, file=sys.stderr)
    table = sweep.held_out_table(runs)
    if table:
        print(table)

def cmd_convert(args: argparse.Namespace) -> None:
    from ponder.official import convert_official

    loaded = convert_official(args.path, args.to, args.model, **dict(_parse_options(args.model_arg)))
    options = ", ".join(f"{k}={v}" for k, v in loaded.model_kwargs.items())
    print(f"{loaded.path} ({loaded.repository}) -> {args.to}: {loaded.model_name} ({options}), "
          f"data {loaded.dataset}")
    for note in loaded.notes:
        print(f"  note: {note}")


def cmd_ponder_map(args: argparse.Namespace) -> None:
    try:
        from ponder.pondermap import write_ponder_maps
    except ImportError:
        raise CLIError("ponder maps need the spatial models (ponder.pondermap), which this install lacks") from None
    for path in write_ponder_maps(args.run_dir, args.images, out_dir=args.out, saliency=args.saliency,
                                  sigma=args.sigma, gamma=args.gamma, knob=args.knob):
        print(path)


def cmd_demo(args: argparse.Namespace) -> None:
    from ponder.demo import run_demo

    out = args.out or ("runs/demo-cifar10" if args.data_dir else "runs/demo")  # one demo never overwrites the other
    run_demo(data_dir=args.data_dir, out_dir=out, epochs=args.epochs, quick=args.quick)


def cmd_kernels(args: argparse.Namespace) -> None:
    from ponder.fast import build, routes

    if args.action == "build":
        if build.build_all(force=args.force, jobs=args.jobs):
            raise CLIError("some kernel modules failed to build (see above); ponder still works on PyTorch ops")
        return
    if args.action == "clear-routes":
        routes.clear()
        print(f"forgot the stored routes ({routes.routes_file()})")
        return
    print("\n".join(build.status_lines(show_routes=args.routes)))


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="ponder", description="Dynamic inference networks: build, train, measure.")
    p.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    sub = p.add_subparsers(dest="command", required=True)
    p.commands = sub.choices  # type: ignore[attr-defined]  (name -> subparser: errors show its usage)

    s = sub.add_parser("models", help="list registered models (family, paper; --macs: params and MACs)")
    s.add_argument("pattern", nargs="?", help="shell-style filter, e.g. 'resnet*_cifar'")
    s.add_argument("--macs", action="store_true", help="build each model and add its params and MACs (slower)")
    s.add_argument("--markdown", action="store_true", help="a markdown table by family and paper (the README's)")
    s.add_argument("--json", action="store_true")
    s.set_defaults(fn=cmd_models)

    def model_args(s: argparse.ArgumentParser) -> None:
        s.add_argument("name", help="registered model name (see `ponder models`)")
        s.add_argument("--input-size", type=int, nargs=3, metavar=("C", "H", "W"))
        s.add_argument("--num-classes", type=int)
        s.add_argument("--model-arg", action="append", default=[], metavar="KEY=VALUE",
                       help="model constructor option, e.g. gate_type=ffgate2 or shortcut=B")

    s = sub.add_parser("flops", help="params and MACs of a model (dense totals, per exit, per block)")
    model_args(s)
    s.add_argument("--json", action="store_true", help="one JSON object: params, macs, exits, blocks")
    s.add_argument("--blocks", action="store_true", help="also list per-block MACs")
    s.set_defaults(fn=cmd_flops)

    s = sub.add_parser("train", help="train from a YAML recipe")
    s.add_argument("recipe", nargs="?", help="YAML recipe (optional with --resume: the run's own config is used)")
    s.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a recipe field")
    s.add_argument("--data-dir")
    s.add_argument("--out", help="run directory to create")
    s.add_argument("--resume", metavar="RUN_DIR", help="continue an interrupted run exactly")
    s.add_argument("--overwrite", action="store_true", help="replace a run already in --out (start it from scratch)")
    s.set_defaults(fn=cmd_train)

    s = sub.add_parser("eval", help="evaluate a run directory with a protocol")
    s.add_argument("run_dir")
    s.add_argument("--protocol", default="standard")
    s.add_argument("--data-dir")
    s.add_argument("--out", help="where to write results (default: RUN_DIR/eval)")
    s.add_argument("--option", action="append", default=[], metavar="KEY=VALUE", help="protocol option")
    s.add_argument("--json", action="store_true")
    s.set_defaults(fn=cmd_eval)

    s = sub.add_parser("bench", help="measured latency: static, or dense vs dynamic executors")
    s.add_argument("name", nargs="?", help="model name (omit with --checkpoint)")
    s.add_argument("--input-size", type=int, nargs=3, metavar=("C", "H", "W"))
    s.add_argument("--num-classes", type=int)
    s.add_argument("--model-arg", action="append", default=[], metavar="KEY=VALUE",
                   help="model constructor option, e.g. gate_type=ffgate2")
    s.add_argument("--batch", type=int, default=64)
    s.add_argument("--images", type=int, default=64, help="images per timed round (split into batches)")
    s.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    s.add_argument("--repeats", type=int, default=10)
    s.add_argument("--warmup", type=int, default=2)
    s.add_argument("--keep-rate", type=float, help="force hard decisions at this rate (untrained model)")
    s.add_argument("--checkpoint", metavar="RUN_DIR", help="a trained run: its own decisions on real test data")
    s.add_argument("--budget", type=float, metavar="MACS",
                   help="target mean MACs per image, fitted on the run's held-out split (with --checkpoint)")
    s.add_argument("--knob", type=_knob_value, metavar="VALUE",
                   help="the model's native knob (exit thresholds as a list, a keep or halting threshold)")
    s.add_argument("--data-dir")
    s.add_argument("--json", action="store_true")
    s.add_argument("--save", action="store_true",
                   help="with --checkpoint: also save the result as RUN_DIR/results/bench-*.json (see `ponder report`)")
    s.set_defaults(fn=cmd_bench)

    s = sub.add_parser("report", help="markdown tables and an HTML page (plots) from the results of runs")
    s.add_argument("paths", nargs="*", metavar="RUN_DIR",
                   help="run directories, folders of runs, result files or glob patterns")
    s.add_argument("--out", metavar="DIR", help="also write DIR/report.md, DIR/report.html and its plots (SVG)")
    s.add_argument("--points", action="store_true", help="also print every operating point (exit, threshold, budget)")
    s.add_argument("--batch", type=int, help="latency measured at this batch size (default: each run's latest bench)")
    s.add_argument("--x-scale", choices=("auto", "linear", "log"), default="auto",
                   help="x axes of the plots (auto: log when the values span more than 20x)")
    s.add_argument("--update-doc", action="append", default=[], metavar="DOC.md",
                   help="regenerate the tables between <!-- ponder-report:NAME start/end --> markers of DOC.md")
    s.add_argument("--check", action="store_true",
                   help="with --update-doc: change nothing, fail when a generated table differs from the results")
    s.set_defaults(fn=cmd_report)

    s = sub.add_parser("sweep", help="train a recipe over a grid of settings and seeds (or the runs of a sweep file), "
                                     "evaluate and report every run")
    s.add_argument("spec", metavar="RECIPE|SWEEP", help="a YAML recipe, or a sweep file (runs in order; docs/training.md)")
    s.add_argument("--grid", action="append", default=[], metavar="KEY=V1,V2,...",
                   help="one axis of the grid (repeat for more axes), e.g. method.kwargs.alpha=0.6,0.8")
    s.add_argument("--vary", choices=("all", "one"), default="all",
                   help="all: every combination of the axes; one: each axis on its own (the rest as the recipe)")
    s.add_argument("--seeds", type=int, help="train every point with seeds 0 .. N-1 (default 1; a sweep file: its own)")
    s.add_argument("--out", metavar="DIR", help="runs go to DIR/<point>/s<seed>, the report to DIR "
                                               "(a sweep file: instead of its root)")
    s.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a recipe field (every run)")
    s.add_argument("--protocol", action="append", metavar="P", help="evaluate each run with P (repeat; default standard); "
                   "budgeted with --option score=val ranks the points on the held-out split")
    s.add_argument("--option", action="append", default=[], metavar="KEY=VALUE", help="protocol option")
    s.add_argument("--only", metavar="PATTERN", help="a sweep file's runs whose names match (shell-style) only")
    s.add_argument("--data-dir")
    s.add_argument("--dry-run", action="store_true", help="print the runs the sweep would make, and stop")
    s.set_defaults(fn=cmd_sweep)

    s = sub.add_parser("convert", help="turn an official MSDNet / RANet / BlockDrop / SkipNet checkpoint into a run "
                                       "directory")
    s.add_argument("path", help="the checkpoint file (read with weights_only=True: no code runs)")
    s.add_argument("--to", required=True, metavar="RUN_DIR", help="run directory to write")
    s.add_argument("--model", help="ponder model name (default: read from the checkpoint)")
    s.add_argument("--model-arg", action="append", default=[], metavar="KEY=VALUE",
                   help="model constructor option over the ones read from the checkpoint")
    s.set_defaults(fn=cmd_convert)

    s = sub.add_parser("ponder-map", help="write ponder-cost heatmaps of a spatial model over images")
    s.add_argument("run_dir")
    s.add_argument("images", nargs="+")
    s.add_argument("--out", default="ponder_maps")
    s.add_argument("--saliency", action="store_true", help="also write the SACT saliency map")
    s.add_argument("--sigma", type=float, default=10.0)
    s.add_argument("--gamma", type=float, default=0.005)
    s.add_argument("--knob", type=_knob_value, metavar="VALUE",
                   help="the model's native knob first (a threshold; a multi-target budget, e.g. 0.3)")
    s.set_defaults(fn=cmd_ponder_map)

    s = sub.add_parser("demo", help="train and compare small models offline (about 3 minutes on 2 CPU cores)")
    s.add_argument("--data-dir", help="use CIFAR-10 from this folder instead of the built-in digits")
    s.add_argument("--out", help="where the demo's runs go (default: runs/demo, with --data-dir runs/demo-cifar10)")
    s.add_argument("--epochs", type=int)
    s.add_argument("--quick", action="store_true", help="a much shorter run (smoke test)")
    s.set_defaults(fn=cmd_demo)

    s = sub.add_parser("kernels", help="build the compiled kernels; show what is built and which routes are stored")
    s.add_argument("action", nargs="?", choices=["status", "build", "clear-routes"], default="status")
    s.add_argument("--force", action="store_true", help="build: rebuild modules that are already built")
    s.add_argument("--jobs", type=int, default=2, help="build: modules compiled at once (default 2)")
    s.add_argument("--routes", action="store_true", help="status: list every stored route")
    s.set_defaults(fn=cmd_kernels)
    return p


def _version() -> str:
    from ponder import __version__

    return __version__


def _user_errors() -> tuple[type[BaseException], ...]:
    from ponder.config import ConfigError
    from ponder.registry import UnknownModelError

    errors: list[type[BaseException]] = [CLIError, ConfigError, UnknownModelError, ValueError, FileNotFoundError,
                                         ImportError]
    try:
        from ponder.engine import NonFiniteLossError

        errors.append(NonFiniteLossError)
    except ImportError:  # pragma: no cover - engine always ships
        pass
    return tuple(errors)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args, unknown = parser.parse_known_args(argv)
    if unknown:  # the subcommand's usage, not the top-level one
        parser.commands[args.command].error(f"unrecognized arguments: {' '.join(unknown)}")
    if args.command == "bench" and not (args.name or args.checkpoint):
        parser.error("bench needs a model NAME or --checkpoint RUN_DIR")
    fn: Callable[[argparse.Namespace], None] = args.fn
    if args.command in ("train", "eval", "demo", "sweep"):
        from ponder.threads import use_free_cores

        use_free_cores()  # fewer threads when other processes keep cores busy (see ponder.threads)
    try:
        fn(args)
    except _user_errors() as e:
        msg = str(e).strip().strip("'\"")
        print(f"ponder {args.command}: error: {msg}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # output piped into `head` and the like
        sys.stderr.close()
        return 0
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
