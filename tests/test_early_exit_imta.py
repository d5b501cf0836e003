"""The multi_exit method and its IMTA options: gradient equilibrium, collaboration heads, one-for-all KD."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from ponder import create_model
from ponder.methods import create_method
from ponder.nn import set_executor
from ponder.nn.exits import gradient_rescale

SMALL = dict(n_blocks=3, n_channels=4, growth_rate=2, head_width=8)


def _model(**kw):
    torch.manual_seed(0)
    return create_model("msdnet_cifar_budgeted", **SMALL, **kw)


def test_gradient_rescale_is_identity_forward_and_scales_backward():
    x = torch.randn(3, requires_grad=True)
    y = gradient_rescale(x, 0.25)
    assert torch.equal(y, x)
    y.sum().backward()
    assert torch.allclose(x.grad, torch.full((3,), 0.25))


def _grads(model, exit_k, names):
    model.zero_grad()
    model(torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))).exit_logits[exit_k].sum().backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if n.startswith(names) and p.grad is not None}


def test_gradient_equilibrium_rescales_the_coarsest_scale_per_exit():
    model = _model().eval()
    n = model.num_exits  # 3
    plain0, plain1 = _grads(model, 0, ("blocks.0", "classifier.0")), _grads(model, 1, ("blocks.1",))
    create_method("multi_exit", model, gradient_equilibrium=True)
    assert model.grad_equilibrium
    ge0, ge1 = _grads(model, 0, ("blocks.0", "classifier.0")), _grads(model, 1, ("blocks.1",))
    assert ge0.keys() == plain0.keys() and len(ge0) > 4 and ge1.keys() == plain1.keys()
    for name, g in plain0.items():
        # exit 1 reads only block 1's coarsest scale: that gradient is scaled by 1/(N-0); its own head is not
        scale = 1.0 if name.startswith("classifier") else 1.0 / n
        torch.testing.assert_close(ge0[name], g * scale, rtol=1e-4, atol=1e-5 * g.abs().max().item())
    for name, g in plain1.items():  # exit 2's gradient into block 2 is scaled by 1/(N-1)
        torch.testing.assert_close(ge1[name], g / (n - 1), rtol=1e-4, atol=1e-5 * g.abs().max().item())
    with torch.no_grad():  # identity in the forward pass
        x = torch.randn(2, 3, 32, 32)
        model.grad_equilibrium = False
        a = model(x).exit_logits
        model.grad_equilibrium = True
        assert all(torch.equal(u, v) for u, v in zip(a, model(x).exit_logits))


def _block0_output_grads(model, exit_k):
    """Gradients arriving at block 1's output tensors (finest, coarsest) from exit ``exit_k`` alone."""
    seen = {}
    run_block = type(model).run_block

    def spy(k, state):
        out = run_block(model, k, state)
        if k == 0 and out[0].requires_grad:  # not during the (no-grad) ledger measurement
            out[0].register_hook(lambda g: seen.__setitem__("fine", g))
            out[-1].register_hook(lambda g: seen.__setitem__("coarse", g))
        return out

    model.run_block = spy
    model(torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(2))).exit_logits[exit_k].sum().backward()
    del model.run_block
    return seen.get("fine"), seen["coarse"]


def test_gradient_equilibrium_net_effect_at_block_1_output():
    model = _model().eval()  # N = 3 exits
    plain_fine, plain_coarse = _block0_output_grads(model, 1)
    _, plain_coarse0 = _block0_output_grads(model, 0)
    model.grad_equilibrium = True
    ge_fine, ge_coarse = _block0_output_grads(model, 1)
    _, ge_coarse0 = _block0_output_grads(model, 0)
    # exit 1's own gradient: 1/(N-0) = 1/3
    torch.testing.assert_close(ge_coarse0, plain_coarse0 / 3)
    # exit 2's gradient: 1/(N-1) at exit 2's head, times (N-0-1)/(N-0) = 2/3 on the way past exit 1
    torch.testing.assert_close(ge_coarse, plain_coarse * (1 / 2) * (2 / 3))
    # finer scales are not rescaled at block 1 (only exit 2's head factor 1/2 reaches them)
    torch.testing.assert_close(ge_fine, plain_fine / 2)
    assert plain_fine.abs().sum() > 0 and plain_coarse.abs().sum() > 0


