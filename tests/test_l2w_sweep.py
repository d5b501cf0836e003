"""``ponder sweep``: one run per value of a training setting (L2W's q), compared by budgeted curves
fitted and scored on the held-out split; the test set is never read; ``ponder report`` tells the runs apart."""

from __future__ import annotations

import json

import pytest
import yaml

from cifar_fixtures import write_fake_cifar
from ponder.cli import main
from ponder.engine.sweep import envelope_mean
from ponder.report import collect_groups
from ponder.results import load_results


def test_envelope_mean_by_hand():
    # best accuracy at or below a budget: 50 on [1, 2), 70 on [2, 4), 70 on [4, 5] (the 60 point never beats 70)
    curve = [(4.0, 60.0), (1.0, 50.0), (2.0, 70.0)]
    assert envelope_mean(curve, 1.0, 5.0) == pytest.approx((50 * 1 + 70 * 3) / 4)
    assert envelope_mean(curve, 2.0, 3.0) == pytest.approx(70.0)
    assert envelope_mean(curve, 1.5, 2.5) == pytest.approx((50 * 0.5 + 70 * 0.5) / 1)


@pytest.fixture()
def recipe(tmp_path):
    data = write_fake_cifar(tmp_path / "data", "cifar10", n_train=48, n_test=16, seed=0)
    spec = {
        "model": {"name": "msdnet_cifar_budgeted",
                  "kwargs": {"num_classes": 10, "n_blocks": 3, "n_channels": 4, "growth_rate": 2, "head_width": 8}},
        "data": {"dataset": "cifar10", "data_dir": str(data), "val_size": 16, "batch_size": 8, "eval_batch_size": 16,
                 "augment": False},
        "optim": {"name": "sgd", "lr": 0.05, "momentum": 0.9},
        "method": {"name": "l2w", "kwargs": {"wpn_width": 8, "q": 0.75}},
        "train": {"epochs": 1, "seed": 0, "device": "cpu", "max_steps_per_epoch": 2},
    }
    path = tmp_path / "tiny_l2w.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def test_sweep_trains_each_value_and_scores_it_on_the_held_out_split(recipe, tmp_path, capsys, monkeypatch):
    import ponder.evaluate.early_exit as early_exit

    read = []
    original = early_exit.cached_exit_outputs
    monkeypatch.setattr(early_exit, "cached_exit_outputs",
                        lambda ctx, split, loader: read.append(split) or original(ctx, split, loader))
    out = tmp_path / "sweep"
    assert main(["sweep", str(recipe), "--grid", "method.kwargs.q=0.5,1.0", "--out", str(out),
                 "--protocol", "budgeted", "--option", "score=val"]) == 0
    text = capsys.readouterr().out
    assert "held-out budgeted curves" in text and "best on the held-out split: q" in text
    assert read == ["val", "val"]  # one held-out pass per run, never the test split
    for q in ("0.5", "1.0"):
        run = out / f"q{q}" / "s0"
        assert yaml.safe_load((run / "config.yaml").read_text())["method"]["kwargs"]["q"] == float(q)
        [result] = load_results(run)
        assert result.kind == "budgeted-scoreval" and result.evaluation.split == "val"
        assert result.evaluation.images == 16 and len(result.points) == 39
        assert json.loads((run / "eval" / "budgeted-val.json").read_text())["num_test"] == 0
    labels = sorted(g.label for g in collect_groups([str(out)]))
    assert labels == ["msdnet_cifar_budgeted · l2w · budgeted-scoreval · method.q=0.5",
                      "msdnet_cifar_budgeted · l2w · budgeted-scoreval · method.q=1.0"]
    # a second call finds the runs finished: nothing is trained again
    mtime = (out / "q0.5" / "s0" / "state.pt").stat().st_mtime
    assert main(["sweep", str(recipe), "--grid", "method.kwargs.q=0.5", "--out", str(out),
                 "--protocol", "budgeted", "--option", "score=val"]) == 0
    assert (out / "q0.5" / "s0" / "state.pt").stat().st_mtime == mtime


def test_held_out_scoring_refuses_test_calibration(recipe, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", str(recipe), "--out", str(out)]) == 0
    assert main(["eval", str(out), "--protocol", "budgeted", "--option", "score=val", "--option",
                 "calibration=test"]) == 2
    assert "drop calibration=test" in capsys.readouterr().err
