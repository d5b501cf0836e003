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
from ponder.report.html import render_html
from ponder.report.markdown import render_markdown

__all__ = ["Group", "ReportError", "collect_groups", "render_html", "render_markdown", "report_command",
           "update_document"]


def report_command(paths: Sequence[str], out: str | None = None, docs: Sequence[str] = (), check: bool = False,
                   points: bool = False, batch: int | None = None, x_scale: str = "auto") -> tuple[str, list[str]]:
    """What ``ponder report`` does: ``(markdown for stdout, notices)``.

    With ``docs``, regenerates (or with ``check`` verifies) their marked tables and prints nothing
    else; otherwise renders every result under ``paths`` and, with ``out``, writes ``out/report.md``
    and ``out/report.html``.
    """
    from ponder.engine.checkpoint import atomic_write_text

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
        notices = [f"wrote {folder / 'report.md'} and {folder / 'report.html'}"]
    return markdown, notices
