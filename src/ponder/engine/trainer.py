"""The training loop: epochs, per-iteration LR, AMP, DDP, evaluation, logging, checkpoints, resume.

The :class:`Trainer` takes ready-made loaders, so it runs on any data; :func:`ponder.engine.train`
builds model, method and data from a :class:`~ponder.config.RunConfig` and calls it.
"""

from __future__ import annotations

import random
import sys
import time
import warnings
from pathlib import Path
from typing import Any, Callable, Iterable

import numpy as np
import torch
import torch.nn as nn

from ponder.config import RunConfig
from ponder.engine import checkpoint as ckpt
from ponder.dist import gather_objects
from ponder.engine.context import TrainContext
from ponder.engine.distributed import DistInfo, all_true, barrier, broadcast_buffers, wrap_ddp
from ponder.engine.optim import LRSchedule, build_optimizer
from ponder.engine.sync_batchnorm import convert_sync_batchnorm
from ponder.evaluate.records import collect
from ponder.methods.base import Method

STATE_FORMAT = 1


class NonFiniteLossError(RuntimeError):
    """Training became NaN or infinite (the loss, or the weights after a step); the last
    finite checkpoint is kept."""


class NonFiniteWeightsError(NonFiniteLossError):
    """A parameter or buffer (e.g. a BN running variance) became NaN or infinite; nothing non-finite is saved."""


