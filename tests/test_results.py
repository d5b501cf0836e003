"""Results as data: the schema round trip, one-sentence errors, identity, the bench and protocol helpers,
and a real evaluation of an untrained resnet20_cifar that saves its result."""

import json
import math

import pytest
import torch

from cifar_fixtures import write_fake_cifar
from ponder import create_model
from ponder.bench import DynamicBench, StaticBench
from ponder.cli import main
from ponder.config import config_from_dict
from ponder.engine import evaluate_run
from ponder.engine.checkpoint import save_weights
from ponder.results import result_from_report
from ponder.evaluate.protocols import EvalContext
from ponder.results import (SCHEMA, EvalResult, Evaluation, Latency, OperatingPoint, Provenance, ResultError, RunInfo,
                            bench_kind, config_hash, latency_from_bench, load_result, load_results, machine_info,
                            model_family, result_from_bench, result_kind, save_result)

PROV = Provenance(cpu="Test CPU", cores=4, os="Linux", python="3.11", torch="2.3", ponder="0.1.0",
                  commit="0123456789abcdef", dirty=False, threads=2, device="cpu", timestamp="2025-01-01T00:00:00+00:00")


def full_result() -> EvalResult:
    return EvalResult(
        kind="skip", run=RunInfo("bd_s0", "blockdrop_resnet32_cifar", "skipping", "blockdrop", "cifar10", 0, "abc123abc123"),
        evaluation=Evaluation("skip", "test", 10000, "sparse", [3, 32, 32], {"thresholds": [0.3, 0.5]}),
        provenance=PROV, accuracy=0.9, macs_mean=50e6, macs_std=4e6, dense_macs=69e6,
        points=[OperatingPoint("threshold 0.3", 60e6, 0.92, 3e6, "threshold", 0.3),
                OperatingPoint("threshold 0.5", 50e6, 0.9, 4e6, "threshold", 0.5, ms_per_image=0.4)],
        latency=Latency("checkpoint", "sparse", "dense_baseline()", "cpu", 64, 2, 25.6, 0.4, rounds=10,
                        macs_mean=50e6, baseline_ms_per_image=0.5, speedup=1.25, speedup_range=[1.2, 1.3],
                        mac_ratio=1.38, efficiency=1.25 / 1.38))


def run_cli(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_result_round_trips_through_its_json_file(tmp_path):
    result = full_result()
    path = save_result(tmp_path / "bd_s0", result)
    assert path == tmp_path / "bd_s0" / "results" / "skip.json"
    data = json.loads(path.read_text())
    assert list(data)[0] == "schema" and data["schema"] == SCHEMA == 1
    assert data["macs_unit"] == "conv+linear MACs" and data["latency"]["speedup_range"] == [1.2, 1.3]
    assert load_result(path) == result
    assert load_results(tmp_path / "bd_s0") == [result]
    assert load_results(tmp_path / "elsewhere") == []
    assert not list(path.parent.glob(".*.tmp"))  # written atomically: no temporary file left


def test_non_finite_numbers_are_saved_as_null_and_unknown_fields_ignored(tmp_path):
    result = full_result()
    result.accuracy = float("nan")
    path = save_result(tmp_path, result)
    data = json.loads(path.read_text())
    assert data["accuracy"] is None
    data["a_field_from_a_later_ponder"] = 1
    path.write_text(json.dumps(data))
    assert load_result(path).accuracy is None


@pytest.mark.parametrize("edit, message", [
    (lambda d: d.update(schema=2), "has schema 2, newer than this ponder reads (schema 1); upgrade ponder"),
    (lambda d: d["run"].pop("config_hash"), "lacks the field 'config_hash'"),
    (lambda d: d.pop("schema"), "is not a ponder result"),
])
def test_bad_result_files_get_one_sentence(tmp_path, edit, message):
    path = save_result(tmp_path, full_result())
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data))
    with pytest.raises(ResultError, match="skip.json") as err:
        load_result(path)
    assert message in str(err.value) and "\n" not in str(err.value)
    path.write_text("{not json")
    with pytest.raises(ResultError, match="is not readable JSON"):
        load_result(path)


def test_save_refuses_a_kind_that_is_not_a_file_name(tmp_path):
    result = full_result()
    result.kind = "../escape"
    with pytest.raises(ValueError, match="not a plain file name"):
        save_result(tmp_path, result)


def tiny_config(data_dir, seed=0, **model_kwargs):
    return config_from_dict({
        "model": {"name": "resnet20_cifar", "kwargs": {"num_classes": 10, **model_kwargs}},
        "data": {"dataset": "cifar10", "data_dir": str(data_dir), "eval_batch_size": 8},
        "train": {"seed": seed, "device": "cpu"}})


