"""Trainer end to end on tiny fake CIFAR: exact resume, non-finite stop, run-dir rules, init_from, eval."""

import json
import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

from cifar_fixtures import write_fake_cifar
from ponder import create_model
from ponder.config import config_from_dict
from ponder.engine import NonFiniteLossError, NonFiniteWeightsError, RunDirError, Trainer, evaluate_run, load_run, train
from ponder.engine.checkpoint import load_state, read_metrics
from ponder.weights import load_init_weights, read_weights
from ponder.methods.base import CrossEntropy, StepOutput, register_method
from run_states import strip_time

KILL = {"at_epoch": None}


@register_method
class KillableCE(CrossEntropy):
    """Cross-entropy on randomly flipped images (global torch RNG, like a stochastic policy) that
    simulates the process being killed before epoch ``KILL['at_epoch']``."""

    name = "test_engine_killable"

    def training_step(self, model, images, targets):
        flip = torch.rand(images.shape[0], 1, 1, 1) < 0.5
        return super().training_step(model, torch.where(flip, images.flip(3), images), targets)

    def on_epoch_start(self, epoch, num_epochs):
        if KILL["at_epoch"] == epoch:
            raise KeyboardInterrupt(f"killed before epoch {epoch + 1}")
        super().on_epoch_start(epoch, num_epochs)


@register_method
class NanAt(CrossEntropy):
    """Cross-entropy whose loss becomes NaN at global step ``nan_step`` (0-based)."""

    name = "test_engine_nan_at"

    def __init__(self, model, nan_step=0):
        super().__init__(model)
        self.nan_step, self.calls = nan_step, 0

    def training_step(self, model, images, targets):
        out = super().training_step(model, images, targets)
        self.calls += 1
        if self.calls - 1 == self.nan_step:
            return StepOutput(loss=out.loss * float("nan"), metrics=out.metrics, output=out.output)
        return out


@pytest.fixture(scope="module")
def cifar_dir(tmp_path_factory):
    return write_fake_cifar(tmp_path_factory.mktemp("data"), "cifar10", n_train=40, n_test=20, seed=0)


def tiny_config(data_dir, **sections):
    base = {
        "model": {"name": "resnet20_cifar"},
        "data": {"dataset": "cifar10", "data_dir": str(data_dir), "batch_size": 10, "eval_batch_size": 8},
        "optim": {"lr": 0.05},
        "schedule": {"name": "multistep", "milestones": [0.5], "warmup_epochs": 0.5},
        "method": {"name": "test_engine_killable"},
        "train": {"epochs": 3, "seed": 0, "device": "cpu"},
    }
    for k, v in sections.items():
        base[k] = {**base.get(k, {}), **v}
    return config_from_dict(base)


def test_resume_after_kill_is_bit_identical(cifar_dir, tmp_path):
    torch.set_num_threads(1)
    cfg = tiny_config(cifar_dir)
    full = train(cfg, tmp_path / "full", verbose=False)

    KILL["at_epoch"] = 1
    try:
        with pytest.raises(KeyboardInterrupt):
            train(cfg, tmp_path / "killed", verbose=False)
    finally:
        KILL["at_epoch"] = None
    assert load_state(tmp_path / "killed" / "state.pt")["epoch"] == 1
    torch.manual_seed(1234)  # a fresh process would start from other RNG states: resume must restore them
    resumed = train(None, None, resume=tmp_path / "killed", verbose=False)

    a, b = read_weights(full / "weights.safetensors"), read_weights(resumed / "weights.safetensors")
    assert a.keys() == b.keys() and len(a) > 0
    assert all(torch.equal(a[k], b[k]) for k in a), [k for k in a if not torch.equal(a[k], b[k])][:5]
    sa, sb = load_state(full / "state.pt"), load_state(resumed / "state.pt")
    assert sa["step"] == sb["step"] == 12 and sa["epoch"] == sb["epoch"] == 3
    ma, mb = read_metrics(full), read_metrics(resumed)
    assert [r["epoch"] for r in mb] == [1, 2, 3]
    assert strip_time(ma) == strip_time(mb)
    assert ma[0]["lr"] < ma[1]["lr"] and ma[2]["lr"] == pytest.approx(0.005)  # warm-up, then x0.1 at epoch 2
    # resuming a finished run trains nothing more and changes nothing
    train(None, None, resume=resumed, verbose=False)
    assert len(read_metrics(resumed)) == 3


