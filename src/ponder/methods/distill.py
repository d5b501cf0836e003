"""Knowledge distillation: the temperature-scaled KL term and frozen teachers read from run directories."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from ponder.config import ConfigError, load_config
from ponder.registry import create_model
from ponder.weights import WEIGHTS_FILE, RunDirError, first_line, read_weights


def kd_loss(student: Tensor, teacher: Tensor, temperature: float, reduction: str = "batchmean") -> Tensor:
    """``T^2 KL(softmax(teacher/T) || softmax(student/T))`` for logits ``[B, K]``; teacher detached, so
    gradients reach ``student`` only; the ``T^2`` keeps the gradient's scale independent of ``T`` (Hinton et al.).

    ``reduction``: ``"batchmean"`` (sum over classes, mean over batch) or ``"mean"`` (official IMTA:
    mean over batch *and* classes).
    """
    return kd_per_sample(student, teacher, temperature, reduction).mean()


def kd_per_sample(student: Tensor, teacher: Tensor, temperature: float, reduction: str = "batchmean") -> Tensor:
    """The per-sample terms ``[B]`` whose mean is :func:`kd_loss`: ``T^2 KL`` of each sample, divided by
    the number of classes for ``reduction="mean"`` (official IMTA)."""
    if temperature <= 0:
        raise ValueError(f"the distillation temperature must be > 0, got {temperature}")
    if reduction not in ("batchmean", "mean"):
        raise ValueError(f"kd_reduction must be 'batchmean' or 'mean' (official IMTA), got {reduction!r}")
    log_p = F.log_softmax(student / temperature, dim=1)
    q = F.softmax(teacher.detach() / temperature, dim=1)
    per_sample = F.kl_div(log_p, q, reduction="none").sum(dim=1)
    return per_sample / (q.shape[1] if reduction == "mean" else 1) * temperature ** 2


def load_teacher(source: str | Path, device: torch.device | str = "cpu") -> nn.Module:
    """A frozen teacher in eval mode on ``device``; calling it returns the model's output (``.logits``).

    ``source`` is the run directory of a ``ponder train`` run (its ``config.yaml`` and weights), or
    ``MODEL=WEIGHTS``: a registered model name and a weights file for it (``.safetensors``, or ``.pt`` /
    ``.pth`` read with ``weights_only=True``), e.g. ``resnet50=resnet50-0676ba61.pth`` (torchvision keys).
    """
    text = str(source)
    if "=" in text and not Path(text).exists():
        name, weights = text.split("=", 1)
        model = create_model(name)
        path = Path(weights)
        if not path.is_file():
            raise RunDirError(f"teacher weights {path} do not exist; give MODEL=WEIGHTS with an existing file")
        state = read_weights(path) if path.suffix == ".safetensors" else \
            torch.load(path, map_location="cpu", weights_only=True)
    else:
        run = Path(text)
        if not (run / "config.yaml").is_file():
            raise RunDirError(f"teacher {run} is not a run directory (no config.yaml); give the --out folder of a "
                              f"finished `ponder train` run, or MODEL=WEIGHTS")
        try:
            config = load_config(run / "config.yaml")
        except ConfigError as e:
            raise RunDirError(f"teacher {run} has an unusable config.yaml ({e})") from None
        model = create_model(config.model.name, **config.model.kwargs)
        state = read_weights(run / WEIGHTS_FILE)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise RunDirError(f"teacher {text}: the weights do not fit the model ({first_line(e)})") from None
    return model.to(device).eval().requires_grad_(False)
