"""The spatial family's base: models that decide where (or for which images) each unit runs.

ACT / SACT (:mod:`ponder.models.act`), DynConv (:mod:`ponder.models.dynconv`) and the budget-aware
multi-target model (:mod:`ponder.models.dynconv_multi`) subclass :class:`SpatialModel`. Their outputs
carry per-unit masks (``DynamicOutput.masks``) and, for ACT-style models, per-stage ponder maps
(``DynamicOutput.ponder``); their forced decisions (:meth:`SpatialModel.forced_positions`) are
coherent blobs of active positions drawn per sample (:func:`ponder.nn.forced.keep_map`).

The family's models are ResNets with spatial decisions; :class:`DenseResNetView` and
:class:`DenseResNetKernels` are the dense networks inside them that ``ponder bench`` times them against.
"""

from __future__ import annotations

from typing import ClassVar

import torch
import torch.nn as nn
from torch import Tensor

from ponder.models.base import DynamicModel, example_input
from ponder.nn.dense_units import resnet_on_kernels
from ponder.nn.forced import keep_map, keep_matrix


class SpatialModel(DynamicModel):
    """Spatially adaptive models: units computed at some positions only (or, ACT, for some images only)."""

    family = "spatial"

    #: forced maps kept per (samples, shape, unit, rate, seed): a benchmark repeats its batches, and drawing the
    #: random blobs (a top-k per map) is scaffolding that the learned decisions do not pay for. Enough for
    #: ``ponder bench``'s 64 images at batch 1 through ResNet-110's 54 units (a bool map of 56 x 56 is 3 KB)
    FORCED_CACHE_SIZE: ClassVar[int] = 8192

    def forced_positions(self, keys: Tensor, shape: tuple[int, int], unit: int) -> Tensor | None:
        """Forced active positions ``[B, H, W]`` (bool, read-only) of ``unit`` for samples with ``keys [B]``
        (:func:`ponder.nn.forced.sample_keys`), or ``None`` when the learned decisions rule. A pure function of
        its arguments; the last :attr:`FORCED_CACHE_SIZE` maps are kept."""
        if self.forced is None:
            return None
        cache = self.__dict__.setdefault("_forced_maps", {})
        key = (tuple(keys.tolist()), tuple(shape), unit, self.forced, keys.device)
        hit = cache.get(key)
        if hit is None:
            if len(cache) >= self.FORCED_CACHE_SIZE:
                del cache[next(iter(cache))]
            hit = cache[key] = keep_map(keys, shape, self.forced.rate, self.forced.seed, unit)
        return hit

    def forced_images(self, keys: Tensor, unit: int) -> Tensor | None:
        """Forced per-image keep decisions ``[B]`` (bool) of ``unit``, or ``None``."""
        if self.forced is None:
            return None
        return keep_matrix(keys, 1, self.forced.rate, self.forced.seed, first=unit)[:, 0]


def block_input_sizes(model: nn.Module, input_size: tuple[int, int, int]) -> list[tuple[int, int, int]]:
    """``(C, H, W)`` of the input of each of a ResNet's ``model.blocks`` for ``input_size`` images (one batch-1
    pass in eval mode without gradients: no BatchNorm statistics move; the model's mode is restored)."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            h = model.stem(example_input(model, input_size))
            sizes = []
            for block in model.blocks:
                sizes.append(tuple(h.shape[1:]))
                h = block(h)
        return sizes  # type: ignore[return-value]
    finally:
        model.train(was_training)


class DenseResNetView(nn.Module):
    """The plain ResNet inside a spatial ResNet model (same weights, every unit dense, no decision units):
    ``[B, 3, H, W]`` -> logits ``[B, classes]`` through ``model.forward_logits``."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: Tensor) -> Tensor:
        return self.model.forward_logits(x)


class DenseResNetKernels(DenseResNetView):
    """The plain ResNet on the sparse executor's kernels (inference): :func:`ponder.nn.dense_units.resnet_on_kernels`.
    ``[B, 3, H, W]`` -> logits ``[B, classes]``; equal to :class:`DenseResNetView` up to rounding."""

    def forward(self, x: Tensor) -> Tensor:
        return resnet_on_kernels(self.model, x)
