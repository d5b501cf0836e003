"""Adaptive computation time (Graves' ACT as used by SACT) over a block of residual units.

A block has ``L`` units; units ``1..L-1`` emit a halting score ``h`` in [0, 1] and the last
unit implicitly has ``h = 1``. With ``eps = 0.01``:

* halting step ``N = min{n : sum_{l<=n} h_l >= 1 - eps}`` (an integer, no gradient);
* remainder ``R = 1 - sum_{l<N} h_l``;
* halting distribution ``p_l = h_l`` (l < N), ``p_N = R``, ``0`` after N;
* block output: the mean-field sum ``sum_l p_l * x_l``;
* ponder cost ``rho = N + R`` with ``d rho / d h_l = -1`` for ``l < N`` (autograd gives it).

Every quantity has an arbitrary per-position shape: ``[B]`` for ACT (one decision per
image) and ``[B, H, W]`` for SACT (one per spatial position). Units are processed one
at a time (unit ``l``'s mask depends on the scores of units ``< l``), vectorised over
everything else.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from ponder import fast
from ponder.fast.fold import bn_scale_shift
from ponder.layout import is_channels_last

HALT_EPS = 0.01
"""Halting threshold slack: a position halts once its cumulative score reaches ``1 - eps``."""

HALT_BIAS_INIT = -3.0
"""Initial bias of the halting logits: sigmoid(-3) ~ 0.047, so training starts running nearly every unit."""

HALT_CONV_MAX_ELEMENTS = 1 << 16
"""Inputs of at most this many elements (``B * C * H * W``) let the eval-mode spatial halting branch
choose between two routes for the 3x3 term (GEMM and ``F.fold``, or GEMM and nine shifted adds), a
stored route per shape and layout; larger ones always take the shifted adds. On this project's
CPU the fold route wins on batch-1 CIFAR maps (13-22 us against 38-44 us) and loses on large
channels-last batches (its taps need a transposing copy there)."""


@dataclass
class ACTResult:
    """What ACT produced for one block (per-position shape ``S``: ``[B]`` or ``[B, H, W]``).

    Attributes:
        output: the mean-field block output ``sum_l p_l x_l`` (``None`` when no states were given).
        n: ``S`` float, halting step N (number of units run), no gradient.
        remainder: ``S`` remainder R (differentiable w.r.t. the scores of units before N).
        ponder_cost: ``S`` rho = N + R.
        distribution: ``S + [L]`` halting distribution p (sums to 1 over the last dim).
    """

    output: Tensor | None
    n: Tensor
    remainder: Tensor
    ponder_cost: Tensor
    distribution: Tensor


class ACTAccumulator:
    """Runs the ACT recurrence over the ``num_units`` units of one block, one unit at a time.

    Usage: before unit ``l`` read :attr:`running` (positions that must still compute it;
    halted positions copy their input forward), run the unit, then call
    ``step(x_l, h_l)`` with the unit's output state and its halting scores (``None`` for the
    last unit). After the last unit, :meth:`result` gives output, N, R, rho and p.
    """

    def __init__(self, num_units: int, shape: tuple[int, ...], device: torch.device | str,
                 eps: float = HALT_EPS, dtype: torch.dtype | None = None) -> None:
        if num_units < 1:
            raise ValueError(f"an ACT block needs at least one unit, got num_units={num_units}")
        self.num_units, self.eps = num_units, eps
        self.shape = tuple(shape)
        self.running = torch.ones(self.shape, dtype=torch.bool, device=device)
        self._hsum = torch.zeros(self.shape, device=device, dtype=dtype)  # sum of h_l over units before N
        self._n = torch.zeros(self.shape, device=device, dtype=dtype)
        self._remainder = torch.zeros(self.shape, device=device, dtype=dtype)
        self._dist: list[Tensor] = []
        self._ran: list[Tensor] = []
        self._output: Tensor | None = None

    @property
    def units_done(self) -> int:
        return len(self._dist)

    @property
    def ran_units(self) -> Tensor:
        """``S + [units done]`` bool: which positions ran which unit."""
        return torch.stack(self._ran, -1)

    def step(self, x: Tensor | None, h: Tensor | None) -> None:
        """Account for the next unit: its output state ``x`` (``[B, C, ...]`` or ``None``) and scores ``h`` (shape S).

        ``h`` is ignored where a position already halted (its later scores count as 0);
        it must be ``None`` only for the last unit.
        """
        last = self.units_done == self.num_units - 1
        if self.units_done >= self.num_units:
            raise RuntimeError(f"ACT block has only {self.num_units} units; step() was called once too often")
        if h is None and not last:
            raise ValueError(f"unit {self.units_done + 1} of {self.num_units} needs halting scores; only the last unit has none")
        run = self.running
        hsum_now = self._hsum
        if not torch.is_grad_enabled():
            self._step_inference(x, h, run, last)
            return
        if last:
            halts = run
            p = torch.where(run, 1.0 - hsum_now, torch.zeros_like(hsum_now))
        else:
            h = h.to(hsum_now.dtype)
            halts = run & ((hsum_now.detach() + h.detach()) >= 1.0 - self.eps)
            keeps = run & ~halts
            p = torch.where(halts, 1.0 - hsum_now, torch.where(keeps, h, torch.zeros_like(h)))
            self._hsum = hsum_now + torch.where(keeps, h, torch.zeros_like(h))
        self._remainder = torch.where(halts, 1.0 - hsum_now, self._remainder)
        self._n = self._n + run.to(self._n.dtype)
        self._dist.append(p)
        self._ran.append(run)
        self.running = run & ~halts
        if x is not None:
            weight = _broadcast_to_state(p, x)
            self._output = weight * x if self._output is None else self._output + weight * x

    def step_fused(self, x: Tensor, halting: tuple[Tensor, Tensor, float, float] | None, forced_h: Tensor | None,
                   next_costs: tuple[float, float, float, float] | None
                   ) -> tuple[Tensor | None, Tensor | None, int, int] | None:
        """:meth:`step` at inference with a SACT unit's halting scores computed from its output ``x`` in the same
        compiled call (:func:`ponder.fast.sact_step`): ``halting`` is the branch's folded weights
        (:meth:`SpatialHaltingBranch.folded_weights`; ``None`` for the last unit), ``forced_h`` replaces the
        scores (forced decisions). With ``next_costs`` also the next unit's first-conv mask (the new
        :attr:`running` dilated 3x3), its per-sample MACs and the active counts over the batch. Returns
        ``(first-conv mask, MACs, running positions, dilated positions)``, or ``None`` (nothing done) where the
        kernel does not apply.
        """
        if torch.is_grad_enabled() or (halting is None) != (self.units_done == self.num_units - 1):
            return None
        fused = fast.sact_step(self._hsum, self._n, self._remainder, self.running, x, self._output, halting,
                               forced_h, self.eps, next_costs)
        if fused is None:
            return None
        p, running, self._output, first, macs, n_running, n_first = fused
        self._dist.append(p)
        self._ran.append(self.running)
        self.running = running
        return first, macs, n_running, n_first

    def finish_halted(self) -> None:
        """Step all remaining units at once, without autograd, once no position is running.

        What :meth:`step` would record for each of them: nothing runs, every ``p`` is 0, and the
        output and the sums stay as they are; but no element-wise work is done.
        """
        if torch.is_grad_enabled():
            raise RuntimeError("finish_halted() is for inference: with autograd, step() through every unit")
        if bool(self.running.any()):
            raise RuntimeError("finish_halted() needs every position halted; some are still running")
        zero = torch.zeros_like(self._hsum)
        while self.units_done < self.num_units:
            self._dist.append(zero)
            self._ran.append(self.running)

    def _step_inference(self, x: Tensor | None, h: Tensor | None, run: Tensor, last: bool) -> None:
        """:meth:`step` without autograd: the same values (same expressions for the halting test and
        the sums) in about half the element-wise ops, and the state accumulated in place."""
        if h is not None:
            h = h.to(self._hsum.dtype)
        fused = fast.act_step(self._hsum, self._n, self._remainder, run, h, x, self._output, self.eps, last)
        if fused is not None:  # one pass (compiled kernel): the same sums, p and halting test
            p, self.running, self._output = fused
            self._dist.append(p)
            self._ran.append(run)
            return
        rest = 1.0 - self._hsum
        if last:
            halts, p = run, rest * run
        else:
            cum = self._hsum + h
            halts = (cum >= 1.0 - self.eps).logical_and_(run)
            keeps = run ^ halts
            p = torch.where(halts, rest, h * keeps)
            self._hsum = torch.where(keeps, cum, self._hsum)
        self._remainder = torch.where(halts, rest, self._remainder)
        self._n = self._n + run
        self._dist.append(p)
        self._ran.append(run)
        self.running = run ^ halts
        if x is None:
            return
        weight = _broadcast_to_state(p, x)
        if self._output is None:  # empty_like keeps x's memory format (channels-last from the sparse executor)
            self._output = torch.mul(weight, x, out=torch.empty_like(x))
        else:  # in place, in one memory format: mixing NCHW and channels-last makes addcmul_ ~15x slower
            self._output.addcmul_(weight, _like_layout(x, self._output))

    def result(self) -> ACTResult:
        """Output, N, R, rho and p once all units were stepped."""
        if self.units_done != self.num_units:
            raise RuntimeError(f"ACT block stepped {self.units_done} of {self.num_units} units; finish the block first")
        return ACTResult(output=self._output, n=self._n, remainder=self._remainder,
                         ponder_cost=self._n + self._remainder, distribution=torch.stack(self._dist, -1))


def _like_layout(x: Tensor, ref: Tensor) -> Tensor:
    """``x`` in ``ref``'s memory format (channels-last or contiguous; a copy only when they differ)."""
    if x.dim() == 4 and is_channels_last(ref):
        return x.contiguous(memory_format=torch.channels_last)
    return x.contiguous() if ref.is_contiguous() else x


