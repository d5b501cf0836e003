"""Inference work prepared once per model and reused while the model is unchanged.

A *plan* is what a model's inference would otherwise redo on every call: BatchNorm folded, weights
blocked for the kernels, routes looked up, each layer bound to its kernel. Per layer those lookups
cost a few microseconds (:func:`ponder.fast.fold.fold_key`, the route table, the weight caches), and at
batch 1 a network of a hundred small layers spends as long on them as on its arithmetic. Plans serve
whole models (gated ResNets, SkipNet, SACT at batch 1) and single modules alike (an exit head, a halting
branch's or a mask unit's folded weights): any weight-derived value a module keeps for inference.
:func:`prepared` keeps one plan per (model, key) and checks it with one :class:`Snapshot` per call:
a plan is rebuilt when any parameter, buffer or submodule of the model is replaced, moved to new
storage (``.to()``, ``.data =``) or changed in place (an optimizer step, ``load_state_dict``, a
train-mode forward's running statistics, via ``num_batches_tracked``). Like the fold cache, edits
through ``.data`` that keep the storage need :func:`ponder.fast.fold.clear_fold_cache`, which drops
plans too.
"""

from __future__ import annotations

import weakref
from typing import Callable, Hashable, TypeVar

import torch.nn as nn
from torch import Tensor

from ponder.fast.native import load

T = TypeVar("T")

#: model -> {key: (snapshot, plan)}; an entry goes with its model.
_PLANS: "weakref.WeakKeyDictionary[nn.Module, dict[Hashable, tuple[Snapshot, object]]]" = \
    weakref.WeakKeyDictionary()


class Snapshot:
    """What a module tree holds now: every submodule, parameter and buffer, by identity and, for
    tensors, storage address and version; :meth:`valid` says whether it still holds exactly that.
    About 40 us for ResNet-110's ~1,700 slots with the compiled fingerprint, ~250 us without."""

    def __init__(self, module: nn.Module):
        dicts = [d for m in module.modules() for d in (m._modules, m._parameters, m._buffers)]
        slots = [(d, n) for d in dicts for n in d]
        self._dicts, self._names = [d for d, _ in slots], [n for _, n in slots]
        self._held = [d[n] for d, n in slots]  # (alive, so no address is reused while this stands)
        self._print = _fingerprint(self._dicts, self._names)

    def valid(self) -> bool:
        """Whether no submodule, parameter or buffer was replaced, moved or changed in place since."""
        return _fingerprint(self._dicts, self._names) == self._print


def _fingerprint(dicts: list[dict], names: list[str]) -> Hashable:
    ext = load("plan")
    if ext is not None:
        return ext.fingerprint(dicts, names)
    values = [d.get(n) for d, n in zip(dicts, names)]
    return tuple((id(v), v.data_ptr(), 0 if v.is_inference() else v._version) if isinstance(v, Tensor) else id(v)
                 for v in values)


def prepared(model: nn.Module, key: Hashable, build: Callable[[], T]) -> T:
    """``build()`` for ``model`` under ``key`` (input shape, thread count...), made once and reused
    while ``model`` is unchanged (module docstring). ``build`` must not hold ``model`` itself, only its
    submodules' tensors (or the entry would keep the model alive)."""
    plans = _PLANS.get(model)
    if plans is None:
        plans = _PLANS[model] = {}
    hit = plans.get(key)
    if hit is not None and hit[0].valid():
        return hit[1]  # type: ignore[return-value]
    plan = build()
    plans[key] = (Snapshot(model), plan)
    return plan


def clear_plans() -> None:
    """Forget every prepared plan."""
    _PLANS.clear()
