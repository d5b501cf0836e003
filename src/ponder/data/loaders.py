"""Seeded data loaders: one sampler draws each epoch's order and every sample's augmentation seed."""

from __future__ import annotations

from typing import Any, Iterator

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, Dataset, Sampler, default_collate

from ponder.data.datasets import DataBundle
from ponder.data.errors import DataError
from ponder.data.imagefolder import BadImage


def _epoch_seed(seed: int, epoch: int) -> int:
    return int(np.random.SeedSequence([seed, epoch]).generate_state(1, np.uint64)[0] >> np.uint64(1))


class EpochSampler(Sampler):
    """Yields ``(index, sample_seed)`` keys; order and seeds depend only on ``(seed, epoch)``.

    The epoch advances by one on every pass; call ``set_epoch(e)`` (as with
    ``DistributedSampler``) before a pass to pin it, e.g. after resuming, so a resumed run sees
    exactly the batches and augmentations of an uninterrupted one. With ``world_size > 1`` each
    rank takes every ``world_size``-th key: padded by wrapping around (``pad=True``, equal
    batch counts for training) or not (``pad=False``: disjoint shards, each sample once, for
    evaluation). Results do not depend on the number of loader workers.
    """

    def __init__(self, n: int, seed: int = 0, shuffle: bool = True, rank: int = 0, world_size: int = 1, pad: bool = True) -> None:
        if seed < 0:
            raise DataError(f"seed={seed} must be non-negative")
        self.n, self.seed, self.shuffle, self.rank, self.world_size, self.pad = n, seed, shuffle, rank, world_size, pad
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _keys(self) -> tuple[torch.Tensor, torch.Tensor]:
        g = torch.Generator().manual_seed(_epoch_seed(self.seed, self.epoch))
        order = torch.randperm(self.n, generator=g) if self.shuffle else torch.arange(self.n)
        seeds = torch.randint(0, 2**62, (self.n,), generator=g)
        if self.pad and self.n % self.world_size:
            wrap = torch.arange(-(-self.n // self.world_size) * self.world_size) % self.n
            order, seeds = order[wrap], seeds[wrap]
        return order[self.rank :: self.world_size], seeds[self.rank :: self.world_size]

    def __iter__(self) -> Iterator[tuple[int, int]]:
        order, seeds = self._keys()
        self.epoch += 1
        return iter(list(zip(order.tolist(), seeds.tolist())))

    def __len__(self) -> int:
        if self.pad:
            return -(-self.n // self.world_size)
        return len(range(self.rank, self.n, self.world_size))


def collate_samples(items: list[Any]) -> Any:
    """``default_collate`` of a batch's samples; when some are :class:`BadImage` (files that could
    not be decoded) the result is ``(images or None, targets or None, [BadImage, ...])`` instead,
    for :class:`SampleLoader` to act on in the main process."""
    bad = [x for x in items if isinstance(x, BadImage)]
    if not bad:
        return default_collate(items)
    good = [x for x in items if not isinstance(x, BadImage)]
    images, targets = default_collate(good) if good else (None, None)
    return images, targets, bad


class SampleLoader(DataLoader):
    """A ``DataLoader`` (collating with :func:`collate_samples`) that acts on unreadable images in
    the main process, whatever the number of workers: it raises the first one's
    :class:`DataError` (one sentence naming the file), or with ``skip_bad`` leaves them out of
    their batch and records them in ``skipped`` (path -> reason)."""

    def __init__(self, *args: Any, skip_bad: bool = False, **kwargs: Any) -> None:
        super().__init__(*args, collate_fn=collate_samples, **kwargs)
        self.skip_bad = skip_bad
        self.skipped: dict[str, str] = {}

    def __iter__(self) -> Iterator[Any]:
        for batch in super().__iter__():
            if len(batch) == 2:
                yield batch
                continue
            images, targets, bad = batch
            if not self.skip_bad:
                raise DataError(bad[0].message)
            self.skipped.update((b.path, b.message) for b in bad)
            if images is None:
                raise DataError(f"every image of a batch is unreadable (e.g. {bad[0].path}); "
                                f"check the image folder or lower data.batch_size")
            yield images, targets


def _loader(ds: Dataset, batch_size: int, sampler: Sampler | None, cfg: Any, seed: int) -> DataLoader:
    return SampleLoader(
        ds, batch_size=batch_size, sampler=sampler, shuffle=False, num_workers=cfg.workers, drop_last=False,
        generator=torch.Generator().manual_seed(seed), pin_memory=torch.cuda.is_available(),
        skip_bad=bool(getattr(cfg, "skip_bad_images", False)),
    )


def build_loaders(bundle: DataBundle, cfg: Any, seed: int, distributed: bool = False) -> tuple[DataLoader, DataLoader | None, DataLoader]:
    """``(train_loader, val_loader or None, test_loader)`` for a :class:`DataBundle`.

    Train: shuffled by an :class:`EpochSampler` (``train_loader.sampler.set_epoch(e)``),
    ``cfg.batch_size``. Val/test: in order, ``cfg.eval_batch_size``; when ``distributed`` each
    rank gets the disjoint shard ``range(rank, n, world_size)``. ``cfg.workers`` worker
    processes, ``drop_last=False``; batches are ``(float images [B,C,H,W], int64 labels [B])``.
    """
    rank, world = 0, 1
    if distributed:
        if not (dist.is_available() and dist.is_initialized()):
            raise DataError("build_loaders(distributed=True) needs torch.distributed initialised first (run under torchrun)")
        rank, world = dist.get_rank(), dist.get_world_size()

    def eval_loader(ds: Dataset) -> DataLoader:
        sampler = EpochSampler(len(ds), seed, shuffle=False, rank=rank, world_size=world, pad=False) if distributed else None
        return _loader(ds, cfg.eval_batch_size, sampler, cfg, seed)

    train = _loader(bundle.train, cfg.batch_size, EpochSampler(len(bundle.train), seed, True, rank, world, pad=True), cfg, seed)
    return train, eval_loader(bundle.val) if bundle.val is not None else None, eval_loader(bundle.test)
