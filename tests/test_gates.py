"""Gates for gated ResNets: straight-through decisions, sampling, SkipNet's FF and recurrent gates."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from ponder.nn.gates import (
    FFGateI,
    FFGateII,
    RecurrentGates,
    keep_log_prob,
    decide,
    make_gate_bank,
    straight_through,
)

from conftest import assert_bound_steps_match


def test_straight_through_is_hard_forward_soft_backward():
    soft = torch.tensor([0.2, 0.7, 0.51], requires_grad=True)
    hard = (soft.detach() > 0.5).float()
    out = straight_through(hard, soft)
    assert torch.equal(out.detach(), torch.tensor([0.0, 1.0, 1.0]))
    w = torch.tensor([1.0, -2.0, 3.0])
    (out * w).sum().backward()
    assert torch.equal(soft.grad, w)


def test_decide_straight_through_gradient_equals_soft_gate():
    torch.manual_seed(0)
    logit = torch.randn(6, requires_grad=True)
    w = torch.randn(6)
    d = decide(logit, mode="straight_through", training=True)
    assert set(d.mask.detach().tolist()) <= {0.0, 1.0}
    assert torch.equal(d.mask.detach(), (torch.sigmoid(logit) > 0.5).float())
    (d.mask * w).sum().backward()
    g_st = logit.grad.clone()
    logit.grad = None
    (torch.sigmoid(logit) * w).sum().backward()
    torch.testing.assert_close(g_st, logit.grad)


def test_decide_threshold_and_eval_is_deterministic():
    logit = torch.logit(torch.tensor([0.1, 0.4, 0.6, 0.9]))
    for mode in ("straight_through", "sample", "soft"):
        a = decide(logit, mode=mode, threshold=0.5, training=False)
        b = decide(logit, mode=mode, threshold=0.5, training=False)
        assert torch.equal(a.mask, torch.tensor([0.0, 0.0, 1.0, 1.0]))
        assert torch.equal(a.mask, b.mask)
    high = decide(logit, threshold=0.8)
    assert torch.equal(high.action, torch.tensor([0.0, 0.0, 0.0, 1.0]))
    extreme = torch.tensor([-200.0, 200.0])  # sigmoid saturates to 0 / 1; the logit test stays exact
    assert torch.equal(decide(extreme, threshold=0.0).action, torch.tensor([1.0, 1.0]))
    assert torch.equal(decide(extreme, threshold=1.0).action, torch.tensor([0.0, 0.0]))


def test_decide_sample_mode_draws_bernoulli_with_log_prob():
    torch.manual_seed(0)
    p = torch.tensor([0.1, 0.5, 0.9]).repeat(4000, 1)
    logit = torch.logit(p).requires_grad_()
    d = decide(logit, mode="sample", training=True)
    freq = d.action.mean(0)
    torch.testing.assert_close(freq, torch.tensor([0.1, 0.5, 0.9]), atol=0.03, rtol=0)
    assert d.mask.grad_fn is None  # a sample carries no gradient; the log-prob does
    expected = torch.distributions.Bernoulli(probs=p).log_prob(d.action)
    assert decide(logit, mode="sample", training=False).log_prob is None  # inference skips log-probs
    torch.testing.assert_close(d.log_prob.detach(), expected, atol=1e-5, rtol=1e-5)
    assert d.log_prob.requires_grad


def test_forced_decisions_override_the_gate():
    logit = torch.full((4,), 5.0)
    forced = torch.tensor([1.0, 0.0, 0.0, 1.0])
    d = decide(logit, forced=forced, training=True)
    assert torch.equal(d.mask, forced)


def test_soft_mode_trains_with_probabilities():
    logit = torch.tensor([-1.0, 2.0])
    d = decide(logit, mode="soft", training=True)
    torch.testing.assert_close(d.mask, torch.sigmoid(logit))
    assert torch.equal(d.action, torch.tensor([0.0, 1.0]))


def test_keep_log_prob_is_stable_for_large_logits():
    lp = keep_log_prob(torch.tensor([100.0, -100.0]), torch.tensor([0.0, 1.0]))
    assert torch.isfinite(lp).all()
    torch.testing.assert_close(lp, torch.tensor([-100.0, -100.0]))


@pytest.mark.parametrize("cls", [FFGateI, FFGateII])
@pytest.mark.parametrize("size", [32, 16, 8])
def test_ff_gates_shapes_batch1_and_softmax_equivalence(cls, size):
    torch.manual_seed(0)
    g = cls(16).eval()
    x = torch.randn(1, 16, size, size)
    logit = g(x)
    assert logit.shape == (1,)
    z = g.out(F.adaptive_avg_pool2d(g.body(x), 1)).flatten(1)  # the paper's 1x1 conv on the pooled map
    torch.testing.assert_close(torch.sigmoid(logit), z.softmax(1)[:, 1])


def test_ffgate1_pools_its_whole_remaining_map():
    g = FFGateI(8)
    assert g.body(torch.zeros(2, 8, 32, 32)).shape[-1] == 8  # MaxPool 2 then stride 2: P/4 (pool size 8)


def test_recurrent_gate_is_sequential_shared_and_reset_each_forward():
    torch.manual_seed(0)
    bank = RecurrentGates([16, 16, 32])
    assert len(bank) == 3 and len(list(bank.lstm.parameters())) == 4  # one shared LSTM cell
    xs = [torch.randn(2, 16, 8, 8), torch.randn(2, 16, 8, 8), torch.randn(2, 32, 4, 4)]

    def run(inputs):
        state, out = bank.init_state(inputs[0]), []
        for i, x in enumerate(inputs):
            logit, state = bank.step(i, x, state)
            out.append(logit)
        return torch.stack(out, 1)

    a, b = run(xs), run(xs)
    torch.testing.assert_close(a, b)  # state starts at zero every forward
    changed = run([xs[0] * 3, xs[1], xs[2]])
    assert not torch.allclose(changed[:, 2], a[:, 2])  # gate 2 remembers gate 0's input
    assert a.shape == (2, 3)


@pytest.mark.parametrize("gate_type", ["ffgate1", "ffgate2", "rnn"])
def test_sharpen_divides_keep_logits_by_temperature(gate_type):
    torch.manual_seed(0)
    bank = make_gate_bank(gate_type, [16]).eval()
    x = torch.randn(3, 16, 8, 8)
    before, _ = bank.step(0, x, bank.init_state(x))
    bank.sharpen(0.05)
    after, _ = bank.step(0, x, bank.init_state(x))
    torch.testing.assert_close(after, before / 0.05, rtol=1e-4, atol=1e-4)


def test_make_gate_bank_rejects_unknown_type():
    with pytest.raises(ValueError, match="gate_type"):
        make_gate_bank("lstm", [16])
    with pytest.raises(ValueError, match="decision mode"):
        decide(torch.zeros(2), mode="gumbel")  # type: ignore[arg-type]


@pytest.mark.parametrize("gate_type", ["ffgate1", "ffgate2", "rnn"])
def test_bias_towards_keep_sets_the_keep_logit_of_a_zero_feature(gate_type):
    bank = make_gate_bank(gate_type, [16, 32])
    bank.bias_towards_keep(0.9)
    for layer in bank.final_layers():
        z = F.linear(torch.zeros(1, layer.weight.shape[1]), layer.weight.flatten(1), layer.bias)
        keep_logit = z[:, -1] - (z[:, 0] if z.shape[1] == 2 else 0)
        torch.testing.assert_close(torch.sigmoid(keep_logit), torch.tensor([0.9]))
    with pytest.raises(ValueError, match="keep probability"):
        bank.bias_towards_keep(1.0)


@pytest.mark.parametrize("threshold", [0.0, 0.3, 0.5, 0.77, 1.0])
def test_every_family_tests_a_probability_threshold_on_the_same_logit(threshold):
    """Gates, routers and spatial masks turn a probability threshold into a logit in one place
    (``probability_logit``), so at the same threshold and logits they take the same decisions."""
    from ponder.nn.mask_unit import threshold_mask
    from ponder.nn.routers import eval_option
    from ponder.nn.thresholds import probability_logit

    bar = probability_logit(threshold)
    logits = torch.tensor([-30.0, -1.0, -0.2, 0.0, 0.2, 1.2, 30.0])
    if abs(bar) < 10:  # values on the boundary itself and one float step either side
        edge = torch.tensor(bar, dtype=torch.float32)
        logits = torch.cat([logits, torch.stack([edge.nextafter(torch.tensor(-99.0)), edge,
                                                 edge.nextafter(torch.tensor(99.0))])])
    expected = logits >= bar
    assert torch.equal(decide(logits, threshold=threshold).action.bool(), expected)
    assert torch.equal(threshold_mask(logits[None, None], threshold)[0, 0], expected)
    two_options = torch.stack([torch.zeros_like(logits), logits], dim=1)  # skip, keep
    assert torch.equal(eval_option(two_options, threshold).bool(), expected)
    assert probability_logit(0.5) == 0.0 and torch.sigmoid(torch.tensor(bar, dtype=torch.float64)).item() == \
        pytest.approx(threshold)
    with pytest.raises(ValueError, match="probability"):
        probability_logit(1.5)


def test_compiled_recurrent_gate_steps_equal_the_module_steps():
    """SkipNet's RNN gate as one compiled call per step (mean, projection, LSTM cell, keep logit) gives
    the module's logits and LSTM states to float rounding, step after step, at batch 1 and 3."""
    from ponder.fast.native import load
    from ponder.fast.small_conv import bound_lstm_gate

    if load("small_conv") is None:
        pytest.skip("the compiled kernels are not built here (`ponder kernels build`)")
    torch.manual_seed(0)
    bank = make_gate_bank("rnn", [16, 16, 32]).eval()
    with torch.no_grad():
        for p in bank.lstm.parameters():  # (non-zero biases and larger weights: every term matters)
            p.normal_(0.0, 0.5)
    assert all("bound_lstm_gate" in s.__qualname__ for s in bank.bound_steps())
    for batch in (1, 3):
        xs = [torch.randn(batch, c, s, s).contiguous(memory_format=torch.channels_last)
              for c, s in ((16, 8), (16, 8), (32, 4))]
        assert_bound_steps_match(bank, xs, atol=1e-6)
    assert bound_lstm_gate(bank.proj[0].double(), bank.lstm, bank.out) is None  # float32 only
