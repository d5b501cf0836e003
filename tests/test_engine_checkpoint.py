"""Run-directory files: atomic writes, safe state loading, RNG capture, config and load_run round trips."""

import os
import pickle
import random
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from ponder import create_model
from ponder.config import ConfigError, RunConfig, config_from_dict, load_config
from ponder.files import atomic_write
from ponder.engine.checkpoint import (RunDirError, append_metrics, load_run, load_state, read_metrics,
                                      read_weights, rng_state, save_state, save_weights, set_rng_state, truncate_metrics)

RECIPES = Path(__file__).resolve().parents[1] / "recipes" / "cifar10"


def test_crash_mid_write_leaves_old_file(tmp_path):
    target = tmp_path / "state.pt"
    save_state({"epoch": 1, "w": torch.ones(3)}, target)

    def crashing_write(p):
        p.write_bytes(b"half a checkpo")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        atomic_write(target, crashing_write)
    state = load_state(target)
    assert state["epoch"] == 1 and torch.equal(state["w"], torch.ones(3))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["state.pt"]  # no temporary file left behind


def test_state_load_cannot_run_code(tmp_path):
    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned > " + str(tmp_path / "pwned"),))

    path = tmp_path / "state.pt"
    torch.save({"epoch": 3, "payload": Evil()}, path, pickle_protocol=2)
    with pytest.raises(RunDirError, match="corrupt or holds non-tensor objects"):
        load_state(path)
    assert not (tmp_path / "pwned").exists()
    path.write_bytes(pickle.dumps({"a": 1}, protocol=2)[:5])
    with pytest.raises(RunDirError, match=str(path)):
        load_state(path)


def test_rng_state_round_trip_through_state_file(tmp_path):
    g = torch.Generator().manual_seed(7)
    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    save_state({"rng": rng_state({"loader": g})}, tmp_path / "s.pt")
    first = (random.random(), np.random.rand(), torch.rand(2), torch.rand(2, generator=g))
    random.seed(10), np.random.seed(20), torch.manual_seed(30), g.manual_seed(40)
    set_rng_state(load_state(tmp_path / "s.pt")["rng"], {"loader": g})
    again = (random.random(), np.random.rand(), torch.rand(2), torch.rand(2, generator=g))
    assert first[0] == again[0] and first[1] == again[1]
    assert torch.equal(first[2], again[2]) and torch.equal(first[3], again[3])


def test_metrics_append_and_truncate(tmp_path):
    for e in (1, 2, 3):
        append_metrics(tmp_path, {"epoch": e, "loss": 1.0 / e})
    truncate_metrics(tmp_path, 2)
    assert read_metrics(tmp_path) == [{"epoch": 1, "loss": 1.0}, {"epoch": 2, "loss": 0.5}]


def test_config_save_load_round_trip(tmp_path):
    cfg = config_from_dict({"model": {"name": "resnet56_cifar", "kwargs": {"shortcut": "B"}},
                            "optim": {"name": "adamw", "lr": 3e-4, "betas": [0.8, 0.9]},
                            "schedule": {"name": "cosine", "warmup_epochs": 1.5},
                            "train": {"epochs": 7, "find_unused_parameters": True}})
    cfg.save(tmp_path / "config.yaml")
    back = load_config(tmp_path / "config.yaml")
    assert yaml.safe_dump(back.to_dict()) == yaml.safe_dump(cfg.to_dict())
    assert back.model.kwargs == {"shortcut": "B"} and back.schedule.warmup_epochs == 1.5


def test_unknown_recipe_field_is_one_clear_sentence(tmp_path):
    recipe = tmp_path / "bad.yaml"
    recipe.write_text("optim:\n  lr: 0.1\n  momentun: 0.9\n")
    with pytest.raises(ConfigError, match=r"unknown recipe field optim.momentun; valid fields: name, lr, momentum"):
        load_config(recipe)
    with pytest.raises(ConfigError, match="unknown recipe field trian"):
        config_from_dict({"trian": {"epochs": 1}})


@pytest.mark.parametrize("depth", [20, 32, 56, 110])
def test_cifar_recipes_are_the_standard_schedule(depth):
    cfg = load_config(RECIPES / f"resnet{depth}.yaml")
    assert cfg.model.name == f"resnet{depth}_cifar" and cfg.data.dataset == "cifar10" and cfg.data.augment
    assert (cfg.optim.name, cfg.optim.lr, cfg.optim.momentum, cfg.optim.weight_decay) == ("sgd", 0.1, 0.9, 1e-4)
    assert cfg.data.batch_size == 128 and cfg.train.epochs == 164
    assert cfg.schedule.name == "multistep" and cfg.schedule.milestones == [82, 123] and cfg.schedule.gamma == 0.1


def _fake_run(tmp_path, model):
    cfg = RunConfig()
    cfg.model.kwargs = {"num_classes": 7}
    cfg.save(tmp_path / "config.yaml")
    save_weights(model, tmp_path / "weights.safetensors")
    return cfg


def test_load_run_round_trip_and_errors(tmp_path):
    model = create_model("resnet20_cifar", num_classes=7)
    with torch.no_grad():
        model.fc.bias.fill_(0.25)
        model.bn1.running_mean.fill_(0.5)
    _fake_run(tmp_path, model)
    loaded, cfg = load_run(tmp_path)
    assert cfg.model.kwargs["num_classes"] == 7 and not loaded.training
    sd = loaded.state_dict()
    assert all(torch.equal(sd[k], v) for k, v in model.state_dict().items())
    x = torch.randn(2, 3, 32, 32)
    assert torch.equal(loaded(x).logits, model.eval()(x).logits)

    with pytest.raises(RunDirError, match="does not exist"):
        load_run(tmp_path / "nope")
    (tmp_path / "weights.safetensors").write_bytes((tmp_path / "weights.safetensors").read_bytes()[:100])
    with pytest.raises(RunDirError, match="corrupt or not a safetensors file"):
        load_run(tmp_path)
    (tmp_path / "weights.safetensors").unlink()
    with pytest.raises(RunDirError, match="weights file .* does not exist"):
        load_run(tmp_path)
    save_weights(create_model("resnet32_cifar", num_classes=7), tmp_path / "weights.safetensors")
    with pytest.raises(RunDirError, match="do not fit model 'resnet20_cifar'"):
        load_run(tmp_path)


def test_weights_with_shared_storage_are_saved(tmp_path):
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 4))
    model[1].weight = model[0].weight  # tied
    save_weights(model, tmp_path / "w.safetensors")
    w = read_weights(tmp_path / "w.safetensors")
    assert torch.equal(w["0.weight"], w["1.weight"])
