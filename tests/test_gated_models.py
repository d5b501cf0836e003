"""Gated ResNets (ConvNet-AIG, SP-Net, CoDiNet, RDI-Net): the decision rule, deterministic eval, masked ==
sparse for every router with learned decisions, and the ledger of each option against FlopCounterMode."""

from __future__ import annotations

import pytest
import torch

from ponder import count_macs
from ponder.models.aig import AIGResNet
from ponder.models.codinet import CoDiNetResNet
from ponder.models.gated import GatedResNet
from ponder.models.rdinet import RDINetResNet
from ponder.models.resnet import CifarResNet
from ponder.models.spnet import SPNetResNet
from ponder.nn.executor import set_executor
from ponder.nn.routers import eval_option, route
from ponder.registry import create_model

from conftest import assert_bound_steps_match

FAMILIES = {"aig": (AIGResNet, "B"), "spnet": (SPNetResNet, "A"), "codinet": (CoDiNetResNet, "A"),
            "rdinet": (RDINetResNet, "A")}


def tiny(family: str, depth: int = 14, seed: int = 0) -> GatedResNet:
    """A small gated CIFAR ResNet in eval mode whose routers decide differently per sample."""
    torch.manual_seed(seed)
    cls, shortcut = FAMILIES[family]
    model = cls(CifarResNet(depth, shortcut=shortcut))
    for m in model.modules():  # non-trivial BN statistics, and routers that vary with the input
        if isinstance(m, (torch.nn.BatchNorm2d, torch.nn.BatchNorm1d)):
            m.running_mean.uniform_(-0.2, 0.2)
            m.running_var.uniform_(0.5, 1.5)
    for layer in model.routers.final_layers():
        torch.nn.init.normal_(layer.weight, std=2.0)
        torch.nn.init.zeros_(layer.bias)
    return model.eval()


def images(n: int, seed: int = 1) -> torch.Tensor:
    return torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


# the decision rule -------------------------------------------------------------------------
def test_eval_option_is_the_argmax_at_the_default_threshold_with_ties_to_more_work():
    logits = torch.tensor([[0.0, 1.0], [1.0, 0.0], [0.5, 0.5]])
    assert eval_option(logits).tolist() == [1, 0, 1]
    three = torch.tensor([[0.0, 0.5, 0.8], [2.0, 1.0, 0.0], [0.3, 0.3, 0.1], [0.0, 0.0, 0.0]])
    assert eval_option(three).tolist() == [2, 0, 1, 2]


def test_the_host_decision_of_one_image_is_eval_option():
    from ponder.nn.routers import eval_choice

    g = torch.Generator().manual_seed(0)
    for k in (2, 3):
        logits = torch.randint(-2, 3, (200, k), generator=g).float() / 2  # many ties
        logits = torch.cat([logits, torch.randn(200, k, generator=g)])
        assert [eval_choice(row) for row in logits.tolist()] == eval_option(logits).tolist()


def test_eval_option_threshold_is_the_keep_probability_for_two_options_and_biases_work_for_three():
    logits = torch.tensor([[0.0, 1.0]])  # p(run) = sigmoid(1) = 0.731
    assert eval_option(logits, 0.73).item() == 1 and eval_option(logits, 0.74).item() == 0
    assert eval_option(logits, 0.0).item() == 1 and eval_option(logits, 1.0).item() == 0
    # t = 1 / (1 + e): bias b = log((1 - t) / t) = 1 per unit of work -> scores [0, 0.5 + 0.5, 0.8 + 1]
    t = 1 / (1 + torch.e)
    assert eval_option(torch.tensor([[0.0, 0.5, 0.8]]), t).item() == 2
    # t = 1 / (1 + e^-1): b = -1 -> scores [0.6, 0.9 - 0.5, 1.2 - 1] = [0.6, 0.4, 0.2]: skip
    assert eval_option(torch.tensor([[0.6, 0.9, 1.2]]), 1 / (1 + torch.e ** -1)).item() == 0
    assert eval_option(torch.tensor([[5.0, 0.0, 0.0]]), 0.0).item() == 2


