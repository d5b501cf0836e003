"""BatchNorm folded into the convolution before it, for inference: the folded weights and their cache.

:func:`fold_conv_bn` gives ``conv`` followed by eval-mode ``bn`` as one GEMM weight and bias (the sparse
kernels' layout); :func:`fold_conv_bn_dense` the same in convolution layout; :func:`fold_linear_bn` a
``Linear`` followed by an eval-mode ``BatchNorm1d`` (the gated ResNets' routers). With fast paths on the
results are cached per convolution until a parameter or running statistic changes (:func:`fold_key`);
off, they are computed on every call.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass
from typing import Callable, TypeVar

import torch
import torch.nn as nn
from torch import Tensor

from ponder.fast.plan import clear_plans
from ponder.fast.switch import enabled

T = TypeVar("T")


@dataclass(frozen=True)
class FoldedConv:
    """A conv (+ eval-mode BN) as one GEMM on gathered rows: ``rows [n, k*k*C_in] @ weight^T + bias``."""

    weight: Tensor  # [C_out, k*k*C_in], columns ordered (kh, kw, C_in) (``F.linear`` layout)
    bias: Tensor  # [C_out]
    k: int
    stride: int
    padding: int


_FOLD_CACHE: "weakref.WeakKeyDictionary[nn.Module, tuple[tuple, FoldedConv]]" = weakref.WeakKeyDictionary()


def _tensor_key(t: Tensor | None) -> tuple:
    # address, version and dtype: .to() (device or dtype) allocates while the old storage still lives,
    # so a moved or cast tensor always has a new address
    return () if t is None else (t.data_ptr(), t._version, t.dtype)


def fold_key(conv: nn.Conv2d | nn.Linear, bn: nn.BatchNorm2d | nn.BatchNorm1d | None) -> tuple:
    """Changes whenever ``conv``'s (or a Linear's) or ``bn``'s parameters or running statistics change (cache
    key of folded weights)."""
    # a train-mode forward updates the running statistics in place without bumping their version;
    # it does bump num_batches_tracked's (a Python-side add_), which the key therefore includes
    p = conv._parameters
    key = (_tensor_key(p["weight"]), _tensor_key(p["bias"]))
    if bn is None:
        return key
    q, b = bn._parameters, bn._buffers
    return key + (_tensor_key(q["weight"]), _tensor_key(q["bias"]), _tensor_key(b["running_mean"]),
                  _tensor_key(b["running_var"]), _tensor_key(b["num_batches_tracked"]), bn.eps)


def clear_fold_cache() -> None:
    """Forget folded weights and the plans built on them (:mod:`ponder.fast.plan`; needed only after
    in-place edits through ``.data``, which keep ``_version``)."""
    _FOLD_CACHE.clear()
    _LINEAR_FOLD.clear()
    clear_plans()


def fold_conv_bn(conv: nn.Conv2d, bn: nn.BatchNorm2d | None = None) -> FoldedConv:
    """``conv`` followed by eval-mode ``bn`` as a :class:`FoldedConv` (cached until a parameter changes).

    Supports square kernels, any stride and zero padding, ``groups = 1``, ``dilation = 1``. The
    cache notices optimizer steps, train-mode forwards, ``load_state_dict`` and ``.to()`` (tensor
    versions and addresses); a hit costs about 2 us.
    """
    if bn is not None and bn.training:
        raise ValueError("sparse convolution folds BatchNorm with running statistics; call model.eval() "
                         "(or use the masked executor to train).")
    return _cached(_FOLD_CACHE, conv, bn, lambda: _fold_conv_bn(conv, bn))


def _cached(cache: weakref.WeakKeyDictionary, layer: nn.Module, bn: nn.Module | None, make: Callable[[], T]) -> T:
    """``make()``, the folding of ``layer`` and ``bn``, kept in ``cache`` while :func:`fold_key` is the same
    (fast paths on; off, computed on every call)."""
    if not enabled():
        return make()
    key = fold_key(layer, bn)
    hit = cache.get(layer)
    if hit is not None and hit[0] == key:
        return hit[1]
    value = make()
    cache[layer] = (key, value)
    return value


def _fold_conv_bn(conv: nn.Conv2d, bn: nn.BatchNorm2d | None) -> FoldedConv:
    k = conv.kernel_size[0]
    if isinstance(conv.padding, str) or conv.groups != 1 or conv.dilation != (1, 1) \
            or conv.kernel_size[0] != conv.kernel_size[1] or conv.stride[0] != conv.stride[1] \
            or conv.padding[0] != conv.padding[1] or conv.padding_mode != "zeros":
        raise ValueError(f"sparse convolution supports square kernels, equal strides/padding, groups=1, "
                         f"dilation=1 and zero padding; got {conv}. Use the masked executor for this layer.")
    if bn is not None and bn.running_mean is None:
        raise ValueError("sparse convolution folds BatchNorm with running statistics; build it with "
                         "track_running_stats=True (or use the masked executor).")
    with torch.no_grad():
        w = conv.weight
        bias = conv.bias if conv.bias is not None else torch.zeros(w.shape[0], dtype=w.dtype, device=w.device)
        if bn is not None:
            scale, shift = bn_scale_shift(bn)
            w = w * scale[:, None, None, None]
            bias = (bias - bn.running_mean) * scale + shift
        weight = w.permute(0, 2, 3, 1).reshape(w.shape[0], -1).contiguous()
        return FoldedConv(weight, bias.detach().clone(), k, conv.stride[0], conv.padding[0])


def bn_scale_shift(bn: nn.BatchNorm1d | nn.BatchNorm2d) -> tuple[Tensor, Tensor]:
    """Eval-mode ``bn`` as ``y = x * scale + shift`` per channel: ``(scale [C], shift [C])`` before the
    running mean is taken out (``shift`` is beta, or zeros without affine parameters)."""
    scale = torch.rsqrt(bn.running_var + bn.eps)
    if bn.weight is not None:
        scale = scale * bn.weight
    return scale, bn.bias if bn.bias is not None else torch.zeros_like(scale)


_DENSE_FOLD: "weakref.WeakKeyDictionary[nn.Module, tuple[FoldedConv, dict[bool, Tensor]]]" = \
    weakref.WeakKeyDictionary()


def fold_conv_bn_dense(conv: nn.Conv2d, bn: nn.BatchNorm2d | None, channels_last: bool) -> tuple[Tensor, Tensor]:
    """:func:`fold_conv_bn` in conv layout: ``(weight [C_out, C_in, k, k], bias [C_out])`` for ``F.conv2d``.

    ``channels_last``: the weight's memory format; give the input's layout (oneDNN reorders a weight
    of the other layout on every call). Cached with the folded GEMM weights, so it follows the same
    invalidation rules.
    """
    f = fold_conv_bn(conv, bn)
    hit = _DENSE_FOLD.get(conv)
    if hit is None or hit[0] is not f:
        hit = (f, {})
        _DENSE_FOLD[conv] = hit
    weight = hit[1].get(channels_last)
    if weight is None:
        w = f.weight.reshape(conv.out_channels, f.k, f.k, conv.in_channels).permute(0, 3, 1, 2)
        weight = w.contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
        hit[1][channels_last] = weight
    return weight, f.bias


_LINEAR_FOLD: "weakref.WeakKeyDictionary[nn.Module, tuple[tuple, tuple[Tensor, Tensor]]]" = weakref.WeakKeyDictionary()


def fold_linear_bn(linear: nn.Linear, bn: nn.BatchNorm1d) -> tuple[Tensor, Tensor]:
    """``bn(linear(x))`` with eval-mode ``bn`` as one ``(weight^T [in, out], bias [out])`` for ``torch.addmm(bias,
    x, weight^T)``; cached until a parameter or running statistic changes (:func:`fold_key`; fast paths on)."""
    if bn.training or bn.running_mean is None:
        raise ValueError("folding BatchNorm1d needs it in eval mode with running statistics; call model.eval()")
    return _cached(_LINEAR_FOLD, linear, bn, lambda: _fold_linear_bn(linear, bn))


def _fold_linear_bn(linear: nn.Linear, bn: nn.BatchNorm1d) -> tuple[Tensor, Tensor]:
    with torch.no_grad():
        scale, shift = bn_scale_shift(bn)
        bias = linear.bias if linear.bias is not None else torch.zeros_like(scale)
        return (linear.weight * scale[:, None]).t().contiguous(), (bias - bn.running_mean) * scale + shift
