"""Official checkpoint layouts generated here (no shared fixtures): every repository's keys, zip and legacy
containers, ``module.`` prefixes, nested dicts, Python 2 strings; refused files get one sentence."""

from __future__ import annotations

import io
import os
import re
import struct
from pathlib import Path

import pytest
import torch

from ponder.cli import main
from ponder.official import OfficialCheckpointError, load_official
from ponder.official.blockdrop import flat_resnet_keys
from ponder.registry import create_model


# ------------------------------------------------------------------ writing the official layouts

def randomised(name: str, seed: int = 0, **kw) -> torch.nn.Module:
    """A ponder model whose every parameter and buffer is random (so no key can be mapped by accident)."""
    torch.manual_seed(seed)
    model = create_model(name, **kw)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for key, t in model.state_dict().items():
            if t.is_floating_point():
                t.copy_(torch.rand(t.shape, generator=g) + 0.5 if key.endswith("running_var")
                        else torch.randn(t.shape, generator=g) * 0.1)
            elif key.endswith("num_batches_tracked"):
                t.fill_(7)
    return model.eval()


def save(obj, path: Path, legacy: bool = False) -> Path:
    """``torch.save`` as today's zip archive, or as the pre-1.6 stream the released files use."""
    torch.save(obj, path, _use_new_zipfile_serialization=not legacy)
    return path


def no_counters(state: dict) -> dict:
    """A state dict as PyTorch < 0.4.1 wrote it: no BatchNorm num_batches_tracked."""
    return {k: v for k, v in state.items() if not k.endswith("num_batches_tracked")}


def prefixed(state: dict) -> dict:
    """A DataParallel state dict."""
    return {"module." + k: v for k, v in state.items()}


def ranet_official(state: dict) -> dict:
    """ponder RANet keys -> RANet-pytorch keys (FirstLayer, scale_flows, conv_normal / conv_up, conv_last,
    classifier)."""
    out = {}
    for key, value in state.items():
        head, _, tail = key.partition(".")
        k = {"stem": "FirstLayer", "heads": "classifier", "flows": "scale_flows"}.get(head, head) + "." + tail
        k = k.replace(".last.", ".conv_last.")
        m = re.match(r"scale_flows\.(\d+)\.(\d+)\.layers\.(\d+)\.(?:(fine|coarse)\.)?(\d)\.net\.(\d)\.(.+)", k)
        if m:
            part = "conv_up" if m[4] == "coarse" else "conv_normal"
            k = f"scale_flows.{m[1]}.{m[2]}.layers.{m[3]}.{part}.net.{3 * int(m[5]) + int(m[6])}.{m[7]}"
        out[k] = value
    return out


def flat_official(state: dict, prefix: str) -> dict:
    """ponder ResNet keys under ``prefix`` -> BlockDrop's flat ResNet keys (blocks.s.b, ds.s)."""
    out = {}
    for key, value in state.items():
        if not key.startswith(prefix):
            continue
        k = key[len(prefix):]
        if m := re.match(r"layer(\d)\.0\.downsample\.(.+)", k):
            k = f"ds.{int(m[1]) - 1}.{m[2]}"
        elif m := re.match(r"layer(\d)\.(\d+)\.(.+)", k):
            k = f"blocks.{int(m[1]) - 1}.{m[2]}.{m[3]}"
        out[k] = value
    return out


def blockdrop_official(model: torch.nn.Module, policy_key: str = "agent") -> dict:
    """BlockDrop's finetune.py dict: 'resnet' and 'agent' (policy trunk as features.*, logit, vnet)."""
    state = model.state_dict()
    agent = {"features." + k: v for k, v in flat_official(state, "policy.trunk.").items()}
    agent.update({"logit." + k[len("policy.fc."):]: v for k, v in state.items() if k.startswith("policy.fc.")})
    agent.update({"vnet.weight": torch.randn(1, 64), "vnet.bias": torch.randn(1)})
    return {policy_key: agent, "resnet": flat_official(state, "backbone."), "epoch": 30, "reward": 0.25, "acc": 0.5}