def seed_everything(seed: int) -> None:
    """Seed Python's ``random``, numpy and torch (all devices)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def steps_per_epoch(loader: Iterable, max_steps: int | None) -> int:
    """Optimizer steps in one epoch: ``len(loader)``, capped by ``max_steps`` when given."""
    try:
        n = len(loader)  # type: ignore[arg-type]
    except TypeError:
        raise ValueError("the training loader has no length; the trainer needs a sized data set") from None
    if n == 0:
        raise ValueError("the training loader yields no batches; check data.batch_size and the data set size")
    return min(n, max_steps) if max_steps else n


def _loader_generators(loader: Any) -> dict[str, torch.Generator]:
    """Random generators that decide the training order (restored on resume)."""
    gens: dict[str, torch.Generator] = {}
    for name, g in (("loader", getattr(loader, "generator", None)),
                    ("sampler", getattr(getattr(loader, "sampler", None), "generator", None))):
        if isinstance(g, torch.Generator) and all(g is not other for other in gens.values()):
            gens[name] = g
    return gens


class Trainer:
    """Trains ``model`` with ``method`` on ``train_loader`` for ``config.train.epochs`` epochs.

    Args:
        config: the run config (optim, schedule, train sections are used here).
        model: the (unwrapped) model; moved to ``device``.
        method: the training objective, built for ``model``.
        train_loader: yields ``(images [B, C, H, W], targets [B])``.
        test_loader / val_loader: evaluated after every epoch (accuracy and mean MACs).
        run_dir: where checkpoints and metrics go (None: nothing is written).
        device: torch device; dist: this process's rank info (DDP when ``world_size > 1``).
        verbose: print one line per epoch (rank 0).
    """

    def __init__(self, config: RunConfig, model: nn.Module, method: Method, train_loader: Iterable,
                 test_loader: Iterable | None = None, val_loader: Iterable | None = None,
                 run_dir: str | Path | None = None, device: torch.device | str = "cpu",
                 dist: DistInfo | None = None, verbose: bool = True) -> None:
        self.config, self.method = config, method
        self.train_loader, self.test_loader, self.val_loader = train_loader, test_loader, val_loader
        self.run_dir = Path(run_dir) if run_dir is not None else None
        self.device = torch.device(device)
        self.dist = dist or DistInfo()
        self.verbose = verbose and self.dist.is_main
        tc = config.train
        on_cuda = self.device.type == "cuda"
        if tc.amp and not on_cuda:
            warnings.warn("train.amp is ignored on CPU (mixed precision is CUDA-only here); training in float32",
                          stacklevel=2)
        if tc.channels_last and not on_cuda:
            warnings.warn("train.channels_last is ignored on CPU; it only speeds up CUDA convolutions", stacklevel=2)
        self.amp = tc.amp and on_cuda
        self.channels_last = tc.channels_last and on_cuda
        self.model = model.to(self.device)
        if self.channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        if tc.sync_batchnorm and self.dist.enabled:
            convert_sync_batchnorm(self.model)
        self.net = wrap_ddp(self.model, self.device, tc.find_unused_parameters) if self.dist.enabled else self.model
        self.optimizer = build_optimizer(method.param_groups(self.model), self.model, config.optim)
        self.steps_per_epoch = steps_per_epoch(train_loader, tc.max_steps_per_epoch)
        self.schedule = LRSchedule(config.schedule, config.optim.lr, tc.epochs, self.steps_per_epoch)
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.amp)
        self.generators = _loader_generators(train_loader)
        self.epoch = 0          # finished epochs
        self.step = 0           # finished iterations (batches; drives the LR schedule)
        self.batch_index = 0    # index of the current batch within its epoch
        self.history: list[dict[str, Any]] = []
        self._owned: dict[str, dict[str, Any]] = {"modules": {}, "optimizers": {}}
        self._owned_lr: dict[str, Callable[[int], float]] = {}
        self._tb_wanted = tc.tensorboard and self.dist.is_main and self.run_dir is not None
        if self._tb_wanted:
            self._tensorboard_class()  # fail now, not after the first epoch, when the package is missing
        self._tb: Any = None
        self.ctx = TrainContext(self)
        method.setup(self.ctx)

    def register_owned(self, kind: str, name: str, obj: Any, lr_factor: Callable[[int], float] | None = None) -> None:
        """Keep a method-owned module or optimizer (``kind`` "modules" / "optimizers") in the training state."""
        if name in self._owned[kind]:
            raise ValueError(f"the method registers two {kind[:-1]}s named {name!r}; give each its own name")
        self._owned[kind][name] = obj
        if lr_factor is not None:
            self._owned_lr[name] = lr_factor

    # ------------------------------------------------------------------ state

    def state_dict(self) -> dict[str, Any]:
        """Full training state (tensors and plain types only, RNG states of every rank)."""
        return {
            "format": STATE_FORMAT,
            "epoch": self.epoch,
            "step": self.step,
            "world_size": self.dist.world_size,
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "method": self.method.state_dict(),
            "scaler": self.scaler.state_dict(),
            "owned": {kind: {k: v.state_dict() for k, v in objs.items()} for kind, objs in self._owned.items()},
            "rng": gather_objects(ckpt.rng_state(self.generators)),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` saved; the config must match the run's."""
        if state.get("format") != STATE_FORMAT:
            raise ckpt.RunDirError(f"training state has format {state.get('format')!r}, this ponder reads {STATE_FORMAT}")
        try:
            self.model.load_state_dict(state["model"])
            self.optimizer.load_state_dict(state["optimizer"])
        except (RuntimeError, ValueError, KeyError) as e:
            raise ckpt.RunDirError(f"the saved training state does not fit this model/optimizer ({ckpt.first_line(e)}); "
                                   f"resume with the run's own config.yaml") from None
        self.method.load_state_dict(state["method"])
        self._load_owned(state.get("owned", {}))
        if state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        self.epoch, self.step = int(state["epoch"]), int(state["step"])
        rngs = state["rng"]
        same_world = int(state.get("world_size", 1)) == self.dist.world_size
        ckpt.set_rng_state(rngs[self.dist.rank] if same_world else rngs[0], self.generators)

    def _load_owned(self, saved: dict[str, dict[str, Any]]) -> None:
        for kind, objs in self._owned.items():
            have = saved.get(kind, {})
            if set(have) != set(objs):
                raise ckpt.RunDirError(f"the saved training state holds method-owned {kind} {sorted(have)} but the method "
                                       f"owns {sorted(objs)}; resume with the run's own config.yaml")
            try:
                for name, obj in objs.items():
                    obj.load_state_dict(have[name])
            except (RuntimeError, ValueError, KeyError) as e:
                raise ckpt.RunDirError(f"the saved state of the method's {kind[:-1]} does not fit it "
                                       f"({ckpt.first_line(e)}); resume with the run's own config.yaml") from None

    def resume(self, run_dir: str | Path) -> None:
        """Continue from ``run_dir/state.pt`` (metrics of epochs the state does not cover are dropped)."""
        run_dir = Path(run_dir)
        self.load_state_dict(ckpt.load_state(run_dir / ckpt.STATE_FILE))
        if self.dist.is_main:
            ckpt.truncate_metrics(run_dir, self.epoch)
        self.history = ckpt.read_metrics(run_dir)

    def save_checkpoint(self) -> None:
        """Write ``weights.safetensors`` and ``state.pt`` atomically (rank 0; all ranks join the RNG gather).

        :meth:`fit` calls :meth:`check_finite_state` first, so no NaN or infinite tensor is ever saved.
        """
        state = self.state_dict()
        if self.dist.is_main and self.run_dir is not None:
            ckpt.save_weights(self.model, self.run_dir / ckpt.WEIGHTS_FILE)
            ckpt.save_state(state, self.run_dir / ckpt.STATE_FILE)
        barrier()

    # ------------------------------------------------------------------ loop

    def fit(self) -> list[dict[str, Any]]:
        """Train the remaining epochs; returns every epoch's metrics (also in ``metrics.jsonl``)."""
        epochs = self.config.train.epochs
        try:
            while self.epoch < epochs:
                start = time.perf_counter()
                record = {"epoch": self.epoch + 1, **self.train_epoch(self.epoch)}
                record.update(self.method.on_epoch_end(self.ctx) or {})
                record.update(self.evaluate())
                skipped = self._skipped_images()
                if skipped:
                    record["skipped_images"] = len(skipped)
                record["time_s"] = round(time.perf_counter() - start, 3)
                self.check_finite_state()
                self.epoch += 1
                self._log(record)  # before the checkpoint: a crash in between is undone by resume's truncation
                self.save_checkpoint()
        finally:
            if self._tb is not None:
                self._tb.close()
        skipped = self._skipped_images()
        if skipped and self.verbose:
            noun = "image" if len(skipped) == 1 else "images"
            print(f"skipped {len(skipped)} unreadable {noun} (data.skip_bad_images): {', '.join(sorted(skipped)[:3])}"
                  f"{', ...' if len(skipped) > 3 else ''}", flush=True)
        return self.history

    def _skipped_images(self) -> dict[str, str]:
        """Unreadable images the loaders skipped so far, over every rank (path -> reason)."""
        loaders = [x for x in (self.train_loader, self.val_loader, self.test_loader) if getattr(x, "skip_bad", False)]
        if not loaders:
            return {}
        local = {path: why for loader in loaders for path, why in loader.skipped.items()}
        return {path: why for part in gather_objects(local) for path, why in part.items()}

    def train_epoch(self, epoch: int) -> dict[str, float]:
        """One pass over the training loader; returns sample-weighted means of loss and method metrics."""
        from tqdm.auto import tqdm

        self.method.on_epoch_start(epoch, self.config.train.epochs)
        sampler = getattr(self.train_loader, "sampler", None)
        if hasattr(sampler, "set_epoch"):
            sampler.set_epoch(epoch)
        self.net.train()
        sums: dict[str, float] = {}
        count = 0
        lr = self.optimizer.param_groups[0]["lr"]
        show = self.dist.is_main and sys.stdout.isatty()
        bar = tqdm(total=self.steps_per_epoch, desc=f"epoch {epoch + 1}/{self.config.train.epochs}",
                   leave=False, disable=not show)
        for i, (images, targets) in enumerate(self.train_loader):
            if i >= self.steps_per_epoch:
                break
            self.batch_index = i
            self._apply_schedules()
            if i == 0:
                lr = self.optimizer.param_groups[0]["lr"]
            images = images.to(self.device, non_blocking=True)
            targets = targets.to(self.device, non_blocking=True)
            if self.channels_last:
                images = images.contiguous(memory_format=torch.channels_last)
            out = self.method.train_step(self.ctx, images, targets)
            self.method.after_step(self.ctx)
            loss_value = float(out.loss.detach().float().item())
            self.step += 1
            n = int(targets.shape[0])
            count += n
            sums["loss"] = sums.get("loss", 0.0) + loss_value * n
            for k, v in out.metrics.items():
                sums[k] = sums.get(k, 0.0) + float(v) * n
            bar.update(1)
            bar.set_postfix(loss=f"{loss_value:.4f}", lr=f"{self.optimizer.param_groups[0]['lr']:.4g}")
        bar.close()
        totals: dict[str, float] = {}
        for part in gather_objects((sums, count)):
            for k, v in part[0].items():
                totals[k] = totals.get(k, 0.0) + v
            totals["__n"] = totals.get("__n", 0.0) + part[1]
        n_all = max(totals.pop("__n"), 1.0)
        return {"lr": lr, **{f"train_{k}": v / n_all for k, v in totals.items()}}

    def evaluate(self) -> dict[str, float]:
        """Accuracy and mean / std MACs on the val and test loaders (gathered over ranks)."""
        result: dict[str, float] = {}
        if self.dist.enabled:
            broadcast_buffers(self.model)
        for split, loader in (("val", self.val_loader), ("test", self.test_loader)):
            if loader is None:
                continue
            summary = collect(self.net, loader, self.device, distributed=self.dist.enabled,
                              progress=self.dist.is_main and sys.stdout.isatty(), desc=split).summary()
            result.update({f"{split}_acc": summary["accuracy"], f"{split}_macs": summary["macs_mean"],
                           f"{split}_macs_std": summary["macs_std"]})
        return result

    # ------------------------------------------------------------------ helpers

    def _apply_schedules(self) -> None:
        """Learning rates of the run's optimizer and of method-owned ones for iteration ``self.step``."""
        self.schedule.apply(self.optimizer, self.step)
        for name, factor in self._owned_lr.items():
            f = factor(self.step)
            for group in self._owned["optimizers"][name].param_groups:
                group["lr"] = group["base_lr"] * f

    def _kept(self) -> str:
        if self.run_dir is None:
            return "this trainer has no run directory, so nothing was saved"
        if self.epoch:
            return f"the checkpoint of epoch {self.epoch} in {self.run_dir} is kept"
        return "no epoch had finished, so no checkpoint was written"

    def non_finite_error(self, value: float) -> NonFiniteLossError:
        """The error for a NaN / infinite loss at the current batch (nothing has been changed yet)."""
        return NonFiniteLossError(
            f"training loss became {value} at epoch {self.epoch + 1}, step {self.batch_index + 1} "
            f"(lr {self.optimizer.param_groups[0]['lr']:.4g}); {self._kept()}; "
            f"lower optim.lr or add warm-up (schedule.warmup_epochs) and train again")

    def check_finite_state(self) -> None:
        """Raise :class:`NonFiniteWeightsError` (on every rank) when a float parameter or buffer of
        the model or of a method-owned module is NaN or infinite; called before anything is saved."""
        modules = {"": self.model, **{f"{name}.": m for name, m in self._owned["modules"].items()}}
        bad = [prefix + k for prefix, m in modules.items() for k, v in m.state_dict().items()
               if v.is_floating_point() and not bool(torch.isfinite(v).all())]
        if all_true(not bad, self.device):
            return
        where = f"{len(bad)} tensors, e.g. {', '.join(bad[:3])}" if bad else "on another rank"
        raise NonFiniteWeightsError(
            f"training made weights NaN or infinite in epoch {self.epoch + 1} ({where}; "
            f"lr {self.optimizer.param_groups[0]['lr']:.4g}); {self._kept()}; "
            f"lower optim.lr or add warm-up (schedule.warmup_epochs) and train again")

    def _log(self, record: dict[str, Any]) -> None:
        self.history.append(record)
        if not self.dist.is_main:
            return
        if self.run_dir is not None:
            ckpt.append_metrics(self.run_dir, record)
        if self._tb_wanted and self._tb is None:
            self._tb = self._tensorboard_class()(log_dir=str(self.run_dir / ckpt.TENSORBOARD_DIR))
        if self._tb is not None:
            for k, v in record.items():
                if k != "epoch" and isinstance(v, (int, float)):
                    self._tb.add_scalar(k, v, record["epoch"])
            self._tb.flush()
        if self.verbose:
            print(format_record(record, self.config.train.epochs), flush=True)

    @staticmethod
    def _tensorboard_class() -> Any:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise ImportError("train.tensorboard is true but the tensorboard package is not installed; "
                              "pip install 'ponder[tensorboard]' or set train.tensorboard=false") from None
        return SummaryWriter


def format_record(record: dict[str, Any], epochs: int) -> str:
    """One human line per epoch: ``epoch 3/160  lr 0.1  train_loss 1.23  test_acc 45.60%  test_macs 40.55M``."""
    parts = [f"epoch {record['epoch']}/{epochs}"]
    for k, v in record.items():
        if k == "epoch" or not isinstance(v, (int, float)):
            continue
        if k.endswith("_acc"):
            parts.append(f"{k} {100 * v:.2f}%")
        elif k.endswith("_macs"):
            parts.append(f"{k} {v / 1e6:.2f}M")
        elif k.endswith("_macs_std"):
            continue
        else:
            parts.append(f"{k} {v:.4g}")
    return "  ".join(parts)