def _broadcast_to_state(p: Tensor, x: Tensor) -> Tensor:
    """Per-position ``p`` (``[B]`` or ``[B, H, W]``) shaped to multiply a state ``x [B, C, ...]``."""
    p = p.to(x.dtype).unsqueeze(1)
    return p.reshape(*p.shape, *([1] * (x.dim() - p.dim())))


def act_halting(h: Tensor, eps: float = HALT_EPS) -> ACTResult:
    """ACT quantities from all halting scores ``h [*S, L-1]`` of an ``L``-unit block (no states)."""
    acc = ACTAccumulator(h.shape[-1] + 1, tuple(h.shape[:-1]), h.device, eps, dtype=h.dtype)
    for l in range(h.shape[-1]):
        acc.step(None, h[..., l])
    acc.step(None, None)
    return acc.result()


class HaltingBranch(nn.Module):
    """ACT halting scores ``[B]`` from a unit output ``x [B, C, H, W]``: BN -> GAP -> linear -> sigmoid.

    As the reference (GAP -> BN -> 1x1 conv -> sigmoid), except that the BN normalises the map
    before pooling, which keeps it batch-1 safe in training. The BN matters: unit outputs are
    non-negative ReLU maps, and without centring the ponder-cost gradient moves every weight the
    same way and the scores saturate within a few steps. The linear layer starts with zero
    weights and bias -3, so every image starts with ``h = sigmoid(-3)`` and runs nearly all units.
    Cost: ``C`` MACs per image.
    """

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.bn = nn.BatchNorm2d(channels)
        self.fc = nn.Linear(channels, 1)
        nn.init.zeros_(self.fc.weight)
        nn.init.constant_(self.fc.bias, HALT_BIAS_INIT)

    def forward(self, x: Tensor) -> Tensor:
        if self.training:
            pooled = self.bn(x).mean((2, 3))
        else:  # eval BN is affine per channel: pool first, then normalise the [B, C] means
            scale, shift = bn_affine(self.bn)
            pooled = x.mean((2, 3)) * scale + shift
        return torch.sigmoid(self.fc(pooled))[:, 0]


