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
import os
import random
import tempfile
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.nn as nn
import yaml

from ponder.config import ConfigError, RunConfig, load_config

CONFIG_FILE = "config.yaml"
METRICS_FILE = "metrics.jsonl"
WEIGHTS_FILE = "weights.safetensors"
STATE_FILE = "state.pt"
TENSORBOARD_DIR = "tensorboard"
RUN_FILES = (CONFIG_FILE, METRICS_FILE, WEIGHTS_FILE, STATE_FILE)


class RunDirError(ValueError):
    """A run directory is missing, incomplete or holds a corrupt file."""


def first_line(error: BaseException) -> str:
    """The first line of an exception's message (its type name when the message is empty)."""
    lines = str(error).strip().splitlines()
    return lines[0] if lines else type(error).__name__


def _new_file_mode() -> int:
    """``0666`` less the process umask: the mode ``open()`` gives a new file."""
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


def atomic_write(path: str | Path, write: Callable[[Path], None]) -> None:
    """Call ``write(tmp_path)`` on a temporary file beside ``path``, then rename it over ``path``.

    If ``write`` raises, the temporary file is removed and ``path`` is left untouched. The file
    gets the mode of a newly created file (not ``mkstemp``'s private ``0600``).
    """
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(Path(tmp))
        os.chmod(tmp, _new_file_mode())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write(path, lambda p: p.write_text(text))


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


def read_weights(path: str | Path, device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    """Tensors of a safetensors file; a missing or corrupt file raises :class:`RunDirError`."""
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise RunDirError(f"weights file {path} does not exist; train the run first or pass the right directory")
    try:
        return load_file(str(path), device=str(device))
    except Exception as e:  # safetensors raises its own error types for truncated / malformed files
        raise RunDirError(f"weights file {path} is corrupt or not a safetensors file ({e}); re-train or restore it") from None


def save_state(state: dict[str, Any], path: str | Path) -> None:
    """``torch.save`` the training state atomically."""
    atomic_write(path, lambda p: torch.save(state, p))


def load_state(path: str | Path) -> dict[str, Any]:
    """Read ``state.pt`` with ``weights_only=True`` (no code can run); errors name the file."""
    path = Path(path)
    if not path.is_file():
        raise RunDirError(f"training state {path} does not exist; the run has not finished an epoch yet")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise RunDirError(f"training state {path} is corrupt or holds non-tensor objects ({first_line(e)}); "
                          f"start a new run or restore the file") from None


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


def load_init_weights(model: nn.Module, source: str | Path) -> tuple[list[str], list[str]]:
    """Load a run directory's or a weights file's tensors into ``model`` with ``strict=False``.

    ``source`` is a run dir (its ``weights.safetensors``), a ``.safetensors`` file or a
    ``.pt/.pth`` state dict (read with ``weights_only=True``). Tensors whose shape differs
    from the model's are skipped and reported as missing. Returns ``(missing, unexpected)`` keys.
    """
    source = Path(source)
    if source.is_dir():
        source = source / WEIGHTS_FILE
    if source.suffix == ".safetensors":
        state = read_weights(source)
    elif source.is_file():
        try:
            state = torch.load(source, map_location="cpu", weights_only=True)
        except Exception as e:
            raise RunDirError(f"train.init_from file {source} cannot be read as a state dict ({first_line(e)})") from None
        state = state.get("state_dict", state) if isinstance(state, dict) else state
    else:
        raise RunDirError(f"train.init_from {source} does not exist; give a run directory or a weights file")
    own = model.state_dict()
    fitting = {k: v for k, v in state.items() if k not in own or own[k].shape == v.shape}
    result = model.load_state_dict(fitting, strict=False)
    return list(result.missing_keys), list(result.unexpected_keys)
