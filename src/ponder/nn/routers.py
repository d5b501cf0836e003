"""Per-block routers of end-to-end gated ResNets (ConvNet-AIG, SP-Net, CoDiNet, RDI-Net) and their decision rule.

A router reads the input of its block ``[B, C, H, W]`` and returns ``K`` option logits ``[B, K]``; the
options are ordered by the work they run: ``0`` = skip, ``K - 1`` = the whole block, and for ``K = 3``
(RDI-Net) ``1`` = the block's first conv only. Routers are grouped in a :class:`RouterBank` stepped once
per block, so a router can read what earlier routers computed (RDI-Net's relational router).

Decisions (:func:`route`):

- training, ``mode="gumbel"`` (default): a hard Gumbel-softmax sample at temperature ``temperature``
  with the straight-through gradient: the forward mask is ``one_hot(argmax(l + g))``, the backward one
  ``softmax((l + g) / temperature)``'s, ``g`` standard Gumbel noise;
- ``"gumbel_soft"``: the soft sample itself mixes the options (CoDiNet's soft training);
- ``"argmax"``: the deterministic eval rule (a frozen router, RDI-Net's third stage);
- ``"uniform"``: a uniformly random option per sample and block (RDI-Net's first stage);
- ``eval()``: deterministic, never random: the option maximising ``l_k + b * w_k`` with ``w_k`` the
  option's nominal share of the block's work (0, 1/2, 1; :func:`option_work`) and
  ``b = log((1 - t) / t)`` for the keep threshold ``t`` (the skipping family's native knob). At
  ``t = 0.5`` that is the plain argmax; for two options it is ``softmax(l)[1] >= t``; ``t = 0`` always
  runs the whole block, ``t = 1`` always skips. Ties go to the option with more work.
  ``noisy=True`` (ConvNet-AIG's official behaviour, a compatibility option) samples Gumbel noise in
  eval too, so two passes over the same image can disagree.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any, Callable, Literal, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from ponder import fast
from ponder.nn.thresholds import probability_logit

RouteMode = Literal["gumbel", "gumbel_soft", "argmax", "uniform"]
ROUTE_MODES = ("gumbel", "gumbel_soft", "argmax", "uniform")
GUMBEL_EPS = 1e-10  # ConvNet-AIG's epsilon: noise -log(eps - log(U + eps))


@dataclass
class Route:
    """One router's decision for a batch: ``mask [B, K]`` mixes the options (one-hot in the forward pass,
    with the straight-through gradient in training) and ``option [B]`` (long) is the hard choice."""

    mask: Tensor
    option: Tensor


def option_work(num_options: int, device: torch.device | str | None = None) -> Tensor:
    """``[K]`` nominal share of a block's work run by each option: ``0, 1/(K-1), ..., 1``."""
    return torch.linspace(0.0, 1.0, num_options, device=device)


def gumbel_noise(like: Tensor) -> Tensor:
    """Standard Gumbel noise shaped like ``like`` (global torch RNG): ``-log(eps - log(U + eps))``."""
    u = torch.rand_like(like)
    return -torch.log(GUMBEL_EPS - torch.log(u + GUMBEL_EPS))


def eval_option(logits: Tensor, threshold: float = 0.5) -> Tensor:
    """The deterministic decision ``[B]`` (long) for option logits ``[B, K]`` at keep threshold ``threshold``
    (module docstring; ties to the option with more work)."""
    k = logits.shape[1]
    if threshold <= 0.0:
        return torch.full(logits.shape[:1], k - 1, dtype=torch.long, device=logits.device)
    if threshold >= 1.0:
        return torch.zeros(logits.shape[:1], dtype=torch.long, device=logits.device)
    scores = logits.detach()
    if threshold != 0.5:
        scores = scores - probability_logit(threshold) * option_work(k, logits.device).to(scores.dtype)
    if k == 2:
        return (scores[:, 1] >= scores[:, 0]).long()
    return (k - 1) - scores.flip(1).argmax(1)  # argmax returns the first maximum: flipped, the costliest


def eval_choice(logits: Sequence[float]) -> int:
    """:func:`eval_option` at the default keep threshold (0.5) for one sample's ``K`` option logits read to
    the host (batch-1 inference: one read instead of tensor ops): the argmax, ties to the option with more
    work. The same comparisons on the same float32 values, so the same decision."""
    return max(range(len(logits) - 1, -1, -1), key=logits.__getitem__)


