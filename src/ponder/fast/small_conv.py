"""Compiled convolution kernels for few channels, few positions and small batches (optional).

oneDNN and PyTorch spend a fixed ~15-20 us per convolution call on this project's CPU and use few
vector lanes when a layer has few channels. MSDNet is full of such layers: 6 channels in and out
on 32x32 maps, 12-24 on 16x16 and 8x8; at batch 1 those took 15-50 us for 0.1-1.3M MACs.
``csrc/small_conv.cpp`` has three kernels, each with its weights pre-blocked once per weight:

- :func:`conv3x3`: a direct 3x3 convolution vectorised over output positions (16 per vector, 8
  output channels per block): 3-12 us for MSDNet's small layers at batch 1, 2-4x faster than oneDNN;
- :func:`conv3x3_gemm`: the same convolution as patches times the weight, vectorised over output
  channels (8 positions x 32 channels per block): for few positions and many channels, e.g. an
  exit head at batch 1 (208 -> 128 channels on 8x8: 55 -> 34 us);
- :func:`rows_gemm`: that block GEMM on the rows of a 1x1 convolution;

and, bound to their weights, a gated ResNet's router (a mean and two small linear layers) as one call
(:func:`bound_pooled_mlp`), RDI-Net's relational router step (that router, the mean of it and the two
before, a linear layer: :func:`bound_relational_router`) and a SkipNet recurrent gate step (a mean, a
projection, an LSTM cell and the keep logit: :func:`bound_lstm_gate`).

:func:`ponder.fast.conv.conv2d` and :func:`~ponder.fast.conv.conv1x1_rows` time them against
their other routes per shape and batch-size bucket and use them only where they win. The module is
built with ``-march=native`` (one build per CPU model, :func:`ponder.machine.cpu_tag`) and with
contracted multiply-adds, so the results equal ``F.conv2d``'s up to float rounding, not bit for bit.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

from ponder.fast.native import load
from ponder.fast.switch import cpu_inference
from ponder.fast.weight_cache import derived

_BLOCK = 8  # output channels per weight block of conv3x3 (kOut in the C++ source)
_GEMM_BLOCK = 32  # ... of conv3x3_gemm (kGemmOut)


def _extension():
    return load("small_conv")


def conv3x3_applies(x: Tensor, weight: Tensor, bias: Tensor | None, stride: int, padding: int) -> bool:
    """Whether :func:`conv3x3` runs ``F.conv2d(x, weight, bias, stride, padding)`` here.

    Needs a channels-last float32 CPU ``x`` without autograd or a dispatch mode, a ``[C', C, 3, 3]``
    weight, padding 1, stride 1 or 2, and the compiled kernel.
    """
    return (weight.dim() == 4 and tuple(weight.shape[2:]) == (3, 3) and padding == 1
            and stride in (1, 2) and x.dim() == 4 and x.dtype == torch.float32 and weight.dtype == torch.float32
            and x.is_contiguous(memory_format=torch.channels_last) and weight.shape[1] == x.shape[1]
            and cpu_inference(x) and _extension() is not None)


def conv3x3(x: Tensor, weight: Tensor, bias: Tensor | None, stride: int, relu: bool = False) -> Tensor:
    """``F.conv2d(x, weight, bias, stride, 1)`` (then ReLU when ``relu``) on the compiled kernel.

    ``x [B, C, H, W]`` channels-last -> ``[B, C', H', W']`` channels-last; only where
    :func:`conv3x3_applies` (the caller checks).
    """
    return _extension().conv3x3(x, blocked_weight(weight), _bias(weight, bias), stride, relu)


def conv3x3_gemm(x: Tensor, weight: Tensor, bias: Tensor | None, stride: int, relu: bool = False) -> Tensor:
    """The same as :func:`conv3x3`, computed as patches ``[B*H'*W', 9C]`` times the weight, 32 output
    channels per vector block: the faster kernel for few output positions and many channels (an exit
    head at batch 1). Only where :func:`conv3x3_applies`."""
    return _extension().conv3x3_gemm(x, gemm_weight(weight), _bias(weight, bias), stride, relu)


def bound_kernel(gemm: bool, weight: Tensor, bias: Tensor | None, stride: int,
                 relu: bool) -> Callable[[Tensor], Tensor]:
    """:func:`conv3x3_gemm` (``gemm``) or :func:`conv3x3` with the blocked weight and the bias bound:
    ``run(x) -> y``, valid while ``weight`` is unchanged (the caller checks)."""
    ext, b = _extension(), _bias(weight, bias)
    if gemm:
        taps = gemm_weight(weight)
        return lambda x: ext.conv3x3_gemm(x, taps, b, stride, relu)
    blocked = blocked_weight(weight)
    return lambda x: ext.conv3x3(x, blocked, b, stride, relu)


def bound_exit_head(weights: list[Tensor], biases: list[Tensor], linear: torch.nn.Linear
                    ) -> Callable[[Tensor], tuple[Tensor, Tensor]]:
    """An exit head as one compiled call: two 3x3 convolutions (stride 2, padding 1, bias, ReLU) as
    in :func:`conv3x3_gemm`, the mean over the second one's positions and ``linear``, with the
    weights bound: ``run(x [B, C, H, W]) -> (feature [B, C2], logits [B, N])``, ``x`` channels-last
    float32. Valid while the weights are unchanged (the caller checks)."""
    ext = _extension()
    (g1, g2), (b1, b2) = [gemm_weight(w) for w in weights], biases
    lin_w, lin_b = linear.weight.detach().contiguous(), _bias(linear.weight, linear.bias).detach()
    return lambda x: tuple(ext.exit_head(x, g1, b1, g2, b2, lin_w, lin_b))


def bound_pooled_mlp(w1: Tensor, b1: Tensor, w2: Tensor, b2: Tensor,
                     relu: bool) -> Callable[[Tensor], Tensor] | None:
    """``W2 act(W1 mean(x) + b1) + b2`` (``w1 [Hd, C]``, ``w2 [K, Hd]``; act = ReLU when ``relu``) as one
    compiled call with the weights bound: ``run(x [B, C, H, W]) -> [B, K]`` for a contiguous channels-last
    float32 ``x`` (the mean over positions, then the two layers). ``None`` without the compiled kernels.
    Valid while the weights are unchanged (the caller checks)."""
    ext = _extension()
    if ext is None:
        return None
    mlp = _mlp_weights(w1, b1, w2, b2)
    return lambda x: ext.pooled_mlp(x, *mlp, relu)


def _mlp_weights(w1: Tensor, b1: Tensor, w2: Tensor, b2: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``(w1^T, b1, w2^T, b2)`` detached and contiguous: the pooled MLP's weights as the kernels read them."""
    return (w1.detach().t().contiguous(), b1.detach().contiguous(), w2.detach().t().contiguous(),
            b2.detach().contiguous())


def bound_relational_router(w1: Tensor, b1: Tensor, w2: Tensor, b2: Tensor, relu: bool, out: torch.nn.Linear
                            ) -> Callable[[Tensor, tuple[Tensor, Tensor]], tuple[Tensor, tuple[Tensor, Tensor]]] | None:
    """RDI-Net's router step as one compiled call with the weights bound: ``r`` = :func:`bound_pooled_mlp`'s
    result, then ``out((r + prev1 + prev2) / 3)``: ``run(x [B, C, H, W], (prev1, prev2) [B, K]) -> (logits
    [B, K'], (r, prev1))`` for a contiguous channels-last float32 ``x``. ``None`` without the compiled
    kernels. Valid while the weights are unchanged (the caller checks)."""
    ext = _extension()
    if ext is None:
        return None
    mlp = _mlp_weights(w1, b1, w2, b2)
    wot, bo = out.weight.detach().t().contiguous(), _bias(out.weight, out.bias).detach().contiguous()

    def run(x: Tensor, state: tuple[Tensor, Tensor]) -> tuple[Tensor, tuple[Tensor, Tensor]]:
        logits, r = ext.relational_router(x, *mlp, relu, state[0], state[1], wot, bo)
        return logits, (r, state[0])

    return run


def bound_lstm_gate(proj: torch.nn.Conv2d, cell: torch.nn.LSTMCell, out: torch.nn.Linear
                    ) -> Callable[[Tensor, tuple[Tensor, Tensor]], tuple[Tensor, tuple[Tensor, Tensor]]] | None:
    """SkipNet's recurrent gate step as one compiled call with the weights bound: the 1x1 ``proj`` of the
    mean of ``x``, one step of ``cell`` and the keep logit ``out`` (one output):
    ``run(x [B, C, H, W], (h, c) [B, Hd]) -> (logit [B], (h', c'))`` for a contiguous channels-last float32
    ``x``. ``None`` without the compiled kernels or for float64 weights. Valid while the weights are
    unchanged (the caller checks)."""
    ext = _extension()
    if ext is None or proj.weight.dtype != torch.float32 or out.out_features != 1:
        return None
    with torch.no_grad():
        wpt = proj.weight.flatten(1).t().contiguous()
        bp = _bias(proj.weight, proj.bias).contiguous()
        wih_t, whh_t = cell.weight_ih.t().contiguous(), cell.weight_hh.t().contiguous()
        b4 = (_bias(cell.weight_ih, cell.bias_ih) + _bias(cell.weight_hh, cell.bias_hh)).contiguous()
        wo, bo = out.weight[0].contiguous(), _bias(out.weight, out.bias).contiguous()

    def run(x: Tensor, state: tuple[Tensor, Tensor]) -> tuple[Tensor, tuple[Tensor, Tensor]]:
        logit, h, c = ext.pooled_lstm_gate(x, state[0], state[1], wpt, bp, wih_t, whh_t, b4, wo, bo)
        return logit, (h, c)

    return run


def rows_gemm_applies(x: Tensor, weight: Tensor) -> bool:
    """Whether :func:`rows_gemm` runs here: float32 CPU rows ``x [n, K]`` (column stride 1) and
    ``weight [N, K]`` without autograd or a dispatch mode, and the compiled kernel."""
    return (x.dim() == 2 and weight.dim() == 2 and x.dtype == torch.float32 and weight.dtype == torch.float32
            and x.stride(1) == 1 and weight.shape[1] == x.shape[1] and cpu_inference(x)
            and _extension() is not None)


def rows_gemm(x: Tensor, weight: Tensor, bias: Tensor | None, relu: bool = False) -> Tensor:
    """``act(x @ weight^T + bias)``: rows ``x [n, K]`` (any row stride) -> ``[n, N]``, on the compiled
    block GEMM (8 rows x 32 columns per block; no fixed cost beyond the call, where oneDNN's inner
    product spends about 15 us). Only where :func:`rows_gemm_applies`."""
    return _extension().linear_rows(x, _blocked(weight, "rows", lambda w: w.t(), _GEMM_BLOCK), _bias(weight, bias),
                                    relu)


def blocked_weight(weight: Tensor) -> Tensor:
    """``weight [C', C, 3, 3]`` as ``[ceil(C'/8), C*9, 8]``: blocks of 8 output channels, taps in
    ``(c, kh, kw)`` order, zero-padded; cached with the weight (:func:`ponder.fast.weight_cache.derived`)."""
    return _blocked(weight, "small_conv", lambda w: w.permute(1, 2, 3, 0).reshape(-1, w.shape[0]), _BLOCK)


def gemm_weight(weight: Tensor) -> Tensor:
    """``weight [C', C, 3, 3]`` as ``[ceil(C'/32), 9C, 32]``: blocks of 32 output channels, taps in
    ``(kh, kw, c)`` order (the patches' order), zero-padded; cached with the weight."""
    return _blocked(weight, "gemm", lambda w: w.permute(2, 3, 1, 0).reshape(-1, w.shape[0]), _GEMM_BLOCK)


def _blocked(weight: Tensor, name: str, taps: Callable[[Tensor], Tensor], block: int) -> Tensor:
    """``taps(weight)`` (``[R, N]``: one row per input tap, one column per output) as
    ``[ceil(N/block), R, block]``, zero-padded, cached with the weight under ``name``."""
    def make() -> Tensor:
        t = taps(weight.detach().float())
        cout, blocks = t.shape[1], -(-t.shape[1] // block)
        padded = t.new_zeros(t.shape[0], blocks * block)
        padded[:, :cout] = t
        return padded.view(-1, blocks, block).permute(1, 0, 2).contiguous()

    return derived(weight, (name,), make)


def _bias(weight: Tensor, bias: Tensor | None) -> Tensor:
    return bias if bias is not None else weight.new_zeros(weight.shape[0], dtype=torch.float32)
