"""Sweeps (`ponder sweep`): the plan of a recipe's grid over seeds and of a sweep file's ordered runs, one
command that trains, evaluates and reports every run, a second call that trains nothing again, and report
labels that name the grid's values."""

from __future__ import annotations

import pytest
import yaml

from cifar_fixtures import write_fake_cifar
from ponder.cli import main
from ponder.config import ConfigError
from pathlib import Path

import torch

from ponder.engine.sweep import (fill, finished, load_sweep_file, plan_file, plan_grid, point_name, read_sweep_file,
                                 run_sweep)
from ponder.report.collect import differing_settings
from ponder.weights import RunDirError


def test_plan_is_the_product_of_the_axes_times_the_seeds(tmp_path):
    runs = plan_grid("r.yaml", ["method.kwargs.alpha=0.6,0.8", "method.kwargs.gamma=1e-5,1e-4,1e-3"], 2, tmp_path)
    assert len(runs) == 2 * 3 * 2
    first = runs[0]
    assert first.point == "alpha0.6_gamma1e-5" and first.seed == 0
    assert first.overrides == ("method.kwargs.alpha=0.6", "method.kwargs.gamma=1e-5", "train.seed=0")
    assert first.run_dir == tmp_path / "alpha0.6_gamma1e-5" / "s0"
    assert [r.seed for r in runs[:2]] == [0, 1] and runs[2].point == "alpha0.6_gamma1e-4"
    assert point_name([]) == "default" and len(plan_grid("r.yaml", [], 3, tmp_path)) == 3


def test_one_axis_at_a_time_keeps_the_others_at_the_recipe():
    grid = ["method.kwargs.alpha=0.6,0.8,1.0,1.2", "method.kwargs.beta=0.1,0.3,0.5,0.7",
            "method.kwargs.gamma=1e-5,1e-4,1e-3,1e-2"]
    runs = plan_grid("r.yaml", grid, 5, "out", vary="one", sets=["optim.lr=0.2"])
    assert len(runs) == 12 * 5 and runs[0].overrides == ("optim.lr=0.2", "method.kwargs.alpha=0.6", "train.seed=0")
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
        plan_grid("r.yaml", grid, seeds, tmp_path)


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
    run_sweep(plan_grid(recipe, ["optim.lr=0.1,0.05"], 2, out), log=logged.append)  # again: nothing to do
    assert all(line.endswith(": trained") for line in logged) and len(logged) == 4


def test_dry_run_prints_the_plan(tmp_path, capsys):
    code = main(["sweep", "recipe.yaml", "--grid", "method.kwargs.beta=0.1,0.3", "--seeds", "5",
                 "--out", str(tmp_path), "--dry-run"])
    plan = yaml.safe_load(capsys.readouterr().out)
    assert code == 0 and list(plan) == ["beta0.1", "beta0.3"] and len(plan["beta0.3"]["runs"]) == 5


# sweep files --------------------------------------------------------------------------------------------
REPO = Path(__file__).parents[1]


def _sweep_file(tmp_path, runs, seeds=(0, 1)):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("model: {name: resnet20_cifar}\ntrain: {epochs: 3}\n")
    for run in runs:
        run.setdefault("recipe", str(recipe))
    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump({"root": str(tmp_path / "runs"), "seeds": list(seeds), "runs": runs}, sort_keys=False))
    return load_sweep_file(path)


def test_sweep_file_runs_seed_by_seed_in_order_with_grid_points_and_filled_overrides(tmp_path):
    spec = _sweep_file(tmp_path, [
        {"name": "base"},
        {"name": "dc-b{model.kwargs.budget}", "grid": {"model.kwargs.budget": [0.3, 0.7]},
         "set": {"train.init_from": "{root}/base/s{seed}", "method.kwargs.teacher": ["{root}/a{seed}", "x"]},
         "eval": [{"protocol": "spatial", "options": {"knob": 0.3}}]}])
    runs = plan_file(spec)
    assert [(r.point, r.seed) for r in runs] == [("base", 0), ("dc-b0.3", 0), ("dc-b0.7", 0),
                                                 ("base", 1), ("dc-b0.3", 1), ("dc-b0.7", 1)]
    root = tmp_path / "runs"
    assert runs[5].run_dir == root / "dc-b0.7" / "s1"
    assert runs[5].overrides == ("model.kwargs.budget=0.7", f"train.init_from={root}/base/s1",
                                 f"method.kwargs.teacher=[{root}/a1, x]", "train.seed=1")
    assert runs[5].evals == (("spatial", (("knob", 0.3),)),)
    assert [r.point for r in plan_file(spec, only="dc-*")][:2] == ["dc-b0.3", "dc-b0.7"]


