"""Train the ``l2w`` method with the real trainer on fake CIFAR: a runner shared by one- and two-process tests.

The model is a small multi-exit network without BatchNorm (:class:`toy_models.ToyExits`), so a batch split over processes
computes exactly what the whole batch does (up to float rounding); augmentation is off.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any


from ponder.config import config_from_dict
from ponder.engine.distributed import DistInfo
from ponder.engine.trainer import Trainer
from ponder.methods.l2w import L2W
from engine_toys import fit_run
from toy_models import ToyExits

KILL = {"at_epoch": None}
SETTINGS = {  # method options of the runs the tests compare
    "col": dict(normalisation="col", delta=0.8, meta_interval=1, orders="both"),
    "row": dict(normalisation="row", delta=0.5, meta_interval=2, orders="alternate", wpn_input="both"),
    "mat": dict(normalisation="mat", delta=0.3, meta_interval=1, orders="both", wpn_depth=2),
}


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
    """Train ``ToyExits()`` (no BatchNorm) with ``l2w`` (``SETTINGS[setting]`` plus ``options``) into ``out``
    (``batch_size`` per process; ``resume`` continues ``out``)."""
    def build() -> tuple[ToyExits, KillableL2W]:
        model = ToyExits()
        return model, KillableL2W(model, wpn_width=16, q=0.75, wpn_lr=0.01, **{**SETTINGS[setting], **options})

    return fit_run(l2w_config(data_dir, batch_size), build, out, dist, resume)
