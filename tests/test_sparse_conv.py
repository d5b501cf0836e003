"""Sparse spatial execution: masks, convs at active positions, residual units, ledger, fall-back."""

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.utils.flop_counter import FlopCounterMode

from ponder.cost import count_macs
from ponder.models.resnet import BasicBlock, Bottleneck
from ponder.nn import set_executor
from ponder.nn.sparse_conv import dilate_mask, input_mask, masked_conv2d, sparse_conv2d
from ponder.nn.sparse_cost import position_macs, residual_macs, shortcut_macs
from ponder.nn.sparse_fallback import (
    break_even_for,
    calibrate_break_even,
    coherent_mask,
)
from ponder.nn.sparse_residual import SparseResidual, masked_residual, sparse_residual

FAST = settings(max_examples=30, deadline=None)
ATOL = 1e-4


def randomise_bn(module: nn.Module, seed: int = 0) -> nn.Module:
    """Non-trivial eval-mode BN statistics so folding is really exercised."""
    g = torch.Generator().manual_seed(seed)
    for m in module.modules():
        if isinstance(m, nn.BatchNorm2d):
            c = m.num_features
            m.running_mean.copy_(torch.randn(c, generator=g) * 0.5)
            m.running_var.copy_(torch.rand(c, generator=g) + 0.5)
            m.weight.data.copy_(torch.randn(c, generator=g))
            m.bias.data.copy_(torch.randn(c, generator=g) * 0.5)
    return module.eval()


def make_block(kind: str, stride: int, shortcut: str, seed: int = 0):
    """shortcut "A": identity at stride 1 (strided: BasicBlock zero-pad, Bottleneck projection);
    "avgpool": BasicBlock 2 -> 4 channels through BlockDrop's avg-pool shortcut (Bottleneck: projection);
    "B": a 1x1 projection (the widths differ)."""
    torch.manual_seed(seed)
    if kind == "basic":
        cin = {"A": 4, "avgpool": 2, "B": 3}[shortcut]
        block = BasicBlock(cin, 4, stride, shortcut)
    else:
        block = Bottleneck(16 if shortcut == "A" else 8, 4, stride)
    return randomise_bn(block, seed)


def in_channels(block) -> int:
    return block.conv1.in_channels


def mask_from(bits: list[bool], shape) -> torch.Tensor:
    return torch.tensor(bits, dtype=torch.bool).reshape(shape)


@st.composite
def unit_case(draw):
    kind = draw(st.sampled_from(["basic", "bottleneck"]))
    stride = draw(st.sampled_from([1, 2]))
    shortcut = draw(st.sampled_from(["A", "avgpool", "B"]))
    B, H, W = draw(st.integers(1, 3)), draw(st.integers(1, 9)), draw(st.integers(1, 9))
    ho, wo = (H - 1) // stride + 1, (W - 1) // stride + 1
    fill = draw(st.sampled_from(["random", "empty", "full"]))
    if fill == "random":
        bits = draw(st.lists(st.booleans(), min_size=B * ho * wo, max_size=B * ho * wo))
    else:
        bits = [fill == "full"] * (B * ho * wo)
    return kind, stride, shortcut, (B, H, W), mask_from(bits, (B, ho, wo)), draw(st.integers(0, 3))


# ---------------------------------------------------------------- masks


