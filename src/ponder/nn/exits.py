"""Shared early-exit machinery: the pieces every multi-exit family uses.

The multi-exit *contract* and both executors live in :class:`MultiExitModel`
(defined in :mod:`ponder.models.multi_exit`, re-exported here as
``ponder.nn.exits.MultiExitModel``). A family describes itself stepwise:

- ``run_block(k, state) -> state``: everything computed between exit ``k-1`` and exit ``k``
  (block 0 receives the image ``x [B, C, H, W]``). ``state`` is any pytree of tensors whose
  first dimension is the batch, so the sparse executor can keep a subset (:func:`select_samples`).
- ``exit_features(k, state) -> [B, C_k]`` and ``exit_classifier(k, feat) -> [B, classes]``;
  optionally ``exit_outputs(k, state) -> (feat, logits)`` computing both at once (MSDNet and
  RANet run their whole exit head as one compiled call at inference).
- ``exit_feature_dims()``, ``stage_modules(k)``, ``exit_modules(k)``; optionally ``scale_gradient``.

This module holds the executor-independent parts: gradient rescaling (IMTA gradient
equilibrium), sample selection, the per-sample hash behind ``force_keep_rate``, the IMTA
collaboration heads, the official op-counter convention and the dense baseline wrapper.
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING, Any, Sequence

import torch
import torch.nn as nn
from torch import Tensor
from torch.utils._pytree import tree_flatten, tree_map, tree_unflatten

from ponder.layout import is_channels_last

if TYPE_CHECKING:
    from ponder.models.multi_exit import MultiExitModel


_PRIME = 2_147_483_647  # 2^31 - 1: modulus of the per-sample hash used by force_keep_rate


class _GradRescale(torch.autograd.Function):
    """Identity in the forward pass; multiplies the gradient by ``scale`` in the backward pass."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, scale: float) -> Tensor:
        ctx.scale = scale
        return x.view_as(x)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:
        return grad * ctx.scale, None


def gradient_rescale(x: Tensor, scale: float) -> Tensor:
    """``x`` unchanged, with its gradient multiplied by ``scale`` (IMTA gradient equilibrium)."""
    return _GradRescale.apply(x, scale)


def select_samples(state: Any, idx: Tensor) -> Any:
    """Keep the samples ``idx [n]`` (long) of every tensor in the pytree ``state``, each in its own layout."""
    return tree_map(lambda t: _select(t, idx) if isinstance(t, Tensor) else t, state)


def _select(t: Tensor, idx: Tensor) -> Tensor:
    if t.dim() == 4 and is_channels_last(t):
        out = torch.empty((idx.shape[0],) + tuple(t.shape[1:]), dtype=t.dtype, device=t.device,
                          memory_format=torch.channels_last)
        return torch.index_select(t, 0, idx, out=out)
    return t.index_select(0, idx)


def sample_keys(x: Tensor) -> Tensor:
    """A deterministic integer hash ``[B]`` (int64 in ``[0, 2^31-1)``) of each sample's content.

    Computed exactly in integer arithmetic, so a sample gets the same key whatever batch it
    is in and whichever executor runs it.
    """
    bits = x.detach().float().reshape(x.shape[0], -1).contiguous().view(torch.int32).to(torch.int64)
    bits = bits & 0xFFFFFFFF
    coeff = _hash_coefficients(bits.shape[1], x.device)
    return ((bits % _PRIME) * coeff % _PRIME).sum(1) % _PRIME


@functools.lru_cache(maxsize=8)
def _hash_coefficients(n: int, device: torch.device) -> Tensor:
    gen = torch.Generator().manual_seed(0x5EED)
    return torch.randint(1, _PRIME, (n,), generator=gen, dtype=torch.int64).to(device)


def keep_uniforms(keys: Tensor, exit_k: int, seed: int) -> Tensor:
    """Uniform numbers ``[B]`` in ``[0, 1)`` derived from ``keys`` for exit ``exit_k`` and ``seed``."""
    a, b = _keep_coefficients(int(seed), exit_k)
    return ((keys * a + b) % _PRIME).double() / _PRIME


def keep_uniform(key: int, exit_k: int, seed: int) -> float:
    """:func:`keep_uniforms` of one key, on the host: the same float64 (integers below 2^53, one
    correctly rounded division)."""
    a, b = _keep_coefficients(int(seed), exit_k)
    return ((key * a + b) % _PRIME) / _PRIME


