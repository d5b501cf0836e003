"""Find result files under run directories and group runs that differ only by seed.

A *row* is one evaluation of one run (a result whose protocol is not ``bench``) with the latency
of the run's benchmark attached: the benchmark at the model's own setting (no ``--budget``) gives the
headline's latency (when the evaluation has a headline), one with ``--budget B`` the latency of the
operating point whose ``budget`` is ``B``. A run with benchmarks only gives one row from its latest
benchmark. A *group* is the rows with the same config hash and result kind (the same run, trained
with other seeds): its numbers are means over seeds with the sample standard deviation over seeds
(0 for a single seed).
"""

from __future__ import annotations

import glob
import json
import math
import re
import statistics
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Sequence

from ponder.registry import FAMILIES
from ponder.results import EvalResult, Latency, OperatingPoint, load_result

FAMILY_TITLES = {"static": "static", "early_exit": "early exit", "skipping": "block skipping", "spatial": "spatial"}


class ReportError(ValueError):
    """Bad input to ``ponder report`` (no results, a bad document marker, an out-of-date table)."""


@dataclass
class Stat:
    """Mean and sample standard deviation over seeds (``std`` 0 for one value); ``n`` values."""

    mean: float
    std: float
    n: int

    @staticmethod
    def of(values: Iterable[float | None]) -> "Stat | None":
        """Stat of the values that are not None (None when there are none)."""
        v = [float(x) for x in values if x is not None and math.isfinite(float(x))]
        if not v:
            return None
        return Stat(statistics.fmean(v), statistics.stdev(v) if len(v) > 1 else 0.0, len(v))


@dataclass
class Row:
    """One evaluation of one run and the benchmarks of that run that fit it."""

    source: Path                      # the folder holding the result file
    result: EvalResult
    bench: EvalResult | None          # the result whose latency is the headline's (no --budget)
    point_benches: dict[float, EvalResult] = field(default_factory=dict)  # budget -> bench with that --budget

    @property
    def latency(self) -> Latency | None:
        return None if self.bench is None else self.bench.latency


@dataclass
class PointStat:
    """One operating point over the seeds of a group (matched by label)."""

    label: str
    knob: str | None
    value: float | None
    budget: float | None
    macs: Stat
    macs_std: Stat | None             # per-image MACs std, averaged over seeds
    accuracy: Stat
    ms_per_image: Stat | None


@dataclass
class Group:
    """Rows that differ only by seed (same config hash and kind), with their statistics."""

    rows: list[Row]
    label: str = ""
    variant: str = ""                 # what tells it apart from groups of the same model, method and kind

    @property
    def first(self) -> EvalResult:
        return self.rows[0].result

    @property
    def family(self) -> str:
        return self.first.run.family

    @property
    def kind(self) -> str:
        return self.first.kind

    @property
    def seeds(self) -> list[int]:
        return sorted(r.result.run.seed for r in self.rows)

    @property
    def accuracy(self) -> Stat | None:
        return Stat.of(r.result.accuracy for r in self.rows)

    @property
    def macs(self) -> Stat | None:
        """Mean MACs per image, over seeds."""
        return Stat.of(r.result.macs_mean for r in self.rows)

    @property
    def macs_std(self) -> Stat | None:
        """Per-image MACs standard deviation, over seeds."""
        return Stat.of(r.result.macs_std for r in self.rows)

    @property
    def dense_macs(self) -> Stat | None:
        return Stat.of(r.result.dense_macs for r in self.rows)

    @property
    def block_usage(self) -> list[float] | None:
        """Each block's open rate (fraction of images that ran it), mean over seeds; None unless every seed has them."""
        usages = [r.result.block_usage for r in self.rows]
        if not usages or any(u is None or len(u) != len(usages[0]) for u in usages):
            return None
        return [statistics.fmean(col) for col in zip(*usages)]

    def latency(self, attr: str) -> Stat | None:
        """Stat over seeds of a :class:`Latency` field (``ms_per_image``, ``speedup``, ``efficiency``, ...)."""
        return Stat.of(getattr(r.latency, attr) for r in self.rows if r.latency is not None)

    @property
    def benches(self) -> list[EvalResult]:
        """The results whose latency the rows use (headline and operating points)."""
        out = [r.bench for r in self.rows if r.bench is not None]
        return out + [b for r in self.rows for budget, b in r.point_benches.items()
                      if any(p.budget == budget for p in r.result.points)]

    def points(self) -> list[PointStat]:
        """Operating points in the first run's order; a label is kept when every seed has it."""
        by_label: dict[str, list[tuple[Row, OperatingPoint]]] = defaultdict(list)
        for row in self.rows:
            for p in row.result.points:
                by_label[p.label].append((row, p))
        out = []
        for p0 in self.first.points:
            pairs = by_label[p0.label]
            if len(pairs) != len(self.rows):
                continue
            out.append(PointStat(
                label=p0.label, knob=p0.knob, value=p0.value, budget=p0.budget,
                macs=Stat.of(p.macs_mean for _, p in pairs), macs_std=Stat.of(p.macs_std for _, p in pairs),
                accuracy=Stat.of(p.accuracy for _, p in pairs),
                ms_per_image=Stat.of(_point_ms(row, p) for row, p in pairs)))
        return out