def route(logits: Tensor, *, training: bool, mode: RouteMode = "gumbel", threshold: float = 0.5,
          temperature: float = 1.0, forced: Tensor | None = None, noisy: bool = False) -> Route:
    """Turn option logits ``[B, K]`` into a :class:`Route` (rules in the module docstring).

    ``forced [B]`` (0/1, keep-rate benchmarks) overrides the decision: 1 runs the whole block, 0 skips it.
    """
    if mode not in ROUTE_MODES:
        raise ValueError(f"router decision mode must be one of {ROUTE_MODES}, got {mode!r}")
    k = logits.shape[1]
    if forced is not None:
        option = (forced > 0.5).long() * (k - 1)
    elif training and mode in ("gumbel", "gumbel_soft"):
        soft = F.softmax((logits + gumbel_noise(logits)) / temperature, dim=1)
        option = soft.detach().argmax(1)
        if mode == "gumbel_soft":
            return Route(mask=soft, option=option)
        hard = F.one_hot(option, k).to(soft.dtype)
        return Route(mask=hard - soft.detach() + soft, option=option)
    elif training and mode == "uniform":
        option = torch.randint(0, k, logits.shape[:1], device=logits.device)
    elif noisy:
        option = (logits.detach() + gumbel_noise(logits)).argmax(1)
    else:
        option = eval_option(logits, threshold)
    return Route(mask=F.one_hot(option, k).to(logits.dtype), option=option)


# routers ---------------------------------------------------------------------------------
class PooledRouter(nn.Module):
    """Global average pool -> ``Linear(C -> hidden)`` [-> BatchNorm1d] [-> ReLU] [-> Dropout] ->
    ``Linear(hidden -> K)``. ``forward(x [B, C, H, W]) -> [B, K]`` option logits.

    ConvNet-AIG: hidden 16, BN, ReLU; SP-Net: hidden 128, BN, ReLU, dropout 0.4; CoDiNet: hidden ``C``, no
    BN, no nonlinearity (two linear maps in a row, as in its paper).
    """

    def __init__(self, channels: int, hidden: int, options: int = 2, norm: bool = True, act: bool = True,
                 dropout: float = 0.0):
        super().__init__()
        self.fc1 = nn.Linear(channels, hidden)
        self.bn = nn.BatchNorm1d(hidden) if norm else None
        self.act, self.dropout = act, dropout
        self.fc2 = nn.Linear(hidden, options)

    def hidden(self, x: Tensor) -> Tensor:
        """``[B, hidden]``: the features before the last layer."""
        h = self.fc1(x.mean((2, 3)))
        if self.bn is not None:
            h = self.bn(h)
        if self.act:
            h = F.relu(h)
        if self.dropout and self.training:
            h = F.dropout(h, self.dropout, training=True)
        return h

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.hidden(x))

    def infer(self, x: Tensor) -> Tensor:
        """:meth:`forward` at inference (eval mode, no autograd) in plain ops: BN folded into ``fc1``
        (:func:`ponder.fast.fold_linear_bn`), no module calls. ``x [B, C, H, W]`` -> ``[B, K]``."""
        weight_t, bias = self.folded_fc1()
        h = torch.addmm(bias, x.mean((2, 3)), weight_t)
        if self.act:
            h = h.relu_()
        fc2 = self.fc2
        return torch.addmm(fc2.bias, h, fc2.weight.t())

    def bound(self) -> Callable[[Tensor], Tensor]:
        """:meth:`infer` with BN folded and the weights bound now, as one compiled call where the kernels
        are built (:func:`ponder.fast.bound_pooled_mlp`; equal up to float rounding):
        ``run(x [B, C, H, W] contiguous channels-last) -> [B, K]``. Valid while the weights are unchanged
        (a :mod:`ponder.fast.plan` checks)."""
        weight_t, bias = self.folded_fc1()
        run = fast.bound_pooled_mlp(weight_t.t(), bias, self.fc2.weight, self.fc2.bias, self.act)
        return run if run is not None else self.infer

    def folded_fc1(self) -> tuple[Tensor, Tensor]:
        """``(weight^T [C, hidden], bias [hidden])`` of ``fc1`` with eval-mode BN folded in (inference only)."""
        if self.bn is not None:
            return fast.fold_linear_bn(self.fc1, self.bn)
        return self.fc1.weight.t(), self.fc1.bias


class RouterBank(nn.Module):
    """The routers of one network, stepped in block order: ``step(i, x, state) -> (logits [B, K], state)``.

    ``x [B, C_i, H, W]`` is block ``i``'s input; ``state`` comes from :meth:`init_state` (``None`` for
    independent routers). SkipNet's :class:`~ponder.nn.gates.GateBank` is one with a single keep logit
    ``[B]`` per step and 1x1-conv or linear final layers.
    """

    num_options: int

    def __len__(self) -> int:  # pragma: no cover - abstract
        raise NotImplementedError

    def init_state(self, x: Tensor) -> Any:
        """State before the first router for a batch like ``x`` (recomputed every forward)."""
        return None

    def step(self, i: int, x: Tensor, state: Any) -> tuple[Tensor, Any]:  # pragma: no cover - abstract
        raise NotImplementedError

    def infer_step(self, i: int, x: Tensor, state: Any) -> tuple[Tensor, Any]:
        """:meth:`step` at inference (eval mode, no autograd, fast paths on: the sparse executor's kernels)."""
        return self.step(i, x, state)

    def bound_steps(self) -> list[Callable[[Tensor, Any], tuple[Tensor, Any]]]:
        """:meth:`infer_step` of each router, ``step(x, state) -> (logits, state)``, with the weights bound
        now where a bank can (valid while they are unchanged: a :mod:`ponder.fast.plan` checks)."""
        return [functools.partial(self.infer_step, i) for i in range(len(self))]

    def final_layers(self) -> list[nn.Module]:  # pragma: no cover - abstract
        """The layers that produce the option logits (each with a ``weight`` and a ``bias``)."""
        raise NotImplementedError

    @torch.no_grad()
    def init_final(self, bias: list[float] | None = None, weight_std: float | None = None) -> None:
        """Set the final layers' biases to ``bias`` (one value per option) and/or draw their weights from
        ``N(0, weight_std)`` (ConvNet-AIG: bias ``[0.1, 2]``, std 0.001: 87 % of the blocks open at first)."""
        for layer in self.final_layers():
            if bias is not None:
                if len(bias) != layer.bias.numel():
                    raise ValueError(f"router bias needs {layer.bias.numel()} values (one per option), got {bias}")
                layer.bias.copy_(torch.tensor(bias, dtype=layer.bias.dtype))
            if weight_std is not None:
                nn.init.normal_(layer.weight, 0.0, weight_std)


