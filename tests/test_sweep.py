"""Recipe sweeps (`ponder sweep`): the plan of a grid over seeds, one command that trains, evaluates and
reports every run, a second call that trains nothing again, and report labels that name the grid's values."""

from __future__ import annotations

import pytest
import yaml

from cifar_fixtures import write_fake_cifar
from ponder.cli import main
from ponder.config import ConfigError
from ponder.engine.sweep import plan_sweep, point_name, run_sweep
from ponder.report.collect import differing_settings


def test_plan_is_the_product_of_the_axes_times_the_seeds(tmp_path):
    runs = plan_sweep(["method.kwargs.alpha=0.6,0.8", "method.kwargs.gamma=1e-5,1e-4,1e-3"], 2, tmp_path)
    assert len(runs) == 2 * 3 * 2
    first = runs[0]
    assert first.point == "alpha0.6_gamma1e-5" and first.seed == 0
    assert first.overrides == ("method.kwargs.alpha=0.6", "method.kwargs.gamma=1e-5", "train.seed=0")
    assert first.run_dir == tmp_path / "alpha0.6_gamma1e-5" / "s0"
    assert [r.seed for r in runs[:2]] == [0, 1] and runs[2].point == "alpha0.6_gamma1e-4"
    assert point_name([]) == "default" and len(plan_sweep([], 3, tmp_path)) == 3


def test_one_axis_at_a_time_keeps_the_others_at_the_recipe():
    grid = ["method.kwargs.alpha=0.6,0.8,1.0,1.2", "method.kwargs.beta=0.1,0.3,0.5,0.7",
            "method.kwargs.gamma=1e-5,1e-4,1e-3,1e-2"]
    runs = plan_sweep(grid, 5, "out", vary="one")
    assert len(runs) == 12 * 5 and runs[0].overrides == ("method.kwargs.alpha=0.6", "train.seed=0")
    assert sorted({r.point for r in runs})[:2] == ["alpha0.6", "alpha0.8"]


@pytest.mark.parametrize("grid, seeds, message", [
    (["optim.lr"], 1, "must look like"),
    (["optim.lr=0.1,0.1"], 1, "repeats a value"),
    (["optim.lr=0.1", "optim.lr=0.2"], 1, "given twice"),
    (["train.seed=1,2"], 1, "--seeds"),
    (["optim.lr=0.1"], 0, "1 or more"),
])
def test_bad_grids_are_refused_with_one_sentence(grid, seeds, message, tmp_path):
    with pytest.raises(ConfigError, match=message):
        plan_sweep(grid, seeds, tmp_path)


def test_differing_settings_name_what_sets_groups_apart():
    a = {"method.kwargs.alpha": 0.6, "optim.lr": 0.1, "train.seed": 0}
    b = {"method.kwargs.alpha": 0.8, "optim.lr": 0.1, "train.seed": 1}
    assert differing_settings([a, b]) == ["method.alpha=0.6", "method.alpha=0.8"]
    assert differing_settings([a, None]) == ["", ""]


def test_one_command_trains_evaluates_and_reports_every_run(tmp_path, capsys):
    data = write_fake_cifar(tmp_path / "data", "cifar10", n_train=16, n_test=8, seed=0)
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump({
        "model": {"name": "resnet20_cifar"},
        "data": {"dataset": "cifar10", "data_dir": str(data), "batch_size": 8, "eval_batch_size": 8},
        "train": {"epochs": 1, "device": "cpu"},
    }))
    out = tmp_path / "sweep"
    code = main(["sweep", str(recipe), "--grid", "optim.lr=0.1,0.05", "--seeds", "2", "--out", str(out)])
    stdout, stderr = capsys.readouterr()
    assert code == 0, stderr
    for point in ("lr0.1", "lr0.05"):
        for seed in (0, 1):
            assert (out / point / f"s{seed}" / "results" / "standard.json").is_file()
    assert "optim.lr=0.1" in stdout and "optim.lr=0.05" in stdout  # the groups are told apart by their setting
    assert (out / "report.md").is_file() and (out / "report.html").is_file()
    logged = []
    run_sweep(recipe, ["optim.lr=0.1,0.05"], 2, out, log=logged.append)  # again: nothing to do
    assert all(line.endswith(": trained") for line in logged) and len(logged) == 4


def test_dry_run_prints_the_plan(tmp_path, capsys):
    code = main(["sweep", "recipe.yaml", "--grid", "method.kwargs.beta=0.1,0.3", "--seeds", "5",
                 "--out", str(tmp_path), "--dry-run"])
    plan = yaml.safe_load(capsys.readouterr().out)
    assert code == 0 and list(plan) == ["beta0.1", "beta0.3"] and len(plan["beta0.3"]["runs"]) == 5