def test_kd_term_value_by_hand():
    from ponder.methods.multi_exit import kd_loss

    student = torch.tensor([[0.0, 0.0]])
    teacher = torch.tensor([[math.log(3.0), 0.0]])  # softmax = [0.75, 0.25]
    kl = 0.75 * math.log(0.75 / 0.5) + 0.25 * math.log(0.25 / 0.5)
    assert kd_loss(student, teacher, 1.0).item() == pytest.approx(kl, rel=1e-5)
    assert kd_loss(student, teacher, 1.0, "mean").item() == pytest.approx(kl / 2, rel=1e-5)  # official: / classes
    q = 3 ** 0.5 / (1 + 3 ** 0.5)  # T = 2: softmax([ln3 / 2, 0])
    kl2 = q * math.log(q / 0.5) + (1 - q) * math.log((1 - q) / 0.5)
    assert kd_loss(student, teacher, 2.0).item() == pytest.approx(4 * kl2, rel=1e-5)
    with pytest.raises(ValueError, match="kd_reduction"):
        kd_loss(student, teacher, 1.0, "sum")


def test_multi_exit_loss_is_the_equal_weight_sum_of_exit_cross_entropies():
    model = _model()
    method = create_method("multi_exit", model)
    x, y = torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 3])
    torch.manual_seed(5)
    step = method.training_step(model, x, y)
    expected = sum(F.cross_entropy(z, y) for z in step.output.exit_logits)
    torch.testing.assert_close(step.loss, expected)
    assert set(step.metrics) >= {"acc", "acc_exit1", "acc_exit3"}
    with pytest.raises(ValueError, match="multi-exit model"):
        create_method("multi_exit", create_model("resnet20_cifar"))
    with pytest.raises(ValueError, match="collaboration=True"):
        create_method("multi_exit", model, collaboration=True)


def test_imta_stage2_collaboration_heads_kd_loss_and_frozen_backbone():
    model = _model(collaboration=True)
    method = create_method("multi_exit", model, collaboration=True, kd_gamma=0.3, kd_temperature=2.0, freeze_bn=True)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(n.startswith("collab.") for n in trainable)
    assert model.collab.heads[0].in_features == 8 and model.collab.heads[1].in_features == 16
    bn = model.blocks[0][0].layers[0].net[1]
    before = bn.running_mean.clone()
    model.train()
    x, y = torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 3])
    step = method.training_step(model, x, y)
    assert torch.equal(bn.running_mean, before)  # freeze_bn keeps backbone statistics
    out = step.output
    t = out.extras["teacher_logits"].detach()
    ce = [F.cross_entropy(z, y) for z in out.exit_logits]
    kd = [F.kl_div(F.log_softmax(z / 2, 1), F.softmax(t / 2, 1), reduction="batchmean") * 4 for z in out.exit_logits[:-1]]
    expected = ce[-1] + sum(0.7 * c + 0.3 * d for c, d in zip(ce[:-1], kd))
    torch.testing.assert_close(step.loss, expected)
    step.loss.backward()
    assert all(p.grad is None for n, p in model.named_parameters() if not n.startswith("collab."))
    # the collaboration model still runs with both executors alike
    model.eval()
    x = torch.randn(6, 3, 32, 32)
    with torch.no_grad():
        conf = torch.stack([z.softmax(1).amax(1) for z in model(x).exit_logits])
        model.set_thresholds(conf.median(1).values[:-1].tolist())
        dense = model(x)
        set_executor(model, "sparse")
        sparse = model(x)
    assert torch.equal(dense.exit_index, sparse.exit_index)
    torch.testing.assert_close(dense.logits, sparse.logits, rtol=1e-4, atol=1e-5)


def test_enabling_collaboration_later_adds_the_heads_to_every_cost():
    model = _model().eval()
    x = torch.randn(2, 3, 32, 32)
    before = model.exit_costs()
    with torch.no_grad():
        torch.testing.assert_close(model(x).macs, torch.full((2,), float(before[-1]), dtype=torch.float64))
    model.enable_collaboration()
    after = model.exit_costs()
    # exit k gains the MACs of its own head and of the ISC heads of exits 1..k (plus those before it)
    assert all(a > b for a, b in zip(after, before))
    with torch.no_grad():
        torch.testing.assert_close(model(x).macs, torch.full((2,), float(after[-1]), dtype=torch.float64))
