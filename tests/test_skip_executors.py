"""The skippable-block layer: executor equality (property-based), ledger and usage statistics."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from ponder.cost import CostLedger, count_macs
from ponder.models.resnet import CifarResNet
from ponder.nn.executor import set_executor
from ponder.nn.skip import BlockSkipper, block_usage, skip_units


def _randomised(shortcut: str, depth: int = 14, seed: int = 0) -> CifarResNet:
    """A small CIFAR ResNet in eval mode with non-trivial BN statistics."""
    torch.manual_seed(seed)
    net = CifarResNet(depth, num_classes=5, shortcut=shortcut)
    for m in net.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.2, 0.2)
            m.running_var.uniform_(0.5, 1.5)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.3, 0.3)
    return net.eval()


def _reference(net: CifarResNet, skipper: BlockSkipper, x: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """One sample at a time, the block or its skipped output: the definition of the semantics."""
    outs = []
    for b in range(x.shape[0]):
        h = x[b : b + 1]
        for i, block in enumerate(net.blocks):
            h = block(h) if keep[b, i] else skipper.skip_output(block, h)
        outs.append(h)
    return torch.cat(outs)


_NETS = {s: _randomised(s) for s in ("A", "avgpool", "B")}


@settings(max_examples=25, deadline=None)
@given(shortcut=st.sampled_from(["A", "avgpool", "B"]), skipped=st.sampled_from(["shortcut", "relu_shortcut"]),
       batch=st.integers(1, 5), size=st.sampled_from([8, 12]), rate=st.floats(0.0, 1.0),
       seed=st.integers(0, 10_000))
def test_all_executors_agree_on_hard_decisions(shortcut, skipped, batch, size, rate, seed):
    net = _NETS[shortcut]
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 3, size, size, generator=g)
    keep = (torch.rand(batch, len(net.blocks), generator=g) < rate).float()
    skipper = BlockSkipper(skipped=skipped)
    with torch.no_grad():
        h = net.stem(x)
        given_h = h.clone()
        ref = _reference(net, skipper, h, keep)
        results = {}
        for executor in ("masked", "sparse"):
            skipper.executor = executor
            results[executor] = skipper.run_blocks(net.blocks, h, keep)
            col = h
            for i, block in enumerate(net.blocks):  # sequential gates: one column at a time
                col = skipper.run_block(block, col, keep[:, i])
            results[executor + "_columns"] = col
        skipper.executor = "sparse"
        results["sparse_bool"] = skipper.run_blocks(net.blocks, h, keep.bool())
    assert torch.equal(h, given_h)  # the sparse executor writes in place only into its own intermediates
    for name, out in results.items():
        torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5, msg=f"{name} differs from reference")


def test_uniform_columns_take_whole_batch_paths():
    net, skipper = _NETS["B"], BlockSkipper(executor="sparse")
    x = net.stem(torch.randn(3, 3, 8, 8))
    block = net.blocks[len(net.blocks) // 3]  # first block of stage 2: projection shortcut
    with torch.no_grad():
        torch.testing.assert_close(skipper.run_block(block, x, torch.ones(3)), block(x))
        torch.testing.assert_close(skipper.run_block(block, x, torch.zeros(3)), block.shortcut(x))


def test_skipped_output_rule():
    net = _NETS["B"]
    block = net.blocks[len(net.blocks) // 3]
    x = net.stem(torch.randn(2, 3, 8, 8))
    with torch.no_grad():
        sc = block.shortcut(x)
        assert (sc < 0).any()  # the two rules really differ here
        for executor in ("masked", "sparse"):
            plain = BlockSkipper("shortcut", executor=executor).run_block(block, x, torch.zeros(2))
            relu = BlockSkipper("relu_shortcut", executor=executor).run_block(block, x, torch.zeros(2))
            torch.testing.assert_close(plain, sc)
            torch.testing.assert_close(relu, F.relu(sc))


def test_masked_soft_decisions_are_differentiable():
    net = _NETS["A"]
    x = net.stem(torch.randn(2, 3, 8, 8)).detach()
    block = net.blocks[1]
    for skipped, mix in (("shortcut", "outside"), ("relu_shortcut", "inside"), ("relu_shortcut", "outside")):
        k = torch.full((2,), 0.3, requires_grad=True)
        out = BlockSkipper(skipped, mix=mix).run_block(block, x, k)
        out.sum().backward()
        assert k.grad is not None and k.grad.abs().sum() > 0
    sc, f = block.shortcut(x), block.branch(x)
    inside = BlockSkipper("relu_shortcut").run_block(block, x, torch.full((2,), 0.3))
    torch.testing.assert_close(inside, F.relu(sc + 0.3 * f))


def test_bad_inputs_raise_clear_errors():
    net = _NETS["A"]
    x = net.stem(torch.randn(2, 3, 8, 8))
    with pytest.raises(ValueError, match="keep must have shape"):
        BlockSkipper().run_blocks(net.blocks, x, torch.ones(2, 3))
    with pytest.raises(ValueError, match="mix='inside'"):
        BlockSkipper("shortcut", mix="inside")
    with pytest.raises(ValueError, match="skipped must be one of"):
        BlockSkipper("relu")


def test_set_executor_reaches_the_skipper():
    model = torch.nn.Module()
    model.skipper = BlockSkipper()
    set_executor(model, "sparse")
    assert model.skipper.executor == "sparse"


@pytest.mark.parametrize("shortcut", ["A", "avgpool", "B"])
def test_ledger_equals_flop_counter_on_sparse_batch1(shortcut):
    net = _NETS[shortcut]
    size = (3, 8, 8)
    units = dict(net.ledger(size).units)
    units.update(skip_units(net, size))
    ledger = CostLedger(size, units, net.ledger(size).total)
    skipper = BlockSkipper(executor="sparse")
    g = torch.Generator().manual_seed(3)
    for _ in range(4):
        keep = (torch.rand(1, len(net.blocks), generator=g) < 0.5).float()
        x = torch.randn(1, *size, generator=g)
        counted = count_macs(lambda: net.head(skipper.run_blocks(net.blocks, net.stem(x), keep)))
        names = tuple(f"blocks.{i}" for i in range(len(net.blocks))) + tuple(
            f"blocks.{i}.skip" for i in range(len(net.blocks))) + ("stem", "head")
        decisions = torch.cat([keep, 1 - keep, torch.ones(1, 2)], 1)
        assert ledger.charge(names, decisions).item() == counted
    skip = skip_units(net, size)
    assert (sum(skip.values()) > 0) == (shortcut == "B")


def test_block_usage_statistics():
    gates = torch.tensor([[1, 0, 1], [1, 1, 1], [1, 0, 1], [0, 0, 0]], dtype=torch.float32)
    stats = block_usage(gates)
    assert stats["per_block"] == [0.75, 0.25, 0.75]
    assert stats["blocks_mean"] == pytest.approx(1.75)
    assert stats["blocks_std"] == pytest.approx(torch.tensor([2.0, 3, 2, 0]).std(unbiased=False).item())
    assert stats["unique_policies"] == 3
    assert stats["keep_rate"] == pytest.approx(7 / 12)


@pytest.mark.parametrize("skipped", ["shortcut", "relu_shortcut"])
def test_sparse_executor_passes_the_same_gradients_as_masked(skipped):
    net = _NETS["A"]
    g = torch.Generator().manual_seed(7)
    x = torch.randn(4, 3, 8, 8, generator=g)
    keep = (torch.rand(4, len(net.blocks), generator=g) < 0.5).float()
    grads = {}
    for executor in ("masked", "sparse"):
        h = net.stem(x).detach().requires_grad_(True)
        BlockSkipper(skipped=skipped, executor=executor).run_blocks(net.blocks, h, keep).square().sum().backward()
        grads[executor] = h.grad
    torch.testing.assert_close(grads["sparse"], grads["masked"], atol=1e-4, rtol=1e-4)