def test_config_hash_groups_runs_that_differ_only_by_seed_or_machine():
    a = tiny_config("/data/a", seed=0)
    b = tiny_config("/elsewhere/b", seed=3)
    b.data.workers, b.train.device = 4, "cuda"
    assert config_hash(a) == config_hash(b) and len(config_hash(a)) == 12
    c = tiny_config("/data/a", seed=0)
    c.optim.lr = 0.05
    assert config_hash(c) != config_hash(a)
    assert config_hash(tiny_config("/data/a", zero_init_residual=True)) != config_hash(a)


@pytest.mark.parametrize("name, family", [
    ("resnet20_cifar", "static"), ("msdnet_cifar_anytime", "early_exit"), ("blockdrop_resnet32_cifar", "skipping"),
    ("skipnet_resnet38_cifar", "skipping"), ("act_resnet32_cifar", "spatial"), ("sact_resnet32_cifar", "spatial"),
])
def test_model_family(name, family):
    assert model_family(create_model(name)) == family


def test_a_declared_family_attribute_wins():
    model = create_model("resnet20_cifar")
    model.family = "spatial"
    assert model_family(model) == "spatial"


def test_machine_info_names_the_machine_and_versions():
    info = machine_info(threads=3)
    assert info.threads == 3 and info.cores >= 1 and info.cpu and info.device == "cpu"
    assert info.torch == torch.__version__ and info.timestamp.endswith("+00:00")
    assert info.commit == "unknown" or len(info.commit) == 40


def test_latency_from_a_dynamic_and_a_static_bench():
    dyn = DynamicBench(model="m", batch=4, threads=2, mode="checkpoint", dense_ms=8.0, dynamic_ms=4.0, masked_ms=9.0,
                       speedup=2.0, dense_macs=100, dynamic_macs=40.0, dynamic_macs_std=5.0, mac_ratio=2.5,
                       efficiency=0.8, images_per_s=1000.0, speedup_range=(1.8, 2.2))
    lat = latency_from_bench(dyn, rounds=10, budget=40.0)
    assert (lat.ms_per_batch, lat.ms_per_image, lat.baseline_ms_per_image) == (4.0, 1.0, 2.0)
    assert (lat.speedup, lat.mac_ratio, lat.efficiency, lat.speedup_range) == (2.0, 2.5, 0.8, [1.8, 2.2])
    assert (lat.executor, lat.baseline, lat.budget, lat.rounds, lat.kernels_ms_per_image) == (
        "sparse", "dense_baseline()", 40.0, 10, None)
    static = latency_from_bench(StaticBench(model="m", batch=8, threads=1, ms=4.0, images_per_s=2000.0, macs=10))
    assert (static.mode, static.executor, static.baseline, static.ms_per_image, static.speedup) == (
        "static", "dense", None, 0.5, None)


def test_result_file_names():
    assert bench_kind(64, 2) == "bench-b64-t2"
    assert bench_kind(64, 2, 2.5e7) == "bench-b64-t2-budget25000000" and bench_kind(1, 1, 0.5) == "bench-b1-t1-budget0.5"
    assert result_kind("standard", {"no_cache": True}) == "standard"
    assert result_kind("spatial", {"image_size": 352}) == "spatial-image_size352"
    assert result_kind("budgeted", {"target_macs": [1e7, 2e7]}) == "budgeted-target_macs_10000000.0_20000000.0"


def _ctx(tmp_path, model_name, model_kwargs):
    model = create_model(model_name, **model_kwargs)
    config = config_from_dict({"model": {"name": model_name, "kwargs": model_kwargs}, "method": {"name": "multi_exit"}})
    return EvalContext(model=model, config=config, run_dir=tmp_path / "msd_s0", out_dir=tmp_path / "msd_s0",
                       test_loader=None, val_loader=None, device="cpu")


