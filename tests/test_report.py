"""`ponder report`: finding results, grouping over seeds, markdown tables, the HTML page with its SVG plots,
documents regenerated between markers (and the check mode), one-sentence errors."""

import json
import re
import xml.etree.ElementTree as ET
from html.parser import HTMLParser

import pytest

from ponder.cli import main
from ponder.report import collect_groups, render_html, render_markdown
from ponder.report.svg import legend_lines, log_ticks, nice_ticks
from ponder.results import (EvalResult, Evaluation, Latency, OperatingPoint, Provenance, RunInfo, load_result,
                            save_result)

PROV = Provenance(cpu="Test CPU", cores=4, os="Linux", python="3.11", torch="2.3", ponder="0.1.0",
                  commit="0123456789abcdef", dirty=False, threads=2, device="cpu", timestamp="2025-01-01T00:00:00+00:00")
LATER = Provenance(**{**PROV.__dict__, "timestamp": "2025-01-02T00:00:00+00:00"})


def result(run, model, family, method, seed, config, kind, acc, macs, macs_std, dense, points=(), latency=None):
    protocol = "bench" if kind.startswith("bench") else kind
    return EvalResult(kind=kind, run=RunInfo(run, model, family, method, "cifar10", seed, config),
                      evaluation=Evaluation(protocol, "test", 1000, "dense" if family == "static" else "sparse"),
                      provenance=LATER if latency else PROV, accuracy=acc, macs_mean=macs, macs_std=macs_std,
                      dense_macs=dense, points=list(points), latency=latency)


def latency(ms, speedup=None, mac_ratio=None, budget=None, batch=64):
    return Latency("checkpoint" if speedup else "static", "sparse" if speedup else "dense",
                   "dense_baseline()" if speedup else None, "cpu", batch, 2, ms * batch, ms, rounds=10, budget=budget,
                   speedup=speedup, mac_ratio=mac_ratio, efficiency=None if speedup is None else speedup / mac_ratio)


def write_runs(root):
    """Three seeds of a static ResNet (each benchmarked), two of an anytime MSDNet, two of a budgeted MSDNet
    (benchmarked at each budget), one BlockDrop with its threshold sweep (benchmarked), one SACT."""
    for s, (acc, ms) in enumerate([(0.915, 0.90), (0.921, 0.92), (0.918, 0.94)]):
        d = root / "static" / f"r20_s{s}"
        save_result(d, result(d.name, "resnet20_cifar", "static", "cross_entropy", s, "aaa", "standard", acc, 40.55e6,
                              0.0, 40.55e6))
        save_result(d, result(d.name, "resnet20_cifar", "static", "cross_entropy", s, "aaa", "bench-b64-t2", None,
                              40.55e6, 0.0, 40.55e6, latency=latency(ms)))
    for s in range(2):
        d = root / f"msd_s{s}"
        exits = [OperatingPoint(f"exit {k}", 10e6 * k, 0.6 + 0.06 * k + 0.01 * s, 0.0, "exit", k) for k in range(1, 6)]
        save_result(d, result(d.name, "msdnet_cifar_anytime", "early_exit", "multi_exit", s, "bbb", "anytime",
                              exits[-1].accuracy, 50e6, 0.0, 50e6, exits))
        d = root / f"msdb_s{s}"
        budgets = [OperatingPoint(f"budget {b / 1e6:g}M", b * 0.98, 0.7 + 0.04 * i + 0.01 * s, 5e6, budget=b)
                   for i, b in enumerate([15e6, 25e6, 35e6])]
        save_result(d, result(d.name, "msdnet_cifar_budgeted", "early_exit", "multi_exit", s, "ccc", "budgeted",
                              None, None, None, 50e6, budgets))
        for i, b in enumerate([15e6, 25e6, 35e6]):
            save_result(d, result(d.name, "msdnet_cifar_budgeted", "early_exit", "multi_exit", s, "ccc",
                                  f"bench-b64-t2-budget{b:g}", None, b, 1e6, 50e6,
                                  latency=latency(0.4 + 0.3 * i + 0.02 * s, 1.5, 2.0, budget=b)))
    d = root / "bd_s0"
    sweep = [OperatingPoint(f"threshold {t:g}", 255e6 * (1 - t / 2), 0.93 - 0.1 * t * t, 20e6, "threshold", t)
             for t in (0.1, 0.5, 0.9)]
    save_result(d, result(d.name, "blockdrop_resnet110_cifar", "skipping", "blockdrop", 0, "ddd", "skip", 0.905, 190e6,
                          22e6, 255e6, sweep))
    save_result(d, result(d.name, "blockdrop_resnet110_cifar", "skipping", "blockdrop", 0, "ddd", "bench-b64-t2", None,
                          188e6, 20e6, 255e6, latency=latency(3.1, 1.2, 1.35)))
    d = root / "sact_s0"
    save_result(d, result(d.name, "sact_resnet110_cifar", "spatial", "ponder_cost", 0, "eee", "spatial", 0.92, 140e6,
                          30e6, 255e6))
    (d / "eval_spatial.json").write_text(json.dumps({"protocol": "spatial"}))  # a protocol's own file: not a result
    return root