def test_non_finite_loss_stops_and_keeps_last_checkpoint(cifar_dir, tmp_path):
    cfg = tiny_config(cifar_dir, method={"name": "test_engine_nan_at", "kwargs": {"nan_step": 5}})
    with pytest.raises(NonFiniteLossError, match=r"loss became nan at epoch 2, step 2 .*checkpoint of epoch 1"):
        train(cfg, tmp_path / "run", verbose=False)
    state = load_state(tmp_path / "run" / "state.pt")
    assert state["epoch"] == 1 and state["step"] == 4
    weights = read_weights(tmp_path / "run" / "weights.safetensors")
    assert all(torch.equal(weights[k], state["model"][k]) for k in weights)
    assert all(math.isfinite(v.float().abs().sum().item()) for v in weights.values())
    assert [r["epoch"] for r in read_metrics(tmp_path / "run")] == [1]


def test_run_dir_rules(cifar_dir, tmp_path):
    cfg = tiny_config(cifar_dir, train={"epochs": 1})
    run = train(cfg, tmp_path / "run", verbose=False)
    assert {p.name for p in run.iterdir()} >= {"config.yaml", "metrics.jsonl", "weights.safetensors", "state.pt"}
    with pytest.raises(RunDirError, match="already holds a training run.*--resume"):
        train(cfg, run, verbose=False)
    with pytest.raises(RunDirError, match="config differs .* optim.lr"):
        train(tiny_config(cifar_dir, train={"epochs": 1}, optim={"lr": 0.3}), None, resume=run, verbose=False)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(RunDirError, match="has no usable config.yaml"):
        train(None, None, resume=empty, verbose=False)
    (empty / "config.yaml").write_text((run / "config.yaml").read_text())
    with pytest.raises(RunDirError, match="has no state.pt"):
        train(None, None, resume=empty, verbose=False)


def test_load_run_and_init_from(cifar_dir, tmp_path):
    run = train(tiny_config(cifar_dir, train={"epochs": 1}), tmp_path / "run", verbose=False)
    model, config = load_run(run)
    assert config.model.kwargs["num_classes"] == 10 and not model.training
    state = load_state(run / "state.pt")["model"]
    assert all(torch.equal(model.state_dict()[k], state[k]) for k in state)

    other = create_model("resnet20_cifar", num_classes=5)
    missing, unexpected = load_init_weights(other, run)
    assert sorted(missing) == ["fc.bias", "fc.weight"] and unexpected == []
    assert torch.equal(other.conv1.weight, model.conv1.weight)

    cfg = tiny_config(cifar_dir, train={"epochs": 1, "init_from": str(run)}, optim={"lr": 0.0, "weight_decay": 0.0})
    tuned = train(cfg, tmp_path / "tuned", verbose=False)
    w = read_weights(tuned / "weights.safetensors")
    assert torch.equal(w["layer2.0.conv1.weight"], model.layer2[0].conv1.weight)  # lr 0: the initial weights stay


def test_evaluate_run_standard_protocol(cifar_dir, tmp_path):
    run = train(tiny_config(cifar_dir, train={"epochs": 1}, data={"val_size": 10}), tmp_path / "run", verbose=False)
    last = read_metrics(run)[-1]
    assert "val_acc" in last and "test_acc" in last
    report = evaluate_run(run, "standard", device="cpu")
    assert report["n"] == 20 and report["accuracy"] == pytest.approx(last["test_acc"])
    assert report["macs_mean"] == 40_551_040 and report["macs_std"] == 0
    assert json.loads((run / "eval" / "eval_standard.json").read_text())["accuracy"] == report["accuracy"]


def _loaders(n=16):
    g = torch.Generator().manual_seed(0)
    ds = TensorDataset(torch.randn(n, 3, 16, 16, generator=g), torch.randint(0, 10, (n,), generator=g))
    return DataLoader(ds, batch_size=8, shuffle=True, generator=g), DataLoader(ds, batch_size=8)


