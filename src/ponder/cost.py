"""Cost accounting: static unit costs from ``FlopCounterMode`` and the per-sample ledger.

Conventions: everything is **MACs** (multiply-accumulates) of convolutions and linear
layers, as counted by :class:`torch.utils.flop_counter.FlopCounterMode` (which reports
FLOPs = 2 x MACs and ignores bias, BN, activations and pooling). FLOPs are shown only
as ``2 x MACs`` for comparison with papers that use that convention.
"""

from __future__ import annotations

from collections import OrderedDict
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Iterator, Mapping, Sequence

import torch
import torch.nn as nn
from torch import Tensor
from torch.utils._python_dispatch import _disable_current_modes
from torch.utils.flop_counter import FlopCounterMode


@contextmanager
def _isolated_counter() -> Iterator[FlopCounterMode]:
    """A fresh counter that an enclosing ``FlopCounterMode`` (a user's, a test's) does not see."""
    with _disable_current_modes(), torch.no_grad(), FlopCounterMode(display=False) as fc:
        yield fc


def count_macs(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> int:
    """MACs of one call ``fn(*args, **kwargs)`` as counted by ``FlopCounterMode`` (FLOPs // 2)."""
    with _isolated_counter() as fc:
        fn(*args, **kwargs)
    return int(fc.get_total_flops()) // 2


def unit_macs(fn: Callable[[], Any], units: Mapping[str, nn.Module]) -> dict[str, int]:
    """MACs spent inside each named module during one call of ``fn`` (nested units allowed).

    Each unit is charged for everything that ran between entering and leaving its
    ``forward``; a unit called several times is charged the sum. ``"total"`` holds the
    whole call's MACs.
    """
    spent = {name: 0 for name in units}
    start: dict[str, list[int]] = {name: [] for name in units}
    handles = []
    with _isolated_counter() as fc:
        for name, module in units.items():
            handles.append(module.register_forward_pre_hook(
                lambda _m, _a, n=name: start[n].append(int(fc.get_total_flops()))))
            handles.append(module.register_forward_hook(
                lambda _m, _a, _o, n=name: spent.__setitem__(
                    n, spent[n] + int(fc.get_total_flops()) - start[n].pop())))
        try:
            fn()
        finally:
            for h in handles:
                h.remove()
        total = int(fc.get_total_flops())
    out = {name: v // 2 for name, v in spent.items()}
    out["total"] = total // 2
    return out


def eval_unit_macs(model: nn.Module, fn: Callable[[], Any], units: Mapping[str, nn.Module]) -> dict[str, int]:
    """:func:`unit_macs` with ``model`` in eval mode (training mode restored afterwards)."""
    was_training = model.training
    model.eval()
    try:
        return unit_macs(fn, units)
    finally:
        model.train(was_training)


@dataclass(frozen=True)
class CostLedger:
    """Per-sample MACs of named units of a model at one input size (measured at batch 1).

    ``units`` maps a unit name (``"stem"``, ``"blocks.3"``, ``"exit.2"``, ``"policy"`` ...)
    to the MACs one sample pays when that unit runs (for per-position units of spatial models: per
    active position); ``total`` is the dense forward cost. A sample's cost is the sum over the units
    it ran, and :meth:`charge` / :meth:`charge_prefix` are the one way every model computes it.
    """

    input_size: tuple[int, int, int]
    units: dict[str, int]
    total: int
    _vectors: dict = field(default_factory=dict, compare=False, repr=False)

    def __getitem__(self, name: str) -> int:
        return self.units[name]

    def sum(self, names: Sequence[str]) -> int:
        """MACs of running all ``names`` once."""
        return sum(self.units[n] for n in names)

    def vector(self, names: tuple[str, ...], device: torch.device | str = "cpu") -> Tensor:
        """``[len(names)]`` float64 unit costs on ``device`` (cached per names and device)."""
        key = (names, str(device))
        vec = self._vectors.get(key)
        if vec is None:
            vec = self._vectors[key] = torch.tensor([float(self.units[n]) for n in names], dtype=torch.float64,
                                                    device=device)
        return vec

    def charge(self, names: tuple[str, ...], decisions: Tensor) -> Tensor:
        """Per-sample MACs ``[B]`` (float64): ``decisions [B, len(names)]`` says how often each sample ran
        each unit (0/1 for blocks, exits and gates; active-position counts for per-position units)."""
        return decisions.to(torch.float64) @ self.vector(names, decisions.device)

    def charge_prefix(self, names: tuple[str, ...], last: Tensor) -> Tensor:
        """Per-sample MACs ``[B]`` (float64) of samples that ran ``names[0] .. names[last]`` (``last [B]`` long),
        e.g. every block and exit head up to the exit a sample took."""
        key = (names, str(last.device), "cumulative")
        cum = self._vectors.get(key)
        if cum is None:
            cum = self._vectors[key] = self.vector(names, last.device).cumsum(0)
        return cum[last]


@contextmanager
def unobserved(model: nn.Module) -> Iterator[None]:
    """Run a block that the model's user must not see: no enclosing dispatch mode (a user's
    ``FlopCounterMode``) counts it and no forward hook (the model's modules', or global ones) fires.

    The hooks are set aside and restored afterwards; hooks registered inside the block (e.g. by
    :func:`unit_macs`) work as usual and are gone with it.
    """
    from torch.nn.modules import module as module_mod

    saved = [(m, m._forward_pre_hooks, m._forward_hooks) for m in model.modules()]
    global_pre, global_post = module_mod._global_forward_pre_hooks, module_mod._global_forward_hooks
    try:
        for m, _, _ in saved:
            m._forward_pre_hooks, m._forward_hooks = OrderedDict(), OrderedDict()
        module_mod._global_forward_pre_hooks, module_mod._global_forward_hooks = OrderedDict(), OrderedDict()
        with _disable_current_modes():
            yield
    finally:
        for m, pre, post in saved:
            m._forward_pre_hooks, m._forward_hooks = pre, post
        module_mod._global_forward_pre_hooks, module_mod._global_forward_hooks = global_pre, global_post


class LedgerCache:
    """Caches one :class:`CostLedger` per input size for a model (costs scale with resolution).

    A ledger is measured :func:`unobserved`: the first forward pass of a fresh model inside a user's
    ``FlopCounterMode`` counts that forward pass only, and the user's hooks see only it. Holds the model
    (``measure`` is usually its bound method anyway), so a model with its cache pickles and deep-copies.
    """

    def __init__(self, model: nn.Module, measure: Callable[[tuple[int, int, int]], CostLedger]):
        self._model, self._measure = model, measure
        self._cache: dict[tuple[int, int, int], CostLedger] = {}

    def get(self, input_size: tuple[int, int, int]) -> CostLedger:
        key = tuple(int(s) for s in input_size)
        if key not in self._cache:
            with unobserved(self._model):
                self._cache[key] = self._measure(key)  # type: ignore[arg-type]
        return self._cache[key]

    def clear(self) -> None:
        """Forget every ledger (after the architecture changed, e.g. heads were added)."""
        self._cache.clear()


def count_params(module: nn.Module) -> int:
    """Number of parameters (each shared tensor counted once)."""
    return sum(p.numel() for p in module.parameters())


@dataclass
class Profile:
    """Static (dense) cost of a model at one input size, plus per-exit / per-block figures."""

    name: str
    input_size: tuple[int, int, int]
    params: int
    macs: int
    exits: list[dict[str, int]] | None = None
    blocks: list[dict[str, Any]] | None = None
    budgets: list[dict[str, Any]] | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def flops(self) -> int:
        """FLOPs in the 2 x MACs convention."""
        return 2 * self.macs

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["input_size"] = list(self.input_size)
        for key in ("exits", "blocks", "budgets"):
            if d[key] is None:
                del d[key]
        if not d["extra"]:
            del d["extra"]
        return d


def format_count(n: float) -> str:
    """Human-readable count: 40.55M, 4.09G."""
    for unit, scale in (("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.2f}{unit}"
    return f"{n:.0f}"
