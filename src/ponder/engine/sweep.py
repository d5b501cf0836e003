"""Sweeps: many training runs from one command, each evaluated, then one report (``ponder sweep``).

Two forms, one runner (:func:`run_sweep`):

* ``ponder sweep RECIPE --grid KEY=V1,V2,... [--grid ...] [--vary all|one] --seeds N --out DIR`` (:func:`plan_grid`):
  the grid's points are the cartesian product of the axes (``--vary one``: each axis on its own, the
  rest at the recipe's values, a sensitivity study); each point trains once per seed (``train.seed`` =
  0 .. N-1) into ``DIR/<point>/s<seed>``, where ``<point>`` names the axes' values (``alpha0.6_beta0.1``),
  and is evaluated with every ``--protocol``.
* ``ponder sweep SWEEP.yaml`` (:func:`plan_file`): a sweep file lists runs in order; each is trained for
  every seed after the runs before it, so a run may start from, distil from or read the targets of an
  earlier one of the same seed::

      root: runs/dynconv_sweeps              # run directories: {root}/<name>/s<seed>
      seeds: [0, 1, 2]
      runs:
        - name: dense20
          recipe: recipes/cifar10/resnet20_b_cpu_subset.yaml
          eval: [{protocol: standard}]
        - name: dynconv20-b{model.kwargs.budget}
          recipe: recipes/cifar10/dynconv_resnet20_cpu_subset.yaml
          grid: {model.kwargs.budget: [0.3, 0.5, 0.7]}     # one run per value (several keys: every combination)
          set: {train.init_from: "{root}/dense20/s{seed}"}
          eval: [{protocol: spatial}]
      report: {runs: [dense20, "dynconv20-*"], out: "{root}/report"}

  ``{root}``, ``{seed}`` and ``{<grid key>}`` are replaced in names and in ``set`` values (strings, and
  strings in lists). Recipe paths are read from the current folder (the repository root).

A sweep can be run again: every run's config is built and checked before anything trains; finished
runs and existing evaluations are kept, an interrupted run resumes from its last finished epoch.

Choosing a training setting on the held-out split (L2W's ``q``): evaluate with ``--protocol budgeted
--option score=val`` (thresholds fitted and scored on the held-out split, the test set never read) and
:func:`held_out_table` ranks the points by their mean held-out accuracy over the common MACs range.
"""

from __future__ import annotations

import fnmatch
import itertools
import re
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import yaml

from ponder.config import ConfigError, load_config
from ponder.results.schema import RESULTS_DIR, load_results, result_kind

Evaluation = tuple[str, tuple[tuple[str, Any], ...]]  # (protocol, options as sorted pairs)
_FIELD = re.compile(r"\{([A-Za-z0-9_.]+)\}")


@dataclass(frozen=True)
class SweepRun:
    """One run of a sweep: its point's name, recipe and overrides, its seed, directory and evaluations."""

    point: str
    recipe: str
    overrides: tuple[str, ...]
    seed: int
    run_dir: Path
    evals: tuple[Evaluation, ...] = ()


def evaluation(protocol: str, options: dict[str, Any] | None = None) -> Evaluation:
    """One evaluation of a run: ``protocol`` with ``options``."""
    return protocol, tuple(sorted((options or {}).items()))


# the recipe form ------------------------------------------------------------------------------------
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


