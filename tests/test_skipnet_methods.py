"""SkipNet training methods: SP (straight-through) and HRL (skip rewards, returns, policy gradient)."""

from __future__ import annotations

import pytest
import torch

from ponder.methods.base import create_method
from ponder.methods.skipnet import discounted_returns, hrl_returns, policy_gradient_loss, skip_rewards
from ponder.models.resnet import CifarResNet
from ponder.models.skipnet import SkipNet


def tiny(gate_type: str = "rnn") -> SkipNet:
    torch.manual_seed(0)
    return SkipNet(CifarResNet(14, shortcut="B"), gate_type=gate_type)


def batch(n: int = 6):
    g = torch.Generator().manual_seed(1)
    return torch.randn(n, 3, 32, 32, generator=g), torch.randint(0, 10, (n,), generator=g)


def test_skip_rewards_and_discounted_returns_by_hand():
    actions = torch.tensor([[1.0, 0.0, 0.0], [1.0, 1.0, 0.0]])
    r = skip_rewards(actions, alpha=0.3)  # alpha / N = 0.1 per skipped block
    torch.testing.assert_close(r, torch.tensor([[0.0, 0.1, 0.1], [0.0, 0.0, 0.1]]))
    torch.testing.assert_close(discounted_returns(torch.tensor([[1.0, 2.0, 3.0]]), 0.5),
                               torch.tensor([[1 + 0.5 * (2 + 0.5 * 3), 2 + 0.5 * 3, 3.0]]))


def test_hrl_returns_add_terminal_minus_ce_at_the_last_gate():
    actions = torch.tensor([[1.0, 0.0, 0.0]])
    ce = torch.tensor([2.0])
    # rewards [0, 0.1, 0.1 - 2] ; gamma = 1: every gate sees the whole future
    torch.testing.assert_close(hrl_returns(actions, ce, alpha=0.3, gamma=1.0),
                               torch.tensor([[-1.8, -1.8, -1.9]]))
    # gamma = 0.5: R3 = -1.9, R2 = 0.1 - 0.95, R1 = 0 + 0.5 R2
    torch.testing.assert_close(hrl_returns(actions, ce, alpha=0.3, gamma=0.5),
                               torch.tensor([[-0.425, -0.85, -1.9]]))
    # ImageNet-style terminal weight alpha / N
    torch.testing.assert_close(hrl_returns(actions, ce, alpha=0.3, gamma=1.0, terminal_weight=0.1),
                               torch.tensor([[0.0, 0.0, -0.1]]))


@pytest.mark.parametrize("ret, direction", [(1.0, 1.0), (-1.0, -1.0)])
def test_policy_gradient_sign_reinforces_good_actions(ret, direction):
    logit = torch.zeros(1, 1, requires_grad=True)
    action = torch.ones(1, 1)  # the gate kept the block
    log_prob = torch.nn.functional.logsigmoid(logit) * action
    loss = policy_gradient_loss(log_prob, torch.full((1, 1), ret), rl_weight=0.01)
    loss.backward()
    # a gradient-descent step moves p(keep) up for a positive return, down for a negative one
    assert torch.sign(-logit.grad).item() == direction
    torch.testing.assert_close(logit.grad, torch.full((1, 1), -0.01 * ret * 0.5))


def test_policy_gradient_reduction_sum_vs_mean_and_returns_are_constants():
    lp = torch.log(torch.tensor([[0.5, 0.25], [0.5, 0.5]]))
    ret = torch.tensor([[1.0, 2.0], [3.0, 4.0]], requires_grad=True)
    s = policy_gradient_loss(lp, ret, rl_weight=1.0, reduction="sum")
    m = policy_gradient_loss(lp, ret, rl_weight=1.0, reduction="mean")
    torch.testing.assert_close(s, 2 * m)
    assert not s.requires_grad  # no gradient flows into the returns
    with pytest.raises(ValueError, match="rl_reduction"):
        policy_gradient_loss(lp, ret, reduction="max")  # type: ignore[arg-type]


def test_sp_step_uses_straight_through_gates_and_trains_them():
    model = tiny("ffgate2").train()
    method = create_method("skipnet_sp", model)
    assert model.decision_mode == "straight_through"
    images, targets = batch()
    step = method.training_step(model, images, targets)
    step.loss.backward()
    assert torch.isfinite(step.loss) and set(step.output.gates.unique().tolist()) <= {0.0, 1.0}
    assert {"acc", "ce", "keep", "macs"} <= set(step.metrics)
    grads = [p.grad for p in model.gate_bank.parameters() if p.grad is not None]
    assert grads and sum(g.abs().sum() for g in grads) > 0


def test_hrl_gates_learn_only_from_the_policy_gradient():
    model = tiny("rnn").train()
    images, targets = batch()
    method = create_method("skipnet_hrl", model, rl_weight=0.0)
    assert model.decision_mode == "sample"
    torch.manual_seed(0)
    method.training_step(model, images, targets).loss.backward()
    gate_grad = sum(p.grad.abs().sum() for p in model.gate_bank.parameters() if p.grad is not None)
    assert gate_grad == 0  # CE does not reach sampled gates
    assert model.backbone.fc.weight.grad.abs().sum() > 0
    model.zero_grad()
    method = create_method("skipnet_hrl", model)
    torch.manual_seed(0)
    step = method.training_step(model, images, targets)
    step.loss.backward()
    assert model.gate_bank.out.weight.grad.abs().sum() > 0
    assert {"pg", "return", "ce", "keep"} <= set(step.metrics)


def test_hrl_loss_matches_its_definition():
    model = tiny("rnn").train()
    images, targets = batch()
    method = create_method("skipnet_hrl", model, alpha=0.1, rl_weight=0.01)
    torch.manual_seed(3)
    step = method.training_step(model, images, targets)
    out = step.output
    ce = torch.nn.functional.cross_entropy(out.logits, targets, reduction="none")
    n = out.extras["gate_actions"].shape[1]
    rewards = 0.1 / n * (1 - out.extras["gate_actions"])
    rewards[:, -1] -= ce.detach()
    returns = rewards.flip(1).cumsum(1).flip(1)
    expected = ce.mean() - 0.01 * (out.extras["gate_log_probs"] * returns).sum()
    torch.testing.assert_close(step.loss, expected)


def test_hrl_sharpens_once_even_across_resume():
    model = tiny("ffgate1")
    w = model.gate_bank.gates[0].out.weight.detach().clone()
    method = create_method("skipnet_hrl", model, sharpen_temp=0.5)
    method.on_epoch_start(0, 3)
    method.on_epoch_start(1, 3)
    torch.testing.assert_close(model.gate_bank.gates[0].out.weight, w / 0.5)
    resumed = create_method("skipnet_hrl", model, sharpen_temp=0.5)
    resumed.load_state_dict(method.state_dict())
    resumed.on_epoch_start(2, 3)
    torch.testing.assert_close(model.gate_bank.gates[0].out.weight, w / 0.5)


def test_methods_reject_ungated_models_and_bad_options():
    with pytest.raises(ValueError, match="needs a SkipNet model"):
        create_method("skipnet_sp", CifarResNet(14))
    with pytest.raises(TypeError, match="beta"):
        create_method("skipnet_hrl", tiny(), beta=1.0)
    with pytest.raises(ValueError, match="gate_mode"):
        create_method("skipnet_sp", tiny(), gate_mode="sample")
