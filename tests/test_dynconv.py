"""DynConv and the budget-aware multi-target model: the papers' math on hand-worked values first (sparsity
criterion and its annealed bounds, dilation, Gumbel masks, target-aware weights, distillation), then the
models' promises (masked == sparse for every budget, per-budget BatchNorm statistics, the budget knob,
dense checkpoints) and the training schedule (round-robin order, exact resume)."""

from __future__ import annotations

import math
from fractions import Fraction

import pytest
import torch

from cifar_fixtures import write_fake_cifar
from ponder import count_macs
from ponder.cost import count_params
from ponder.methods.distill import kd_loss
from ponder.methods.dynconv import DynConvSparsity, annealing_progress, at_milestones, sparsity_bounds, sparsity_loss
from ponder.methods.multi_target import MultiTarget, awareness_weights
from ponder.models.dynconv import DynConvCifarResNet, DynConvImageNetResNet
from ponder.models.dynconv_multi import MultiBudgetCifarResNet
from ponder.models.resnet import Bottleneck, CifarResNet
from ponder.nn.executor import set_executor
from ponder.nn.mask_unit import gumbel_mask, threshold_mask
from ponder.nn.thresholds import probability_logit
from ponder.nn.sparse_units import first_conv_mask, soft_first_conv_mask


def multi(depth: int = 8, **kw) -> MultiBudgetCifarResNet:
    torch.manual_seed(0)
    return MultiBudgetCifarResNet(depth, **kw)


# ---------------------------------------------------------------- the sparsity criterion


def test_annealing_progress_and_bounds_hand_worked():
    assert annealing_progress(0, 100) == 1.0  # every block pushed to the target at the start
    assert annealing_progress(33, 100) == pytest.approx(0.0, abs=1e-30)  # bounds [0, 1] after a third
    assert annealing_progress(80, 100) == pytest.approx(0.0, abs=1e-30)
    assert annealing_progress(3, 12, fraction=0.5) == pytest.approx(0.5)  # cos(pi/4)^2
    assert sparsity_bounds(0.5, 1.0) == (0.5, 0.5)
    assert sparsity_bounds(0.3, 0.5) == pytest.approx((0.15, 0.65))
    assert sparsity_bounds(0.3, 0.0) == (0.0, 1.0)


def test_sparsity_loss_hand_worked():
    spent, dense = torch.tensor([30.0, 10.0], requires_grad=True), torch.tensor([100.0, 100.0])
    # theta_i = [0.3, 0.1], theta = 0.2: L_net = (0.2 - 0.5)^2 = 0.09
    # progress 1: bounds [0.5, 0.5]: L_block = mean(0.2^2, 0.4^2) = 0.1
    assert sparsity_loss(spent, dense, 0.5, 1.0).item() == pytest.approx(0.19)
    # progress 0.5: bounds [0.25, 0.75]: only block 2 is out, (0.25 - 0.1)^2 / 2 = 0.01125
    assert sparsity_loss(spent, dense, 0.5, 0.5).item() == pytest.approx(0.10125)
    # progress 0: only the network term
    loss = sparsity_loss(spent, dense, 0.5, 0.0)
    assert loss.item() == pytest.approx(0.09)
    loss.backward()  # d/dc_i (theta - 0.5)^2 = 2 (theta - 0.5) / sum(t) = 2 * -0.3 / 200
    torch.testing.assert_close(spent.grad, torch.full((2,), -0.003))


def test_the_models_sparsity_terms_are_the_ledgers_conditional_macs():
    model = DynConvCifarResNet(8).train()
    model.force_keep_rate(0.5, seed=1)
    x = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    out = model(x)
    spent, dense = out.extras["sparsity"]
    led = model.ledger((3, 32, 32))
    blocks = range(len(model.blocks))
    fixed = led["stem"] + led["head"] + sum(led[f"mask.{i}"] + led[f"blocks.{i}.skip"] for i in blocks)
    assert spent.sum().item() == pytest.approx((out.macs - fixed).sum().item())
    full = sum(led[f"blocks.{i}"] - led[f"blocks.{i}.skip"] for i in blocks)
    assert dense.sum().item() == pytest.approx(3 * full)
    assert model.conditional_macs() == (led.total - full, full)


# ---------------------------------------------------------------- dilation


