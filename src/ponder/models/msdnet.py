"""MSDNet (Huang et al., ICLR 2018): multi-scale dense network with early exits.

A config-driven builder that reproduces the official network layer for layer (scale
pruning ``max``/``min``, transitions, bottlenecks, classifier heads) with the official
module names, so ``state_dict`` keys follow the official PyTorch layout
(``blocks.i.j.layers...``, ``classifier.i.m`` / ``classifier.i.linear``).

Argument names map to the official flags: ``n_blocks`` = nBlocks, ``step``/``base``/``stepmode``,
``n_channels`` = nChannels, ``growth_rate`` = growthRate, ``gr_factor`` = grFactor,
``bn_factor`` = bnFactor, ``prune``, ``reduction``, ``bottleneck``.
"""

from __future__ import annotations

import math
from typing import Literal, Sequence

import torch
import torch.nn as nn
from torch import Tensor

from ponder.models.exit_head import ConvBasic, ExitHead, conv_bn_relu
from ponder.models.multi_exit import MultiExitModel
from ponder.nn.exits import gradient_rescale
from ponder.registry import register_model

Stem = Literal["cifar", "imagenet"]


class ConvBN(nn.Module):
    """[1x1 bottleneck to ``min(cin, width * cout)`` -> BN -> ReLU] -> 3x3 (stride 1 or 2) -> BN -> ReLU."""

    def __init__(self, cin: int, cout: int, down: bool, bottleneck: bool, width: int):
        super().__init__()
        layers: list[nn.Module] = []
        inner = cin
        if bottleneck:
            inner = min(cin, width * cout)
            layers += [nn.Conv2d(cin, inner, 1, bias=False), nn.BatchNorm2d(inner), nn.ReLU(inplace=True)]
        layers += [nn.Conv2d(inner, cout, 3, 2 if down else 1, 1, bias=False), nn.BatchNorm2d(cout),
                   nn.ReLU(inplace=True)]
        self.net = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        return conv_bn_relu(self.net, x)


class ConvNormal(nn.Module):
    """Same-scale unit: ``cat[x, ConvBN(x)]``."""

    def __init__(self, cin: int, growth: int, bottleneck: bool, width: int):
        super().__init__()
        self.conv_normal = ConvBN(cin, growth, False, bottleneck, width)

    def forward(self, xs: list[Tensor]) -> Tensor:
        return torch.cat([xs[0], self.conv_normal(xs[0])], dim=1)


