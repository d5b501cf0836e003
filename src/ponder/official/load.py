"""Load an official checkpoint into its ponder model, and write it out as a ponder run directory.

:func:`load_official` reads the file safely (:mod:`ponder.official.reader`), recognises the
repository from the checkpoint's layout (each repository's mapping file has ``matches``), maps the
keys onto the ponder model with the options read from the tensors (``map_checkpoint``), and loads
them strictly. :func:`convert_official` writes the result as a run directory that ``ponder eval``
and ``ponder bench --checkpoint`` read like a trained run.
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from ponder.official import blockdrop, msdnet, ranet, skipnet
from ponder.official.layout import Mapped, OfficialCheckpointError
from ponder.official.reader import read_checkpoint

#: the repositories' mapping modules, in detection order (BlockDrop's two-dict layout first)
FAMILIES = (blockdrop, msdnet, ranet, skipnet)
SOURCE_FILE = "source.json"


@dataclass
class OfficialCheckpoint:
    """An official checkpoint loaded into its ponder model.

    ``model``: the ponder model in eval mode with the file's weights. ``model_name`` /
    ``model_kwargs``: how to build it again (``create_model``). ``dataset`` / ``normalize``: the
    run's ``data.dataset`` and ``data.normalize`` (the preprocessing the official code used;
    ``None`` = ponder's default). ``info``: the file's own numbers (epoch, accuracy, ...).
    ``notes``: what was dropped or assumed.
    """

    model: nn.Module
    model_name: str
    model_kwargs: dict[str, Any]
    repository: str
    path: Path
    dataset: str
    normalize: list[list[float]] | None = None
    notes: list[str] = field(default_factory=list)
    info: dict[str, Any] = field(default_factory=dict)


def detect(obj: Any, path: str | Path) -> Any:
    """The mapping module of the repository whose layout ``obj`` has; one sentence when none has it."""
    for family in FAMILIES:
        if family.matches(obj):
            return family
    raise OfficialCheckpointError(
        f"{path} is a PyTorch checkpoint but not one of the official layouts ponder reads (it holds {_describe(obj)}): "
        f"expected MSDNet-PyTorch or RANet-pytorch ('state_dict' with blocks.*/classifier.* or "
        f"scale_flows.*/FirstLayer.* keys), BlockDrop ('resnet' and 'agent' state dicts) or SkipNet "
        f"('state_dict' with group1_layer0.* keys)")


def load_official(path: str | Path, name: str | None = None, *, device: str | torch.device = "cpu",
                  **model_kwargs: Any) -> OfficialCheckpoint:
    """Load a checkpoint of the MSDNet, RANet, BlockDrop or SkipNet repositories into its ponder model.

    Args:
        path: the checkpoint file (zip or legacy ``torch.save``; read with ``weights_only=True``,
            storages mapped to ``device``).
        name: the ponder model (``ponder models``); ``None`` picks it from the checkpoint's tensors.
        device: where the tensors and the model go.
        **model_kwargs: constructor options over the ones read from the tensors.

    Returns an :class:`OfficialCheckpoint` whose ``model`` is in eval mode. Raises
    :class:`OfficialCheckpointError` (a ``ValueError``) with one sentence for an unreadable or
    unknown file, or one that does not fit the model.
    """
    path = Path(path)
    obj = read_checkpoint(path, map_location=device)
    family = detect(obj, path)
    if name is not None and not fnmatch.fnmatch(name, family.MODELS):
        raise OfficialCheckpointError(f"{path} is a {family.REPOSITORY} checkpoint, which maps onto the "
                                      f"{family.MODELS} models, not onto {name!r}; drop --model or name one of those")
    mapped = family.map_checkpoint(obj, name, dict(model_kwargs))
    model = build_model(mapped).to(device).eval()
    return OfficialCheckpoint(model, mapped.model, mapped.kwargs, mapped.repository, path, mapped.dataset,
                              mapped.normalize, mapped.notes, mapped.info)


def build_model(mapped: Mapped) -> nn.Module:
    """``create_model(mapped.model, **mapped.kwargs)`` with ``mapped.state`` loaded strictly; BatchNorm
    ``num_batches_tracked`` counters the file lacks (PyTorch < 0.4.1 files) start at 0."""
    from ponder.registry import create_model

    try:
        with torch.random.fork_rng(devices=[]):  # the initial weights are overwritten: leave the caller's RNG alone
            model = create_model(mapped.model, **mapped.kwargs)
    except TypeError as e:
        raise OfficialCheckpointError(f"{mapped.model} does not accept the options {mapped.kwargs} ({e}); "
                                      f"check the --model-arg names") from None
    own = model.state_dict()
    state = dict(mapped.state)
    for key, value in own.items():
        if key.endswith("num_batches_tracked") and key not in state:
            state[key] = torch.zeros_like(value)
    problems = [f"it has no tensor for {k}" for k in own if k not in state]
    problems += [f"its {k} has no place in the model" for k in state if k not in own]
    problems += [f"its {k} is {list(state[k].shape)} where the model has {list(own[k].shape)}"
                 for k in own if k in state and state[k].shape != own[k].shape]
    if problems:
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        raise OfficialCheckpointError(
            f"the {mapped.repository} checkpoint does not fit {mapped.model} with {mapped.kwargs}: "
            f"{problems[0]}{more}; "
            f"name the right model and options (--model NAME --model-arg KEY=VALUE)")
    model.load_state_dict(state, strict=True)
    return model


def convert_official(path: str | Path, run_dir: str | Path, name: str | None = None, **model_kwargs: Any
                     ) -> OfficialCheckpoint:
    """Load ``path`` with :func:`load_official` and write the ponder run directory ``run_dir``:
    ``config.yaml`` (model, options, data set and its normalisation), ``weights.safetensors`` and
    ``source.json`` (the file, its SHA-256, repository, notes and numbers). ``run_dir`` must not hold a run."""
    from ponder.config import DataConfig, ModelConfig, RunConfig
    from ponder.engine.checkpoint import CONFIG_FILE, WEIGHTS_FILE, save_weights
    from ponder.files import atomic_write_text

    run_dir = Path(run_dir)
    existing = [f for f in (CONFIG_FILE, WEIGHTS_FILE) if (run_dir / f).exists()]
    if existing:
        raise OfficialCheckpointError(f"{run_dir} already holds a run ({existing[0]}); choose a new --to directory")
    loaded = load_official(path, name, **model_kwargs)
    run_dir.mkdir(parents=True, exist_ok=True)
    save_weights(loaded.model, run_dir / WEIGHTS_FILE)
    config = RunConfig(model=ModelConfig(loaded.model_name, dict(loaded.model_kwargs)),
                       data=DataConfig(dataset=loaded.dataset, normalize=loaded.normalize))
    config.save(run_dir / CONFIG_FILE)
    source = {"checkpoint": str(Path(path).resolve()), "sha256": _sha256(path), "repository": loaded.repository,
              "model": loaded.model_name, "notes": loaded.notes, "info": loaded.info}
    atomic_write_text(run_dir / SOURCE_FILE, json.dumps(source, indent=1) + "\n")
    return loaded


def _sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _describe(obj: Any) -> str:
    """A few words on what an unrecognised checkpoint holds."""
    if isinstance(obj, dict):
        keys = [str(k) for k in list(obj)[:4]]
        return f"a dict with keys {keys}{' ...' if len(obj) > 4 else ''}"
    if isinstance(obj, torch.Tensor):
        return f"a tensor of shape {list(obj.shape)}"
    return f"a {type(obj).__name__}"
