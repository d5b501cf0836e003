"""Per-sample evaluation records: what each test image got right and what it cost."""

from __future__ import annotations

import sys
from dataclasses import dataclass, fields
from typing import Any, Iterable

import torch
import torch.nn as nn
from torch import Tensor

from ponder.output import DynamicOutput


@dataclass
class Records:
    """One entry per evaluated sample, in data-set order (CPU tensors).

    Attributes:
        targets: ``[N]`` long true labels.
        preds: ``[N]`` long predicted labels (argmax of ``output.logits``).
        correct: ``[N]`` bool.
        macs: ``[N]`` float64 multiply-accumulates each sample really cost.
        exit_index: ``[N]`` long exit taken (multi-exit models), else None.
        gates: ``[N, blocks]`` float block decisions (block-skipping models), else None.
    """

    targets: Tensor
    preds: Tensor
    correct: Tensor
    macs: Tensor
    exit_index: Tensor | None = None
    gates: Tensor | None = None

    def __len__(self) -> int:
        return int(self.targets.numel())

    def summary(self) -> dict[str, float | int]:
        """``accuracy`` (fraction), ``macs_mean``, ``macs_std`` (population) and ``n``."""
        n = len(self)
        if n == 0:
            return {"accuracy": float("nan"), "macs_mean": float("nan"), "macs_std": float("nan"), "n": 0}
        return {
            "accuracy": self.correct.double().mean().item(),
            "macs_mean": self.macs.double().mean().item(),
            "macs_std": self.macs.double().std(unbiased=False).item(),
            "n": n,
        }

    @staticmethod
    def concat(parts: Iterable["Records"]) -> "Records":
        """Join records batch after batch (optional fields kept only when every part has them)."""
        parts = list(parts)
        if not parts:
            empty = torch.zeros(0, dtype=torch.long)
            return Records(empty, empty, empty.bool(), empty.double())
        kw: dict[str, Any] = {}
        for f in fields(Records):
            values = [getattr(p, f.name) for p in parts]
            kw[f.name] = torch.cat(values) if all(v is not None for v in values) else None
        return Records(**kw)

    def select(self, index: Tensor) -> "Records":
        """Records at ``index`` (a long index tensor or bool mask)."""
        return Records(**{f.name: (None if getattr(self, f.name) is None else getattr(self, f.name)[index])
                          for f in fields(Records)})


def records_from_output(output: DynamicOutput, targets: Tensor) -> Records:
    """Records of one batch (moved to CPU)."""
    preds = output.logits.argmax(1).cpu()
    targets = targets.cpu()
    return Records(
        targets=targets.long(),
        preds=preds,
        correct=preds == targets,
        macs=output.macs.detach().double().cpu(),
        exit_index=None if output.exit_index is None else output.exit_index.detach().long().cpu(),
        gates=None if output.gates is None else output.gates.detach().float().cpu(),
    )


def _shard_indices(loader: Any) -> Tensor | None:
    """Data-set indices this rank's loader visits, in order, or None when it is not a sharded sampler.

    Known shards: a ``DistributedSampler`` and any sampler with ``shuffle=False`` and a
    ``world_size`` (ponder's ``EpochSampler``); keys may be ``index`` or ``(index, seed)``.
    """
    from torch.utils.data.distributed import DistributedSampler

    sampler = getattr(loader, "sampler", None)
    sharded = isinstance(sampler, DistributedSampler) or (
        getattr(sampler, "world_size", None) is not None and getattr(sampler, "shuffle", True) is False)
    if not sharded:
        return None
    return torch.tensor([k[0] if isinstance(k, tuple) else int(k) for k in sampler], dtype=torch.long)


def _merge_ranks(parts: list[tuple[Records, Tensor]]) -> Records:
    """Put every rank's records at their data-set index (padding duplicates collapse to one entry)."""
    joined = Records.concat(p[0] for p in parts)
    index = torch.cat([p[1] for p in parts])
    if index.numel() != len(joined):
        raise RuntimeError(f"evaluation gathered {len(joined)} records for {index.numel()} sampled indices; "
                           f"a rank's loader stopped early")
    n = int(index.max().item()) + 1 if index.numel() else 0
    where = torch.full((n,), -1, dtype=torch.long)
    where[index] = torch.arange(index.numel())
    return joined.select(where[where >= 0])


@torch.no_grad()
def collect(model: nn.Module, loader: Iterable, device: torch.device | str, distributed: bool = False,
            progress: bool | None = None, desc: str = "eval") -> Records:
    """Run ``model`` (eval mode, no grad) over ``loader`` and record every sample.

    With ``distributed=True`` and a sharded loader (``DistributedSampler`` or ponder's
    ``EpochSampler``) each rank evaluates its shard and every rank gets the records of all
    ranks, in data-set order, each sample once. A loader that is not sharded is evaluated whole
    on each rank (nothing to gather). ``progress=None`` shows a bar only on a terminal.
    """
    from tqdm.auto import tqdm

    from ponder.engine.distributed import gather_objects, unwrap

    net = unwrap(model)
    was_training = net.training
    net.eval()
    if progress is None:
        progress = sys.stdout.isatty()
    parts: list[Records] = []
    try:
        for images, targets in tqdm(loader, desc=desc, leave=False, disable=not progress):
            out = net(images.to(device, non_blocking=True))
            parts.append(records_from_output(out, targets))
    finally:
        net.train(was_training)
    local = Records.concat(parts)
    shard = _shard_indices(loader) if distributed else None
    if shard is None:
        return local
    return _merge_ranks(gather_objects((local, shard)))