def test_training_route_is_a_hard_sample_with_the_softmax_gradient():
    torch.manual_seed(0)
    logits = torch.tensor([[0.3, -0.2, 0.9]], requires_grad=True)
    r = route(logits, training=True)
    assert r.mask.detach().sum().item() == 1.0 and r.mask[0, r.option].item() == 1.0
    (r.mask * torch.tensor([[1.0, 2.0, 3.0]])).sum().backward()
    assert logits.grad is not None and logits.grad.abs().sum() > 0  # straight through the soft sample
    forced = route(logits.detach(), training=True, forced=torch.tensor([1.0]))
    assert forced.option.item() == 2 and forced.mask.tolist() == [[0.0, 0.0, 1.0]]


# deterministic eval, masked == sparse --------------------------------------------------------
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_eval_is_deterministic_and_executors_agree_on_learned_decisions(family):
    model = tiny(family)
    x = images(6)
    with torch.no_grad():
        a, b = model(x), model(x)
        set_executor(model, "sparse")
        s = model(x)
        one_by_one = torch.cat([model(x[j : j + 1]).extras["options"] for j in range(len(x))])  # batch-1 path
    assert torch.equal(a.logits, b.logits) and torch.equal(a.extras["options"], b.extras["options"])
    assert torch.equal(one_by_one, a.extras["options"])
    options = a.extras["options"]
    assert 0 < float(a.gates.mean()) < 1, "decisions should be mixed for this test to mean something"
    if family == "rdinet":
        assert set(options.unique().tolist()) == {0, 1, 2}
    assert torch.equal(options, s.extras["options"]) and torch.equal(a.macs, s.macs)
    torch.testing.assert_close(a.logits, s.logits, rtol=1e-4, atol=1e-4)


def test_noisy_eval_is_the_official_aig_behaviour_and_off_by_default():
    model = tiny("aig")
    x = images(8)
    model.noisy_eval = True
    torch.manual_seed(0)
    with torch.no_grad():
        first, second = model(x).extras["options"], model(x).extras["options"]
    assert not torch.equal(first, second)


def test_features_are_every_block_and_every_stage_output():
    model = tiny("spnet").train()
    out = model(images(2), features=True)
    feats = out.extras["block_features"]
    assert len(feats) == model.num_blocks == 6
    assert [f.shape[1] for f in out.extras["stage_features"]] == [16, 32, 64]
    assert out.extras["stage_features"][-1] is feats[-1]
    assert out.extras["usage"].shape == (2, 6) and out.extras["router_logits"].shape == (2, 6, 2)


# the ledger ------------------------------------------------------------------------------------
def test_router_and_skip_path_units_by_hand():
    aig = create_model("aig_resnet110_cifar").eval()
    led = aig.ledger((3, 32, 32))
    # pooled C -> 16 -> 2: 16 C + 32 MACs per gate; the reference's 66,432 FLOPs over ResNet-110's 54 gates
    assert led["routers.0"] == 16 * 16 + 32 and led["routers.53"] == 64 * 16 + 32
    assert sum(led[f"routers.{i}"] for i in range(54)) == 66_432 // 2
    codinet = tiny("codinet")
    led = codinet.ledger((3, 32, 32))
    first_of_stage2 = 2  # ResNet-14: 2 blocks per stage
    assert led[f"blocks.{first_of_stage2}.skip"] == 16 * 32 * 16 * 16  # 1x1 conv, stride 2, to 16x16
    assert led["blocks.1.skip"] == 0  # identity
    rdi = tiny("rdinet")
    led = rdi.ledger((3, 32, 32))
    assert led["blocks.0.half"] == 16 * 16 * 9 * 32 * 32  # conv1 only, option-A shortcut is free
    assert led[f"blocks.{first_of_stage2}.half"] == 16 * 32 * 9 * 16 * 16


