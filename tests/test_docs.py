"""The docs check: every `ponder` command shown in README.md and docs/*.md parses with the CLI as it is
(its subcommand and options exist), names registered models and recipes that load and pass the run
checks; the README's generated tables equal what their generators print; and the README's tour runs
for real, command by command, on the offline digits."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

from ponder.cli import build_parser, main

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def _commands(path: Path) -> list[str]:
    """``ponder ...`` command lines inside fenced code blocks: in a block with ``$`` prompts only the prompted
    lines (the rest is output), elsewhere every line starting with ``ponder ``; continuation lines joined,
    trailing comments cut, usage synopses (``[--opt]``, ``...``) and lines using shell variables skipped."""
    found: list[str] = []
    for block in re.findall(r"^```[^\n]*\n(.*?)^```", path.read_text(), flags=re.S | re.M):
        lines = block.replace("\\\n", " ").splitlines()
        prompted = any(line.startswith("$ ") for line in lines)
        for line in lines:
            text = line.strip()
            if prompted:
                if not text.startswith("$ "):
                    continue
                text = text[2:]
            if not text.startswith("ponder ") or re.match(r"ponder [\w-]+:", text):
                continue
            text = text.split("  #")[0].split(" # ")[0].strip()
            if "[--" in text or "..." in text or "$" in text or "<" in text:
                continue
            found.append(text)
    return found


COMMANDS = [(p.relative_to(ROOT).as_posix(), c) for p in DOCS for c in _commands(p)]


def test_the_docs_show_commands_at_all():
    assert len(COMMANDS) > 40 and any(p == "README.md" for p, _ in COMMANDS)


@pytest.mark.parametrize("where,command", COMMANDS, ids=[f"{p}:{c[:60]}" for p, c in COMMANDS])
def test_every_documented_command_parses_and_names_what_exists(where, command, monkeypatch):
    from ponder.config import load_config
    from ponder.engine.sweep import read_sweep_file
    from ponder.registry import list_models

    argv = shlex.split(command)[1:]
    argv = [a for a in argv if a not in ("\\",)]
    parser = build_parser()
    args, unknown = parser.parse_known_args(argv)
    assert not unknown, f"{where}: `{command}` has options ponder does not know: {unknown}"
    name = getattr(args, "name", None)
    if name and name.isidentifier() and args.command in ("flops", "bench"):
        assert name in list_models(), f"{where}: `{command}` names an unknown model"
    recipe = getattr(args, "recipe", None) or getattr(args, "spec", None)
    if recipe and recipe.startswith("recipes/"):  # a shipped recipe or sweep file (others are the reader's own)
        assert (ROOT / recipe).is_file(), f"{where}: `{command}` names a missing recipe"
        monkeypatch.chdir(ROOT)  # a sweep file's recipes are read from the repository root
        if read_sweep_file(ROOT / recipe) is None:  # (checked when it is a sweep file)
            load_config(ROOT / recipe)


def _block(text: str, name: str) -> str:
    m = re.search(rf"<!-- {name} start -->\n(.*?)<!-- {name} end -->", text, flags=re.S)
    assert m, f"README.md has no {name} block"
    return m.group(1).strip()


def test_the_readme_model_table_is_the_registry(capsys):
    readme = (ROOT / "README.md").read_text()
    assert main(["models", "--markdown"]) == 0
    assert _block(readme, "ponder-models") == capsys.readouterr().out.strip(), \
        "README's model table differs from `ponder models --markdown`: paste its output between the markers"


def test_the_readme_result_tables_are_generated_from_the_results(capsys):
    code = main(["report", "--update-doc", str(ROOT / "README.md"), "--check"])
    assert code == 0, capsys.readouterr().err


def test_the_readme_tour_runs(tmp_path, monkeypatch, capsys):
    """The tour's commands, in order, shortened (one epoch, few bench rounds)."""
    monkeypatch.chdir(tmp_path)
    recipe = str(ROOT / "recipes/demo/msdnet_digits.yaml")
    steps = [
        ["models"],
        ["flops", "msdnet_cifar_budgeted"],
        ["train", recipe, "--out", "runs/tour/msdnet", "--set", "train.epochs=1"],
        ["eval", "runs/tour/msdnet"],
        ["eval", "runs/tour/msdnet", "--protocol", "budget", "--option", "fractions=[0.3,0.5,0.7,1.0]"],
        ["bench", "--checkpoint", "runs/tour/msdnet", "--budget", "4.4e6", "--save", "--images", "64",
         "--repeats", "2", "--warmup", "1"],
        ["bench", "sact_resnet32_cifar", "--keep-rate", "0.5", "--batch", "8", "--images", "8", "--repeats", "2",
         "--warmup", "1"],
        ["report", "runs/tour", "--out", "runs/report"],
    ]
    for argv in steps:
        assert main(argv) == 0, f"ponder {' '.join(argv)}: {capsys.readouterr().err}"
    out = capsys.readouterr().out
    assert "efficiency" in out and (tmp_path / "runs/report/report.html").is_file()
    assert (tmp_path / "runs/tour/msdnet/results/budget-fractions_0.3_0.5_0.7_1.0.json").is_file()
