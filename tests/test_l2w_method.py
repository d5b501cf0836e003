"""The ``l2w`` method: its first-order meta-gradient equals the paper's second-order formula (MSDNet,
IMTA stages 1 and 2, RANet), it trains through the trainer's hooks, resumes bit for bit after a kill
(WPN and its Adam included), and two processes train what one process trains at the same global batch."""

from __future__ import annotations

import copy
import textwrap
from pathlib import Path

import pytest
import torch

import l2w_reference
import engine_toys
import l2w_runs
from cifar_fixtures import write_fake_cifar
from ponder import create_model
from ponder.config import OptimConfig, load_config
from ponder.engine import check_run_config
from ponder.engine.checkpoint import load_state, read_metrics
from ponder.engine.optim import build_optimizer
from ponder.methods import create_method
from ponder.methods.l2w_meta import build_wpn_optimizer, exit_losses, l2w_iteration, meta_gradient, weighted_exit_loss
from ponder.nn.thresholds import exit_proportions
from ponder.nn.wpn import WeightPredictionNetwork
from run_states import assert_metrics_close
from toy_models import ToyExits
from two_processes import run_two_processes

TESTS = Path(__file__).parent
RECIPES = TESTS.parent / "recipes"
SMALL_MSDNET = dict(n_blocks=3, n_channels=4, growth_rate=2, head_width=8)
SMALL_RANET = dict(n_channels=4, growth_rate=4, head_width=8)


def _batch(n: int, seed: int = 1, size: int = 16, classes: int = 5):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, size, size, generator=g, dtype=torch.float64), torch.randint(0, classes, (n,), generator=g)


def _optimizer(model):
    cfg = OptimConfig(lr=0.5, momentum=0.9, weight_decay=1e-2)
    return build_optimizer([{"params": [p for p in model.parameters() if p.requires_grad]}], model, cfg)


def _warm_up(model, optimizer, method, images, targets):
    """One real step (momentum buffers present, collaboration heads no longer at their init)."""
    method.prepare(model)
    losses = method.exit_losses(model(images), targets)
    optimizer.zero_grad(set_to_none=True)
    losses.mean(0).sum().backward()
    optimizer.step()


CASES = {  # model (of `classes` classes), method options, input size
    "msdnet": (lambda c: create_model("msdnet_cifar_budgeted", num_classes=c, **SMALL_MSDNET), {}, 32),
    "imta_ge": (lambda c: create_model("msdnet_cifar_budgeted", num_classes=c, **SMALL_MSDNET),
                {"gradient_equilibrium": True}, 32),
    "imta_isc": (lambda c: create_model("msdnet_cifar_budgeted", num_classes=c, collaboration=True, **SMALL_MSDNET),
                 {"collaboration": True, "kd_gamma": 0.4, "kd_temperature": 2.0, "freeze_bn": True}, 32),
    "ranet_c1": (lambda c: create_model("ranet_cifar_c1", num_classes=c, **SMALL_RANET), {}, 32),
}


@pytest.mark.parametrize("case,normalisation", [("msdnet", "col"), ("msdnet", "row"), ("msdnet", "mat"),
                                                ("imta_ge", "col"), ("imta_isc", "row"), ("ranet_c1", "col")])
def test_first_order_meta_gradient_equals_the_second_order_formula(case, normalisation):
    build, options, size = CASES[case]
    torch.manual_seed(0)
    model = build(5).double().train()
    method = create_method("l2w", model, normalisation=normalisation, wpn_width=8, **options)
    wpn = method.wpn.double()
    optimizer = _optimizer(model)
    _warm_up(model, optimizer, method, *_batch(8, seed=9, size=size))
    x, y = _batch(16, size=size)
    P = exit_proportions(0.75, model.num_exits)
    fast, loss = meta_gradient(model, optimizer, wpn, x[:8], y[:8], x[8:], y[8:], P, method.exit_losses)
    slow, ref_loss = l2w_reference.meta_gradient(model, optimizer, wpn, x[:8], y[:8], x[8:], y[8:], P,
                                                  method.exit_losses)
    assert float(loss) == pytest.approx(float(ref_loss), rel=1e-12)
    scale = max(float(g.abs().max()) for g in slow)
    assert scale > 1e-6  # the WPN really moves the meta loss
    for a, b in zip(fast, slow):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12 * scale)


def test_imta_stage2_virtual_step_moves_only_the_collaboration_heads():
    build, options, size = CASES["imta_isc"]
    torch.manual_seed(0)
    model = build(5).double().train()
    method = create_method("l2w", model, wpn_width=8, **options)
    wpn = method.wpn.double()
    optimizer = _optimizer(model)
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    x, y = _batch(8, size=size)
    l2w_iteration(model, optimizer, wpn, build_wpn_optimizer(wpn), x, y, iteration=0, orders="both",
                  losses_of=method.exit_losses)
    assert frozen and all(torch.equal(p, frozen[n]) for n, p in model.named_parameters() if n in frozen)


