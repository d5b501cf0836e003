"""Train the ``l2w`` method with the real trainer on fake CIFAR: a runner shared by one- and two-process tests.

The model is a small multi-exit network without BatchNorm, so a batch split over processes
computes exactly what the whole batch does (up to float rounding); augmentation is off.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from ponder.config import config_from_dict
from ponder.engine.distributed import DistInfo
from ponder.engine.trainer import Trainer, seed_everything
from ponder.methods.l2w import L2W
from ponder.models.multi_exit import MultiExitModel

KILL = {"at_epoch": None}
SETTINGS = {  # method options of the runs the tests compare
    "col": dict(normalisation="col", delta=0.8, meta_interval=1, orders="both"),
    "row": dict(normalisation="row", delta=0.5, meta_interval=2, orders="alternate", wpn_input="both"),
    "mat": dict(normalisation="mat", delta=0.3, meta_interval=1, orders="both", wpn_depth=2),
}


class PlainExits(MultiExitModel):
    """Three exits on 32x32 inputs: strided conv + ReLU blocks, each exit a pooled Linear; no BatchNorm."""

    def __init__(self, num_classes: int = 10, width: int = 6):
        super().__init__()
        self.num_classes, self.num_exits, self.default_input_size = num_classes, 3, (3, 32, 32)
        self.blocks = nn.ModuleList(nn.Sequential(nn.Conv2d(cin, width, 3, 2, 1), nn.ReLU())
                                    for cin in (3, width, width))
        self.heads = nn.ModuleList(nn.Linear(width, num_classes) for _ in range(3))

    def run_block(self, k, state):
        return self.blocks[k](state)

    def exit_features(self, k, state):
        return state.mean((2, 3))

    def exit_classifier(self, k, feat):
        return self.heads[k](feat)

    def exit_feature_dims(self):
        return [self.heads[0].in_features] * 3

    def stage_modules(self, k):
        return [self.blocks[k]]

    def exit_modules(self, k):
        return [self.heads[k]]


class KillableL2W(L2W):
    """``l2w`` that can simulate a kill before epoch ``KILL['at_epoch']``."""

    def on_epoch_start(self, epoch, num_epochs):
        if KILL["at_epoch"] == epoch:
            raise KeyboardInterrupt(f"killed before epoch {epoch + 1}")
        super().on_epoch_start(epoch, num_epochs)


def l2w_config(data_dir: str | Path, batch_size: int):
    return config_from_dict({
        "data": {"dataset": "cifar10", "data_dir": str(data_dir), "batch_size": batch_size, "eval_batch_size": 8,
                 "val_size": 8, "augment": False},
        "optim": {"name": "sgd", "lr": 0.2, "momentum": 0.9, "nesterov": True, "weight_decay": 1e-3},
        "schedule": {"name": "cosine", "warmup_epochs": 0.5},
        "train": {"epochs": 3, "seed": 0, "device": "cpu"},
    })


def run_l2w(setting: str, data_dir: str | Path, out: str | Path, batch_size: int, dist: DistInfo | None = None,
            resume: bool = False, **options: Any) -> Trainer:
    """Train ``PlainExits`` with ``l2w`` (``SETTINGS[setting]`` plus ``options``) into ``out``
    (``batch_size`` per process; ``resume`` continues ``out``)."""
    from ponder.data import build_datasets, build_loaders

    dist = dist or DistInfo()
    cfg = l2w_config(data_dir, batch_size)
    seed_everything(cfg.train.seed + dist.rank)
    bundle = build_datasets(cfg.data, cfg.train.seed)
    train, val, test = build_loaders(bundle, cfg.data, cfg.train.seed, distributed=dist.enabled)
    torch.manual_seed(0)
    model = PlainExits()
    method = KillableL2W(model, wpn_width=16, q=0.75, wpn_lr=0.01, **{**SETTINGS[setting], **options})
    Path(out).mkdir(parents=True, exist_ok=True)
    trainer = Trainer(cfg, model, method, train, test_loader=test, val_loader=val, run_dir=out, device="cpu",
                      dist=dist, verbose=False)
    if resume:
        trainer.resume(out)
    trainer.fit()
    return trainer
