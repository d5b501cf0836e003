"""docs/l2w.md: its tables of the L2W-vs-plain comparison are generated from the result files in
results/l2w (the evaluations of the smoke-scale runs), never typed by hand."""

from __future__ import annotations

from pathlib import Path

from ponder.cli import main

DOC = Path(__file__).resolve().parents[1] / "docs" / "l2w.md"


def test_l2w_doc_tables_are_generated_from_their_results():
    assert "<!-- ponder-report:" in DOC.read_text()
    assert main(["report", "--update-doc", str(DOC), "--check"]) == 0
