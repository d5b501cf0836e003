"""Whole-model plans (ponder.fast.plan): a plan is reused while the model is unchanged and rebuilt after
any change a user can make (in place, new storage, a replaced parameter or submodule, a train-mode
forward), with the compiled fingerprint and with its Python stand-in."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from ponder.fast import plan
from ponder.fast.fold import clear_fold_cache

from conftest import fast_paths


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


def _halting_branch() -> nn.Module:
    from ponder.nn.halting import SpatialHaltingBranch

    branch = SpatialHaltingBranch(8)
    for p in branch.parameters():  # (zero-initialised weights would hide a stale plan)
        nn.init.normal_(p, 0.0, 0.3)
    return branch


def _mask_unit() -> nn.Module:
    from ponder.nn.mask_unit import MaskUnit

    return MaskUnit(8)


MODULE_CHANGES = {
    "in place": lambda m: torch.no_grad()(next(m.parameters()).mul_)(2.0),
    "replaced parameter": lambda m: setattr(m.local, "weight", nn.Parameter(m.local.weight.detach() + 0.1)),
    "train-mode forward": lambda m: (m.train(), m(torch.randn(2, 8, 6, 6) * 3 + 1), m.eval()),
    "load_state_dict": lambda m: m.load_state_dict({k: v + 0.05 for k, v in m.state_dict().items()}),
}


@fast_paths
@pytest.mark.parametrize("make", [_halting_branch, _mask_unit], ids=["halting branch", "mask unit"])
@pytest.mark.parametrize("change", sorted(MODULE_CHANGES))
def test_module_plans_of_folded_weights_follow_every_change(make, change):
    """A SACT halting branch and a DynConv mask unit keep their folded inference weights as plans of their
    own (``ponder.fast.prepared``); after any change the fast output still equals the plain reference."""
    from ponder import fast

    if not fast.spatial.kernels_available():
        pytest.skip("the compiled kernels are not built here (`ponder kernels build`)")
    torch.manual_seed(0)
    module = make().eval()
    x = torch.randn(2, 8, 6, 6).contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        module(x)  # builds the plan
        MODULE_CHANGES[change](module)
        got = module(x)
        assert module in plan._PLANS  # (the fast path ran on its plan)
        with fast.disabled():
            want = module(x)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
