"""Copies of a weight in the layouts the inference kernels read, made once and kept with the weight."""

from __future__ import annotations

import weakref
from typing import Callable, Hashable

from torch import Tensor

#: id(weight) -> {(version, *key): derived tensor}; an entry goes when its weight is freed.
_DERIVED: dict[int, dict[tuple, Tensor]] = {}


def derived(weight: Tensor, key: tuple[Hashable, ...], make: Callable[[], Tensor]) -> Tensor:
    """``make()``, a tensor computed from ``weight``, cached per ``key`` until ``weight`` changes.

    Cached until the weight is freed or, unless it is an inference tensor (which keeps no version),
    modified in place; a new version drops the copies of the old values.
    """
    per_weight = _DERIVED.get(id(weight))
    if per_weight is None:  # (tensors cannot be weak dictionary keys: they compare elementwise)
        per_weight = _DERIVED[id(weight)] = {}
        weakref.finalize(weight, _DERIVED.pop, id(weight), None)
    version = -1 if weight.is_inference() else weight._version
    full = (version, *key)
    out = per_weight.get(full)
    if out is None:
        for old in [k for k in per_weight if k[0] != version]:  # copies of stale values
            del per_weight[old]
        out = per_weight[full] = make()
    return out