def test_trainer_on_plain_loaders_warns_for_cpu_amp_and_needs_tensorboard(tmp_path):
    cfg = config_from_dict({"train": {"epochs": 2, "amp": True, "device": "cpu"}, "optim": {"lr": 0.01}})
    model = create_model("resnet20_cifar")
    tl, te = _loaders()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer = Trainer(cfg, model, CrossEntropy(model), tl, te, run_dir=None, verbose=False)
    assert any("amp is ignored on CPU" in str(w.message) for w in caught)
    history = trainer.fit()
    assert [r["epoch"] for r in history] == [1, 2] and trainer.step == 4
    assert 0.0 <= history[-1]["test_acc"] <= 1.0 and history[-1]["train_loss"] > 0
    try:
        import torch.utils.tensorboard  # noqa: F401
    except ImportError:
        cfg.train.tensorboard, cfg.train.amp = True, False
        with pytest.raises(ImportError, match="tensorboard package is not installed"):
            Trainer(cfg, model, CrossEntropy(model), tl, te, run_dir=tmp_path, verbose=False)


def test_records_gates_and_exits_in_standard_report():
    from ponder.evaluate.records import Records
    from ponder.evaluate.standard import standard_report

    rec = Records(targets=torch.tensor([0, 1, 2, 1]), preds=torch.tensor([0, 1, 0, 1]),
                  correct=torch.tensor([True, True, False, True]), macs=torch.tensor([1.0, 3.0, 3.0, 1.0], dtype=torch.float64),
                  exit_index=torch.tensor([0, 2, 2, 0]), gates=torch.tensor([[1.0, 0.0], [1.0, 1.0], [1.0, 1.0], [0.0, 0.0]]))
    r = standard_report(rec)
    assert r["accuracy"] == 0.75 and r["macs_mean"] == 2.0 and r["macs_std"] == 1.0 and r["n"] == 4
    assert r["block_usage"] == [0.75, 0.5] and r["blocks_run_mean"] == 1.25 and r["exit_histogram"] == [2, 0, 2]
    assert F.one_hot(rec.exit_index).sum(0).tolist() == r["exit_histogram"]


@pytest.mark.parametrize("steps, epochs_kept", [(1, 2), (3, 0)])
def test_non_finite_weights_are_never_saved(cifar_dir, tmp_path, steps, epochs_kept):
    # lr 1e6: the loss stays finite for a step or two, but BN running variances overflow to inf
    cfg = tiny_config(cifar_dir, optim={"lr": 1e6}, schedule={"warmup_epochs": 0, "milestones": [0.9]},
                      method={"name": "cross_entropy"}, train={"max_steps_per_epoch": steps})
    kept = f"checkpoint of epoch {epochs_kept} .* is kept" if epochs_kept else "no checkpoint was written"
    with pytest.raises(NonFiniteWeightsError, match=rf"weights NaN or infinite in epoch {epochs_kept + 1} "
                                                     rf"\(\d+ tensors, e.g. layer1.0.bn1.running_var.*{kept}"):
        train(cfg, tmp_path / "run", verbose=False)
    run = tmp_path / "run"
    assert [r["epoch"] for r in read_metrics(run)] == list(range(1, epochs_kept + 1))
    if not epochs_kept:
        assert not (run / "state.pt").exists() and not (run / "weights.safetensors").exists()
        return
    state = load_state(run / "state.pt")
    weights = read_weights(run / "weights.safetensors")
    assert state["epoch"] == epochs_kept
    assert all(bool(torch.isfinite(v).all()) for v in list(weights.values()) + list(state["model"].values())
               if v.is_floating_point())


def test_resume_with_the_recipe_reads_the_data_folder_from_the_run(tmp_path):
    from ponder.config import load_config

    data = write_fake_cifar(tmp_path / "data", "cifar10", n_train=32, n_test=16, seed=0)
    recipe = tmp_path / "r.yaml"  # as the shipped recipes: no data folder (it comes from --data-dir)
    recipe.write_text("model: {name: resnet20_cifar}\ndata: {dataset: cifar10, batch_size: 16}\n"
                      "train: {epochs: 1, device: cpu}\n")
    run = train(load_config(recipe), tmp_path / "run", data_dir=str(data), verbose=False)
    train(load_config(recipe, ["train.epochs=2"]), None, resume=run, verbose=False)  # no --data-dir again
    assert [r["epoch"] for r in read_metrics(run)] == [1, 2]
