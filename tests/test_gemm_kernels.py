"""The executors' kernels: row GEMM backends, BN-folded convs, the dense-on-kernels baseline, the bench allocator."""

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from ponder.bench import bench_dynamic, keep_freed_memory
from ponder.models.act import ACTCifarResNet, ACTImageNetResNet
from ponder.models.resnet import Bottleneck
from conftest import fast_paths, stored
from ponder import fast
from ponder.fast import gemm
from ponder.fast.gemm import ONEDNN_MIN_MACS, gemm_backend, linear_rows, onednn_available, set_gemm_backend
from ponder.nn.sparse_units import folded_shortcut
from ponder.registry import create_model
from test_sparse_conv import randomise_bn

BACKENDS = ["blas"] + (["onednn"] if onednn_available() else [])


@pytest.fixture
def backend():
    yield set_gemm_backend
    set_gemm_backend("auto")


@pytest.mark.parametrize("name", BACKENDS)
@pytest.mark.parametrize("n, k, cout", [(4, 8, 3), (700, 144, 16), (300, 1152, 128)])
@pytest.mark.parametrize("relu", [False, True])
def test_linear_rows_equals_addmm_on_every_backend(backend, name, n, k, cout, relu):
    backend(name)
    g = torch.Generator().manual_seed(n)
    x, w, b = torch.randn(n, k, generator=g), torch.randn(cout, k, generator=g), torch.randn(cout, generator=g)
    want = torch.addmm(b, x, w.t())
    want = want.relu() if relu else want
    with torch.no_grad():
        got = linear_rows(x, w, b, relu)
    assert got.shape == (n, cout)
    torch.testing.assert_close(got, want, atol=1e-3, rtol=1e-4)


def test_linear_rows_passes_gradients(backend):
    backend("onednn" if onednn_available() else "blas")
    x = torch.randn(512, 256, requires_grad=True)
    w, b = torch.randn(64, 256), torch.randn(64)
    linear_rows(x, w, b, relu=True).sum().backward()
    want = ((x.detach() @ w.t() + b) > 0).float() @ w
    torch.testing.assert_close(x.grad, want, atol=1e-3, rtol=1e-4)


@pytest.mark.skipif(not onednn_available(), reason="no oneDNN inner product in this build")
def test_flop_counter_counts_the_onednn_route(backend):
    backend("onednn")
    n, k, cout = 512, 256, 64
    assert n * k * cout >= ONEDNN_MIN_MACS  # so the oneDNN route really runs
    x, w, b = torch.randn(n, k), torch.randn(cout, k), torch.randn(cout)
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        linear_rows(x, w, b)
    assert counter.get_total_flops() == 2 * n * k * cout


def test_backend_choice_errors_and_auto_is_stored(backend, monkeypatch, fresh_routes):
    import time

    with pytest.raises(ValueError, match="one of"):
        set_gemm_backend("mkl")
    backend("blas")
    assert gemm_backend() == "blas"
    backend("auto")
    timed = []
    monkeypatch.setattr(gemm, "_backend_routes", lambda: [
        ("blas", lambda: timed.append("blas")), ("onednn", lambda: timed.append("onednn") or time.sleep(0.002))])
    monkeypatch.setattr(gemm, "onednn_available", lambda: True)
    assert gemm_backend() == "blas" and gemm_backend() == "blas"
    assert timed.count("blas") == 4 and timed.count("onednn") == 4  # measured once per thread count (4 rounds)
    assert list(stored(fresh_routes, "gemm_backend").values()) == ["blas"]
    fresh_routes.forget_memory()  # another process: reads the stored route, measures nothing
    assert gemm_backend() == "blas" and len(timed) == 8


@pytest.mark.skipif(not onednn_available(), reason="no oneDNN inner product in this build")
def test_no_backend_is_timed_under_a_flop_counter(fresh_routes):
    with FlopCounterMode(display=False) as counter:  # a route timed here would be seen (and is not stored)
        assert gemm_backend() == "blas"
    assert counter.get_total_flops() == 0 and stored(fresh_routes, "gemm_backend") == {}
    gemm_backend()  # outside a counter: timed once and stored
    assert len(stored(fresh_routes, "gemm_backend")) == 1


