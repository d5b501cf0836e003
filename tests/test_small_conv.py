"""The compiled direct 3x3 convolution (ponder.fast.small_conv) against F.conv2d."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from conftest import fast_paths, stored
from ponder.fast import small_conv

CL = torch.channels_last

pytestmark = [fast_paths, pytest.mark.skipif(small_conv._extension() is None,
                                             reason="kernels not built here (ponder kernels build)")]


@pytest.mark.parametrize("kernel", ["conv3x3", "conv3x3_gemm"])
@pytest.mark.parametrize("relu", [False, True])
@pytest.mark.parametrize("batch, cin, cout, h, w, stride", [
    (1, 6, 6, 32, 32, 1),     # MSDNet's finest scale
    (1, 6, 6, 32, 32, 2),
    (3, 12, 6, 16, 16, 2),
    (2, 3, 16, 7, 9, 1),      # odd, non-square maps; the RGB stem
    (2, 13, 17, 9, 7, 2),     # output channels not a multiple of the block of 8
    (1, 208, 130, 8, 8, 2),   # an exit head's width (more than 4 blocks of 32 output channels)
    (9, 128, 128, 4, 4, 2),   # patch rows not a multiple of the GEMM's 8
    (4, 5, 1, 5, 5, 1),
])
def test_conv3x3_kernels_equal_f_conv2d(kernel, relu, batch, cin, cout, h, w, stride):
    g = torch.Generator().manual_seed(batch * 1000 + cin * 10 + cout)
    x = torch.randn(batch, cin, h, w, generator=g).contiguous(memory_format=CL)
    weight = torch.randn(cout, cin, 3, 3, generator=g).contiguous(memory_format=CL)
    bias = torch.randn(cout, generator=g)
    want = F.conv2d(x, weight, bias, stride, 1)
    want = want.relu() if relu else want
    with torch.no_grad():
        assert small_conv.conv3x3_applies(x, weight, bias, stride, 1)
        got = getattr(small_conv, kernel)(x, weight, bias, stride, relu)
    assert got.shape == want.shape and got.is_contiguous(memory_format=CL)
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("batch, stride", [(1, 1), (1, 2), (3, 1)])
def test_conv3x3_splits_a_large_layer_over_threads_with_the_same_sums(batch, stride):
    """With fewer samples than threads, a large layer (ImageNet-sized maps at batch 1) is split over its
    output-channel blocks: the result is F.conv2d's, and bit for bit the one-thread result."""
    g = torch.Generator().manual_seed(stride)
    x = torch.randn(batch, 32, 28, 28, generator=g).contiguous(memory_format=CL)  # 7-14M MACs per sample
    weight, bias = torch.randn(36, 32, 3, 3, generator=g), torch.randn(36, generator=g)  # 5 blocks, the last of 4
    threads = torch.get_num_threads()
    try:
        with torch.no_grad():
            torch.set_num_threads(1)
            one = small_conv.conv3x3(x, weight, bias, stride, relu=True)
            torch.set_num_threads(4)
            split = small_conv.conv3x3(x, weight, bias, stride, relu=True)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(split, one)
    torch.testing.assert_close(split, F.conv2d(x, weight, bias, stride, 1).relu(), atol=1e-4, rtol=1e-4)


def test_blocked_weight_follows_in_place_changes_and_goes_with_the_weight():
    from ponder.fast import weight_cache

    x = torch.randn(1, 4, 6, 6).contiguous(memory_format=CL)
    weight, bias = torch.randn(3, 4, 3, 3), torch.randn(3)
    with torch.no_grad():
        first = small_conv.conv3x3(x, weight, bias, 1)
        weight.mul_(2.0)  # a new version: the blocked copy is remade
        second = small_conv.conv3x3(x, weight, bias, 1)
    torch.testing.assert_close(second - bias.view(1, 3, 1, 1), 2 * (first - bias.view(1, 3, 1, 1)),
                               atol=1e-4, rtol=1e-4)
    key = id(weight)
    assert len(weight_cache._DERIVED[key]) == 1  # the stale copy was dropped
    with torch.no_grad():
        torch.testing.assert_close(small_conv.conv3x3_gemm(x, weight, bias, 1), second, atol=1e-4, rtol=1e-4)
    assert len(weight_cache._DERIVED[key]) == 2  # each kernel's layout, of the same version
    del weight
    assert key not in weight_cache._DERIVED


