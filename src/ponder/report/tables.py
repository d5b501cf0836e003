"""The report's tables as rows of text cells (rendered by :mod:`.markdown` and :mod:`.html`)."""

from __future__ import annotations

from dataclasses import dataclass

from ponder.cost import format_count
from ponder.report.collect import FAMILY_TITLES, Group, ReportError, Stat

DASH = "–"


@dataclass
class Table:
    """A titled table: ``header`` and ``rows`` of text cells, ``notes`` printed under it."""

    title: str
    header: list[str]
    rows: list[list[str]]
    notes: list[str]


def _pm(stat: Stat | None, decimals: int | None = 2, scale: float = 1.0) -> str:
    """``mean ± std`` over seeds (``mean`` alone for one seed), ``–`` when missing; ``decimals=None``:
    2, or 3 below 1 (milliseconds)."""
    if stat is None:
        return DASH
    mean, std = stat.mean * scale, stat.std * scale
    d = decimals if decimals is not None else (2 if abs(mean) >= 1 else 3)
    return f"{mean:.{d}f} ± {std:.{d}f}" if stat.n > 1 else f"{mean:.{d}f}"


def _macs(mean: Stat | None, per_image_std: Stat | None) -> str:
    """Mean MACs per image (over seeds) ± the per-image standard deviation (when above 0)."""
    if mean is None:
        return DASH
    spread = per_image_std.mean if per_image_std is not None else 0.0
    return format_count(mean.mean) + (f" ± {format_count(spread)}" if spread > 0 else "")


def _count(stat: Stat | None) -> str:
    return DASH if stat is None else format_count(stat.mean)


SUMMARY_HEADER = ["model", "method", "evaluation", "top-1 (%)", "MACs / image", "dense MACs", "ms / image",
                  "speed-up", "efficiency", "points", "seeds"]


def summary_row(g: Group, with_family: bool) -> list[str]:
    run = g.first.run
    speed = g.latency("speedup")
    cells = [run.model, run.method, f"{g.kind} · {g.variant}" if g.variant else g.kind, _pm(g.accuracy, scale=100), _macs(g.macs, g.macs_std),
             _count(g.dense_macs), _pm(g.latency("ms_per_image"), None),
             DASH if speed is None else _pm(speed) + "×", _pm(g.latency("efficiency")),
             str(len(g.first.points)) if g.first.points else DASH, str(len(g.rows))]
    return ([FAMILY_TITLES.get(g.family, g.family)] if with_family else []) + cells


def _latency_notes(groups: list[Group]) -> list[str]:
    """One line per distinct machine / batch / threads / versions behind the ms column, with its commits."""
    settings: dict[str, list[str]] = {}
    for g in groups:
        for b in g.benches:
            lat, prov = b.latency, b.provenance
            assert lat is not None
            threads = f"{lat.threads} thread{'s' if lat.threads != 1 else ''}"
            text = (f"{prov.cpu} ({prov.cores} cores, {prov.device}), batch {lat.batch}, {threads}, "
                    f"torch {prov.torch}, ponder {prov.ponder}")
            commit = prov.commit[:10] + ("+dirty" if prov.dirty else "")
            commits = settings.setdefault(text, [])
            if commit not in commits:
                commits.append(commit)
    return [f"ms / image measured on {text} at {', '.join(commits)}." for text, commits in settings.items()]


NOTES = ("top-1 and ms / image: mean ± standard deviation over seeds; MACs (conv+linear) per image: "
         "mean ± per-image standard deviation; speed-up and efficiency (speed-up / MAC ratio) of the sparse "
         "executor against the model's dense baseline.")


def summary_table(groups: list[Group], family: str | None = None) -> Table:
    """One row per group; ``family=None``: every family, with a family column."""
    chosen = [g for g in groups if family is None or g.family == family]
    header = (["family"] if family is None else []) + SUMMARY_HEADER
    title = "all runs" if family is None else FAMILY_TITLES.get(family, family)
    return Table(title, header, [summary_row(g, family is None) for g in chosen],
                 [NOTES, *_latency_notes(chosen)] if chosen else [])


