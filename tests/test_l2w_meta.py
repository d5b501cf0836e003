"""L2W's meta step as pure functions: the virtual SGD step, the meta-gradient, one iteration."""

from __future__ import annotations

import copy

import pytest
import torch

from ponder import create_model
from ponder.nn.thresholds import assign_by_proportions, exit_proportions
from ponder.config import OptimConfig
from ponder.engine.optim import build_optimizer
from ponder.methods import create_method
from l2w_reference import virtual_parameters
from ponder.methods.l2w_meta import (build_wpn_optimizer, exit_losses, l2w_iteration, meta_gradient, meta_loss,
                                     weighted_exit_loss)
from ponder.methods.virtual_sgd import virtual_sgd_step
from ponder.nn.wpn import WeightPredictionNetwork
from toy_models import ToyExits

CLASSES = 5


def _model(seed: int = 0, tiny: bool = False):
    """A float64 multi-exit model in training mode: :class:`~toy_models.ToyExits` (8x8, BatchNorm) or a small two-scale MSDNet (16x16)."""
    torch.manual_seed(seed)
    if tiny:
        return ToyExits(CLASSES, width=4, strides=(1, 2, 1), norm=True, size=8).double().train()
    model = create_model("msdnet_cifar_budgeted", n_blocks=3, n_channels=4, growth_rate=2, head_width=8,
                         gr_factor=(1, 2), bn_factor=(1, 2), num_classes=CLASSES)
    return model.double().train()


def _batch(n: int = 8, seed: int = 1, size: int = 16):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, size, size, generator=g, dtype=torch.float64), torch.randint(0, CLASSES, (n,), generator=g)


def _optimizer(model, **kw):
    cfg = OptimConfig(**{"lr": 0.5, "momentum": 0.9, "weight_decay": 1e-2, **kw})
    return build_optimizer([{"params": list(model.parameters())}], model, cfg)  # decay / no-decay groups


def _real_step(model, optimizer, images, targets, weights=None):
    losses, _ = exit_losses(model(images).exit_logits, targets)
    optimizer.zero_grad(set_to_none=True)
    weighted_exit_loss(losses, torch.ones_like(losses) if weights is None else weights).backward()
    optimizer.step()


def _wpn(delta: float = 0.8, normalisation: str = "col", seed: int = 2) -> WeightPredictionNetwork:
    torch.manual_seed(seed)
    return WeightPredictionNetwork(3, width=6, normalisation=normalisation, delta=delta).double()


# ---- the virtual SGD step ---------------------------------------------------------------------------

@pytest.mark.parametrize("options", [
    dict(momentum=0.0, weight_decay=0.0),
    dict(momentum=0.9, weight_decay=1e-2),
    dict(momentum=0.9, weight_decay=1e-2, nesterov=True),
    dict(momentum=0.5, dampening=0.3, weight_decay=1e-3, maximize=True),
])
@pytest.mark.parametrize("warmup", [0, 2])  # momentum buffers absent / present
def test_virtual_sgd_step_equals_torch_sgd(options, warmup):
    g = torch.Generator().manual_seed(0)
    params = {n: torch.nn.Parameter(torch.randn(4, 3, generator=g, dtype=torch.float64)) for n in "abcd"}
    frozen_out = params.pop("d")  # a tensor the optimizer does not hold
    opt = torch.optim.SGD([{"params": [params["a"], params["b"]]}, {"params": [params["c"]], "weight_decay": 0.0}],
                          lr=0.3, **{k: v for k, v in options.items() if k != "weight_decay"},
                          weight_decay=options["weight_decay"])
    for _ in range(warmup):
        for p in params.values():
            p.grad = torch.randn(p.shape, generator=g, dtype=p.dtype)
        opt.step()
    grads = {"a": torch.randn(4, 3, generator=g, dtype=torch.float64), "b": torch.randn(4, 3, generator=g, dtype=torch.float64),
             "c": torch.randn(4, 3, generator=g, dtype=torch.float64)}
    before = {n: p.detach().clone() for n, p in params.items()}
    new = virtual_sgd_step(opt, {**params, "d": frozen_out}, {**grads, "c": None} if warmup else grads)
    assert all(torch.equal(params[n], before[n]) for n in params)  # nothing modified
    for n, p in params.items():
        p.grad = None if (warmup and n == "c") else grads[n]
    opt.step()
    for n, p in params.items():
        assert torch.allclose(new[n], p, rtol=0, atol=1e-14), n
    assert new["d"] is frozen_out


