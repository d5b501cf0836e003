"""The one door to the fast paths: the switch, stored routes shared between processes, kernels never
compiled in a forward pass, and ``ponder kernels``."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
import torch.nn as nn

from conftest import stored
from ponder import create_model, fast
from ponder.nn import set_executor


def test_a_route_is_decided_once_and_read_back_by_another_process(fresh_routes):
    calls = []
    value = fast.decide("demo_op", (3, (4, 5), torch.float32), lambda: calls.append(1) or "b")
    assert value == "b" and calls == [1]
    assert fast.decide("demo_op", (3, (4, 5), torch.float32), lambda: calls.append(1) or "c") == "b"
    assert stored(fresh_routes, "demo_op") == {'demo_op|[3,[4,5],"torch.float32"]': "b"}
    code = ("from ponder import fast\n"
            "print(fast.decide('demo_op', (3, (4, 5), __import__('torch').float32), lambda: 'other'))\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          env=dict(os.environ))
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "b"  # the stored route, not a new measurement


def test_nested_routes_decided_while_timing_are_all_stored(fresh_routes):
    def outer() -> str:
        fast.decide("inner_op", (1,), lambda: "x")
        return "y"

    assert fast.decide("outer_op", (1,), outer) == "y"
    fresh_routes.forget_memory()
    assert stored(fresh_routes, "inner_op") and stored(fresh_routes, "outer_op")


def test_override_forces_a_route_without_storing_it(fresh_routes):
    with fresh_routes.override("demo_op", "forced"):
        assert fast.decide("demo_op", (1,), lambda: "timed") == "forced"
    assert stored(fresh_routes, "demo_op") == {}
    assert fast.decide("demo_op", (1,), lambda: "timed") == "timed"


def test_a_stored_route_this_process_lacks_gives_way_to_the_first(fresh_routes):
    fast.decide("demo_route", (2,), lambda: "kernel")  # stored where a compiled kernel was built
    fresh_routes.forget_memory()
    assert fast.choose("demo_route", (2,), lambda: [("pytorch", None), ("packed", None)]) == "pytorch"
    assert stored(fresh_routes, "demo_route") == {"demo_route|[2]": "kernel"}  # the machine's record stays
    fresh_routes.forget_memory()
    assert fast.choose("demo_route", (2,), lambda: [("pytorch", None), ("kernel", None)]) == "kernel"


def test_switched_off_every_operation_is_the_plain_module():
    torch.manual_seed(0)
    conv, bn = nn.Conv2d(4, 6, 3, padding=1, bias=False), nn.BatchNorm2d(6)
    bn.running_mean.normal_()
    bn.eval()
    seen = []
    bn.register_forward_hook(lambda *_: seen.append(1))
    x = torch.randn(2, 4, 5, 5).contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        with fast.disabled():
            assert not fast.enabled()
            plain = fast.conv_bn(x, conv, bn, relu=True)
        assert seen == [1]  # the BatchNorm module itself ran
        if fast.enabled():
            folded = fast.conv_bn(x, conv, bn, relu=True)
            assert seen == [1]  # folded into the convolution: the module did not run
            torch.testing.assert_close(folded, plain, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(plain, torch.relu(bn(conv(x))).detach())


def test_a_forward_pass_never_compiles_and_says_how_to_build(tmp_path):
    code = ("import torch\n"
            "from ponder import create_model\n"
            "from ponder.fast import native\n"
            "from ponder.nn import set_executor\n"
            "m = create_model('sact_resnet32_cifar').eval()\n"
            "set_executor(m, 'sparse')\n"
            "with torch.no_grad():\n"
            "    m(torch.randn(2, 3, 32, 32).contiguous(memory_format=torch.channels_last))\n"
            "print(sorted(native._LOADED.items()))\n")
    env = dict(os.environ, PONDER_CACHE_DIR=str(tmp_path), PONDER_FAST="1")  # an empty cache: nothing built
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stderr
    assert "('spatial', None)" in done.stdout
    assert done.stderr.count("ponder kernels build") == 1  # one line, once
    assert not list(tmp_path.rglob("*.so")) and not list(tmp_path.rglob("*.o"))


def test_kernels_command_reports_modules_and_stored_routes(fresh_routes):
    fast.decide("conv2d", (1, (3, 8, 8)), lambda: "pytorch")
    done = subprocess.run([sys.executable, "-m", "ponder.cli", "kernels"], capture_output=True, text=True,
                          timeout=120, env=dict(os.environ))
    assert done.returncode == 0, done.stderr
    out = done.stdout
    assert "spatial" in out and "small_conv" in out and "exit_step" in out
    assert "stored routes: 1" in out and "conv2d" in out
    listed = subprocess.run([sys.executable, "-m", "ponder.cli", "kernels", "--routes"], capture_output=True,
                            text=True, timeout=120, env=dict(os.environ))
    assert 'conv2d|[1,[3,8,8]] -> pytorch' in listed.stdout


@pytest.mark.parametrize("name", ["msdnet_cifar_budgeted", "sact_resnet32_cifar"])
def test_the_same_outputs_with_fast_paths_on_and_off(name):
    torch.manual_seed(0)
    model = create_model(name).eval()
    set_executor(model, "sparse")
    if hasattr(model, "force_keep_rate"):
        model.force_keep_rate(0.5, seed=0)
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        on = model(x)
        with fast.disabled():
            off = model(x)
    torch.testing.assert_close(on.logits, off.logits, rtol=1e-4, atol=1e-4)
    assert torch.equal(on.macs, off.macs)



def test_stored_routes_are_kept_per_kernel_build(monkeypatch):
    """A changed, new or removed kernel build gets its own routes file: routes timed without a kernel (or
    with an older one) are never applied to another build."""
    from ponder.fast import native, routes

    monkeypatch.delenv("PONDER_ROUTES_FILE", raising=False)
    native.forget_loaded()
    first = routes.routes_file()
    assert first.name.endswith(f"-k{native.builds_tag()}.json")
    gone = next(iter(native.MODULES))
    built = native.KernelModule.built
    with monkeypatch.context() as m:
        m.setattr(native.KernelModule, "built", lambda self: built(self) != (self.name == gone))  # flipped
        native.forget_loaded()
        other = routes.routes_file()
    native.forget_loaded()
    assert other != first and routes.routes_file() == first



def test_a_compiler_without_openmp_still_builds_the_kernels(tmp_path, monkeypatch, capsys):
    """Where ``-fopenmp`` fails (a compiler without OpenMP), a module builds without it and says so in one
    line; any other build failure is raised as it is."""
    import torch.utils.cpp_extension as cpp_extension

    from ponder.fast import native

    calls = []

    def compile_and_load(**kw):
        calls.append(kw["extra_cflags"])
        if "-fopenmp" in kw["extra_cflags"]:
            raise RuntimeError("clang: error: unsupported option '-fopenmp'")
        assert kw["extra_ldflags"] == []

    monkeypatch.setattr(cpp_extension, "load", compile_and_load)
    monkeypatch.setattr(native.KernelModule, "built", lambda self: False)
    monkeypatch.setattr(native.KernelModule, "build_dir", lambda self: tmp_path / self.name)
    try:
        native.build("small_conv")
        assert len(calls) == 2 and "-fopenmp" in calls[0] and "-fopenmp" not in calls[1]
        err = capsys.readouterr().err
        assert "OpenMP" in err and err.count("\n") == 1

        def failing(**kw):
            raise RuntimeError("error: expected ';'")

        monkeypatch.setattr(cpp_extension, "load", failing)
        with pytest.raises(RuntimeError, match="expected"):
            native.build("small_conv")  # (not about OpenMP: no second try)
    finally:
        native.forget_loaded()
