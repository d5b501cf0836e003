"""Run directories: resolved config, per-epoch metrics, weights and the full training state.

Layout of a run directory::

    config.yaml           the resolved RunConfig (model.kwargs include num_classes)
    metrics.jsonl         one JSON object per finished epoch
    weights.safetensors   the latest model weights (what ``load_run`` and ``ponder eval`` read)
    state.pt              everything needed to resume exactly: model, optimizer, method,
                          grad scaler, epoch/step counters and RNG states (tensors and plain
                          types only, read with ``torch.load(weights_only=True)``)

Every file is written atomically: to a temporary file in the same directory, then
``os.replace``, so a crash mid-write leaves the previous version intact (a temporary file that
a kill left behind is removed when the run starts or resumes). Files get the permissions an
ordinary new file gets (``0666`` less the umask), all of them alike.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn
import yaml

from ponder.config import ConfigError, RunConfig, load_config
from ponder.files import atomic_write, atomic_write_text
from ponder.weights import WEIGHTS_FILE, RunDirError, first_line, read_weights

CONFIG_FILE = "config.yaml"
METRICS_FILE = "metrics.jsonl"
STATE_FILE = "state.pt"
TENSORBOARD_DIR = "tensorboard"
RUN_FILES = (CONFIG_FILE, METRICS_FILE, WEIGHTS_FILE, STATE_FILE)


def remove_stale_temporaries(run_dir: str | Path) -> list[Path]:
    """Remove the temporary files (``.state.pt.*.tmp`` ...) that a kill mid-write left in a run
    directory; returns them. Call only while no process writes to the run."""
    stale = [p for name in RUN_FILES for p in Path(run_dir).glob(f".{name}.*.tmp") if p.is_file()]
    for p in stale:
        p.unlink(missing_ok=True)
    return stale


def save_config(config: RunConfig, path: str | Path) -> None:
    """Write the resolved config as YAML, atomically."""
    atomic_write_text(path, yaml.safe_dump(config.to_dict(), sort_keys=False))


def save_weights(model: nn.Module, path: str | Path) -> None:
    """Write ``model.state_dict()`` (parameters and buffers) to a safetensors file, atomically."""
    from safetensors.torch import save_file

    # clone: safetensors refuses tensors that share storage (tied weights, views)
    state = {k: v.detach().cpu().contiguous().clone() for k, v in model.state_dict().items()}
    atomic_write(path, lambda p: save_file(state, str(p), metadata={"format": "pt"}))


def save_state(state: dict[str, Any], path: str | Path) -> None:
    """``torch.save`` the training state atomically."""
    atomic_write(path, lambda p: torch.save(state, p))


def load_state(path: str | Path, mmap: bool = False) -> dict[str, Any]:
    """Read ``state.pt`` with ``weights_only=True`` (no code can run); errors name the file. ``mmap``: map the
    tensors' storage instead of reading it (for a caller that reads only plain entries: :func:`saved_epoch`)."""
    path = Path(path)
    if not path.is_file():
        raise RunDirError(f"training state {path} does not exist; the run has not finished an epoch yet")
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except Exception as e:
        raise RunDirError(f"training state {path} is corrupt or holds non-tensor objects ({first_line(e)}); "
                          f"start a new run or restore the file") from None


def saved_epoch(path: str | Path) -> int:
    """The number of finished epochs ``state.pt`` records (0 when it has none), without reading its tensors;
    errors as :func:`load_state`."""
    return int(load_state(path, mmap=True).get("epoch", 0))


def append_metrics(run_dir: str | Path, record: dict[str, Any]) -> None:
    """Append one JSON line to ``metrics.jsonl`` (rewritten atomically)."""
    path = Path(run_dir) / METRICS_FILE
    old = path.read_text() if path.is_file() else ""
    atomic_write_text(path, old + json.dumps(record) + "\n")


def read_metrics(run_dir: str | Path) -> list[dict[str, Any]]:
    """Every record of ``metrics.jsonl`` (empty list when there is none)."""
    path = Path(run_dir) / METRICS_FILE
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def truncate_metrics(run_dir: str | Path, epochs_done: int) -> None:
    """Drop records of epochs after ``epochs_done`` (written before a crash that lost their state)."""
    records = [r for r in read_metrics(run_dir) if r.get("epoch", 0) <= epochs_done]
    atomic_write_text(Path(run_dir) / METRICS_FILE, "".join(json.dumps(r) + "\n" for r in records))


# ---------------------------------------------------------------- RNG state as tensors / plain types

def rng_state(generators: dict[str, torch.Generator] | None = None) -> dict[str, Any]:
    """Python, numpy, torch (CPU and CUDA) RNG states plus named generators, as weights_only-safe values."""
    py_version, py_state, py_gauss = random.getstate()
    np_name, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    state: dict[str, Any] = {
        "python": {"version": py_version, "state": torch.tensor(py_state, dtype=torch.int64), "gauss": py_gauss},
        "numpy": {"name": np_name, "keys": torch.from_numpy(np_keys.astype(np.int64)), "pos": int(np_pos),
                  "has_gauss": int(np_has_gauss), "gauss": float(np_gauss)},
        "torch": torch.get_rng_state(),
        "generators": {k: g.get_state() for k, g in (generators or {}).items()},
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any], generators: dict[str, torch.Generator] | None = None) -> None:
    """Restore what :func:`rng_state` captured (generators matched by name)."""
    py = state["python"]
    random.setstate((py["version"], tuple(int(v) for v in py["state"].tolist()), py["gauss"]))
    n = state["numpy"]
    np.random.set_state((n["name"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    for name, g in (generators or {}).items():
        if name in state["generators"]:
            g.set_state(state["generators"][name])


# ---------------------------------------------------------------- reading a finished run

def load_run_config(run_dir: str | Path) -> RunConfig:
    """The resolved config saved in ``run_dir``; missing or invalid files raise :class:`RunDirError`."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise RunDirError(f"run directory {run_dir} does not exist; pass the --out directory of a `ponder train` run")
    try:
        return load_config(run_dir / CONFIG_FILE)
    except ConfigError as e:
        raise RunDirError(f"run directory {run_dir} has no usable {CONFIG_FILE}: {e}") from None


def load_run(run_dir: str | Path, device: str | torch.device = "cpu") -> tuple[nn.Module, RunConfig]:
    """Rebuild the model of a run from ``config.yaml`` and load ``weights.safetensors``.

    Returns ``(model, config)`` with the model in eval mode on ``device``.
    """
    from ponder.registry import create_model

    run_dir = Path(run_dir)
    config = load_run_config(run_dir)
    model = create_model(config.model.name, **config.model.kwargs)
    state = read_weights(run_dir / WEIGHTS_FILE)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise RunDirError(f"weights in {run_dir / WEIGHTS_FILE} do not fit model {config.model.name!r} "
                          f"({first_line(e)}); the config and weights come from different runs") from None
    return model.to(device).eval(), config
