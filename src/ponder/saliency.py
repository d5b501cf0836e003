"""SACT ponder-cost maps as saliency maps (Figurnov et al., CVPR 2017, the cat2000 experiment).

Post-processing of the paper: normalise the ponder map to [0, 1], blur it with a Gaussian of
standard deviation ``sigma`` (pixels of the map), and add ``gamma`` times a centred Gaussian
baseline map (a centre-bias prior). The paper fixes ``sigma = 10`` and ``gamma = 0.005``; the
baseline's spread is not given, so it is a parameter here (``center_std``, a fraction of the
image height / width).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor


def normalize01(x: Tensor) -> Tensor:
    """``x`` shifted and scaled to [0, 1]; a constant map becomes all zeros."""
    lo, hi = x.min(), x.max()
    return (x - lo) / (hi - lo) if hi > lo else torch.zeros_like(x)


def gaussian_kernel1d(sigma: float, truncate: float = 4.0, dtype: torch.dtype = torch.float32,
                      device: torch.device | str = "cpu") -> Tensor:
    """Normalised 1-D Gaussian ``[2r+1]`` with ``r = ceil(truncate * sigma)`` (scipy's convention)."""
    if sigma <= 0:
        raise ValueError(f"Gaussian blur sigma must be > 0 pixels, got {sigma}")
    r = max(1, math.ceil(truncate * sigma))
    t = torch.arange(-r, r + 1, dtype=dtype, device=device)
    k = torch.exp(-0.5 * (t / sigma) ** 2)
    return k / k.sum()


def gaussian_blur(x: Tensor, sigma: float) -> Tensor:
    """Separable Gaussian blur of a map ``[H, W]`` with std ``sigma`` pixels (edges replicated)."""
    if x.dim() != 2:
        raise ValueError(f"gaussian_blur expects a map [H, W], got shape {list(x.shape)}")
    k = gaussian_kernel1d(sigma, dtype=x.dtype, device=x.device)
    r = (k.numel() - 1) // 2
    y = x[None, None]
    y = F.conv2d(F.pad(y, (r, r, 0, 0), mode="replicate"), k.view(1, 1, 1, -1))
    y = F.conv2d(F.pad(y, (0, 0, r, r), mode="replicate"), k.view(1, 1, -1, 1))
    return y[0, 0]


def center_bias(height: int, width: int, center_std: float = 0.25, dtype: torch.dtype = torch.float32,
                device: torch.device | str = "cpu") -> Tensor:
    """Centred Gaussian ``[H, W]`` with peak 1 and std ``center_std * H`` (rows) / ``center_std * W`` (cols)."""
    if center_std <= 0:
        raise ValueError(f"center_std must be > 0 (a fraction of the image size), got {center_std}")
    ys = (torch.arange(height, dtype=dtype, device=device) - (height - 1) / 2) / (center_std * height)
    xs = (torch.arange(width, dtype=dtype, device=device) - (width - 1) / 2) / (center_std * width)
    return torch.exp(-0.5 * (ys[:, None] ** 2 + xs[None, :] ** 2))


def saliency_map(ponder_map: Tensor, sigma: float = 10.0, gamma: float = 0.005,
                 center_std: float = 0.25) -> Tensor:
    """Saliency ``[H, W]`` from a ponder-cost map ``[H, W]`` (at image resolution).

    ``normalize01(map)`` -> Gaussian blur (std ``sigma`` pixels) -> ``+ gamma * center_bias``.
    """
    if ponder_map.dim() != 2:
        raise ValueError(f"saliency_map expects one ponder map [H, W], got shape {list(ponder_map.shape)}; "
                         f"pass ponder_map[i] for image i")
    m = normalize01(ponder_map.detach().to(torch.float32))
    h, w = m.shape
    return gaussian_blur(m, sigma) + gamma * center_bias(h, w, center_std, m.dtype, m.device)