def test_shared_forward_iteration_equals_a_meta_step_then_a_real_step():
    """One order of the iteration (one forward pass shared by the virtual and the real step) equals
    the reference: an Adam step of the WPN with the second-order meta-gradient, then a real step
    with the new weights on a fresh forward pass."""
    build, _, size = CASES["msdnet"]
    torch.manual_seed(0)
    model = build(5).double().train()
    twin = copy.deepcopy(model)
    opt, twin_opt = _optimizer(model), _optimizer(twin)
    torch.manual_seed(3)
    wpn = WeightPredictionNetwork(model.num_exits, width=8, normalisation="row").double()
    twin_wpn = copy.deepcopy(wpn)
    wpn_opt, twin_wpn_opt = build_wpn_optimizer(wpn, lr=1e-2), build_wpn_optimizer(twin_wpn, lr=1e-2)
    for it in range(2):
        x, y = _batch(16, seed=20 + it, size=size)
        l2w_iteration(model, opt, wpn, wpn_opt, x, y, iteration=it, orders="alternate")
        t, m = (slice(0, 8), slice(8, None)) if it % 2 == 0 else (slice(8, None), slice(0, 8))
        grads, _ = l2w_reference.meta_gradient(twin, twin_opt, twin_wpn, x[t], y[t], x[m], y[m],
                                               exit_proportions(0.75, model.num_exits))
        for p, g in zip(twin_wpn.parameters(), grads):
            p.grad = g
        twin_wpn_opt.step()
        losses, conf = exit_losses(twin(x[t]).exit_logits, y[t])
        with torch.no_grad():
            weights = twin_wpn(losses, conf)
        twin_opt.zero_grad(set_to_none=True)
        weighted_exit_loss(losses, weights).backward()
        twin_opt.step()
    for (n, a), b in zip(list(model.state_dict().items()) + list(wpn.state_dict().items()),
                         list(twin.state_dict().values()) + list(twin_wpn.state_dict().values())):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12, msg=n)


# ---- the method through the trainer ------------------------------------------------------------------

@pytest.fixture(scope="module")
def cifar_dir(tmp_path_factory):
    # 48 training images (8 held out: 40 left): batches of 8 divide them, and 2 processes with 4 each
    return write_fake_cifar(tmp_path_factory.mktemp("data"), "cifar10", n_train=48, n_test=16, seed=0)


@pytest.fixture(scope="module")
def cifar_dir_odd(tmp_path_factory):
    # 41 training images (33 after the held-out split): the last batch of 8 holds one image
    return write_fake_cifar(tmp_path_factory.mktemp("odd"), "cifar10", n_train=41, n_test=16, seed=0)


@pytest.mark.parametrize("setting", ["col", "row"])
def test_resume_after_a_kill_is_bit_identical_wpn_and_its_adam_included(setting, cifar_dir_odd, tmp_path):
    full, _, a = engine_toys.assert_resume_is_exact(
        lambda out, resume=False: l2w_runs.run_l2w(setting, cifar_dir_odd, out, batch_size=8, resume=resume),
        l2w_runs.KILL, tmp_path)
    assert a["step"] == 15  # 5 batches per epoch, the last one a single image
    assert set(a["owned"]["modules"]) == set(a["owned"]["optimizers"]) == {"wpn"}
    adam = a["owned"]["optimizers"]["wpn"]
    meta_steps = {"col": 2 * 4 * 3, "row": 2 * 3}[setting]  # both orders x 4 full batches; alternate, every 2nd
    assert int(adam["state"][0]["step"]) == meta_steps
    assert adam["param_groups"][0]["lr"] < 0.01 * 0.05  # cosine-decayed with the run (the last batch's lr)
    initial = l2w_runs.KillableL2W(ToyExits(), wpn_width=16, **l2w_runs.SETTINGS[setting]).wpn
    assert set(a["owned"]["modules"]["wpn"]) == set(initial.state_dict())
    record = read_metrics(tmp_path / "full")[-1]
    assert record["train_meta_loss"] > 0 and {"train_weight_exit1", "train_weight_exit3"} <= set(record)
    assert full.method.wpn is full._owned["modules"]["wpn"]


SCRIPT = textwrap.dedent("""
    import os, sys
    import torch
    torch.set_num_threads(1)
    sys.path.insert(0, sys.argv[1])
    import l2w_runs
    from ponder.engine.distributed import init_distributed, shutdown_distributed

    info, _ = init_distributed("cpu")
    for setting in sorted(l2w_runs.SETTINGS):
        l2w_runs.run_l2w(setting, sys.argv[2], f"{sys.argv[3]}/{setting}", batch_size=4, dist=info)
    shutdown_distributed()
    sys.stdout.flush()
    os._exit(0)  # skip interpreter finalization (gloo threads can abort it; see test_engine_ddp.py)
""")


