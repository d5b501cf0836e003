"""ACT / SACT ResNets: registration, dense-weight loading, ledger cost, executors, bench hooks."""

import pytest
import torch

import ponder
from ponder.cost import count_macs
from ponder.models.act import ACTCifarResNet, load_dense_weights
from ponder.models.resnet import CifarResNet
from ponder.nn.executor import set_executor
from ponder.nn.halting import HALT_BIAS_INIT

MODELS = ["act_resnet32_cifar", "act_resnet110_cifar", "sact_resnet32_cifar", "sact_resnet110_cifar",
          "act_resnet50", "act_resnet101", "sact_resnet50", "sact_resnet101"]
H0 = torch.sigmoid(torch.tensor(HALT_BIAS_INIT)).item()


def _randomize_halting(model, seed=0, std=0.5, bias=0.0):
    """Halting branches that halt positions at varied units (so masks are neither all-on nor all-off)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for stage in model.halting:
            for branch in stage:
                for name, p in branch.named_parameters():
                    if not name.startswith("bn."):
                        p.copy_(torch.randn(p.shape, generator=gen) * std)
                (branch.local.bias if model.spatial else branch.fc.bias).fill_(bias)


def _small(spatial, depth=14, seed=0):
    torch.manual_seed(seed)
    model = ACTCifarResNet(depth, num_classes=10, spatial=spatial)
    _randomize_halting(model, seed)
    return model.eval()


def test_all_models_registered():
    assert set(MODELS) <= set(ponder.list_models("*act_resnet*"))


@pytest.mark.parametrize("name, dense", [("sact_resnet32_cifar", "resnet32_cifar"), ("act_resnet110_cifar", "resnet110_cifar"),
                                         ("sact_resnet50", "resnet50")])
def test_dense_weights_load_and_only_halting_keys_are_new(name, dense):
    model, base = ponder.create_model(name), ponder.create_model(dense)
    extra = set(model.state_dict()) - set(base.state_dict())
    assert extra and all(k.startswith("halting.") for k in extra)
    assert set(base.state_dict()) <= set(model.state_dict())
    missing = load_dense_weights(model, base.state_dict())
    assert set(missing) == {k for k in extra if not k.endswith("num_batches_tracked")}
    assert torch.equal(model.state_dict()["conv1.weight"], base.state_dict()["conv1.weight"])


def test_load_dense_weights_rejects_other_depth():
    with pytest.raises(ValueError, match="do not fit"):
        load_dense_weights(ponder.create_model("sact_resnet32_cifar"), ponder.create_model("resnet20_cifar").state_dict())


@pytest.mark.parametrize("spatial", [False, True])
def test_fresh_model_runs_every_unit_and_costs_its_dense_total(spatial):
    model = ponder.create_model("sact_resnet32_cifar" if spatial else "act_resnet32_cifar").eval()
    out = model(torch.randn(3, 3, 32, 32))
    led = model.ledger((3, 32, 32))
    # sigmoid(-3) * 4 < 0.99: all 5 units run everywhere; rho = 5 + (1 - 4 h0) per stage
    assert torch.allclose(out.extras["ponder_cost"], torch.full((3,), 3 * (6 - 4 * H0)), atol=1e-5)
    assert torch.equal(out.macs, torch.full((3,), float(led.total), dtype=torch.float64))
    dense = ponder.create_model("resnet32_cifar").ledger((3, 32, 32)).total
    halting = sum(v for k, v in led.units.items() if k.startswith("halt."))
    local = 4 * (16 * 9 * 32 * 32 + 32 * 9 * 16 * 16 + 64 * 9 * 8 * 8) if spatial else 0  # 3x3 C->1 convs
    assert halting == local + 4 * (16 + 32 + 64)  # + global linear terms C->1
    assert led.total == dense + halting


def test_output_contract_shapes():
    model = _small(True)
    out = model(torch.randn(2, 3, 32, 32))
    assert out.logits.shape == (2, 10) and out.macs.shape == (2,) and out.macs.dtype == torch.float64
    assert [p.shape for p in out.ponder] == [(2, 32, 32), (2, 16, 16), (2, 8, 8)]
    assert len(out.masks) == 6 and all(m.dtype == torch.bool for m in out.masks)
    assert out.masks[0].all() and out.masks[2].all() and out.masks[4].all()  # first unit of each stage is dense
    assert out.extras["ponder_cost"].shape == (2,)
    act = _small(False)(torch.randn(2, 3, 32, 32))
    assert act.gates.shape == (2, 6) and [p.shape for p in act.ponder] == [(2,)] * 3


def test_sact_masks_are_nested_and_some_positions_halt():
    out = _small(True, depth=20)(torch.randn(2, 3, 32, 32))
    later = [out.masks[i] for i in (4, 5)]  # units 2 and 3 of stage 2
    assert (later[1] <= later[0]).all()
    assert 0 < later[0].float().mean() < 1


@pytest.mark.parametrize("spatial", [False, True])
def test_ponder_cost_backpropagates_to_halting_branches(spatial):
    model = _small(spatial).train()
    model(torch.randn(4, 3, 32, 32)).extras["ponder_cost"].mean().backward()
    grads = [p.grad for stage in model.halting for b in stage for p in b.parameters()]
    assert any(g is not None and g.abs().sum() > 0 for g in grads)


def test_act_masked_and_sparse_executors_agree_and_sparse_skips_images():
    model = _small(False, depth=20)
    x = torch.randn(6, 3, 32, 32)
    masked = model(x)
    set_executor(model, "sparse")
    sparse = model(x)
    assert 0 < masked.gates.mean() < 1
    assert torch.equal(masked.gates, sparse.gates)
    assert torch.allclose(masked.logits, sparse.logits, atol=1e-4)
    assert torch.equal(masked.macs, sparse.macs)


@pytest.mark.parametrize("spatial", [False, True])
def test_ledger_equals_flop_counter_on_sparse_executor_at_batch_1(spatial):
    model = _small(spatial, depth=20)
    set_executor(model, "sparse")
    model.break_even = None  # always sparse: no dense fall-back, so the counter sees the sparse work
    for seed in range(3):
        x = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(seed))
        out = model(x)
        assert out.macs.item() == count_macs(model, x)
    assert out.macs.item() < model.ledger((3, 32, 32)).total


def test_sact_masked_and_sparse_executors_agree():
    model = _small(True, depth=20)
    model.break_even = None
    x = torch.randn(3, 3, 32, 32)
    masked = model(x)
    set_executor(model, "sparse")
    sparse = model(x)
    for a, b in zip(masked.masks, sparse.masks):
        assert torch.equal(a, b)
    later = torch.cat([m.flatten() for i, m in enumerate(masked.masks) if i % 3])  # units after the first
    assert 0.2 < later.float().mean() < 0.9
    assert torch.allclose(masked.logits, sparse.logits, atol=1e-4)
    for a, b in zip(masked.ponder, sparse.ponder):
        assert torch.allclose(a, b, atol=1e-5)
    assert torch.equal(masked.macs, sparse.macs)


def test_dense_unit_channels_last_equals_the_unit_and_is_not_counted():
    from ponder.nn.dense_units import dense_unit_channels_last

    model = _small(True)
    block = model.layer2[0]  # strided, zero-pad shortcut
    x = torch.randn(2, 16, 32, 32).relu()
    with torch.no_grad():
        y = dense_unit_channels_last(block, x)  # times both routes once, then caches the faster
        assert y.is_contiguous(memory_format=torch.channels_last)
        assert torch.allclose(y, block(x), atol=1e-5)
        assert count_macs(lambda t: dense_unit_channels_last(block, t), x[:1]) == count_macs(block, x[:1])


def test_force_keep_rate_sets_active_fraction_and_none_restores():
    model = _small(True, depth=20)
    x = torch.randn(2, 3, 32, 32)
    learned = model(x)
    model.force_keep_rate(0.25, seed=1)
    forced = model(x)
    per_stage = 3
    for i, m in enumerate(forced.masks):
        if i % per_stage == 0:
            assert m.all()
        else:
            hw = m.shape[1] * m.shape[2]
            assert torch.equal(m.flatten(1).sum(1), torch.full((2,), round(0.25 * hw)))
    assert torch.equal(model(x).masks[1], forced.masks[1])  # same seed, same masks
    model.force_keep_rate(None)
    assert torch.equal(model(x).logits, learned.logits)
    with pytest.raises(ValueError, match="keep rate"):
        model.force_keep_rate(1.5)


def test_dense_baseline_is_the_plain_resnet():
    model = _small(True)
    ref = CifarResNet(14).eval()
    ref.load_state_dict({k: v for k, v in model.state_dict().items() if not k.startswith("halting.")})
    x = torch.randn(2, 3, 32, 32)
    dense = model.dense_baseline()
    assert torch.allclose(dense(x), ref(x).logits, atol=1e-5)
    assert count_macs(dense, x[:1]) == ref.ledger((3, 32, 32)).total


def test_fully_convolutional_cost_grows_with_resolution():
    model = _small(True)
    small, big = model(torch.randn(1, 3, 32, 32)), model(torch.randn(1, 3, 48, 40))
    assert big.ponder[0].shape == (1, 48, 40)
    assert model.ledger((3, 48, 40)).total > model.ledger((3, 32, 32)).total
    assert big.macs.item() > 0 and small.macs.item() > 0


def test_imagenet_sact_evaluates_at_a_larger_resolution():
    torch.manual_seed(0)
    model = ponder.create_model("sact_resnet50", num_classes=7).eval()
    out = model(torch.randn(1, 3, 64, 64))
    big = model(torch.randn(1, 3, 96, 96))
    assert out.logits.shape == big.logits.shape == (1, 7)
    assert [p.shape[1:] for p in big.ponder] == [(24, 24), (12, 12), (6, 6), (3, 3)]
    assert big.macs.item() > 2 * out.macs.item()


def test_train_init_from_a_dense_weights_file_leaves_only_halting_fresh(tmp_path):
    from ponder.engine.checkpoint import save_weights
    from ponder.weights import load_init_weights

    dense = CifarResNet(14)
    save_weights(dense, tmp_path / "dense.safetensors")
    model = ACTCifarResNet(14, spatial=True)
    missing, unexpected = load_init_weights(model, tmp_path / "dense.safetensors")
    assert not unexpected and missing and all(k.startswith("halting.") for k in missing)
    assert torch.equal(model.layer2[1].conv1.weight, dense.layer2[1].conv1.weight)
    assert model.halting[0][0].local.bias.item() == HALT_BIAS_INIT


@pytest.mark.parametrize("spatial", [False, True])
def test_sparse_executor_skips_units_after_everything_halted_and_still_agrees(spatial, monkeypatch):
    from ponder.nn.halting import ACTAccumulator

    model = _small(spatial, depth=20)
    _randomize_halting(model, seed=1, std=0.1, bias=8.0)  # h ~ 1: everything halts after unit 1 of a stage
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        masked = model(x)
    calls = []
    finish = ACTAccumulator.finish_halted
    monkeypatch.setattr(ACTAccumulator, "finish_halted", lambda self: (calls.append(1), finish(self))[1])
    set_executor(model, "sparse")
    with torch.no_grad():
        sparse = model(x)
    assert len(calls) == 3  # once per stage
    assert torch.allclose(masked.logits, sparse.logits, atol=1e-4) and torch.equal(masked.macs, sparse.macs)
    for a, b in zip(masked.ponder, sparse.ponder):
        assert torch.equal(a, b)
    if spatial:
        assert len(sparse.masks) == len(masked.masks) and all(torch.equal(a, b) for a, b in zip(masked.masks, sparse.masks))
        assert not any(m.any() for i, m in enumerate(sparse.masks) if i % 3)
    else:
        assert torch.equal(masked.gates, sparse.gates) and sparse.gates[:, 1::3].sum() == 0
    with torch.enable_grad(), pytest.raises(RuntimeError, match="inference"):
        ACTAccumulator(2, (1,), "cpu").finish_halted()
    with torch.no_grad(), pytest.raises(RuntimeError, match="still running"):
        ACTAccumulator(2, (1,), "cpu").finish_halted()


def test_sact_imagenet_sparse_executor_agrees_with_masked_stem_included():
    from ponder.models.act import ACTImageNetResNet
    from ponder.nn.dense_units import stem_on_kernels
    from ponder.models.resnet import Bottleneck
    from test_sparse_conv import randomise_bn

    torch.manual_seed(0)
    model = randomise_bn(ACTImageNetResNet(Bottleneck, [1, 2, 1, 1], num_classes=7, spatial=True)).eval()
    _randomize_halting(model, seed=2, std=0.3)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        stem = stem_on_kernels(model, x)
        assert stem.is_contiguous(memory_format=torch.channels_last)
        torch.testing.assert_close(stem, model.stem(x), atol=1e-4, rtol=1e-4)
        masked = model(x)
        set_executor(model, "sparse")
        sparse = model(x)
    assert all(torch.equal(a, b) for a, b in zip(masked.masks, sparse.masks))
    assert 0 < sparse.masks[2].float().mean() < 1  # unit 2 of stage 2 runs on part of the map
    torch.testing.assert_close(sparse.logits, masked.logits, atol=1e-3, rtol=1e-3)
    assert torch.equal(masked.macs, sparse.macs)


@pytest.mark.parametrize("break_even", [0.0, None])  # every unit on its bound dense fall-back; every unit sparse
def test_sact_prepared_units_follow_weight_changes(break_even):
    """The sparse executor prepares each unit once per input shape (ponder.fast.prepared); a change to the
    weights after that first forward must reach the next one."""
    model = _small(True, depth=20)
    model.break_even = break_even
    x = torch.randn(1, 3, 32, 32)
    set_executor(model, "sparse")
    with torch.no_grad():
        model(x)
        model.blocks[4].conv2.weight.mul_(-2.0)
        model.blocks[8].bn1.running_var.mul_(3.0)
        sparse = model(x)
    set_executor(model, "masked")
    with torch.no_grad():
        masked = model(x)
    for a, b in zip(masked.masks, sparse.masks):
        assert torch.equal(a, b)
    torch.testing.assert_close(sparse.logits, masked.logits, atol=1e-4, rtol=1e-4)