FF_OFFICIAL = {"ffgate1": {"body.1.0": "conv1", "body.1.1": "bn1", "body.2.0": "conv2", "body.2.1": "bn2",
                           "out": "linear_layer"},
               "ffgate2": {"body.0": "conv1", "body.1": "bn1", "out": "linear_layer"}}


def skipnet_official(model: torch.nn.Module, n: int, gate_type: str) -> dict:
    """ucbdrive/skipnet's ResNetRecurrentGateSP / ResNetFeedForwardSP state dict, with its duplicated
    shortcut entries (group{g}_ds0, the same tensors) and the discarded last gate."""
    out: dict[str, torch.Tensor] = {}
    for key, value in model.state_dict().items():
        if m := re.match(r"backbone\.layer(\d)\.(\d+)\.(.+)", key):
            out[f"group{m[1]}_layer{m[2]}.{m[3]}"] = value
            if m[3].startswith("downsample."):
                out[f"group{m[1]}_ds{m[2]}.{m[3][len('downsample.'):]}"] = value
        elif m := re.match(r"gate_bank\.proj\.(\d+)\.(.+)", key):
            j = int(m[1])
            out[f"group{j // n + 1}_gate{j % n}.1.{m[2]}"] = value
        elif m := re.match(r"gate_bank\.gates\.(\d+)\.(body\.\d(?:\.\d)?|out)\.(.+)", key):
            j = int(m[1])
            out[f"group{j // n + 1}_gate{j % n}.{FF_OFFICIAL[gate_type][m[2]]}.{m[3]}"] = value
        elif m := re.match(r"gate_bank\.lstm\.(.+)", key):
            out[f"control.rnn.{m[1]}_l0"] = value
        elif key.startswith("gate_bank.out."):
            out["control.proj." + key[len("gate_bank.out."):]] = value
        else:
            out[key[len("backbone."):]] = value
    last = [k for k in out if k.startswith(f"group3_gate{n - 2}.")]  # the extra gate after the last block
    out.update({k.replace(f"group3_gate{n - 2}.", f"group3_gate{n - 1}."): out[k].clone() for k in last})
    return out


def assert_same_weights(loaded: torch.nn.Module, source: torch.nn.Module, counters: bool = True) -> None:
    want, got = source.state_dict(), loaded.state_dict()
    assert set(got) == set(want)
    for k, v in want.items():
        if k.endswith("num_batches_tracked"):
            assert int(got[k]) == (int(v) if counters else 0), k
        else:
            assert torch.equal(got[k], v), k


# ------------------------------------------------------------------ each repository, each container


@pytest.mark.parametrize("legacy", [False, True])
def test_msdnet_keys_are_identical_and_options_come_from_the_tensors(tmp_path, legacy):
    src = randomised("msdnet_cifar_anytime", n_blocks=3, num_classes=10)
    state = no_counters(src.state_dict()) if legacy else src.state_dict()
    obj = {"epoch": 4, "arch": "msdnet", "state_dict": prefixed(state), "best_prec1": 12.5,
           "optimizer": {"state": {}, "param_groups": [{"lr": 0.1, "params": [0, 1]}]}}
    ck = load_official(save(obj, tmp_path / "model_best.pth.tar", legacy))
    assert ck.model_name == "msdnet_cifar_anytime" and ck.repository == "kalviny/MSDNet-PyTorch"
    assert ck.model_kwargs == {"num_classes": 10, "n_blocks": 3, "stepmode": "even", "step": 2, "base": 4,
                               "n_channels": 16, "growth_rate": 6}
    assert ck.info == {"epoch": 4, "arch": "msdnet", "best_prec1": 12.5} and ck.dataset == "cifar10"
    assert_same_weights(ck.model, src, counters=not legacy)