def test_two_processes_train_what_one_process_trains(cifar_dir, tmp_path):
    """The virtual step, the meta-gradient, the WPN's update and the backbone's steps of 2 processes
    x 4 images equal those of 1 process x 8 images (gloo; every normalisation, both orders, I = 1 and 2)."""
    torch.set_num_threads(1)
    run_two_processes(SCRIPT, tmp_path / "l2w_ddp.py", TESTS, cifar_dir, tmp_path / "two", timeout=600)
    for setting in sorted(l2w_runs.SETTINGS):
        l2w_runs.run_l2w(setting, cifar_dir, tmp_path / "one" / setting, batch_size=8)
        s1, s2 = load_state(tmp_path / "one" / setting / "state.pt"), load_state(tmp_path / "two" / setting / "state.pt")
        assert s2["world_size"] == 2 and s1["step"] == s2["step"] == 15
        for k, v in s1["model"].items():
            torch.testing.assert_close(s2["model"][k], v, rtol=1e-4, atol=1e-5, msg=f"{setting}: {k}")
        wpn1, wpn2 = s1["owned"]["modules"]["wpn"], s2["owned"]["modules"]["wpn"]
        initial = l2w_runs.KillableL2W(ToyExits(), wpn_width=16, **l2w_runs.SETTINGS[setting]).wpn
        for k, v in wpn1.items():
            torch.testing.assert_close(wpn2[k], v, rtol=1e-4, atol=1e-6, msg=f"{setting}: wpn.{k}")
        assert any(not torch.equal(v, initial.state_dict()[k]) for k, v in wpn1.items())  # the WPN was trained
        adam1, adam2 = s1["owned"]["optimizers"]["wpn"]["state"], s2["owned"]["optimizers"]["wpn"]["state"]
        for i in adam1:
            m = adam1[i]["exp_avg"]
            torch.testing.assert_close(adam2[i]["exp_avg"], m, rtol=1e-3, atol=1e-4 * float(m.abs().max()))
        assert_metrics_close(read_metrics(tmp_path / "one" / setting), read_metrics(tmp_path / "two" / setting),
                             setting)


# ---- models and recipes --------------------------------------------------------------------------------

@pytest.mark.parametrize("case", sorted(CASES))
def test_l2w_trains_every_family_and_imta_stage(case, cifar_dir, tmp_path):
    """One short run through the trainer per model (MSDNet, RANet C-1) and IMTA stage (GE, ISC + KD)."""
    from ponder.data import build_datasets, build_loaders
    from ponder.engine.trainer import Trainer

    build, options, size = CASES[case]
    torch.manual_seed(0)
    model = build(10)
    cfg = l2w_runs.l2w_config(cifar_dir, 8)
    cfg.train.epochs, cfg.train.max_steps_per_epoch = 1, 2
    bundle = build_datasets(cfg.data, 0)
    train, val, test = build_loaders(bundle, cfg.data, 0)
    method = create_method("l2w", model, wpn_width=8, wpn_lr=0.01, **options)
    wpn_before = copy.deepcopy(method.wpn.state_dict())
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    Trainer(cfg, model, method, train, test_loader=test, val_loader=val, device="cpu", verbose=False).fit()
    assert any(not torch.equal(v, method.wpn.state_dict()[k]) for k, v in wpn_before.items())
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n]) != p.requires_grad, n  # trainable parameters moved, frozen ones not


def test_l2w_refuses_other_optimizers_and_bad_options(cifar_dir):
    from ponder.data import build_datasets, build_loaders
    from ponder.engine.trainer import Trainer

    model = ToyExits()
    with pytest.raises(ValueError, match="orders must be one of alternate, both"):
        create_method("l2w", model, orders="swap")
    with pytest.raises(ValueError, match="meta_interval >= 1"):
        create_method("l2w", model, meta_interval=0)
    with pytest.raises(ValueError, match="multi-exit model"):
        create_method("l2w", create_model("resnet20_cifar"))
    cfg = l2w_runs.l2w_config(cifar_dir, 8)
    cfg.optim.name = "adamw"
    train, _, _ = build_loaders(build_datasets(cfg.data, 0), cfg.data, 0)
    with pytest.raises(ValueError, match="set optim.name: sgd"):
        Trainer(cfg, model, create_method("l2w", model), train, device="cpu", verbose=False)


@pytest.mark.parametrize("path", sorted(p for p in RECIPES.glob("*/*l2w*.yaml") if not p.stem.endswith("_plain")),
                         ids=lambda p: f"{p.parent.name}/{p.stem}")
def test_l2w_recipes_pass_the_run_check(path):
    config = check_run_config(load_config(path))
    assert config.method.name == "l2w" and config.method.kwargs["meta_interval"] in (1, 100)