class IndependentRouters(RouterBank):
    """One :class:`PooledRouter` per block, each reading only its block's input."""

    def __init__(self, routers: list[PooledRouter]):
        super().__init__()
        self.routers = nn.ModuleList(routers)
        self.num_options = routers[0].fc2.out_features

    def __len__(self) -> int:
        return len(self.routers)

    def step(self, i: int, x: Tensor, state: Any) -> tuple[Tensor, Any]:
        return self.routers[i](x), state

    def infer_step(self, i: int, x: Tensor, state: Any) -> tuple[Tensor, Any]:
        return self.routers[i].infer(x), state

    def bound_steps(self) -> list[Callable[[Tensor, Any], tuple[Tensor, Any]]]:
        return [functools.partial(_bound_step, r.bound()) for r in self.routers]

    def final_layers(self) -> list[nn.Linear]:
        return [r.fc2 for r in self.routers]


class RelationalRouters(RouterBank):
    """RDI-Net's relational router: per block, ``r_i = Linear(C -> K)(ReLU(BN(Linear(C -> C)(pool(x)))))``;
    a graph layer with a fixed affinity mixes ``r_i`` with the two previous routers' features
    (``g_i = (r_i + r_{i-1} + r_{i-2}) / 3``, missing ones zero: the normalised affinity of three fully
    connected nodes with self-loops), then ``Linear(K -> K)`` and dropout give the option logits.
    """

    def __init__(self, channels: list[int], options: int = 3, dropout: float = 0.4):
        super().__init__()
        self.embed = nn.ModuleList(PooledRouter(c, c, options, norm=True, act=True) for c in channels)
        self.out = nn.ModuleList(nn.Linear(options, options) for _ in channels)
        self.num_options, self.dropout = options, dropout

    def __len__(self) -> int:
        return len(self.embed)

    def init_state(self, x: Tensor) -> tuple[Tensor, Tensor]:
        zero = x.new_zeros(x.shape[0], self.num_options)
        return zero, zero

    def step(self, i: int, x: Tensor, state: tuple[Tensor, Tensor]) -> tuple[Tensor, tuple[Tensor, Tensor]]:
        return self._relate(i, self.embed[i](x), state)

    def infer_step(self, i: int, x: Tensor, state: tuple[Tensor, Tensor]) -> tuple[Tensor, tuple[Tensor, Tensor]]:
        return self._relate(i, self.embed[i].infer(x), state)

    def bound_steps(self) -> list[Callable[[Tensor, Any], tuple[Tensor, Any]]]:
        """Each router's whole step as one compiled call where the kernels are built
        (:func:`ponder.fast.bound_relational_router`; equal up to float rounding), else :meth:`infer_step`."""
        steps = []
        for e, out in zip(self.embed, self.out):
            weight_t, bias = e.folded_fc1()
            steps.append(fast.bound_relational_router(weight_t.t(), bias, e.fc2.weight, e.fc2.bias, e.act, out))
        return super().bound_steps() if None in steps else steps  # type: ignore[return-value]

    def _relate(self, i: int, r: Tensor, state: tuple[Tensor, Tensor]) -> tuple[Tensor, tuple[Tensor, Tensor]]:
        """The graph layer and output of router ``i`` on its features ``r [B, K]``."""
        prev1, prev2 = state
        g = (r + prev1 + prev2) / 3.0
        logits = self.out[i](g)
        if self.dropout and self.training:
            logits = F.dropout(logits, self.dropout, training=True)
        return logits, (r, prev1)

    def final_layers(self) -> list[nn.Linear]:
        return list(self.out)


def _bound_step(run: Callable[[Tensor], Tensor], x: Tensor, state: Any) -> tuple[Tensor, Any]:
    return run(x), state


def init_router_weights(module: nn.Module) -> None:
    """``kaiming_normal_`` on every Linear weight, zero biases, BN 1/0 (SP-Net-CIFAR, CoDiNet, RDI-Net)."""
    for m in module.modules():
        if isinstance(m, nn.Linear):
            nn.init.kaiming_normal_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm1d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
