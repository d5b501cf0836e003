"""BlockDrop models: registry, ledger vs FlopCounterMode (policy included), knobs, weights."""

from __future__ import annotations

import pytest
import torch

from ponder.cost import count_macs
from ponder.models.base import profile
from ponder.models.resnet import AvgPoolShortcut, CifarResNet
from ponder.nn.executor import set_executor
from ponder.registry import create_model, list_models


def _model(name: str = "blockdrop_resnet32_cifar", **kw):
    torch.manual_seed(0)
    return create_model(name, **kw).eval()


def test_registered_with_block_counts():
    assert {"blockdrop_resnet32_cifar", "blockdrop_resnet110_cifar", "blockdrop_resnet101",
            "blockdrop_seq_resnet110_cifar"} <= set(list_models("blockdrop*"))
    assert _model().num_blocks == 15
    assert _model("blockdrop_resnet110_cifar").policy.fc.out_features == 54
    assert _model("blockdrop_resnet101").policy.fc.out_features == 33


@pytest.mark.parametrize("name", ["blockdrop_resnet32_cifar", "blockdrop_resnet110_cifar",
                                  "blockdrop_seq_resnet110_cifar"])
def test_cifar_models_use_blockdrops_avgpool_shortcut(name):
    m = _model(name)
    trunks = [m.backbone] + ([m.policy.trunk] if hasattr(m, "policy") else [])
    for net in trunks:
        shortcuts = [b.downsample for b in net.blocks if b.downsample is not None]
        assert len(shortcuts) == 2 and all(isinstance(s, AvgPoolShortcut) for s in shortcuts)


def test_output_contract():
    m = _model()
    out = m(torch.randn(3, 3, 32, 32))
    assert out.gates.shape == (3, 15) and set(out.gates.unique().tolist()) <= {0.0, 1.0}
    assert out.macs.shape == (3,) and out.macs.dtype == torch.float64
    assert out.extras["probs"].shape == (3, 15) and out.extras["log_prob"].shape == (3,)
    assert out.logits.shape == (3, 10)
    led = m.ledger((3, 32, 32))
    per_block = torch.tensor([float(led[f"blocks.{i}"]) for i in range(15)], dtype=torch.float64)
    expected = led["stem"] + led["head"] + led["policy"] + out.gates.double() @ per_block
    torch.testing.assert_close(out.macs, expected)


def test_eval_is_deterministic_and_greedy():
    m = _model()
    x = torch.randn(4, 3, 32, 32)
    a, b = m(x), m(x)
    assert torch.equal(a.gates, b.gates) and torch.equal(a.logits, b.logits)
    assert torch.equal(a.gates, (a.extras["probs"] >= 0.5).float())


@pytest.mark.parametrize("name,shortcut,size", [
    ("blockdrop_resnet32_cifar", None, 32), ("blockdrop_resnet32_cifar", "A", 32),
    ("blockdrop_resnet32_cifar", "B", 32), ("blockdrop_seq_resnet110_cifar", None, 32),
    ("blockdrop_seq_resnet110_cifar", "B", 32), ("blockdrop_resnet101", None, 64)])
def test_ledger_equals_flop_counter_sparse_batch1(name, shortcut, size):
    m = set_executor(_model(name, shortcut=shortcut), "sparse")
    led = m.ledger((3, size, size))
    assert led.total == m.backbone.ledger((3, size, size)).total + led["policy"] and led["policy"] > 0
    g = torch.Generator().manual_seed(1)
    seen = set()
    for rate in (0.2, 0.5, 0.8):
        x = torch.randn(1, 3, size, size, generator=g)
        m.force_keep_rate(rate, seed=int(rate * 10))
        out = m(x)
        seen.add(out.macs.item())
        m.force_keep_rate(rate, seed=int(rate * 10))  # the same decisions again
        assert out.macs.item() == count_macs(m, x), f"{name} rate {rate}"
    m.force_keep_rate(None)
    x = torch.randn(1, 3, size, size, generator=g)
    assert m(x).macs.item() == count_macs(m, x)
    assert len(seen) == 3  # different decisions, different costs


