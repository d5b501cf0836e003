"""``ponder report``: markdown tables and a static HTML page from the result files of runs.

Results are found (:mod:`.collect`), grouped over seeds, rendered as markdown (:mod:`.markdown`),
as HTML with inline SVG plots (:mod:`.html`, :mod:`.svg`), or written into documents between
marker comments (:mod:`.docs`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

from ponder.report.collect import Group, ReportError, collect_groups
from ponder.report.docs import update_document
from ponder.report.html import plots, render_html
from ponder.report.markdown import render_markdown

__all__ = ["Group", "ReportError", "collect_groups", "plots", "render_html", "render_markdown", "report_command",
           "update_document"]


def report_command(paths: Sequence[str], out: str | None = None, docs: Sequence[str] = (), check: bool = False,
                   points: bool = False, batch: int | None = None, x_scale: str = "auto") -> tuple[str, list[str]]:
    """What ``ponder report`` does: ``(markdown for stdout, notices)``.

    With ``docs``, regenerates (or with ``check`` verifies) their marked tables and prints nothing
    else; otherwise renders every result under ``paths`` and, with ``out``, writes ``out/report.md``,
    ``out/report.html`` and its plots as ``out/accuracy_vs_macs.svg`` / ``accuracy_vs_latency.svg``.
    """
    from ponder.files import atomic_write_text

    if check and not docs:
        raise ReportError("--check compares documents: give --update-doc DOC.md with it")
    if docs:
        return "", [update_document(d, paths, check, batch) for d in docs]
    groups = collect_groups(paths, batch)
    markdown = render_markdown(groups, points)
    notices = []
    if out:
        folder = Path(out)
        folder.mkdir(parents=True, exist_ok=True)
        atomic_write_text(folder / "report.md", markdown)
        atomic_write_text(folder / "report.html", render_html(groups, x_scale))
        written = ["report.md", "report.html"]
        for name, svg in plots(groups, x_scale).items():
            atomic_write_text(folder / f"{name}.svg", svg + "\n")
            written.append(f"{name}.svg")
        notices = [f"wrote {', '.join(written)} in {folder}"]
    return markdown, notices