def _point_ms(row: Row, point: OperatingPoint) -> float | None:
    if point.ms_per_image is not None:
        return point.ms_per_image
    bench = row.point_benches.get(point.budget) if point.budget is not None else None
    return None if bench is None or bench.latency is None else bench.latency.ms_per_image


# ---------------------------------------------------------------- finding files

def _expand(paths: Sequence[str | Path]) -> list[Path]:
    out: list[Path] = []
    for p in paths:
        s = str(p)
        if any(c in s for c in "*?["):
            matches = sorted(glob.glob(s, recursive=True))
            if not matches:
                raise ReportError(f"{s} matches no file or directory; check the pattern")
            out.extend(Path(m) for m in matches)
        else:
            out.append(Path(s))
    return out


def _is_result(path: Path) -> bool:
    """Cheap test that a JSON file is a ponder result (an object with ``schema`` and ``run``)."""
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return False
    return isinstance(data, dict) and "schema" in data and "run" in data


def find_results(paths: Sequence[str | Path]) -> list[tuple[Path, EvalResult]]:
    """Every result under ``paths`` (run directories, folders of runs, result files or glob patterns),
    each once, as ``(path, result)`` in path order. Other JSON files in those folders are skipped."""
    if not paths:
        raise ReportError("give at least one run directory (or a folder of runs, or a result file)")
    files: dict[Path, None] = {}
    for path in _expand(paths):
        if path.is_file():
            files[path.resolve()] = None
        elif path.is_dir():
            for f in sorted(path.rglob("*.json")):
                if _is_result(f):
                    files[f.resolve()] = None
        else:
            raise ReportError(f"{path} does not exist; give run directories or result files")
    if not files:
        where = ", ".join(str(p) for p in paths)
        raise ReportError(f"no result files under {where}; run `ponder eval RUN_DIR` or "
                          f"`ponder bench --checkpoint RUN_DIR --save` first (they write RUN_DIR/results/*.json)")
    return [(f, load_result(f)) for f in sorted(files)]


# ---------------------------------------------------------------- rows and groups

def build_rows(found: Sequence[tuple[Path, EvalResult]], batch: int | None = None) -> list[Row]:
    """One row per evaluation result, benchmarks of the same run (same folder) attached.

    Among several benchmarks for one setting the latest is used, or the one at ``batch`` when given.
    """
    by_run: dict[Path, list[EvalResult]] = defaultdict(list)
    for path, result in found:
        by_run[path.parent].append(result)
    rows: list[Row] = []
    for source, results in by_run.items():
        benches = [r for r in results if r.latency is not None and (batch is None or r.latency.batch == batch)]
        benches.sort(key=lambda r: r.provenance.timestamp)
        own = [b for b in benches if b.latency.budget is None]  # type: ignore[union-attr]
        at_budget = {b.latency.budget: b for b in benches if b.latency.budget is not None}  # type: ignore[union-attr]
        evals = [r for r in results if r.evaluation.protocol != "bench"]
        for r in evals:
            bench = r if r.latency is not None else (own[-1] if own and r.accuracy is not None else None)
            rows.append(Row(source, r, bench, dict(at_budget)))
        if not evals and benches:
            rows.append(Row(source, benches[-1], benches[-1], dict(at_budget)))
    return rows