@pytest.fixture
def runs(tmp_path):
    return write_runs(tmp_path / "runs")


def run_cli(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def table_rows(markdown, heading):
    """Cells of the rows of the table under ``heading`` (a markdown heading line)."""
    lines = markdown.split(heading + "\n\n", 1)[1].split("\n\n")[0].splitlines()
    return [[c.strip() for c in line.strip("|").split(" | ")] for line in lines[2:]]


def test_runs_that_differ_only_by_seed_are_one_group_with_mean_and_std(runs):
    groups = collect_groups([runs])
    assert [(g.first.run.model, g.kind, g.seeds) for g in groups] == [
        ("resnet20_cifar", "standard", [0, 1, 2]), ("msdnet_cifar_anytime", "anytime", [0, 1]),
        ("msdnet_cifar_budgeted", "budgeted", [0, 1]), ("blockdrop_resnet110_cifar", "skip", [0]),
        ("sact_resnet110_cifar", "spatial", [0])]
    static = groups[0]
    assert static.accuracy.mean == pytest.approx(0.918) and static.accuracy.std == pytest.approx(0.003)
    ms = static.latency("ms_per_image")  # each seed's benchmark joined to its evaluation
    assert (ms.mean, ms.n) == (pytest.approx(0.92), 3) and ms.std == pytest.approx(0.02)
    exit1 = groups[1].points()[0]
    assert exit1.label == "exit 1" and exit1.accuracy.mean == pytest.approx(0.665)
    assert exit1.accuracy.std == pytest.approx(0.01 / 2 ** 0.5)
    budgets = groups[2].points()  # latency of each budget from the benchmark run at that budget
    assert [round(p.ms_per_image.mean, 6) for p in budgets] == [0.41, 0.71, 1.01]
    assert groups[2].accuracy is None and groups[3].latency("speedup").mean == 1.2


def test_markdown_tables_per_family_and_overall(runs):
    md = render_markdown(collect_groups([runs]), points=True)
    overall = table_rows(md, "## all runs")
    assert [r[:4] for r in overall] == [
        ["static", "resnet20_cifar", "cross_entropy", "standard"],
        ["early exit", "msdnet_cifar_anytime", "multi_exit", "anytime"],
        ["early exit", "msdnet_cifar_budgeted", "multi_exit", "budgeted"],
        ["block skipping", "blockdrop_resnet110_cifar", "blockdrop", "skip"],
        ["spatial", "sact_resnet110_cifar", "ponder_cost", "spatial"]]
    assert overall[0][4:] == ["91.80 ± 0.30", "40.55M", "40.55M", "0.920 ± 0.020", "–", "–", "–", "3"]
    assert overall[2][4:] == ["–", "–", "50.00M", "–", "–", "–", "3", "2"]
    assert overall[3][4:] == ["90.50", "190.00M ± 22.00M", "255.00M", "3.10", "1.20×", "0.89", "3", "1"]
    assert table_rows(md, "## block skipping") == [r[1:] for r in overall[3:4]]
    assert "ms / image measured on Test CPU (4 cores, cpu), batch 64, 2 threads, torch 2.3, ponder 0.1.0 at 0123456789." in md
    budgeted = table_rows(md, "### msdnet_cifar_budgeted · multi_exit · budgeted (2 seeds)")
    assert budgeted[0] == ["budget 15M", "budget 15.00M", "70.50 ± 0.71", "14.70M ± 5.00M", "0.410 ± 0.014"]


def test_latency_at_a_chosen_batch(runs):
    d = runs / "bd_s0"
    save_result(d, result(d.name, "blockdrop_resnet110_cifar", "skipping", "blockdrop", 0, "ddd", "bench-b1-t2", None,
                          188e6, 20e6, 255e6, latency=latency(9.0, 1.1, 1.35, batch=1)))
    by_batch = {b: collect_groups([d], batch=b)[0].latency("ms_per_image") for b in (1, 64, 8)}
    assert by_batch[1].mean == 9.0 and by_batch[64].mean == 3.1 and by_batch[8] is None


class _Balanced(HTMLParser):
    """Fails on an end tag that does not close the innermost open element (void elements aside)."""

    VOID = {"meta", "br", "hr", "img", "input", "link"}

    def __init__(self):
        super().__init__()
        self.stack = []

    def handle_starttag(self, tag, attrs):
        if tag not in self.VOID:
            self.stack.append(tag)

    def handle_startendtag(self, tag, attrs):
        pass

    def handle_endtag(self, tag):
        assert self.stack and self.stack[-1] == tag, f"</{tag}> closes <{self.stack[-1] if self.stack else None}>"
        self.stack.pop()


def test_html_page_is_well_formed_with_one_series_per_group(runs):
    groups = collect_groups([runs])
    page = render_html(groups)
    parser = _Balanced()
    parser.feed(page)
    parser.close()
    assert parser.stack == []
    assert "<script" not in page and "http://" not in page.replace('xmlns="http://www.w3.org/2000/svg"', "")
    svgs = [ET.fromstring(s) for s in re.findall(r"<svg .*?</svg>", page, re.S)]
    assert len(svgs) == 2
    ns = "{http://www.w3.org/2000/svg}"

    def series(svg):
        return [g.get("data-label") for g in svg.iter(ns + "g") if g.get("class") == "series"]

    assert series(svgs[0]) == [g.label for g in groups]  # accuracy vs MACs: every group
    assert series(svgs[1]) == [groups[0].label, groups[2].label, groups[3].label]  # the benchmarked ones
    curves = {g.get("data-label"): g.find(ns + "polyline") is not None for g in svgs[0].iter(ns + "g")
              if g.get("class") == "series"}
    assert curves == {groups[0].label: False, groups[1].label: True, groups[2].label: True, groups[3].label: True,
                      groups[4].label: False}
    static = next(g for g in svgs[1].iter(ns + "g") if g.get("data-label") == groups[0].label)
    assert len(list(static.iter(ns + "path"))) == 2  # error bars over the three seeds: accuracy and ms
    texts = [t.text for t in svgs[0].iter(ns + "text")]
    assert "top-1 accuracy (%)" in texts and any(t and t.startswith("mean MACs per image") for t in texts)


def test_x_axis_scale_choice(runs):
    groups = collect_groups([runs])
    auto, linear = render_html(groups), render_html(groups, x_scale="linear")
    assert "(conv+linear), log scale" in auto  # MACs from 10M to 255M: more than 20x
    assert "log scale" not in linear


def test_ticks():
    assert nice_ticks(0.0, 1.0) == [0.0, 0.2, 0.4, 0.6, 0.8, 1.0]
    assert nice_ticks(63.0, 94.0) == [65.0, 70.0, 75.0, 80.0, 85.0, 90.0]
    assert log_ticks(1e6, 1e9) == [1e6, 1e7, 1e8, 1e9]
    assert log_ticks(8e6, 3e8) == [1e7, 2e7, 5e7, 1e8, 2e8]


def test_long_legend_labels_wrap_after_their_separators():
    assert legend_lines("msdnet_cifar_budgeted · multi_exit · budgeted-target_macs_1.5e7_2.5e7") == [
        "msdnet_cifar_budgeted · multi_exit ·", "budgeted-target_macs_1.5e7_2.5e7"]
    assert legend_lines("resnet20_cifar · cross_entropy · standard") == ["resnet20_cifar · cross_entropy · standard"]
    cut = legend_lines("x" * 200)
    assert len(cut) == 3 and cut[-1].endswith("…") and all(len(line) <= 44 for line in cut)


def test_cli_prints_markdown_and_writes_the_report_files(runs, tmp_path, capsys):
    code, out, err = run_cli(capsys, "report", runs / "static" / "r20_s*", runs / "bd_s0", "--out", tmp_path / "rep")
    assert code == 0 and out == (tmp_path / "rep" / "report.md").read_text()
    assert f"wrote report.md, report.html, accuracy_vs_macs.svg, accuracy_vs_latency.svg in {tmp_path / 'rep'}" in err
    assert ET.parse(tmp_path / "rep" / "accuracy_vs_macs.svg").getroot().tag == "{http://www.w3.org/2000/svg}svg"
    assert "| static | resnet20_cifar |" in out and "blockdrop_resnet110_cifar" in out and "msdnet" not in out
    assert (tmp_path / "rep" / "report.html").read_text().startswith("<!DOCTYPE html>")


DOC = """# Results

Some prose that stays, and an example of a marker that is not a block:

```
<!-- ponder-report:all from=PATHS start -->
<!-- ponder-report:all end -->
```

<!-- ponder-report:all from=runs start -->
typed by hand
<!-- ponder-report:all end -->

Between the tables.

<!-- ponder-report:skipping start -->
<!-- ponder-report:skipping end -->
"""


def test_document_tables_are_regenerated_and_checked(runs, tmp_path, capsys):
    doc = tmp_path / "results.md"
    doc.write_text(DOC)
    code, _, err = run_cli(capsys, "report", runs, "--update-doc", doc, "--check")
    assert code == 2 and f"{doc} is out of date: block(s) all, skipping differ from the results" in err
    assert doc.read_text() == DOC  # check mode changes nothing
    code, _, err = run_cli(capsys, "report", runs, "--update-doc", doc)
    assert code == 0 and "regenerated all, skipping" in err
    text = doc.read_text()
    assert "Between the tables." in text and "typed by hand" not in text
    assert text.startswith(DOC[:DOC.index("typed by hand")])  # prose and the fenced example untouched
    assert "| static | resnet20_cifar | cross_entropy | standard | 91.80 ± 0.30 |" in text
    skipping = text.split("<!-- ponder-report:skipping start -->")[1]
    assert "| blockdrop_resnet110_cifar | blockdrop | skip | 90.50 |" in skipping and "resnet20" not in skipping
    assert run_cli(capsys, "report", runs, "--update-doc", doc, "--check")[0] == 0
    # a result changes: the document no longer matches
    path = runs / "bd_s0" / "results" / "skip.json"
    r = load_result(path)
    r.accuracy = 0.9
    save_result(runs / "bd_s0", r)
    code, _, err = run_cli(capsys, "report", runs, "--update-doc", doc, "--check")
    assert code == 2 and "block(s) all, skipping differ" in err
    # a block with from= needs no paths on the command line; one without needs them
    code, _, err = run_cli(capsys, "report", "--update-doc", doc, "--check")
    assert code == 2 and "block 'skipping' in" in err and "names no results" in err


@pytest.mark.parametrize("doc, message", [
    ("no markers here\n", "has no <!-- ponder-report:NAME start -->"),
    ("<!-- ponder-report:all start -->\n", "start marker without its matching"),
    ("<!-- ponder-report:best start -->\n<!-- ponder-report:best end -->\n", "unknown table 'best'"),
    ("<!-- ponder-report:all colour=red start -->\n<!-- ponder-report:all end -->\n", "unknown option 'colour'"),
])
def test_bad_document_markers_get_one_sentence(runs, tmp_path, capsys, doc, message):
    path = tmp_path / "doc.md"
    path.write_text(doc)
    code, _, err = run_cli(capsys, "report", runs, "--update-doc", path)
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1


def test_errors_are_one_sentence(runs, tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    cases = [
        (["report", tmp_path / "empty"], "no result files under"),
        (["report", tmp_path / "missing"], "does not exist"),
        (["report", tmp_path / "nothing*"], "matches no file or directory"),
        (["report", runs, "--check"], "--check compares documents: give --update-doc"),
    ]
    newer = json.loads((runs / "sact_s0" / "results" / "spatial.json").read_text())
    newer["schema"] = 2
    (runs / "sact_s0" / "results" / "spatial.json").write_text(json.dumps(newer))
    cases.append((["report", runs], "has schema 2, newer than this ponder reads (schema 1); upgrade ponder"))
    for argv, message in cases:
        code, out, err = run_cli(capsys, *argv)
        assert code == 2 and message in err and len(err.strip().splitlines()) == 1, (argv, err)


def test_a_copied_run_is_not_another_seed(runs, tmp_path, capsys):
    import shutil

    shutil.copytree(runs / "bd_s0", tmp_path / "copy_of_bd_s0")
    code, _, err = run_cli(capsys, "report", runs / "bd_s0", tmp_path / "copy_of_bd_s0")
    assert code == 2 and "a copy is not another seed" in err


def test_the_tables_of_docs_reports_md_are_generated_from_its_example_results(capsys):
    from pathlib import Path

    doc = Path(__file__).resolve().parent.parent / "docs" / "reports.md"
    code, _, err = run_cli(capsys, "report", "--update-doc", doc, "--check")
    assert code == 0, err


def test_gate_open_rates_per_layer_are_a_table_of_means_over_seeds(tmp_path, capsys):
    root = tmp_path / "runs"
    for s, usage in enumerate([[1.0, 0.5, 0.25], [1.0, 0.7, 0.35]]):
        d = root / f"aig_s{s}"
        r = result(d.name, "aig_resnet32_cifar", "skipping", "aig", s, "fff", "skip", 0.5, 40e6, 5e6, 69e6)
        r.block_usage = usage
        save_result(d, r)
    assert load_result(root / "aig_s1" / "results" / "skip.json").block_usage == [1.0, 0.7, 0.35]  # round trip
    save_result(root / "r20", result("r20", "resnet20_cifar", "static", "cross_entropy", 0, "aaa", "standard",
                                     0.9, 40e6, 0.0, 40e6))  # no gates: no row
    doc = tmp_path / "gates.md"
    doc.write_text("<!-- ponder-report:gates start -->\n<!-- ponder-report:gates end -->\n")
    code, _, err = run_cli(capsys, "report", root, "--update-doc", doc)
    assert code == 0, err
    rows = [line for line in doc.read_text().splitlines() if line.startswith("| aig")]
    assert rows == ["| aig_resnet32_cifar | aig | skip | 63.3 | 100 60 30 | 2 |"]  # (1 + 0.6 + 0.3) / 3


def test_accuracy_at_matched_macs_is_one_row_per_group_and_one_column_pair_per_budget(runs, tmp_path, capsys):
    for s, acc in enumerate([0.50, 0.60]):
        d = runs / f"aig_b_s{s}"
        points = [OperatingPoint("budget 35M", 34e6, acc, 2e6, "threshold", 0.6, budget=35e6),
                  OperatingPoint("budget 50M", 49e6, acc + 0.1, 3e6, "threshold", 0.4, budget=50e6)]
        save_result(d, result(d.name, "aig_resnet32_cifar", "skipping", "aig", s, "ggg", "budget", None, None, None,
                              69e6, points))
    doc = tmp_path / "budgets.md"
    doc.write_text("<!-- ponder-report:budgets start -->\n<!-- ponder-report:budgets end -->\n")
    code, _, err = run_cli(capsys, "report", runs, "--update-doc", doc)
    assert code == 0, err
    lines = doc.read_text().splitlines()
    assert lines[2].startswith("| model | method | evaluation | top-1 (%) at 15.00M | MACs at 15.00M |")  # every budget
    row = next(line for line in lines if line.startswith("| aig_resnet32_cifar"))
    assert row == ("| aig_resnet32_cifar | aig | budget | – | – | – | – | 55.00 ± 7.07 | 34.00M ± 2.00M "
                   "| 65.00 ± 7.07 | 49.00M ± 3.00M | 2 |")