def plan_grid(recipe: str | Path, grid: Sequence[str], seeds: int, out: str | Path, vary: str = "all",
              sets: Sequence[str] = (), evals: Sequence[Evaluation] = ()) -> list[SweepRun]:
    """Every run of a recipe sweep, point by point, seed by seed (``grid``: ``KEY=V1,V2`` axes; ``sets``:
    ``KEY=VALUE`` overrides of every run, applied before the grid's).

    ``vary="all"``: the cartesian product of the axes; ``"one"``: each axis on its own, the other fields
    at the recipe's values (4 + 4 + 4 points for three axes of four values).
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
            overrides = (*sets, *(f"{k}={v}" for k, v in assignment), f"train.seed={seed}")
            runs.append(SweepRun(name, str(recipe), overrides, seed, Path(out) / name / f"s{seed}", tuple(evals)))
    names = [r.point for r in runs]
    if len(set(names)) * seeds != len(names):
        raise ConfigError("two grid points get the same directory name; give the axes values that differ in "
                          "letters or digits")
    return runs


# the sweep-file form ----------------------------------------------------------------------------------
def _sweep_mapping(path: str | Path) -> dict[str, Any] | None:
    """``path``'s YAML when it is a sweep file (a mapping with ``runs`` and no ``model``), else ``None`` (a recipe,
    or a file that cannot be read: the recipe loader names why)."""
    try:
        spec = yaml.safe_load(Path(path).read_text())
    except (OSError, yaml.YAMLError):
        return None
    return spec if isinstance(spec, dict) and "runs" in spec and "model" not in spec else None


def read_sweep_file(path: str | Path) -> dict[str, Any] | None:
    """The sweep file at ``path`` read once and checked (:func:`load_sweep_file`), or ``None`` when ``path`` is
    not a sweep file (a recipe: a mapping without ``runs``, or with ``model``) or cannot be read."""
    spec = _sweep_mapping(path)
    return None if spec is None else _checked(spec, path)


def fill(value: Any, fields: dict[str, Any]) -> Any:
    """``value`` with ``{key}`` replaced by ``fields[key]`` in strings (and strings inside lists)."""
    if isinstance(value, list):
        return [fill(v, fields) for v in value]
    if not isinstance(value, str):
        return value

    def sub(m: re.Match) -> str:
        if m.group(1) not in fields:
            raise ConfigError(f"{{{m.group(1)}}} in {value!r} is not root, seed or a grid key ({', '.join(fields)})")
        return str(fields[m.group(1)])

    return _FIELD.sub(sub, value)


def load_sweep_file(path: str | Path) -> dict[str, Any]:
    """A sweep file, checked: ``root``, ``seeds`` and ``runs`` (each with a ``name`` and an existing ``recipe``)."""
    try:
        spec = yaml.safe_load(Path(path).read_text())
    except (OSError, yaml.YAMLError) as e:
        raise ConfigError(f"sweep file {path} cannot be read ({str(e).splitlines()[0]})") from None
    return _checked(spec, path)


def _checked(spec: Any, path: str | Path) -> dict[str, Any]:
    """A sweep file's YAML ``spec`` after checking it, with the defaults of ``root`` and ``seeds``."""
    if not isinstance(spec, dict) or not isinstance(spec.get("runs"), list) or not spec["runs"]:
        raise ConfigError(f"sweep file {path} needs a list of runs (each with name and recipe)")
    for run in spec["runs"]:
        if not isinstance(run, dict) or "name" not in run or "recipe" not in run:
            raise ConfigError(f"every run of {path} needs a name and a recipe, got {run!r}")
        if not Path(run["recipe"]).is_file():
            raise ConfigError(f"recipe {run['recipe']} of run {run['name']!r} does not exist; run the sweep from "
                              f"the repository root")
    spec.setdefault("root", "runs/sweeps")
    spec.setdefault("seeds", [0])
    return spec


def plan_file(spec: dict[str, Any], only: str | None = None) -> list[SweepRun]:
    """Every run of a sweep file, seed by seed, runs in order, grid points in order (only the names
    matching the shell pattern ``only``, when given)."""
    runs = []
    for seed in spec["seeds"]:
        for entry in spec["runs"]:
            grid = entry.get("grid") or {}
            for values in itertools.product(*grid.values()) if grid else [()]:
                fields = {"root": spec["root"], "seed": seed, **dict(zip(grid, values))}
                name = fill(entry["name"], fields)
                if only is not None and not fnmatch.fnmatch(name, only):
                    continue
                overrides = [f"{k}={_yaml(fields[k])}" for k in grid]
                overrides += [f"{k}={_yaml(fill(v, fields))}" for k, v in (entry.get("set") or {}).items()]
                evals = tuple(evaluation(e["protocol"], e.get("options")) for e in entry.get("eval") or [])
                runs.append(SweepRun(name, entry["recipe"], (*overrides, f"train.seed={seed}"), int(seed),
                                     Path(spec["root"]) / name / f"s{seed}", evals))
    return runs


def file_report(spec: dict[str, Any]) -> tuple[list[str], str | None]:
    """The sweep file's ``report`` entry: ``(run folders, out folder)``; no folders when it has none."""
    rep = spec.get("report")
    if not rep:
        return [], None
    names = {r.point for r in plan_file(spec)}
    chosen = sorted(str(Path(spec["root"]) / n) for n in names if any(fnmatch.fnmatch(n, p) for p in rep.get("runs", ["*"])))
    return chosen, fill(rep["out"], {"root": spec["root"]}) if rep.get("out") else None


def _yaml(value: Any) -> str:
    """A value as an override parses it (YAML): flow style for lists."""
    return yaml.safe_dump(value, default_flow_style=True, width=1 << 20).strip().removesuffix("...").strip()


# running ----------------------------------------------------------------------------------------------
def finished(run_dir: Path, epochs: int) -> bool:
    """Whether ``run_dir`` holds a run trained for ``epochs`` epochs (its training state says so: the metrics file
    is written before the state, so it may count an epoch whose state a kill lost)."""
    from ponder.engine.checkpoint import STATE_FILE, saved_epoch

    path = run_dir / STATE_FILE
    return path.is_file() and saved_epoch(path) >= epochs


