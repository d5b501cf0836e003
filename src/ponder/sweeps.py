"""Recipe sweeps: grids of ``ponder train`` runs over seeds, their evaluations and one report (a minimal runner).

A sweep file (YAML) lists runs in order; each is trained for every seed, after the runs before it (so a run may
start from, distil from or read the targets of an earlier one of the same seed)::

    root: runs/dynconv_sweeps              # run directories: {root}/<name>/seed<seed>
    seeds: [0, 1, 2]
    runs:
      - name: dense20
        recipe: recipes/cifar10/resnet20_b_cpu_subset.yaml
        eval: [{protocol: standard}]
      - name: dynconv20-b{model.kwargs.budget}
        recipe: recipes/cifar10/dynconv_resnet20_cpu_subset.yaml
        grid: {model.kwargs.budget: [0.3, 0.5, 0.7]}     # one run per value (several keys: every combination)
        set: {train.init_from: "{root}/dense20/seed{seed}"}
        eval: [{protocol: spatial}]
    report: {runs: [dense20, "dynconv20-*"], out: "{root}/report"}

``{root}``, ``{seed}`` and ``{<grid key>}`` are replaced in names and in ``set`` values (strings, and strings
in lists). Finished runs and evaluations are skipped (a run whose ``state.pt`` holds every epoch; a result
file under ``RUN/results/``), interrupted ones resumed, so a sweep is one command that can be run again. Run
it from the repository root::

    python -m ponder.sweeps recipes/cifar10/sweeps/dynconv_awareness.yaml --data-dir /path/to/data
    python -m ponder.sweeps SWEEP.yaml --dry-run          # print the commands only
    python -m ponder.sweeps SWEEP.yaml --only 'multi*'    # the runs whose names match (their inputs must exist)

``ponder report`` then groups each run's seeds (mean and spread); the sweep's ``report`` entry runs it on
the named runs (glob patterns of names) when the sweep is done.
"""

from __future__ import annotations

import argparse
import fnmatch
import itertools
import re
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import yaml

_FIELD = re.compile(r"\{([A-Za-z0-9_.]+)\}")


class SweepError(ValueError):
    """A sweep file that cannot be run as written."""


@dataclass
class Job:
    """One run of a sweep for one seed: where it goes and the commands that make and evaluate it."""

    name: str
    seed: int
    run_dir: Path
    recipe: str
    overrides: list[str]
    evals: list[dict[str, Any]] = field(default_factory=list)

    def train_command(self, data_dir: str | None = None) -> list[str]:
        """``ponder train`` for this job (``--resume`` when an interrupted state exists)."""
        if (self.run_dir / "state.pt").is_file():
            cmd = ["train", "--resume", str(self.run_dir)]
        else:
            cmd = ["train", self.recipe, "--out", str(self.run_dir), "--overwrite",
                   *[a for o in self.overrides for a in ("--set", o)]]
        return cmd + (["--data-dir", data_dir] if data_dir else [])

    def eval_commands(self, data_dir: str | None = None) -> list[tuple[str, list[str]]]:
        """``(result kind, ponder eval command)`` per evaluation."""
        from ponder.results.schema import result_kind

        out = []
        for e in self.evals:
            options = dict(e.get("options") or {})
            cmd = ["eval", str(self.run_dir), "--protocol", e["protocol"],
                   *[a for k, v in options.items() for a in ("--option", f"{k}={v}")]]
            out.append((result_kind(e["protocol"], options), cmd + (["--data-dir", data_dir] if data_dir else [])))
        return out


def fill(value: Any, fields: dict[str, Any]) -> Any:
    """``value`` with ``{key}`` replaced by ``fields[key]`` in strings (and strings inside lists)."""
    if isinstance(value, list):
        return [fill(v, fields) for v in value]
    if not isinstance(value, str):
        return value

    def sub(m: re.Match) -> str:
        if m.group(1) not in fields:
            raise SweepError(f"{{{m.group(1)}}} in {value!r} is not root, seed or a grid key ({', '.join(fields)})")
        return str(fields[m.group(1)])

    return _FIELD.sub(sub, value)


def load_sweep(path: str | Path) -> dict[str, Any]:
    """A sweep file, checked: ``root``, ``seeds`` and ``runs`` (each with a ``name`` and an existing ``recipe``)."""
    try:
        spec = yaml.safe_load(Path(path).read_text())
    except (OSError, yaml.YAMLError) as e:
        raise SweepError(f"sweep file {path} cannot be read ({str(e).splitlines()[0]})") from None
    if not isinstance(spec, dict) or not isinstance(spec.get("runs"), list) or not spec["runs"]:
        raise SweepError(f"sweep file {path} needs a list of runs (each with name and recipe)")
    for run in spec["runs"]:
        if not isinstance(run, dict) or "name" not in run or "recipe" not in run:
            raise SweepError(f"every run of {path} needs a name and a recipe, got {run!r}")
        if not Path(run["recipe"]).is_file():
            raise SweepError(f"recipe {run['recipe']} of run {run['name']!r} does not exist; run the sweep from the "
                             f"repository root")
    spec.setdefault("root", "runs/sweeps")
    spec.setdefault("seeds", [0])
    return spec


