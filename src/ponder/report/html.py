"""A static, self-contained HTML report: two inline SVG plots and the tables (no JavaScript, no network)."""

from __future__ import annotations

from html import escape

from ponder.cost import format_count
from ponder.report.collect import Group
from ponder.report.svg import PlotPoint, Series, svg_plot
from ponder.report.tables import Table, family_tables, points_table, summary_table

_CSS = """
body { font-family: Helvetica, Arial, sans-serif; margin: 2em auto; max-width: 1200px; color: #222; }
table { border-collapse: collapse; margin: 0.6em 0 0.4em; font-size: 13px; }
th, td { border: 1px solid #ccc; padding: 3px 8px; }
th { background: #f2f2f2; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
p.note { font-size: 12px; color: #555; margin: 0.2em 0; }
figure { margin: 1em 0; }
details { margin: 0.4em 0; }
code { background: #f4f4f4; padding: 0 3px; }
"""

_TEXT_COLUMNS = {"family", "model", "method", "evaluation", "point", "setting", "run", "machine", "commit", "when",
                 "executor", "device", "folder"}


def _scale(values: list[float], choice: str) -> bool:
    """True for a log x axis: ``log``, or ``auto`` when the values span more than a factor of 20."""
    if choice != "auto":
        return choice == "log"
    pos = [v for v in values if v > 0]
    return bool(pos) and max(pos) / min(pos) > 20


def _tip(g: Group, name: str, acc_mean: float, acc_std: float, x_text: str) -> str:
    seeds = len(g.rows)
    spread = f" ± {acc_std:.2f}" if seeds > 1 else ""
    return f"{g.label}\n{name}: top-1 {acc_mean:.2f}{spread} %, {x_text} ({seeds} seed{'s' if seeds > 1 else ''})"


def macs_series(groups: list[Group]) -> list[Series]:
    """Accuracy (%) vs mean MACs per image: a curve through each group's operating points, else one marker."""
    out = []
    for i, g in enumerate(groups):
        pts = []
        for p in g.points():
            pts.append(PlotPoint(p.macs.mean, 100 * p.accuracy.mean, p.macs.std, 100 * p.accuracy.std,
                                 _tip(g, p.label, 100 * p.accuracy.mean, 100 * p.accuracy.std,
                                      f"{format_count(p.macs.mean)} MACs")))
        acc, macs = g.accuracy, g.macs
        if not pts and acc is not None and macs is not None:
            pts.append(PlotPoint(macs.mean, 100 * acc.mean, macs.std, 100 * acc.std,
                                 _tip(g, g.kind, 100 * acc.mean, 100 * acc.std, f"{format_count(macs.mean)} MACs")))
        if pts:
            out.append(Series(g.label, pts, connect=len(pts) > 1, style=i))
    return out


def latency_series(groups: list[Group]) -> list[Series]:
    """Accuracy (%) vs measured ms per image: operating points that were benchmarked and the benchmarked headline."""
    out = []
    for i, g in enumerate(groups):
        pts = []
        for p in g.points():
            if p.ms_per_image is not None:
                pts.append(PlotPoint(p.ms_per_image.mean, 100 * p.accuracy.mean, p.ms_per_image.std,
                                     100 * p.accuracy.std, _tip(g, p.label, 100 * p.accuracy.mean, 100 * p.accuracy.std,
                                                                f"{p.ms_per_image.mean:.3g} ms/image")))
        acc, ms = g.accuracy, g.latency("ms_per_image")
        if acc is not None and ms is not None:
            pts.append(PlotPoint(ms.mean, 100 * acc.mean, ms.std, 100 * acc.std,
                                 _tip(g, g.kind, 100 * acc.mean, 100 * acc.std, f"{ms.mean:.3g} ms/image")))
        if pts:
            out.append(Series(g.label, pts, connect=len(pts) > 1, style=i))
    return out


