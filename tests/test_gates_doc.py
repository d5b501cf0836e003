"""docs/gates.md's evidence tables are generated from the result files in results/gates (never typed by hand)."""

from __future__ import annotations

from pathlib import Path

from ponder.cli import main

ROOT = Path(__file__).resolve().parents[1]


def test_the_tables_of_docs_gates_md_are_generated_from_results_gates(capsys):
    code = main(["report", "--update-doc", str(ROOT / "docs" / "gates.md"), "--check"])
    assert code == 0, capsys.readouterr().err
