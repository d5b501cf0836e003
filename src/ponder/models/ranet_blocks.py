"""RANet building blocks: stem, dense normal blocks, fusion blocks and the bilinear resize.

Written from the architecture description in ``shared/reference/early_exit.md`` section 2
(RANet, Yang et al., CVPR 2020); no code of the official repository is used.
Flows are indexed from the lowest resolution (0) to the highest. Every block returns its
output *and* its states ``s_0 .. s_L`` (input, then after each layer, before the compress
concat / transition), which the fusion block of the next finer flow consumes.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from ponder.models.exit_head import ConvBasic

#: MACs charged per output element of a bilinear resize (a weighted sum of 4 neighbours).
INTERP_MACS_PER_ELEMENT = 4


def resize(x: Tensor, size: torch.Size | tuple[int, int]) -> Tensor:
    """Bilinear resize ``[B, C, h, w] -> [B, C, *size]`` with ``align_corners=True``.

    A resize to the same size is the identity and is skipped (it is neither run nor charged).
    """
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    return F.interpolate(x, size=tuple(size), mode="bilinear", align_corners=True)


class ConvBN(nn.Sequential):
    """Bottleneck 1x1 (cin -> min(cin, width * cout)) -> BN -> ReLU -> 3x3 (stride 2 if ``down``) -> BN -> ReLU."""

    def __init__(self, cin: int, cout: int, down: bool, width: int):
        inner = min(cin, width * cout)
        super().__init__(ConvBasic(cin, inner, kernel=1, padding=0),
                         ConvBasic(inner, cout, kernel=3, stride=2 if down else 1, padding=1))


class RANetStem(nn.Module):
    """First layer, built from the highest-resolution flow downwards.

    ``forward(x [B, 3, H, W])`` returns one tensor per flow, lowest resolution first.
    """

    def __init__(self, in_chans: int, channels: list[int], strides: list[int], imagenet: bool):
        super().__init__()
        top = channels[-1]
        if imagenet:
            first: nn.Module = nn.Sequential(nn.Conv2d(in_chans, top, 7, 2, 3), nn.BatchNorm2d(top),
                                             nn.ReLU(inplace=True), nn.MaxPool2d(3, 2, 1))
        else:
            first = ConvBasic(in_chans, top)
        layers = [first]
        for j in range(len(channels) - 2, -1, -1):
            layers.append(ConvBasic(channels[j + 1], channels[j], stride=strides[j]))
        self.layers = nn.ModuleList(layers)

    def forward(self, x: Tensor) -> list[Tensor]:
        outs = []
        for layer in self.layers:
            x = layer(x)
            outs.append(x)
        return outs[::-1]


class NormalBlock(nn.Module):
    """Dense block of ``layers`` layers ``x <- cat[x, ConvBN(x)]`` then an optional 1x1 transition."""

    def __init__(self, cin: int, layers: int, growth: int, width: int, trans_out: int | None):
        super().__init__()
        self.layers = nn.ModuleList(ConvBN(cin + j * growth, growth, False, width) for j in range(layers))
        self.trans = ConvBasic(cin + layers * growth, trans_out, 1, padding=0) if trans_out else None

    def forward(self, x: Tensor, coarse: list[Tensor] | None = None) -> tuple[Tensor, list[Tensor]]:
        """``x [B, C, h, w]`` -> (output, states s_0..s_L); ``coarse`` is unused."""
        states = [x]
        for layer in self.layers:
            x = torch.cat([x, layer(x)], 1)
            states.append(x)
        return (self.trans(x) if self.trans is not None else x), states


class FusionLayer(nn.Module):
    """``x <- cat[resize(x), resize(ConvBN(s_j)), ConvBN(x)]``, all at the size of the last part."""

    def __init__(self, cin: int, c_coarse: int, growth: int, compress: float,
                 width: int, coarse_width: int, down: bool):
        super().__init__()
        from_coarse = math.floor(growth * compress)
        self.coarse = ConvBN(c_coarse, from_coarse, False, coarse_width)
        self.fine = ConvBN(cin, growth - from_coarse, down, width)

    def forward(self, x: Tensor, s: Tensor) -> Tensor:
        b = self.fine(x)
        size = b.shape[-2:]
        return torch.cat([resize(x, size), resize(self.coarse(s), size), b], 1)


class FusionBlock(nn.Module):
    """Fusion block k of flow i: reads the states ``s_0..s_L`` of block k of flow i-1.

    Only the last layer of a down block has stride 2. After the layers the block appends
    ``resize(ConvBasic1x1(s_L))`` with ``floor(C * compress)`` channels, then an optional transition.
    """

    def __init__(self, cin: int, coarse_channels: tuple[int, ...], growth: int, compress: float,
                 width: int, coarse_width: int, down: bool, trans_out: int | None):
        super().__init__()
        n = len(coarse_channels) - 1
        self.layers = nn.ModuleList(
            FusionLayer(cin + j * growth, coarse_channels[j], growth, compress, width, coarse_width,
                        down and j == n - 1)
            for j in range(n))
        c = cin + n * growth
        self.last = ConvBasic(coarse_channels[-1], math.floor(c * compress), 1, padding=0)
        c += math.floor(c * compress)
        self.trans = ConvBasic(c, trans_out, 1, padding=0) if trans_out else None

    def forward(self, x: Tensor, coarse: list[Tensor] | None = None) -> tuple[Tensor, list[Tensor]]:
        """``x [B, C, h, w]`` and the coarser block's states -> (output, states s_0..s_L)."""
        if coarse is None or len(coarse) != len(self.layers) + 1:
            raise ValueError(f"a fusion block of {len(self.layers)} layers needs the coarser flow's "
                             f"{len(self.layers) + 1} states; pass the states of the matching block")
        states = [x]
        for layer, s in zip(self.layers, coarse):
            x = layer(x, s)
            states.append(x)
        x = torch.cat([x, resize(self.last(coarse[-1]), x.shape[-2:])], 1)
        return (self.trans(x) if self.trans is not None else x), states