def test_msdnet_lin_grow_nested_dict_and_unknown_class_count(tmp_path):
    src = randomised("msdnet_cifar_budgeted", n_blocks=4, num_classes=7, growth_rate=4)
    ck = load_official(save({"model": {"state_dict": src.state_dict()}}, tmp_path / "nested.pth"))
    assert ck.model_name == "msdnet_cifar_budgeted"
    assert (ck.model_kwargs["n_blocks"], ck.model_kwargs["stepmode"], ck.model_kwargs["step"],
            ck.model_kwargs["growth_rate"]) == (4, "lin_grow", 1, 4)
    assert ck.dataset == "imagefolder" and any("7 classes" in n for n in ck.notes)
    assert_same_weights(ck.model, src)


def test_ranet_keys_are_mapped_and_the_preset_found(tmp_path):
    src = randomised("ranet_cifar_c2", num_classes=10)
    obj = {"epoch": 2, "arch": "RANet", "state_dict": prefixed(ranet_official(no_counters(src.state_dict()))),
           "best_prec1": 1.0}
    ck = load_official(save(obj, tmp_path / "model_best.pth.tar", legacy=True))
    assert (ck.model_name, ck.model_kwargs, ck.dataset) == ("ranet_cifar_c2", {"num_classes": 10}, "cifar10")
    assert_same_weights(ck.model, src, counters=False)


@pytest.mark.parametrize("legacy", [False, True])
def test_blockdrop_backbone_and_policy_map_and_value_head_is_dropped(tmp_path, legacy):
    src = randomised("blockdrop_resnet32_cifar", num_classes=10)
    path = save(blockdrop_official(src), tmp_path / "ckpt_E_30_A_0.500_R_2.50E-01_S_9.00_#_12.t7", legacy)
    ck = load_official(path)
    assert (ck.model_name, ck.model_kwargs) == ("blockdrop_resnet32_cifar", {"num_classes": 10, "shortcut": "avgpool"})
    assert any("vnet" in n for n in ck.notes) and ck.info == {"epoch": 30, "acc": 0.5, "reward": 0.25}
    # BlockDrop's ResNet-32 CIFAR-10 checkpoint expects mean/std inputs (block_skipping.md 1.4)
    want = torch.tensor([[125.3, 123.0, 113.9], [63.0, 62.1, 66.7]]) / 255
    torch.testing.assert_close(torch.tensor(ck.normalize), want)
    assert_same_weights(ck.model, src)


def test_blockdrop_legacy_policy_key_stale_fc_and_prefixes(tmp_path):
    src = randomised("blockdrop_resnet32_cifar", num_classes=100)
    obj = blockdrop_official(src, policy_key="net")
    obj["net"].update({"features.fc.weight": torch.randn(10, 64), "features.fc.bias": torch.randn(10)})
    obj = {**obj, "net": prefixed(no_counters(obj["net"])), "resnet": prefixed(no_counters(obj["resnet"]))}
    ck = load_official(save(obj, tmp_path / "old.t7", legacy=True))
    assert ck.dataset == "cifar100" and ck.normalize == [[0.0] * 3, [1.0] * 3]  # raw [0, 1] pixels
    assert any("features.fc" in n for n in ck.notes)
    assert_same_weights(ck.model, src, counters=False)


def test_blockdrop_imagenet_flat_keys_are_ponders_resnet_keys():
    """FlatResNet224's names (blocks.s.b, ds.s.{0,1}) for the ResNet-10 policy trunk land on ponder's keys."""
    trunk = create_model("blockdrop_resnet101").policy.trunk.state_dict()
    official = {"conv1.weight": None, **{f"bn1.{p}": None for p in ("weight", "bias", "running_mean", "running_var")}}
    for s in range(4):
        for part in ("conv1", "bn1", "conv2", "bn2"):
            params = ("weight",) if part.startswith("conv") else ("weight", "bias", "running_mean", "running_var")
            official.update({f"blocks.{s}.0.{part}.{p}": None for p in params})
        if s > 0:  # stage 0 keeps 64 channels at stride 1: an empty shortcut
            official[f"ds.{s}.0.weight"] = None
            official.update({f"ds.{s}.1.{p}": None for p in ("weight", "bias", "running_mean", "running_var")})
    mapped = set(flat_resnet_keys(official, ""))
    assert mapped == {k for k in trunk if not k.endswith("num_batches_tracked") and not k.startswith("fc.")}


