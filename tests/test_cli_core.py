"""The `ponder` command: models, flops, bench, and clear errors for bad input."""

import json
import subprocess
import sys

import pytest

from ponder.cli import main


def run_cli(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_flops_json_is_one_object_with_integer_counts(capsys):
    code, out, _ = run_cli(capsys, "flops", "resnet20_cifar", "--num-classes", "100", "--json")
    assert code == 0
    d = json.loads(out)
    assert d["params"] == 269_722 + 64 * 90 + 90  # 90 more classes in the FC
    assert d["macs"] == 40_551_040 + 64 * 90
    assert all(isinstance(b["macs"], int) for b in d["blocks"])


def test_flops_text_labels_units(capsys):
    code, out, _ = run_cli(capsys, "flops", "resnet32_cifar")
    assert code == 0 and "MACs" in out and "FLOPs = 2 x MACs" in out and "68,862,592" in out


def test_flops_other_input_size(capsys):
    code, out, _ = run_cli(capsys, "flops", "resnet18", "--input-size", "3", "112", "112", "--json")
    assert code == 0 and json.loads(out)["input_size"] == [3, 112, 112]


def test_models_lists_names_params_and_macs(capsys):
    code, out, _ = run_cli(capsys, "models", "resnet*_cifar", "--json")
    rows = {r["name"]: r for r in json.loads(out)}
    assert code == 0 and rows["resnet20_cifar"]["macs"] == 40_551_040


@pytest.mark.parametrize("argv,msg", [
    (["flops", "resnet99"], "unknown model 'resnet99'"),
    (["flops", "resnet20_cifar", "--input-size", "1", "32", "32"], "takes 3-channel input"),
    (["models", "nothing*"], "no model matches"),
    (["bench", "resnet20_cifar", "--keep-rate", "0.5"], "static model"),
    (["train", "does/not/exist.yaml", "--out", "x"], "recipe file does/not/exist.yaml does not exist"),
])
def test_bad_input_gets_one_sentence_and_nonzero_exit(capsys, argv, msg):
    code, _, err = run_cli(capsys, *argv)
    assert code == 2
    assert msg in err and "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_bench_static_json_fields(capsys):
    code, out, _ = run_cli(capsys, "bench", "resnet20_cifar", "--batch", "2", "--images", "2",
                           "--repeats", "2", "--warmup", "1", "--threads", "1", "--json")
    d = json.loads(out)
    assert code == 0 and d["ms"] > 0 and d["macs"] == 40_551_040 and d["batch"] == 2


def test_console_script_entry_point():
    out = subprocess.run([sys.executable, "-m", "ponder.cli", "--version"], capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.startswith("ponder ")
