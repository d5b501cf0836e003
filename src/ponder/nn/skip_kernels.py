"""The block-skipping sparse executor at inference: BN folded into the convolutions, channels-last maps.

Without autograd on the CPU (fast paths on: :func:`ponder.fast.cpu_inference`) and with the blocks in
eval mode, :class:`~ponder.nn.skip.BlockSkipper`'s sparse executor runs each block on these kernels:
a column every sample keeps runs the whole unit as the dense network on the same kernels does
(:func:`~ponder.nn.dense_units.dense_unit_channels_last`, what ``ponder bench`` times as ``dense*``);
a mixed column gathers each option's rows from the channels-last map (a view of ``[B, H, W, C]`` rows,
so gathered rows stay channels-last), runs the folded branch or first conv on them
(:func:`~ponder.nn.sparse_units.folded_branch`) and scatters them into the skipped samples' output.

At batch 1 every sample of a block takes the same option, and a gated ResNet runs each block through
:func:`bound_options`: one runner per option with the folded convolutions bound to their kernels once
(a :mod:`ponder.fast.plan`), the same computation as :func:`run_options` without its lookups.

Options per sample: ``0`` skip, ``K - 1`` the whole block, ``1`` its first conv only when ``K = 3``.
A skipped sample gets ``skip_path(x)`` (a model's own module) or the rule's output: ``shortcut(x)``, or
``relu(shortcut(x))``, which is ``x`` itself for an identity shortcut when ``nonnegative`` (every block
input is a ReLU output, as in the gated ResNets), so skipping such a block costs no pass over memory.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from ponder import fast
from ponder.nn.dense_units import dense_unit_channels_last
from ponder.nn.protocols import ResidualBlock
from ponder.nn.sparse_units import Runner, bound_branch, folded_branch, folded_shortcut, unit_layout

CL = torch.channels_last


def applies(block: ResidualBlock, x: Tensor) -> bool:
    """Whether the inference kernels run ``block`` on ``x``: fast paths on, no autograd, CPU, float32, eval."""
    return fast.cpu_inference(x) and x.dtype == torch.float32 and not block.training


def rows(x: Tensor, idx: Tensor) -> Tensor:
    """Samples ``idx`` of a channels-last ``x [B, C, H, W]``, channels-last (gathered as ``[B, H, W, C]`` rows)."""
    return x.permute(0, 2, 3, 1).index_select(0, idx).permute(0, 3, 1, 2)


def put_rows(out: Tensor, idx: Tensor, y: Tensor) -> None:
    """``out[idx] = y`` in place, both channels-last."""
    out.permute(0, 2, 3, 1).index_copy_(0, idx, y.permute(0, 2, 3, 1))


def first_conv_folded(block: ResidualBlock, x: Tensor) -> Tensor:
    """``bn1(conv1(x))`` with BN folded (:func:`ponder.fast.conv_bn`)."""
    return fast.conv_bn(x, block.conv1, block.bn1, relu=False)


def skip_path_folded(path: nn.Module, x: Tensor) -> Tensor:
    """A skip module on ``x``; a ``Conv2d -> BatchNorm2d [-> ReLU]`` one with BN folded."""
    parts = list(path) if isinstance(path, nn.Sequential) else []
    if (len(parts) in (2, 3) and isinstance(parts[0], nn.Conv2d) and isinstance(parts[1], nn.BatchNorm2d)
            and (len(parts) == 2 or isinstance(parts[2], nn.ReLU)) and not path.training):
        return fast.conv_bn(x, parts[0], parts[1], relu=len(parts) == 3).contiguous(memory_format=CL)
    return path(x).contiguous(memory_format=CL)


def skip_output(block: ResidualBlock, x: Tensor, relu: bool, nonnegative: bool, own: bool,
                skip_path: nn.Module | None = None) -> Tensor:
    """What skipped samples output (module docstring), channels-last; ``own``: ``x`` may be returned or
    written into (it is the executor's own intermediate)."""
    if skip_path is not None:
        return skip_path_folded(skip_path, x)
    if block.downsample is None and (nonnegative or not relu):
        return x if own else x.clone(memory_format=CL)
    sc = folded_shortcut(block, x).contiguous(memory_format=CL)
    return sc.relu_() if relu else sc


def run_options(block: ResidualBlock, x: Tensor, option: Tensor, counts: list[int], *, relu: bool,
                nonnegative: bool, own: bool = False, skip_path: nn.Module | None = None) -> Tensor:
    """``block`` on channels-last ``x [B, C, H, W]`` under hard options ``option [B]`` (long), ``counts[k]``
    samples taking option ``k`` (``len(counts)`` = K, 2 or 3); returns the channels-last output.

    ``relu``: the skip rule is ``relu(shortcut(x))``; ``nonnegative``: ``x >= 0`` (module docstring).
    """
    n, k = x.shape[0], len(counts)
    if counts[-1] == n:
        return dense_unit_channels_last(block, x)
    if counts[0] == n:
        return skip_output(block, x, relu, nonnegative, own, skip_path)
    if skip_path is not None:  # the skip path on the skipped samples, the unit on the kept ones
        full = option.eq(k - 1).nonzero().squeeze(1)
        skipped = option.eq(0).nonzero().squeeze(1)
        xf = rows(x, full)
        y = folded_branch(block, xf).add_(folded_shortcut(block, xf)).relu_()
        out = torch.empty((n, *y.shape[1:]), dtype=y.dtype, device=y.device).contiguous(memory_format=CL)
        put_rows(out, full, y)
        put_rows(out, skipped, skip_path_folded(skip_path, rows(x, skipped)))
        return out
    identity = block.downsample is None
    sc = x if identity else folded_shortcut(block, x).contiguous(memory_format=CL)
    if identity and (nonnegative or not relu):
        out = x if own else x.clone(memory_format=CL)
    else:
        out = F.relu(sc) if relu else (sc if not identity else x.clone(memory_format=CL))
    for o in range(1, k):
        if counts[o] == 0:
            continue
        idx = option.eq(o).nonzero().squeeze(1)
        xi = rows(x, idx)
        y = folded_branch(block, xi) if o == k - 1 else first_conv_folded(block, xi)
        put_rows(out, idx, y.add_(xi if identity else rows(sc, idx)).relu_())
    return out


def bound_options(block: ResidualBlock, x: Tensor, num_options: int, *, relu: bool, nonnegative: bool,
                  skip_path: nn.Module | None = None) -> list[Runner]:
    """One runner per option (skip, [first conv,] whole block) for inputs shaped like channels-last ``x`` on
    which every sample takes that option (batch 1), each ``run(x) ->`` the channels-last output
    :func:`run_options` gives (``own``: a skipped identity block returns ``x``), the convolutions bound to
    their kernels now (:func:`~ponder.nn.sparse_units.bound_branch`); valid while the block's weights are
    unchanged (the caller's :mod:`ponder.fast.plan` checks)."""
    identity = block.downsample is None

    def residual(y: Tensor, t: Tensor) -> Tensor:
        return y.add_(t if identity else folded_shortcut(block, t)).relu_()

    runners: list[Runner] = [lambda t: skip_output(block, t, relu, nonnegative, True, skip_path)]
    if num_options == 3:
        first = bound_branch(block, x, upto=1)
        runners.append(lambda t: residual(first(t), t))
    if unit_layout(block, x) == "nchw":
        runners.append(lambda t: dense_unit_channels_last(block, t))
        return runners
    branch = bound_branch(block, x)
    runners.append(lambda t: residual(branch(t), t).contiguous(memory_format=CL))
    return runners
