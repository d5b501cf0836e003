"""Optimizer groups (weight-decay exclusions, lr_scale) and per-iteration LR schedules."""

import math

import pytest
import torch
import torch.nn as nn

from ponder import create_model
from ponder.config import OptimConfig, ScheduleConfig
from ponder.engine.optim import LRSchedule, build_optimizer, split_param_groups


def _names(model, params):
    ids = {id(p) for p in params}
    return {n for n, p in model.named_parameters() if id(p) in ids}


def test_no_decay_on_batchnorm_and_bias():
    model = create_model("resnet20_cifar")
    opt = build_optimizer([{"params": list(model.parameters())}], model, OptimConfig(weight_decay=5e-4))
    decay = [g for g in opt.param_groups if g["weight_decay"] > 0]
    no_decay = [g for g in opt.param_groups if g["weight_decay"] == 0]
    assert len(decay) == 1 and len(no_decay) == 1 and decay[0]["weight_decay"] == 5e-4
    nd = _names(model, no_decay[0]["params"])
    d = _names(model, decay[0]["params"])
    assert "bn1.weight" in nd and "bn1.bias" in nd and "fc.bias" in nd and "layer1.0.bn2.weight" in nd
    assert "conv1.weight" in d and "fc.weight" in d
    assert not any("bn" in n or n.endswith("bias") for n in d)
    assert len(nd) + len(d) == len(list(model.parameters()))


def test_decay_everywhere_when_exclusion_off():
    model = create_model("resnet20_cifar")
    opt = build_optimizer([{"params": list(model.parameters())}], model,
                          OptimConfig(weight_decay=1e-4, no_decay_norm_bias=False))
    assert len(opt.param_groups) == 1 and opt.param_groups[0]["weight_decay"] == 1e-4


def test_lr_scale_frozen_params_and_foreign_params():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Linear(4, 2))
    model[0].weight.requires_grad_(False)
    extra = nn.Parameter(torch.zeros(3))  # owned by a method, not the model: 1-d -> no decay
    groups = [{"params": list(model[0].parameters()) + list(model[1].parameters())},
              {"params": list(model[2].parameters()) + [extra], "lr_scale": 0.1}]
    out = split_param_groups(groups, model, OptimConfig(lr=0.2))
    assert [len(g["params"]) for g in out] == [3, 1, 2]  # conv bias + bn weight, bias | fc.weight | fc.bias + extra
    assert out[0]["weight_decay"] == 0 and out[1]["weight_decay"] > 0
    assert out[1]["lr"] == pytest.approx(0.02) and out[1]["base_lr"] == pytest.approx(0.02)
    assert any(p is extra for p in out[2]["params"])
    assert all(p is not model[0].weight for g in out for p in g["params"])


@pytest.mark.parametrize("name,cls", [("sgd", torch.optim.SGD), ("adam", torch.optim.Adam), ("adamw", torch.optim.AdamW)])
def test_optimizer_kinds(name, cls):
    model = nn.Linear(3, 2)
    opt = build_optimizer([{"params": list(model.parameters())}], model, OptimConfig(name=name, nesterov=True, lr=0.05))
    assert isinstance(opt, cls) and opt.param_groups[0]["lr"] == 0.05
    if name == "sgd":
        assert opt.param_groups[0]["nesterov"] and opt.param_groups[0]["momentum"] == 0.9


def test_unknown_optimizer_and_schedule_names():
    model = nn.Linear(3, 2)
    with pytest.raises(ValueError, match="unknown optimizer 'lamb'.*sgd, adam, adamw"):
        build_optimizer([{"params": list(model.parameters())}], model, OptimConfig(name="lamb"))
    with pytest.raises(ValueError, match="unknown schedule 'poly'"):
        LRSchedule(ScheduleConfig(name="poly"), 0.1, 10, 5)


def test_multistep_fraction_milestones_are_epochs_164():
    s = LRSchedule(ScheduleConfig(name="multistep", milestones=[0.5, 0.75], gamma=0.1), 0.1, 164, 10)
    assert s.milestone_epochs == [82, 123]
    assert s.factor(82 * 10 - 1) == 1.0
    assert s.factor(82 * 10) == pytest.approx(0.1)
    assert s.factor(123 * 10 - 1) == pytest.approx(0.1)
    assert s.factor(123 * 10) == pytest.approx(0.01)


def test_multistep_epoch_milestones():
    s = LRSchedule(ScheduleConfig(name="multistep", milestones=[80, 120], gamma=0.2), 0.1, 160, 3)
    assert s.milestone_steps == [240, 360]
    assert s.factor(239) == 1.0 and s.factor(240) == pytest.approx(0.2) and s.factor(360) == pytest.approx(0.04)


def test_warmup_is_linear_then_schedule():
    s = LRSchedule(ScheduleConfig(name="constant", warmup_epochs=2), 0.1, 10, 5)
    assert [s.factor(i) for i in range(10)] == pytest.approx([(i + 1) / 10 for i in range(10)])
    assert s.factor(10) == 1.0 and s.factor(49) == 1.0


def test_cosine_reaches_min_lr_and_decreases():
    base, min_lr = 0.1, 0.001
    s = LRSchedule(ScheduleConfig(name="cosine", warmup_epochs=1, min_lr=min_lr), base, 10, 4)
    lrs = [base * s.factor(i) for i in range(40)]
    assert lrs[3] == pytest.approx(base) and lrs[4] == pytest.approx(base)  # end of warm-up, start of cosine
    assert lrs[-1] == pytest.approx(min_lr)
    assert all(a >= b for a, b in zip(lrs[4:], lrs[5:]))
    mid = 4 + (39 - 4) / 2
    assert base * s.factor(int(mid)) == pytest.approx(min_lr + (base - min_lr) * 0.5 * (1 + math.cos(math.pi * (int(mid) - 4) / 35)))


def test_apply_scales_each_group_from_its_base_lr():
    model = nn.Sequential(nn.Linear(3, 3), nn.Linear(3, 2))
    opt = build_optimizer([{"params": list(model[0].parameters())},
                           {"params": list(model[1].parameters()), "lr_scale": 10.0}], model, OptimConfig(lr=0.01))
    s = LRSchedule(ScheduleConfig(name="multistep", milestones=[0.5]), 0.01, 2, 1)
    s.apply(opt, 1)
    lrs = sorted({round(g["lr"], 12) for g in opt.param_groups})
    assert lrs == [0.001, 0.01]
