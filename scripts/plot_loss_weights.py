"""The multi-target method's loss weights ``w`` per budget over training (the seed paper's Figure 2b).

Reads each run's ``metrics.jsonl`` (one line per epoch, with ``loss_weights`` as used in that epoch and the
held-out ``budget_acc`` they were computed from), prints a Markdown table of the mean over runs (seeds) per
epoch and budget, with the lowest and highest run in brackets, and, with matplotlib, writes a line plot.

    python scripts/plot_loss_weights.py results/dynconv/multi20/seed* --png docs/img/dynconv_loss_weights.png
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import yaml


def read_weights(run: Path) -> tuple[list[float], list[list[float]], list[list[float] | None]]:
    """``(budgets, loss weights [epoch][budget], held-out accuracies [epoch][budget] or None)`` of one run."""
    config = yaml.safe_load((run / "config.yaml").read_text())
    budgets = [float(b) for b in config["model"]["kwargs"].get("budgets", [0.3, 0.5, 0.7])]
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    epochs = [line for line in lines if "loss_weights" in line]
    if not epochs:
        raise ValueError(f"{run}/metrics.jsonl has no loss_weights: is it a multi_target run?")
    return budgets, [e["loss_weights"] for e in epochs], [e.get("budget_acc") for e in epochs]


def summary(runs: list[Path]) -> tuple[list[float], list[list[tuple[float, float, float]]]]:
    """``(budgets, [epoch][budget] -> (mean, min, max) over runs)``."""
    read = [read_weights(r) for r in runs]
    budgets = read[0][0]
    epochs = min(len(w) for _, w, _ in read)
    table = [[(statistics.fmean(w[e][b] for _, w, _ in read), min(w[e][b] for _, w, _ in read),
               max(w[e][b] for _, w, _ in read)) for b in range(len(budgets))] for e in range(epochs)]
    return budgets, table


def markdown(budgets: list[float], table: list[list[tuple[float, float, float]]], n_runs: int) -> str:
    """The table as Markdown: one row per epoch, one column per budget."""
    head = "| epoch | " + " | ".join(f"w ({b:.0%})" for b in budgets) + " |"
    rows = [head, "|---" * (len(budgets) + 1) + "|"]
    for e, row in enumerate(table):
        cells = [f"{m:.2f} ({lo:.2f}-{hi:.2f})" if n_runs > 1 else f"{m:.2f}" for m, lo, hi in row]
        rows.append(f"| {e + 1} | " + " | ".join(cells) + " |")
    return "\n".join(rows)


def plot(budgets: list[float], table: list[list[tuple[float, float, float]]], path: Path) -> None:
    """Mean weight per budget over epochs, the runs' range shaded."""
    from ponder.plot import pyplot, save_figure

    plt = pyplot()
    fig, ax = plt.subplots(figsize=(4.5, 3.2))
    epochs = list(range(1, len(table) + 1))
    for b, budget in enumerate(budgets):
        mean = [row[b][0] for row in table]
        ax.plot(epochs, mean, marker="o", label=f"budget {budget:.0%}")
        ax.fill_between(epochs, [row[b][1] for row in table], [row[b][2] for row in table], alpha=0.2)
    ax.set_xlabel("epoch")
    ax.set_ylabel("loss weight w")
    ax.set_xticks(epochs)
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    save_figure(fig, path)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("runs", nargs="+", type=Path, help="multi_target run folders (or copies of their metrics.jsonl "
                                                      "and config.yaml)")
    p.add_argument("--png", type=Path, help="write the plot here (needs matplotlib)")
    args = p.parse_args()
    budgets, table = summary(args.runs)
    print(markdown(budgets, table, len(args.runs)))
    if args.png:
        plot(budgets, table, args.png)
        print(f"wrote {args.png}")


if __name__ == "__main__":
    main()