def test_virtual_step_rejects_other_optimizers():
    p = torch.nn.Parameter(torch.zeros(2))
    with pytest.raises(ValueError, match="optim.name: sgd"):
        virtual_sgd_step(torch.optim.Adam([p]), {"p": p}, {"p": torch.ones(2)})


@pytest.mark.parametrize("warmup,nesterov", [(0, False), (1, True)])  # momentum buffers absent / present
def test_virtual_parameters_equal_a_real_step_when_the_wpn_is_constant(warmup, nesterov):
    model = _model()
    opt = _optimizer(model, nesterov=nesterov)
    x, y = _batch()
    for i in range(warmup):
        _real_step(model, opt, *_batch(seed=10 + i))
    wpn = _wpn(normalisation="mat")
    torch.nn.init.zeros_(wpn.mlp[-2].weight)  # v = tanh(bias): the same per-exit weights for every sample
    buffers = {n: b.clone() for n, b in model.named_buffers()}
    state = copy.deepcopy(opt.state_dict())
    theta_hat, weights = virtual_parameters(model, opt, wpn, x, y)
    assert torch.equal(weights, weights[:1].expand_as(weights)) and not torch.allclose(weights, torch.ones_like(weights))
    assert all(torch.equal(b, buffers[n]) for n, b in model.named_buffers())  # BN statistics untouched
    assert str(opt.state_dict()) == str(state)
    _real_step(model, opt, x, y, weights.detach())
    for n, p in model.named_parameters():
        assert torch.allclose(theta_hat[n], p, rtol=0, atol=1e-12), n


# ---- the meta loss and its gradient -----------------------------------------------------------------

def test_meta_loss_is_the_cross_entropy_at_each_assigned_exit():
    g = torch.Generator().manual_seed(4)
    logits = [torch.randn(8, CLASSES, generator=g, dtype=torch.float64) * 3 for _ in range(3)]
    y = torch.randint(0, CLASSES, (8,), generator=g)
    P = exit_proportions(0.5, 3)  # counts 4, 2, 2
    conf = torch.stack([z.softmax(1).amax(1) for z in logits])
    exit_of = assign_by_proportions(conf, P)
    ce = torch.stack([torch.nn.functional.cross_entropy(z, y, reduction="none") for z in logits])
    expected = sum(ce[k][exit_of == k].mean() for k in range(3))
    assert torch.allclose(meta_loss(logits, y, P), expected)
    assert exit_of.bincount(minlength=3).tolist() == [4, 2, 2]


@pytest.mark.parametrize("normalisation", ["col", "row", "mat"])
def test_meta_gradient_matches_central_finite_differences(normalisation):
    model = _model(tiny=True)
    opt = _optimizer(model)
    _real_step(model, opt, *_batch(seed=7, size=8))  # momentum buffers present
    x, y = _batch(16, size=8)
    wpn = _wpn(normalisation=normalisation)
    P = exit_proportions(0.75, 3)
    grads, _ = meta_gradient(model, opt, wpn, x[:8], y[:8], x[8:], y[8:], P)
    g = torch.Generator().manual_seed(5)
    direction = [torch.randn(p.shape, generator=g, dtype=p.dtype) for p in wpn.parameters()]
    analytic = sum((gr * d).sum() for gr, d in zip(grads, direction))
    eps, values = 1e-6, []  # small: float64 keeps 1e-10 relative accuracy; ReLU kinks may lie nearby
    for sign in (1, -1):
        shifted = copy.deepcopy(wpn)
        with torch.no_grad():
            for p, d in zip(shifted.parameters(), direction):
                p.add_(sign * eps * d)
        values.append(meta_gradient(model, opt, shifted, x[:8], y[:8], x[8:], y[8:], P)[1])
    numeric = (values[0] - values[1]) / (2 * eps)
    assert abs(float(analytic)) > 1e-4  # the WPN really moves the meta loss
    assert float(numeric) == pytest.approx(float(analytic), rel=1e-5)


