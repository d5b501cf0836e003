"""The ``anytime`` and ``budgeted`` protocols on a small MSDNet and generated data."""

from __future__ import annotations

import json

import pytest
import torch

from ponder import create_model
from ponder.config import RunConfig
from ponder.evaluate.protocols import EvalContext, get_protocol


def _loader(n: int, seed: int, batch: int = 16):
    g = torch.Generator().manual_seed(seed)
    x, y = torch.randn(n, 3, 32, 32, generator=g), torch.randint(0, 10, (n,), generator=g)
    return [(x[i:i + batch], y[i:i + batch]) for i in range(0, n, batch)]


def _ctx(tmp_path, model, val=True, **options):
    return EvalContext(model=model.eval(), config=RunConfig(), run_dir=tmp_path, out_dir=tmp_path,
                       test_loader=_loader(48, 1), val_loader=_loader(64, 2) if val else None,
                       device=torch.device("cpu"), options=options)


@pytest.fixture
def model():
    torch.manual_seed(0)
    return create_model("msdnet_cifar_budgeted", n_blocks=3, n_channels=4, growth_rate=2, head_width=8)


def test_anytime_reports_every_exit_with_cumulative_costs(tmp_path, model):
    res = get_protocol("anytime")(_ctx(tmp_path, model))
    costs = [p["macs"] for p in model.profile_exits((3, 32, 32))]
    assert [e["macs"] for e in res["exits"]] == costs and res["num_test"] == 48
    with torch.no_grad():
        out = model(torch.cat([b[0] for b in _loader(48, 1)]))
    y = torch.cat([b[1] for b in _loader(48, 1)])
    for k, e in enumerate(res["exits"]):
        assert e["top1"] == pytest.approx((out.exit_logits[k].argmax(1) == y).float().mean().item() * 100)
        assert e["top1"] <= e["top5"]
    assert json.loads((tmp_path / "anytime.json").read_text())["exits"][0]["exit"] == 1


def test_budgeted_curve_fits_on_val_and_writes_json_and_plots(tmp_path, model):
    res = get_protocol("budgeted")(_ctx(tmp_path, model, target_macs=[model.exit_costs()[1]]))
    assert res["calibration"] == "val" and res["num_val"] == 64 and len(res["points"]) == 39
    macs = [p["expected_macs"] for p in res["points"]]
    assert min(macs) >= model.exit_costs()[0] and max(macs) <= model.exit_costs()[-1]
    assert all(sum(p["exit_counts"]) == 48 for p in res["points"])
    assert res["target_macs"][0]["thresholds"][-1] == "-inf"
    assert (tmp_path / "budgeted.json").is_file()
    pytest.importorskip("matplotlib")
    assert (tmp_path / "budgeted.png").is_file() and (tmp_path / "exit_histogram.png").is_file()
    model.set_budget(model.exit_costs()[1])  # the protocol calibrated the model on the val split
    assert len(model.thresholds) == model.num_exits


def test_budgeted_needs_a_held_out_split_unless_the_official_quirk_is_asked_for(tmp_path, model):
    with pytest.raises(ValueError, match="held-out split"):
        get_protocol("budgeted")(_ctx(tmp_path, model, val=False))
    res = get_protocol("budgeted")(_ctx(tmp_path, model, val=False, calibration="test", grid_points=5))
    assert "QUIRK" in res["calibration_note"] and len(res["points"]) == 5


def test_cache_is_keyed_to_the_weights(tmp_path, model):
    get_protocol("anytime")(_ctx(tmp_path, model))
    files = sorted((tmp_path / "cache").iterdir())
    assert len(files) == 1
    first = get_protocol("anytime")(_ctx(tmp_path, model))
    assert sorted((tmp_path / "cache").iterdir()) == files  # same checkpoint: reused
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(1.5)
    second = get_protocol("anytime")(_ctx(tmp_path, model))
    assert len(list((tmp_path / "cache").iterdir())) == 2  # another checkpoint: never the stale outputs
    assert first["exits"] != second["exits"]
