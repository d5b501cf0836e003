"""The spatial family's base: models that decide where (or for which images) each unit runs.

ACT / SACT (:mod:`ponder.models.act`) and DynConv subclass :class:`SpatialModel`. Their outputs carry
per-unit masks (``DynamicOutput.masks``) and, for ACT-style models, per-stage ponder maps
(``DynamicOutput.ponder``); their forced decisions (:meth:`SpatialModel.forced_positions`) are
coherent blobs of active positions drawn per sample (:func:`ponder.nn.forced.keep_map`).
"""

from __future__ import annotations

from torch import Tensor

from ponder.models.base import DynamicModel
from ponder.nn.forced import keep_map, keep_matrix


class SpatialModel(DynamicModel):
    """Spatially adaptive models: units computed at some positions only (or, ACT, for some images only)."""

    family = "spatial"

    def forced_positions(self, keys: Tensor, shape: tuple[int, int], unit: int) -> Tensor | None:
        """Forced active positions ``[B, H, W]`` (bool) of ``unit`` for samples with ``keys [B]``
        (:func:`ponder.nn.forced.sample_keys`), or ``None`` when the learned decisions rule."""
        if self.forced is None:
            return None
        return keep_map(keys, shape, self.forced.rate, self.forced.seed, unit)

    def forced_images(self, keys: Tensor, unit: int) -> Tensor | None:
        """Forced per-image keep decisions ``[B]`` (bool) of ``unit``, or ``None``."""
        if self.forced is None:
            return None
        return keep_matrix(keys, 1, self.forced.rate, self.forced.seed, first=unit)[:, 0]
