"""Ponder-cost maps of spatial models (ACT / SACT, DynConv, the multi-target model) over images of any size,
written as PNG overlays.

ACT / SACT: for each ACT block (ResNet stage) the per-position ponder cost rho = N + R is resized to the
image with nearest-neighbour interpolation; the maps are also summed over blocks (the SACT paper's
ponder-cost map). DynConv: per stage (blocks whose masks share a resolution) the number of blocks that
ran at each position, and their sum over the network (the DynConv paper's ponder map: every block's hard
mask resized, nearest, and summed). Per-unit active masks give the executed-units map (how many residual
units ran at each pixel). ``ponder ponder-map RUN_DIR IMAGE...`` calls :func:`write_ponder_maps`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from ponder.plot import have_matplotlib
from ponder.saliency import saliency_map


def _to_image(maps: Sequence[Tensor], batch: int, hw: tuple[int, int]) -> list[Tensor]:
    """Per-position maps (``[B, h, w]``, or ``[B]`` for ACT) resized (nearest) to ``[B, H, W]`` float."""
    out = []
    for m in maps:
        m = m.detach().float()
        if m.dim() == 1:
            out.append(m[:, None, None].expand(batch, *hw).clone())
        else:
            out.append(F.interpolate(m[:, None], size=hw, mode="nearest")[:, 0])
    return out


@torch.no_grad()
def ponder_maps(model: nn.Module, images: Tensor) -> dict[str, Any]:
    """Ponder-cost maps of a spatial ``model`` for normalised ``images [B, C, H, W]`` (any H, W).

    Returns a dict of tensors at image resolution:
    ``stages``: list (one per ACT block) of ``[B, H, W]`` ponder cost rho = N + R (DynConv: per stage, the
    number of its blocks that ran at each pixel); ``total``: ``[B, H, W]`` their sum; ``units``: list (one
    per residual unit) of ``[B, H, W]`` 0/1 active masks (SACT and DynConv, else empty); ``units_run``:
    ``[B, H, W]`` number of units run per pixel; ``kind``: ``"rho"`` or ``"blocks run"`` (what ``stages``
    hold); plus ``logits [B, K]`` and ``macs [B]``. The model runs in eval mode.
    """
    was_training = model.training
    model.eval()
    try:
        out = model(images)
    finally:
        model.train(was_training)
    b, hw = images.shape[0], (images.shape[2], images.shape[3])
    if out.ponder is None and out.masks is None:
        raise ValueError(f"{type(model).__name__} reports no ponder maps or masks; ponder maps need a spatial model "
                         f"(act_*, sact_*, dynconv_*)")
    units = _to_image(out.masks, b, hw) if out.masks is not None else []
    if out.ponder is None:  # DynConv: blocks run per position, summed per stage (one mask resolution)
        by_size: dict[tuple[int, ...], list[Tensor]] = {}
        for m, u in zip(out.masks, units):
            by_size.setdefault(tuple(m.shape[1:]), []).append(u)
        stages = [torch.stack(group).sum(0) for group in by_size.values()]
        units_run = torch.stack(units).sum(0)
        return {"stages": stages, "total": units_run, "units": units, "units_run": units_run, "kind": "blocks run",
                "logits": out.logits, "macs": out.macs}
    stages = _to_image(out.ponder, b, hw)
    units_run = torch.stack(_to_image(out.extras["units_run"], b, hw)).sum(0)
    return {"stages": stages, "total": torch.stack(stages).sum(0), "units": units, "units_run": units_run,
            "kind": "rho", "logits": out.logits, "macs": out.macs}


def _normalizer(dataset: str):
    from ponder.data.transforms import CIFAR_STATS, IMAGENET_STATS, Normalize

    if dataset in CIFAR_STATS:
        return Normalize(*CIFAR_STATS[dataset])
    if dataset == "imagefolder":
        return Normalize(*IMAGENET_STATS)
    raise ValueError(f"ponder maps read RGB images; runs on data set {dataset!r} are not supported "
                     f"(use a cifar10, cifar100 or imagefolder run)")


def load_image(path: str | Path, size: int) -> Tensor:
    """RGB ``uint8 [3, H, W]`` read with Pillow, resized so its longer side is ``size`` pixels."""
    from ponder.data.imagefolder import decode_image

    img = decode_image(str(path))
    h, w = img.shape[1:]
    scale = size / max(h, w)
    nh, nw = max(1, round(h * scale)), max(1, round(w * scale))
    if (nh, nw) == (h, w):
        return img
    resized = F.interpolate(img[None].float(), size=(nh, nw), mode="bilinear", align_corners=False, antialias=True)
    return resized[0].round().clamp(0, 255).to(torch.uint8)


def _save_png(path: Path, image: Tensor, panels: list[tuple[str, Tensor]]) -> None:
    from ponder.plot import pyplot, save_figure

    plt = pyplot()
    rgb = image.permute(1, 2, 0).numpy()
    fig, axes = plt.subplots(1, len(panels) + 1, figsize=(2.4 * (len(panels) + 1), 2.6), dpi=80)
    axes[0].imshow(rgb)
    axes[0].set_title("image", fontsize=9)
    for ax, (title, m) in zip(axes[1:], panels):
        ax.imshow(rgb)
        im = ax.imshow(m.numpy(), cmap="jet", alpha=0.5)
        ax.set_title(title, fontsize=9)
        fig.colorbar(im, ax=ax, fraction=0.046, pad=0.02).ax.tick_params(labelsize=7)
    for ax in axes:
        ax.axis("off")
    fig.tight_layout()
    save_figure(fig, path, dpi=80)


def write_ponder_maps(run_dir: str | Path, images: Sequence[str | Path], out_dir: str | Path | None = None,
                      saliency: bool = False, sigma: float = 10.0, gamma: float = 0.005, size: int | None = None,
                      device: str = "cpu", knob: Any = None) -> list[Path]:
    """Write one ponder-map figure per image of a trained spatial run (ACT, SACT, DynConv); returns the written paths.

    Each image is read with Pillow, resized so its longer side is ``size`` pixels (default: the
    run's training resolution, e.g. 32 for CIFAR, 224 for ImageNet) and normalised like the
    run's eval transform. Writes ``<name>_ponder.png`` (image, per-stage ponder cost, summed
    ponder cost, executed units and, with ``saliency=True``, the SACT saliency map with blur std
    ``sigma`` pixels and centre-bias weight ``gamma``: :func:`ponder.saliency.saliency_map`) when
    matplotlib is installed, else ``<name>_ponder.npz`` with the same maps. ``out_dir``
    defaults to ``RUN_DIR/ponder_maps``. ``knob`` sets the model's native knob first (a threshold; the
    multi-target model's budget, e.g. 0.3), and the file names get ``_knob<value>``.
    """
    from ponder.engine import load_run
    from ponder.models.base import DynamicModel

    model, config = load_run(run_dir, device=device)
    if knob is not None:
        if not isinstance(model, DynamicModel):
            raise ValueError(f"--knob needs a dynamic model; {config.model.name} has no knob")
        model.set_knob(knob)
    norm = _normalizer(config.data.dataset)
    size = size or max(model.default_input_size[1:])
    out = Path(out_dir) if out_dir is not None else Path(run_dir) / "ponder_maps"
    out.mkdir(parents=True, exist_ok=True)
    have_mpl = have_matplotlib()
    written = []
    for path in images:
        img = load_image(path, size)
        maps = ponder_maps(model, norm(img[None]).to(device))
        panels = [(f"stage {i + 1} {maps['kind']}", m[0].cpu()) for i, m in enumerate(maps["stages"])]
        if maps["kind"] == "rho":
            panels += [("ponder cost (sum)", maps["total"][0].cpu()), ("units run", maps["units_run"][0].cpu())]
        else:
            panels.append(("blocks run (ponder map)", maps["total"][0].cpu()))
        if saliency:
            panels.append(("saliency", saliency_map(maps["total"][0].cpu(), sigma, gamma)))
        name = Path(path).stem + (f"_knob{knob}" if knob is not None else "")
        if have_mpl:
            target = out / f"{name}_ponder.png"
            _save_png(target, img, panels)
        else:
            target = out / f"{name}_ponder.npz"
            np.savez_compressed(target, image=img.numpy(), **{t.replace(" ", "_"): m.numpy() for t, m in panels})
        written.append(target)
    return written