@FAST
@given(st.integers(1, 3), st.integers(1, 40), st.integers(1, 40), st.sampled_from([1, 3, 5]), st.integers(0, 99))
def test_dilate_mask_is_max_pool(b, h, w, k, seed):  # both routes: one max-pool up to 1,024 elements, ORs above
    m = torch.rand(b, h, w, generator=torch.Generator().manual_seed(seed)) < 0.2
    want = F.max_pool2d(m.float()[:, None], k, 1, k // 2)[:, 0] > 0
    assert torch.equal(dilate_mask(m, k), want)


def test_dilate_mask_single_pixel_and_border():
    m = torch.zeros(1, 5, 5, dtype=torch.bool)
    m[0, 0, 0] = True
    d = dilate_mask(m, 3)
    assert d.sum() == 4 and d[0, :2, :2].all()
    assert not dilate_mask(torch.zeros(2, 4, 4, dtype=torch.bool)).any()


@FAST
@given(st.integers(1, 2), st.integers(1, 11), st.integers(1, 11), st.sampled_from([(3, 2, 1), (3, 1, 1), (1, 2, 0)]),
       st.integers(0, 99))
def test_input_mask_marks_exactly_the_inputs_read(b, h, w, ksp, seed):
    k, s, p = ksp
    ho, wo = (h + 2 * p - k) // s + 1, (w + 2 * p - k) // s + 1
    m = torch.rand(b, ho, wo, generator=torch.Generator().manual_seed(seed)) < 0.3
    # the inputs with a nonzero gradient from the active outputs of a ones-kernel conv
    x = torch.ones(b, 1, h, w, requires_grad=True)
    (F.conv2d(x, torch.ones(1, 1, k, k), stride=s, padding=p)[:, 0] * m).sum().backward()
    assert torch.equal(input_mask(m, (h, w), k, s, p), x.grad[:, 0] > 0)


def test_input_mask_rejects_a_mask_off_the_output_grid():
    with pytest.raises(ValueError, match="output grid"):
        input_mask(torch.ones(1, 4, 4, dtype=torch.bool), (16, 16), 3, 2)


# ---------------------------------------------------------------- single convs


@FAST
@given(st.sampled_from([(1, 1, 0), (1, 2, 0), (3, 1, 1), (3, 2, 1), (5, 1, 2)]), st.integers(1, 3),
       st.integers(1, 9), st.integers(1, 9), st.booleans(), st.booleans(), st.integers(0, 99))
def test_sparse_conv2d_equals_masked_at_active_positions(ksp, b, h, w, with_bn, relu, seed):
    k, s, p = ksp
    torch.manual_seed(seed)
    conv = nn.Conv2d(5, 7, k, s, p, bias=not with_bn)
    bn = randomise_bn(nn.BatchNorm2d(7), seed) if with_bn else None
    x = torch.randn(b, 5, h, w)
    ho, wo = (h + 2 * p - k) // s + 1, (w + 2 * p - k) // s + 1
    m = torch.rand(b, ho, wo) < 0.4
    got = sparse_conv2d(x, m, conv, bn, relu)
    want = masked_conv2d(x, m, conv, bn, relu).detach()
    torch.testing.assert_close(got, want, atol=ATOL, rtol=1e-4)
    assert not got[~m[:, None].expand_as(got)].any()


def test_sparse_conv2d_rejects_groups_and_bad_mask():
    with pytest.raises(ValueError, match="groups=1"):
        sparse_conv2d(torch.randn(1, 4, 5, 5), torch.ones(1, 5, 5), nn.Conv2d(4, 4, 3, 1, 1, groups=2))
    with pytest.raises(ValueError, match="output grid"):
        sparse_conv2d(torch.randn(1, 4, 5, 5), torch.ones(1, 4, 4), nn.Conv2d(4, 4, 3, 1, 1))


# ---------------------------------------------------------------- residual units


@FAST
@given(unit_case(), st.sampled_from(["shortcut", "relu"]), st.booleans())
def test_sparse_residual_equals_masked_residual(case, inactive, channels_last):
    kind, stride, shortcut, (B, H, W), mask, seed = case
    block = make_block(kind, stride, shortcut, seed)
    x = torch.randn(B, in_channels(block), H, W)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    want = masked_residual(block, x, mask, inactive).detach()
    got = sparse_residual(block, x, mask, inactive, break_even=None)
    assert got.shape == want.shape
    torch.testing.assert_close(got, want, atol=ATOL, rtol=1e-4)


@FAST
@given(st.sampled_from(["basic", "bottleneck"]), st.integers(1, 3), st.integers(2, 8), st.integers(0, 99))
def test_identity_units_keep_the_input_at_inactive_positions(kind, b, hw, seed):
    block = make_block(kind, 1, "A", seed)
    assert block.downsample is None
    x = torch.randn(b, in_channels(block), hw, hw)  # negative values too: "x unchanged", not relu(x)
    mask = torch.rand(b, hw, hw, generator=torch.Generator().manual_seed(seed)) < 0.5
    off = ~mask[:, None].expand_as(x)
    for out in (sparse_residual(block, x, mask, break_even=None), masked_residual(block, x, mask)):
        assert torch.equal(out[off], x[off])
        on = mask[:, None].expand_as(x)
        torch.testing.assert_close(out[on], block(x)[on], atol=ATOL, rtol=1e-4)


def test_empty_mask_returns_the_input_and_full_mask_the_dense_unit():
    block = make_block("bottleneck", 1, "A")
    x = torch.randn(2, 16, 6, 6)
    assert sparse_residual(block, x, torch.zeros(2, 6, 6, dtype=torch.bool)) is x
    torch.testing.assert_close(sparse_residual(block, x, torch.ones(2, 6, 6, dtype=torch.bool)), block(x))


def test_relu_mode_is_dynconv_formula():
    block = make_block("basic", 2, "B")
    x = torch.randn(2, 3, 8, 8)
    m = (torch.rand(2, 4, 4) < 0.5).float()
    want = F.relu(block.shortcut(x) + m[:, None] * block.branch(x))
    torch.testing.assert_close(masked_residual(block, x, m, "relu"), want)
    torch.testing.assert_close(sparse_residual(block, x, m, "relu", break_even=None), want.detach(),
                               atol=ATOL, rtol=1e-4)


def test_masked_residual_passes_gradients_to_a_float_mask_and_the_weights():
    block = make_block("basic", 1, "A").train()
    x = torch.randn(2, 4, 5, 5)
    m = torch.full((2, 5, 5), 0.5, requires_grad=True)
    masked_residual(block, x, m).sum().backward()
    assert m.grad is not None and m.grad.abs().sum() > 0
    assert block.conv1.weight.grad.abs().sum() > 0


def test_sparse_residual_errors():
    block = make_block("basic", 1, "A")
    x = torch.randn(1, 4, 6, 6)
    with pytest.raises(ValueError, match="output grid"):
        sparse_residual(block, x, torch.ones(1, 3, 3, dtype=torch.bool))
    with pytest.raises(ValueError, match="inactive"):
        sparse_residual(block, x, torch.ones(1, 6, 6, dtype=torch.bool), inactive="zero")
    with pytest.raises(TypeError, match="BasicBlock"):
        sparse_residual(nn.Conv2d(4, 4, 3, padding=1), x, torch.ones(1, 6, 6, dtype=torch.bool))
    with pytest.raises(ValueError, match="break_even"):
        sparse_residual(block, x, torch.ones(1, 6, 6, dtype=torch.bool), break_even="fast")
    block.train()
    with pytest.raises(ValueError, match="inference-only"):
        sparse_residual(block, x, torch.rand(1, 6, 6) < 0.5)


@pytest.mark.parametrize("kind,stride,shortcut", [("basic", 1, "A"), ("bottleneck", 1, "A"), ("bottleneck", 2, "A")])
def test_overwrite_writes_into_the_input_only_when_allowed_and_gives_the_same_output(kind, stride, shortcut):
    block = make_block(kind, stride, shortcut, seed=3)
    torch.manual_seed(3)
    x = torch.randn(2, in_channels(block), 8, 8).contiguous(memory_format=torch.channels_last)
    ho = 8 // stride
    m = torch.rand(2, ho, ho) < 0.4
    keep = x.clone()
    ref = sparse_residual(block, x, m, break_even=None)
    assert torch.equal(x, keep)  # not allowed: x untouched
    out = sparse_residual(block, x, m, break_even=None, overwrite=True)
    torch.testing.assert_close(out, ref)
    shares = out.data_ptr() == x.data_ptr()
    assert shares == (block.downsample is None)  # identity shortcut: written in place, no copy


def test_folded_weights_follow_parameter_updates():
    block = make_block("basic", 1, "A")
    x, m = torch.randn(1, 4, 6, 6), torch.rand(1, 6, 6) < 0.5
    sparse_residual(block, x, m, break_even=None)
    with torch.no_grad():
        block.conv2.weight.mul_(2.0)
        block.bn1.running_var.add_(1.0)
    torch.testing.assert_close(sparse_residual(block, x, m, break_even=None), masked_residual(block, x, m).detach(),
                               atol=ATOL, rtol=1e-4)
    block.train()  # a train-mode forward moves the running statistics (in place, version unchanged)
    block(torch.randn(4, 4, 6, 6) * 3 + 1)
    block.eval()
    torch.testing.assert_close(sparse_residual(block, x, m, break_even=None), masked_residual(block, x, m).detach(),
                               atol=ATOL, rtol=1e-4)


# ---------------------------------------------------------------- cost ledger


@FAST
@given(unit_case())
def test_ledger_equals_flop_counter_on_the_sparse_path(case):
    kind, stride, shortcut, (B, H, W), mask, seed = case
    block = make_block(kind, stride, shortcut, seed)
    x = torch.randn(B, in_channels(block), H, W)
    ledger = residual_macs(block, tuple(x.shape[1:]), mask)
    assert ledger.shape == (B,) and ledger.dtype == torch.float64
    for b in range(B):  # batch 1: exactly the counted MACs of that sample
        counted = count_macs(lambda: sparse_residual(block, x[b:b + 1], mask[b:b + 1], break_even=None))
        assert counted == ledger[b].item()
    assert count_macs(lambda: sparse_residual(block, x, mask, break_even=None)) == ledger.sum().item()


def test_ledger_endpoints_and_position_costs():
    block = make_block("bottleneck", 2, "B")
    size = (8, 9, 9)
    full, empty = torch.ones(1, 5, 5, dtype=torch.bool), torch.zeros(1, 5, 5, dtype=torch.bool)
    assert residual_macs(block, size, full).item() == count_macs(block, torch.zeros(1, *size))
    assert residual_macs(block, size, empty).item() == shortcut_macs(block, size) == 8 * 16 * 25
    assert position_macs(block.conv2) == 4 * 4 * 9 and position_macs(block.conv3) == 16 * 4


def test_ledger_charges_the_first_conv_on_the_dilated_mask():
    block = make_block("basic", 1, "A")
    m = torch.zeros(1, 7, 7, dtype=torch.bool)
    m[0, 3, 3] = True  # one active pixel: conv1 runs on its 3x3 neighbourhood, conv2 on it alone
    assert residual_macs(block, (4, 7, 7), m).item() == 9 * 144 + 1 * 144


# ---------------------------------------------------------------- fall-back


def test_fixed_break_even_picks_dense_or_sparse():
    block = make_block("basic", 1, "A")
    x, m = torch.randn(1, 4, 8, 8), torch.rand(1, 8, 8, generator=torch.Generator().manual_seed(1)) < 0.3
    dense = count_macs(block, x)
    sparse = residual_macs(block, (4, 8, 8), m).item()
    assert sparse < dense
    assert count_macs(lambda: sparse_residual(block, x, m, break_even=0.0)) == dense
    assert count_macs(lambda: sparse_residual(block, x, m, break_even=1.0)) == sparse
    torch.testing.assert_close(sparse_residual(block, x, m, break_even=0.0),
                               sparse_residual(block, x, m, break_even=1.0), atol=ATOL, rtol=1e-4)


@pytest.mark.parametrize("nonneg", [True, False])
@pytest.mark.parametrize("channels_last", [True, False])
@pytest.mark.parametrize("inactive", ["shortcut", "relu"])
def test_dense_fallback_equals_masked_reference(nonneg, channels_last, inactive):
    block = make_block("basic", 1, "A", seed=3)
    x = torch.randn(2, 4, 7, 7, generator=torch.Generator().manual_seed(3))
    x = x.relu() if nonneg else x
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    m = torch.rand(2, 7, 7, generator=torch.Generator().manual_seed(4)) < 0.6
    got = sparse_residual(block, x, m, inactive, break_even=0.0)  # always the dense fall-back
    torch.testing.assert_close(got, masked_residual(block, x, m, inactive).detach(), atol=ATOL, rtol=1e-4)


def test_calibration_is_stored_isolated_and_in_range(fresh_routes):
    from conftest import stored

    block = make_block("basic", 1, "A")
    x, m = torch.randn(2, 4, 8, 8), torch.rand(2, 8, 8) < 0.3
    state = torch.random.get_rng_state()
    with FlopCounterMode(display=False) as fc:
        out = sparse_residual(block, x, m, break_even="auto")
    assert torch.equal(torch.random.get_rng_state(), state)  # calibration used its own generator
    limit = break_even_for(block, x)
    assert 0.0 <= limit <= 1.0 and list(stored(fresh_routes, "break_even").values()) == [limit]
    dense, sparse = count_macs(block, x), int(residual_macs(block, (4, 8, 8), m).sum())
    assert fc.get_total_flops() // 2 in (dense, sparse)  # the calibration's own runs are not counted
    torch.testing.assert_close(out, masked_residual(block, x, m).detach(), atol=ATOL, rtol=1e-4)
    assert 0.0 <= calibrate_break_even(block, x, reps=1) <= 1.0


def test_coherent_mask_hits_the_density():
    m = coherent_mask((3, 16, 16), 0.25, torch.Generator().manual_seed(0))
    assert m.dtype == torch.bool and (m.flatten(1).sum(1) == 64).all()


# ---------------------------------------------------------------- executor switch


def test_sparse_residual_module_switches_executor():
    unit = SparseResidual(make_block("bottleneck", 1, "A"), break_even=None).eval()
    x, m = torch.randn(2, 16, 6, 6), torch.rand(2, 6, 6) < 0.4
    masked = unit(x, m)
    assert masked.requires_grad
    set_executor(unit, "sparse")
    sparse = unit(x, m)
    assert not sparse.requires_grad
    torch.testing.assert_close(sparse, masked.detach(), atol=ATOL, rtol=1e-4)
    unit.train()  # training always runs the differentiable masked path
    assert unit(x, m).requires_grad
