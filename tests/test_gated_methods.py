"""Training objectives of gated ResNets: ConvNet-AIG's target-rate loss, SP-Net (EMA auxiliary module,
feature evolution, multi-stage heads), CoDiNet (FLOPs L1, consistency / diversity) and RDI-Net (stages,
cost, InfoNCE), each checked on hand-worked values; SP-Net on three backbones trains and resumes exactly."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn

from cifar_fixtures import write_fake_cifar
from run_states import assert_states_equal
from ponder.config import config_from_dict
from ponder.engine.checkpoint import load_state
from ponder.engine.trainer import Trainer, seed_everything
from ponder.methods.base import create_method
from ponder.methods.codinet import consistency_diversity, flops_l1_loss
from ponder.methods.gated import shifted_views, target_rate_loss
from ponder.methods.rdinet import PathQueue, info_nce, path_vectors, relative_cost
from ponder.methods.spnet import SPNet, ema_update, feature_evolution_loss
from ponder.models.aig import AIGResNet
from ponder.models.codinet import CoDiNetResNet
from ponder.models.rdinet import RDINetResNet
from ponder.models.resnet import CifarResNet


def batch(n: int = 8, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, 32, 32, generator=g), torch.randint(0, 10, (n,), generator=g)


# ConvNet-AIG -----------------------------------------------------------------------------------
def test_target_rate_loss_by_hand_leaves_out_gates_targeted_at_one():
    usage = torch.tensor([[1.0, 0.0, 1.0], [1.0, 1.0, 0.0]])  # batch means 1, 0.5, 0.5
    # (0.6 - 1)^2 + (0.4 - 0.5)^2 over all 3 gates (the third, targeted at 1, is left out), times 2
    loss = target_rate_loss(usage, [0.6, 0.4, 1.0], weight=2.0)
    assert loss.item() == pytest.approx(2 * (0.16 + 0.01) / 3)


def test_rate_loss_moves_the_mean_open_rate_to_its_target():
    torch.manual_seed(0)
    model = AIGResNet(CifarResNet(8, shortcut="B")).train()  # 3 gates, about 87 % open at first
    opt = torch.optim.Adam(model.routers.parameters(), lr=0.1)
    x, _ = batch(16)
    x = x[:, :, :8, :8]
    for _ in range(60):
        out = model(x)
        loss = target_rate_loss(out.extras["usage"], [0.3] * 3, weight=1.0)
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        p_open = model(x).extras["router_probs"][..., 1].mean().item()
    assert p_open == pytest.approx(0.3, abs=0.06)


def test_aig_method_gives_the_gates_last_layers_their_learning_rate_scale():
    model = AIGResNet(CifarResNet(8, shortcut="B"))
    groups = create_method("aig", model, gate_lr_scale=10.0).param_groups(model)
    finals = {id(p) for layer in model.routers.final_layers() for p in layer.parameters()}
    assert {id(p) for p in groups[1]["params"]} == finals and groups[1]["lr_scale"] == 10.0
    with pytest.raises(ValueError, match="one open rate per block"):
        create_method("aig", model, targets=[0.5, 0.5])


def test_imagenet_aig_models_carry_the_papers_schedules():
    from ponder.models.aig import aig_resnet50, aig_resnet101

    assert aig_resnet50(num_classes=10).target_rates(0.5) == [1, 1, 0.8, 1, 0.5, 0.5, 0.5, 1, 0.5, 0.5, 0.5, 0.5,
                                                               0.5, 1, 0.7, 1]
    assert aig_resnet101(num_classes=10).target_rates(0.3) == [1.0] * 8 + [0.3] * 25


# SP-Net --------------------------------------------------------------------------------------------
def test_ema_update_is_momentum_times_teacher_plus_the_rest_of_the_student():
    student, teacher = nn.BatchNorm1d(2), nn.BatchNorm1d(2)
    student.weight.data = torch.tensor([1.0, 3.0])
    teacher.weight.data = torch.tensor([5.0, -1.0])
    teacher.running_mean.fill_(7.0)
    ema_update(teacher, student, 0.75)
    assert teacher.weight.tolist() == [0.75 * 5 + 0.25 * 1, 0.75 * -1 + 0.25 * 3]
    assert teacher.running_mean.tolist() == [7.0, 7.0]  # buffers come from the teacher's own forward passes


def test_feature_evolution_loss_by_hand():
    def maps(*vectors):  # pooled vectors -> [1, C, 2, 2] maps with that mean
        return [torch.tensor(v, dtype=torch.float32).view(1, -1, 1, 1).expand(1, -1, 2, 2) for v in vectors]

    # stage 1: d1 = (1, 0), d2 = (0, 1): orthogonal, 1 - cos = 1; stage 2: collinear, 0; stage 3 (2 blocks) left out
    feats = maps([0, 0], [1, 0], [1, 1]) + maps([0, 0], [1, 1], [3, 3]) + maps([5, 5], [0, 1])
    assert feature_evolution_loss(feats, [3, 3, 2]).item() == pytest.approx(1.0)
    # a stage of 4: first 0, middle index 2, last 3; d1 = (2, 0), d2 = (-1, 0): opposite, 1 - cos = 2
    assert feature_evolution_loss(maps([0, 0], [9, 9], [2, 0], [1, 0]), [4]).item() == pytest.approx(2.0)


def test_spnet_losses_at_the_defaults_are_the_official_codes_weights():
    model = AIGResNet(CifarResNet(20, shortcut="B"))
    method = create_method("spnet", model)
    assert (method.alpha, method.beta, method.gamma) == (1.0, 0.5, 1e-4)
    assert method.beta * method.kd_base == pytest.approx(0.1) and method.alpha * method.path_base == pytest.approx(0.1)
    assert len(method.heads.heads) == 2  # after stages 2 and 1 (the final head is the model's)
    x, y = batch(4)
    model.train()
    out = model(x, features=True)
    heads = method.heads(out.extras["stage_features"])
    assert [h.shape for h in heads] == [(4, 10), (4, 10)]
    terms = method.losses(out, out, heads, y, model.backbone.stage_sizes)
    assert terms["path"].item() == 0.0  # the student agrees with itself
    ce = nn.functional.cross_entropy
    expected = ce(out.logits, y) + 0.2 * ce(heads[0], y) + 0.1 * ce(heads[1], y)
    assert terms["ce"].item() == pytest.approx(expected.item(), rel=1e-6)


# CoDiNet --------------------------------------------------------------------------------------------
def test_flops_and_consistency_diversity_by_hand():
    assert flops_l1_loss(torch.tensor([3.0, 5.0]), 6.0).item() == 2.0
    # image 0's copies: paths (0, 0) and (2, 0) -> centre (1, 0), each 1 away; image 1: both (1, 3)
    paths = torch.tensor([[0.0, 0.0], [2.0, 0.0], [1.0, 3.0], [1.0, 3.0]])
    intra, inter = consistency_diversity(paths, 2, margin_intra=0.5, margin_inter=4.0)
    assert intra.item() == pytest.approx((0.5 ** 2 + 0.5 ** 2 + 0 + 0) / 4)
    assert inter.item() == pytest.approx((4.0 - 3.0) ** 2)  # centres 3 apart


def test_codinet_copies_keep_the_loaders_view_first():
    model = CoDiNetResNet(CifarResNet(8))
    method = create_method("codinet", model, repeats=3)
    x, y = batch(2)
    torch.manual_seed(0)
    cx, cy = method.copies(x, y)
    assert cx.shape == (6, 3, 32, 32) and cy.tolist() == [y[0]] * 3 + [y[1]] * 3
    assert torch.equal(cx[0], x[0]) and torch.equal(cx[3], x[1]) and not torch.equal(cx[1], x[0])


def test_shifted_views_translate_and_flip_each_image():
    x = torch.arange(1.0, 17.0).view(1, 1, 4, 4).repeat(64, 1, 1, 1)
    torch.manual_seed(0)
    v = shifted_views(x, padding=1)
    assert v.shape == x.shape
    centre = v[:, 0, 1:3, 1:3]  # always inside the image for shifts of at most one pixel
    assert (centre > 0).all() and len({tuple(c.flatten().tolist()) for c in centre}) > 4


# RDI-Net --------------------------------------------------------------------------------------------
def test_path_vectors_info_nce_and_relative_cost_by_hand():
    logits = torch.tensor([[[3.0, 4.0, 0.0], [0.0, 0.0, 2.0]]])
    p = path_vectors(logits)
    torch.testing.assert_close(p, torch.tensor([[0.6, 0.8, 0.0, 0.0, 0.0, 1.0]]) / math.sqrt(2))
    q = torch.tensor([[1.0, 0.0]])
    loss = info_nce(q, q, torch.tensor([[0.0, 1.0], [-1.0, 0.0]]), temperature=0.5)  # logits [2, 0, -2]
    assert loss.item() == pytest.approx(-math.log(math.exp(2) / (math.exp(2) + 1 + math.exp(-2))))
    masks = torch.tensor([[[1.0, 0, 0], [0, 1.0, 0]], [[0, 0, 1.0], [0, 0, 1.0]]])
    macs = torch.tensor([[0.0, 5.0, 10.0], [2.0, 15.0, 30.0]])
    assert relative_cost(masks, macs).tolist() == pytest.approx([15 / 40, 1.0])


def test_path_queue_is_a_ring_buffer():
    q = PathQueue(3, 2)
    q.push(torch.tensor([[1.0, 0.0], [0.0, 1.0]]))
    q.push(torch.tensor([[2.0, 0.0], [0.0, 2.0]]))
    assert q.paths.tolist() == [[0.0, 2.0], [0.0, 1.0], [2.0, 0.0]] and q.ptr.item() == 1


def test_rdinet_stages_train_what_they_should():
    torch.manual_seed(0)
    model = RDINetResNet(CifarResNet(8)).train()
    method = create_method("rdinet", model, stage="all", stage_epochs=[1, 1], queue_size=16)
    method.queue = PathQueue(16, model.num_blocks * 3)
    x, y = batch(8)

    def trained(epoch):
        method.on_epoch_start(epoch, 3)
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        out = method.training_step(model, x, y)
        model.zero_grad(set_to_none=True)
        out.loss.backward()
        with torch.no_grad():
            for p in model.parameters():
                if p.grad is not None:
                    p -= 0.1 * p.grad
        return {n.split(".")[0] for n, p in model.named_parameters() if not torch.equal(p, before[n])}, out

    changed, out = trained(0)
    assert changed == {"backbone"} and model.train_decisions == "uniform"
    changed, out = trained(1)
    assert changed == {"routers"} and {"cost", "nce"} <= set(out.metrics) and method.queue.ptr.item() == 8
    changed, out = trained(2)
    assert changed == {"backbone"} and model.train_decisions == "argmax" and not model.routers.training


# SP-Net on three backbones: one run, killed and resumed, ends bit for bit where the whole run ends ----
class _Kill(Exception):
    pass


def _train(model_fn, method_kwargs, data_dir, out, kill_at=None, resume=False):
    cfg = config_from_dict({
        "data": {"dataset": "cifar10", "data_dir": str(data_dir), "batch_size": 8, "eval_batch_size": 8},
        "optim": {"lr": 0.05, "momentum": 0.9, "weight_decay": 1e-4},
        "train": {"epochs": 2, "seed": 0, "device": "cpu"},
    })
    from ponder.data import build_datasets, build_loaders

    seed_everything(0)
    bundle = build_datasets(cfg.data, 0)
    train, _, test = build_loaders(bundle, cfg.data, 0)
    torch.manual_seed(0)
    model = model_fn()
    method = SPNet(model, **method_kwargs)
    if kill_at is not None:
        start = method.on_epoch_start

        def on_epoch_start(epoch, num_epochs):
            if epoch == kill_at:
                raise _Kill()
            start(epoch, num_epochs)

        method.on_epoch_start = on_epoch_start
    out.mkdir(parents=True, exist_ok=True)
    trainer = Trainer(cfg, model, method, train, test_loader=test, run_dir=out, device="cpu", verbose=False)
    if resume:
        torch.manual_seed(999)
        trainer.resume(out)
    trainer.fit()
    return trainer


@pytest.mark.parametrize("backbone", ["aig", "codinet", "rdinet"])
def test_spnet_on_each_backbone_trains_and_resumes_exactly(backbone, tmp_path):
    torch.set_num_threads(1)
    data = write_fake_cifar(tmp_path / "data", "cifar10", n_train=16, n_test=8, seed=0)
    cls = {"aig": AIGResNet, "codinet": CoDiNetResNet, "rdinet": RDINetResNet}[backbone]
    model_fn = lambda: cls(CifarResNet(20, shortcut="B" if backbone == "aig" else "A"))  # noqa: E731
    kw = {"target": 0.5, "momentum": 0.6}
    full = _train(model_fn, kw, data, tmp_path / "full")
    with pytest.raises(_Kill):
        _train(model_fn, kw, data, tmp_path / "killed", kill_at=1)
    _train(model_fn, kw, data, tmp_path / "killed", resume=True)
    a, b = load_state(tmp_path / "full" / "state.pt"), load_state(tmp_path / "killed" / "state.pt")
    assert a["step"] == 4 and set(a["owned"]["modules"]) == {"teacher", "stage_heads"}
    assert_states_equal(a["model"], b["model"], "model")
    assert_states_equal(a["optimizer"], b["optimizer"], "optimizer")
    assert_states_equal(a["owned"], b["owned"], "owned")
    teacher, student = a["owned"]["modules"]["teacher"], a["model"]
    moved = [k for k in student if k.endswith("weight") and not torch.equal(teacher[k], student[k])]
    assert moved, "the auxiliary module follows the student, but is not it"
    assert full.method.teacher is not None

