"""Markdown rendering of the report's tables (stdout, ``report.md`` and document blocks)."""

from __future__ import annotations

from ponder.report.collect import Group
from ponder.report.tables import Table, family_tables, points_table, summary_table

_TEXT_COLUMNS = {"family", "model", "method", "evaluation", "point", "setting", "open rate of each block, in order (%)"}


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def markdown_table(table: Table, title: str | None = None, notes: bool = True) -> str:
    """``table`` as a GitHub markdown table (numbers right-aligned), ``title`` above, its notes under it."""
    lines = [title, ""] if title else []
    lines.append("| " + " | ".join(_cell(h) for h in table.header) + " |")
    lines.append("|" + "|".join(":---" if h in _TEXT_COLUMNS else "---:" for h in table.header) + "|")
    lines += ["| " + " | ".join(_cell(c) for c in row) + " |" for row in table.rows]
    if notes and table.notes:
        lines += [""] + table.notes
    return "\n".join(lines)


def render_markdown(groups: list[Group], points: bool = False) -> str:
    """The whole report: every run (with the notes), one table per family and, with ``points``, every
    operating point."""
    parts = ["# ponder report", markdown_table(summary_table(groups), "## all runs")]
    parts += [markdown_table(t, f"## {t.title}", notes=False) for t in family_tables(groups)]
    tables = [points_table(g) for g in groups if g.first.points] if points else []
    if tables:
        parts += ["## operating points"] + [markdown_table(t, f"### {t.title}") for t in tables]
    return "\n\n".join(parts) + "\n"
