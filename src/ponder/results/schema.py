"""Results as data: the machine-readable result of one evaluation or benchmark of a run.

A result is one :class:`EvalResult`, saved as ``RUN_DIR/results/<kind>.json`` (written atomically)
and read back by :func:`load_results`; ``ponder report`` renders tables and plots from them. The
file is the dataclass as JSON, with ``"schema": 1``. New optional fields may be added within
schema 1 (readers ignore fields they do not know); a change of meaning raises the schema number,
and a reader refuses files with a newer schema than its own.

Units: accuracy is top-1 as a fraction in [0, 1]; MACs are multiply-accumulates of convolutions
and linear layers per image (``MACS_UNIT``; FLOPs = 2 x MACs); latency is wall-clock milliseconds.

Helpers the protocols and ``ponder bench`` call: :func:`result_from_records` (a protocol's per-sample
records), :func:`new_result` (any headline numbers), :func:`point_from_records` (one operating
point), :func:`result_from_bench` / :func:`latency_from_bench` (a ``DynamicBench`` or ``StaticBench``),
:func:`save_result`, :func:`load_result`, :func:`load_results`, :func:`machine_info`.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import math
import os
import platform
import re
import subprocess
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Sequence

from ponder.machine import cpu_name
from ponder.registry import FAMILIES

if TYPE_CHECKING:  # pragma: no cover - typing only
    import torch.nn as nn

    from ponder.bench import DynamicBench, StaticBench
    from ponder.config import RunConfig
    from ponder.evaluate.protocols import EvalContext
    from ponder.evaluate.records import Records

SCHEMA = 1
MACS_UNIT = "conv+linear MACs"
RESULTS_DIR = "results"

# config fields that do not change what a run computes (where it ran, where its data lie) plus the
# seed: runs whose configs differ only in these share a config hash and are grouped over seeds
NOT_HASHED = ("train.seed", "train.device", "train.tensorboard", "data.data_dir", "data.workers",
               "data.eval_batch_size")


class ResultError(ValueError):
    """A result file is missing, unreadable, of a newer schema, or not a ponder result."""


@dataclass
class RunInfo:
    """Which run a result belongs to.

    Attributes:
        name: the run directory's name (e.g. ``msdnet_s0``).
        model: registered model name (``config.model.name``).
        family: ``static`` | ``early_exit`` | ``skipping`` | ``spatial``.
        method: training method (``config.method.name``).
        dataset: ``config.data.dataset`` (``cifar10``, ``imagefolder``, ...).
        seed: ``config.train.seed``.
        config_hash: 12 hex digits of the resolved config without the seed and machine-local fields
            (:func:`config_hash`): runs that differ only by seed share it.
    """

    name: str
    model: str
    family: str
    method: str
    dataset: str
    seed: int
    config_hash: str


@dataclass
class Evaluation:
    """What was evaluated.

    Attributes:
        protocol: the protocol (``standard``, ``anytime``, ``budgeted``, ``skip``, ``spatial``) or ``bench``.
        split: the data split the numbers come from (``test``; ``val`` for held-out figures).
        images: number of images behind ``accuracy`` / ``macs_mean`` (the timed images for ``bench``).
        executor: ``sparse`` | ``masked`` for dynamic models, ``dense`` for static ones.
        input_size: ``[C, H, W]`` of the evaluated images, when known.
        options: the protocol options it ran with (``ponder eval --option``).
    """

    protocol: str
    split: str
    images: int
    executor: str
    input_size: list[int] | None = None
    options: dict[str, Any] = field(default_factory=dict)


@dataclass
class OperatingPoint:
    """One point of an accuracy-vs-cost curve: one exit (anytime), one threshold or one budget.

    Attributes:
        label: how tables and plots name it (``exit 3``, ``threshold 0.5``, ``budget 20.00M``).
        macs_mean: mean MACs per image at this point.
        accuracy: top-1 fraction at this point.
        macs_std: population standard deviation of MACs per image (None when not known).
        knob: the name of the family's native knob that was set (``exit``, ``threshold``, ``q``), if any.
        value: that knob's value.
        budget: the target mean MACs per image given to ``set_budget``, if this point is a budget.
        ms_per_image: measured latency at this point, when it was benchmarked.
    """

    label: str
    macs_mean: float
    accuracy: float
    macs_std: float | None = None
    knob: str | None = None
    value: float | None = None
    budget: float | None = None
    ms_per_image: float | None = None


@dataclass
class Latency:
    """Measured wall-clock time (``ponder bench``): medians over interleaved rounds.

    Attributes:
        mode: ``checkpoint`` (the run's own decisions on test images), ``keep-rate r`` (forced
            decisions) or ``static`` (a model without dynamic parts).
        executor: what was timed: ``sparse`` (real skipping) or ``dense`` (a static model).
        baseline: what it was compared with: ``dense_baseline()``, or None for a static model.
        device: ``cpu`` or the accelerator's name.
        batch: images per forward call.
        threads: torch threads.
        ms_per_batch: median milliseconds per batch.
        ms_per_image: ``ms_per_batch / batch``.
        rounds: number of timed rounds (the median is over them), when known.
        budget: the ``--budget`` the model was set to, or None for its own setting.
        macs_mean: mean MACs per image of the timed images (the MAC ratio's denominator).
        baseline_ms_per_image: the dense baseline's median milliseconds per image.
        speedup: baseline time / timed executor's time.
        speedup_range: ``[lowest, highest]`` speed-up of a single round: the spread over rounds.
        mac_ratio: dense MACs / ``macs_mean``: the ideal speed-up.
        efficiency: ``speedup / mac_ratio`` (1 = time falls exactly with MACs).
        kernels_ms_per_image: the dense network on the sparse executor's own kernels
            (``dense_baseline_kernels()``), where a model has them (SACT).
        speedup_vs_kernels: ``kernels_ms_per_image / ms_per_image``.
        efficiency_vs_kernels: ``speedup_vs_kernels / mac_ratio``.
    """

    mode: str
    executor: str
    baseline: str | None
    device: str
    batch: int
    threads: int
    ms_per_batch: float
    ms_per_image: float
    rounds: int | None = None
    budget: float | None = None
    macs_mean: float | None = None
    baseline_ms_per_image: float | None = None
    speedup: float | None = None
    speedup_range: list[float] | None = None
    mac_ratio: float | None = None
    efficiency: float | None = None
    kernels_ms_per_image: float | None = None
    speedup_vs_kernels: float | None = None
    efficiency_vs_kernels: float | None = None


@dataclass
class Provenance:
    """Where and with what a result was produced.

    Attributes:
        cpu: CPU model name.
        cores: logical CPU cores of the machine.
        os: operating system (``platform.platform()``).
        python: Python version.
        torch: torch version.
        ponder: ponder version.
        commit: git commit of the ponder checkout, ``unknown`` when ponder is not in a git checkout.
        dirty: whether ``src/ponder`` had uncommitted changes (None when unknown).
        threads: torch threads in use.
        device: ``cpu`` or the accelerator's name.
        timestamp: when the result was made, ISO 8601 in UTC.
    """

    cpu: str
    cores: int
    os: str
    python: str
    torch: str
    ponder: str
    commit: str
    dirty: bool | None
    threads: int
    device: str
    timestamp: str


@dataclass
class EvalResult:
    """The result of one evaluation or benchmark of one run (``RUN_DIR/results/<kind>.json``).

    Attributes:
        kind: the file's name without ``.json``: the protocol (``standard``, ``budgeted``, ...), with its
            options when it had any (``spatial-image_size352``), or ``bench-b64-t2[-budget...]``.
        run: which run (:class:`RunInfo`).
        evaluation: what was evaluated (:class:`Evaluation`).
        provenance: machine, versions, commit, threads, time (:class:`Provenance`).
        accuracy: top-1 fraction of the headline setting (the model as saved), None for a pure curve
            or a benchmark.
        macs_mean: mean MACs per image of the headline setting.
        macs_std: population standard deviation of MACs per image.
        dense_macs: MACs per image of the dense baseline (the static model itself, the backbone with
            every block, the multi-exit network up to its last exit).
        points: operating points for curves (one per exit, threshold or budget).
        latency: measured latency (:class:`Latency`) when a benchmark was run.
        block_usage: block-skipping models: the fraction of the images that ran each block (the gates'
            open rates per layer, in block order) at the headline setting; None otherwise.
        macs_unit: always ``conv+linear MACs``.
        schema: the file format's version (:data:`SCHEMA`).
    """

    kind: str
    run: RunInfo
    evaluation: Evaluation
    provenance: Provenance
    accuracy: float | None = None
    macs_mean: float | None = None
    macs_std: float | None = None
    dense_macs: float | None = None
    points: list[OperatingPoint] = field(default_factory=list)
    latency: Latency | None = None
    block_usage: list[float] | None = None
    macs_unit: str = MACS_UNIT
    schema: int = SCHEMA

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready dict (``schema`` first)."""
        d = dataclasses.asdict(self)
        return {"schema": d.pop("schema"), **d}

    @staticmethod
    def from_dict(data: dict[str, Any], where: str = "result") -> "EvalResult":
        """Inverse of :meth:`to_dict`; raises :class:`ResultError` naming ``where`` for bad input."""
        if not isinstance(data, dict) or "schema" not in data:
            raise ResultError(f"{where} is not a ponder result (no 'schema' field); give files written by "
                              f"`ponder eval` or `ponder bench --save`")
        schema = data["schema"]
        if not isinstance(schema, int) or schema < 1:
            raise ResultError(f"{where} has an invalid schema {schema!r}; it is not a ponder result file")
        if schema > SCHEMA:
            raise ResultError(f"{where} has schema {schema}, newer than this ponder reads (schema {SCHEMA}); "
                              f"upgrade ponder to read it")
        kw = _fields(EvalResult, data, where)
        kw["run"] = RunInfo(**_fields(RunInfo, kw["run"], f"{where}: run"))
        kw["evaluation"] = Evaluation(**_fields(Evaluation, kw["evaluation"], f"{where}: evaluation"))
        kw["provenance"] = Provenance(**_fields(Provenance, kw["provenance"], f"{where}: provenance"))
        if kw.get("latency") is not None:
            kw["latency"] = Latency(**_fields(Latency, kw["latency"], f"{where}: latency"))
        kw["points"] = [OperatingPoint(**_fields(OperatingPoint, p, f"{where}: points[{i}]"))
                        for i, p in enumerate(kw.get("points") or [])]
        return EvalResult(**kw)


def _fields(cls: type, data: Any, where: str) -> dict[str, Any]:
    """The entries of ``data`` that are fields of ``cls``; a missing required field is an error."""
    if not isinstance(data, dict):
        raise ResultError(f"{where} must be a JSON object, got {type(data).__name__}")
    out = {}
    for f in dataclasses.fields(cls):
        if f.name in data:
            out[f.name] = data[f.name]
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise ResultError(f"{where} lacks the field {f.name!r}; the file is damaged or not a ponder result")
    return out


# ---------------------------------------------------------------- files

def results_dir(run_dir: str | Path) -> Path:
    """``RUN_DIR/results``."""
    return Path(run_dir) / RESULTS_DIR


def save_result(run_dir: str | Path, result: EvalResult) -> Path:
    """Write ``result`` to ``RUN_DIR/results/<kind>.json`` atomically (replacing an older one); returns the path."""
    from ponder.files import atomic_write_text

    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._=+-]*", result.kind):
        raise ValueError(f"result kind {result.kind!r} is not a plain file name; use letters, digits and ._=+-")
    folder = results_dir(run_dir)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{result.kind}.json"
    text = json.dumps(_json_safe(result.to_dict()), indent=1, allow_nan=False)
    atomic_write_text(path, text + "\n")
    return path