def run_sweep(runs: Sequence[SweepRun], data_dir: str | None = None,
              log: Callable[[str], None] = print) -> None:
    """Train and evaluate every run not done yet, in order (module docstring). Every run's config is
    built and checked before anything trains."""
    from ponder.engine import evaluate_run, train
    from ponder.engine.checkpoint import STATE_FILE

    configs = [load_config(r.recipe, list(r.overrides)) for r in runs]
    for i, (run, config) in enumerate(zip(runs, configs), 1):
        where = f"[{i}/{len(runs)}] {run.run_dir}"
        if finished(run.run_dir, config.train.epochs):
            log(f"{where}: trained")
        else:
            resume = (run.run_dir / STATE_FILE).is_file()
            log(f"{where}: {'resuming' if resume else 'training'} ({', '.join(run.overrides)})")
            train(None if resume else config, None if resume else run.run_dir, resume=run.run_dir if resume else None,
                  data_dir=data_dir, overwrite=not resume)
        for protocol, options in run.evals:
            if not (run.run_dir / RESULTS_DIR / f"{result_kind(protocol, dict(options))}.json").is_file():
                log(f"{where}: evaluating ({protocol})")
                evaluate_run(run.run_dir, protocol=protocol, data_dir=data_dir, options=dict(options))


def describe(runs: Sequence[SweepRun]) -> str:
    """The plan as YAML text (``--dry-run``): each point's recipe, overrides, evaluations and run directories."""
    points: dict[str, Any] = {}
    for r in runs:
        entry = points.setdefault(r.point, {"recipe": r.recipe, "overrides": list(r.overrides[:-1]),
                                            "eval": [p if not o else f"{p} {dict(o)}" for p, o in r.evals],
                                            "runs": []})
        entry["runs"].append(str(r.run_dir))
    return yaml.safe_dump(points, sort_keys=False)


# choosing a setting on the held-out split --------------------------------------------------------------
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


def _best_at(curve: Sequence[tuple[float, float]], budget: float) -> float:
    """The best accuracy of ``curve`` at a mean cost at or below ``budget``."""
    return max(a for m, a in curve if m <= budget)


def held_out_curves(runs: Sequence[SweepRun]) -> dict[str, list[list[tuple[float, float]]]]:
    """Per point, each run's held-out budgeted curve (``(MACs, top-1 %)`` points) from its
    ``budgeted-scoreval`` result; points without one are left out."""
    kind = result_kind("budgeted", {"score": "val"})
    curves: dict[str, list[list[tuple[float, float]]]] = {}
    for run in runs:
        for result in load_results(run.run_dir):
            if result.kind == kind:
                curve = [(p.macs_mean, 100 * p.accuracy) for p in result.points if p.knob == "q"]
                curves.setdefault(run.point, []).append(curve)
    return curves


def held_out_table(runs: Sequence[SweepRun]) -> str | None:
    """The points ranked on the held-out split: each one's mean held-out top-1 over the MACs range every
    curve covers (mean ± std over seeds), its top-1 at a quarter, half and three quarters of that range,
    and the best point; ``None`` when no run was evaluated with ``budgeted`` and ``score=val``."""
    per_point = held_out_curves(runs)
    if not per_point:
        return None
    curves = [c for cs in per_point.values() for c in cs]
    low = max(min(m for m, _ in c) for c in curves)
    high = min(max(m for m, _ in c) for c in curves)
    marks = [low + f * (high - low) for f in (0.25, 0.5, 0.75)]
    labels = [f"top-1 at {m / 1e6:.2f}M" for m in marks]
    width = max(len(p) for p in per_point)
    header = f"  {'point':<{width}s}  runs  mean top-1 over {low / 1e6:.2f}M-{high / 1e6:.2f}M MACs"
    lines = ["held-out budgeted curves (thresholds fitted and scored on the held-out split; no test image read)",
             header + "".join(f"  {label}" for label in labels)]
    scores = {}
    for point, cs in per_point.items():
        per_run = [envelope_mean(c, low, high) for c in cs]
        scores[point] = statistics.fmean(per_run)
        spread = f" ± {statistics.stdev(per_run):.2f}" if len(per_run) > 1 else ""
        at = [statistics.fmean(_best_at(c, m) for c in cs) for m in marks]
        cell = f"{scores[point]:.2f}{spread}"
        lines.append(f"  {point:<{width}s}  {len(cs):4d}  {cell:>{len(header) - width - 10}s}"
                     + "".join(f"  {a:>{len(label)}.2f}" for a, label in zip(at, labels)))
    lines.append(f"best on the held-out split: {max(scores, key=scores.__getitem__)}")
    return "\n".join(lines)