@pytest.mark.parametrize("k, stride", [(1, 1), (1, 2), (3, 1), (3, 2)])
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("relu", [False, True])
def test_fast_conv_bn_equals_conv_bn_relu(k, stride, channels_last, relu):
    torch.manual_seed(k * 10 + stride)
    conv = nn.Conv2d(24, 40, k, stride, k // 2, bias=False)
    bn = randomise_bn(nn.Sequential(nn.BatchNorm2d(40)))[0]
    x = torch.randn(2, 24, 9, 9)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    want = bn(conv(x))
    want = F.relu(want) if relu else want
    with torch.no_grad():
        got = fast.conv_bn(x, conv, bn, relu)
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    if channels_last:  # (an NCHW input may come back either way: PyTorch's own 1x1-conv layout rule)
        assert got.is_contiguous(memory_format=torch.channels_last)


def test_folded_shortcut_folds_a_projection_and_keeps_identity():
    block = randomise_bn(Bottleneck(32, 16, stride=2))
    x = torch.randn(1, 32, 8, 8).contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        torch.testing.assert_close(folded_shortcut(block, x), block.shortcut(x), atol=1e-4, rtol=1e-4)
    same = randomise_bn(Bottleneck(64, 16))
    y = torch.randn(1, 64, 8, 8)
    assert folded_shortcut(same, y) is y


@pytest.mark.parametrize("name", BACKENDS)
def test_dense_on_kernels_equals_the_plain_dense_network(backend, name):
    backend(name)
    for model, size in ((ACTCifarResNet(14, num_classes=10), 32),
                        (ACTImageNetResNet(Bottleneck, [1, 2, 1, 1], num_classes=7), 64)):
        randomise_bn(model)
        x = torch.randn(2, 3, size, size)
        with torch.inference_mode():
            want, got = model.dense_baseline()(x), model.dense_baseline_kernels()(x)
        assert got.shape == want.shape
        torch.testing.assert_close(got, want, atol=1e-3, rtol=1e-3)


def test_bench_times_the_kernel_matched_dense_network_only_where_there_is_one():
    sact = create_model("sact_resnet32_cifar", num_classes=10)
    sact.force_keep_rate(0.5)
    r = bench_dynamic(sact, "sact", [torch.randn(2, 3, 32, 32)], threads=1, mode="keep-rate 0.5", repeats=1,
                      warmup=1, with_masked=False)
    assert r.dense_kernels_ms > 0
    assert r.speedup_vs_kernels == pytest.approx(r.dense_kernels_ms / r.dynamic_ms)
    assert r.efficiency_vs_kernels == pytest.approx(r.speedup_vs_kernels / r.mac_ratio)
    assert r.speedup_vs_kernels_range == pytest.approx((r.speedup_vs_kernels,) * 2)  # one round
    msd = create_model("msdnet_cifar_budgeted", num_classes=10)
    msd.force_keep_rate(0.5)
    r = bench_dynamic(msd, "msd", [torch.randn(2, 3, 32, 32)], threads=1, mode="keep-rate 0.5", repeats=1,
                      warmup=1, with_masked=False)
    assert r.dense_kernels_ms is None and r.efficiency_vs_kernels is None and r.speedup_vs_kernels_range is None


def test_keep_freed_memory_configures_glibc():
    import platform

    ok = keep_freed_memory()
    assert isinstance(ok, bool)
    if platform.system() == "Linux" and platform.libc_ver()[0] == "glibc":
        assert ok


def test_blockdrop_policy_inference_on_kernels_equals_the_autograd_path():
    model = create_model("blockdrop_resnet110_cifar", num_classes=10)
    randomise_bn(model)
    x = torch.randn(3, 3, 32, 32)
    want = model.policy(x)  # autograd on: the plain modules
    with torch.inference_mode():
        got = model.policy(x)  # the trunk on the executors' kernels
    torch.testing.assert_close(got, want.detach(), atol=1e-5, rtol=1e-4)


def test_fastest_picks_the_quicker_route_outside_flop_counters():
    import time

    from ponder.fast.timing import fastest

    a = torch.randn(64, 64)
    slow = lambda: (time.sleep(0.005), a @ a)  # noqa: E731
    quick = lambda: a @ a  # noqa: E731
    with FlopCounterMode(display=False) as counter:
        assert fastest([slow, quick]) == 1
        assert fastest([quick, slow]) == 0
    assert counter.get_total_flops() == 0


@fast_paths
@pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="no oneDNN in this build")
@pytest.mark.parametrize("route", ["pytorch", "packed", "small", "gemm"])
@pytest.mark.parametrize("batch, cin, cout, hw, stride, bias",
                         [(1, 16, 16, 32, 1, True), (1, 6, 24, 9, 2, False), (3, 64, 8, 4, 1, True), (2, 5, 13, 7, 2, True)])
