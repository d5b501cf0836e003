"""Early-exit evidence from trained runs: anytime table and budgeted curves vs static ResNets.

Usage: python benchmarks/early_exit_report.py --multi runs/msdnet_cpu runs/ranet_c1_cpu \
           --static runs/resnet20_run runs/resnet32_run --out docs/img/early_exit_cpu_subset.png

Reads ``anytime.json`` / ``budgeted.json`` (written by ``ponder eval RUN --protocol anytime|budgeted``)
and, for static runs, the last line of ``metrics.jsonl``; prints markdown tables and draws one plot.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from ponder.plot import accuracy_vs_macs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--multi", nargs="+", default=[], help="multi-exit run dirs (anytime.json + budgeted.json)")
    ap.add_argument("--static", nargs="+", default=[], help="static run dirs (metrics.jsonl)")
    ap.add_argument("--out", default="early_exit.png")
    args = ap.parse_args()

    series: dict[str, list[tuple[float, float]]] = {}
    for run in map(Path, args.multi):
        name = _model_name(run)
        anytime = json.loads((run / "anytime.json").read_text())
        print(f"\n{name} anytime (test set)\n\n| exit | cumulative MACs | cumulative params | top-1 % |\n|---|---|---|---|")
        for e in anytime["exits"]:
            print(f"| {e['exit']} | {e['macs'] / 1e6:.2f}M | {e['params']:,} | {e['top1']:.1f} |")
        budgeted = json.loads((run / "budgeted.json").read_text())
        series[f"{name} (budgeted)"] = [(p["expected_macs"], p["accuracy"]) for p in budgeted["points"]]
    print("\n| static model | MACs | test top-1 % |\n|---|---|---|")
    for run in map(Path, args.static):
        last = json.loads((run / "metrics.jsonl").read_text().strip().splitlines()[-1])
        name = _model_name(run)
        print(f"| {name} | {last['test_macs'] / 1e6:.2f}M | {100 * last['test_acc']:.1f} |")
        series[name] = [(last["test_macs"], 100 * last["test_acc"])]
    print(f"\nplot: {accuracy_vs_macs(series, args.out, title='CIFAR-10 subset, 3 epochs')}")


def _model_name(run: Path) -> str:
    for line in (run / "config.yaml").read_text().splitlines():
        if line.strip().startswith("name:"):
            return line.split(":", 1)[1].strip()
    return run.name


if __name__ == "__main__":
    main()