@pytest.mark.parametrize("option", [0, 1, 2, "mixed"])
def test_each_rdinet_option_charges_what_flop_counter_counts(option):
    model = tiny("rdinet")
    set_executor(model, "sparse")
    n = model.num_blocks
    per_block = [i % 3 for i in range(n)] if option == "mixed" else [option] * n
    for layer, o in zip(model.routers.final_layers(), per_block):
        torch.nn.init.zeros_(layer.weight)
        bias = torch.full((3,), -10.0)
        bias[o] = 10.0
        layer.bias.data.copy_(bias)
    x = images(1)
    with torch.no_grad():
        out = model(x)
    assert out.extras["options"][0].tolist() == per_block
    assert out.macs.item() == count_macs(model, x)
    led = model.ledger((3, 32, 32))
    suffix = {0: ".skip", 1: ".half", 2: ""}
    blocks = sum(led[f"blocks.{i}{suffix[o]}"] for i, o in enumerate(per_block))
    fixed = led["stem"] + led["head"] + sum(led[f"routers.{i}"] for i in range(n))
    assert out.macs.item() == blocks + fixed


def test_router_inference_follows_weight_and_statistics_changes():
    from ponder.nn.routers import PooledRouter

    torch.manual_seed(0)
    router = PooledRouter(8, 16, 2, norm=True, act=True).eval()
    x = torch.randn(3, 8, 5, 5) + torch.randn(3, 8, 1, 1)
    with torch.no_grad():
        first = router.infer(x)  # folded BN, cached
        torch.testing.assert_close(first, router(x))
        router.train()
        router(torch.randn(16, 8, 5, 5) + 3 * torch.randn(16, 8, 1, 1))  # a train-mode forward moves the running statistics in place
        router.eval()
        torch.testing.assert_close(router.infer(x), router(x))
        assert not torch.allclose(router.infer(x), first)
        router.fc1.weight.mul_(2)  # an in-place edit (an optimizer step)
        torch.testing.assert_close(router.infer(x), router(x))


@pytest.mark.parametrize("family", ["aig", "rdinet"])  # independent routers, and relational ones (with a state)
def test_the_batch_one_plan_follows_changes_and_matches_the_masked_executor(family):
    from ponder.fast import plan

    model = tiny(family)
    x = images(1)
    set_executor(model, "sparse")
    with torch.no_grad():
        model(x)
        if plan._PLANS.get(model) is None:
            pytest.skip("batch-1 plans need fast paths on")
        block = model.backbone.blocks[1]
        block.conv2.weight.mul_(-1.5)  # changes after the plan was built
        model.routers.final_layers()[2].weight.add_(0.5)
        model.train()
        model.backbone(images(8, seed=3))  # new BN running statistics
        model.eval()
        for keep in (None, 1.0):  # learned decisions, and every block run (the forced path)
            model.force_keep_rate(keep, seed=0)
            sparse = model(x)
            set_executor(model, "masked")
            masked = model(x)
            set_executor(model, "sparse")
            assert torch.equal(sparse.extras["options"], masked.extras["options"])
            torch.testing.assert_close(sparse.logits, masked.logits, rtol=1e-4, atol=1e-4)
            torch.testing.assert_close(sparse.extras["router_logits"], masked.extras["router_logits"], rtol=1e-5,
                                       atol=1e-5)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_bound_router_steps_equal_the_module_steps(family):
    """Each bank's batch-1 steps (one compiled call per router where the kernels are built: the pooled MLP,
    and RDI-Net's graph and output layers too) give the module's logits and states, step after step."""
    model = tiny(family)
    with torch.no_grad():
        inputs = [model.backbone.stem(images(1)).contiguous(memory_format=torch.channels_last)]
        for block in model.backbone.blocks[:-1]:  # each router reads its block's input
            inputs.append(block(inputs[-1]).contiguous(memory_format=torch.channels_last))
    assert_bound_steps_match(model.routers, inputs, atol=1e-5)