def test_result_from_the_early_exit_protocol_reports(tmp_path):
    ctx = _ctx(tmp_path, "msdnet_cifar_budgeted", {"n_blocks": 3, "n_channels": 8, "growth_rate": 4, "head_width": 16})
    budgeted = {"protocol": "budgeted", "num_test": 4, "exit_macs": [10.0, 20.0, 40.0],
                "points": [{"q": 0.5, "expected_macs": 20.0, "accuracy": 75.0, "exit_counts": [2, 1, 1]}],
                "target_macs": [{"target_macs": 2e7, "expected_macs": 1.9e7, "accuracy": 80.0}]}
    r = result_from_report(ctx, "budgeted", budgeted)
    assert (r.kind, r.run.family, r.run.name, r.evaluation.images, r.accuracy, r.macs_mean) == (
        "budgeted", "early_exit", "msd_s0", 4, None, None)
    q, budget = r.points
    # 2 images at 10, 1 at 20, 1 at 40 MACs: mean 20, variance (2 * 100 + 0 + 400) / 4 = 150
    assert (q.label, q.knob, q.value, q.accuracy, q.macs_mean) == ("q=0.5", "q", 0.5, 0.75, 20.0)
    assert q.macs_std == pytest.approx(math.sqrt(150))
    assert (budget.label, budget.budget, budget.accuracy, budget.macs_std) == ("budget 20.00M", 2e7, 0.8, None)
    # the dense baseline `ponder bench` times: the network to its last exit without the earlier heads
    assert r.dense_macs == ctx.model.dense_macs((3, 32, 32))
    assert ctx.model.exit_costs()[-2] < r.dense_macs < ctx.model.exit_costs()[-1]
    anytime = {"protocol": "anytime", "num_test": 4, "exits": [
        {"exit": 1, "macs": 10, "top1": 50.0}, {"exit": 2, "macs": 20, "top1": 60.0}, {"exit": 3, "macs": 40, "top1": 70.0}]}
    r = result_from_report(ctx, "anytime", anytime)
    assert [p.label for p in r.points] == ["exit 1", "exit 2", "exit 3"]
    assert (r.accuracy, r.macs_mean, r.macs_std) == (0.7, 40.0, 0.0)  # the headline is the last exit


@pytest.fixture(scope="module")
def cifar_dir(tmp_path_factory):
    return write_fake_cifar(tmp_path_factory.mktemp("data"), "cifar10", n_train=10, n_test=8, seed=0)


def untrained_run(path, data_dir, model_name="resnet20_cifar", seed=0):
    """A run directory of an untrained model: its resolved config and initial weights (no training)."""
    config = tiny_config(data_dir, seed=seed)
    config.model.name = model_name
    path.mkdir(parents=True)
    config.save(path / "config.yaml")
    torch.manual_seed(seed)
    save_weights(create_model(model_name, num_classes=10), path / "weights.safetensors")
    return path


def test_evaluate_run_saves_the_result_of_a_real_evaluation(cifar_dir, tmp_path, capsys):
    runs = [untrained_run(tmp_path / f"r20_s{s}", cifar_dir, seed=s) for s in (0, 1)]
    reports = [evaluate_run(r, "standard", device="cpu") for r in runs]
    results = [load_results(r) for r in runs]
    assert [len(r) for r in results] == [1, 1]
    a, b = results[0][0], results[1][0]
    assert (a.kind, a.run.name, a.run.model, a.run.family, a.run.method, a.run.dataset, a.run.seed) == (
        "standard", "r20_s0", "resnet20_cifar", "static", "cross_entropy", "cifar10", 0)
    assert (a.evaluation.protocol, a.evaluation.split, a.evaluation.images, a.evaluation.executor) == (
        "standard", "test", 8, "dense")
    assert a.accuracy == reports[0]["accuracy"] and a.macs_mean == a.dense_macs == 40_551_040 and a.macs_std == 0
    assert a.run.config_hash == b.run.config_hash and b.run.seed == 1
    code, out, _ = run_cli(capsys, "report", str(tmp_path))
    assert code == 0
    row = next(line for line in out.splitlines() if line.startswith("| static | resnet20_cifar"))
    acc = [100 * r["accuracy"] for r in reports]
    mean, std = sum(acc) / 2, abs(acc[0] - acc[1]) / math.sqrt(2)
    assert f"| {mean:.2f} ± {std:.2f} |" in row and "| 40.55M | 40.55M |" in row
    assert row.endswith("| 2 |")  # two seeds, one group


def test_bench_checkpoint_save_writes_a_bench_result(cifar_dir, tmp_path, capsys):
    run = untrained_run(tmp_path / "bd_s0", cifar_dir, "blockdrop_resnet32_cifar")
    code, out, err = run_cli(capsys, "bench", "--checkpoint", str(run), "--batch", "2", "--images", "4", "--repeats",
                             "2", "--warmup", "1", "--threads", "1", "--json", "--save")
    assert code == 0, err
    printed = json.loads(out)
    assert f"saved {run / 'results' / 'bench-b2-t1.json'}" in err
    (r,) = load_results(run)
    lat = r.latency
    assert (r.kind, r.run.family, r.evaluation.protocol, r.evaluation.images, r.accuracy) == (
        "bench-b2-t1", "skipping", "bench", 4, None)
    assert (lat.batch, lat.threads, lat.rounds, lat.budget, lat.mode) == (2, 1, 2, None, "checkpoint")
    assert lat.ms_per_image == pytest.approx(printed["dynamic_ms"] / 2)
    assert lat.efficiency == pytest.approx(lat.speedup / lat.mac_ratio)
    assert r.macs_mean == lat.macs_mean == printed["dynamic_macs"] and r.dense_macs == printed["dense_macs"]
    assert r.provenance.threads == 1


