"""The compiled SACT kernels equal the PyTorch path they replace (skipped where they cannot be built)."""

from __future__ import annotations

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from ponder import create_model
from ponder.cost import CostLedger
from conftest import fast_paths
from ponder.fast import routes
from ponder.fast import spatial as fused_spatial
from ponder.nn import set_executor
from ponder.nn.halting import ACTAccumulator, SpatialHaltingBranch
from ponder.nn.sparse_units import dense_fallback

pytestmark = [fast_paths, pytest.mark.skipif(not fused_spatial.kernels_available(),
                                             reason="fused spatial kernels not built here (ponder kernels build)")]
CL = torch.channels_last


@pytest.fixture
def pytorch_path(monkeypatch):
    """Run a block of code on the PyTorch path (the kernels reported unavailable)."""
    def off():
        monkeypatch.setattr(fused_spatial, "_extension", lambda: None)
    return off


@pytest.mark.parametrize("inactive", ["shortcut", "relu"])
@pytest.mark.parametrize("shape", [(2, 8, 7, 5), (1, 16, 4, 4)])
def test_residual_epilogue_equals_the_pytorch_fall_back(inactive, shape):
    g = torch.Generator().manual_seed(sum(shape))
    y = torch.randn(*shape, generator=g).contiguous(memory_format=CL)
    s = torch.randn(*shape, generator=g).contiguous(memory_format=CL)  # negative shortcuts too
    mask = torch.rand(shape[0], shape[2], shape[3], generator=g) < 0.5
    want = torch.where(mask[:, None], torch.relu(s + y), torch.relu(s) if inactive == "relu" else s)
    with torch.no_grad():
        got = fused_spatial.residual_epilogue(y.clone(memory_format=CL), s, mask, inactive == "relu")
    assert torch.equal(got, want)
    with torch.enable_grad():  # autograd, NCHW: not for the kernel
        assert fused_spatial.residual_epilogue(y, s, mask, False) is None
    with torch.no_grad():
        assert fused_spatial.residual_epilogue(y.contiguous(), s.contiguous(), mask, False) is None


