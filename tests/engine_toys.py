"""Toy methods that use the trainer's hooks, and a runner shared by one- and two-process tests.

Each toy stands for a later method's need, not for the method itself:
``toy_meta_step`` (L2W: a virtual SGD step on half a batch, an Adam step of a method-owned
weight net through it, then the real step), ``toy_ema_teacher`` (SP-Net: an EMA teacher
distilled from), ``toy_round_robin`` (multi-budget training: iteration k trains budget
k mod 3) and ``toy_held_out`` (target-aware weighting: each budget's held-out accuracy, measured
at every epoch's end, weights its loss).

The model has no BatchNorm, so a batch split over ranks computes exactly what the whole batch
does (up to float rounding); augmentation is off.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.func import functional_call

from ponder.config import RunConfig, config_from_dict
from ponder.engine.distributed import DistInfo
from ponder.methods.virtual_sgd import virtual_sgd_step
from ponder.engine.trainer import Trainer, seed_everything
from ponder.methods.base import CrossEntropy, Method, StepOutput
from ponder.output import DynamicOutput

KILL = {"at_epoch": None}
BUDGETS = 3


class ToyNet(nn.Module):
    """conv 3x3/2 -> ReLU -> global mean -> one linear head per budget; records the budgets it trains."""

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, stride=2, padding=1)
        self.heads = nn.ModuleList(nn.Linear(8, num_classes) for _ in range(BUDGETS))
        self.budget = 0
        self.seen: list[int] = []

    def forward(self, x: torch.Tensor) -> DynamicOutput:
        if self.training and torch.is_grad_enabled():
            self.seen.append(self.budget)
        logits = self.heads[self.budget](F.relu(self.conv(x)).mean((2, 3)))
        macs = torch.full((x.shape[0],), 1000.0 * (self.budget + 1), dtype=torch.float64)
        return DynamicOutput(logits=logits, macs=macs)


class Toy(CrossEntropy):
    """Cross-entropy that can simulate a kill before epoch ``KILL['at_epoch']``."""

    def on_epoch_start(self, epoch, num_epochs):
        if KILL["at_epoch"] == epoch:
            raise KeyboardInterrupt(f"killed before epoch {epoch + 1}")
        super().on_epoch_start(epoch, num_epochs)


class ToyMetaStep(Toy):
    """Per-sample loss weights from a method-owned net, learned through a virtual SGD step."""

    name = "toy_meta_step"

    def setup(self, ctx):
        self.wnet = ctx.add_module("wnet", nn.Linear(1, 1))
        self.wopt = ctx.add_optimizer("wnet", torch.optim.Adam(self.wnet.parameters(), lr=0.01),
                                      lr_factor=ctx.schedule.factor)

    def sample_weights(self, losses):
        return 1 + 0.5 * torch.tanh(self.wnet(losses[:, None]))[:, 0]

    def train_step(self, ctx, images, targets):
        half = images.shape[0] // 2
        used = [(n, p) for n, p in ctx.model.named_parameters() if not n.startswith("heads.") or n.startswith("heads.0.")]
        names, params = [n for n, _ in used], [p for _, p in used]
        losses = F.cross_entropy(functional_call(ctx.model, dict(used), (images[:half],)).logits, targets[:half],
                                 reduction="none")
        inner = (self.sample_weights(losses.detach()) * losses).mean()
        grads = torch.autograd.grad(inner, params, create_graph=True)
        stepped = virtual_sgd_step(ctx.optimizer, dict(used), {n: ctx.all_reduce_mean(g) for n, g in zip(names, grads)})
        after = functional_call(ctx.model, stepped, (images[half:],)).logits
        meta_loss = ctx.optimize(F.cross_entropy(after, targets[half:]), self.wopt)

        out = ctx.net(images)
        losses = F.cross_entropy(out.logits, targets, reduction="none")
        with torch.no_grad():
            w = self.sample_weights(losses)
        loss = (w * losses).mean()
        ctx.optimize(loss)
        return StepOutput(loss=loss, metrics={"meta_loss": meta_loss, "weight_mean": w.mean().item()}, output=out)


class ToyEmaTeacher(Toy):
    """Cross-entropy plus distillation from an EMA copy of the model, updated after every step."""

    name = "toy_ema_teacher"
    momentum = 0.7

    def setup(self, ctx):
        self.teacher = ctx.add_module("teacher", copy.deepcopy(ctx.model).requires_grad_(False))

    def training_step(self, model, images, targets):
        out = model(images)
        with torch.no_grad():
            soft = F.softmax(self.teacher(images).logits, 1)
        kd = F.kl_div(F.log_softmax(out.logits, 1), soft, reduction="batchmean")
        return StepOutput(loss=F.cross_entropy(out.logits, targets) + kd, metrics={"kd": kd.item()}, output=out)

    def after_step(self, ctx):
        with torch.no_grad():
            for t, s in zip(self.teacher.parameters(), ctx.model.parameters()):
                t.mul_(self.momentum).add_(s, alpha=1 - self.momentum)


class ToyRoundRobin(Toy):
    """Iteration k trains budget k mod 3 (the model runs that budget's head)."""

    name = "toy_round_robin"

    def train_step(self, ctx, images, targets):
        ctx.model.budget = ctx.iteration % BUDGETS
        out = super().train_step(ctx, images, targets)
        out.metrics["budget"] = float(ctx.model.budget)
        return out


class ToyHeldOut(ToyRoundRobin):
    """Round-robin budgets whose losses are weighted by how far each budget's held-out accuracy,
    measured at the end of every epoch, is below a target."""

    name = "toy_held_out"
    target = 0.5

    def __init__(self, model):
        super().__init__(model)
        self.loss_weights = [1.0] * BUDGETS

    def training_step(self, model, images, targets):
        out = super().training_step(model, images, targets)
        out.loss = out.loss * self.loss_weights[self.model.budget]
        return out

    def on_epoch_end(self, ctx):
        accs = []
        for b in range(BUDGETS):
            ctx.model.budget = b
            accs.append(ctx.collect().summary()["accuracy"])
        ctx.model.budget = 0
        self.loss_weights = [1.0 + max(0.0, 1.0 - a / self.target) for a in accs]
        return {"held_out_acc": accs, "loss_weights": list(self.loss_weights)}

    def state_dict(self):
        return {**super().state_dict(), "loss_weights": list(self.loss_weights)}

    def load_state_dict(self, state):
        super().load_state_dict(state)
        self.loss_weights = [float(w) for w in state["loss_weights"]]


TOYS = {cls.name: cls for cls in (ToyMetaStep, ToyEmaTeacher, ToyRoundRobin, ToyHeldOut)}


def toy_config(data_dir: str | Path, batch_size: int):
    return config_from_dict({
        "data": {"dataset": "cifar10", "data_dir": str(data_dir), "batch_size": batch_size, "eval_batch_size": 8,
                 "val_size": 8, "augment": False},
        "optim": {"lr": 0.1, "momentum": 0.9, "nesterov": True, "weight_decay": 1e-3},
        "schedule": {"name": "cosine", "warmup_epochs": 0.5},
        "train": {"epochs": 3, "seed": 0, "device": "cpu"},
    })


def run_toy(kind: str, data_dir: str | Path, out: str | Path, batch_size: int, dist: DistInfo | None = None,
            resume: bool = False) -> Trainer:
    """Train toy ``kind`` into ``out`` (``batch_size`` per process; ``resume`` continues ``out``)."""
    def build() -> tuple[nn.Module, Method]:
        model = ToyNet()
        return model, TOYS[kind](model)

    return fit_run(toy_config(data_dir, batch_size), build, out, dist, resume)


def assert_resume_is_exact(run: Callable[..., Trainer], kill: dict, root: Path) -> tuple[Trainer, Trainer, dict]:
    """``run(out)`` (a toy run, ``resume=`` as :func:`run_toy`'s) whole into ``root/full``, then into
    ``root/killed`` killed before epoch 1 (``kill``: the toy's KILL switch) and resumed there under other RNG
    states; assert the two final states (model, optimizer, method, owned, step, epoch) are equal bit for bit
    and so are their metrics but for timings. Returns the full and the resumed trainers and the full state."""
    import pytest
    from ponder.engine.checkpoint import load_state, read_metrics
    from run_states import assert_states_equal, strip_time

    torch.set_num_threads(1)
    full = run(root / "full")
    kill["at_epoch"] = 1
    try:
        with pytest.raises(KeyboardInterrupt):
            run(root / "killed")
    finally:
        kill["at_epoch"] = None
    torch.manual_seed(1234)  # a fresh process would start from other RNG states
    resumed = run(root / "killed", resume=True)
    a, b = load_state(root / "full" / "state.pt"), load_state(root / "killed" / "state.pt")
    for key in ("model", "optimizer", "method", "owned", "step", "epoch"):
        assert_states_equal(a[key], b[key], key)
    assert strip_time(read_metrics(root / "full")) == strip_time(read_metrics(root / "killed"))
    return full, resumed, a


def fit_run(cfg: RunConfig, build: Callable[[], tuple[nn.Module, Method]], out: str | Path,
            dist: DistInfo | None = None, resume: bool = False) -> Trainer:
    """Train what ``build()`` gives (model, method; built after ``torch.manual_seed(0)``) on ``cfg``'s data
    into ``out``, seeded per rank (``resume`` continues ``out``); returns the trainer."""
    from ponder.data import build_datasets, build_loaders

    dist = dist or DistInfo()
    seed_everything(cfg.train.seed + dist.rank)
    bundle = build_datasets(cfg.data, cfg.train.seed)
    train, val, test = build_loaders(bundle, cfg.data, cfg.train.seed, distributed=dist.enabled)
    torch.manual_seed(0)
    model, method = build()
    Path(out).mkdir(parents=True, exist_ok=True)
    trainer = Trainer(cfg, model, method, train, test_loader=test, val_loader=val, run_dir=out, device="cpu",
                      dist=dist, verbose=False)
    if resume:
        trainer.resume(out)
    trainer.fit()
    return trainer