def test_fill_names_the_unknown_field():
    assert fill(["{a}/x", 3], {"a": 1}) == ["1/x", 3]
    with pytest.raises(ConfigError, match="grid key"):
        fill("{nope}", {"root": "r", "seed": 0})


def test_bad_sweep_files_are_refused(tmp_path):
    (tmp_path / "s.yaml").write_text("runs: [{name: a, recipe: missing.yaml}]\n")
    with pytest.raises(ConfigError, match="does not exist"):
        load_sweep_file(tmp_path / "s.yaml")
    (tmp_path / "s.yaml").write_text("seeds: [0]\n")
    with pytest.raises(ConfigError, match="list of runs"):
        load_sweep_file(tmp_path / "s.yaml")


def test_a_sweep_file_refuses_recipe_options(tmp_path, capsys):
    _sweep_file(tmp_path, [{"name": "a"}])
    assert main(["sweep", str(tmp_path / "s.yaml"), "--grid", "optim.lr=0.1,0.2"]) == 2
    assert "is a sweep file" in capsys.readouterr().err


def test_finished_runs_and_evaluations_are_skipped(tmp_path):
    spec = _sweep_file(tmp_path, [{"name": "a", "eval": [{"protocol": "spatial", "options": {"knob": 0.3}}]}], seeds=[0])
    [run] = plan_file(spec)
    run.run_dir.mkdir(parents=True)
    (run.run_dir / "config.yaml").write_text((tmp_path / "r.yaml").read_text())
    torch.save({"epoch": 1}, run.run_dir / "state.pt")
    assert not finished(run.run_dir, 3)
    torch.save({"epoch": 3}, run.run_dir / "state.pt")
    (run.run_dir / "results").mkdir()
    (run.run_dir / "results" / "spatial-knob0.3.json").write_text("{}")
    assert finished(run.run_dir, 3)
    logged = []
    run_sweep([run], log=logged.append)  # nothing left to do: nothing trains or evaluates
    assert logged == [f"[1/1] {run.run_dir}: trained"]


def test_finished_goes_by_the_training_state(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    assert not finished(run, 1)  # no state yet
    (run / "metrics.jsonl").write_text('{"epoch": 1}\n{"epoch": 2}\n')  # killed after logging epoch 2, before its state
    torch.save({"epoch": 1, "model": {"w": torch.zeros(1000)}}, run / "state.pt")
    assert finished(run, 1) and not finished(run, 2)
    data = (run / "state.pt").read_bytes()
    (run / "state.pt").write_bytes(data[: len(data) // 2])  # cut short
    with pytest.raises(RunDirError, match="state.pt is corrupt"):
        finished(run, 1)


def test_read_sweep_file_tells_a_sweep_file_from_a_recipe(tmp_path):
    spec = _sweep_file(tmp_path, [{"name": "a"}], seeds=[0])
    assert read_sweep_file(tmp_path / "s.yaml") == spec
    assert read_sweep_file(tmp_path / "r.yaml") is None and read_sweep_file(tmp_path / "missing.yaml") is None
    (tmp_path / "s.yaml").write_text("runs: [{name: a}]\n")
    with pytest.raises(ConfigError, match="needs a name and a recipe"):
        read_sweep_file(tmp_path / "s.yaml")


@pytest.mark.parametrize("path", sorted((REPO / "recipes").rglob("sweeps/*.yaml")), ids=lambda p: p.stem)
def test_shipped_sweep_files_plan_against_the_shipped_recipes(path, monkeypatch, capsys):
    monkeypatch.chdir(REPO)
    assert main(["sweep", str(path), "--dry-run", "--seeds", "1"]) == 0
    plan = yaml.safe_load(capsys.readouterr().out)
    assert plan and all(Path(p["recipe"]).is_file() for p in plan.values())
