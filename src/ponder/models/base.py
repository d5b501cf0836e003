"""The contracts every ponder model declares: :class:`PonderModel` (all) and :class:`DynamicModel` (the
three dynamic families' shared hooks).

A static network is a :class:`PonderModel`: ``forward(x) -> DynamicOutput`` with per-sample MACs from
its cost ledger. A dynamic one is a :class:`DynamicModel`, through its family base:
:class:`ponder.models.multi_exit.MultiExitModel` (early exit), :class:`ponder.models.skipping.SkippingModel`
(block skipping) or :class:`ponder.models.spatial.SpatialModel` (spatial). Every tool (the evaluator,
``ponder bench``, ``ponder report``) is written against these hooks alone and never probes a model:

- ``executor``: ``"masked"`` (trains) or ``"sparse"`` (really skips; :func:`ponder.nn.set_executor`);
- :meth:`~DynamicModel.dense_baseline` (the dense network to time against) and
  :meth:`~DynamicModel.dense_baseline_kernels` (the same on the sparse executor's kernels, or ``None``);
- :meth:`~DynamicModel.force_keep_rate` (random hard decisions keeping a fraction of the units, a pure
  function of seed and sample: :mod:`ponder.nn.forced`);
- **one budget knob with one meaning for every family**: :meth:`~DynamicModel.calibrate` on held-out
  images, then :meth:`~DynamicModel.set_budget` ``(macs)`` = target mean MACs per image. It moves the
  family's *native knob* (exit thresholds, a keep threshold, a halting threshold, a budget choice),
  which stays reachable as :meth:`~DynamicModel.set_knob` / :meth:`~DynamicModel.get_knob`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn as nn
from torch import Tensor

from ponder.cost import CostLedger, LedgerCache, Profile, count_macs, count_params
from ponder.nn.executor import set_executor
from ponder.output import DynamicOutput

class PonderModel(nn.Module):
    """A network whose ``forward(x [B, C, H, W])`` returns a :class:`DynamicOutput`.

    Subclasses set ``default_input_size`` and implement :meth:`measure_ledger`, which
    measures the per-sample MACs of each unit at batch 1 (see :mod:`ponder.cost`);
    :meth:`ledger` caches the result per input size. ``family`` and ``paper`` describe the model for
    ``ponder models`` and the reports.
    """

    family: ClassVar[str] = "static"
    paper: ClassVar[str] = ""
    default_input_size: tuple[int, int, int] = (3, 32, 32)
    num_classes: int

    def __init__(self) -> None:
        super().__init__()
        self._ledgers = LedgerCache(self, self.measure_ledger)

    @property
    def is_dynamic(self) -> bool:
        return False

    def measure_ledger(self, input_size: tuple[int, int, int]) -> CostLedger:
        raise NotImplementedError

    def ledger(self, input_size: tuple[int, int, int]) -> CostLedger:
        """Unit costs for ``(C, H, W)`` inputs (measured once per size, then cached)."""
        return self._ledgers.get(input_size)

    def ledger_for(self, x: Tensor) -> CostLedger:
        """Unit costs for a batch ``x [B, C, H, W]``."""
        return self.ledger(tuple(x.shape[1:]))  # type: ignore[arg-type]

    def check_input(self, x: Tensor) -> None:
        """One clear error for inputs of the wrong rank or channel count, and for non-finite inputs
        (NaN or infinite pixels would make decisions and costs meaningless, and differ by executor)."""
        c = self.default_input_size[0]
        if x.dim() != 4 or x.shape[1] != c:
            raise ValueError(
                f"{type(self).__name__} expects input of shape [batch, {c}, H, W], got {list(x.shape)}; "
                f"pass images with {c} channels (e.g. --input-size {' '.join(map(str, self.default_input_size))})."
            )
        if not torch.isfinite(x.sum()) and not bool(torch.isfinite(x).all()):  # (one reduction when finite)
            bad = (~torch.isfinite(x)).flatten(1).any(1).nonzero().flatten().tolist()
            raise ValueError(f"{type(self).__name__} got non-finite pixels (NaN or inf) in samples {bad[:8]} of the "
                             f"batch; clean or drop those images before the forward pass")

    def forward(self, x: Tensor) -> DynamicOutput:  # pragma: no cover - abstract
        raise NotImplementedError

    def profile_exits(self, input_size: tuple[int, int, int]) -> list[dict[str, int]] | None:
        """Per exit, cumulative ``{"params", "macs", ...}`` (multi-exit models); ``None`` otherwise."""
        return None

    def profile_blocks(self, input_size: tuple[int, int, int]) -> list[dict] | None:
        """Per residual block ``{"name", "macs", ...}`` (ResNets and their skipping models); ``None`` otherwise."""
        return None

    def profile_budgets(self, input_size: tuple[int, int, int]) -> list[dict] | None:
        """Per budget ``{"budget", "params", "macs"}`` (multi-budget models); ``None`` otherwise."""
        return None


def profile(model: nn.Module, input_size: tuple[int, int, int], name: str | None = None) -> Profile:
    """Params and dense MACs of ``model`` for one ``(C, H, W)`` input: a ponder model's from its ledger,
    with its per-exit / per-block figures; any other module's counted by ``FlopCounterMode``."""
    was_training = model.training
    model.eval()
    size = tuple(int(s) for s in input_size)
    try:
        if isinstance(model, PonderModel):
            prof = Profile(name=name or type(model).__name__, input_size=size, params=count_params(model),
                           macs=model.ledger(size).total, exits=model.profile_exits(size),
                           blocks=model.profile_blocks(size), budgets=model.profile_budgets(size))
        else:
            prof = Profile(name=name or type(model).__name__, input_size=size, params=count_params(model),
                           macs=count_macs(model, example_input(model, size)))
    finally:
        model.train(was_training)
    return prof