def html_table(table: Table, heading: str = "h3") -> str:
    """``table`` as an HTML table with its title and notes."""
    head = "".join(f"<th>{escape(h)}</th>" for h in table.header)
    body = []
    for row in table.rows:
        cells = "".join(f"<td>{escape(c)}</td>" if h in _TEXT_COLUMNS else f'<td class="num">{escape(c)}</td>'
                        for h, c in zip(table.header, row))
        body.append(f"<tr>{cells}</tr>")
    notes = "".join(f'<p class="note">{escape(n)}</p>' for n in table.notes)
    return (f"<{heading}>{escape(table.title)}</{heading}>\n<table>\n<thead><tr>{head}</tr></thead>\n<tbody>\n"
            + "\n".join(body) + f"\n</tbody>\n</table>\n{notes}")


def runs_table(groups: list[Group]) -> Table:
    """Provenance of every result shown: run, seed, evaluation, machine, threads, versions, commit, time."""
    rows = []
    for g in groups:
        for r in g.rows:
            res = r.result
            for item in [res] + ([r.bench] if r.bench is not None and r.bench is not res else []):
                p = item.provenance
                commit = p.commit[:10] + ("+dirty" if p.dirty else "")
                rows.append([res.run.name, str(res.run.seed), item.kind, str(item.evaluation.images),
                             item.evaluation.executor, f"{p.cpu} ({p.cores} cores)", p.device, str(p.threads),
                             p.torch, commit, p.timestamp, str(r.source)])
    header = ["run", "seed", "evaluation", "images", "executor", "machine", "device", "threads", "torch", "commit",
              "when", "folder"]
    return Table("runs and provenance", header, rows, [])


def plots(groups: list[Group], x_scale: str = "auto") -> dict[str, str]:
    """SVG documents by file stem: ``accuracy_vs_macs`` and, when a run was benchmarked, ``accuracy_vs_latency``."""
    out = {}
    macs, lat = macs_series(groups), latency_series(groups)
    if macs:
        log = _scale([p.x for s in macs for p in s.points], x_scale)
        out["accuracy_vs_macs"] = svg_plot(macs, title="top-1 accuracy vs MACs per image",
                                           x_label="mean MACs per image (conv+linear)" + (", log scale" if log else ""),
                                           y_label="top-1 accuracy (%)", log_x=log)
    if lat:
        log = _scale([p.x for s in lat for p in s.points], x_scale)
        out["accuracy_vs_latency"] = svg_plot(lat, title="top-1 accuracy vs measured latency",
                                              x_label="milliseconds per image (median)" + (", log scale" if log else ""),
                                              y_label="top-1 accuracy (%)", log_x=log, x_format=lambda v: f"{v:.3g}")
    return out


def render_html(groups: list[Group], x_scale: str = "auto", title: str = "ponder report") -> str:
    """The whole page: accuracy-vs-MACs and accuracy-vs-latency plots, summary tables, points, provenance."""
    figures = plots(groups, x_scale)
    parts = [f"<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n<title>{escape(title)}</title>\n"
             f"<style>{_CSS}</style>\n</head>\n<body>\n<h1>{escape(title)}</h1>",
             f"<p>{len(groups)} run group{'s' if len(groups) != 1 else ''} from "
             f"{sum(len(g.rows) for g in groups)} results. Curves join a run's operating points (exits, thresholds, "
             f"budgets); error bars are one standard deviation over seeds. Hover a point for its numbers.</p>"]
    parts += [f"<figure>{svg}</figure>" for svg in figures.values()]
    if "accuracy_vs_latency" in figures:
        parts += [f'<p class="note">{escape(n)}</p>' for n in summary_table(groups).notes[1:]]
    else:
        parts.append('<p class="note">No measured latency in these results: run '
                     "<code>ponder bench --checkpoint RUN_DIR --save</code> to add it.</p>")
    parts.append(html_table(summary_table(groups), "h2"))
    parts += [html_table(t, "h2") for t in family_tables(groups)]
    with_points = [g for g in groups if g.first.points]
    if with_points:
        parts.append("<h2>operating points</h2>")
        for g in with_points:
            t = points_table(g)
            parts.append(f"<details><summary>{escape(t.title)}</summary>\n{html_table(t, 'h4')}</details>")
    parts.append(html_table(runs_table(groups), "h2"))
    parts.append("</body>\n</html>\n")
    return "\n".join(parts)
