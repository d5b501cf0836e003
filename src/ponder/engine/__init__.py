"""Training engine: ``train(config, out_dir)``, ``load_run(run_dir)``, ``evaluate_run(run_dir)``.

A run directory holds ``config.yaml`` (resolved), ``metrics.jsonl``, ``weights.safetensors``
and ``state.pt`` (see :mod:`ponder.engine.checkpoint`). ``train`` works unchanged under
``torchrun`` (one process per device, DDP).
"""

from __future__ import annotations

import copy
import shutil
import warnings
from pathlib import Path
from typing import Any, Callable

import torch

from ponder.config import ConfigError, DataConfig, RunConfig, coerce_kwargs, flat_config, validate
from ponder.engine.checkpoint import (CONFIG_FILE, METRICS_FILE, STATE_FILE, TENSORBOARD_DIR, load_run,
                                      load_run_config, remove_stale_temporaries, save_config)
from ponder.engine.context import TrainContext
from ponder.engine.distributed import DistInfo, barrier, init_distributed, resolve_device, shutdown_distributed
from ponder.engine.trainer import NonFiniteLossError, NonFiniteWeightsError, Trainer, seed_everything
from ponder.weights import WEIGHTS_FILE, RunDirError, first_line, load_init_weights

__all__ = ["DistInfo", "NonFiniteLossError", "NonFiniteWeightsError", "RunDirError", "TrainContext", "Trainer",
           "check_run_config", "evaluate_run", "load_run", "load_run_with_data", "resolve_config", "seed_everything",
           "train"]

# fields that may differ between a run's saved config and the one it is resumed with
_RESUMABLE_CHANGES = {"train.epochs", "train.device", "train.tensorboard", "data.data_dir", "data.workers",
                      "data.eval_batch_size"}


def data_config_for(config: RunConfig, data_dir: str | Path | None = None) -> DataConfig:
    """A copy of ``config.data``, with ``data_dir`` in place of the recipe's folder when given."""
    data_cfg = copy.deepcopy(config.data)
    if data_dir is not None:
        data_cfg.data_dir = str(data_dir)
    return data_cfg


def resolve_config(config: RunConfig, num_classes: int, data_dir: str | None = None) -> RunConfig:
    """A copy of ``config`` with ``data.data_dir`` (absolute) and ``model.kwargs.num_classes`` filled in."""
    config = copy.deepcopy(config)
    if data_dir is not None:
        config.data.data_dir = str(Path(data_dir).expanduser().resolve())
    config.model.kwargs.setdefault("num_classes", num_classes)
    return config


def _check_resume_config(saved: RunConfig, given: RunConfig, run_dir: Path) -> None:
    a, b = flat_config(saved.to_dict()), flat_config(given.to_dict())
    changed = sorted(k for k in a.keys() | b.keys() if a.get(k) != b.get(k) and k not in _RESUMABLE_CHANGES)
    if changed:
        raise RunDirError(f"cannot resume {run_dir}: the config differs from its {CONFIG_FILE} in {', '.join(changed)}; "
                          f"resume with the saved config (only {', '.join(sorted(_RESUMABLE_CHANGES))} may change)")


def check_run_config(config: RunConfig) -> RunConfig:
    """Check ``config`` before anything runs: types and ranges of every field (coerced in place,
    e.g. YAML 1.1's ``1e6`` string to a float), the model name, and the method's options against
    its signature. Raises :class:`ConfigError` (or ``UnknownModelError`` / ``ValueError`` for
    unknown names) with one sentence; returns ``config``."""
    from ponder.methods.base import method_class
    from ponder.registry import create_model, list_models

    validate(config)
    if config.model.name not in list_models():
        create_model(config.model.name)  # raises UnknownModelError with suggestions
    cls = method_class(config.method.name)
    config.method.kwargs = coerce_kwargs(cls.__init__, dict(config.method.kwargs), "method.kwargs", skip=2)
    return config