class ConvDownNormal(nn.Module):
    """Down+normal unit: ``cat[x_s, ConvBN_down(x_{s-1}), ConvBN(x_s)]``, each new part ``growth // 2`` wide."""

    def __init__(self, cin_fine: int, cin: int, growth: int, bottleneck: bool, width_fine: int, width: int):
        super().__init__()
        self.conv_down = ConvBN(cin_fine, growth // 2, True, bottleneck, width_fine)
        self.conv_normal = ConvBN(cin, growth // 2, False, bottleneck, width)

    def forward(self, xs: list[Tensor]) -> Tensor:
        return torch.cat([xs[1], self.conv_down(xs[0]), self.conv_normal(xs[1])], dim=1)


class MSDNFirstLayer(nn.Module):
    """Image -> list of ``S`` scale tensors (finest first)."""

    def __init__(self, in_chans: int, channels: int, gr_factor: Sequence[int], stem: Stem):
        super().__init__()
        self.layers = nn.ModuleList()
        width = channels * gr_factor[0]
        if stem == "cifar":
            self.layers.append(ConvBasic(in_chans, width, 3, 1, 1))
        else:
            self.layers.append(nn.Sequential(nn.Conv2d(in_chans, width, 7, 2, 3), nn.BatchNorm2d(width),
                                             nn.ReLU(inplace=True), nn.MaxPool2d(3, 2, 1)))
        for g in gr_factor[1:]:
            self.layers.append(ConvBasic(width, channels * g, 3, 2, 1))
            width = channels * g

    def forward(self, x: Tensor) -> list[Tensor]:
        out = []
        for layer in self.layers:
            x = layer(x)
            out.append(x)
        return out


class MSDNLayer(nn.Module):
    """One MSDN layer from ``in_scales`` to ``out_scales`` (``in - out`` in {0, 1}) tensors."""

    def __init__(self, channels: int, growth: int, in_scales: int, out_scales: int,
                 gr_factor: Sequence[int], bn_factor: Sequence[int], bottleneck: bool):
        super().__init__()
        n_scales = len(gr_factor)
        self.discard = in_scales - out_scales
        if self.discard not in (0, 1):
            raise ValueError(f"an MSDN layer drops at most one scale, got {in_scales} -> {out_scales}")
        self.out_scales = out_scales
        offset = n_scales - out_scales
        self.layers = nn.ModuleList()
        for s in range(offset, n_scales):
            if s == offset and self.discard == 0:
                self.layers.append(ConvNormal(channels * gr_factor[s], growth * gr_factor[s], bottleneck,
                                              bn_factor[s]))
            else:
                self.layers.append(ConvDownNormal(channels * gr_factor[s - 1], channels * gr_factor[s],
                                                  growth * gr_factor[s], bottleneck, bn_factor[s - 1],
                                                  bn_factor[s]))

    def forward(self, xs: list[Tensor]) -> list[Tensor]:
        if self.discard:
            pairs = [[xs[j], xs[j + 1]] for j in range(self.out_scales)]
        else:
            pairs = [[xs[0]]] + [[xs[j - 1], xs[j]] for j in range(1, self.out_scales)]
        return [layer(p) for layer, p in zip(self.layers, pairs)]


class ParallelModule(nn.Module):
    """Applies module ``i`` to tensor ``i`` of a list (the transition's per-scale 1x1 convs)."""

    def __init__(self, modules: Sequence[nn.Module]):
        super().__init__()
        self.m = nn.ModuleList(modules)

    def forward(self, xs: list[Tensor]) -> list[Tensor]:
        return [m(x) for m, x in zip(self.m, xs)]


def layer_steps(n_blocks: int, stepmode: str, step: int, base: int) -> list[int]:
    """MSDN layers per block: ``[base, step, step, ...]`` (even) or ``[base, step*1+1, step*2+1, ...]`` (lin_grow)."""
    if stepmode not in ("even", "lin_grow"):
        raise ValueError(f"stepmode must be 'even' or 'lin_grow', got {stepmode!r}")
    return [base] + [step if stepmode == "even" else step * i + 1 for i in range(1, n_blocks)]


def scale_plan(layer: int, total: int, n_scales: int, prune: str) -> tuple[int, int]:
    """``(in_scales, out_scales)`` of global layer ``layer`` (1-based) in a net of ``total`` layers."""
    if prune == "max":
        interval = math.ceil(total / n_scales)
        return (n_scales - max(0, layer - 2) // interval, n_scales - (layer - 1) // interval)
    if prune == "min":
        return min(n_scales, total - layer + 2), min(n_scales, total - layer + 1)
    raise ValueError(f"prune must be 'max' or 'min', got {prune!r}")


class MSDNet(MultiExitModel):
    """MSDNet with one exit per block (exit ``k`` reads block ``k``'s coarsest-scale output).

    Ledger units ``block.k`` (block 0 includes the first layer) and ``exit.k``.
    """

    paper = "Huang et al., ICLR 2018 (MSDNet)"

    def __init__(self, n_blocks: int = 5, stepmode: str = "lin_grow", step: int = 1, base: int = 1,
                 n_channels: int = 16, growth_rate: int = 6, gr_factor: Sequence[int] = (1, 2, 4),
                 bn_factor: Sequence[int] = (1, 2, 4), prune: str = "max", reduction: float = 0.5,
                 bottleneck: bool = True, num_classes: int = 10, stem: Stem = "cifar",
                 head_width: int | None = 128, in_chans: int = 3, init: str = "paper",
                 collaboration: bool = False):
        super().__init__()
        if len(gr_factor) != len(bn_factor):
            raise ValueError(f"gr_factor {list(gr_factor)} and bn_factor {list(bn_factor)} must have one entry per scale")
        if stem not in ("cifar", "imagenet"):
            raise ValueError(f"stem must be 'cifar' or 'imagenet', got {stem!r}")
        if init not in ("paper", "pytorch"):
            raise ValueError(f"init must be 'paper' (MSR normal convs, BN 1/0, Linear bias 0) or 'pytorch', got {init!r}")
        self.num_classes, self.num_exits = num_classes, n_blocks
        self.default_input_size = (in_chans, 32, 32) if stem == "cifar" else (in_chans, 224, 224)
        self.steps = layer_steps(n_blocks, stepmode, step, base)
        total, n_scales = sum(self.steps), len(gr_factor)
        self.blocks, self.classifier = nn.ModuleList(), nn.ModuleList()
        self.head_inputs: list[int] = []
        c, layer = n_channels, 0
        for k, n_layers in enumerate(self.steps):
            mods: list[nn.Module] = [MSDNFirstLayer(in_chans, c, gr_factor, stem)] if k == 0 else []
            for _ in range(n_layers):
                layer += 1
                n_in, n_out = scale_plan(layer, total, n_scales, prune)
                mods.append(MSDNLayer(c, growth_rate, n_in, n_out, gr_factor, bn_factor, bottleneck))
                c += growth_rate
                if reduction > 0 and ((prune == "max" and n_in > n_out) or
                                      (prune == "min" and layer in (total // 3, 2 * total // 3))):
                    c_new = math.floor(reduction * c)
                    mods.append(ParallelModule([ConvBasic(c * gr_factor[s], c_new * gr_factor[s], 1, 1, 0)
                                                for s in range(n_scales - n_out, n_scales)]))
                    c = c_new
            self.blocks.append(nn.Sequential(*mods))
            cin = c * gr_factor[-1]
            self.head_inputs.append(cin)
            self.classifier.append(ExitHead(cin, head_width, num_classes))
        if init == "paper":
            _paper_init(self)
        if collaboration:
            self.enable_collaboration()

    def run_block(self, k: int, state):
        return self.blocks[k](state)

    def exit_features(self, k: int, state: list[Tensor]) -> Tensor:
        return self.classifier[k].features(state[-1])

    def exit_classifier(self, k: int, feat: Tensor) -> Tensor:
        return self.classifier[k].linear(feat)

    def exit_outputs(self, k: int, state: list[Tensor]) -> tuple[Tensor, Tensor]:
        return self.classifier[k].classify(state[-1])

    def exit_feature_dims(self) -> list[int]:
        return [head.width for head in self.classifier]

    def stage_modules(self, k: int) -> list[nn.Module]:
        return [self.blocks[k]]

    def exit_modules(self, k: int) -> list[nn.Module]:
        return [self.classifier[k]]

    def scale_gradient(self, state: list[Tensor], scale: float) -> list[Tensor]:
        """Gradient equilibrium acts on the coarsest scale only (the one the exits read)."""
        return state[:-1] + [gradient_rescale(state[-1], scale)]


def _paper_init(model: nn.Module) -> None:
    """Paper (Lua) init: conv ~ N(0, sqrt(2 / (k_h k_w C_out))), BN 1/0, Linear and conv bias 0."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            n = m.kernel_size[0] * m.kernel_size[1] * m.out_channels
            nn.init.normal_(m.weight, 0.0, math.sqrt(2.0 / n))
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, (nn.BatchNorm2d, nn.BatchNorm1d)):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear) and m.bias is not None:
            nn.init.zeros_(m.bias)


_CIFAR = dict(n_channels=16, growth_rate=6, gr_factor=(1, 2, 4), bn_factor=(1, 2, 4), stem="cifar", head_width=128)
_IMAGENET = dict(n_channels=32, growth_rate=16, gr_factor=(1, 2, 4, 4), bn_factor=(1, 2, 4, 4), stem="imagenet",
                 head_width=None)


@register_model
def msdnet_cifar_budgeted(num_classes: int = 10, **kw) -> MSDNet:
    """MSDNet CIFAR budgeted-batch setting: 5 exits, lin_grow, step 1, base 1 (official README)."""
    cfg = dict(_CIFAR, n_blocks=5, stepmode="lin_grow", step=1, base=1)
    return MSDNet(num_classes=num_classes, **{**cfg, **kw})


@register_model
def msdnet_cifar_anytime(num_classes: int = 10, **kw) -> MSDNet:
    """MSDNet CIFAR anytime setting (official PyTorch README): 7 exits, even, step 2, base 4 (Lua: n_blocks=10)."""
    cfg = dict(_CIFAR, n_blocks=7, stepmode="even", step=2, base=4)
    return MSDNet(num_classes=num_classes, **{**cfg, **kw})


def _imagenet(k: int, base: int | None = None):
    base = k if base is None else base

    def factory(num_classes: int = 1000, **kw) -> MSDNet:
        cfg = dict(_IMAGENET, n_blocks=5, stepmode="even", step=k, base=base)
        return MSDNet(num_classes=num_classes, **{**cfg, **kw})

    if base == k:
        factory.__name__ = f"msdnet_imagenet_step{k}"
        factory.__doc__ = f"MSDNet ImageNet, 5 exits, step = base = {k}, 4 scales (exit i after {k}*i layers)."
    else:
        factory.__name__ = f"msdnet_imagenet_step{k}_base{base}"
        factory.__doc__ = (f"MSDNet ImageNet, 5 exits, step {k}, base {base}, 4 scales (exit i after {base} + {k}*(i-1) "
                           f"layers): L2W's k = {k} network (Han et al., ECCV 2022).")
    return register_model(factory)


msdnet_imagenet_step4 = _imagenet(4)  # also L2W's k = 4 network (base 4)
msdnet_imagenet_step6 = _imagenet(6)
msdnet_imagenet_step7 = _imagenet(7)
msdnet_imagenet_step6_base4 = _imagenet(6, base=4)
msdnet_imagenet_step7_base4 = _imagenet(7, base=4)