def points_table(g: Group) -> Table:
    """The operating points of one group: label, knob, top-1, MACs, measured ms."""
    rows = []
    for p in g.points():
        knob = DASH
        if p.budget is not None:
            knob = f"budget {format_count(p.budget)}"
        elif p.knob is not None and p.value is not None:
            knob = f"{p.knob} = {p.value:g}"
        rows.append([p.label, knob, _pm(p.accuracy, scale=100), _macs(p.macs, p.macs_std), _pm(p.ms_per_image, None)])
    seeds = f"{len(g.rows)} seed{'s' if len(g.rows) > 1 else ''}"
    return Table(f"{g.label} ({seeds})", ["point", "setting", "top-1 (%)", "MACs / image", "ms / image"], rows, [])


def budgets_table(groups: list[Group]) -> Table:
    """Accuracy at matched MACs: one row per group with budget points (``budget`` protocol, budgeted targets),
    one column pair per target budget (top-1 and the MACs reached on the test set, means over seeds)."""
    chosen = [g for g in groups if any(p.budget is not None for p in g.points())]
    budgets = sorted({p.budget for g in chosen for p in g.points() if p.budget is not None})
    header = ["model", "method", "evaluation"]
    for b in budgets:
        header += [f"top-1 (%) at {format_count(b)}", f"MACs at {format_count(b)}"]
    rows = []
    for g in chosen:
        run = g.first.run
        at = {p.budget: p for p in g.points() if p.budget is not None}
        cells = [run.model, run.method, f"{g.kind} · {g.variant}" if g.variant else g.kind]
        for b in budgets:
            p = at.get(b)
            cells += [DASH, DASH] if p is None else [_pm(p.accuracy, scale=100), _macs(p.macs, p.macs_std)]
        rows.append(cells + [str(len(g.rows))])
    return Table("accuracy at matched MACs", header + ["seeds"], rows,
                 ["top-1: mean ± standard deviation over seeds at each target budget (the knob fitted on the "
                  "held-out split); MACs: the test set's mean per image ± the per-image standard deviation."]
                 if rows else [])


def gates_table(groups: list[Group]) -> Table:
    """The gates' open rates per layer of every group that has them (block-skipping models): mean over seeds."""
    rows = []
    for g in groups:
        usage = g.block_usage
        if usage is None:
            continue
        run = g.first.run
        rows.append([run.model, run.method, f"{g.kind} · {g.variant}" if g.variant else g.kind,
                     f"{100 * sum(usage) / len(usage):.1f}", " ".join(f"{100 * u:.0f}" for u in usage), str(len(g.rows))])
    return Table("open rates per layer", ["model", "method", "evaluation", "mean open rate (%)",
                                          "open rate of each block, in order (%)", "seeds"], rows,
                 ["open rate: the fraction of test images that ran the block (whole or first conv only) at the "
                  "model's own setting, mean over seeds."] if rows else [])


def family_tables(groups: list[Group]) -> list[Table]:
    """One summary table per family present, in the order of ``ponder.results.FAMILIES``."""
    present = []
    for g in groups:
        if g.family not in present:
            present.append(g.family)
    return [summary_table(groups, f) for f in present]


def named_table(name: str, groups: list[Group]) -> list[Table]:
    """The tables a document marker names: ``all``, a family, ``points`` (every group with points), ``gates``
    (the open rates per layer) or ``budgets`` (accuracy at matched MACs)."""
    if name == "all":
        return [summary_table(groups)]
    if name in ("gates", "budgets"):
        table = gates_table(groups) if name == "gates" else budgets_table(groups)
        return [table] if table.rows else []
    if name == "points":
        return [points_table(g) for g in groups if g.first.points]
    if name in FAMILY_TITLES:
        return [summary_table(groups, name)]
    raise ReportError(f"unknown table {name!r}; name all, points, gates, budgets or a family ({', '.join(FAMILY_TITLES)})")
