"""Every CLI command with malformed input: a non-zero exit, one line on stderr, no traceback, and no
half-written run directory left behind."""

from __future__ import annotations

import pytest

from ponder.cli import main


@pytest.fixture
def recipe(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("model: {name: resnet20_cifar}\ndata: {dataset: digits, batch_size: 32}\ntrain: {epochs: 1}\n")
    return path


def _bad(tmp_path):
    garbage = tmp_path / "garbage.bin"
    garbage.write_bytes(b"\x00\x01 not a checkpoint")
    not_a_run = tmp_path / "not_a_run"
    not_a_run.mkdir(exist_ok=True)
    return garbage, not_a_run


CASES = {
    "models: unknown pattern": lambda t, r: ["models", "nothing*"],
    "flops: unknown model": lambda t, r: ["flops", "resnet99"],
    "flops: wrong channel count": lambda t, r: ["flops", "resnet20_cifar", "--input-size", "1", "32", "32"],
    "flops: bad model option": lambda t, r: ["flops", "resnet20_cifar", "--model-arg", "bogus=1"],
    "flops: negative classes": lambda t, r: ["flops", "resnet20_cifar", "--num-classes", "-3"],
    "flops: zero classes": lambda t, r: ["flops", "resnet20_cifar", "--num-classes", "0"],
    "bench: batch 0": lambda t, r: ["bench", "resnet20_cifar", "--batch", "0"],
    "bench: negative batch": lambda t, r: ["bench", "resnet20_cifar", "--batch", "-4"],
    "bench: keep rate on a static model": lambda t, r: ["bench", "resnet20_cifar", "--keep-rate", "0.5"],
    "bench: keep rate out of range": lambda t, r: ["bench", "blockdrop_resnet32_cifar", "--keep-rate", "1.5"],
    "bench: budget without a run": lambda t, r: ["bench", "msdnet_cifar_budgeted", "--budget", "2e7"],
    "bench: knob out of range": lambda t, r: ["bench", "skipnet_resnet38_cifar", "--knob", "7"],
    "bench: not a run directory": lambda t, r: ["bench", "--checkpoint", str(_bad(t)[1])],
    "train: missing recipe": lambda t, r: ["train", str(t / "none.yaml"), "--out", str(t / "run")],
    "train: lr not a number": lambda t, r: ["train", str(r), "--out", str(t / "run"), "--set", "optim.lr=abc"],
    "train: unknown model option": lambda t, r: ["train", str(r), "--out", str(t / "run"),
                                                 "--set", "model.kwargs.bogus=1"],
    "train: unknown field": lambda t, r: ["train", str(r), "--out", str(t / "run"), "--set", "optim.bogus=1"],
    "train: negative epochs": lambda t, r: ["train", str(r), "--out", str(t / "run"), "--set", "train.epochs=-1"],
    "train: resume nothing": lambda t, r: ["train", "--resume", str(_bad(t)[1])],
    "eval: not a run directory": lambda t, r: ["eval", str(_bad(t)[1])],
    "eval: unknown protocol": lambda t, r: ["eval", str(_bad(t)[1]), "--protocol", "nope"],
    "report: no results": lambda t, r: ["report", str(_bad(t)[1])],
    "convert: not a checkpoint": lambda t, r: ["convert", str(_bad(t)[0]), "--to", str(t / "run")],
    "convert: missing file": lambda t, r: ["convert", str(t / "none.pth"), "--to", str(t / "run")],
    "ponder-map: not a run": lambda t, r: ["ponder-map", str(_bad(t)[1]), str(_bad(t)[0])],
    "kernels: unknown action": lambda t, r: ["kernels", "explode"],
    "eval: unknown option": lambda t, r: ["eval", str(t), "--bogus"],
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_malformed_input_gets_one_sentence(case, tmp_path, recipe, capsys):
    argv = CASES[case](tmp_path, recipe)
    try:
        code = main(argv)
    except SystemExit as e:  # argparse's own errors (usage line + one error line)
        code = e.code
    err = capsys.readouterr().err.strip().splitlines()
    assert code not in (0, None), f"{case}: exit status {code}"
    assert "Traceback" not in "\n".join(err), f"{case}: {err}"
    message = [line for line in err if not line.startswith("usage:") and not line.startswith("  ")]
    assert len(message) == 1, f"{case}: {err}"
    assert not (tmp_path / "run").exists() or not any((tmp_path / "run").iterdir()), f"{case}: left a run directory"
