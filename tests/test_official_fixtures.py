"""The official checkpoints of ../shared/fixtures/official: converted models reproduce the official outputs
(every exit, policy and gate decisions exactly) with both executors; ``ponder convert`` -> eval / bench."""

from __future__ import annotations

import json
import math

import pytest
import torch

from cifar_fixtures import write_fake_cifar
from ponder.cli import main
from ponder.engine.checkpoint import load_run_config
from ponder.nn.executor import set_executor
from ponder.official import load_official
from shared_dir import OFFICIAL

pytestmark = pytest.mark.skipif(OFFICIAL is None or not OFFICIAL.is_dir(),
                                reason="../shared/fixtures/official not present (set PONDER_SHARED)")

FILES = {
    "msdnet": "msdnet_cifar100_budgeted/model_best.pth.tar",
    "ranet": "ranet_cifar100_c1/model_best.pth.tar",
    "blockdrop": "blockdrop_r110_c10/ckpt_E_1990_A_0.931_R_1.44E-01_S_17.42_#_455.t7",
    "skipnet": "skipnet_r110_c10_rnn/model_best.pth.tar",
}
EXECUTORS = ("masked", "sparse")


def close(got: torch.Tensor, want: torch.Tensor) -> None:
    """Equal to float32 rounding, relative to the tensor's scale (the official outputs come from other kernels)."""
    torch.testing.assert_close(got, want, atol=1e-5 * max(1.0, want.abs().max().item()), rtol=1e-4)


def expected(name: str) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(OFFICIAL / FILES[name].split("/")[0] / "expected.safetensors"))


@pytest.fixture(scope="module")
def loaded():
    """Converted fixtures, loaded once; one thread as the official outputs were computed."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield {}
    torch.set_num_threads(threads)


def get(loaded: dict, name: str):
    if name not in loaded:
        loaded[name] = load_official(OFFICIAL / FILES[name])
    return loaded[name]


@pytest.mark.parametrize("name,model,exits", [("msdnet", "msdnet_cifar_budgeted", 5), ("ranet", "ranet_cifar_c1", 6)])
def test_early_exit_models_reproduce_every_official_exit(loaded, name, model, exits):
    ck = get(loaded, name)
    assert (ck.model_name, ck.model_kwargs["num_classes"], ck.dataset) == (model, 100, "cifar100")
    exp, m = expected(name), ck.model
    with torch.no_grad():
        out = set_executor(m, "masked")(exp["x"])
        for k in range(exits):
            close(out.exit_logits[k], exp[f"exit_{k}"])
        set_executor(m, "sparse")
        for k in range(exits):  # thresholds that send every sample out at exit k
            m.set_thresholds([math.inf] * k + [-math.inf] * (exits - k))
            out = m(exp["x"])
            assert out.exit_index.tolist() == [k] * 4
            close(out.logits, exp[f"exit_{k}"])
    m.set_thresholds(None)
    set_executor(m, "masked")


@pytest.mark.parametrize("executor", EXECUTORS)
def test_blockdrop_reproduces_policy_decisions_and_logits(loaded, executor):
    ck = get(loaded, "blockdrop")
    assert ck.model_name == "blockdrop_resnet110_cifar" and ck.model_kwargs["shortcut"] == "avgpool"
    exp, m = expected("blockdrop"), set_executor(ck.model, executor)
    with torch.no_grad():
        out = m(exp["x"])
        close(out.extras["probs"], exp["policy_probs"])
        assert torch.equal(out.gates, exp["policy_greedy"])  # decisions exactly (p >= 0.5)
        assert out.gates.sum(1).tolist() == [21, 20, 21, 22]
        close(out.logits, exp["logits_greedy"])
        close(out.logits, exp["logits_greedy_single"])
        backbone = m.backbone
        fixed = m.skipper.run_blocks(backbone.blocks, backbone.stem(exp["x"]), exp["policy_fixed"])
        close(backbone.head(fixed), exp["logits_fixed"])
        close(backbone.forward_logits(exp["x"]), exp["logits_full"])
    set_executor(m, "masked")


def test_blockdrop_needs_its_avgpool_shortcut():
    """The same weights in ponder's zero-pad shortcut ("A") give another network: the reason for "avgpool"."""
    exp = expected("blockdrop")
    m = load_official(OFFICIAL / FILES["blockdrop"], shortcut="A").model
    with torch.no_grad():
        assert not torch.allclose(m.backbone.forward_logits(exp["x"]), exp["logits_full"], atol=1e-3)


@pytest.mark.parametrize("executor", EXECUTORS)
def test_skipnet_reproduces_gate_decisions_and_logits(loaded, executor):
    ck = get(loaded, "skipnet")
    assert (ck.model_name, ck.model_kwargs) == ("skipnet_resnet110_cifar", {"num_classes": 10, "gate_type": "rnn"})
    exp, m = expected("skipnet"), set_executor(ck.model, executor)
    with torch.no_grad():
        out = m(exp["x"])
    close(out.extras["gate_probs"], exp["gate_probs"][:, :53])  # the 54th gate is discarded officially
    assert torch.equal(out.extras["gate_actions"], exp["gate_decisions"])
    assert torch.equal(out.gates[:, 1:], exp["gate_masks"]) and out.gates[:, 0].eq(1).all()
    close(out.logits, exp["logits"])
    set_executor(m, "masked")


@pytest.mark.parametrize("name,model", [("blockdrop", "blockdrop_resnet110_cifar"),
                                        ("skipnet", "skipnet_resnet110_cifar")])
def test_converted_run_is_evaluated_and_benchmarked_like_a_trained_one(tmp_path, capsys, name, model):
    data = tmp_path / "data"
    write_fake_cifar(data, "cifar10", n_train=20, n_test=16, seed=0)
    run = tmp_path / "run"
    assert main(["convert", str(OFFICIAL / FILES[name]), "--to", str(run)]) == 0
    printed = capsys.readouterr().out
    assert f"-> {run}: {model}" in printed and "note:" in printed
    source = json.loads((run / "source.json").read_text())
    assert source["model"] == model and len(source["sha256"]) == 64
    data_cfg = load_run_config(run).data  # the official preprocessing travels with the run
    official = {"blockdrop": [[0.0] * 3, [1.0] * 3], "skipnet": [[0.4914, 0.4822, 0.4465], [0.2023, 0.1994, 0.201]]}
    assert data_cfg.dataset == "cifar10" and data_cfg.normalize == official[name]
    assert main(["eval", str(run), "--data-dir", str(data), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["model"] == model and result["n"] == 16 and 0.0 <= result["accuracy"] <= 1.0
    assert main(["bench", "--checkpoint", str(run), "--data-dir", str(data), "--batch", "8", "--images", "16",
                 "--repeats", "1", "--warmup", "0", "--json"]) == 0
    bench = json.loads(capsys.readouterr().out)
    assert bench["model"] == model and bench["dynamic_ms"] > 0 and bench["batch"] == 8
    assert main(["convert", str(OFFICIAL / FILES[name]), "--to", str(run)]) == 2
    assert "already holds a run" in capsys.readouterr().err