def load_result(path: str | Path) -> EvalResult:
    """Read one result file (:class:`ResultError` when it is unreadable or of a newer schema)."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise ResultError(f"result file {path} does not exist") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ResultError(f"result file {path} is not readable JSON ({e}); "
                          f"re-run the evaluation that wrote it") from None
    return EvalResult.from_dict(data, where=str(path))


def load_results(run_dir: str | Path) -> list[EvalResult]:
    """Every result of a run (``RUN_DIR/results/*.json``, sorted by kind); empty when it has none."""
    return [load_result(p) for p in sorted(results_dir(run_dir).glob("*.json"))]


def _json_safe(value: Any) -> Any:
    """``value`` with NaN / infinite floats replaced by None (JSON has no such numbers)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value


# ---------------------------------------------------------------- identity and provenance

def config_hash(config: "RunConfig") -> str:
    """12 hex digits of SHA-256 over the resolved config without the seed and machine-local fields.

    A path to the run of the same seed (a sweep's ``train.init_from``, teacher or target runs: a folder
    ``seed<N>`` or ``s<N>`` with ``N`` this run's seed) counts as the seed too, so the seeds of such a run group.
    """
    from ponder.config import flat_config  # the dotted-key view the resume check compares too

    seed = int(config.train.seed)
    kept = {k: _without_own_seed(v, seed) for k, v in flat_config(config.to_dict()).items() if k not in NOT_HASHED}
    raw = json.dumps(kept, sort_keys=True, default=str)
    return hashlib.sha256(raw.encode()).hexdigest()[:12]


_SEED_FOLDER = re.compile(r"(?:(?<=[/\\])|^)(seed|s)(\d+)(?=[/\\]|$)")


def _without_own_seed(value: Any, seed: int) -> Any:
    """``value`` with every path folder named ``seed<seed>`` / ``s<seed>`` written ``seed*`` / ``s*`` (in strings, and
    in the lists and dicts holding them); other values as they are."""
    if isinstance(value, str):
        return _SEED_FOLDER.sub(lambda m: m.group(1) + "*" if int(m.group(2)) == seed else m.group(0), value)
    if isinstance(value, (list, tuple)):
        return [_without_own_seed(v, seed) for v in value]
    if isinstance(value, dict):
        return {k: _without_own_seed(v, seed) for k, v in value.items()}
    return value


def model_family(model: "nn.Module") -> str:
    """``static`` | ``early_exit`` | ``skipping`` | ``spatial``: the family a ponder model declares."""
    family = getattr(getattr(model, "module", model), "family", "static")  # (DDP wraps the model)
    return family if family in FAMILIES else "static"


def run_info(run_dir: str | Path, config: "RunConfig", model: "nn.Module") -> RunInfo:
    """Identity of the run in ``run_dir`` with ``config``; the family is read from ``model``."""
    return RunInfo(name=Path(run_dir).resolve().name, model=config.model.name, family=model_family(model),
                   method=config.method.name, dataset=config.data.dataset, seed=int(config.train.seed),
                   config_hash=config_hash(config))


@functools.lru_cache(maxsize=1)
def _git_state() -> tuple[str, bool | None]:
    """(commit, dirty) of the git checkout ponder is imported from, or ``("unknown", None)``."""
    package = Path(__file__).resolve().parent

    def git(*args: str) -> subprocess.CompletedProcess | None:
        try:
            return subprocess.run(["git", *args], cwd=package, capture_output=True, text=True, timeout=10)
        except (OSError, subprocess.SubprocessError):
            return None

    tracked = git("ls-files", "--error-unmatch", "__init__.py")  # ponder itself tracked by this checkout?
    head = git("rev-parse", "HEAD") if tracked is not None and tracked.returncode == 0 else None
    if head is None or head.returncode != 0:
        return "unknown", None
    status = git("status", "--porcelain", "--untracked-files=no", "--", ".")
    dirty = None if status is None or status.returncode != 0 else bool(status.stdout.strip())
    return head.stdout.strip(), dirty


def _device_name(device: Any) -> str:
    import torch

    dev = torch.device(device)
    if dev.type == "cuda" and torch.cuda.is_available():
        return torch.cuda.get_device_name(dev)
    return dev.type


def machine_info(threads: int | None = None, device: Any = "cpu") -> Provenance:
    """Provenance of a result made now: CPU, cores, OS, versions, git commit, ``threads`` (default:
    torch's current number), ``device`` (``cpu``, ``cuda:0``, ...) and the UTC timestamp."""
    import torch

    from ponder.version import __version__

    commit, dirty = _git_state()
    return Provenance(cpu=cpu_name(), cores=os.cpu_count() or 0, os=platform.platform(),
                      python=platform.python_version(), torch=torch.__version__, ponder=__version__,
                      commit=commit, dirty=dirty, threads=int(threads or torch.get_num_threads()),
                      device=_device_name(device), timestamp=datetime.now(timezone.utc).isoformat(timespec="seconds"))


# ---------------------------------------------------------------- building results

def result_kind(protocol: str, options: dict[str, Any] | None = None) -> str:
    """File name of a protocol's result: the protocol, plus its options when it had any
    (``no_cache`` ignored): ``standard``, ``spatial-image_size352``."""
    parts = [protocol] + [f"{k}{v}" for k, v in sorted((options or {}).items()) if k != "no_cache"]
    return re.sub(r"[^A-Za-z0-9._=+-]+", "_", "-".join(parts)).strip("_")


def dense_macs_of(model: "nn.Module", input_size: Sequence[int]) -> int:
    """MACs per image of a dynamic model's dense baseline, or of a static model itself."""
    model = getattr(model, "module", model)
    if model.is_dynamic:
        return model.dense_macs(tuple(input_size))
    return model.ledger(tuple(input_size)).total


def _executor(model: "nn.Module") -> str:
    from ponder.nn.executor import get_executor

    return get_executor(model) or "dense"


def _number(value: Any) -> float | None:
    """A finite float, or None (for NaN / missing)."""
    if value is None:
        return None
    value = float(value)
    return value if math.isfinite(value) else None


def new_result(run_dir: str | Path, config: "RunConfig", model: "nn.Module", *, kind: str, protocol: str,
               images: int, accuracy: float | None, macs_mean: float | None, macs_std: float | None,
               points: Iterable[OperatingPoint] = (), dense_macs: float | None = None, split: str = "test",
               input_size: Sequence[int] | None = None, options: dict[str, Any] | None = None,
               latency: Latency | None = None, device: Any = "cpu", threads: int | None = None,
               block_usage: Sequence[float] | None = None) -> EvalResult:
    """A result from headline numbers. ``dense_macs`` defaults to :func:`dense_macs_of` at ``input_size``
    (default: the model's ``default_input_size``); the executor is read from ``model``."""
    model = getattr(model, "module", model)
    size = list(input_size or getattr(model, "default_input_size", ()) or []) or None
    if dense_macs is None and size is not None:
        dense_macs = dense_macs_of(model, size)
    return EvalResult(
        kind=kind, run=run_info(run_dir, config, model),
        evaluation=Evaluation(protocol=protocol, split=split, images=int(images), executor=_executor(model),
                              input_size=size, options=dict(options or {})),
        provenance=machine_info(threads, device), accuracy=_number(accuracy), macs_mean=_number(macs_mean),
        macs_std=_number(macs_std), dense_macs=_number(dense_macs), points=list(points), latency=latency,
        block_usage=None if block_usage is None else [float(u) for u in block_usage])


def point_from_records(label: str, records: "Records", *, knob: str | None = None, value: float | None = None,
                       budget: float | None = None) -> OperatingPoint:
    """One operating point from the per-sample records (``Records``) evaluated at it."""
    s = records.summary()
    return OperatingPoint(label=label, macs_mean=float(s["macs_mean"]), accuracy=float(s["accuracy"]),
                          macs_std=float(s["macs_std"]), knob=knob, value=None if value is None else float(value),
                          budget=None if budget is None else float(budget))


def result_from_records(ctx: "EvalContext", protocol: str, records: "Records", *, kind: str | None = None,
                        points: Iterable[OperatingPoint] = (), dense_macs: float | None = None, split: str = "test",
                        input_size: Sequence[int] | None = None) -> EvalResult:
    """A protocol's result: headline accuracy and MACs mean / std from ``records`` (``Records``, one entry
    per test image), the run's identity from ``ctx``, ``kind`` defaulting to :func:`result_kind`."""
    s = records.summary()
    return new_result(ctx.run_dir, ctx.config, ctx.model, kind=kind or result_kind(protocol, ctx.options),
                      protocol=protocol, images=int(s["n"]), accuracy=s["accuracy"], macs_mean=s["macs_mean"],
                      macs_std=s["macs_std"], points=points, dense_macs=dense_macs, split=split,
                      input_size=input_size, options=ctx.options, device=ctx.device)


def latency_from_bench(bench: "StaticBench | DynamicBench", *, rounds: int | None = None,
                       budget: float | None = None, device: Any = "cpu") -> Latency:
    """The latency part of a result from ``ponder.bench``'s ``DynamicBench`` or ``StaticBench``."""
    from ponder.bench import DynamicBench

    if not isinstance(bench, DynamicBench):
        return Latency(mode="static", executor="dense", baseline=None, device=_device_name(device),
                       batch=bench.batch, threads=bench.threads, ms_per_batch=bench.ms,
                       ms_per_image=bench.ms / bench.batch, rounds=rounds, macs_mean=float(bench.macs))
    b = bench
    return Latency(
        mode=b.mode, executor="sparse", baseline="dense_baseline()", device=_device_name(device), batch=b.batch,
        threads=b.threads, ms_per_batch=b.dynamic_ms, ms_per_image=b.dynamic_ms / b.batch, rounds=rounds,
        budget=None if budget is None else float(budget), macs_mean=b.dynamic_macs,
        baseline_ms_per_image=b.dense_ms / b.batch, speedup=b.speedup, speedup_range=list(b.speedup_range),
        mac_ratio=b.mac_ratio, efficiency=b.efficiency,
        kernels_ms_per_image=None if b.dense_kernels_ms is None else b.dense_kernels_ms / b.batch,
        speedup_vs_kernels=b.speedup_vs_kernels, efficiency_vs_kernels=b.efficiency_vs_kernels)


def bench_kind(batch: int, threads: int, budget: float | None = None) -> str:
    """``bench-b64-t2``, with ``-budget<value>`` when the model was set to a budget (``-budget25000000``)."""
    if budget is None:
        return f"bench-b{batch}-t{threads}"
    value = str(int(budget)) if float(budget).is_integer() else f"{budget:g}".replace("+", "")
    return f"bench-b{batch}-t{threads}-budget{value}"


def result_from_bench(run_dir: str | Path, config: "RunConfig", model: "nn.Module",
                      bench: "StaticBench | DynamicBench", *, images: int, input_size: Sequence[int],
                      rounds: int | None = None, budget: float | None = None, kind: str | None = None,
                      device: Any = "cpu") -> EvalResult:
    """A benchmark's result (``ponder bench --checkpoint RUN --save``): latency, and the MACs of the
    ``images`` timed images of size ``input_size``; no accuracy."""
    from ponder.bench import DynamicBench

    lat = latency_from_bench(bench, rounds=rounds, budget=budget, device=device)
    dynamic = isinstance(bench, DynamicBench)
    result = new_result(
        run_dir, config, model, kind=kind or bench_kind(lat.batch, lat.threads, budget), protocol="bench",
        images=images, accuracy=None, macs_mean=lat.macs_mean, macs_std=bench.dynamic_macs_std if dynamic else 0.0,
        dense_macs=bench.dense_macs if dynamic else bench.macs, input_size=input_size, latency=lat, device=device,
        threads=lat.threads, options={} if budget is None else {"budget": float(budget)})
    result.evaluation.executor = lat.executor
    return result