def test_bench_save_needs_a_checkpoint(capsys):
    code, _, err = run_cli(capsys, "bench", "resnet20_cifar", "--save")
    assert code == 2 and "--save needs --checkpoint RUN_DIR" in err and len(err.strip().splitlines()) == 1


def test_result_from_bench_of_a_static_model(tmp_path):
    model = create_model("resnet20_cifar")
    config = tiny_config("/data")
    bench = StaticBench(model="resnet20_cifar", batch=8, threads=1, ms=4.0, images_per_s=2000.0, macs=40_551_040)
    r = result_from_bench(tmp_path / "r20", config, model, bench, images=8, input_size=(3, 32, 32), rounds=5)
    assert (r.kind, r.evaluation.executor, r.macs_mean, r.dense_macs, r.latency.ms_per_image) == (
        "bench-b8-t1", "dense", 40_551_040, 40_551_040, 0.5)


def test_bench_save_of_a_static_run_feeds_the_report(cifar_dir, tmp_path, capsys):
    run = untrained_run(tmp_path / "r20_s0", cifar_dir)
    evaluate_run(run, "standard", device="cpu")
    code, out, err = run_cli(capsys, "bench", "--checkpoint", str(run), "--batch", "2", "--images", "2", "--repeats",
                             "2", "--warmup", "1", "--threads", "1", "--json", "--save")
    assert code == 0, err
    bench = load_result(run / "results" / "bench-b2-t1.json")
    assert (bench.latency.mode, bench.latency.executor, bench.latency.baseline, bench.evaluation.images) == (
        "static", "dense", None, 2)
    assert bench.latency.ms_per_image == pytest.approx(json.loads(out)["ms"] / 2)
    code, out, _ = run_cli(capsys, "report", str(run))
    row = next(line for line in out.splitlines() if line.startswith("| static | resnet20_cifar"))
    assert f"| {bench.latency.ms_per_image:.3f} |" in row or f"| {bench.latency.ms_per_image:.2f} |" in row


def test_config_hash_groups_the_seeds_of_runs_that_start_from_the_run_of_their_seed():
    # a sweep starts each seed's run from (distils from, reads targets of) the run of the same seed
    def run(seed, init, targets=None):
        c = tiny_config("/data/a", seed=seed)
        c.train.init_from = init
        if targets is not None:
            c.method.kwargs = {"target_accuracy": targets}
        return config_hash(c)

    assert run(0, "runs/dense20/seed0") == run(2, "runs/dense20/seed2")
    assert run(0, "runs/dense20/s0") == run(1, "runs/dense20/s1")  # ponder sweep's folders
    assert run(0, "runs/dense20/seed0", ["r/b0.3/seed0", 0.5]) == run(3, "runs/dense20/seed3", ["r/b0.3/seed3", 0.5])
    assert run(0, "runs/dense20/seed1") != run(1, "runs/dense20/seed1")  # another seed's run: a real difference
    assert run(0, "runs/dense20/seed0") != run(0, "runs/dense32/seed0")
    assert run(0, "runs/seed0x/w.pth") != run(1, "runs/seed1x/w.pth")  # only whole folder names


def test_budget_points_are_named_by_target_so_seeds_match(tmp_path):
    """Each seed's knob lands elsewhere for the same target: the points are named by the target (and
    matched over seeds by that name); only a model's discrete choices are named by the knob's value."""
    ctx = _ctx(tmp_path, "msdnet_cifar_budgeted", {"n_blocks": 3, "n_channels": 8, "growth_rate": 4, "head_width": 16})

    def report(knob_value: float, by: str) -> dict:
        return {"protocol": "budget", "knob": "threshold", "points_by": by, "dense_macs": 1e8, "points": [
            {"target_macs": 3.5e7, "knob": knob_value, "held_out_macs": 3.5e7, "accuracy": 0.5, "macs_mean": 3.4e7,
             "macs_std": 1e6}]}

    labels = {result_from_report(ctx, "budget", report(v, "target")).points[0].label for v in (0.77, 0.74)}
    assert labels == {"budget 35.00M"}
    assert result_from_report(ctx, "budget", report(0.3, "choice")).points[0].label == "threshold 0.3"
