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
    code, out, _ = run_cli(capsys, "models", "resnet*_cifar", "--json", "--macs")
    rows = {r["name"]: r for r in json.loads(out)}
    assert code == 0 and rows["resnet20_cifar"]["macs"] == 40_551_040 and rows["resnet20_cifar"]["family"] == "static"
    code, out, _ = run_cli(capsys, "models", "*")  # instant: nothing built, every model with its family and paper
    assert code == 0 and "skipnet_resnet110_cifar" in out and "skipping" in out and "Wang et al., ECCV 2018" in out


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


def test_bench_checkpoint_budget_is_fitted_on_the_held_out_split(capsys, tmp_path):
    from cifar_fixtures import write_fake_cifar

    from ponder.config import load_config
    from ponder.engine import train

    data = write_fake_cifar(tmp_path / "data", "cifar10", n_train=48, n_test=16, seed=0)
    recipe = tmp_path / "tiny.yaml"
    recipe.write_text(
        "model: {name: msdnet_cifar_budgeted, kwargs: {n_blocks: 3, n_channels: 8, growth_rate: 4, head_width: 16}}\n"
        f"data: {{dataset: cifar10, data_dir: {data}, val_size: 16, batch_size: 16, eval_batch_size: 16}}\n"
        "method: {name: multi_exit}\ntrain: {epochs: 1, device: cpu}\n")
    run = train(load_config(recipe), tmp_path / "run", verbose=False)
    argv = ["bench", "--checkpoint", str(run), "--budget", "3e6", "--batch", "4", "--images", "8",
            "--repeats", "3", "--warmup", "1", "--threads", "1", "--json"]
    code, out, _ = run_cli(capsys, *argv)
    d = json.loads(out)
    assert code == 0 and d["mode"].startswith("checkpoint, budget 3e+06 MACs (held-out mean") and d["batch"] == 4
    assert d["dense_macs"] > d["dynamic_macs"] > 0 and d["efficiency"] == pytest.approx(d["speedup"] / d["mac_ratio"])
    lo, hi = d["speedup_range"]  # the ratio of the medians lies between the extreme single-round ratios
    assert 0 < lo <= d["speedup"] <= hi
    code, _, err = run_cli(capsys, "bench", "msdnet_cifar_budgeted", "--budget", "3e6")
    assert code == 2 and "--checkpoint" in err  # an untrained model has no held-out split


