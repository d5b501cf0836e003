"""L2W's weight prediction network (Han et al., ECCV 2022): per-sample, per-exit loss weights.

An MLP maps each sample's per-exit losses (or exit confidences, or both) to ``K`` values
``v`` in ``(-1, 1)`` (tanh output); the loss weights are ``w = 1 + delta * (v - mean(v))``, the mean
taken per sample over the exits (``"col"``), per exit over the batch (``"row"``) or over everything
(``"mat"``). The weights therefore average to 1 along that axis and lie in ``[1 - 2 delta, 1 + 2 delta]``.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn as nn
from torch import Tensor

WPN_INPUTS = ("loss", "conf", "both")
NORMALISATIONS = ("col", "row", "mat")


BatchMean = Callable[[Tensor], Tensor]


def centre(t: Tensor, normalisation: str, batch_mean: BatchMean | None = None) -> Tensor:
    """``t [B, K]`` minus its mean: per sample over exits (``"col"``), per exit over samples (``"row"``)
    or over all entries (``"mat"``).

    ``batch_mean(t) -> [1, K]`` is the per-exit mean over the whole batch, for a batch split over
    processes (default ``t.mean(0, keepdim=True)``); ``"col"`` never needs it. The centring is a
    symmetric projection: ``sum(a * centre(v)) == sum(centre(a) * v)`` over the whole batch.
    """
    if normalisation == "col":
        return t - t.mean(dim=1, keepdim=True)
    if normalisation not in NORMALISATIONS:
        raise ValueError(f"normalisation must be one of {', '.join(NORMALISATIONS)}, got {normalisation!r}")
    mean = batch_mean(t) if batch_mean is not None else t.mean(dim=0, keepdim=True)
    return t - (mean if normalisation == "row" else mean.mean())


def normalise_weights(v: Tensor, delta: float, normalisation: str, batch_mean: BatchMean | None = None) -> Tensor:
    """Weights ``[B, K] = 1 + delta * (v - mean(v))`` from WPN outputs ``v [B, K]``.

    ``normalisation``: ``"col"`` (mean per sample over exits), ``"row"`` (per exit over samples)
    or ``"mat"`` (over all entries); ``batch_mean`` as in :func:`centre`.
    """
    return 1.0 + delta * centre(v, normalisation, batch_mean)


class WeightPredictionNetwork(nn.Module):
    """MLP ``[Linear -> ReLU] x depth -> Linear -> tanh`` from per-exit features to per-exit loss weights.

    Args:
        num_exits: ``K``, the number of exits (and outputs).
        depth: hidden layers (paper default 1; 0 is a linear map).
        width: hidden width (paper default 500).
        inputs: ``"loss"`` (per-exit cross-entropy, the paper's), ``"conf"`` (per-exit max-softmax)
            or ``"both"`` (the two concatenated, ``2K`` inputs).
        normalisation: ``"col"`` (CIFAR default), ``"row"`` or ``"mat"`` (ImageNet default); see
            :func:`normalise_weights`.
        delta: the spread ``delta`` (paper: 0.8 on CIFAR, 0.3 on ImageNet).
    """

    def __init__(self, num_exits: int, depth: int = 1, width: int = 500, inputs: str = "loss",
                 normalisation: str = "col", delta: float = 0.8):
        super().__init__()
        if inputs not in WPN_INPUTS:
            raise ValueError(f"WPN inputs must be one of {', '.join(WPN_INPUTS)}, got {inputs!r}")
        if normalisation not in NORMALISATIONS:
            raise ValueError(f"normalisation must be one of {', '.join(NORMALISATIONS)}, got {normalisation!r}")
        if num_exits < 1 or depth < 0 or width < 1 or delta < 0:
            raise ValueError(f"WPN needs num_exits >= 1, depth >= 0, width >= 1 and delta >= 0, "
                             f"got {num_exits}, {depth}, {width}, {delta}")
        self.num_exits, self.inputs, self.normalisation, self.delta = num_exits, inputs, normalisation, float(delta)
        layers: list[nn.Module] = []
        n_in = 2 * num_exits if inputs == "both" else num_exits
        for _ in range(depth):
            layers += [nn.Linear(n_in, width), nn.ReLU()]
            n_in = width
        layers += [nn.Linear(n_in, num_exits), nn.Tanh()]
        self.mlp = nn.Sequential(*layers)

    def features(self, losses: Tensor, confidences: Tensor | None) -> Tensor:
        """The MLP input ``[B, K]`` (``[B, 2K]`` for ``"both"``), detached from the backbone."""
        if self.inputs != "loss" and confidences is None:
            raise ValueError(f"a WPN with inputs={self.inputs!r} needs the exit confidences")
        parts = {"loss": [losses], "conf": [confidences], "both": [losses, confidences]}[self.inputs]
        return torch.cat([p.detach() for p in parts], dim=1)  # type: ignore[union-attr]

    def outputs(self, losses: Tensor, confidences: Tensor | None = None) -> Tensor:
        """The MLP's tanh outputs ``v [B, K]`` before normalisation (arguments as :meth:`forward`)."""
        if losses.dim() != 2 or losses.shape[1] != self.num_exits:
            raise ValueError(f"WPN expects per-exit losses [B, {self.num_exits}], got {list(losses.shape)}")
        return self.mlp(self.features(losses, confidences))

    def forward(self, losses: Tensor, confidences: Tensor | None = None, batch_mean: BatchMean | None = None) -> Tensor:
        """Loss weights ``[B, K]`` from per-sample, per-exit ``losses [B, K]`` (and ``confidences [B, K]``,
        the max-softmax of each exit, for ``inputs`` ``"conf"`` / ``"both"``). No gradient reaches the inputs.
        ``batch_mean``: the per-exit mean over a batch split across processes (see :func:`centre`)."""
        return normalise_weights(self.outputs(losses, confidences), self.delta, self.normalisation, batch_mean)
