"""``ponder sweep``: train one recipe at several values of one setting and compare the held-out
budgeted curves, so that a training setting (L2W's ``q``, ...) is chosen on the held-out split and
never on the test set.

Each value (and seed) is one run directory, ``OUT/<name>=<value>[_s<seed>]``: trained (resumed when
interrupted, skipped when finished), then evaluated with the ``budgeted`` protocol with
``score=val``: thresholds fitted on the held-out split and the curve scored there, the test set
never read. The result is saved as data (``RUN/results/budgeted-scoreval.json``), so
``ponder report OUT`` shows the curves. A value's score is its mean held-out top-1 over the MACs
range that every value's curve covers (the best accuracy at or below each budget, averaged).
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from ponder.config import ConfigError, load_config

PROTOCOL, OPTIONS = "budgeted", {"score": "val"}


@dataclass
class SweepRow:
    """One value of the swept setting: its runs and their held-out curves (``(macs, top-1 %)`` points)."""

    value: Any
    runs: list[Path]
    curves: list[list[tuple[float, float]]]


def envelope_mean(curve: Sequence[tuple[float, float]], low: float, high: float) -> float:
    """Mean over budgets in ``[low, high]`` of the best accuracy at a mean cost at or below the budget.

    ``curve``: ``(macs, accuracy)`` points in any order; ``low`` must not be below the cheapest point.
    """
    points = sorted(curve)
    if high <= low:
        return max(a for m, a in points if m <= high)
    total, best = 0.0, float("-inf")
    for i, (m, a) in enumerate(points):
        best = max(best, a)
        start = max(m, low)
        end = min(points[i + 1][0] if i + 1 < len(points) else high, high)
        if end > start:
            total += best * (end - start)
    return total / (high - low)


def _run_dir(out: Path, key: str, value: Any, seed: int | None) -> Path:
    return out / (f"{key.split('.')[-1]}={value}" + ("" if seed is None else f"_s{seed}"))


def _finished(run_dir: Path, epochs: int) -> bool:
    from ponder.engine.checkpoint import read_metrics

    return (run_dir / "state.pt").is_file() and len(read_metrics(run_dir)) >= epochs


def sweep(recipe: str | Path, key: str, values: Sequence[Any], out: str | Path, sets: Sequence[str] = (),
          seeds: Sequence[int] | None = None, data_dir: str | None = None, verbose: bool = True) -> list[SweepRow]:
    """Train ``recipe`` (with overrides ``sets``) at every value of the dotted ``key`` (and every seed)
    under ``out``, evaluate each run's held-out budgeted curve, and return one row per value."""
    from ponder.engine import evaluate_run, train

    if not values:
        raise ConfigError("give at least one value to sweep (--values)")
    out = Path(out)
    rows = []
    for value in values:
        row = SweepRow(value, [], [])
        for seed in seeds or [None]:
            overrides = [*sets, f"{key}={value}"] + ([] if seed is None else [f"train.seed={seed}"])
            config = load_config(recipe, overrides)
            run_dir = _run_dir(out, key, value, seed)
            if not _finished(run_dir, config.train.epochs):
                resume = run_dir if (run_dir / "state.pt").is_file() else None
                if verbose:
                    print(f"{'resuming' if resume else 'training'} {run_dir}", flush=True)
                train(config, None if resume else run_dir, resume=resume, data_dir=data_dir, verbose=verbose,
                      overwrite=resume is None)
            report = evaluate_run(run_dir, protocol=PROTOCOL, data_dir=data_dir, options=dict(OPTIONS))
            row.runs.append(run_dir)
            row.curves.append([(p["expected_macs"], p["accuracy"]) for p in report["points"]])
        rows.append(row)
    return rows


def sweep_table(rows: Sequence[SweepRow], key: str) -> str:
    """The rows as text: each value's mean held-out top-1 over the common MACs range (mean ± std over
    seeds), its held-out top-1 at a quarter, half and three quarters of that range, and the best value."""
    curves = [c for r in rows for c in r.curves]
    low = max(min(m for m, _ in c) for c in curves)
    high = min(max(m for m, _ in c) for c in curves)
    marks = [low + f * (high - low) for f in (0.25, 0.5, 0.75)]
    name = key.split(".")[-1]
    labels = [f"top-1 at {m / 1e6:.2f}M" for m in marks]
    header = f"  {name:>8s}  runs  mean top-1 over {low / 1e6:.2f}M-{high / 1e6:.2f}M MACs"
    width = len(header) - 18
    lines = ["held-out budgeted curves (thresholds fitted and scored on the held-out split; no test image read)",
             header + "".join(f"  {label}" for label in labels)]
    scores = []
    for r in rows:
        per_run = [envelope_mean(c, low, high) for c in r.curves]
        mean = statistics.fmean(per_run)
        spread = f" ± {statistics.stdev(per_run):.2f}" if len(per_run) > 1 else ""
        at = [statistics.fmean(_best_at(c, m) for c in r.curves) for m in marks]
        lines.append(f"  {str(r.value):>8s}  {len(r.runs):4d}  {mean + 0:>{width}.2f}{spread}".ljust(len(header))
                     + "".join(f"  {a:>{len(label)}.2f}" for a, label in zip(at, labels)))
        scores.append(mean)
    best = rows[max(range(len(rows)), key=scores.__getitem__)]
    lines.append(f"best on the held-out split: {key} = {best.value}")
    return "\n".join(lines)


def _best_at(curve: Sequence[tuple[float, float]], budget: float) -> float:
    """The best accuracy of ``curve`` at a mean cost at or below ``budget``."""
    return max(a for m, a in curve if m <= budget)