def group_rows(rows: Sequence[Row]) -> list[Group]:
    """Rows grouped by (config hash, kind), ordered by family, model, method, kind, run name; labels made unique."""
    groups: dict[tuple[str, str], list[Row]] = defaultdict(list)
    seen: dict[tuple[str, str, int], Path] = {}
    for row in rows:
        run = row.result.run
        key = (run.config_hash, row.result.kind, run.seed)
        if key in seen:
            raise ReportError(f"{seen[key]} and {row.source} hold the same result ({row.result.kind}) of one config "
                              f"and seed {run.seed}; pass only one of them (a copy is not another seed)")
        seen[key] = row.source
        groups[(run.config_hash, row.result.kind)].append(row)
    out = [Group(sorted(g, key=lambda r: (r.result.run.seed, r.result.run.name))) for g in groups.values()]
    order = {f: i for i, f in enumerate(FAMILIES)}
    out.sort(key=lambda g: (order.get(g.family, len(order)), g.first.run.model, g.first.run.method, g.kind,
                            g.first.run.name, g.first.run.config_hash))
    base = [f"{g.first.run.model} · {g.first.run.method} · {g.kind}" for g in out]
    for label in set(base):
        same = [g for g, b in zip(out, base) if b == label]
        if len(same) == 1:
            same[0].label = label
            continue
        settings = differing_settings([run_settings(g.rows[0].source) for g in same])
        for g, differ in zip(same, settings):
            g.variant = differ or _run_stem(g)
        variants = [g.variant for g in same]
        for g in same:
            if variants.count(g.variant) > 1:
                g.variant = " · ".join(v for v in (g.variant, g.first.run.config_hash[:6]) if v)
            g.label = f"{label} · {g.variant}"
    return out


def run_settings(source: Path) -> dict[str, object] | None:
    """The dotted settings (``method.kwargs.alpha``: 0.6, ...) of the run whose results are in ``source``
    (its ``config.yaml`` beside the ``results`` folder), or None when it cannot be read."""
    import yaml

    from ponder.config import flat_config

    path = (source.parent if source.name == "results" else source) / "config.yaml"
    try:
        config = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError):
        return None
    return flat_config(config, kwargs_whole=False) if isinstance(config, dict) else None


def differing_settings(settings: Sequence[dict[str, object] | None]) -> list[str]:
    """For groups whose labels collide: each one's values of the settings that differ between them
    (``method.alpha=0.6, method.beta=0.1``; ``kwargs`` left out of the names, seeds and machine-local fields
    ignored); empty strings when a config is missing."""
    from ponder.results.schema import NOT_HASHED

    if any(s is None for s in settings):
        return [""] * len(settings)
    keys = sorted({k for s in settings for k in s} - set(NOT_HASHED))  # type: ignore[union-attr]
    differ = [k for k in keys if len({repr(s.get(k)) for s in settings}) > 1]  # type: ignore[union-attr]
    return [", ".join(f"{k.replace('.kwargs.', '.')}={s.get(k)}" for k in differ) for s in settings]  # type: ignore[union-attr]


def _run_stem(group: Group) -> str:
    """What tells apart groups whose configs cannot be read: their runs' directory name without a seed
    suffix (``q=0.5`` for ``q=0.5_s1``, ``l2w_lt`` for ``l2w_lt_s2``) when the runs share one, else the
    config hash's first 6 digits."""
    stems = {re.sub(rf"[_-]?s(eed)?[_-]?{r.result.run.seed}$", "", r.result.run.name) for r in group.rows}
    return stems.pop() if len(stems) == 1 and "" not in stems else group.first.run.config_hash[:6]


def collect_groups(paths: Sequence[str | Path], batch: int | None = None) -> list[Group]:
    """:func:`find_results` -> :func:`build_rows` -> :func:`group_rows`."""
    return group_rows(build_rows(find_results(paths), batch))