@pytest.mark.parametrize("gate_type,legacy", [("rnn", True), ("rnn", False), ("ffgate1", False), ("ffgate2", True)])
def test_skipnet_gates_backbone_and_duplicated_shortcuts(tmp_path, gate_type, legacy):
    src = randomised("skipnet_resnet38_cifar", gate_type=gate_type)
    state = skipnet_official(src, n=6, gate_type=gate_type)
    obj = {"iter": 1000, "arch": f"cifar10_{gate_type}_38", "best_prec1": 10.0,
           "state_dict": prefixed(no_counters(state) if legacy else state)}
    ck = load_official(save(obj, tmp_path / "resnet-38-rnn-sp-cifar10.pth.tar", legacy))
    assert (ck.model_name, ck.model_kwargs) == ("skipnet_resnet38_cifar", {"num_classes": 10, "gate_type": gate_type})
    assert any("duplicated shortcut" in n for n in ck.notes) and any("last block" in n for n in ck.notes)
    assert_same_weights(ck.model, src, counters=not legacy)


def test_skipnet_duplicate_that_differs_is_refused(tmp_path):
    state = skipnet_official(randomised("skipnet_resnet38_cifar"), n=6, gate_type="rnn")
    state["group2_ds0.0.weight"] = state["group2_ds0.0.weight"] + 1
    with pytest.raises(OfficialCheckpointError, match="differs from its block's own shortcut"):
        load_official(save({"state_dict": state}, tmp_path / "bad.pth.tar"))


# ------------------------------------------------------------------ names, options, misfits

def test_model_name_and_options_override_and_misfits_are_one_sentence(tmp_path):
    src = randomised("blockdrop_resnet32_cifar", num_classes=10)
    path = save(blockdrop_official(src), tmp_path / "ck.t7")
    assert load_official(path, threshold=0.4).model.threshold == 0.4
    with pytest.raises(OfficialCheckpointError, match=r"does not fit blockdrop_resnet110_cifar .*: it has no tensor"):
        load_official(path, "blockdrop_resnet110_cifar")
    with pytest.raises(OfficialCheckpointError, match=r"Tushar-N/blockdrop checkpoint, which maps onto the "
                                                      r"blockdrop_resnet\* models, not onto 'msdnet_cifar_budgeted'"):
        load_official(path, "msdnet_cifar_budgeted")
    with pytest.raises(OfficialCheckpointError, match="does not accept the options"):
        load_official(path, no_such_option=1)
    curriculum = {"agent": blockdrop_official(src)["agent"], "epoch": 5}
    with pytest.raises(OfficialCheckpointError, match="holds only the policy"):
        load_official(save(curriculum, tmp_path / "cl.t7"))


def test_device_maps_the_storages(tmp_path):
    src = randomised("skipnet_resnet38_cifar")
    path = save({"state_dict": skipnet_official(src, 6, "rnn")}, tmp_path / "ck.pth.tar")
    ck = load_official(path, device="cpu")
    assert all(t.device.type == "cpu" for t in ck.model.state_dict().values())


# ------------------------------------------------------------------ safety and unknown files