def test_dilation_basic_block_and_strided_bottleneck_hand_worked():
    basic = CifarResNet(8, shortcut="B").layer1[0]
    mask = torch.zeros(1, 4, 4, dtype=torch.bool)
    mask[0, 0, 0] = True
    want = torch.zeros(1, 4, 4, dtype=torch.bool)
    want[0, :2, :2] = True  # conv2 (3x3) reads conv1's output in the 3x3 neighbourhood
    assert torch.equal(first_conv_mask(basic, mask, (4, 4)), want)
    assert torch.equal(soft_first_conv_mask(basic, mask.float(), (4, 4)), want.float())

    bottleneck = Bottleneck(16, 4, stride=2)
    mask = torch.zeros(1, 4, 4, dtype=torch.bool)
    mask[0, 1, 2] = True  # ExpandMask: lands at input (2, 4), the top-left of its 2x2 cell, then 3x3 dilation
    want = torch.zeros(1, 8, 8, dtype=torch.bool)
    want[0, 1:4, 3:6] = True
    assert torch.equal(first_conv_mask(bottleneck, mask, (8, 8)), want)
    soft = torch.zeros(1, 4, 4, requires_grad=True)
    with torch.no_grad():
        soft[0, 1, 2] = 1.0
    dilated = soft_first_conv_mask(bottleneck, soft, (8, 8))
    assert torch.equal(dilated, want.float())
    dilated.sum().backward()  # the dilated count's gradient reaches the active output position (max-pool:
    assert soft.grad[0, 1, 2].item() == 9.0  # one per input position it covers)


# ---------------------------------------------------------------- Gumbel masks


def test_gumbel_mask_without_noise_is_a_straight_through_threshold():
    logits = torch.tensor([-2.0, -0.1, 0.0, 0.3, 4.0], requires_grad=True)
    m = gumbel_mask(logits, temperature=2.0, noise=False)
    assert m.tolist() == [0.0, 0.0, 1.0, 1.0, 1.0]
    m.sum().backward()  # the soft sample's gradient: sigmoid'(l / T) / T
    s = torch.sigmoid(logits.detach() / 2.0)
    torch.testing.assert_close(logits.grad, s * (1 - s) / 2.0)