def test_conv3x3_does_not_apply_where_it_cannot_be_seen_or_differentiated():
    x = torch.randn(1, 4, 6, 6).contiguous(memory_format=CL)
    weight, bias = torch.randn(3, 4, 3, 3), torch.randn(3)
    with torch.no_grad():
        assert small_conv.conv3x3_applies(x, weight, bias, 2, 1)
        torch.testing.assert_close(small_conv.conv3x3(x, weight, None, 1), F.conv2d(x, weight, None, 1, 1),
                                   atol=1e-4, rtol=1e-4)  # no bias: zeros
        assert not small_conv.conv3x3_applies(x, weight, bias, 1, 0)            # padding 0
        assert not small_conv.conv3x3_applies(x, weight, bias, 3, 1)            # stride 3
        assert not small_conv.conv3x3_applies(x.contiguous(), weight, bias, 1, 1)  # NCHW
        assert not small_conv.conv3x3_applies(x, weight[:, :, :1, :1], bias, 1, 1)  # 1x1
        assert not small_conv.conv3x3_applies(x.double(), weight.double(), bias.double(), 1, 1)
        with FlopCounterMode(display=False):  # cost counting must see every MAC
            assert not small_conv.conv3x3_applies(x, weight, bias, 1, 1)
    assert not small_conv.conv3x3_applies(x, weight, bias, 1, 1)  # autograd on


@pytest.mark.parametrize("relu", [False, True])
@pytest.mark.parametrize("rows, k, n", [(1, 5, 3), (1024, 40, 6), (13, 224, 112), (64, 9, 33)])
def test_rows_gemm_equals_addmm_on_strided_rows(relu, rows, k, n):
    g = torch.Generator().manual_seed(rows + k + n)
    table = torch.randn(rows, k + 7, generator=g)
    x = table[:, 3:3 + k]  # row stride k + 7: a channel slice of wider rows
    weight, bias = torch.randn(n, k, generator=g), torch.randn(n, generator=g)
    want = torch.addmm(bias, x, weight.t())
    want = want.relu() if relu else want
    with torch.no_grad():
        assert small_conv.rows_gemm_applies(x, weight)
        got = small_conv.rows_gemm(x, weight, bias, relu)
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


def test_conv1x1_rows_routes_equal_linear_rows(fresh_routes):
    from ponder.fast import conv as dense_conv

    x, weight, bias = torch.randn(256, 40), torch.randn(24, 40), torch.randn(24)
    want = torch.addmm(bias, x, weight.t()).relu()
    with torch.no_grad():
        with FlopCounterMode(display=False) as counter:  # counted, and no route decided under it
            counted = dense_conv.conv1x1_rows(x, weight, bias, relu=True)
        assert stored(fresh_routes, "conv1x1_rows") == {} and counter.get_total_flops() == 2 * 256 * 40 * 24
        dense_conv.conv1x1_rows(x, weight, bias, relu=True)
        assert len(stored(fresh_routes, "conv1x1_rows")) == 1
        for route in ("linear_rows", "block_gemm"):
            with fresh_routes.override("conv1x1_rows", route):
                torch.testing.assert_close(dense_conv.conv1x1_rows(x, weight, bias, relu=True), want, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(counted, want, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("batch, cin, width, hw, classes", [
    (1, 88, 128, 8, 10),   # MSDNet CIFAR's first head
    (3, 24, 40, 7, 7),     # ImageNet's 7x7 map (7 -> 4 -> 2); width not a multiple of 32
])
def test_bound_exit_head_equals_the_head_module(batch, cin, width, hw, classes):
    from ponder.models.exit_head import ExitHead
    from ponder.fast import fold_conv_bn_dense

    torch.manual_seed(batch + cin)
    head = ExitHead(cin, width, classes)
    head.train()
    head(torch.randn(8, cin, hw, hw) * 2 + 1)  # BN statistics away from 0 / 1: folding matters
    head.eval()
    x = torch.randn(batch, cin, hw, hw).contiguous(memory_format=CL)
    with torch.no_grad():
        folded = [fold_conv_bn_dense(conv, bn, channels_last=True) for conv, bn in head._folded]
        feat, logits = small_conv.bound_exit_head([w for w, _ in folded], [b for _, b in folded], head.linear)(x)
        want_feat = head.m(x).flatten(1)
        want = head.linear(want_feat)
        head.linear.weight.mul_(-1.0)  # bound to the parameter: an in-place step is seen
        _, flipped = small_conv.bound_exit_head([w for w, _ in folded], [b for _, b in folded], head.linear)(x)
    torch.testing.assert_close(feat, want_feat, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(logits, want, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(flipped, 2 * head.linear.bias - want, atol=1e-4, rtol=1e-4)