@functools.lru_cache(maxsize=256)
def _keep_coefficients(seed: int, exit_k: int) -> tuple[int, int]:
    gen = torch.Generator().manual_seed(seed * 1_000_003 + exit_k)
    a, b = (int(v) for v in torch.randint(1, _PRIME, (2,), generator=gen))
    return a, b


class CollaborationHeads(nn.Module):
    """IMTA inline subnetwork collaboration (ISC) heads.

    Exit 0: ``Linear(C_0 -> classes)`` on the pooled feature. Exit ``k >= 1``:
    ``Linear(2 C_k -> classes)`` on ``cat[feat_k, ReLU(BN1d(Linear(classes -> C_k)(new_logits_{k-1})))]``
    (the previous new logits are not detached).
    """

    def __init__(self, widths: Sequence[int], num_classes: int):
        super().__init__()
        self.heads = nn.ModuleList(
            [nn.Linear(w if k == 0 else 2 * w, num_classes) for k, w in enumerate(widths)])
        self.isc = nn.ModuleList([
            nn.Sequential(nn.Linear(num_classes, w), nn.BatchNorm1d(w), nn.ReLU(inplace=True))
            for w in widths[1:]])

    def forward(self, k: int, feat: Tensor, prev_logits: Tensor | None) -> Tensor:
        """New logits ``[B, classes]`` of exit ``k`` from ``feat [B, C_k]`` and exit ``k-1``'s new logits."""
        if k == 0:
            return self.heads[0](feat)
        return self.heads[k](torch.cat([feat, self.isc[k - 1](prev_logits)], dim=1))


def _official_ops(module: nn.Module, inp: Tensor, out: Tensor) -> int:
    """One leaf module's count under the official MSDNet ``op_counter`` convention."""
    if isinstance(module, nn.Conv2d):
        kh, kw = module.kernel_size
        return module.in_channels * module.out_channels * kh * kw * out.shape[2] * out.shape[3] // module.groups
    if isinstance(module, nn.ReLU):
        return inp.numel()
    if isinstance(module, (nn.AvgPool2d, nn.MaxPool2d)):
        k = module.kernel_size if isinstance(module.kernel_size, int) else module.kernel_size[0]
        return out.shape[1] * out.shape[2] * out.shape[3] * k * k
    if isinstance(module, nn.AdaptiveAvgPool2d):
        return inp.numel()
    if isinstance(module, nn.Linear):
        return module.in_features * module.out_features + module.out_features
    return 0


def official_op_counts(model: "MultiExitModel", input_size: tuple[int, int, int]) -> list[int]:
    """Cumulative per-exit cost in the official MSDNet ``op_counter`` convention (batch 1).

    Counts conv weights, ReLU (input numel), pooling (``C H_out W_out k^2``) and Linear
    (``in*out + out``); BN, concatenation and functional ops (e.g. interpolation) count 0.
    This is the convention of the numbers the MSDNet / RANet / IMTA / L2W papers print.
    """
    total = [0]
    leaves = [m for m in model.modules() if next(m.children(), None) is None]
    handles = [m.register_forward_hook(lambda mod, i, o: total.__setitem__(0, total[0] + _official_ops(mod, i[0], o)))
               for m in leaves]
    was_training = model.training
    model.eval()
    out = []
    try:
        with torch.enable_grad():  # the module path (without autograd, exit heads fold BN and skip the hooks)
            p = next(model.parameters())
            state, carry = torch.zeros(1, *input_size, device=p.device, dtype=p.dtype), None
            for k in range(model.num_exits):
                state = model.run_block(k, state)
                _, _, carry = model._exit(k, state, carry)
                out.append(total[0])
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    return out


class LastExitNetwork(nn.Module):
    """Runs every block of a :class:`MultiExitModel` and only its last exit's own head (shares weights)."""

    def __init__(self, model: "MultiExitModel"):
        super().__init__()
        self.__dict__["model"] = model  # not a submodule: the wrapper must not own the weights

    def forward(self, x: Tensor) -> Tensor:
        m = self.model
        state = m.input_layout(x)
        for k in range(m.num_exits):
            state = m.run_block(k, state)
        last = m.num_exits - 1
        return m.exit_outputs(last, state)[1]


def __getattr__(name: str) -> Any:
    # MultiExitModel subclasses PonderModel, so it lives in ponder.models (importing it here
    # eagerly would make ponder.models <-> ponder.nn circular); re-exported lazily.
    if name == "MultiExitModel":
        from ponder.models.multi_exit import MultiExitModel

        return MultiExitModel
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
