"""The ponder_cost method (CE + tau * ponder cost) and the spatial evaluation protocol."""

import json

import pytest
import torch
import torch.nn.functional as F

from ponder.config import RunConfig
from ponder.evaluate.protocols import EvalContext, get_protocol
from ponder.methods.base import create_method
from ponder.models.act import ACTCifarResNet


def _tiny(seed=0):
    torch.manual_seed(seed)
    return ACTCifarResNet(14, num_classes=4, spatial=True)


def test_loss_is_cross_entropy_plus_tau_times_mean_ponder_cost():
    model = _tiny()
    x, y = torch.randn(4, 3, 16, 16), torch.tensor([0, 1, 2, 3])
    torch.manual_seed(1)
    step = create_method("ponder_cost", model, tau=0.3).training_step(model, x, y)
    torch.manual_seed(1)
    out = model(x)
    expected = F.cross_entropy(out.logits, y) + 0.3 * out.extras["ponder_cost"].mean()
    assert step.loss.item() == pytest.approx(expected.item(), rel=1e-6)
    assert step.metrics["ponder_cost"] == pytest.approx(out.extras["ponder_cost"].mean().item(), rel=1e-6)
    assert set(step.metrics) >= {"acc", "ce", "ponder_cost", "mmacs"}


def _ponder_after_training(tau, steps=4):
    model = _tiny()
    method = create_method("ponder_cost", model, tau=tau)
    opt = torch.optim.SGD(model.parameters(), lr=0.2)
    gen = torch.Generator().manual_seed(0)
    x, y = torch.randn(8, 3, 16, 16, generator=gen), torch.randint(0, 4, (8,), generator=gen)
    for _ in range(steps):
        opt.zero_grad()
        method.training_step(model, x, y).loss.backward()
        opt.step()
    with torch.no_grad():
        return model.eval()(x).extras["ponder_cost"].mean().item()


def test_raising_tau_lowers_the_ponder_cost():
    low, mid, high = _ponder_after_training(0.0), _ponder_after_training(1.0), _ponder_after_training(5.0)
    assert high < mid < low and high < low - 0.2


def test_method_rejects_models_without_ponder_cost_and_negative_tau():
    from ponder.registry import create_model

    dense = create_model("resnet20_cifar")
    with pytest.raises(ValueError, match="extras"):
        create_method("ponder_cost", dense).training_step(dense, torch.randn(2, 3, 32, 32), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="tau"):
        create_method("ponder_cost", dense, tau=-1)


def test_spatial_protocol_writes_accuracy_macs_and_ponder_per_stage(tmp_path):
    model = _tiny().eval()
    gen = torch.Generator().manual_seed(0)
    loader = [(torch.randn(3, 3, 16, 16, generator=gen), torch.randint(0, 4, (3,), generator=gen)) for _ in range(2)]
    ctx = EvalContext(model=model, config=RunConfig(), run_dir=tmp_path, out_dir=tmp_path, test_loader=loader,
                      val_loader=None, device="cpu", options={"image_size": 24})
    report = get_protocol("spatial")(ctx)
    saved = json.loads((tmp_path / "eval_spatial_24px.json").read_text())
    assert saved["accuracy"] == report["accuracy"] and report["n"] == 6
    assert report["input_size"] == [3, 24, 24]
    assert len(report["ponder_cost_per_stage"]) == 3 and len(report["active_fraction_per_unit"]) == 6
    assert report["ponder_cost"] == pytest.approx(sum(report["ponder_cost_per_stage"]))
    assert report["macs_mean"] == pytest.approx(report["dense_macs"])  # fresh halting: every unit runs
    assert report["macs_std"] == pytest.approx(0.0, abs=1e-6)


def test_act_and_sact_recipes_load_and_name_registered_parts():
    from pathlib import Path

    from ponder.config import load_config
    from ponder.registry import list_models

    recipes = Path(__file__).resolve().parents[1] / "recipes"
    paths = sorted(recipes.glob("*/act_*.yaml")) + sorted(recipes.glob("*/sact_*.yaml"))
    assert len(paths) >= 10
    for path in paths:
        cfg = load_config(path)
        assert cfg.model.name in list_models(), path
        assert create_method(cfg.method.name, _tiny(), **cfg.method.kwargs).tau > 0
    finetune = load_config(recipes / "cifar10" / "sact_resnet32_finetune.yaml")
    assert finetune.train.init_from