def model_image_size(config: RunConfig) -> int:
    """The side of the square images ``config``'s model is built for (its ``default_input_size``;
    224 for a model that does not say), e.g. 32 for a CIFAR network trained on an image folder."""
    from ponder.data.datasets import DEFAULT_IMAGE_SIZE
    from ponder.registry import create_model

    model = _built("model", config.model.name, lambda: create_model(config.model.name, **config.model.kwargs))
    size = getattr(model, "default_input_size", None)
    return int(size[-1]) if size else DEFAULT_IMAGE_SIZE


def _built(what: str, name: str, build: Callable[[], Any]) -> Any:
    """``build()``, with a TypeError about its keyword arguments turned into a :class:`ConfigError`."""
    try:
        return build()
    except TypeError as e:
        if "argument" not in str(e):
            raise
        raise ConfigError(f"{what}.kwargs do not fit {what} {name!r} ({first_line(e)}); "
                          f"check the recipe's {what}.kwargs") from None


def _check_run_dir(out_dir: Path, resume: bool, overwrite: bool) -> None:
    """Refuse a run directory that cannot be used as asked, saying the way forward; creates nothing."""
    has_state = (out_dir / STATE_FILE).is_file()
    if resume:
        if not has_state:
            raise RunDirError(f"cannot resume {out_dir}: it has no {STATE_FILE} (it stopped before its first epoch "
                              f"finished); start it again from scratch with: ponder train {out_dir / CONFIG_FILE} "
                              f"--out {out_dir} --overwrite")
        return
    existing = [f for f in (STATE_FILE, WEIGHTS_FILE, METRICS_FILE) if (out_dir / f).exists()]
    if existing and not overwrite:
        way = (f"pass --resume {out_dir} to continue it, --overwrite to start it again from scratch" if has_state else
               "it has no finished epoch to resume; pass --overwrite to start it again from scratch")
        raise RunDirError(f"run directory {out_dir} already holds a training run ({existing[0]}); {way}, "
                          f"or choose another --out")


def _prepare_run_dir(out_dir: Path, resume: bool, overwrite: bool) -> None:
    """Create the run directory (rank 0): with ``overwrite`` an earlier run's files go first;
    temporary files that a killed write left behind are removed."""
    out_dir.mkdir(parents=True, exist_ok=True)
    if overwrite and not resume:
        for name in (STATE_FILE, WEIGHTS_FILE, METRICS_FILE, CONFIG_FILE):
            (out_dir / name).unlink(missing_ok=True)
        shutil.rmtree(out_dir / TENSORBOARD_DIR, ignore_errors=True)
    remove_stale_temporaries(out_dir)


