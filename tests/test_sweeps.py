"""The recipe-sweep runner: a sweep file expands into ordered jobs per seed with filled-in overrides, skips
what is done, and the shipped sweeps expand against the shipped recipes."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml

from ponder.sweeps import SweepError, expand, fill, finished, load_sweep, main

REPO = Path(__file__).parents[1]


def _sweep(tmp_path, runs, seeds=(0, 1)):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("model: {name: resnet20_cifar}\n")
    for run in runs:
        run.setdefault("recipe", str(recipe))
    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump({"root": str(tmp_path / "runs"), "seeds": list(seeds), "runs": runs}, sort_keys=False))
    return load_sweep(path)


def test_jobs_run_seed_by_seed_in_order_with_grid_points_and_filled_overrides(tmp_path):
    spec = _sweep(tmp_path, [
        {"name": "base"},
        {"name": "dc-b{model.kwargs.budget}", "grid": {"model.kwargs.budget": [0.3, 0.7]},
         "set": {"train.init_from": "{root}/base/seed{seed}", "method.kwargs.teacher": ["{root}/a{seed}", "x"]}}])
    jobs = expand(spec)
    assert [(j.name, j.seed) for j in jobs] == [("base", 0), ("dc-b0.3", 0), ("dc-b0.7", 0),
                                                 ("base", 1), ("dc-b0.3", 1), ("dc-b0.7", 1)]
    root = tmp_path / "runs"
    assert jobs[5].run_dir == root / "dc-b0.7" / "seed1"
    assert jobs[5].overrides == ["model.kwargs.budget=0.7", f"train.init_from={root}/base/seed1",
                                 f"method.kwargs.teacher=[{root}/a1, x]", "train.seed=1"]
    assert [j.name for j in expand(spec, only="dc-*")][:2] == ["dc-b0.3", "dc-b0.7"]


def test_fill_names_the_unknown_field():
    assert fill(["{a}/x", 3], {"a": 1}) == ["1/x", 3]
    with pytest.raises(SweepError, match="grid key"):
        fill("{nope}", {"root": "r", "seed": 0})


def test_bad_sweep_files_are_refused(tmp_path):
    (tmp_path / "s.yaml").write_text("runs: [{name: a, recipe: missing.yaml}]\n")
    with pytest.raises(SweepError, match="does not exist"):
        load_sweep(tmp_path / "s.yaml")
    (tmp_path / "s.yaml").write_text("seeds: [0]\n")
    with pytest.raises(SweepError, match="list of runs"):
        load_sweep(tmp_path / "s.yaml")


def test_finished_runs_and_evaluations_are_skipped_and_interrupted_runs_resumed(tmp_path, capsys):
    spec = _sweep(tmp_path, [{"name": "a", "eval": [{"protocol": "spatial", "options": {"knob": 0.3}}]}], seeds=[0])
    job = expand(spec)[0]
    job.run_dir.mkdir(parents=True)
    (job.run_dir / "config.yaml").write_text("train: {epochs: 3}\n")
    torch.save({"epoch": 1}, job.run_dir / "state.pt")
    assert not finished(job) and job.train_command()[:2] == ["train", "--resume"]
    torch.save({"epoch": 3}, job.run_dir / "state.pt")
    (job.run_dir / "results").mkdir()
    (job.run_dir / "results" / "spatial-knob0.3.json").write_text("{}")
    assert finished(job)
    from ponder.sweeps import run_sweep

    run_sweep(spec, report=False)  # nothing left to do: no command runs
    assert capsys.readouterr().out == ""


@pytest.mark.parametrize("path", sorted((REPO / "recipes").rglob("sweeps/*.yaml")), ids=lambda p: p.stem)
def test_shipped_sweeps_expand_against_the_shipped_recipes(path, monkeypatch, capsys):
    monkeypatch.chdir(REPO)
    assert main([str(path), "--dry-run", "--seeds", "0"]) == 0
    out = capsys.readouterr().out
    assert "ponder train" in out and "ponder report" in out
