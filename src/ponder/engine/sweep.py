"""Recipe sweeps: train every point of a grid of recipe overrides, for several seeds, and evaluate each run.

``ponder sweep RECIPE --grid KEY=V1,V2,... [--grid ...] [--vary all|one] --seeds N --out DIR`` (what
:func:`run_sweep` does): the grid's points are the cartesian product of the axes (``--vary one``: each
axis on its own, the rest at the recipe's values); each point trains once per seed
(``train.seed`` = 0 .. N-1) into ``DIR/<point>/s<seed>``, where ``<point>`` names the axes' values
(``alpha0.6_beta0.1``); every run is then evaluated with the given protocols (``RUN/results/<protocol>.json``),
and the command ends with ``ponder report DIR --out DIR`` (the points as groups, mean +- std over seeds).

A sweep can be run again: finished runs and existing evaluations are kept, an interrupted run resumes
from its last finished epoch, a run without one starts over.
"""

from __future__ import annotations

import itertools
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import yaml

from ponder.config import ConfigError, load_config
from ponder.results.schema import RESULTS_DIR, result_kind


@dataclass(frozen=True)
class SweepRun:
    """One run of a sweep: its grid point's name and overrides, its seed and its directory."""

    point: str
    overrides: tuple[str, ...]
    seed: int
    run_dir: Path


def parse_axis(item: str) -> tuple[str, list[str]]:
    """``"method.kwargs.alpha=0.6,0.8"`` -> ``("method.kwargs.alpha", ["0.6", "0.8"])`` (values as written)."""
    if "=" not in item:
        raise ConfigError(f"grid axis {item!r} must look like key.sub=value1,value2,...")
    key, raw = item.split("=", 1)
    values = [v.strip() for v in raw.split(",")]
    if not key or not all(values):
        raise ConfigError(f"grid axis {item!r} needs a key and one or more comma-separated values")
    if len(set(values)) != len(values):
        raise ConfigError(f"grid axis {key} repeats a value: {raw}")
    return key, values


def point_name(assignment: Sequence[tuple[str, str]]) -> str:
    """A directory name for one grid point: each axis' last key part and value (``alpha0.6_gamma1e-05``)."""
    if not assignment:
        return "default"
    parts = [f"{key.rsplit('.', 1)[-1]}{value}" for key, value in assignment]
    return "_".join(re.sub(r"[^A-Za-z0-9.+-]", "-", p) for p in parts)


def plan_sweep(grid: Sequence[str], seeds: int, out: str | Path, vary: str = "all") -> list[SweepRun]:
    """Every run of the sweep, point by point, seed by seed (``grid``: ``KEY=V1,V2`` axes).

    ``vary="all"``: the cartesian product of the axes; ``"one"``: each axis on its own, the other fields
    at the recipe's values (a sensitivity study: 4 + 4 + 4 points for three axes of four values).
    """
    if vary not in ("all", "one"):
        raise ConfigError(f"vary must be 'all' (every combination) or 'one' (one axis at a time), got {vary!r}")
    if seeds < 1:
        raise ConfigError(f"a sweep needs --seeds 1 or more, got {seeds}")
    axes = [parse_axis(a) for a in grid]
    keys = [k for k, _ in axes]
    if len(set(keys)) != len(keys):
        raise ConfigError(f"a grid axis is given twice: {', '.join(sorted({k for k in keys if keys.count(k) > 1}))}")
    if "train.seed" in keys:
        raise ConfigError("train.seed is the sweep's own axis; use --seeds N instead of a grid over it")
    if vary == "all":
        assignments = [list(zip(keys, values)) for values in itertools.product(*(v for _, v in axes))]
    else:
        assignments = [[(key, value)] for key, values in axes for value in values]
    runs = []
    for assignment in assignments:
        name = point_name(assignment)
        for seed in range(seeds):
            overrides = tuple(f"{k}={v}" for k, v in assignment) + (f"train.seed={seed}",)
            runs.append(SweepRun(name, overrides, seed, Path(out) / name / f"s{seed}"))
    names = [r.point for r in runs]
    if len(set(names)) * seeds != len(names):
        raise ConfigError("two grid points get the same directory name; give the axes values that differ in "
                          "letters or digits")
    return runs


def _finished(run_dir: Path, epochs: int) -> bool:
    from ponder.engine.checkpoint import STATE_FILE, load_state

    path = run_dir / STATE_FILE
    return path.is_file() and int(load_state(path).get("epoch", 0)) >= epochs


def run_sweep(recipe: str | Path, grid: Sequence[str], seeds: int, out: str | Path, overrides: Sequence[str] = (),
              protocols: Sequence[str] = ("standard",), options: dict[str, Any] | None = None,
              data_dir: str | None = None, vary: str = "all", log: Callable[[str], None] = print) -> list[SweepRun]:
    """Train and evaluate every run of the sweep (module docstring); returns the runs.

    ``overrides`` (``KEY=VALUE``) apply to every run before the grid's; ``options`` go to every protocol.
    Every run's config is built and checked before anything trains.
    """
    from ponder.engine import train
    from ponder.engine.checkpoint import STATE_FILE

    runs = plan_sweep(grid, seeds, out, vary)
    configs = [load_config(recipe, list(overrides) + list(r.overrides)) for r in runs]
    from ponder.engine import evaluate_run

    for i, (run, config) in enumerate(zip(runs, configs), 1):
        where = f"[{i}/{len(runs)}] {run.run_dir}"
        if _finished(run.run_dir, config.train.epochs):
            log(f"{where}: trained")
        else:
            resume = (run.run_dir / STATE_FILE).is_file()
            log(f"{where}: {'resuming' if resume else 'training'} ({', '.join(run.overrides)})")
            train(None if resume else config, None if resume else run.run_dir, resume=run.run_dir if resume else None,
                  data_dir=data_dir, overwrite=not resume)
        for protocol in protocols:
            if not (run.run_dir / RESULTS_DIR / f"{result_kind(protocol, options or {})}.json").is_file():
                log(f"{where}: evaluating ({protocol})")
                evaluate_run(run.run_dir, protocol=protocol, data_dir=data_dir, options=dict(options or {}))
    return runs


def describe(runs: Sequence[SweepRun]) -> str:
    """The plan as YAML text (``--dry-run``): each point's overrides and run directories."""
    points: dict[str, Any] = {}
    for r in runs:
        entry = points.setdefault(r.point, {"overrides": list(r.overrides[:-1]), "runs": []})
        entry["runs"].append(str(r.run_dir))
    return yaml.safe_dump(points, sort_keys=False)
