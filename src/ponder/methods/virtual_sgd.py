"""A differentiable look-ahead of one ``torch.optim.SGD`` step (the virtual step of meta-learning methods).

:func:`virtual_sgd_step` returns the parameters that one ``optimizer.step()`` would produce from
given gradients, as new tensors that stay differentiable in those gradients and in the starting
values, and leaves the optimizer, its state and the parameters untouched. It follows the real
optimizer exactly: each parameter's group gives ``lr``, ``momentum``, ``dampening``, ``nesterov``,
``weight_decay`` and ``maximize``, and its state gives the momentum buffer (absent before the first
step, when SGD starts the buffer from the gradient itself)::

    d = +-g + weight_decay * p
    b = d                                   (no buffer yet)
    b = momentum * buf + (1 - dampening) * d (buffer present)
    d = d + momentum * b  (nesterov)  or  d = b
    p' = p - lr * d
"""

from __future__ import annotations

from typing import Any, Mapping

import torch
import torch.nn as nn
from torch import Tensor


def sgd_update(param: Tensor, grad: Tensor, group: Mapping[str, Any], buffer: Tensor | None) -> Tensor:
    """``param`` after one SGD update with ``grad`` under the options of ``group`` and momentum ``buffer``.

    Out of place and differentiable in ``param`` and ``grad`` (the buffer is a constant).
    """
    d = -grad if group.get("maximize", False) else grad
    if group["weight_decay"] != 0:
        d = d + group["weight_decay"] * param
    momentum = group["momentum"]
    if momentum != 0:
        b = d if buffer is None else momentum * buffer + (1 - group["dampening"]) * d
        d = d + momentum * b if group["nesterov"] else b
    return param - float(group["lr"]) * d


def virtual_sgd_step(optimizer: torch.optim.Optimizer, params: Mapping[str, nn.Parameter],
                     grads: Mapping[str, Tensor | None], start: Mapping[str, Tensor] | None = None) -> dict[str, Tensor]:
    """The parameters one step of the SGD ``optimizer`` would give, by name; nothing is modified.

    Args:
        optimizer: the real ``torch.optim.SGD`` (its param groups and momentum buffers are read).
        params: name -> the real parameter (it finds the parameter's group and buffer).
        grads: name -> gradient (may carry a graph: the result is differentiable through it);
            a missing or ``None`` gradient leaves the parameter as it is, as SGD does.
        start: name -> the value to step from (default: the parameter itself), e.g. a detached
            copy that the gradients were taken with respect to.

    Returns every name of ``params``: the stepped value, or the starting value for parameters the
    optimizer does not hold or that have no gradient.
    """
    if not isinstance(optimizer, torch.optim.SGD):
        raise ValueError(f"the virtual step follows torch.optim.SGD, got {type(optimizer).__name__}; "
                         "set optim.name: sgd in the recipe")
    group_of = {id(p): g for g in optimizer.param_groups for p in g["params"]}
    out: dict[str, Tensor] = {}
    for name, p in params.items():
        value = p if start is None else start[name]
        grad, group = grads.get(name), group_of.get(id(p))
        if grad is None or group is None:
            out[name] = value
            continue
        buffer = optimizer.state.get(p, {}).get("momentum_buffer")
        out[name] = sgd_update(value, grad, group, buffer)
    return out