class SpatialHaltingBranch(nn.Module):
    """SACT halting scores ``[B, H, W]`` from a unit output ``x [B, C, H, W]``.

    ``z = BN(x)``; ``h = sigmoid(conv3x3_{C->1}(z) + linear_{C->1}(GAP(z)))``: a local term (bias
    -3) plus a global term (no bias) broadcast over the map. The reference has one BN per term
    (the global one on pooled features); one BN before pooling is batch-1 safe and centres both
    inputs, which keeps the ponder-cost gradient from saturating the scores (see
    :class:`HaltingBranch`). Both terms start with zero weights, so the map starts at
    sigmoid(-3). Cost: ``9 C`` MACs per position plus ``C`` per image.
    """

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.bn = nn.BatchNorm2d(channels)
        self.local = nn.Conv2d(channels, 1, 3, padding=1)
        self.glob = nn.Linear(channels, 1, bias=False)
        nn.init.zeros_(self.local.weight)
        nn.init.constant_(self.local.bias, HALT_BIAS_INIT)
        nn.init.zeros_(self.glob.weight)

    def forward(self, x: Tensor) -> Tensor:
        if self.training or not fast.enabled():  # (the plain reference: fast paths off)
            z = self.bn(x)
            return torch.sigmoid(self.local(z)[:, 0] + self.glob(z.mean((2, 3)))[:, :, None])
        if fast.spatial_halting_applies(x):  # one GEMM and one pass over the map (compiled kernel)
            return fast.spatial_halting(x, *self.folded_weights())
        scale, shift = bn_affine(self.bn)  # eval: BN folded into both terms
        glob = self.glob(x.mean((2, 3)) * scale + shift)[:, :, None]
        return torch.sigmoid(self._local_eval(x, scale, shift) + glob)

    def _local_eval(self, x: Tensor, scale: Tensor, shift: Tensor) -> Tensor:
        """``conv3x3(BN(x))[:, 0]`` in eval mode by the faster of :meth:`_local_fold` and
        :meth:`_local_taps` (measured once per shape and layout up to :data:`HALT_CONV_MAX_ELEMENTS`)."""
        if x.numel() > HALT_CONV_MAX_ELEMENTS:
            return self._local_taps(x, scale, shift)
        key = (tuple(x.shape), is_channels_last(x), x.dtype, x.device, torch.get_num_threads())
        route = fast.choose("halting_local", key, lambda: [  # ties: the taps route
            ("taps", lambda: self._local_taps(x, scale, shift)), ("fold", lambda: self._local_fold(x, scale, shift))])
        return (self._local_fold if route == "fold" else self._local_taps)(x, scale, shift)

    def _local_fold(self, x: Tensor, scale: Tensor, shift: Tensor) -> Tensor:
        """``conv3x3(BN(x))[:, 0]`` in eval mode as the tap GEMM (:meth:`_tap_maps`) and one ``F.fold``.

        ``F.fold`` (col2im) adds each position's 9 tap values into the 3x3 neighbourhood around it,
        which is the convolution with the taps in mirrored order; taps of positions outside the map
        do not exist, so it is exact at the borders (BN(x) is zero-padded). The same ``9 C`` MACs per
        position as the convolution; two calls in all, against ten for :meth:`_local_taps`.
        """
        b, _, hgt, wid = x.shape
        taps = self._tap_maps(x, scale, shift, mirrored=True).transpose(0, 1).reshape(b, 9, hgt * wid)
        return F.fold(taps, (hgt, wid), 3, padding=1)[:, 0] + self.local.bias

    def _local_taps(self, x: Tensor, scale: Tensor, shift: Tensor) -> Tensor:
        """``conv3x3(BN(x))[:, 0]`` in eval mode as the tap GEMM (:meth:`_tap_maps`) plus 9 shifted adds.

        Exact, zero padding included (taps outside the map read zeros of the padded tap maps), and
        much faster than a ``C -> 1`` 3x3 conv for wide layers; the same ``9 C`` MACs per position.
        """
        hgt, wid = x.shape[2], x.shape[3]
        taps = F.pad(self._tap_maps(x, scale, shift, mirrored=False), (1, 1, 1, 1))  # [9, B, H+2, W+2]
        out = taps[4, :, 1:hgt + 1, 1:wid + 1] + self.local.bias
        for k in (0, 1, 2, 3, 5, 6, 7, 8):
            i, j = divmod(k, 3)
            out += taps[k, :, i:i + hgt, j:j + wid]
        return out

    def folded_weights(self) -> tuple[Tensor, Tensor, float, float]:
        """BN folded into both terms for :func:`~ponder.fast.spatial_halting`, a plan
        (:func:`ponder.fast.prepared`: kept until a parameter or running statistic changes):
        ``(weights [10, C], shifts [10], glob_shift, bias)``."""
        return fast.prepared(self, "folded", self._fold)

    def _fold(self) -> tuple[Tensor, Tensor, float, float]:
        with torch.no_grad():
            scale, shift = bn_affine(self.bn)
            w9, wg = self._tap_weights(), self.glob.weight[0]
            weights = torch.cat([w9 * scale, (wg * scale)[None]]).contiguous()
            shifts = torch.cat([w9 @ shift, shift.new_zeros(1)])
            return weights, shifts, float(wg @ shift), float(self.local.bias)

    def _tap_weights(self) -> Tensor:
        """The local conv's weights as ``[9, C]``: row ``3 kh + kw`` is tap ``(kh, kw)``."""
        return self.local.weight[0].permute(1, 2, 0).reshape(9, -1)

    def _tap_maps(self, x: Tensor, scale: Tensor, shift: Tensor, mirrored: bool) -> Tensor:
        """The local conv's 9 tap maps on ``BN(x)``, bias excluded: ``[9, B, H, W]``, one ``C -> 9`` GEMM.

        Tap ``(kh, kw)`` is map ``3 kh + kw`` (``8 - 3 kh - kw`` when ``mirrored``). A channels-last
        ``x`` (the sparse executor's) is read as ``[B*H*W, C]`` rows and multiplied as ``w9 @ rows^T``,
        which gives contiguous maps; an NCHW ``x`` gives a transposed view of ``[B, 9, H, W]``.
        """
        w9 = self._tap_weights()
        if mirrored:
            w9 = w9.flip(0)
        b, c, hgt, wid = x.shape
        if is_channels_last(x):
            rows = x.permute(0, 2, 3, 1).reshape(-1, c)  # a view: [B*H*W, C]
            return torch.addmm((w9 @ shift)[:, None], w9 * scale, rows.t()).view(9, b, hgt, wid)
        return F.conv2d(x, (w9 * scale)[:, :, None, None], w9 @ shift).transpose(0, 1)


def bn_affine(bn: nn.BatchNorm2d) -> tuple[Tensor, Tensor]:
    """``(scale, shift)`` ``[C]`` with ``bn(x) = x * scale + shift`` per channel (running statistics)."""
    scale, beta = bn_scale_shift(bn)
    return scale, beta - bn.running_mean * scale
