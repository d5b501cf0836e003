"""Two-process CPU training with torchrun + DDP (gloo): run dir, metrics, records gathered across ranks."""

import json
import math
import textwrap

import pytest
import yaml

from cifar_fixtures import write_fake_cifar
from two_processes import run_two_processes

SCRIPT = textwrap.dedent("""
    import json, os, sys
    import torch
    torch.set_num_threads(1)
    from ponder.config import load_config
    from ponder.data import build_datasets, build_loaders
    from ponder.engine import load_run, train
    from ponder.engine.distributed import init_distributed, shutdown_distributed
    from ponder.evaluate.records import collect
    from ponder.methods.base import CrossEntropy, register_method

    TRAINED = {}

    @register_method
    class Probe(CrossEntropy):  # keeps a handle on this rank's model to compare ranks afterwards
        name = "ddp_probe"

        def on_epoch_start(self, epoch, num_epochs):
            TRAINED["model"] = self.model
            super().on_epoch_start(epoch, num_epochs)

    cfg, out = load_config(sys.argv[1]), sys.argv[2]
    info, device = init_distributed("cpu")
    run = train(cfg, out, verbose=False)
    model, rcfg = load_run(run)
    trained = TRAINED["model"].state_dict()
    same_as_saved = all(torch.equal(v, trained[k]) for k, v in model.state_dict().items())
    bundle = build_datasets(rcfg.data, rcfg.train.seed)
    train_loader, _, test_loader = build_loaders(bundle, rcfg.data, rcfg.train.seed, distributed=True)
    train_loader.sampler.set_epoch(0)
    local = collect(model, test_loader, device, distributed=False)
    full = collect(model, test_loader, device, distributed=True)
    json.dump({"world": info.world_size, "train_keys": [k[0] for k in train_loader.sampler],
               "test_keys": [k[0] for k in test_loader.sampler], "local_n": len(local),
               "full": full.summary(), "targets": full.targets.tolist(),
               "same_as_saved": same_as_saved}, open(f"{out}/rank{info.rank}.json", "w"))
    shutdown_distributed()
    # skip interpreter finalization: gloo worker threads can abort it (SIGABRT, "terminate called
    # without an active exception"; pytorch/pytorch PR 179291), rarely, after all work is done
    sys.stdout.flush()
    os._exit(0)
""")


def test_two_process_ddp_training(tmp_path):
    data = write_fake_cifar(tmp_path / "data", "cifar10", n_train=40, n_test=21, seed=0)
    recipe = tmp_path / "tiny.yaml"
    recipe.write_text(yaml.safe_dump({
        "model": {"name": "resnet20_cifar"},
        "data": {"dataset": "cifar10", "data_dir": str(data), "batch_size": 10, "eval_batch_size": 8},
        "optim": {"lr": 0.05}, "method": {"name": "ddp_probe"}, "train": {"epochs": 1, "device": "cpu"},
    }))
    out = tmp_path / "run"
    run_two_processes(SCRIPT, tmp_path / "ddp_train.py", recipe, out, timeout=120)

    assert {"config.yaml", "metrics.jsonl", "weights.safetensors", "state.pt"} <= {p.name for p in out.iterdir()}
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["epoch"] for m in metrics] == [1]  # one line: only rank 0 writes
    ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert all(r["world"] == 2 for r in ranks)
    # gradients were averaged and buffers synced: both ranks end with exactly the weights rank 0 saved
    assert all(r["same_as_saved"] for r in ranks)
    # each rank trained on its own half and evaluated its own shard of the test set
    assert not set(ranks[0]["train_keys"]) & set(ranks[1]["train_keys"])
    assert sorted(ranks[0]["train_keys"] + ranks[1]["train_keys"]) == list(range(40))
    assert sorted(ranks[0]["test_keys"] + ranks[1]["test_keys"]) == list(range(21))
    assert [r["local_n"] for r in ranks] == [11, 10]
    # gathered records: every test image exactly once, in data-set order, the same on both ranks
    from ponder.data import load_cifar_split

    _, test_labels, _ = load_cifar_split(data, "cifar10", train=False)
    for r in ranks:
        assert r["full"]["n"] == 21 and r["targets"] == test_labels.tolist()
    assert ranks[0]["full"] == ranks[1]["full"]
    # the epoch's test accuracy was gathered over both ranks too (same weights as saved)
    assert metrics[0]["test_acc"] == pytest.approx(ranks[0]["full"]["accuracy"])
    assert math.isfinite(metrics[0]["train_loss"])


