"""`ponder demo --quick` trains, evaluates and reports every demo model end to end."""

import json

import pytest

pytest.importorskip("sklearn")


def test_quick_demo_reports_every_entry(tmp_path, capsys):
    from ponder.demo import demo_entries, run_demo

    rows = run_demo(out_dir=tmp_path, quick=True)
    out = capsys.readouterr().out
    assert [r["model"] for r in rows] == [e.label for e in demo_entries("digits")]
    for r in rows:
        assert 0.0 <= r["accuracy"] <= 100.0 and r["macs_mean"] > 0 and r["ms_per_image"] > 0
        assert r["model"] in out
    static = next(r for r in rows if r["family"] == "static")
    assert static["macs_std"] == 0.0
    assert json.loads((tmp_path / "demo.json").read_text()) == rows
    assert (tmp_path / "accuracy_vs_macs.png").stat().st_size > 0
