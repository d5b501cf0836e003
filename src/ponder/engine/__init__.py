"""Training engine: ``train(config, out_dir)``, ``load_run(run_dir)``, ``evaluate_run(run_dir)``.

A run directory holds ``config.yaml`` (resolved), ``metrics.jsonl``, ``weights.safetensors``
and ``state.pt`` (see :mod:`ponder.engine.checkpoint`). ``train`` works unchanged under
``torchrun`` (one process per device, DDP).
"""

from __future__ import annotations

import copy
import warnings
from pathlib import Path
from typing import Any

import torch

from ponder.config import DataConfig, RunConfig
from ponder.engine.checkpoint import (CONFIG_FILE, METRICS_FILE, STATE_FILE, WEIGHTS_FILE, RunDirError,
                                      load_init_weights, load_run, load_run_config)
from ponder.engine.distributed import DistInfo, init_distributed, resolve_device, shutdown_distributed
from ponder.engine.context import TrainContext
from ponder.engine.trainer import NonFiniteLossError, NonFiniteWeightsError, Trainer, seed_everything

__all__ = ["DistInfo", "NonFiniteLossError", "NonFiniteWeightsError", "RunDirError", "TrainContext", "Trainer",
           "evaluate_run", "load_run", "resolve_config", "seed_everything", "train"]

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


def _flat(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict) and k != "kwargs":
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = list(v) if isinstance(v, tuple) else v
    return out


def _check_resume_config(saved: RunConfig, given: RunConfig, run_dir: Path) -> None:
    a, b = _flat(saved.to_dict()), _flat(given.to_dict())
    changed = sorted(k for k in a.keys() | b.keys() if a.get(k) != b.get(k) and k not in _RESUMABLE_CHANGES)
    if changed:
        raise RunDirError(f"cannot resume {run_dir}: the config differs from its {CONFIG_FILE} in {', '.join(changed)}; "
                          f"resume with the saved config (only {', '.join(sorted(_RESUMABLE_CHANGES))} may change)")


def _prepare_run_dir(out_dir: Path, resume: bool) -> None:
    if resume:
        if not (out_dir / STATE_FILE).is_file():
            raise RunDirError(f"cannot resume {out_dir}: it has no {STATE_FILE} (no finished epoch to continue from)")
        return
    existing = [f for f in (STATE_FILE, WEIGHTS_FILE, METRICS_FILE) if (out_dir / f).exists()]
    if existing:
        raise RunDirError(f"run directory {out_dir} already holds a training run ({existing[0]}); "
                          f"pass --resume {out_dir} to continue it or choose another --out")
    out_dir.mkdir(parents=True, exist_ok=True)


def train(config: RunConfig | None, out_dir: str | Path | None, resume: str | Path | None = None,
          data_dir: str | None = None, verbose: bool = True) -> Path:
    """Train ``config`` into the run directory ``out_dir`` and return its path.

    With ``resume=RUN_DIR`` training continues exactly from ``RUN_DIR/state.pt`` (``config``
    may be None to use ``RUN_DIR/config.yaml``; ``out_dir`` may be None or must equal it).
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
    elif out_dir is None or config is None:
        raise ValueError("train needs a config and an output directory (or resume=RUN_DIR)")
    else:
        run_dir = Path(out_dir)

    owns_group = not torch.distributed.is_initialized()
    info, device = init_distributed(config.train.device)
    try:
        if info.is_main:
            _prepare_run_dir(run_dir, resume is not None)
        seed = config.train.seed
        seed_everything(seed + info.rank)
        data_cfg = data_config_for(config, data_dir)
        bundle = build_datasets(data_cfg, seed)
        config = resolve_config(config, bundle.num_classes, data_cfg.data_dir)
        if resume is not None:
            _check_resume_config(saved, config, run_dir)
        if info.is_main:
            config.save(run_dir / CONFIG_FILE)
        train_loader, val_loader, test_loader = build_loaders(bundle, data_cfg, seed, distributed=info.enabled)
        model = create_model(config.model.name, **config.model.kwargs)
        if config.train.init_from and resume is None:
            missing, unexpected = load_init_weights(model, config.train.init_from)
            if info.is_main and (missing or unexpected):
                warnings.warn(f"train.init_from {config.train.init_from}: {len(missing)} missing keys "
                              f"{missing[:5]}, {len(unexpected)} unexpected keys {unexpected[:5]}", stacklevel=2)
        model = model.to(device)
        method = create_method(config.method.name, model, **config.method.kwargs)
        trainer = Trainer(config, model, method, train_loader, test_loader=test_loader, val_loader=val_loader,
                          run_dir=run_dir, device=device, dist=info, verbose=verbose)
        if resume is not None:
            trainer.resume(run_dir)
        trainer.fit()
    finally:
        if info.enabled and owns_group:
            shutdown_distributed()
    return run_dir


def evaluate_run(run_dir: str | Path, protocol: str = "standard", data_dir: str | None = None,
                 out_dir: str | Path | None = None, options: dict[str, Any] | None = None,
                 device: str = "auto") -> dict:
    """Load a run's model and evaluate it with a registered protocol (results also written to ``out_dir``).

    Data come from the run's data config (eval transforms for test and the held-out val split);
    ``data_dir`` overrides its folder; ``out_dir`` defaults to the run dir.
    """
    from ponder.data import build_datasets, build_loaders
    from ponder.evaluate.protocols import EvalContext, get_protocol

    fn = get_protocol(protocol)
    run_dir = Path(run_dir)
    dev = resolve_device(device)
    model, config = load_run(run_dir, device=dev)
    data_cfg = data_config_for(config, data_dir)
    bundle = build_datasets(data_cfg, config.train.seed)
    _, val_loader, test_loader = build_loaders(bundle, data_cfg, config.train.seed, distributed=False)
    ctx = EvalContext(model=model, config=config, run_dir=run_dir, out_dir=Path(out_dir) if out_dir else run_dir,
                      test_loader=test_loader, val_loader=val_loader, device=dev, options=dict(options or {}))
    with torch.no_grad():
        return fn(ctx)

