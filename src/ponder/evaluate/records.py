"""Per-sample evaluation records: what each image got right, what it cost, and what the model decided.

:func:`collect` is the one evaluation loop every protocol, the trainer and the demo use: it runs a
model over a loader and keeps, per sample, the prediction and its MACs plus every decision the
model's output carries (exit taken, block gates, active positions per unit, ponder cost per stage,
and with the compute-all early-exit executor the confidence and prediction of every exit).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, fields
from pathlib import Path
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
        exit_index: ``[N]`` long exit taken (early exit), else None.
        gates: ``[N, blocks]`` float block decisions (block skipping; ACT: units run), else None.
        active: ``[N, units]`` float64 fraction of positions each unit ran at (spatial), else None.
        ponder: ``[N, stages]`` float64 ponder cost per stage, mean over positions (ACT / SACT), else None.
        units_run: ``[N, stages]`` float64 halting step N per stage, mean over positions, else None.
        exit_conf: ``[N, K]`` float32 max-softmax of every exit (compute-all early-exit executor), else None.
        exit_pred: ``[N, K]`` long prediction of every exit, else None.
        exit_top5: ``[N, K]`` bool: the target is among exit ``k``'s five best classes, else None.
        ensemble_pred: ``[N, K]`` long prediction of the mean softmax of exits ``1..k``, else None.
    """

    targets: Tensor
    preds: Tensor
    correct: Tensor
    macs: Tensor
    exit_index: Tensor | None = None
    gates: Tensor | None = None
    active: Tensor | None = None
    ponder: Tensor | None = None
    units_run: Tensor | None = None
    exit_conf: Tensor | None = None
    exit_pred: Tensor | None = None
    exit_top5: Tensor | None = None
    ensemble_pred: Tensor | None = None

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

    @property
    def exit_correct(self) -> Tensor:
        """``[N, K]`` bool: exit ``k`` is right on sample ``i`` (needs the compute-all records)."""
        if self.exit_pred is None:
            raise ValueError("these records hold no per-exit predictions; collect them with the compute-all "
                             "(masked) executor of an early-exit model")
        return self.exit_pred == self.targets.view(-1, 1)

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

    def tensors(self) -> dict[str, Tensor]:
        """Every field that is present, by name (for :func:`save_records`)."""
        return {f.name: getattr(self, f.name) for f in fields(Records) if getattr(self, f.name) is not None}


def save_records(records: Records, path: str | Path) -> Path:
    """Write ``records`` as safetensors (bool fields as uint8); :func:`load_records` reads them back."""
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    data = {k: (v.to(torch.uint8) if v.dtype == torch.bool else v).contiguous() for k, v in records.tensors().items()}
    save_file(data, str(path), metadata={"bool": ",".join(k for k, v in records.tensors().items()
                                                          if v.dtype == torch.bool)})
    return path


def load_records(path: str | Path) -> Records:
    """Records written by :func:`save_records`."""
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        bools = set(filter(None, (f.metadata() or {}).get("bool", "").split(",")))
        data = {k: f.get_tensor(k) for k in f.keys()}
    return Records(**{k: (v.bool() if k in bools else v) for k, v in data.items()})


def records_from_output(output: DynamicOutput, targets: Tensor) -> Records:
    """Records of one batch (moved to CPU); decisions only where the output carries them."""
    preds = output.logits.argmax(1).cpu()
    targets = targets.cpu().long()
    rec = Records(targets=targets, preds=preds, correct=preds == targets, macs=output.macs.detach().double().cpu(),
                  exit_index=None if output.exit_index is None else output.exit_index.detach().long().cpu(),
                  gates=None if output.gates is None else output.gates.detach().float().cpu())
    if output.masks is not None:
        rec.active = torch.stack([m.detach().flatten(1).double().mean(1) for m in output.masks], 1).cpu()
    if output.ponder is not None:
        rec.ponder = torch.stack([_per_sample(p) for p in output.ponder], 1).cpu()
        if "units_run" in output.extras:
            rec.units_run = torch.stack([_per_sample(n) for n in output.extras["units_run"]], 1).cpu()
    if output.exit_logits is not None:
        probs = torch.stack(output.exit_logits).detach().float().softmax(2)  # [K, B, classes]
        conf, pred = probs.max(2)
        rec.exit_conf, rec.exit_pred = conf.t().contiguous().cpu(), pred.t().contiguous().cpu()
        top = probs.topk(min(5, probs.shape[2]), dim=2).indices
        rec.exit_top5 = (top == targets.to(top.device).view(1, -1, 1)).any(2).t().contiguous().cpu()
        rec.ensemble_pred = probs.cumsum(0).argmax(2).t().contiguous().cpu()
    return rec


def _per_sample(t: Tensor) -> Tensor:
    """A per-image (``[B]``) or per-position (``[B, H, W]``) map as ``[B]`` float64 (mean over positions)."""
    t = t.detach().double()
    return t.flatten(1).mean(1) if t.dim() > 1 else t


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
    """Run ``model`` (eval mode, no grad) over ``loader`` of ``(images, targets)`` and record every sample.

    With ``distributed=True`` and a sharded loader (``DistributedSampler`` or ponder's
    ``EpochSampler``) each rank evaluates its shard and every rank gets the records of all
    ranks, in data-set order, each sample once. A loader that is not sharded is evaluated whole
    on each rank (nothing to gather). ``progress=None`` shows a bar only on a terminal.
    """
    from tqdm.auto import tqdm

    from ponder.dist import gather_objects, unwrap

    net = unwrap(model)
    was_training = net.training
    net.eval()
    if progress is None:
        progress = sys.stdout.isatty()
    parts: list[Records] = []
    try:
        for batch in tqdm(loader, desc=desc, leave=False, disable=not progress):
            images, targets = batch[0], batch[1]
            out = net(images.to(device, non_blocking=True))
            parts.append(records_from_output(out, targets))
    finally:
        net.train(was_training)
    local = Records.concat(parts)
    shard = _shard_indices(loader) if distributed else None
    if shard is None:
        return local
    return _merge_ranks(gather_objects((local, shard)))