class _RunsCode:
    """Pickles as a call to os.system: what a malicious checkpoint does."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


@pytest.mark.parametrize("legacy", [False, True])
def test_a_pickle_that_runs_code_is_refused_without_running_it(tmp_path, legacy):
    marker = tmp_path / "ran"
    path = save({"state_dict": {"w": torch.ones(1)}, "arch": _RunsCode(marker)}, tmp_path / "evil.pth.tar", legacy)
    with pytest.raises(OfficialCheckpointError, match=r"pickles (posix|nt|os)\.system, not only tensors.*refuses"):
        load_official(path)
    assert not marker.exists()


def test_python2_strings_that_are_not_utf8_are_read_as_latin1(tmp_path):
    """A Python 2.7 pickle stores str as SHORT_BINSTRING bytes; torch.load's utf-8 default fails on non-ASCII."""
    src = randomised("skipnet_resnet38_cifar")
    buf = io.BytesIO()
    torch.save({"iter": 5, "arch": "placeholder_arch", "state_dict": skipnet_official(src, 6, "rnn")}, buf,
               _use_new_zipfile_serialization=False)
    py3 = b"X" + struct.pack("<I", len("placeholder_arch")) + b"placeholder_arch"  # BINUNICODE
    py2 = b"U" + bytes([8]) + b"r\xe9sn38_c"  # SHORT_BINSTRING, latin-1 bytes
    data = buf.getvalue()
    assert data.count(py3) == 1
    path = tmp_path / "py2.pth.tar"
    path.write_bytes(data.replace(py3, py2))
    ck = load_official(path)
    assert ck.info["arch"] == "résn38_c"
    assert_same_weights(ck.model, src)


@pytest.mark.parametrize("content,expected", [
    (b"", "is not a PyTorch checkpoint: expected a checkpoint written by torch.save"),
    (b"just some text\n", "is not a PyTorch checkpoint"),
    (bytes(range(256)) * 4, "is not a PyTorch checkpoint"),
    # a bare pickle: never unpickled
    (b"\x80\x04\x95\x05\x00\x00\x00\x00\x00\x00\x00K\x01.", "is not a PyTorch checkpoint"),
    (b"PK\x03\x04" + b"\x00" * 60, "starts like a zip archive but cannot be read"),
])
def test_unknown_files_get_one_sentence(tmp_path, content, expected):
    path = tmp_path / "file.pth"
    path.write_bytes(content)
    with pytest.raises(OfficialCheckpointError, match=expected) as info:
        load_official(path)
    assert "\n" not in str(info.value)


def test_a_checkpoint_of_another_layout_names_the_expected_ones(tmp_path):
    path = save({"weights": {"fc.weight": torch.ones(2, 2)}, "step": 3}, tmp_path / "other.pt")
    with pytest.raises(OfficialCheckpointError, match=r"not one of the official layouts ponder reads \(it holds a dict "
                                                      r"with keys \['weights', 'step'\]\): expected MSDNet-PyTorch"):
        load_official(path)
    with pytest.raises(OfficialCheckpointError, match="does not exist"):
        load_official(tmp_path / "missing.pth.tar")
    with pytest.raises(OfficialCheckpointError, match="is a directory"):
        load_official(tmp_path)


def test_cli_prints_one_line_and_no_traceback(tmp_path, capsys):
    path = tmp_path / "notes.txt"
    path.write_text("hello")
    assert main(["convert", str(path), "--to", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("ponder convert: error: ") and err.count("\n") == 1 and "Traceback" not in err
    assert not (tmp_path / "run").exists()


def test_cli_converts_with_model_args(tmp_path, capsys):
    src = randomised("blockdrop_resnet32_cifar", num_classes=10)
    path = save(blockdrop_official(src), tmp_path / "ck.t7", legacy=True)
    assert main(["convert", str(path), "--to", str(tmp_path / "run"), "--model-arg", "threshold=0.3"]) == 0
    out = capsys.readouterr().out
    assert "blockdrop_resnet32_cifar (num_classes=10, shortcut=avgpool, threshold=0.3), data cifar10" in out
    from ponder.engine.checkpoint import load_run

    model, config = load_run(tmp_path / "run")
    assert config.model.kwargs == {"num_classes": 10, "shortcut": "avgpool", "threshold": 0.3}
    assert_same_weights(model, src)
