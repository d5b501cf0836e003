"""Fast paths only early exit needs: exit heads as prepared plans, and the sparse executor's
bookkeeping after an exit as one compiled call (``csrc/exit_step.cpp``).

**Exit heads** (MSDNet / RANet: two 3x3/2 conv-BN-ReLU, 2x2 mean, linear) are work only early exit
does, and at batch 1 the route lookups, the pooling and the linear call cost as much as a
convolution. :func:`exit_head` keeps, per head, input shape, batch bucket and thread count, a *plan*
(:func:`ponder.fast.prepared`, kept until a weight changes): the faster, timed once per machine (a
stored route), of the two folded convolutions as prepared calls (:func:`ponder.fast.conv.conv2d_runner`)
then the mean and the linear layer, and the whole head as one compiled call
(:func:`ponder.fast.small_conv.bound_exit_head`, where it applies). At batch 1 the latter (head 0: 43 ->
33 us per call on this project's CPU).
"""

from __future__ import annotations

from typing import Any, Callable

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor
from torch.utils._pytree import tree_flatten, tree_unflatten

from ponder.fast.conv import conv2d_runner
from ponder.fast.fold import fold_conv_bn_dense
from ponder.fast.native import load
from ponder.fast.plan import prepared
from ponder.fast.routes import choose
from ponder.fast.small_conv import bound_exit_head, conv3x3_applies
from ponder.fast.switch import cpu_inference
from ponder.layout import is_channels_last

Pairs = list[tuple[nn.Conv2d, nn.BatchNorm2d]]


def pool_flat(x: Tensor, avg: nn.AvgPool2d) -> Tensor:
    """A head's ``avg`` pooling, flattened: ``[B, C, h, w]`` -> ``[B, C]`` (the mean on a 2x2 map: one op)."""
    if x.shape[2:] == (2, 2):
        return x.mean((2, 3))
    return avg(x).flatten(1)


def applies(x: Tensor) -> bool:
    """Whether :func:`exit_head` runs on ``x``: fast paths on, channels-last float32 CPU inference."""
    return is_channels_last(x) and x.dtype == torch.float32 and cpu_inference(x)


def exit_head(head: nn.Module, x: Tensor, pairs: Pairs, avg: nn.AvgPool2d,
              linear: nn.Linear) -> tuple[Tensor, Tensor]:
    """(pooled feature ``[B, C]``, logits ``[B, N]``) of the head ``pairs`` (two (conv, BN) with ReLU),
    ``avg``, ``linear`` (all within the module ``head``) on ``x [B, C_in, h, w]``, from its plan. Only
    where :func:`applies` (the caller checks)."""
    key = ("exit_head", 1 << (x.shape[0] - 1).bit_length(), tuple(x.shape[1:]), torch.get_num_threads())

    def build() -> Callable[[Tensor], tuple[Tensor, Tensor]]:
        folded = [fold_conv_bn_dense(conv, bn, channels_last=True) for conv, bn in pairs]
        return _plan(x, pairs, folded, avg, linear)

    return prepared(head, key, build)(x)


def _plan(x: Tensor, pairs: Pairs, folded: list[tuple[Tensor, Tensor]], avg: nn.AvgPool2d,
          linear: nn.Linear) -> Callable[[Tensor], tuple[Tensor, Tensor]]:
    runners, y = [], x
    for (weight, bias), (conv, _) in zip(folded, pairs):
        runners.append(conv2d_runner(y, weight, bias, conv.stride[0], conv.padding[0], relu=True))
        y = runners[-1](y)

    def layer_by_layer(t: Tensor) -> tuple[Tensor, Tensor]:  # (holds no module that keys a plan)
        for run in runners:
            t = run(t)
        feat = pool_flat(t, avg)
        return feat, F.linear(feat, linear.weight, linear.bias)

    if y.shape[2:] != (2, 2) or not all(conv3x3_applies(t, w, b, 2, 1) for t, (w, b) in zip((x, y), folded)):
        return layer_by_layer
    whole = bound_exit_head([w for w, _ in folded], [b for _, b in folded], linear)
    key = (tuple(x.shape), tuple(folded[0][0].shape), tuple(folded[1][0].shape), tuple(linear.weight.shape),
           torch.get_num_threads())
    route = choose("exit_head", key, lambda: [("prepared", lambda: layer_by_layer(x)), ("whole", lambda: whole(x))])
    return whole if route == "whole" else layer_by_layer


def exit_step(leave: Tensor, here: Tensor, logits: Tensor, out_logits: Tensor, exit_index: Tensor, k: int,
              state: Any) -> tuple[Tensor, Any] | None:
    """The sparse executor's bookkeeping after exit ``k`` in one compiled call, or ``None``.

    The samples with ``leave [n]`` (bool) write ``logits [n, classes]`` into ``out_logits [B, classes]``
    and ``k`` into ``exit_index [B]`` at their batch positions ``here [n]``; returns the staying
    samples' positions and the pytree ``state`` with every tensor gathered to them (what
    ``select_samples`` gives; non-tensor leaves kept). ``None`` (the caller runs index ops instead)
    without the compiled kernels, with autograd, off the CPU, for other dtypes, or for a state
    tensor whose samples are not each one contiguous block.
    """
    if (not cpu_inference(logits) or logits.dtype != torch.float32 or leave.dtype != torch.bool
            or here.dtype != torch.long or exit_index.dtype != torch.long or out_logits.dtype != torch.float32):
        return None
    ext = load("exit_step")
    if ext is None:
        return None
    leaves, spec = tree_flatten(state)
    slots = [i for i, t in enumerate(leaves) if isinstance(t, Tensor)]
    n = leave.shape[0]
    for i in slots:
        t = leaves[i]
        if t.device.type != "cpu" or t.dim() == 0 or t.shape[0] != n or not (
                t.is_contiguous() or (t.dim() == 4 and t.is_contiguous(memory_format=torch.channels_last))):
            return None
    out = ext.exit_step(leave.contiguous(), here.contiguous(), logits.contiguous(), out_logits, exit_index, k,
                        [leaves[i] for i in slots])
    for i, t in zip(slots, out[1:]):
        leaves[i] = t
    return out[0], tree_unflatten(leaves, spec)
