"""Whole-model plans (ponder.fast.plan): a plan is reused while the model is unchanged and rebuilt after
any change a user can make (in place, new storage, a replaced parameter or submodule, a train-mode
forward), with the compiled fingerprint and with its Python stand-in."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from ponder.fast import plan
from ponder.fast.fold import clear_fold_cache


def net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Sequential(nn.Linear(4, 2))).eval()


CHANGES = {
    "in place": lambda m: torch.no_grad()(m[0].weight.mul_)(2.0),
    "new storage (.data =)": lambda m: setattr(m[0].weight, "data", m[0].weight.data.clone()),
    "replaced parameter": lambda m: setattr(m[0], "weight", nn.Parameter(m[0].weight.detach().clone())),
    "removed bias": lambda m: setattr(m[0], "bias", None),
    "replaced submodule": lambda m: m[2].__setitem__(0, nn.Linear(4, 2)),
    "train-mode forward": lambda m: (m.train(), m[:2](torch.randn(2, 3, 5, 5)), m.eval()),
    "load_state_dict": lambda m: m.load_state_dict(m.state_dict()),
}


@pytest.fixture(params=["compiled", "python"])
def fingerprint(request, monkeypatch):
    if request.param == "python":
        monkeypatch.setattr(plan, "load", lambda name: None)
    elif plan.load("plan") is None:
        pytest.skip("the compiled kernels are not built here (`ponder kernels build`)")
    return request.param


@pytest.mark.parametrize("change", sorted(CHANGES))
def test_a_snapshot_sees_every_change(fingerprint, change):
    model = net()
    snap = plan.Snapshot(model)
    assert snap.valid() and snap.valid()
    CHANGES[change](model)
    assert not snap.valid()


def test_a_plan_is_reused_until_the_model_changes(fingerprint):
    model, built = net(), []

    def build():
        built.append(1)
        return len(built)

    assert plan.prepared(model, "k", build) == 1
    assert plan.prepared(model, "k", build) == 1  # unchanged: the same plan
    assert plan.prepared(model, "other key", build) == 2
    with torch.no_grad():
        model[1].running_var.add_(1.0)
    assert plan.prepared(model, "k", build) == 3
    clear_fold_cache()  # (edits through .data that keep the storage and version: the documented way out)
    assert plan.prepared(model, "k", build) == 4
