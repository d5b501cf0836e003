"""End-to-end gated ResNets: a router before every residual block picks, per sample, what the block runs.

The shared base of ConvNet-AIG (:mod:`ponder.models.aig`), SP-Net (:mod:`ponder.models.spnet`), CoDiNet
(:mod:`ponder.models.codinet`) and RDI-Net (:mod:`ponder.models.rdinet`), on the skipping family's
:class:`~ponder.models.skipping.SkippingModel` (backbone, executors, keep-threshold knob, forced
decisions, ledger and charge, dense baseline, loading a plain ResNet into the backbone).

Router ``i`` (:mod:`ponder.nn.routers`) reads block ``i``'s input and scores ``K`` options: ``0`` skip,
``K - 1`` the whole block, and for ``K = 3`` (RDI-Net) ``1`` its first conv only. In training the choice
is a hard Gumbel-softmax sample with the straight-through gradient (``train_decisions``: the methods
switch it to soft, argmax or uniform sampling); in ``eval()`` it is deterministic (the plain argmax at
the default keep threshold 0.5; the native knob moves it, :func:`ponder.nn.routers.eval_option`).

``forward(x, features=False) -> DynamicOutput``: ``gates [B, blocks]`` (1 = the block ran, whole or
half), per-sample ``macs`` from the ledger, and the extras every training objective reads:

- ``router_logits`` ``[B, blocks, K]`` (before any noise) and ``router_probs`` (their softmax);
- ``router_masks`` ``[B, blocks, K]``: what mixed the options (one-hot forward; straight-through
  gradient in training);
- ``options`` ``[B, blocks]`` (long): the option taken; ``usage`` ``[B, blocks]``: its nominal share of
  the block's work (0, 1/2, 1), differentiable through the masks: the "gate output" of rate losses;
- with ``features=True``: ``block_features`` (every block's output ``[B, C, H, W]``, in order) and
  ``stage_features`` (the last block's output of each stage).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from ponder.cost import count_macs
from ponder.models.base import example_input
from ponder.models.resnet import ResNet
from ponder.models.skipping import SkippingModel
from ponder.nn import skip_kernels
from ponder.nn.dense_units import stem_on_kernels
from ponder.nn.routers import ROUTE_MODES, RouteMode, RouterBank, eval_choice, eval_option, option_work, route
from ponder.nn.skip import SkippedOutput, SoftMix
from ponder.output import DynamicOutput


class GatedResNet(SkippingModel):
    """A ResNet with one router per block (see the module docstring).

    Options: ``skipped`` / ``mix``: what a skipped block outputs and how soft decisions mix
    (:mod:`ponder.nn.skip`); ``skip_paths``: modules of the model's own by block index that a skipped
    block outputs instead (CoDiNet). Attributes the training methods set: ``train_decisions``
    (:data:`ponder.nn.routers.ROUTE_MODES`), ``temperature`` (of the Gumbel softmax, 1), and
    ``noisy_eval`` (Gumbel noise in eval too: ConvNet-AIG's official behaviour, off by default).
    """

    own_prefixes = ("routers.", "skip_paths.")

    def __init__(self, backbone: ResNet, routers: RouterBank, skipped: SkippedOutput = "relu_shortcut",
                 mix: SoftMix | None = None, skip_paths: dict[int, nn.Module] | None = None,
                 threshold: float = 0.5):
        if len(routers) != len(backbone.blocks):
            raise ValueError(f"a gated ResNet needs one router per block: {len(backbone.blocks)} blocks, "
                             f"{len(routers)} routers")
        if routers.num_options not in (2, 3):
            raise ValueError(f"routers choose between 2 (skip, run) or 3 (skip, first conv, run) options, "
                             f"got {routers.num_options}")
        super().__init__(backbone, skipped=skipped, mix=mix, threshold=threshold)
        self.skipper.nonnegative = True  # every block input is a ReLU output (stem, block, relu(shortcut), skip path)
        self.routers = routers
        self.skip_paths = nn.ModuleDict({str(i): m for i, m in (skip_paths or {}).items()})
        self.train_decisions: RouteMode = "gumbel"
        self.temperature = 1.0
        self.noisy_eval = False

    @property
    def num_options(self) -> int:
        return self.routers.num_options

    @property
    def has_half_option(self) -> bool:
        return self.num_options == 3

    def skip_paths_by_block(self) -> dict[int, nn.Module]:
        return {int(k): m for k, m in self.skip_paths.items()}

    @property
    def stage_ends(self) -> list[int]:
        """Index of the last block of each stage."""
        ends, total = [], 0
        for n in self.backbone.stage_sizes:
            total += n
            ends.append(total - 1)
        return ends

    def target_rates(self, target: float) -> list[float]:
        """Per-router target open rates for a rate loss at overall ``target`` (uniform; ImageNet ConvNet-AIG
        models override it with their papers' per-layer schedules)."""
        return [float(target)] * self.num_blocks

    # forward ---------------------------------------------------------------------------------
    def forward(self, x: Tensor, features: bool = False) -> DynamicOutput:
        """``x [B, C, H, W]``; ``features=True`` adds every block's and stage's output to the extras."""
        self.check_input(x)
        if self.train_decisions not in ROUTE_MODES:
            raise ValueError(f"train_decisions must be one of {ROUTE_MODES}, got {self.train_decisions!r}")
        if (not self.training and not features and not self.noisy_eval and self.skipper.executor == "sparse"
                and skip_kernels.applies(self.backbone.blocks[0], x)):
            return self._infer(x)
        k = self.num_options
        forced = self.forced_keep(x)
        h = self.backbone.stem(x)
        state = self.routers.init_state(h)
        logits, masks, options, outs = [], [], [], []
        paths = self.skip_paths
        for i, block in enumerate(self.backbone.blocks):
            logit, state = self.routers.step(i, h, state)
            r = route(logit, training=self.training, mode=self.train_decisions, threshold=self.threshold,
                      temperature=self.temperature, forced=None if forced is None else forced[:, i],
                      noisy=self.noisy_eval)
            path = paths[str(i)] if str(i) in paths else None
            h = self.skipper.run_block(block, h, r.mask[:, k - 1], half=r.mask[:, 1] if k == 3 else None,
                                       skip_path=path)
            logits.append(logit)
            masks.append(r.mask)
            options.append(r.option)
            if features:
                outs.append(h)
        extras: dict[str, Any] = {}
        if features:
            extras["block_features"] = outs
            extras["stage_features"] = [outs[e] for e in self.stage_ends]
        return self._output(x, self.backbone.head(h), logits, torch.stack(options, 1), torch.stack(masks, 1), extras)

    def _infer(self, x: Tensor) -> DynamicOutput:
        """Inference on the sparse executor's kernels (:mod:`ponder.nn.skip_kernels`): channels-last maps,
        BN folded, each router's decision read once per block (one host sync), nothing else per block."""
        k, n = self.num_options, x.shape[0]
        forced = self.forced_keep(x)
        if n == 1:
            return self._infer_one(x, forced)
        if forced is not None:
            forced_options = (forced > 0.5).long() * (k - 1)
            forced_counts = (forced > 0.5).sum(0).tolist()
        h = stem_on_kernels(self.backbone, x)
        state = self.routers.init_state(h)
        logits, options = [], []
        paths = self.skip_paths_by_block()
        for i, block in enumerate(self.backbone.blocks):
            logit, state = self.routers.infer_step(i, h, state)
            if forced is not None:
                option = forced_options[:, i]
                counts = [n - forced_counts[i]] + [0] * (k - 2) + [forced_counts[i]]
            else:
                option = eval_option(logit, self.threshold)
                counts = torch.bincount(option, minlength=k).tolist()
            h = self.skipper.run_option(block, h, option, counts, skip_path=paths.get(i), own=True)
            logits.append(logit)
            options.append(option)
        option_t = torch.stack(options, 1)
        masks = F.one_hot(option_t, k).to(x.dtype)
        return self._output(x, self.backbone.head(h), logits, option_t, masks, {})

    def _infer_one(self, x: Tensor, forced: Tensor | None) -> DynamicOutput:
        """:meth:`_infer` for one image on the model's batch-1 plan (:func:`ponder.fast.prepared`): every
        router and every option of every block bound to its kernels once; per block one router call, its
        decision read on the host, one runner (:func:`ponder.nn.skip_kernels.bound_options`)."""
        k = self.num_options
        h = stem_on_kernels(self.backbone, x)
        steps, runners = self.batch_one_plan(h, self.backbone.blocks, k, self.routers.bound_steps,
                                             self.skip_paths_by_block())
        picks = None if forced is None else ((forced[0] > 0.5).long() * (k - 1)).tolist()
        state = self.routers.init_state(h)
        logits, choices = [], []
        for i, (step, options) in enumerate(zip(steps, runners)):
            logit, state = step(h, state)
            if picks is not None:
                choice = picks[i]
            elif self.threshold == 0.5:
                choice = eval_choice(logit.tolist()[0])
            else:
                choice = int(eval_option(logit, self.threshold))
            h = options[choice](h)
            logits.append(logit)
            choices.append(choice)
        option_t = torch.tensor([choices], device=x.device)
        masks = F.one_hot(option_t, k).to(x.dtype)
        return self._output(x, self.backbone.head(h), logits, option_t, masks, {})

    def _output(self, x: Tensor, out_logits: Tensor, logits: list[Tensor], option_t: Tensor, masks: Tensor,
                extras: dict[str, Any]) -> DynamicOutput:
        """The output from the head's logits, each router's logits ``[B, K]`` and the options ``[B, blocks]``."""
        k = self.num_options
        logit_t = torch.stack(logits, 1)
        extras.update(router_logits=logit_t, router_probs=torch.softmax(logit_t, 2), router_masks=masks,
                      options=option_t, usage=masks @ option_work(k, x.device).to(masks.dtype))
        macs = self.charge(x, option_t == k - 1, option_t == 1 if k == 3 else None)
        return DynamicOutput(logits=out_logits, macs=macs, gates=(option_t > 0).to(x.dtype), extras=extras)

    # cost ------------------------------------------------------------------------------------
    def measure_decision_units(self, input_size: tuple[int, int, int]) -> dict[str, int]:
        """``routers.i`` for every router, at batch 1 on the dense path."""
        units = {}
        h = self.backbone.stem(example_input(self, input_size))
        state = self.routers.init_state(h)
        for i, block in enumerate(self.backbone.blocks):
            units[f"routers.{i}"] = count_macs(self.routers.step, i, h, state)
            _, state = self.routers.step(i, h, state)
            h = block(h)
        return units

    def option_macs(self, input_size: tuple[int, int, int] | None = None) -> Tensor:
        """``[blocks, K]`` float64 MACs of each block's options (skip path, first conv, whole block)."""
        led = self.ledger(tuple(input_size or self.default_input_size))
        suffixes = (".skip", ".half", "") if self.num_options == 3 else (".skip", "")
        return torch.tensor([[float(led[f"blocks.{i}{s}"]) for s in suffixes] for i in range(self.num_blocks)],
                            dtype=torch.float64)

    def profile_blocks(self, input_size: tuple[int, int, int]) -> list[dict]:
        """Per block: ``macs`` when run, ``skip_macs`` when skipped (``half_macs``), ``gate_macs`` of its router."""
        led = self.ledger(input_size)
        return [dict(row, gate_macs=led[f"routers.{i}"]) for i, row in enumerate(super().profile_blocks(input_size))]
