"""L2W recipes: each loads, names registered parts, has a plain-training twin that takes the same
backbone steps, and carries the paper's L2W settings for its data set."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from ponder.config import load_config
from ponder.methods.l2w_meta import ORDERS
from ponder.nn.wpn import WeightPredictionNetwork
from ponder.registry import list_models

RECIPES = Path(__file__).resolve().parents[1] / "recipes"
L2W = sorted(p for p in RECIPES.glob("*/*l2w*.yaml") if not p.stem.endswith("_plain"))
L2W_KEYS = {"wpn_depth", "wpn_width", "wpn_input", "normalisation", "delta", "q", "meta_interval", "orders",
            "wpn_lr", "wpn_weight_decay"}
PAPER = {"cifar10": (0.8, "col", 1), "cifar100": (0.8, "col", 1), "imagefolder": (0.3, "mat", 100)}  # delta, norm, I


def test_every_data_set_has_l2w_recipes():
    assert {p.parent.name for p in L2W} == {"cifar10", "cifar100", "imagenet"} and len(L2W) == 7


@pytest.mark.parametrize("path", L2W, ids=lambda p: f"{p.parent.name}/{p.stem}")
def test_l2w_recipe_and_its_plain_twin(path):
    l2w, plain = load_config(path), load_config(path.with_name(path.stem + "_plain.yaml"))
    assert (l2w.method.name, plain.method.name) == ("l2w", "multi_exit") and not plain.method.kwargs
    assert l2w.model.name in list_models()
    for section in ("model", "optim", "schedule", "train"):
        assert getattr(l2w, section) == getattr(plain, section), section
    # the same backbone steps: L2W's batch is two halves, each the plain batch
    assert dataclasses.replace(l2w.data, batch_size=plain.data.batch_size) == plain.data
    assert l2w.data.batch_size == 2 * plain.data.batch_size
    processes = 8 if l2w.data.dataset == "imagefolder" else 1
    reference = 256 if l2w.data.dataset == "imagefolder" else 64
    assert l2w.optim.lr == pytest.approx(0.1 * plain.data.batch_size * processes / reference)
    assert (l2w.optim.name, l2w.optim.momentum, l2w.optim.weight_decay, l2w.schedule.name) == ("sgd", 0.9, 1e-4, "cosine")

    kw = l2w.method.kwargs
    assert set(kw) == L2W_KEYS
    WeightPredictionNetwork(5, depth=kw["wpn_depth"], width=kw["wpn_width"], inputs=kw["wpn_input"],
                            normalisation=kw["normalisation"], delta=kw["delta"])  # valid options
    assert (kw["delta"], kw["normalisation"], kw["meta_interval"]) == PAPER[l2w.data.dataset]
    assert (kw["wpn_depth"], kw["wpn_width"], kw["wpn_input"], kw["q"]) == (1, 500, "loss", 0.75)
    assert (kw["wpn_lr"], kw["wpn_weight_decay"], kw["orders"]) == (1e-4, 1e-4, "both") and kw["orders"] in ORDERS
    if "longtail" in path.stem:  # the paper's ratio; 10 at smoke scale, where 100 leaves 5 images of a class
        assert l2w.data.long_tail_ratio == (10 if "cpu_subset" in path.stem else 100)
    if "cpu_subset" not in path.stem:
        assert l2w.train.epochs == (100 if l2w.data.dataset == "imagefolder" else 300)
