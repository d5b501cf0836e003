"""Training hooks for methods with steps of their own (tests/engine_toys.py): a virtual step and a
second optimizer, an EMA teacher, round-robin budgets, held-out reads at epoch end. Each resumes
bit for bit after a kill, and two processes train what one process trains at the same global batch."""

import json
import textwrap
from pathlib import Path

import pytest
import torch

import engine_toys
from cifar_fixtures import write_fake_cifar
from ponder.engine import RunDirError
from ponder.engine.checkpoint import load_state, read_metrics, read_weights
from run_states import assert_metrics_close
from two_processes import run_two_processes

TESTS = Path(__file__).parent


@pytest.fixture(scope="module")
def cifar_dir(tmp_path_factory):
    return write_fake_cifar(tmp_path_factory.mktemp("data"), "cifar10", n_train=40, n_test=16, seed=0)


@pytest.mark.parametrize("kind", sorted(engine_toys.TOYS))
def test_hooks_resume_bit_identical_after_a_kill(kind, cifar_dir, tmp_path):
    full, resumed, sa = engine_toys.assert_resume_is_exact(
        lambda out, resume=False: engine_toys.run_toy(kind, cifar_dir, out, batch_size=8, resume=resume),
        engine_toys.KILL, tmp_path)
    assert sa["step"] == 12 and sa["epoch"] == 3
    wa, wb = read_weights(tmp_path / "full" / "weights.safetensors"), read_weights(tmp_path / "killed" / "weights.safetensors")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    owned = {"toy_meta_step": ({"wnet"}, {"wnet"}), "toy_ema_teacher": ({"teacher"}, set())}.get(kind, (set(), set()))
    assert (set(sa["owned"]["modules"]), set(sa["owned"]["optimizers"])) == owned
    if kind == "toy_meta_step":  # the weight net was trained, and its Adam state is in the checkpoint
        assert sa["owned"]["optimizers"]["wnet"]["state"][0]["step"].item() == 12
        assert not torch.equal(sa["owned"]["modules"]["wnet"]["weight"], full.method.wnet.weight.new_zeros(1, 1))
    if kind == "toy_ema_teacher":  # the teacher follows the student, but is not it
        t, s = sa["owned"]["modules"]["teacher"], sa["model"]
        assert not torch.equal(t["conv.weight"], s["conv.weight"])
        assert (t["conv.weight"] - s["conv.weight"]).abs().max() < 0.5 * s["conv.weight"].abs().max()
    if kind in ("toy_round_robin", "toy_held_out"):
        # the model trained budget k mod 3 at iteration k, also after resuming (iterations 4..11)
        assert full.model.seen == [k % 3 for k in range(12)]
        assert resumed.model.seen == [k % 3 for k in range(4, 12)]
    if kind == "toy_held_out":
        records = read_metrics(tmp_path / "full")
        assert all(len(r["held_out_acc"]) == 3 and len(r["loss_weights"]) == 3 for r in records)
        assert sa["method"]["loss_weights"] == records[-1]["loss_weights"]


def test_resume_refuses_a_state_without_the_methods_own_modules(cifar_dir, tmp_path):
    engine_toys.run_toy("toy_round_robin", cifar_dir, tmp_path / "run", batch_size=8)
    with pytest.raises(RunDirError, match=r"holds method-owned modules \[\] but the method owns \['teacher'\]"):
        engine_toys.run_toy("toy_ema_teacher", cifar_dir, tmp_path / "run", batch_size=8, resume=True)


def test_held_out_reads_need_a_held_out_split(cifar_dir, tmp_path, monkeypatch):
    cfg = engine_toys.toy_config(cifar_dir, 8)
    cfg.data.val_size = 0
    monkeypatch.setattr(engine_toys, "toy_config", lambda *a: cfg)
    with pytest.raises(ValueError, match="reads the held-out split during training; set data.val_size > 0"):
        engine_toys.run_toy("toy_held_out", cifar_dir, tmp_path / "run", batch_size=8)


SCRIPT = textwrap.dedent("""
    import os, sys
    import torch
    torch.set_num_threads(1)
    sys.path.insert(0, sys.argv[1])
    import engine_toys
    from ponder.engine.distributed import init_distributed, shutdown_distributed

    info, _ = init_distributed("cpu")
    for kind in sorted(engine_toys.TOYS):
        trainer = engine_toys.run_toy(kind, sys.argv[2], f"{sys.argv[3]}/{kind}", batch_size=4, dist=info)
        torch.save({"seen": trainer.model.seen}, f"{sys.argv[3]}/{kind}/seen{info.rank}.pt")
    shutdown_distributed()
    sys.stdout.flush()
    os._exit(0)  # skip interpreter finalization (gloo threads can abort it; see test_engine_ddp.py)
""")


def test_two_processes_train_what_one_process_trains(cifar_dir, tmp_path):
    torch.set_num_threads(1)
    run_two_processes(SCRIPT, tmp_path / "toys_ddp.py", TESTS, cifar_dir, tmp_path / "two", timeout=300)
    for kind in sorted(engine_toys.TOYS):
        one = engine_toys.run_toy(kind, cifar_dir, tmp_path / "one" / kind, batch_size=8)
        two = tmp_path / "two" / kind
        s1, s2 = load_state(tmp_path / "one" / kind / "state.pt"), load_state(two / "state.pt")
        assert s2["world_size"] == 2 and s1["step"] == s2["step"] == 12
        for k, v in s1["model"].items():
            torch.testing.assert_close(s2["model"][k], v, rtol=1e-4, atol=1e-5, msg=f"{kind}: {k}")
        for name, module in s1["owned"]["modules"].items():
            for k, v in module.items():
                torch.testing.assert_close(s2["owned"]["modules"][name][k], v, rtol=1e-4, atol=1e-5,
                                           msg=f"{kind}: {name}.{k}")
        assert_metrics_close(read_metrics(tmp_path / "one" / kind), read_metrics(two), kind)
        seen = [torch.load(two / f"seen{r}.pt")["seen"] for r in (0, 1)]
        assert seen[0] == seen[1] == one.model.seen  # every rank trained the budget one process trained
    assert json.loads((tmp_path / "two" / "toy_held_out" / "metrics.jsonl").read_text().splitlines()[0])["loss_weights"]