def expand(spec: dict[str, Any], only: str | None = None) -> list[Job]:
    """Every job of a sweep, seed by seed, runs in order, grid points in order (optionally only names matching ``only``)."""
    jobs = []
    for seed in spec["seeds"]:
        for run in spec["runs"]:
            grid = run.get("grid") or {}
            for values in itertools.product(*grid.values()) if grid else [()]:
                fields = {"root": spec["root"], "seed": seed, **dict(zip(grid, values))}
                name = fill(run["name"], fields)
                if only is not None and not fnmatch.fnmatch(name, only):
                    continue
                overrides = [f"{k}={_yaml(fields[k])}" for k in grid]
                overrides += [f"{k}={_yaml(fill(v, fields))}" for k, v in (run.get("set") or {}).items()]
                overrides.append(f"train.seed={seed}")
                jobs.append(Job(name, int(seed), Path(spec["root"]) / name / f"seed{seed}", run["recipe"], overrides,
                                list(run.get("eval") or [])))
    return jobs


def _yaml(value: Any) -> str:
    """A value as ``--set`` parses it (YAML): flow style for lists."""
    return yaml.safe_dump(value, default_flow_style=True, width=1 << 20).strip().removesuffix("...").strip()


def finished(job: Job) -> bool:
    """Whether the job's run holds every epoch of its config (``state.pt`` and ``config.yaml`` agree)."""
    import torch

    state, config = job.run_dir / "state.pt", job.run_dir / "config.yaml"
    if not state.is_file() or not config.is_file():
        return False
    epochs = (yaml.safe_load(config.read_text()) or {}).get("train", {}).get("epochs")
    return int(torch.load(state, map_location="cpu", weights_only=True)["epoch"]) == epochs


def run_sweep(spec: dict[str, Any], data_dir: str | None = None, only: str | None = None, dry_run: bool = False,
              report: bool = True) -> list[Job]:
    """Train and evaluate every job not done yet (:func:`expand`), then the sweep's report; returns the jobs."""
    jobs = expand(spec, only)
    for job in jobs:
        if dry_run or not finished(job):
            _ponder(job.train_command(data_dir), dry_run)
        for kind, cmd in job.eval_commands(data_dir):
            if dry_run or not (job.run_dir / "results" / f"{kind}.json").is_file():
                _ponder(cmd, dry_run)
    rep = spec.get("report")
    if report and rep:
        names = {j.name for j in expand(spec)}
        chosen = sorted(str(Path(spec["root"]) / n) for n in names
                        if any(fnmatch.fnmatch(n, p) for p in rep.get("runs", ["*"])))
        cmd = ["report", *chosen]
        if rep.get("out"):
            cmd += ["--out", fill(rep["out"], {"root": spec["root"]})]
        for doc in rep.get("update_doc") or []:
            cmd += ["--update-doc", doc]
        _ponder(cmd, dry_run)
    return jobs


def _ponder(args: Sequence[str], dry_run: bool) -> None:
    print("ponder " + " ".join(args), flush=True)
    if not dry_run:
        subprocess.run([sys.executable, "-m", "ponder.cli", *args], check=True)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m ponder.sweeps", description=__doc__.split("\n\n")[0])
    p.add_argument("sweep", help="sweep file (YAML)")
    p.add_argument("--data-dir", help="passed to every ponder train / eval")
    p.add_argument("--only", metavar="PATTERN", help="only the runs whose names match (shell-style)")
    p.add_argument("--root", help="run directories under this folder instead of the file's root")
    p.add_argument("--seeds", type=int, nargs="+", help="these seeds instead of the file's")
    p.add_argument("--dry-run", action="store_true", help="print the commands, run nothing")
    p.add_argument("--no-report", action="store_true")
    args = p.parse_args(argv)
    try:
        spec = load_sweep(args.sweep)
        if args.root:
            spec["root"] = args.root
        if args.seeds:
            spec["seeds"] = args.seeds
        run_sweep(spec, args.data_dir, args.only, args.dry_run, not args.no_report)
    except (SweepError, subprocess.CalledProcessError) as e:
        print(f"ponder sweep: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