def test_find_unused_parameters_auto_choice():
    import torch

    from ponder import create_model
    from ponder.engine.distributed import is_static_model
    from ponder.models.resnet import CifarResNet

    class Dynamic(CifarResNet):  # a model that declares it decides per input what to run
        @property
        def is_dynamic(self):
            return True

    assert is_static_model(create_model("resnet20_cifar"))
    assert not is_static_model(Dynamic(20))
    assert not is_static_model(create_model("skipnet_resnet38_cifar"))
    assert not is_static_model(torch.nn.Linear(2, 2))  # not a ponder model: DDP looks for unused parameters
    assert not is_static_model(torch.nn.Linear(2, 2))


EQUAL_SCRIPT = textwrap.dedent("""
    import os, sys
    import torch
    torch.set_num_threads(1)
    from ponder.config import load_config
    from ponder.engine import train
    from ponder.engine.distributed import init_distributed, shutdown_distributed

    init_distributed("cpu")
    for recipe, out in zip(sys.argv[1::2], sys.argv[2::2]):
        train(load_config(recipe), out, verbose=False)
    shutdown_distributed()
    sys.stdout.flush()
    os._exit(0)  # see SCRIPT
""")


def test_two_processes_equal_one_process_at_the_same_global_batch(tmp_path):
    """Per-sample augmentation seeds + synchronised BatchNorm: 2 x batch 5 trains what 1 x batch 10 trains,
    to float rounding (two epochs of one step: training at init amplifies rounding about 50x per step)."""
    import torch

    from ponder.config import load_config
    from ponder.engine import train
    from ponder.engine.checkpoint import load_state, read_metrics

    torch.set_num_threads(1)
    data = write_fake_cifar(tmp_path / "data", "cifar10", n_train=40, n_test=20, seed=0)
    recipes = {}
    for name, batch, sync in (("one", 10, True), ("two", 5, True), ("two_plain_bn", 5, False)):
        recipes[name] = tmp_path / f"{name}.yaml"
        recipes[name].write_text(yaml.safe_dump({
            "model": {"name": "resnet20_cifar"},
            "data": {"dataset": "cifar10", "data_dir": str(data), "batch_size": batch, "eval_batch_size": 8},
            "optim": {"lr": 0.05, "momentum": 0.9, "weight_decay": 5e-4}, "schedule": {"name": "cosine"},
            "train": {"epochs": 2, "max_steps_per_epoch": 1, "device": "cpu", "sync_batchnorm": sync},
        }))
    run_two_processes(EQUAL_SCRIPT, tmp_path / "equal.py", recipes["two"], tmp_path / "two", recipes["two_plain_bn"],
                      tmp_path / "two_plain_bn", timeout=180)
    train(load_config(recipes["one"]), tmp_path / "one", verbose=False)

    one, two, plain = (load_state(tmp_path / name / "state.pt") for name in ("one", "two", "two_plain_bn"))
    assert (one["world_size"], two["world_size"], one["step"], two["step"]) == (1, 2, 2, 2)

    def largest_difference(state):
        return max(float((state["model"][k].double() - v.double()).abs().max()) for k, v in one["model"].items())

    assert largest_difference(two) < 2e-6  # weights and BN running statistics alike
    assert largest_difference(plain) > 1e-2  # per-rank BN statistics train another network
    for a, b in zip(read_metrics(tmp_path / "one"), read_metrics(tmp_path / "two"), strict=True):
        assert b["train_loss"] == pytest.approx(a["train_loss"], rel=1e-6) and b["test_acc"] == a["test_acc"]