def test_meta_gradient_is_zero_when_delta_is_zero():
    model = _model(tiny=True)
    x, y = _batch(8, size=8)
    grads, loss = meta_gradient(model, _optimizer(model), _wpn(delta=0.0), x[:4], y[:4], x[4:], y[4:],
                                exit_proportions(0.75, 3))
    assert loss > 0 and all(torch.equal(g, torch.zeros_like(g)) for g in grads)


# ---- one iteration ----------------------------------------------------------------------------------

def _plain_steps(model, opt, halves):
    method = create_method("multi_exit", model)
    for images, targets in halves:
        loss = method.training_step(model, images, targets).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()


@pytest.mark.parametrize("orders,iteration,trained", [("alternate", 0, [0]), ("alternate", 1, [1]),
                                                      ("both", 0, [0, 1])])
def test_delta_zero_iteration_is_plain_multi_exit_training_on_the_half(orders, iteration, trained):
    x, y = _batch(8, size=8)
    halves = [(x[:4], y[:4]), (x[4:], y[4:])]
    l2w_model, plain_model = _model(tiny=True), _model(tiny=True)
    l2w_opt, plain_opt = _optimizer(l2w_model), _optimizer(plain_model)
    wpn = _wpn(delta=0.0)
    metrics = l2w_iteration(l2w_model, l2w_opt, wpn, build_wpn_optimizer(wpn), x, y, iteration, orders=orders)
    _plain_steps(plain_model, plain_opt, [halves[i] for i in trained])
    assert "meta_loss" in metrics and metrics["weight_exit1"] == 1.0
    for (n, a), b in zip(l2w_model.state_dict().items(), plain_model.state_dict().values()):
        assert torch.allclose(a.double(), b.double(), rtol=0, atol=1e-12), n  # parameters and BN statistics


def test_iteration_updates_the_wpn_only_on_meta_iterations():
    model = _model(tiny=True)
    opt = _optimizer(model)
    wpn = _wpn()
    wpn_opt = build_wpn_optimizer(wpn, lr=1e-2)
    x, y = _batch(8, size=8)
    before = [p.detach().clone() for p in wpn.parameters()]
    metrics = l2w_iteration(model, opt, wpn, wpn_opt, x, y, iteration=1, meta_interval=2)
    assert "meta_loss" not in metrics and all(torch.equal(a, b) for a, b in zip(before, wpn.parameters()))
    metrics = l2w_iteration(model, opt, wpn, wpn_opt, x, y, iteration=2, meta_interval=2)
    assert "meta_loss" in metrics and not all(torch.equal(a, b) for a, b in zip(before, wpn.parameters()))
    assert metrics["weight_exit1"] != 1.0
    # a batch of one cannot be split: one backbone step with the current weights, no meta step
    wpn_before = [p.detach().clone() for p in wpn.parameters()]
    backbone_before = [p.detach().clone() for p in model.parameters()]
    metrics = l2w_iteration(model, opt, wpn, wpn_opt, x[:1], y[:1], iteration=0, orders="both")
    assert "meta_loss" not in metrics and all(torch.equal(a, b) for a, b in zip(wpn_before, wpn.parameters()))
    assert not all(torch.equal(a, b) for a, b in zip(backbone_before, model.parameters()))
    with pytest.raises(ValueError, match="orders must be one of alternate, both"):
        l2w_iteration(model, opt, wpn, wpn_opt, x, y, iteration=0, orders="swap")


def test_wpn_optimizer_is_the_papers_adam_and_follows_a_cosine_schedule():
    from ponder.config import ScheduleConfig
    from ponder.engine.optim import LRSchedule

    opt = build_wpn_optimizer(_wpn())
    group = opt.param_groups[0]
    assert isinstance(opt, torch.optim.Adam) and (group["lr"], group["weight_decay"]) == (1e-4, 1e-4)
    schedule = LRSchedule(ScheduleConfig(name="cosine"), 1e-4, epochs=2, steps_per_epoch=5)
    schedule.apply(opt, 0)
    assert group["lr"] == pytest.approx(1e-4)
    schedule.apply(opt, 9)
    assert group["lr"] == pytest.approx(0.0)