@dataclass(frozen=True)
class ForcedRate:
    """The state of ``force_keep_rate(rate, seed)``: keep a fraction ``rate`` of the units."""

    rate: float
    seed: int


@dataclass(frozen=True)
class Knob:
    """A family's native inference knob, when it is one number: its name, range, default, and whether
    mean MACs rise with it (so :meth:`DynamicModel.set_budget` can search it). A discrete knob lists its
    only values in ``choices`` (e.g. the budgets of a multi-target model); :meth:`DynamicModel.set_budget`
    then measures each and keeps the nearest."""

    name: str
    low: float
    high: float
    default: float
    macs_rise: bool
    doc: str
    choices: tuple[float, ...] | None = None

    def checked(self, owner: object, value: Any, what: str) -> float:
        """``value`` as a float when it is a number in ``[low, high]``; otherwise one sentence naming
        ``owner``'s knob (``what``: e.g. "keep threshold")."""
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not self.low <= float(value) <= self.high:
            raise ValueError(f"{type(owner).__name__}'s native knob is a {what} in [{self.low:g}, {self.high:g}], "
                             f"got {value!r}")
        return float(value)


class DynamicModel(PonderModel):
    """The hooks every dynamic family shares (see the module docstring).

    A family base sets ``family`` and ``knob`` and implements :meth:`get_knob`, :meth:`set_knob` and
    :meth:`dense_baseline`; its forward pass reads ``self.forced`` (a :class:`ForcedRate` or ``None``).
    :meth:`set_budget` searches a scalar knob by bisection on the held-out images given to
    :meth:`calibrate`; families whose MACs follow from stored statistics override both (early exit:
    thresholds fitted to held-out confidences).
    """

    family: ClassVar[str] = "dynamic"
    knob: ClassVar[Knob]
    executor: str = "masked"
    forced: ForcedRate | None = None
    _calibration: Any = None

    #: images per forward pass when the held-out images are run
    CALIBRATION_BATCH: ClassVar[int] = 256
    #: bisection steps of :meth:`set_budget`'s search over a scalar knob, and the relative distance to the
    #: target at which it stops early
    SEARCH_STEPS: ClassVar[int] = 16
    SEARCH_TOLERANCE: ClassVar[float] = 0.0025

    @property
    def is_dynamic(self) -> bool:
        return True

    # ---- baselines ---------------------------------------------------------------------
    def dense_baseline(self) -> nn.Module:  # pragma: no cover - abstract
        """The dense network this model is timed against (shares the weights)."""
        raise NotImplementedError

    def dense_baseline_kernels(self) -> nn.Module | None:
        """The dense network on the sparse executor's own kernels, when they differ from plain PyTorch."""
        return None

    def dense_macs(self, input_size: tuple[int, int, int] | None = None) -> int:
        """MACs per image of :meth:`dense_baseline` (``FlopCounterMode`` at batch 1; its ledger when it has one)."""
        size = tuple(input_size or self.default_input_size)
        base = self.dense_baseline()
        if isinstance(base, PonderModel):
            return base.ledger(size).total  # type: ignore[arg-type]
        from ponder.cost import count_macs

        modes = [(m, m.training) for m in base.modules()]  # (a view's mode is not the model's inside it)
        base.eval()
        try:
            return count_macs(base, example_input(self, size))  # type: ignore[arg-type]
        finally:
            for m, mode in modes:
                m.training = mode

    # ---- forced decisions --------------------------------------------------------------
    def force_keep_rate(self, rate: float | None, seed: int = 0) -> None:
        """Benchmark hook: replace the learned decisions by random hard ones keeping a fraction ``rate``
        of the units (blocks, exits continued past, active positions; the decision networks still run
        and are paid for). A pure function of ``(seed, sample)``: the same in every executor and call.
        ``None`` restores the learned decisions."""
        if rate is not None and not (isinstance(rate, (int, float)) and 0.0 <= rate <= 1.0):
            raise ValueError(f"keep rate must be a number in [0, 1] (or None for the learned decisions), got {rate!r}")
        self.forced = None if rate is None else ForcedRate(float(rate), int(seed))

    # ---- the native knob and the budget --------------------------------------------------
    def get_knob(self) -> Any:  # pragma: no cover - abstract
        """The native knob's current value (:attr:`knob` describes it)."""
        raise NotImplementedError

    def set_knob(self, value: Any) -> None:  # pragma: no cover - abstract
        """Set the native knob directly (what :meth:`set_budget` moves)."""
        raise NotImplementedError

    def calibrate(self, images: Tensor) -> None:
        """Keep held-out images ``[N, C, H, W]`` (never the test set) for :meth:`set_budget`."""
        if images.dim() != 4 or images.shape[0] == 0:
            raise ValueError(f"calibrate expects held-out images [N, C, H, W] with N > 0, got {list(images.shape)}")
        self._calibration = images.detach().cpu()

    @property
    def calibrated(self) -> bool:
        return self._calibration is not None

    def held_out_macs(self, knob: Any | None = None) -> float:
        """Mean MACs per image on the calibration images (at ``knob``, restored afterwards; the current one
        if ``None``), measured with the sparse executor in eval mode."""
        images = self._require_calibration()
        before, was_training, executor = self.get_knob(), self.training, self.executor
        try:
            if knob is not None:
                self.set_knob(knob)
            self.eval()
            set_executor(self, "sparse")
            device = next(self.parameters()).device
            total = 0.0
            with torch.no_grad():
                for chunk in images.split(self.CALIBRATION_BATCH):
                    total += float(self(chunk.to(device)).macs.double().sum())
            return total / images.shape[0]
        finally:
            self.set_knob(before)
            set_executor(self, executor)
            self.train(was_training)

    def set_budget(self, macs: float) -> float:
        """Set the native knob so that the mean MACs per image on the held-out images of :meth:`calibrate`
        come as close to ``macs`` as the knob allows; returns the held-out mean reached.

        Bisection over the knob's range (its MACs are monotone in it), keeping the closest point seen; a
        discrete knob (``knob.choices``) takes the choice whose held-out MACs are nearest.
        """
        target = _positive(macs)
        self._require_calibration()
        k = self.knob
        if k.choices is not None:
            options = [(self.held_out_macs(c), c) for c in k.choices]
            reached, choice = min(options, key=lambda o: abs(o[0] - target))
            self.set_knob(choice)
            return reached
        lo, hi = k.low, k.high
        best = (math.inf, self.get_knob(), math.nan)
        for _ in range(self.SEARCH_STEPS):
            mid = 0.5 * (lo + hi)
            reached = self.held_out_macs(mid)
            best = min(best, (abs(reached - target), mid, reached))
            if abs(reached - target) <= self.SEARCH_TOLERANCE * target:
                break
            if (reached < target) == k.macs_rise:
                lo = mid
            else:
                hi = mid
        for end in (k.low, k.high):  # the extremes, which bisection never evaluates
            if best[0] <= self.SEARCH_TOLERANCE * target:
                break
            reached = self.held_out_macs(end)
            best = min(best, (abs(reached - target), end, reached))
        self.set_knob(best[1])
        return best[2]

    def _require_calibration(self) -> Tensor:
        if self._calibration is None:
            raise ValueError(f"set_budget on {type(self).__name__} needs held-out images first: call "
                             f"model.calibrate(images) (ponder eval / ponder bench do it from the run's held-out "
                             f"split), or set the native knob with set_knob")
        return self._calibration


def _positive(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0 or not math.isfinite(value):
        raise ValueError(f"a budget is a positive number of MACs per image (e.g. 2e7), got {value!r}")
    return float(value)


def example_input(model: nn.Module, input_size: tuple[int, int, int]) -> Tensor:
    """A zero batch-1 input on the model's device, in its floating-point type (float64 models included)."""
    p = next(model.parameters(), None)
    if p is None:
        return torch.zeros(1, *input_size)
    return torch.zeros(1, *input_size, device=p.device, dtype=p.dtype if p.is_floating_point() else None)