def test_gumbel_noise_keeps_a_position_with_probability_sigmoid_logit():
    logits = torch.tensor([-1.0, 0.0, 1.5]).repeat(20000, 1)
    m = gumbel_mask(logits, 1.0, noise=True, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(m.mean(0), torch.sigmoid(logits[0]), atol=0.015, rtol=0)


def test_threshold_mask_is_the_knob():
    logits = torch.tensor([[-3.0, -0.5, 0.0, 0.5, 3.0]])
    assert threshold_mask(logits).tolist() == [[False, False, True, True, True]]
    assert threshold_mask(logits, 0.0).all() and not threshold_mask(logits, 1.0).any()
    assert threshold_mask(logits, 0.6).tolist() == [[False] * 3 + [True] * 2]  # logit(0.6) = 0.405
    assert probability_logit(0.5) == 0.0
    with pytest.raises(ValueError, match="probability"):
        probability_logit(1.5)


def test_eval_masks_have_no_noise_and_training_masks_do():
    model = DynConvCifarResNet(8)
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    model.eval()
    with torch.no_grad():
        a, b = model(x), model(x)
    assert all(torch.equal(p, q) for p, q in zip(a.masks, b.masks))
    model.train()
    torch.manual_seed(0)
    c = model(x)
    torch.manual_seed(1)
    d = model(x)
    assert not all(torch.equal(p, q) for p, q in zip(c.masks, d.masks))


def test_temperature_schedule_and_noise_off_for_the_last_fifth():
    model = DynConvCifarResNet(8)
    method = DynConvSparsity(model, temperature=[5.0, 2.5, 1.0], temperature_milestones=[3, 6])
    seen = []
    for epoch in range(10):
        method.on_epoch_start(epoch, 10)
        seen.append((model.gumbel_temperature, model.gumbel_noise))
    assert seen == [(5.0, True)] * 3 + [(2.5, True)] * 3 + [(1.0, True)] * 2 + [(1.0, False)] * 2
    assert at_milestones([5.0, 2.5, 1.0], [0.3, 0.6], 3, 10) == 2.5  # fractions of the epochs
    with pytest.raises(ValueError, match="milestone"):
        DynConvSparsity(model, temperature=[5.0, 1.0])


# ---------------------------------------------------------------- executors and cost, every budget


@pytest.mark.parametrize("share_affine", [False, True])
def test_masked_equals_sparse_and_the_ledger_equals_the_counter_for_every_budget(share_affine):
    model = multi(share_affine=share_affine).eval()
    x = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    for b in range(len(model.budgets)):
        model.set_knob(b)
        with torch.no_grad():
            set_executor(model, "masked")
            masked = model(x)
            set_executor(model, "sparse")
            sparse = model(x)
            one = model(x[:1]).macs.item()
        assert all(torch.equal(m, s) for m, s in zip(masked.masks, sparse.masks))
        assert torch.equal(masked.macs, sparse.macs)
        torch.testing.assert_close(masked.logits, sparse.logits, rtol=1e-4, atol=1e-4)
        assert one == count_macs(model, x[:1])


def test_budgets_decide_differently():
    model = multi().eval()
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        outs = [model(x) for _ in (model.set_knob(b) for b in range(3))]
    assert not torch.equal(outs[0].masks[0], outs[2].masks[0])


def test_bottleneck_dynconv_masked_equals_sparse_with_learned_masks():
    torch.manual_seed(0)
    model = DynConvImageNetResNet(Bottleneck, [1, 1, 1, 1], num_classes=10).eval()
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        set_executor(model, "masked")
        masked = model(x)
        set_executor(model, "sparse")
        sparse = model(x)
    assert 0 < sum(m.sum().item() for m in masked.masks) < sum(m.numel() for m in masked.masks)
    assert torch.equal(masked.macs, sparse.macs)
    torch.testing.assert_close(masked.logits, sparse.logits, rtol=1e-4, atol=1e-4)


# ---------------------------------------------------------------- per-budget BatchNorm


def test_per_budget_batchnorm_statistics_stay_separate():
    model = multi().train()
    before = [[{k: v.clone() for k, v in block["bn1"].state_dict().items()} for block in s] for s in model.norms.sets]
    model.set_knob(0)
    model(torch.randn(4, 3, 32, 32))
    for b, s in enumerate(model.norms.sets):
        for i, block in enumerate(s):
            changed = not torch.equal(block["bn1"].running_mean, before[b][i]["running_mean"])
            assert changed == (b == 0), (b, i)
    assert model.layer1[0].bn1 is model.norms.sets[0][0]["bn1"]
    model.set_knob(2)
    assert model.layer1[0].bn1 is model.norms.sets[2][0]["bn1"]


def test_affine_parameters_shared_or_not():
    shared, own = multi(share_affine=True), multi(share_affine=False)
    assert shared.norms.sets[2][1]["bn2"].weight is shared.norms.sets[0][1]["bn2"].weight
    assert own.norms.sets[2][1]["bn2"].weight is not own.norms.sets[0][1]["bn2"].weight
    own.train().set_knob(1)
    own(torch.randn(2, 3, 32, 32)).logits.sum().backward()
    assert own.norms.sets[1][0]["bn1"].weight.grad is not None
    assert own.norms.sets[0][0]["bn1"].weight.grad is None and own.mask_units[0][0].local.weight.grad is None


def test_a_dense_checkpoint_loads_into_every_budget():
    dense = CifarResNet(8, shortcut="B")
    with torch.no_grad():
        for m in dense.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.normal_()
    model = multi()
    result = model.load_state_dict(dense.state_dict(), strict=False)
    assert result.unexpected_keys == [] and all(k.startswith("mask_units.") for k in result.missing_keys)
    for s in model.norms.sets:
        assert torch.equal(s[2]["bn2"].running_mean, dense.layer3[0].bn2.running_mean)
    model.load_state_dict(model.state_dict(), strict=True)  # its own keys round-trip


def test_parameter_overhead_is_a_few_percent():
    base = count_params(CifarResNet(20, shortcut="B"))
    for share, low, high in ((False, 0.03, 0.06), (True, 0.02, 0.05)):
        overhead = count_params(MultiBudgetCifarResNet(20, share_affine=share)) / base - 1
        assert low < overhead < high
    rows = MultiBudgetCifarResNet(20).profile_budgets((3, 32, 32))
    assert [r["budget"] for r in rows] == [0.3, 0.5, 0.7] and rows[0]["macs"] < rows[1]["macs"] < rows[2]["macs"]
    assert base < rows[0]["params"] < count_params(MultiBudgetCifarResNet(20))


# ---------------------------------------------------------------- the budget knob


def test_the_budget_knob_by_index_fraction_and_macs():
    model = multi().eval()
    model.set_knob(0.7)
    assert model.get_knob() == 0.7 and model.budget_index == 2
    model.set_knob(0)
    assert model.get_knob() == 0.3 and model.budget_index == 0
    for bad in (3, 0.4, "0.5", True):
        with pytest.raises(ValueError, match="budget"):
            model.set_knob(bad)
    images = torch.randn(6, 3, 32, 32, generator=torch.Generator().manual_seed(5))
    model.calibrate(images)
    macs = [model.held_out_macs(b) for b in (0.3, 0.5, 0.7)]
    for b, budget in enumerate((0.3, 0.5, 0.7)):
        assert model.set_budget(macs[b] * 1.001) == macs[b] and model.get_knob() == budget


# ---------------------------------------------------------------- target-aware weights and distillation


def test_awareness_weights_worked_example():
    acc, tgt = [0.80, 0.85, 0.90], [0.85, 0.87, 0.89]
    # l2: r = [0.05^2, 0.02^2, 0.01^2] = [25, 4, 1] * 1e-4, sum 30e-4: w = 3 r / sum
    assert awareness_weights(acc, tgt, "l2") == pytest.approx([2.5, 0.4, 0.1])
    # l1: r = [1/17, 2/87, -1/89] (the last budget beats its target: a negative weight, as published)
    r = [Fraction(1, 17), Fraction(2, 87), Fraction(-1, 89)]
    assert awareness_weights(acc, tgt, "l1") == pytest.approx([float(3 * x / sum(r)) for x in r])
    assert awareness_weights(acc, tgt, "none") == [1.0, 1.0, 1.0]
    assert awareness_weights(tgt, tgt, "l2") == [1.0, 1.0, 1.0]  # every target met exactly
    with pytest.raises(ValueError, match="target"):
        awareness_weights(acc, None, "l2")


def test_kd_loss_with_temperature_hand_worked():
    student = torch.zeros(1, 2, requires_grad=True)
    teacher = torch.tensor([[math.log(3.0), 0.0]])  # T = 2: p = softmax([ln 3 / 2, 0]) = [sqrt3, 1] / (sqrt3 + 1)
    p = torch.tensor([math.sqrt(3), 1.0]) / (math.sqrt(3) + 1)
    p1 = math.sqrt(3) / (math.sqrt(3) + 1)
    want = 4 * (p1 * math.log(2 * p1) + (1 - p1) * math.log(2 * (1 - p1)))  # T^2 KL(p || uniform) = 0.14536
    loss = kd_loss(student, teacher, 2.0)
    assert loss.item() == pytest.approx(want, rel=1e-5)
    loss.backward()  # d/ds T^2 KL = T (softmax(s / T) - p)
    torch.testing.assert_close(student.grad, 2 * (0.5 - p)[None])
    assert kd_loss(teacher, teacher, 10.0).item() == pytest.approx(0.0, abs=1e-5)  # (T^2 = 100 times rounding)


def test_method_options_are_checked():
    with pytest.raises(ValueError, match="target_accuracy"):
        MultiTarget(multi(), awareness="l2")
    with pytest.raises(ValueError, match="awareness"):
        MultiTarget(multi(), awareness="l3")
    with pytest.raises(ValueError, match="dynconv_multi"):
        MultiTarget(DynConvCifarResNet(8), awareness="none")
    with pytest.raises(ValueError, match="teacher"):
        MultiTarget(multi(), awareness="none", teacher=["a", "b"])
    with pytest.raises(ValueError, match="DynConv"):
        DynConvSparsity(CifarResNet(8))


# ---------------------------------------------------------------- round-robin training and exact resume


class _Killable(MultiTarget):
    """Records the budget of every training step; can stop before an epoch (a simulated kill)."""

    kill_at: int | None = None
    order: list[int] = []

    def on_epoch_start(self, epoch, num_epochs):
        if self.kill_at == epoch:
            raise KeyboardInterrupt
        super().on_epoch_start(epoch, num_epochs)

    def train_step(self, ctx, images, targets):
        out = super().train_step(ctx, images, targets)
        self.order.append(self.model.budget_index)
        return out


def _train(data_dir, out, resume=False, kill_at=None):
    from ponder.config import config_from_dict
    from ponder.data import build_datasets, build_loaders
    from ponder.engine.trainer import Trainer, seed_everything

    cfg = config_from_dict({
        "data": {"dataset": "cifar10", "data_dir": str(data_dir), "batch_size": 8, "eval_batch_size": 8,
                 "val_size": 8, "augment": False},
        "optim": {"lr": 0.05, "momentum": 0.9, "weight_decay": 1e-4},
        "schedule": {"name": "cosine"}, "train": {"epochs": 3, "seed": 0, "device": "cpu"}})
    seed_everything(0)
    bundle = build_datasets(cfg.data, 0)
    train, val, test = build_loaders(bundle, cfg.data, 0)
    out.mkdir(parents=True, exist_ok=True)
    model = multi()
    method = _Killable(model, awareness="l2", target_accuracy=[0.2, 0.3, 0.4])
    method.kill_at, method.order = kill_at, []
    trainer = Trainer(cfg, model, method, train, test_loader=test, val_loader=val, run_dir=out, device="cpu",
                      verbose=False)
    if resume:
        trainer.resume(out)
    try:
        trainer.fit()
    except KeyboardInterrupt:
        pass
    return trainer, method.order


def test_round_robin_order_and_exact_resume(tmp_path):
    from ponder.engine.checkpoint import load_state, read_metrics

    torch.set_num_threads(1)
    data = write_fake_cifar(tmp_path / "data", "cifar10", n_train=40, n_test=8, seed=0)
    full, order = _train(data, tmp_path / "full")
    assert order == [k % 3 for k in range(12)]  # 4 steps per epoch, iteration k trains budget k mod 3
    _, first = _train(data, tmp_path / "cut", kill_at=1)
    torch.manual_seed(99)
    _, rest = _train(data, tmp_path / "cut", resume=True)
    assert first + rest == order
    a, b = load_state(tmp_path / "full" / "state.pt"), load_state(tmp_path / "cut" / "state.pt")
    assert a["method"] == b["method"] and a["method"]["loss_weights"] != [1.0, 1.0, 1.0]
    assert a["model"].keys() == b["model"].keys() and all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    metrics = read_metrics(tmp_path / "full")
    assert metrics[0]["loss_weights"] == [1.0, 1.0, 1.0] and len(metrics[1]["budget_acc"]) == 3
    assert [m["loss_weights"] for m in metrics] == [m["loss_weights"] for m in read_metrics(tmp_path / "cut")]


@pytest.mark.parametrize("name", ["dynconv_resnet20_cifar", "dynconv_multi_resnet20_cifar", "sact_resnet32_cifar"])
def test_measuring_the_ledger_in_training_mode_moves_no_batchnorm_statistics(name):
    from ponder import create_model

    model = create_model(name).train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    model.ledger((3, 32, 32))
    assert model.training and all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_dynconv_ponder_maps_count_the_blocks_run_per_pixel():
    from ponder.pondermap import ponder_maps

    model = DynConvCifarResNet(8).eval()
    images = torch.randn(2, 3, 32, 48, generator=torch.Generator().manual_seed(6))
    maps = ponder_maps(model, images)
    assert maps["kind"] == "blocks run" and len(maps["stages"]) == 3 and len(maps["units"]) == 3
    assert maps["total"].shape == (2, 32, 48)
    assert torch.equal(maps["total"], torch.stack(maps["stages"]).sum(0))
    assert 0 <= maps["total"].min() and maps["total"].max() <= 3


def test_budget_protocol_gives_one_point_per_budget_and_spatial_takes_a_knob(tmp_path):
    from ponder.config import RunConfig
    from ponder.evaluate.protocols import EvalContext, get_protocol
    from ponder.results import result_from_report

    model = multi().eval()
    g = torch.Generator().manual_seed(7)
    loader = [(torch.randn(4, 3, 32, 32, generator=g), torch.randint(0, 10, (4,), generator=g)) for _ in range(2)]
    config = RunConfig()
    config.model.name = "dynconv_multi_resnet20_cifar"
    ctx = EvalContext(model, config, tmp_path, tmp_path, loader, loader, "cpu")
    report = get_protocol("budget")(ctx)
    assert [p["knob"] for p in report["points"]] == [0.3, 0.5, 0.7]
    for p, b in zip(report["points"], (0.3, 0.5, 0.7)):
        model.set_knob(b)
        assert p["held_out_macs"] == model.held_out_macs()
    result = result_from_report(ctx, "budget", report)
    assert [p.label for p in result.points] == ["budget 0.3", "budget 0.5", "budget 0.7"]
    ctx.options = {"knob": 0.7}
    model.set_knob(0.3)
    spatial = get_protocol("spatial")(ctx)
    assert spatial["knob"] == {"name": "budget", "value": 0.7} and model.get_knob() == 0.3
    model.set_knob(0.7)
    set_executor(model, "sparse")
    with torch.no_grad():
        want = torch.cat([model(x).macs for x, _ in loader]).mean().item()
    assert spatial["macs_mean"] == pytest.approx(want)


@pytest.mark.parametrize("name", ["dynconv_resnet20_cifar", "sact_resnet32_cifar"])
def test_dense_macs_leaves_the_models_mode_alone(name):
    from ponder import create_model

    model = create_model(name).eval()
    assert model.dense_macs() > 0 and not any(m.training for m in model.modules())
    model.train()
    model.dense_macs()
    assert all(m.training for m in model.modules())


def test_teachers_load_from_a_run_directory_or_model_and_weights(tmp_path):
    from ponder.config import RunConfig
    from ponder.methods.distill import load_teacher
    from ponder.weights import RunDirError
    from safetensors.torch import save_file

    dense = CifarResNet(8, shortcut="B").eval()
    run = tmp_path / "dense"
    run.mkdir()
    config = RunConfig()
    config.model.name, config.model.kwargs = "resnet20_cifar", {"shortcut": "B"}
    teacher_model = CifarResNet(20, shortcut="B")
    save_file({k: v.contiguous() for k, v in teacher_model.state_dict().items()}, str(run / "weights.safetensors"))
    config.save(run / "config.yaml")
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(load_teacher(run)(x).logits, teacher_model.eval()(x).logits)
    torch.save(dense.state_dict(), tmp_path / "w.pth")
    with pytest.raises(RunDirError, match="do not fit"):
        load_teacher(f"resnet20_cifar={tmp_path / 'w.pth'}")
    with pytest.raises(RunDirError, match="not a run directory"):
        load_teacher(tmp_path / "nothing")


def test_sample_keys_follow_the_content_of_a_reused_batch():
    from ponder.nn.forced import sample_keys

    x = torch.randn(3, 3, 8, 8, generator=torch.Generator().manual_seed(8))
    a = sample_keys(x)
    assert torch.equal(sample_keys(x), a)
    x[1].add_(1.0)  # changed in place: new keys for that sample
    b = sample_keys(x)
    assert b[0] == a[0] and b[1] != a[1] and torch.equal(b, sample_keys(x.clone()))


def test_forced_maps_of_a_benchmarks_batches_are_drawn_once():
    # ponder bench times 64 images at batch 1 again and again; DynConv asks for one forced map per block
    # and image (64 x 15 for ResNet-32): every map of the second round must come from the cache
    from ponder.nn.forced import sample_keys

    model = DynConvCifarResNet(32).eval()
    model.force_keep_rate(0.5, seed=0)
    xs = [torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(i)) for i in range(64)]
    keys = [sample_keys(x) for x in xs]
    first = [model.forced_positions(k, (8, 8), unit) for k in keys for unit in range(len(model.blocks))]
    again = [model.forced_positions(k, (8, 8), unit) for k in keys for unit in range(len(model.blocks))]
    assert all(a is b for a, b in zip(first, again))


def test_the_evidence_table_of_docs_dynconv_md_is_generated_from_its_results(capsys):
    from pathlib import Path

    from ponder.cli import main

    doc = Path(__file__).resolve().parent.parent / "docs" / "dynconv.md"
    assert main(["report", "--update-doc", str(doc), "--check"]) == 0, capsys.readouterr().err
