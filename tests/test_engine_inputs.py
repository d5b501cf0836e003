"""Recipes and options are checked before anything runs; run directories are never left unusable."""

import os
import re
import stat
from pathlib import Path

import pytest
import torch
import yaml

from cifar_fixtures import write_fake_cifar
from ponder.cli import main
from ponder.config import ConfigError, config_from_dict, load_config
from ponder.engine import RunDirError, Trainer, train
from ponder.engine.checkpoint import read_metrics, read_weights


@pytest.fixture(scope="module")
def cifar_dir(tmp_path_factory):
    return write_fake_cifar(tmp_path_factory.mktemp("data"), "cifar10", n_train=20, n_test=10, seed=0)


def recipe(tmp_path, cifar_dir, **sections):
    base = {
        "model": {"name": "resnet20_cifar"},
        "data": {"dataset": "cifar10", "data_dir": str(cifar_dir), "batch_size": 10, "eval_batch_size": 10},
        "optim": {"lr": 0.05},
        "train": {"epochs": 1, "seed": 0, "device": "cpu"},
    }
    for k, v in sections.items():
        base[k] = {**base.get(k, {}), **v}
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(base))
    return path


def one_error_line(capsys):
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "Traceback" not in err[0], err
    return err[0]


# ---------------------------------------------------------------- recipes and options


@pytest.mark.parametrize("text", ["1e6", "1.0e6", "1E+6"])
def test_yaml_1_1_exponent_strings_are_numbers(tmp_path, text):
    path = tmp_path / "r.yaml"
    path.write_text(f"optim:\n  lr: {text}\n")
    assert yaml.safe_load(text) == text  # YAML 1.1 reads these as strings
    assert load_config(path).optim.lr == 1e6
    assert load_config(path, [f"optim.weight_decay={text}"]).optim.weight_decay == 1e6


@pytest.mark.parametrize("override, message", [
    ("optim.lr=abc", "optim.lr must be a number .got 'abc'."),
    ("optim.lr=-0.1", r"optim.lr must be a finite number >= 0 .got -0.1."),
    ("optim.lr=.nan", r"optim.lr must be a finite number >= 0 .got nan."),
    ("optim.momentum=1.5", r"optim.momentum must be in \[0, 1\) .got 1.5."),
    ("optim.betas=[0.9]", r"optim.betas must be a list of 2 values"),
    ("optim.name=lamb", "optim.name must be one of sgd, adam, adamw .got 'lamb'."),
    ("data.batch_size=0", "data.batch_size must be a positive integer .got 0."),
    ("data.batch_size=2.5", "data.batch_size must be an integer .got 2.5."),
    ("data.workers=-1", "data.workers must be 0 or more .got -1."),
    ("data.dataset=mnist", "data.dataset must be one of cifar10, cifar100, imagefolder, digits"),
    ("data.augment=maybe", "data.augment must be true or false .got 'maybe'."),
    ("train.epochs=0", "train.epochs must be a positive integer .got 0."),
    ("train.device=gpu", "train.device must be auto, cpu, cuda or cuda:N .got 'gpu'."),
    ("schedule.milestones=[-1]", "schedule.milestones must be numbers >= 0"),
    ("schedule.name=step", "schedule.name must be one of multistep, cosine, constant"),
    ("model.kwargs=3", "model.kwargs must be a mapping of options .got 3."),
])
def test_bad_fields_are_one_sentence(tmp_path, override, message):
    path = tmp_path / "r.yaml"
    path.write_text("optim:\n  lr: 0.1\n")
    with pytest.raises(ConfigError, match=message):
        load_config(path, [override])


@pytest.mark.parametrize("override, message", [
    ("model.kwargs.bogus=1", r"model.kwargs do not fit model 'resnet20_cifar' \(.*'bogus'\)"),
    ("model.name=resnet21_cifar", "unknown model 'resnet21_cifar'"),
    ("method.kwargs.bogus=1", "method.kwargs has unknown option 'bogus'; valid options: label_smoothing"),
    ("method.kwargs.label_smoothing=abc", "method.kwargs.label_smoothing must be a number .got 'abc'."),
    ("method.name=nope", "unknown method 'nope'"),
    ("optim.lr=abc", "optim.lr must be a number"),
])
def test_cli_train_refuses_before_creating_the_run_dir(tmp_path, cifar_dir, capsys, override, message):
    out = tmp_path / "run"
    assert main(["train", str(recipe(tmp_path, cifar_dir)), "--out", str(out), "--set", override]) == 2
    assert re.search(message, one_error_line(capsys))
    assert not out.exists()  # no config.yaml, no directory


