"""The multi-exit contract and its two executors (compute-all and real early exit).

A multi-exit model subclasses :class:`MultiExitModel` and describes itself *stepwise*
(see :mod:`ponder.nn.exits` for the contract). From that description the base class derives:

- the **compute-all** executor (``"masked"``, the default): every block and exit runs on the
  whole batch, ``DynamicOutput.exit_logits`` holds every exit, and the exit a sample *would*
  take is decided by the same rule the sparse executor uses (used to train and calibrate);
- the **sparse** executor (``set_executor(model, "sparse")``): after exit ``k`` the samples
  whose max-softmax is ``>= threshold[k]`` leave the batch, so later blocks only run on the rest.

Both executors give the same per-sample exit and prediction. At inference (no autograd),
activations are channels-last (see :meth:`MultiExitModel.use_channels_last`). Per-sample MACs are the
cumulative cost of everything run up to and including the exit taken (earlier heads included).
Without thresholds (and without ``force_keep_rate``) every sample takes the last exit.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor
from torch.utils._pytree import tree_map

from ponder import fast
from ponder.cost import CostLedger, _isolated_counter
from ponder.models.base import DynamicModel, Knob, example_input
from ponder.models.op_counter import official_op_counts
from ponder.nn.exits import CollaborationHeads, gradient_rescale, select_samples
from ponder.nn.forced import keep_uniform, keep_uniforms, sample_keys
from ponder.nn.thresholds import thresholds_for_macs
from ponder.output import DynamicOutput


class MultiExitModel(DynamicModel):
    """The early-exit family's base (MSDNet, RANet): stepwise description, two executors, cost ledger.

    Native knob: the exit thresholds (:meth:`set_thresholds`). Budget: :meth:`calibrate` runs the
    compute-all executor over held-out images and keeps their exit confidences; :meth:`set_budget`
    fits thresholds to them (the budgeted-batch procedure's geometric family, nearest mean MACs).

    Attributes:
        executor: ``"masked"`` (compute-all) or ``"sparse"`` (real early exit).
        channels_last: activation layout: ``None`` (default) is channels-last without autograd and
            NCHW with it (:meth:`use_channels_last`), ``True`` / ``False`` force channels-last / NCHW.
        grad_equilibrium: IMTA gradient equilibrium on (identity in the forward pass).
        collab: :class:`CollaborationHeads` when built with ``enable_collaboration``, else ``None``.
    """

    family = "early_exit"
    knob = Knob("thresholds", 0.0, 1.0, 1.0, macs_rise=True,
                doc="per exit, the max-softmax confidence at or above which a sample leaves there")
    num_exits: int

    def __init__(self) -> None:
        super().__init__()
        self.executor = "masked"
        self.channels_last: bool | None = None
        self.grad_equilibrium = False
        self.collab: CollaborationHeads | None = None
        self._thresholds: list[float] | None = None
        self._thresholds32: list[float] | None = None  # the same, rounded to float32 (the batch-1 test)

    # ---- what a family implements -------------------------------------------------------
    def run_block(self, k: int, state: Any) -> Any:  # pragma: no cover - abstract
        raise NotImplementedError

    def exit_features(self, k: int, state: Any) -> Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def exit_classifier(self, k: int, feat: Tensor) -> Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def exit_outputs(self, k: int, state: Any) -> tuple[Tensor, Tensor]:
        """(``exit_features(k, state)``, its ``exit_classifier`` logits); a family may compute both at once."""
        feat = self.exit_features(k, state)
        return feat, self.exit_classifier(k, feat)

    def exit_feature_dims(self) -> list[int]:  # pragma: no cover - abstract
        """Width ``C_k`` of each exit's pooled feature (the collaboration heads need it)."""
        raise NotImplementedError

    def stage_modules(self, k: int) -> list[nn.Module]:  # pragma: no cover - abstract
        raise NotImplementedError

    def exit_modules(self, k: int) -> list[nn.Module]:  # pragma: no cover - abstract
        raise NotImplementedError

    def scale_gradient(self, state: Any, scale: float) -> Any:
        """Gradient equilibrium: rescale the gradient of ``state`` (default: every tensor).

        Families override it to rescale only the tensor the exits read (MSDNet: coarsest scale).
        """
        return tree_map(lambda t: gradient_rescale(t, scale) if isinstance(t, Tensor) else t, state)

    # ---- options ------------------------------------------------------------------------
    def enable_collaboration(self) -> None:
        """Add IMTA collaboration heads (stage 2); the exits then predict with the new heads."""
        self.collab = CollaborationHeads(self.exit_feature_dims(), self.num_classes)
        self._ledgers.clear()  # every exit now costs its collaboration head too

    def set_thresholds(self, thresholds: Sequence[float] | None) -> None:
        """Exit ``k`` takes the samples whose max-softmax is ``>= thresholds[k]``.

        Give ``num_exits - 1`` values (the last exit takes the rest) or ``num_exits`` values
        (the last must be ``-inf``); ``None`` runs every sample to the last exit.
        """
        if thresholds is None:
            self._thresholds = self._thresholds32 = None
            return
        t = [float(v) for v in thresholds]
        if len(t) == self.num_exits - 1:
            t.append(-math.inf)
        if len(t) != self.num_exits or t[-1] != -math.inf:
            raise ValueError(f"set_thresholds needs {self.num_exits - 1} values (or {self.num_exits} ending "
                             f"with -inf) for {self.num_exits} exits, got {list(thresholds)}")
        self._thresholds = t
        self._thresholds32 = torch.tensor(t, dtype=torch.float32).tolist()  # as the float32 comparison sees them

    @property
    def thresholds(self) -> list[float] | None:
        return None if self._thresholds is None else list(self._thresholds)

    def get_knob(self) -> list[float] | None:
        """The exit thresholds (``None``: every sample runs to the last exit)."""
        return self.thresholds

    def set_knob(self, value: Sequence[float] | None) -> None:
        self.set_thresholds(value)

    def calibrate(self, images: Tensor) -> None:
        """Keep the exit confidences of held-out ``images [N, C, H, W]`` (compute-all executor) for :meth:`set_budget`."""
        from ponder.nn.executor import set_executor

        if images.dim() != 4 or images.shape[0] == 0:
            raise ValueError(f"calibrate expects held-out images [N, C, H, W] with N > 0, got {list(images.shape)}")
        was_training, executor, forced = self.training, self.executor, self.forced
        self.eval()
        set_executor(self, "masked")
        self.forced = None
        device = next(self.parameters()).device
        try:
            with torch.no_grad():
                conf = [torch.stack(self(chunk.to(device)).exit_logits).float().softmax(2).amax(2).cpu()
                        for chunk in images.split(self.CALIBRATION_BATCH)]
        finally:
            self.train(was_training)
            set_executor(self, executor)
            self.forced = forced
        self.calibrate_confidences(torch.cat(conf, 1), tuple(images.shape[1:]))

    def calibrate_confidences(self, confidences: Tensor, input_size: tuple[int, int, int] | None = None) -> None:
        """Keep held-out max-softmax confidences ``[num_exits, N]`` (e.g. from a protocol's cached outputs)
        of images of ``input_size`` (default: the model's), whose exit costs the budget is counted in."""
        if confidences.dim() != 2 or confidences.shape[0] != self.num_exits:
            raise ValueError(f"calibrate expects confidences [num_exits={self.num_exits}, N], got {list(confidences.shape)}")
        self._calibration = confidences.detach().cpu()
        self._calibration_size = tuple(input_size or self.default_input_size)

    def held_out_macs(self, knob: Any | None = None) -> float:
        """Mean MACs per image of the held-out confidences under thresholds ``knob`` (the current ones if ``None``)."""
        from ponder.nn.thresholds import assign_exits, expected_macs

        conf = self._require_calibration()
        t = self.thresholds if knob is None else knob
        costs = torch.tensor(self.exit_costs(self._calibration_size), dtype=torch.float64)
        if t is None:
            return float(costs[-1])
        return expected_macs(assign_exits(conf, t), costs)

    def set_budget(self, macs: float) -> float:
        """Thresholds whose mean MACs per image on the held-out confidences come nearest ``macs`` (at the
        held-out images' size); returns that held-out mean."""
        from ponder.models.base import _positive

        target = _positive(macs)
        conf = self._require_calibration()
        costs = torch.tensor(self.exit_costs(self._calibration_size), dtype=torch.float64)
        self.set_thresholds(thresholds_for_macs(conf, costs, target, closest=True))
        return self.held_out_macs()

    # ---- costs --------------------------------------------------------------------------
    def measure_ledger(self, input_size: tuple[int, int, int]) -> CostLedger:
        """Units ``block.k`` and ``exit.k`` (the head, plus its collaboration head), at batch 1."""
        x = example_input(self, input_size)
        units: dict[str, int] = {}
        was_training = self.training
        self.eval()
        try:
            with _isolated_counter() as fc:
                state, carry = x, None
                for k in range(self.num_exits):
                    before = fc.get_total_flops()
                    state = self.run_block(k, state)
                    mid = fc.get_total_flops()
                    _, _, carry = self._exit(k, state, carry)
                    units[f"block.{k}"] = int(mid - before) // 2
                    units[f"exit.{k}"] = int(fc.get_total_flops() - mid) // 2
        finally:
            self.train(was_training)
        return CostLedger(input_size=input_size, units=units, total=sum(units.values()))

    def exit_costs(self, input_size: tuple[int, int, int] | None = None) -> list[int]:
        """Cumulative MACs up to and including each exit (blocks and heads ``0..k``)."""
        led = self.ledger(tuple(input_size or self.default_input_size))
        out, acc = [], 0
        for k in range(self.num_exits):
            acc += led[f"block.{k}"] + led[f"exit.{k}"]
            out.append(acc)
        return out

    def dense_macs(self, input_size: tuple[int, int, int] | None = None) -> int:
        """MACs of :meth:`dense_baseline`: every block plus the last exit only."""
        led = self.ledger(tuple(input_size or self.default_input_size))
        return sum(led[f"block.{k}"] for k in range(self.num_exits)) + led[f"exit.{self.num_exits - 1}"]

    def profile_exits(self, input_size: tuple[int, int, int]) -> list[dict[str, int]]:
        """Per exit: cumulative ``params``, ``macs`` (conv+linear) and ``macs_official`` (official
        ``op_counter`` convention) of everything up to and including it, earlier heads included."""
        seen: set[int] = set()
        params, out = 0, []
        for k, macs in enumerate(self.exit_costs(input_size)):
            modules = self.stage_modules(k) + self.exit_modules(k)
            if self.collab is not None:
                modules += [self.collab.heads[k]] + ([self.collab.isc[k - 1]] if k else [])
            for m in modules:
                for p in m.parameters():
                    if id(p) not in seen:
                        seen.add(id(p))
                        params += p.numel()
            out.append({"params": params, "macs": macs})
        for entry, official in zip(out, official_op_counts(self, input_size)):
            entry["macs_official"] = official
        return out

    # ---- execution ----------------------------------------------------------------------
    def _exit(self, k: int, state: Any, carry: Tensor | None) -> tuple[Tensor, Tensor, Tensor | None]:
        """(prediction logits, backbone-head logits, carry for the next exit) of exit ``k``."""
        feat, own = self.exit_outputs(k, state)
        if self.collab is None:
            return own, own, None
        new = self.collab(k, feat, carry)
        return new, own, new

    def _leaves(self, k: int, logits: Tensor, keys: Tensor | None) -> Tensor | None:
        """Bool ``[B]``: which samples leave at exit ``k < num_exits - 1``; ``None`` when nobody can leave early."""
        if self.forced is not None:
            assert keys is not None
            return keep_uniforms(keys, k, self.forced.seed).to(logits.device) >= self.forced.rate
        if self._thresholds is None:
            return None
        return F.softmax(logits, dim=1).amax(dim=1) >= self._thresholds[k]

    def _leaves_one(self, k: int, logits: Tensor, keys: Tensor | None) -> bool:
        """:meth:`_leaves` of one sample (``logits [1, classes]``) read off one host value: the same
        comparisons (the float32 max-softmax against the float32-rounded threshold; the float64 keep
        number against the rate). Needs thresholds or a keep rate."""
        if self.forced is not None:
            assert keys is not None
            return keep_uniform(int(keys), k, self.forced.seed) >= self.forced.rate
        assert self._thresholds32 is not None
        return F.softmax(logits, dim=1).amax().item() >= self._thresholds32[k]

    def use_channels_last(self) -> bool:
        """Whether activations run channels-last: ``self.channels_last`` when set, else without autograd.

        At inference channels-last is faster at every batch size measured (MSDNet / RANet CIFAR,
        batch 1-64, one thread: 1.1-1.5x; README, "Real early exit"). Training stays NCHW by
        default: channels-last activations give 1x1 convolutions gradients whose strides break
        DDP's bucket layout (a warning per step); ``channels_last = True`` trains channels-last anyway.
        """
        if self.channels_last is not None:
            return bool(self.channels_last)
        return not torch.is_grad_enabled()

    def input_layout(self, x: Tensor) -> Tensor:
        """``x [B, C, H, W]`` in the layout the network runs in (a copy only when it changes).

        Every later activation keeps that layout, also when samples leave the batch.
        """
        if self.use_channels_last():
            return x.contiguous(memory_format=torch.channels_last)
        return x

    def forward(self, x: Tensor) -> DynamicOutput:
        """``x [B, C, H, W]`` -> :class:`DynamicOutput` (``exit_logits`` only from the compute-all executor)."""
        self.check_input(x)
        x = self.input_layout(x)
        if self.executor == "sparse":
            return self._forward_sparse(x)
        return self._forward_all(x)

    def _forward_all(self, x: Tensor) -> DynamicOutput:
        n = self.num_exits
        keys = sample_keys(x) if self.forced is not None else None
        state, carry = x, None
        exit_logits, teacher = [], None
        exit_index = torch.full((x.shape[0],), n - 1, dtype=torch.long, device=x.device)
        open_ = torch.ones(x.shape[0], dtype=torch.bool, device=x.device)
        for k in range(n):
            state = self.run_block(k, state)
            head_state = state
            if self.grad_equilibrium and torch.is_grad_enabled():
                head_state = self.scale_gradient(state, 1.0 / (n - k))
                state = self.scale_gradient(head_state, float(n - k - 1))
            logits, own, carry = self._exit(k, head_state, carry)
            exit_logits.append(logits)
            teacher = own
            with torch.no_grad():
                leave = self._leaves(k, logits, keys) if k < n - 1 else None
                if leave is not None:
                    now = leave & open_
                    exit_index[now] = k
                    open_ &= ~leave
        stacked = torch.stack(exit_logits)  # [n, B, classes]
        logits = stacked.gather(0, exit_index.view(1, -1, 1).expand(1, -1, stacked.shape[2]))[0]
        out = DynamicOutput(logits=logits, macs=self._macs_of(exit_index, x), exit_logits=exit_logits,
                            exit_index=exit_index)
        if self.collab is not None:
            out.extras["teacher_logits"] = teacher
        return out

    def _forward_sparse(self, x: Tensor) -> DynamicOutput:
        n, batch = self.num_exits, x.shape[0]
        keys = sample_keys(x) if self.forced is not None else None
        here: Tensor | None = None  # batch positions of the samples still running (None: all, in order)
        out_logits: Tensor | None = None
        exit_index: Tensor | None = None
        state, carry = x, None
        for k in range(n):
            state = self.run_block(k, state)
            logits, _, carry = self._exit(k, state, carry)
            if k < n - 1:
                if logits.shape[0] == 1 and (self.forced is not None or self._thresholds is not None):
                    leave, n_leave = None, int(self._leaves_one(k, logits, keys))
                else:
                    leave = self._leaves(k, logits, keys)
                    n_leave = 0 if leave is None else int(leave.sum())  # the one host sync per exit
                if n_leave == 0:
                    continue
                everyone = n_leave == logits.shape[0]
            else:
                leave, everyone = None, True
            if out_logits is None:
                if everyone and here is None:  # the whole batch leaves together: nothing to scatter
                    exit_index = torch.full((batch,), k, dtype=torch.long, device=x.device)
                    macs = self._macs_of(exit_index, x)
                    return DynamicOutput(logits=logits, macs=macs, exit_index=exit_index)
                out_logits = logits.new_empty(batch, logits.shape[1])
                exit_index = torch.empty(batch, dtype=torch.long, device=x.device)
            if here is None:
                here = torch.arange(batch, device=x.device)
            if everyone:
                out_logits[here] = logits
                exit_index[here] = k
                break
            assert leave is not None
            step = fast.exit_step(leave, here, logits, out_logits, exit_index, k, (state, carry, keys))
            if step is not None:  # the compiled step: one call
                here, (state, carry, keys) = step
                continue
            gone, stay = leave.nonzero().squeeze(1), (~leave).nonzero().squeeze(1)
            dest = here[gone]
            out_logits[dest] = logits[gone]
            exit_index[dest] = k
            here, state = here[stay], select_samples(state, stay)
            carry = None if carry is None else carry[stay]
            if keys is not None:
                keys = keys[stay]
        assert out_logits is not None and exit_index is not None
        return DynamicOutput(logits=out_logits, macs=self._macs_of(exit_index, x), exit_index=exit_index)

    def _macs_of(self, exit_index: Tensor, x: Tensor) -> Tensor:
        """Per-sample MACs ``[B]`` (float64) of the exits ``exit_index [B]`` taken on inputs shaped like ``x``:
        every block and exit head up to the one taken (the ledger's ``block.k`` / ``exit.k``)."""
        return self.ledger_for(x).charge_prefix(self._unit_names, 2 * exit_index + 1)

    @property
    def _unit_names(self) -> tuple[str, ...]:
        return tuple(n for k in range(self.num_exits) for n in (f"block.{k}", f"exit.{k}"))

    # ---- benchmark hooks ----------------------------------------------------------------
    def dense_baseline(self) -> nn.Module:
        """The same network run to its last exit only (no early exit, no intermediate heads)."""
        return LastExitNetwork(self)


class LastExitNetwork(nn.Module):
    """Runs every block of a :class:`MultiExitModel` and only its last exit's own head (shares weights)."""

    def __init__(self, model: MultiExitModel):
        super().__init__()
        self.__dict__["model"] = model  # not a submodule: the wrapper must not own the weights

    def forward(self, x: Tensor) -> Tensor:
        m = self.model
        state = m.input_layout(x)
        for k in range(m.num_exits):
            state = m.run_block(k, state)
        return m.exit_outputs(m.num_exits - 1, state)[1]
