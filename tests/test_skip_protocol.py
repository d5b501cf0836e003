"""The ``skip`` evaluation protocol on a small BlockDrop model and generated data."""

from __future__ import annotations

import json

import pytest
import torch

from ponder.config import RunConfig
from ponder.evaluate.protocols import EvalContext, get_protocol
from ponder.nn.executor import get_executor
from ponder.registry import create_model


def _context(tmp_path, model, options=None):
    g = torch.Generator().manual_seed(0)
    batches = [(torch.randn(6, 3, 32, 32, generator=g), torch.randint(0, 10, (6,), generator=g)) for _ in range(2)]
    cfg = RunConfig()
    cfg.model.name = "blockdrop_resnet32_cifar"
    return EvalContext(model=model, config=cfg, run_dir=tmp_path, out_dir=tmp_path, test_loader=batches,
                       val_loader=None, device="cpu", options=options or {})


def test_skip_protocol_reports_usage_and_sweeps_the_threshold(tmp_path):
    torch.manual_seed(0)
    model = create_model("blockdrop_resnet32_cifar").eval()
    model.set_knob(0.45)
    report = get_protocol("skip")(_context(tmp_path, model, {"thresholds": [0.0, 0.5, 1.0]}))
    assert report["n"] == 12 and len(report["per_block"]) == 15
    assert report["macs_std"] >= 0 and report["dense_macs"] == 68_862_592
    assert 0 <= report["unique_policies"] <= 12
    sweep = report["sweep"]
    assert [p["threshold"] for p in sweep] == [0.0, 0.5, 1.0]
    assert sweep[0]["blocks_mean"] == 15 and sweep[-1]["blocks_mean"] == 0
    assert sweep[0]["macs_mean"] > sweep[1]["macs_mean"] > sweep[2]["macs_mean"]
    assert sweep[0]["accuracy"] == pytest.approx(report["dense_accuracy"])  # all blocks = the backbone
    assert model.threshold == 0.45 and get_executor(model) == "masked"  # knob and executor restored
    saved = json.loads((tmp_path / "eval_skip.json").read_text())
    assert saved["sweep"] == sweep
    assert (tmp_path / "skip_curve.png").is_file()


def test_skip_protocol_rejects_models_without_gates(tmp_path):
    model = create_model("resnet20_cifar").eval()
    with pytest.raises(ValueError, match="block-skipping model"):
        get_protocol("skip")(_context(tmp_path, model))
