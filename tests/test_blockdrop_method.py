"""BlockDrop's objective: reward, policy-gradient sign, self-critical baseline, curriculum, alpha bound."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from ponder.methods.base import create_method
from ponder.methods.blockdrop import blockdrop_reward, bounded_entropy
from ponder.models.blockdrop import BlockDropModel
from ponder.nn.policy import bernoulli_log_prob, bound_probs, decide_blocks
from ponder.output import DynamicOutput
from ponder.registry import create_model


def test_reward_values():
    keep = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1], [0, 0, 0, 0], [1, 0, 0, 0]], dtype=torch.float32)
    correct = torch.tensor([True, True, True, False])
    r = blockdrop_reward(correct, keep, penalty=5.0)
    torch.testing.assert_close(r, torch.tensor([1 - 0.25, 0.0, 1.0, -5.0]))


@pytest.mark.parametrize("alpha", [0.5, 0.8, 1.0])
def test_alpha_bounds(alpha):
    p = torch.linspace(0, 1, 101)
    b = bound_probs(p, alpha)
    assert b.min() >= 1 - alpha - 1e-6 and b.max() <= alpha + 1e-6
    torch.testing.assert_close(bound_probs(torch.tensor([0.0, 1.0]), alpha), torch.tensor([1 - alpha, alpha]))
    with pytest.raises(ValueError, match="alpha must be in"):
        bound_probs(p, 0.3)


def test_sampling_follows_bounded_probabilities():
    probs = torch.tensor([[0.0, 1.0, 0.5]]).expand(20000, 3)
    g = torch.Generator().manual_seed(0)
    dec = decide_blocks(probs, sample=True, alpha=0.8, generator=g)
    torch.testing.assert_close(dec.keep.mean(0), torch.tensor([0.2, 0.8, 0.5]), atol=0.015, rtol=0)
    torch.testing.assert_close(dec.sample_probs[0], torch.tensor([0.2, 0.8, 0.5]))
    # log-probabilities are taken under the bounded p', never log(0)
    assert torch.isfinite(dec.log_prob).all()


def test_policy_gradient_raises_log_prob_of_correct_cheap_sample():
    """One REINFORCE step with a positive advantage makes that decision vector more likely."""
    logits = torch.zeros(6, requires_grad=True)
    opt = torch.optim.SGD([logits], lr=0.5)
    cheap = torch.tensor([[1.0, 0, 0, 1, 0, 0]])
    greedy = torch.ones(1, 6)
    correct = torch.tensor([True])
    advantage = blockdrop_reward(correct, cheap, 5.0) - blockdrop_reward(correct, greedy, 5.0)
    assert advantage.item() > 0
    before = bernoulli_log_prob(torch.sigmoid(logits), cheap).sum().item()
    loss = -(bernoulli_log_prob(torch.sigmoid(logits), cheap).sum(1) * advantage).mean()
    loss.backward()
    opt.step()
    assert bernoulli_log_prob(torch.sigmoid(logits), cheap).sum().item() > before


def test_entropy_bonus():
    h = bounded_entropy(torch.tensor([[0.5, 1.0, 0.0]]))
    torch.testing.assert_close(h, torch.tensor([0.5 * torch.log(torch.tensor(2.0)).item()]), atol=1e-5, rtol=0)


class _ScriptedPolicy(BlockDropModel):
    """A stand-in BlockDrop model with scripted decisions, to check how the loss is assembled."""

    def __init__(self, sampled: torch.Tensor, greedy: torch.Tensor, logits_s: torch.Tensor, logits_g: torch.Tensor):
        nn.Module.__init__(self)  # (none of a real BlockDrop model's parts: only what the method reads)
        self.backbone = nn.Linear(1, 1)
        self.theta = nn.Parameter(torch.zeros(sampled.shape[1]))
        self.sampled, self.greedy, self.logits_s, self.logits_g = sampled, greedy, logits_s, logits_g
        self.num_decided = sampled.shape[1]

    def set_curriculum(self, n):
        self.num_decided = self.sampled.shape[1] if n is None else n

    def decided(self):
        return torch.ones(self.sampled.shape[1], dtype=torch.bool)

    def forward(self, x, sample=False, alpha=1.0):
        keep = self.sampled if sample else self.greedy
        probs = torch.sigmoid(self.theta).expand_as(keep)
        p = bound_probs(probs, alpha) if sample else probs
        return DynamicOutput(logits=self.logits_s if sample else self.logits_g, macs=torch.zeros(keep.shape[0]),
                             gates=keep, extras={"probs": probs, "sample_probs": p,
                                                 "log_prob": bernoulli_log_prob(p, keep).sum(1)})


def test_self_critical_baseline_is_used():
    sampled = torch.tensor([[1.0, 0, 0, 0], [1, 1, 1, 1]])
    greedy = torch.tensor([[1.0, 1, 0, 0], [1, 1, 0, 0]])
    targets = torch.tensor([0, 1])
    right = torch.tensor([[5.0, 0], [0, 5.0]])
    wrong = torch.tensor([[0.0, 5], [5.0, 0]])
    model = _ScriptedPolicy(sampled, greedy, logits_s=right, logits_g=torch.stack([wrong[0], right[1]]))
    method = create_method("blockdrop", model, stage="curriculum", penalty=2.0, alpha=0.8, beta=0.0)
    step = method.training_step(model, torch.zeros(2, 1), targets)
    r_s = torch.tensor([1 - (1 / 4) ** 2, 0.0])
    r_g = torch.tensor([-2.0, 1 - (2 / 4) ** 2])
    p = bound_probs(torch.full((4,), 0.5), 0.8)
    logp = bernoulli_log_prob(p.expand(2, 4), sampled).sum(1)
    torch.testing.assert_close(step.loss, -(logp * (r_s - r_g)).mean())
    assert step.metrics["advantage"] == pytest.approx((r_s - r_g).mean().item())
    # same decisions sampled as greedy: zero advantage, no policy gradient
    same = _ScriptedPolicy(greedy, greedy, right, right)
    step = create_method("blockdrop", same, beta=0.0).training_step(same, torch.zeros(2, 1), targets)
    step.loss.backward()
    assert step.loss.item() == 0 and same.theta.grad.abs().sum() == 0


def _blockdrop32():
    torch.manual_seed(0)
    return create_model("blockdrop_resnet32_cifar")


def test_curriculum_stage_trains_only_the_decided_policy_outputs():
    model = _blockdrop32()
    method = create_method("blockdrop", model, stage="curriculum", beta=0.0)
    policy_ids = {id(p) for p in model.policy.parameters()}
    groups = list(method.param_groups(model))
    assert {id(p) for g in groups for p in g["params"]} == policy_ids
    method.on_epoch_start(2, 10)
    assert model.decided().sum().item() == 3  # last e + 1 blocks at epoch e
    model.train()
    step = method.training_step(model, torch.randn(8, 3, 32, 32), torch.randint(0, 10, (8,)))
    assert not model.backbone.training and model.policy.training
    assert step.output.gates[:, :12].all()  # earlier blocks forced to run
    step.loss.backward()
    assert all(p.grad is None for p in model.backbone.parameters())
    head_grad = model.policy.fc.weight.grad
    assert head_grad[:12].abs().sum() == 0  # forced blocks: no policy-gradient term
    assert step.metrics["decided"] == 3.0


def test_curriculum_speed_and_finetune_stage():
    model = _blockdrop32()
    method = create_method("blockdrop", model, stage="curriculum", blocks_per_epoch=4)
    method.on_epoch_start(1, 10)
    assert model.decided().sum().item() == 8
    method.on_epoch_start(9, 10)
    assert model.decided().all()
    fine = create_method("blockdrop", model, stage="finetune")
    assert model.decided().all() and fine.option("penalty") == 5.0 and fine.option("beta") == 0.0
    model.train()
    step = fine.training_step(model, torch.randn(4, 3, 32, 32), torch.randint(0, 10, (4,)))
    step.loss.backward()
    assert model.backbone.training and model.backbone.fc.weight.grad is not None
    assert "ce" in step.metrics and torch.isfinite(step.loss)


def test_both_stages_in_one_run():
    model = _blockdrop32()
    method = create_method("blockdrop", model, stage="both", curriculum_epochs=2, blocks_per_epoch=8)
    groups = list(method.param_groups(model))
    assert len(groups[0]["params"]) == len(list(model.parameters()))  # backbone in the optimiser
    assert all(p.requires_grad for p in model.backbone.parameters())  # until training starts
    model.train()
    method.on_epoch_start(1, 4)
    assert method.current_stage() == "curriculum" and method.option("penalty") == 1.0
    step = method.training_step(model, torch.randn(4, 3, 32, 32), torch.randint(0, 10, (4,)))
    step.loss.backward()
    assert model.decided().all() and model.backbone.fc.weight.grad is None and "ce" not in step.metrics
    model.train()
    method.on_epoch_start(2, 4)
    assert method.current_stage() == "finetune" and method.option("penalty") == 5.0
    step = method.training_step(model, torch.randn(4, 3, 32, 32), torch.randint(0, 10, (4,)))
    step.loss.backward()
    assert model.backbone.training and model.backbone.fc.weight.grad is not None and "ce" in step.metrics


def test_bad_options_raise():
    model = _blockdrop32()
    with pytest.raises(ValueError, match="stage must be one of"):
        create_method("blockdrop", model, stage="joint")
    with pytest.raises(ValueError, match="gamma"):
        create_method("blockdrop", model, penalty=-1)
    with pytest.raises(ValueError, match="curriculum_epochs"):
        create_method("blockdrop", model, stage="both")
    with pytest.raises(ValueError, match="needs a BlockDrop model"):
        create_method("blockdrop", create_model("resnet20_cifar"))


def test_sequential_variant_trains_its_gates_with_the_same_objective():
    torch.manual_seed(0)
    model = create_model("blockdrop_seq_resnet110_cifar")
    method = create_method("blockdrop", model, stage="curriculum", blocks_per_epoch=20, beta=0.0)
    assert {id(p) for g in method.param_groups(model) for p in g["params"]} == {id(p) for p in model.gates.parameters()}
    method.on_epoch_start(0, 3)
    model.train()
    step = method.training_step(model, torch.randn(4, 3, 32, 32), torch.randint(0, 10, (4,)))
    assert step.output.gates[:, :34].all() and step.output.extras["log_prob"].shape == (4,)
    step.loss.backward()
    grads = [fc.weight.grad for fc in model.gates.fcs]
    assert all(g is None or g.abs().sum() == 0 for g in grads[:34])  # forced blocks: no gradient
    assert all(p.grad is None for p in model.backbone.parameters())