def test_conv2d_routes_equal_f_conv2d_and_are_counted(fresh_routes, route, batch, cin, cout, hw, stride, bias):
    from ponder.fast import conv as dense_conv

    g = torch.Generator().manual_seed(cin + hw)
    x = torch.randn(batch, cin, hw, hw, generator=g).contiguous(memory_format=torch.channels_last)
    w = torch.randn(cout, cin, 3, 3, generator=g).contiguous(memory_format=torch.channels_last)
    b = torch.randn(cout, generator=g) if bias else None
    want = F.conv2d(x, w, b, stride, 1)
    with torch.no_grad():
        dense_conv.conv2d(x, w, b, stride, 1)  # first call: timed, one route per shape
        assert len(stored(fresh_routes, "conv2d")) == 1
        with fresh_routes.override("conv2d", route):  # the route under test
            got = dense_conv.conv2d(x, w, b, stride, 1)
        with FlopCounterMode(display=False) as counter:  # counted on a route it can see (not the kernel)
            counted = dense_conv.conv2d(x, w, b, stride, 1)
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(counted, want, atol=1e-4, rtol=1e-4)
    assert counter.get_total_flops() == 2 * batch * cout * cin * 9 * want.shape[2] * want.shape[3]


@fast_paths
@pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="no oneDNN in this build")
@pytest.mark.parametrize("relu", [False, True])
def test_conv2d_packs_the_weight_once_and_leaves_nchw_and_autograd_to_f_conv2d(fresh_routes, relu):
    from ponder.fast import conv as dense_conv
    from ponder.fast import weight_cache
    g = torch.Generator().manual_seed(0)
    w = torch.randn(8, 4, 3, 3, generator=g).contiguous(memory_format=torch.channels_last)
    b = torch.randn(8, generator=g)
    x = torch.randn(3, 4, 9, 7, generator=g).contiguous(memory_format=torch.channels_last)
    want = F.conv2d(x, w, b, 2, 1)
    want = want.relu() if relu else want
    with torch.no_grad():
        dense_conv.conv2d(x, w, b, 2, 1, relu=relu)  # timed: one route for the shape and batch bucket
        with fresh_routes.override("conv2d", "packed"), FlopCounterMode(display=False) as counter:
            got = dense_conv.conv2d(x, w, b, 2, 1, relu=relu)
        packings = [k for k in weight_cache._DERIVED[id(w)] if k[1] == "onednn"]
        assert len(packings) == 1  # packed once for this input shape
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
        assert got.is_contiguous(memory_format=torch.channels_last)
        assert counter.get_total_flops() == 2 * 8 * 4 * 9 * want[0, 0].numel() * x.shape[0]
        with fresh_routes.override("conv2d", "packed"):
            torch.testing.assert_close(dense_conv.conv2d(x[:2], w, b, 2, 1, relu=relu), want[:2], atol=1e-4, rtol=1e-4)
        dense_conv.conv2d(x[:2], w, b, 2, 1, relu=relu)
        assert [k for k in weight_cache._DERIVED[id(w)] if k[1] == "onednn"] == packings  # reused by batch 2
        dense_conv.conv2d(torch.randn(1, 4, 8, 8), w, None, 1, 1)  # NCHW: F.conv2d
    xg = torch.randn(1, 4, 8, 8).contiguous(memory_format=torch.channels_last).requires_grad_()
    dense_conv.conv2d(xg, w, None, 1, 1).sum().backward()  # autograd: F.conv2d's gradient
    assert len(stored(fresh_routes, "conv2d")) == 2 and xg.grad is not None  # buckets 4 and 2; NCHW, autograd: none
    key = id(w)
    del w
    assert key not in weight_cache._DERIVED  # the packing goes with its weight


@fast_paths
@pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="no oneDNN in this build")
def test_conv2d_decides_no_route_under_a_cost_counter(fresh_routes):
    from ponder.fast import conv as dense_conv

    x = torch.randn(1, 6, 16, 16).contiguous(memory_format=torch.channels_last)
    w = torch.randn(6, 6, 3, 3).contiguous(memory_format=torch.channels_last)
    b = torch.randn(6)
    with torch.no_grad():
        with FlopCounterMode(display=False) as counter:  # e.g. a cost ledger measured first
            counted = dense_conv.conv2d(x, w, b, 1, 1)
        assert stored(fresh_routes, "conv2d") == {}  # a route timed here could never be a compiled kernel
        assert counter.get_total_flops() == 2 * 6 * 6 * 9 * 16 * 16
        got = dense_conv.conv2d(x, w, b, 1, 1)
    assert len(stored(fresh_routes, "conv2d")) == 1
    torch.testing.assert_close(counted, got, atol=1e-4, rtol=1e-4)