def test_dense_fall_back_takes_the_kernel_and_keeps_its_values(pytorch_path):
    model = create_model("resnet32_cifar").eval()
    block = model.layer2[2]
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 32, 16, 16, generator=g).relu_().contiguous(memory_format=CL)
    mask = torch.rand(3, 16, 16, generator=g) < 0.4
    with torch.no_grad():
        fused = dense_fallback(block, x, mask, "shortcut")
        pytorch_path()
        plain = dense_fallback(block, x, mask, "shortcut")
    torch.testing.assert_close(fused, plain, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("onednn_planes", [False, True])
@pytest.mark.parametrize("shape", [(2, 12, 6, 9), (1, 16, 32, 32), (3, 5, 1, 4)])
def test_spatial_halting_kernel_equals_the_branch(pytorch_path, monkeypatch, shape, onednn_planes):
    monkeypatch.setitem(routes._OVERRIDE, "halting_planes", "onednn" if onednn_planes else "blas")  # under test
    torch.manual_seed(shape[1])
    branch = SpatialHaltingBranch(shape[1])
    for p in branch.parameters():
        torch.nn.init.normal_(p, std=0.3)
    branch.bn.running_mean.normal_()
    branch.bn.running_var.uniform_(0.5, 2.0)
    branch.eval()
    x = torch.randn(*shape).relu_().contiguous(memory_format=CL)
    with torch.no_grad():
        assert fused_spatial.spatial_halting_applies(x)
        fused = branch(x)
        with FlopCounterMode(display=False) as counter:  # cost counting: the PyTorch ops, counted
            counted = branch(x)
        pytorch_path()
        plain = branch(x)
    assert counter.get_total_flops() > 0
    torch.testing.assert_close(fused, plain, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(counted, plain, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("keep_state", [True, False])
def test_act_step_kernel_gives_the_same_quantities_as_the_pytorch_step(pytorch_path, keep_state):
    g = torch.Generator().manual_seed(3)
    b, c, hgt, wid, units = 2, 6, 5, 4, 4
    xs = [torch.randn(b, c, hgt, wid, generator=g).contiguous(memory_format=CL) for _ in range(units)]
    hs = [torch.rand(b, hgt, wid, generator=g) * 0.6 for _ in range(units - 1)] + [None]

    def run():
        acc = ACTAccumulator(units, (b, hgt, wid), "cpu")
        with torch.no_grad():
            for x, h in zip(xs, hs):
                acc.step(x if keep_state else None, h)
        return acc.result(), acc.ran_units

    (fused, fused_ran) = run()
    pytorch_path()
    (plain, plain_ran) = run()
    assert torch.equal(fused.n, plain.n) and torch.equal(fused.remainder, plain.remainder)
    assert torch.equal(fused.distribution, plain.distribution) and torch.equal(fused_ran, plain_ran)
    assert 1 < fused.n.min() and fused.n.max() <= units  # the scores make positions halt at different units
    if keep_state:
        assert fused.output.is_contiguous(memory_format=CL)
        torch.testing.assert_close(fused.output, plain.output, rtol=1e-6, atol=1e-6)
    else:
        assert fused.output is None and plain.output is None


def test_sact_sparse_executor_with_kernels_matches_the_pytorch_path(pytorch_path):
    torch.manual_seed(0)
    model = create_model("sact_resnet32_cifar", num_classes=10).eval()
    for branches in model.halting:
        for br in branches:
            torch.nn.init.normal_(br.local.weight, std=0.05)
            torch.nn.init.constant_(br.local.bias, 0.0)
    set_executor(model, "sparse")
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        fused = model(x)
        pytorch_path()
        plain = model(x)
    assert len(fused.masks) == len(plain.masks)
    assert all(torch.equal(a, b) for a, b in zip(fused.masks, plain.masks))
    torch.testing.assert_close(fused.logits, plain.logits, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(fused.macs, plain.macs)
    for a, b in zip(fused.ponder, plain.ponder):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert any(bool((~m).any()) for m in fused.masks)  # positions really halted


@pytest.mark.parametrize("bottleneck", [False, True])
@pytest.mark.parametrize("shape", [(3, 8, 8), (1, 5, 7), (2, 1, 1)])
def test_unit_masks_kernel_gives_the_ledger_and_the_dilated_mask(pytorch_path, shape, bottleneck):
    from ponder.models.resnet import Bottleneck
    from ponder.nn.sparse_cost import unit_masks_and_macs

    block = (Bottleneck(32, 8) if bottleneck else create_model("resnet32_cifar").layer1[1]).eval()
    g = torch.Generator().manual_seed(shape[1])
    mask = torch.rand(*shape, generator=g) < 0.3
    mask[0] = False  # a sample with nothing active pays no halting branch
    in_size = (32 if bottleneck else 16, shape[1], shape[2])
    ledger = CostLedger(in_size, {"u.skip": 7, "u.first": 11, "u.rest": 13, "halt": 1000}, 0)
    with torch.no_grad():
        first, macs = unit_masks_and_macs(block, in_size, mask, ledger, "u", "halt")
        pytorch_path()
        want_first, want_macs = unit_masks_and_macs(block, in_size, mask, ledger, "u", "halt")
    assert torch.equal(first, want_first) and torch.equal(macs, want_macs)
    n_first, n_mask = want_first.flatten(1).sum(1).double(), mask.flatten(1).sum(1).double()
    assert torch.equal(macs, 7 + 11 * n_first + 13 * n_mask + 1000 * (n_mask > 0))  # the ledger's charge
    assert macs.dtype == torch.float64 and macs[0] == 7


def test_fast_paths_switched_off_by_the_environment_leave_the_kernels_alone():
    import os
    import subprocess
    import sys

    code = ("import torch\n"
            "from ponder import create_model\n"
            "from ponder.fast import enabled, native\n"
            "from ponder.nn import set_executor\n"
            "m = create_model('sact_resnet32_cifar').eval()\n"
            "set_executor(m, 'sparse')\n"
            "with torch.no_grad():\n"
            "    assert m(torch.randn(2, 3, 32, 32)).logits.shape == (2, 10)\n"
            "print(enabled(), native._LOADED)\n")
    env = dict(os.environ, PONDER_FAST="0")
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "False {}" and done.stderr == ""  # no kernel was even looked for


@pytest.mark.parametrize("relu_all", [False, True])
def test_scatter_residual_equals_the_index_ops(relu_all):
    g = torch.Generator().manual_seed(5)
    out = torch.randn(20, 6, generator=g)
    rows = torch.tensor([0, 3, 4, 11, 19])
    y = torch.randn(5, 6, generator=g)
    want = torch.relu(out) if relu_all else out.clone()
    want[rows] = torch.relu(out[rows] + y)
    with torch.no_grad():
        got = fused_spatial.scatter_residual(out, rows, y, relu_all)
    assert got is out and torch.equal(out, want)


@pytest.mark.parametrize("bottleneck", [False, True])
def test_sparse_kernel_with_the_fused_epilogue_equals_the_masked_unit(pytorch_path, bottleneck):
    from ponder.models.resnet import BasicBlock, Bottleneck
    from ponder.nn.sparse_units import first_conv_mask, masked_residual, run_sparse

    torch.manual_seed(1)
    block = (Bottleneck(32, 8) if bottleneck else BasicBlock(16, 16)).eval()
    c = 32 if bottleneck else 16
    x = torch.randn(2, c, 9, 9).relu_().contiguous(memory_format=CL)
    mask = torch.rand(2, 9, 9) < 0.4
    first = first_conv_mask(block, mask, (9, 9))
    with torch.no_grad():
        want = masked_residual(block, x, mask, "relu")
        fused = run_sparse(block, x, mask, first, "relu")
        pytorch_path()
        plain = run_sparse(block, x, mask, first, "relu")
    torch.testing.assert_close(fused, want, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(fused, plain, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("shape", [(2, 16, 8, 8), (3, 8, 7, 5), (1, 4, 1, 1), (1, 4, 2, 3)])
def test_mask_logits_and_decision_equal_pytorch(stride, shape):
    from ponder.nn.mask_unit import MaskUnit
    from ponder.nn.sparse_conv import dilate_mask

    torch.manual_seed(sum(shape) + stride)
    unit = MaskUnit(shape[1], stride).eval()
    x = torch.randn(*shape).contiguous(memory_format=CL)
    with torch.no_grad():
        want = unit.local(x)[:, 0] + unit.glob(x.mean((2, 3)))[:, :, None]
        got = unit(x)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
        thr = float(got.flatten().median())  # about half the positions active
        mask, first, macs, n_mask, n_first = unit.decide(x, thr, None, True, 7.0, 3.0, 5.0)
        assert torch.equal(mask, got >= thr) and torch.equal(first, dilate_mask(mask))
        counts = mask.flatten(1).sum(1).double(), first.flatten(1).sum(1).double()
        assert torch.equal(macs, 7.0 + 3.0 * counts[1] + 5.0 * counts[0])
        assert (n_mask, n_first) == (int(mask.sum()), int(first.sum()))
        forced = torch.rand(mask.shape) < 0.3
        mask2, no_first, macs2, n2, nf2 = unit.decide(x, thr, forced, False, 7.0, 3.0, 5.0)
        assert mask2 is forced and no_first is None and nf2 == 0 and n2 == int(forced.sum())
        assert torch.equal(macs2, 7.0 + 5.0 * forced.flatten(1).sum(1).double())
        if shape[2] * shape[3] > 1:  # NCHW (a 1x1 map is both): not for the kernel
            assert unit.decide(x.contiguous(), thr, None, True, 0.0, 0.0, 0.0) is None


@pytest.mark.parametrize("name", ["sact_resnet32_cifar", "dynconv_resnet20_cifar", "dynconv_multi_resnet20_cifar"])
@pytest.mark.parametrize("rate", [None, 0.4])
def test_spatial_models_on_the_kernels_match_the_pytorch_path(pytorch_path, name, rate):
    torch.manual_seed(0)
    model = create_model(name, num_classes=10).eval()
    for m in model.modules():
        if type(m).__name__ == "SpatialHaltingBranch":  # varied halting (untrained branches start constant)
            torch.nn.init.normal_(m.local.weight, std=0.05)
    model.force_keep_rate(rate, seed=1)
    set_executor(model, "sparse")
    x = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        fused = model(x)
        pytorch_path()
        plain = model(x)
    assert all(torch.equal(a, b) for a, b in zip(fused.masks, plain.masks))
    assert torch.equal(fused.macs, plain.macs)
    torch.testing.assert_close(fused.logits, plain.logits, rtol=1e-4, atol=1e-5)