def train(config: RunConfig | None, out_dir: str | Path | None, resume: str | Path | None = None,
          data_dir: str | None = None, verbose: bool = True, overwrite: bool = False) -> Path:
    """Train ``config`` into the run directory ``out_dir`` and return its path.

    With ``resume=RUN_DIR`` training continues exactly from ``RUN_DIR/state.pt`` (``config``
    may be None to use ``RUN_DIR/config.yaml``; ``out_dir`` may be None or must equal it).
    ``overwrite=True`` replaces a run already in ``out_dir``. The config, the data and the
    model and method are all checked before the run directory is created or changed.
    Under ``torchrun`` (``WORLD_SIZE > 1``) every process calls this; rank 0 writes files. The
    process group is joined here (and left at the end) unless the caller has already joined it.
    """
    from ponder.data import build_datasets, build_loaders
    from ponder.methods.base import create_method
    from ponder.registry import create_model

    if resume is not None:
        run_dir = Path(resume)
        if out_dir is not None and Path(out_dir).resolve() != run_dir.resolve():
            raise RunDirError(f"--out {out_dir} and --resume {resume} differ; a resumed run continues in its own directory")
        saved = load_run_config(run_dir)
        if config is None:
            config = saved
        elif config.data.data_dir is None and data_dir is None:  # the recipe names no folder: the run's own
            config = copy.deepcopy(config)
            config.data.data_dir = saved.data.data_dir
    elif out_dir is None or config is None:
        raise ValueError("train needs a config and an output directory (or resume=RUN_DIR)")
    else:
        run_dir = Path(out_dir)
    config = check_run_config(copy.deepcopy(config))
    _check_run_dir(run_dir, resume is not None, overwrite)

    owns_group = not torch.distributed.is_initialized()
    info, device = init_distributed(config.train.device)
    try:
        seed = config.train.seed
        seed_everything(seed + info.rank)
        if config.data.dataset == "imagefolder" and config.data.image_size is None:
            config.data.image_size = model_image_size(config)
        data_cfg = data_config_for(config, data_dir)
        bundle = build_datasets(data_cfg, seed)
        config = resolve_config(config, bundle.num_classes, data_cfg.data_dir)
        if resume is not None:
            _check_resume_config(saved, config, run_dir)
        train_loader, val_loader, test_loader = build_loaders(bundle, data_cfg, seed, distributed=info.enabled)
        model = _built("model", config.model.name, lambda: create_model(config.model.name, **config.model.kwargs))
        if config.train.init_from and resume is None:
            missing, unexpected = load_init_weights(model, config.train.init_from)
            if info.is_main and (missing or unexpected):
                warnings.warn(f"train.init_from {config.train.init_from}: {len(missing)} missing keys "
                              f"{missing[:5]}, {len(unexpected)} unexpected keys {unexpected[:5]}", stacklevel=2)
        model = model.to(device)
        method = _built("method", config.method.name,
                        lambda: create_method(config.method.name, model, **config.method.kwargs))
        trainer = Trainer(config, model, method, train_loader, test_loader=test_loader, val_loader=val_loader,
                          run_dir=run_dir, device=device, dist=info, verbose=verbose)
        if info.is_main:
            _prepare_run_dir(run_dir, resume is not None, overwrite)
            save_config(config, run_dir / CONFIG_FILE)
        barrier()
        if resume is not None:
            trainer.resume(run_dir)
        trainer.fit()
    finally:
        if info.enabled and owns_group:
            shutdown_distributed()
    return run_dir


def load_run_with_data(run_dir: str | Path, data_dir: str | Path | None = None,
                       device: str | torch.device = "cpu") -> tuple[torch.nn.Module, RunConfig, Any]:
    """A run's model (eval mode), config and data bundle; the model's ``default_input_size`` becomes the size
    of the run's images (e.g. 16 px digits), so its costs and budgets are counted at what it sees."""
    from ponder.data import build_datasets

    model, config = load_run(run_dir, device=device)
    bundle = build_datasets(data_config_for(config, data_dir), config.train.seed)
    model.default_input_size = tuple(bundle.input_size)
    return model, config, bundle


def evaluate_run(run_dir: str | Path, protocol: str = "standard", data_dir: str | None = None,
                 out_dir: str | Path | None = None, options: dict[str, Any] | None = None,
                 device: str = "auto") -> dict:
    """Load a run's model and evaluate it with a registered protocol (its files written to ``out_dir``).

    Data come from the run's data config (eval transforms for test and the held-out val split);
    ``data_dir`` overrides its folder; ``out_dir`` defaults to ``run_dir/eval``. Besides the protocol's own
    files, the result is saved as data in ``run_dir/results/<protocol>.json`` (:mod:`ponder.results`).
    """
    from ponder.data import build_loaders
    from ponder.evaluate.protocols import EvalContext, get_protocol

    fn = get_protocol(protocol)
    run_dir = Path(run_dir)
    dev = resolve_device(device)
    model, config, bundle = load_run_with_data(run_dir, data_dir, device=dev)
    data_cfg = data_config_for(config, data_dir)
    _, val_loader, test_loader = build_loaders(bundle, data_cfg, config.train.seed, distributed=False)
    ctx = EvalContext(model=model, config=config, run_dir=run_dir, out_dir=Path(out_dir) if out_dir else run_dir / "eval",
                      test_loader=test_loader, val_loader=val_loader, device=dev, options=dict(options or {}))
    with torch.no_grad():
        report = fn(ctx)
    from ponder.results import result_from_report, save_result

    save_result(run_dir, result_from_report(ctx, protocol, report))  # results belong to the run, whatever out_dir
    return report

