"""SkipNet models: gate placement, skipped-block output, executors, ledger, knobs and hooks."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from ponder.cost import count_macs
from ponder.models.resnet import CifarResNet
from ponder.models.skipnet import SkipNet
from ponder.nn.executor import set_executor
from ponder.registry import create_model, list_models

GATES = ["ffgate1", "ffgate2", "rnn"]


def small(gate_type: str, seed: int = 0) -> SkipNet:
    """SkipNet on a CIFAR ResNet-14 (6 blocks, projection shortcuts), eval mode, BN statistics randomised."""
    torch.manual_seed(seed)
    m = SkipNet(CifarResNet(14, shortcut="B"), gate_type=gate_type)
    for mod in m.modules():  # non-trivial BN so a wrong mixing rule shows up
        if isinstance(mod, torch.nn.BatchNorm2d):
            mod.running_mean.uniform_(-0.2, 0.2)
            mod.running_var.uniform_(0.5, 1.5)
            mod.bias.data.uniform_(-0.2, 0.2)
    return m.eval()


def test_registered_models_use_projection_shortcuts_and_gate_all_but_first_block():
    names = {"skipnet_resnet38_cifar", "skipnet_resnet74_cifar", "skipnet_resnet110_cifar"}
    assert names <= set(list_models("skipnet*"))
    m = create_model("skipnet_resnet38_cifar", gate_type="ffgate2")
    assert m.num_blocks == 18 and len(m.gate_bank) == 17
    assert m.backbone.shortcut_type == "B"
    assert create_model("skipnet_resnet110_cifar").num_blocks == 54
    with pytest.raises(ValueError, match="gate_type"):
        create_model("skipnet_resnet38_cifar", gate_type="lstm")


@pytest.mark.parametrize("gate_type", GATES)
def test_masked_and_sparse_executors_agree_for_hard_decisions(gate_type):
    m = small(gate_type)
    x = torch.randn(9, 3, 32, 32)
    for rate, seed in ((None, 0), (0.5, 1), (0.3, 2), (0.0, 3), (1.0, 4)):
        outs = []
        for ex in ("masked", "sparse"):
            set_executor(m, ex)
            m.force_keep_rate(rate, seed)
            with torch.no_grad():
                outs.append(m(x))
        a, b = outs
        assert torch.equal(a.gates, b.gates)
        torch.testing.assert_close(a.logits, b.logits, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(a.macs, b.macs)
        if rate == 0.5:
            cols = a.gates[:, 1:].mean(0)
            assert ((cols > 0) & (cols < 1)).any()  # mixed columns exercise gather/scatter


@pytest.mark.parametrize("gate_type", GATES)
def test_ledger_equals_flop_counter_on_sparse_executor_at_batch1(gate_type):
    m = set_executor(small(gate_type), "sparse")
    torch.manual_seed(1)
    for seed in range(4):
        x = torch.randn(1, 3, 32, 32)
        m.force_keep_rate(None if seed == 0 else 0.5, seed)
        out = m(x)
        m.force_keep_rate(None if seed == 0 else 0.5, seed)  # same decisions for the counted run
        assert out.macs.item() == count_macs(m, x)


def test_ledger_total_is_backbone_plus_every_gate():
    m = small("ffgate2")
    led = m.ledger((3, 32, 32))
    gates = sum(led[n] for n in m.gate_names)
    assert gates > 0 and led.total == m.backbone.ledger((3, 32, 32)).total + gates
    m.force_keep_rate(1.0)
    assert m(torch.randn(2, 3, 32, 32)).macs.tolist() == [float(led.total)] * 2
    # a skipped downsampling block still pays its 1x1 projection
    assert led["blocks.2.skip"] > 0 and led["blocks.1.skip"] == 0


def test_skipped_blocks_output_their_shortcut_without_relu():
    m = small("rnn")
    m.force_keep_rate(0.0)
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        out = m(x)
        bb = m.backbone
        h = bb.blocks[0](bb.stem(x))  # block 0 always runs
        for block in bb.blocks[1:]:
            h = block.shortcut(h)
        assert (h < 0).any()  # the projection's BN output is not rectified
        torch.testing.assert_close(out.logits, bb.head(h))
    assert out.gates[:, 0].eq(1).all() and out.gates[:, 1:].eq(0).all()


def test_all_blocks_kept_equals_the_dense_baseline():
    m = small("ffgate1")
    m.force_keep_rate(1.0)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(m(x).logits, m.dense_baseline().forward_logits(x))


@pytest.mark.parametrize("gate_type", GATES)
def test_gate_j_reads_block_j_output(gate_type):
    m = small(gate_type)
    m.force_keep_rate(1.0)  # fix decisions so only the perturbation changes the features
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        before = m(x).extras["gate_logits"]
        m.backbone.blocks[3].conv2.weight.mul_(3.0)
        after = m(x).extras["gate_logits"]
    torch.testing.assert_close(before[:, :3], after[:, :3])  # gates 0-2 read blocks 0-2
    assert not torch.allclose(before[:, 3], after[:, 3])     # gate 3 reads block 3


def test_threshold_is_the_inference_knob():
    m = small("ffgate2")
    x = torch.randn(16, 3, 32, 32)
    kept, macs = [], []
    with torch.no_grad():
        for t in (0.0, 0.3, 0.5, 0.7, 1.0):
            m.set_knob(t)
            out = m(x)
            kept.append(out.gates.sum().item())
            macs.append(out.macs.mean().item())
            logits = out.extras["gate_logits"]
            assert torch.equal(out.gates[:, 1:], (logits >= torch.logit(torch.tensor(t))).float())
            inside = (out.extras["gate_probs"] - t).abs() > 1e-6  # away from the threshold p decides alike
            assert torch.equal(out.gates[:, 1:][inside], (out.extras["gate_probs"] >= t).float()[inside])
    assert kept == sorted(kept, reverse=True) and kept[0] > kept[-1]
    assert macs == sorted(macs, reverse=True)
    with pytest.raises(ValueError, match="keep threshold in"):
        m.set_knob(1.5)


def test_straight_through_training_sends_ce_gradient_to_gates():
    m = small("rnn").train()
    m.decision_mode = "straight_through"
    out = m(torch.randn(4, 3, 32, 32))
    assert set(out.gates.unique().tolist()) <= {0.0, 1.0}
    F.cross_entropy(out.logits, torch.tensor([0, 1, 2, 3])).backward()
    assert m.gate_bank.out.weight.grad.abs().sum() > 0
    assert m.gate_bank.proj[0].weight.grad.abs().sum() > 0


def test_sample_mode_is_random_in_training_and_deterministic_in_eval():
    m = small("rnn")
    m.decision_mode = "sample"
    x = torch.randn(32, 3, 32, 32)
    torch.manual_seed(0)
    m.train()
    a, b = m(x).gates, m(x).gates
    assert not torch.equal(a, b)
    m.eval()
    with torch.no_grad():
        assert torch.equal(m(x).gates, m(x).gates)


def test_batch1_train_and_extras_shapes():
    m = small("ffgate1").train()
    out = m(torch.randn(1, 3, 32, 32))
    assert out.logits.shape == (1, 10) and out.gates.shape == (1, 6) and out.macs.shape == (1,)
    for key in ("gate_logits", "gate_probs", "gate_actions", "gate_log_probs"):
        assert out.extras[key].shape == (1, 5)
    with torch.no_grad():
        assert "gate_log_probs" not in m.eval()(torch.randn(1, 3, 32, 32)).extras  # inference skips them


def test_force_keep_rate_is_seeded_and_validated():
    m = small("ffgate2")
    x = torch.randn(64, 3, 32, 32)
    m.force_keep_rate(0.3, seed=5)
    with torch.no_grad():
        g1 = m(x).gates
        m.force_keep_rate(0.3, seed=5)
        g2 = m(x).gates
    assert torch.equal(g1, g2)
    assert abs(g1[:, 1:].mean().item() - 0.3) < 0.06
    with pytest.raises(ValueError, match="keep rate"):
        m.force_keep_rate(1.2)


def test_profile_blocks_reports_gate_and_skip_costs():
    m = small("ffgate2")
    rows = m.profile_blocks((3, 32, 32))
    assert [r["name"] for r in rows] == [f"blocks.{i}" for i in range(6)]
    assert rows[0]["gate_macs"] == 0 and all(r["gate_macs"] > 0 for r in rows[1:])


def test_init_keep_prob_opens_recurrent_gates():
    torch.manual_seed(0)
    x = torch.randn(8, 3, 32, 32)
    with torch.no_grad():
        opened = create_model("skipnet_resnet38_cifar", gate_type="rnn", init_keep_prob=0.9).eval()(x)
    assert opened.gates.mean().item() > 0.95
    assert opened.extras["gate_probs"].mean().item() > 0.8


def test_plain_resnet_weights_load_into_the_backbone():
    torch.manual_seed(3)
    plain = CifarResNet(14, shortcut="B")
    m = small("rnn")
    gate_w = m.gate_bank.out.weight.detach().clone()
    m.load_state_dict(plain.state_dict())
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(m.backbone.forward_logits(x), plain.eval().forward_logits(x))
    assert torch.equal(m.gate_bank.out.weight, gate_w)
    m.load_state_dict(small("rnn", seed=1).state_dict())  # its own keys still load strictly


@pytest.mark.parametrize("gate_type", GATES)
def test_batch1_plan_matches_the_masked_executor_and_follows_changes(gate_type):
    """One image at a time on the sparse executor (the batch-1 plan) gives the masked executor's gates,
    logits, extras and MACs, learned and forced, also after weights change once the plan is built."""
    m = small(gate_type)
    x = torch.randn(6, 3, 32, 32, generator=torch.Generator().manual_seed(5))

    def compare():
        for rate in (None, 0.5):
            m.force_keep_rate(rate, 1)
            set_executor(m, "masked")
            with torch.no_grad():
                a = m(x)
            set_executor(m, "sparse")
            with torch.no_grad():
                ones = [m(x[j:j + 1]) for j in range(len(x))]
            assert torch.equal(torch.cat([o.gates for o in ones]), a.gates)
            torch.testing.assert_close(torch.cat([o.logits for o in ones]), a.logits, atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(torch.cat([o.macs for o in ones]), a.macs)
            torch.testing.assert_close(torch.cat([o.extras["gate_logits"] for o in ones]), a.extras["gate_logits"],
                                       atol=1e-5, rtol=1e-5)
        return a

    first = compare()
    with torch.no_grad():
        m.backbone.blocks[2].conv2.weight.mul_(-1.0)
        for layer in m.gate_bank.final_layers():
            layer.bias.add_(0.3)
    assert not torch.equal(compare().logits, first.logits)


@pytest.mark.parametrize("depth, gates", [(18, 7), (50, 15)])
def test_imagenet_skipnets_gate_every_block_but_the_first_and_load_a_torchvision_resnet(depth, gates):
    """``skipnet_resnet{18..152}``: torchvision's ResNet under ``backbone.`` (a plain ResNet's weights load
    strictly), one recurrent gate per block after the first; every block kept equals the plain ResNet."""
    torch.manual_seed(0)
    m = create_model(f"skipnet_resnet{depth}", num_classes=10).eval()
    plain = create_model(f"resnet{depth}", num_classes=10).eval()
    assert m.gate_type == "rnn" and len(m.gate_bank) == gates == m.num_blocks - 1
    m.backbone.load_state_dict(plain.state_dict())
    m.force_keep_rate(1.0)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        out = m(x)
        assert out.gates.all()
        torch.testing.assert_close(out.logits, plain(x).logits, rtol=1e-4, atol=1e-4)
    assert {"skipnet_resnet34", "skipnet_resnet101", "skipnet_resnet152"} <= set(list_models("skipnet_resnet*"))