def test_method_options_are_coerced_before_the_run(tmp_path, cifar_dir):
    path = recipe(tmp_path, cifar_dir, method={"name": "cross_entropy", "kwargs": {"label_smoothing": "1e-1"}},
                  train={"max_steps_per_epoch": 1})
    run = train(load_config(path), tmp_path / "run", verbose=False)
    saved = yaml.safe_load((run / "config.yaml").read_text())
    assert saved["method"]["kwargs"]["label_smoothing"] == 0.1 and saved["optim"]["lr"] == 0.05


@pytest.mark.parametrize("argv, message", [
    (["bench", "resnet20_cifar", "--batch", "0"], "--batch must be a positive integer, got 0"),
    (["bench", "resnet20_cifar", "--batch", "-4"], "--batch must be a positive integer, got -4"),
    (["bench", "resnet20_cifar", "--num-classes", "-3"], "--num-classes must be a positive integer, got -3"),
    (["bench", "resnet20_cifar", "--num-classes", "0"], "--num-classes must be a positive integer, got 0"),
    (["bench", "resnet20_cifar", "--repeats", "0"], "--repeats must be a positive integer, got 0"),
    (["bench", "resnet20_cifar", "--warmup", "-1"], "--warmup must be an integer >= 0, got -1"),
    (["flops", "resnet20_cifar", "--num-classes", "0"], "--num-classes must be a positive integer, got 0"),
])
def test_bench_and_flops_counts(capsys, argv, message):
    assert main(argv) == 2
    assert one_error_line(capsys) == f"ponder {argv[0]}: error: {message}"


# ---------------------------------------------------------------- run directories


class CrashBeforeCheckpoint(Exception):
    pass


def test_crash_before_the_first_checkpoint_leaves_a_way_forward(tmp_path, cifar_dir, monkeypatch, capsys):
    path = recipe(tmp_path, cifar_dir)
    run = tmp_path / "run"

    def crash(self):
        raise CrashBeforeCheckpoint

    with monkeypatch.context() as m:  # killed after the first metrics line, before the first checkpoint
        m.setattr(Trainer, "save_checkpoint", crash)
        with pytest.raises(CrashBeforeCheckpoint):
            train(load_config(path), run, verbose=False)
    assert [r["epoch"] for r in read_metrics(run)] == [1] and not (run / "state.pt").exists()

    with pytest.raises(RunDirError, match=rf"cannot resume {run}: it has no state.pt .*start it again from scratch "
                                          rf"with: ponder train {run / 'config.yaml'} --out {run} --overwrite"):
        train(None, None, resume=run, verbose=False)
    with pytest.raises(RunDirError, match="already holds a training run .metrics.jsonl.; it has no finished epoch to "
                                          "resume; pass --overwrite to start it again from scratch"):
        train(load_config(path), run, verbose=False)

    # the way forward the message gives works, from the run's own config
    (run / ".state.pt.x1y2z3.tmp").write_bytes(b"half a state")  # and a kill mid-write had left this
    assert main(["train", str(run / "config.yaml"), "--out", str(run), "--overwrite"]) == 0
    assert [r["epoch"] for r in read_metrics(run)] == [1]
    assert not list(run.glob(".*.tmp"))
    fresh = train(load_config(path), tmp_path / "fresh", verbose=False)
    a, b = read_weights(run / "weights.safetensors"), read_weights(fresh / "weights.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_resume_removes_stale_temporaries(tmp_path, cifar_dir):
    run = train(config_from_dict(yaml.safe_load(recipe(tmp_path, cifar_dir).read_text())), tmp_path / "run",
                verbose=False)
    stale = [run / ".state.pt.abc123.tmp", run / ".weights.safetensors.q9.tmp", run / ".metrics.jsonl.zz.tmp"]
    for p in stale:
        p.write_bytes(b"x")
    (run / ".keep.tmp").write_bytes(b"not ours")
    train(None, None, resume=run, verbose=False)
    assert not any(p.exists() for p in stale) and (run / ".keep.tmp").exists()


def test_files_of_a_run_share_one_mode(tmp_path, cifar_dir):
    old = os.umask(0o022)
    try:
        run = train(load_config(recipe(tmp_path, cifar_dir)), tmp_path / "run", verbose=False)
    finally:
        os.umask(old)
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in run.iterdir() if p.is_file()}
    assert set(modes) == {"config.yaml", "metrics.jsonl", "weights.safetensors", "state.pt"}
    assert set(modes.values()) == {0o644}, modes


@pytest.mark.parametrize("path", sorted(str(p) for p in (Path(__file__).parents[1] / "recipes").rglob("*.yaml")
                                         if p.parent.name != "sweeps"))  # sweep files: tests/test_sweep.py
def test_every_shipped_recipe_passes_the_checks(path):
    from ponder.engine import check_run_config

    check_run_config(load_config(path))