@pytest.mark.parametrize("name", ["blockdrop_resnet32_cifar", "blockdrop_seq_resnet110_cifar"])
@pytest.mark.parametrize("shortcut", [None, "B"])
@pytest.mark.parametrize("batch", [1, 5])
def test_masked_and_sparse_agree(name, shortcut, batch):
    m = _model(name, shortcut=shortcut)
    x = torch.randn(batch, 3, 32, 32)
    m.force_keep_rate(0.4, seed=3)
    masked = m(x)
    m.force_keep_rate(0.4, seed=3)
    sparse = set_executor(m, "sparse")(x)
    assert torch.equal(masked.gates, sparse.gates)
    torch.testing.assert_close(masked.logits, sparse.logits, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(masked.macs, sparse.macs)


def test_threshold_knob_trades_blocks_for_macs():
    m = _model()
    x = torch.randn(6, 3, 32, 32)
    led = m.ledger((3, 32, 32))
    m.set_knob(0.0)
    full = m(x)
    assert full.gates.all() and torch.all(full.macs == led.total)
    torch.testing.assert_close(full.logits, m.dense_baseline().forward_logits(x))
    m.set_knob(1.0)
    none = m(x)
    assert not none.gates.any()
    assert torch.all(none.macs == led["stem"] + led["head"] + led["policy"])
    blocks = []
    for t in (0.3, 0.5, 0.7):
        m.set_knob(t)
        blocks.append(m(x).gates.sum().item())
    assert blocks == sorted(blocks, reverse=True)
    with pytest.raises(ValueError, match="keep threshold in"):
        m.set_knob(1.5)


def test_force_keep_rate_is_seeded_and_reversible():
    m = _model("blockdrop_resnet110_cifar")
    x = torch.randn(8, 3, 32, 32)
    m.force_keep_rate(0.3, seed=5)
    a = m(x).gates
    m.force_keep_rate(0.3, seed=5)
    assert torch.equal(a, m(x).gates)
    assert abs(a.mean().item() - 0.3) < 0.07
    m.force_keep_rate(None)
    assert torch.equal(m(x).gates, (m(x).extras["probs"] >= 0.5).float())


def test_curriculum_keeps_early_blocks():
    m = _model()
    m.set_knob(1.0)  # the policy would drop everything
    m.set_curriculum(4)
    gates = m(torch.randn(3, 3, 32, 32)).gates
    assert gates[:, :11].all() and not gates[:, 11:].any()
    assert m.decided().tolist() == [False] * 11 + [True] * 4
    assert m.state_dict()["first_decided"].item() == 11
    m.set_curriculum(None)
    assert m.decided().all()


def test_backbone_loads_from_plain_resnet_run(tmp_path):
    from ponder.engine.checkpoint import save_weights
    from ponder.weights import load_init_weights

    torch.manual_seed(1)
    resnet = CifarResNet(32, num_classes=10)
    save_weights(resnet, tmp_path / "weights.safetensors")
    m = _model()
    policy_before = {k: v.clone() for k, v in m.policy.state_dict().items()}
    missing, unexpected = load_init_weights(m, tmp_path)
    assert not missing and not unexpected
    for k, v in resnet.state_dict().items():
        assert torch.equal(m.backbone.state_dict()[k], v)
    for k, v in m.policy.state_dict().items():
        assert torch.equal(policy_before[k], v)
    # the model's own keys round-trip strictly
    other = _model()
    other.load_state_dict(m.state_dict())
    assert torch.equal(other.backbone.conv1.weight, resnet.conv1.weight)


def test_profile_counts_the_policy():
    m = _model()
    prof = profile(m, (3, 32, 32))
    assert prof.blocks[-1]["name"] == "policy" and prof.blocks[-1]["macs"] == m.ledger((3, 32, 32))["policy"]
    assert prof.macs == 68_862_592 + prof.blocks[-1]["macs"]  # golden ResNet-32 + ResNet-8 policy
    assert len(prof.blocks) == 16


def test_imagenet_policy_trunk_from_resnet18(tmp_path):
    from ponder.engine.checkpoint import save_weights

    torch.manual_seed(2)
    r18 = create_model("resnet18")
    save_weights(r18, tmp_path / "r18.safetensors")
    m = create_model("blockdrop_resnet101", policy_init=str(tmp_path / "r18.safetensors"))
    trunk = m.policy.trunk
    assert torch.equal(trunk.conv1.weight, r18.conv1.weight)
    assert torch.equal(trunk.layer3[0].downsample[0].weight, r18.layer3[0].downsample[0].weight)
    assert torch.equal(trunk.layer4[0].bn2.running_var, r18.layer4[0].bn2.running_var)
    torch.save({"conv1.weight": r18.conv1.weight}, tmp_path / "stem_only.pt")
    with pytest.raises(ValueError, match="lacks"):
        create_model("blockdrop_resnet101", policy_init=str(tmp_path / "stem_only.pt"))


def test_init_keep_prob_starts_policy_near_that_keep_probability():
    import math

    model = create_model("blockdrop_resnet32_cifar", init_keep_prob=0.9)
    assert torch.allclose(model.policy.fc.bias, torch.full((15,), math.log(9.0)))
    with pytest.raises(ValueError, match="init_keep_prob"):
        create_model("blockdrop_resnet32_cifar", init_keep_prob=1.0)
