"""Result tables inside markdown documents, regenerated from result files (never typed by hand).

A document marks each generated table with a pair of HTML comments::

    <!-- ponder-report:all from=../results start -->
    (generated: replaced on every update)
    <!-- ponder-report:all end -->

``NAME`` picks the table: ``all`` (every run), a family (``static``, ``early_exit``, ``skipping``,
``spatial``), ``points`` (every operating point), ``gates`` (block-skipping models' open rates per
layer) or ``budgets`` (accuracy at matched MACs: one column per target budget). ``from=`` lists result paths or globs, comma
separated, relative to the document's folder; without it the block uses the paths given to
``ponder report``. Markers count at the start of a line outside fenced code blocks. ``--check``
compares instead of writing, so a test can hold documents to their results.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Sequence

from ponder.report.collect import Group, ReportError, collect_groups
from ponder.report.markdown import markdown_table
from ponder.report.tables import named_table

_BLOCK = re.compile(r"^[ \t]*<!-- ponder-report:(?P<name>[\w-]+)(?P<args>(?:[ \t]+[\w-]+=\S+)*)[ \t]+start -->"
                    r"(?P<body>.*?)<!-- ponder-report:(?P=name) end -->", re.S | re.M)
_START = re.compile(r"^[ \t]*<!-- ponder-report:[^>]*start -->", re.M)
_FENCE = re.compile(r"^[ \t]*(```|~~~).*?^[ \t]*\1[^\n]*$", re.S | re.M)


def _outside_code(text: str, matches: list[re.Match]) -> list[re.Match]:
    """The matches that do not start inside a fenced code block (examples of markers are not blocks)."""
    fences = [(m.start(), m.end()) for m in _FENCE.finditer(text)]
    return [m for m in matches if not any(a <= m.start() < b for a, b in fences)]


def block_markdown(name: str, groups: list[Group]) -> str:
    """The generated text of a block: its table(s) (titled when there are several) with their notes."""
    tables = named_table(name, groups)
    if not tables:
        return "_no results with operating points_"
    if len(tables) == 1 and name != "points":
        return markdown_table(tables[0])
    return "\n\n".join(markdown_table(t, f"**{t.title}**") for t in tables)


def _paths(doc: Path, name: str, args: str, default: Sequence[str]) -> list[str]:
    options = dict(item.split("=", 1) for item in args.split())
    unknown = sorted(set(options) - {"from"})
    if unknown:
        raise ReportError(f"block {name!r} in {doc} has an unknown option {unknown[0]!r}; only from=PATHS is known")
    if "from" in options:
        return [str(doc.parent / p) for p in options["from"].split(",") if p]
    if not default:
        raise ReportError(f"block {name!r} in {doc} names no results; add from=PATH to its start marker "
                          f"or give run directories to `ponder report`")
    return list(default)


def regenerate(doc: str | Path, default_paths: Sequence[str] = (),
               batch: int | None = None) -> tuple[str, str, list[str]]:
    """``(old_text, new_text, names of the blocks that changed)`` for document ``doc``."""
    doc = Path(doc)
    if not doc.is_file():
        raise ReportError(f"document {doc} does not exist; give a markdown file with ponder-report markers")
    text = doc.read_text()
    blocks = _outside_code(text, list(_BLOCK.finditer(text)))
    if len(blocks) != len(_outside_code(text, list(_START.finditer(text)))):
        raise ReportError(f"{doc} has a ponder-report start marker without its matching "
                          f"<!-- ponder-report:NAME end --> line; close every block")
    if not blocks:
        raise ReportError(f"{doc} has no <!-- ponder-report:NAME start --> ... <!-- ponder-report:NAME end --> "
                          f"block; add one where a generated table belongs")
    cache: dict[tuple[str, ...], list[Group]] = {}
    out, pos, changed = [], 0, []
    for m in blocks:
        paths = tuple(_paths(doc, m["name"], m["args"], default_paths))
        if paths not in cache:
            cache[paths] = collect_groups(paths, batch)
        body = "\n\n" + block_markdown(m["name"], cache[paths]) + "\n\n"
        if body != m["body"]:
            changed.append(m["name"])
        out += [text[pos:m.start("body")], body]
        pos = m.end("body")
    out.append(text[pos:])
    return text, "".join(out), changed


def update_document(doc: str | Path, default_paths: Sequence[str] = (), check: bool = False,
                    batch: int | None = None) -> str:
    """Rewrite the generated blocks of ``doc`` (or, with ``check``, raise :class:`ReportError` when one
    differs from its results); returns a one-line account of what happened."""
    from ponder.files import atomic_write_text

    _, new, changed = regenerate(doc, default_paths, batch)
    if check:
        if changed:
            command = " ".join(["ponder report", *map(str, default_paths), "--update-doc", str(doc)])
            raise ReportError(f"{doc} is out of date: block(s) {', '.join(changed)} differ from the results; "
                              f"regenerate them with `{command}`")
        return f"{doc}: generated tables are up to date"
    if changed:
        atomic_write_text(doc, new)
        return f"{doc}: regenerated {', '.join(changed)}"
    return f"{doc}: already up to date"
