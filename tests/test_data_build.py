"""build_datasets / build_loaders: dispatch, held-out split, long tail, seeding, sharding."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from cifar_fixtures import real_cifar10, write_fake_cifar
from shared_dir import SHARED
from ponder.config import DataConfig
from ponder.data import DataError, EpochSampler, build_datasets, build_loaders

REAL = (SHARED / "data/cifar-10-batches-py") if SHARED else Path("/nonexistent")


@pytest.fixture(scope="module")
def cifar_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("cifar")
    write_fake_cifar(root, "cifar10", n_train=400, n_test=60, seed=0)
    write_fake_cifar(root, "cifar100", n_train=500, n_test=100, seed=1)
    return root


def test_cifar_bundle_with_val_long_tail_and_limit(cifar_root):
    cfg = DataConfig(dataset="cifar10", data_dir=str(cifar_root), val_size=50, long_tail_ratio=5)
    b = build_datasets(cfg, seed=0)
    assert (b.num_classes, b.input_size, len(b.val), len(b.test)) == (10, (3, 32, 32), 50, 60)
    per_class = b.train.targets.bincount(minlength=10)
    assert (per_class[1:] <= per_class[:-1]).all() and per_class[0] > 2 * per_class[9]
    assert len(build_datasets(DataConfig(dataset="cifar10", data_dir=str(cifar_root), limit_train=64), 0).train) == 64
    b100 = build_datasets(DataConfig(dataset="cifar100", data_dir=str(cifar_root)), 0)
    assert b100.num_classes == 100 and len(b100.train) == 500 and len(b100.classes) == 100


def test_val_is_held_out_from_train_and_uses_eval_transforms(cifar_root):
    cfg = DataConfig(dataset="cifar10", data_dir=str(cifar_root), val_size=40)
    b = build_datasets(cfg, seed=1)
    train_rows = {bytes(im.numpy()) for im in b.train.images}
    assert not any(bytes(im.numpy()) in train_rows for im in b.val.images)
    assert len(train_rows) + 40 == 400
    a, _ = b.val[(0, 1)]
    assert torch.equal(a, b.val[(0, 2)][0])  # no randomness in the val transform
    assert not torch.equal(b.train[(0, 1)][0], b.train[(0, 2)][0])
    assert torch.equal(build_datasets(cfg, seed=1).val.images, b.val.images)


def test_augment_false_uses_eval_transform(cifar_root):
    b = build_datasets(DataConfig(dataset="cifar10", data_dir=str(cifar_root), augment=False), 0)
    assert torch.equal(b.train[(3, 1)][0], b.train[(3, 2)][0])


def test_normalize_replaces_the_data_sets_statistics(cifar_root):
    raw = DataConfig(dataset="cifar10", data_dir=str(cifar_root), normalize=[[0, 0, 0], [1, 1, 1]])
    b = build_datasets(raw, 0)
    x, _ = b.test[0]
    torch.testing.assert_close(x, b.test.images[0].float() / 255)
    half = DataConfig(dataset="cifar10", data_dir=str(cifar_root), normalize=[[0.5] * 3, [0.25] * 3])
    torch.testing.assert_close(build_datasets(half, 0).test[0][0], (x - 0.5) / 0.25)
    for bad in ([[0, 0, 0]], [[0, 0, 0], [1, 0, 1]], [[0, 0], [1, 1, 1]], "raw"):
        with pytest.raises(DataError, match=r"data.normalize must be \[mean, std\]"):
            build_datasets(DataConfig(dataset="cifar10", data_dir=str(cifar_root), normalize=bad), 0)


def test_unknown_dataset_and_missing_dir():
    with pytest.raises(DataError, match="valid: cifar10, cifar100, imagefolder, digits"):
        build_datasets(DataConfig(dataset="mnist"), 0)
    with pytest.raises(DataError, match="--data-dir"):
        build_datasets(DataConfig(dataset="cifar10", data_dir=None), 0)


def _first_batches(loader, k=2):
    it = iter(loader)
    return [next(it) for _ in range(k)]


def test_loaders_are_seeded_and_epochs_differ(cifar_root):
    cfg = DataConfig(dataset="cifar10", data_dir=str(cifar_root), val_size=40, batch_size=32, eval_batch_size=50)
    b = build_datasets(cfg, 0)
    tr1, va, te = build_loaders(b, cfg, seed=7)
    tr2, _, _ = build_loaders(b, cfg, seed=7)
    (x1, y1), (x2, y2) = _first_batches(tr1, 1)[0], _first_batches(tr2, 1)[0]
    assert x1.shape == (32, 3, 32, 32) and x1.dtype == torch.float32 and y1.dtype == torch.int64
    assert torch.equal(x1, x2) and torch.equal(y1, y2)
    x_next, _ = _first_batches(tr1, 1)[0]  # second pass = epoch 1
    assert not torch.equal(x1, x_next)
    tr1.sampler.set_epoch(0)
    assert torch.equal(_first_batches(tr1, 1)[0][0], x1)  # resume-style replay
    assert sum(len(y) for _, y in tr1) == 360  # drop_last=False
    assert [len(y) for _, y in te] == [50, 10] and sum(len(y) for _, y in va) == 40
    xt, yt = next(iter(te))
    assert torch.equal(yt, b.test.targets[:50])  # eval loaders keep file order


def test_workers_do_not_change_batches(cifar_root):
    cfg = DataConfig(dataset="cifar10", data_dir=str(cifar_root), batch_size=64, limit_train=128)
    b = build_datasets(cfg, 0)
    (x0, y0), = _first_batches(build_loaders(b, cfg, seed=3)[0], 1)
    cfg.workers = 2
    (x2, y2), = _first_batches(build_loaders(b, cfg, seed=3)[0], 1)
    assert torch.equal(x0, x2) and torch.equal(y0, y2)


def test_augmentation_follows_the_sample_not_the_batch(cifar_root):
    cfg = DataConfig(dataset="cifar10", data_dir=str(cifar_root), batch_size=10)
    train = build_datasets(cfg, 0).train
    keys = [(i, 1000 + 7919 * i) for i in range(10)]
    batch = [x for x, _ in train.__getitems__(keys)]
    assert all(torch.equal(batch[j], train[k][0]) for j, k in enumerate(keys))  # fetched alone
    other = [x for x, _ in train.__getitems__(keys[::-3])]  # another batch, in another order
    assert all(torch.equal(other[j], batch[9 - 3 * j]) for j in range(len(other)))
    assert not torch.equal(train[(0, 1)][0], train[(0, 2)][0])  # the seed decides the crop / flip

    # a global batch of 10 in one process == the two ranks' batches of 5 (EpochSampler shards)
    from ponder.data.loaders import _loader

    one = next(iter(_loader(train, 10, EpochSampler(len(train), seed=3), cfg, 3)))[0]
    for rank in (0, 1):
        half = next(iter(_loader(train, 5, EpochSampler(len(train), seed=3, rank=rank, world_size=2), cfg, 3)))[0]
        assert torch.equal(half, one[rank::2])


def test_sample_streams_cover_random_resized_crops():
    from ponder.data.transforms import SampleRNG, imagenet_transforms

    tf = imagenet_transforms(True, size=16)
    images = torch.randint(0, 256, (6, 3, 24, 30), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    seeds = [11, 22, 33, 44, 55, 66]
    batch = tf(images, SampleRNG(seeds))
    alone = torch.stack([tf(images[i], SampleRNG([s])) for i, s in enumerate(seeds)])
    assert batch.shape == (6, 3, 16, 16) and torch.equal(batch, alone)
    u = SampleRNG([5, 5, 6]).uniform()
    assert u[0] == u[1] != u[2] and 0 <= float(u.min()) and float(u.max()) < 1
    stream = SampleRNG([7])
    assert len({float(stream.uniform()) for _ in range(100)}) == 100  # a stream moves on with every draw
    rng = SampleRNG(range(4000))
    many = torch.cat([rng.uniform(), rng.uniform()])
    assert abs(float(many.mean()) - 0.5) < 0.02 and abs(float(many.var()) - 1 / 12) < 0.01


def test_epoch_sampler_sharding():
    train = [list(EpochSampler(10, seed=1, rank=r, world_size=3, pad=True)) for r in range(3)]
    assert [len(s) for s in train] == [4, 4, 4]
    assert {i for s in train for i, _ in s} == set(range(10))
    evals = [[i for i, _ in EpochSampler(10, shuffle=False, rank=r, world_size=3, pad=False)] for r in range(3)]
    assert evals == [[0, 3, 6, 9], [1, 4, 7], [2, 5, 8]]
    assert len(EpochSampler(10, rank=1, world_size=3, pad=False)) == 3


def test_digits_bundle():
    b = build_datasets(DataConfig(dataset="digits", val_size=97), seed=0)
    assert (len(b.train), len(b.val), len(b.test), b.num_classes, b.input_size) == (1300, 97, 400, 10, (1, 16, 16))
    x, y = b.test[0]
    assert x.shape == (1, 16, 16) and x.dtype == torch.float32
    plain = build_datasets(DataConfig(dataset="digits", augment=False), seed=0).train
    allx = torch.stack([plain[i][0] for i in range(len(plain))])
    assert abs(float(allx.mean())) < 1e-4 and abs(float(allx.std()) - 1) < 1e-3  # normalized by train statistics
    shifted = torch.stack([b.train[(i, 5)][0] for i in range(50)])
    assert not torch.equal(shifted, torch.stack([b.train[(i, 6)][0] for i in range(50)]))  # random shifts


def test_imagefolder_bundle(tmp_path):
    from PIL import Image

    for split in ("train", "val"):
        for c, name in enumerate(["cat", "dog"]):
            d = tmp_path / split / name
            d.mkdir(parents=True)
            for i in range(3):
                Image.fromarray(np.full((40, 60, 3), 50 * c + i, np.uint8)).save(d / f"{i}.png")
    cfg = DataConfig(dataset="imagefolder", data_dir=str(tmp_path), val_size=2, batch_size=2)
    b = build_datasets(cfg, 0)
    assert (len(b.train), len(b.val), len(b.test), b.classes, b.input_size) == (4, 2, 6, ["cat", "dog"], (3, 224, 224))
    x, y = next(iter(build_loaders(b, cfg, 0)[0]))
    assert x.shape == (2, 3, 224, 224) and y.shape == (2,)
    (tmp_path / "val" / "bird").mkdir()
    with pytest.raises(DataError, match="differ"):
        build_datasets(cfg, 0)


@pytest.mark.skipif(not REAL.is_dir(), reason="CIFAR-10 subset not present")
def test_real_subset_bundle():
    cfg = DataConfig(dataset="cifar10", data_dir=str(REAL), val_size=500, batch_size=128)
    b = build_datasets(cfg, seed=0)
    assert (len(b.train), len(b.val), len(b.test)) == (4585, 500, 1017)
    x, _ = next(iter(build_loaders(b, cfg, 0)[2]))
    assert abs(float(x.mean())) < 0.2 and 0.8 < float(x.std()) < 1.2  # CIFAR-10 statistics fit the subset


@pytest.mark.skipif(real_cifar10() is None, reason="the real CIFAR-10 subset (shared/data/cifar-10-batches-py) is not present")
def test_real_subset_long_tail_counts_and_untouched_test_set():
    root = real_cifar10()
    plain = build_datasets(DataConfig(dataset="cifar10", data_dir=str(root)), seed=0)
    lt = build_datasets(DataConfig(dataset="cifar10", data_dir=str(root), long_tail_ratio=100), seed=0)
    assert plain.train.targets.bincount(minlength=10).tolist() == [517, 524, 490, 493, 537, 475, 503, 516, 529, 501]
    # N_c * 100**(-c/9): 517, 314.13, 176.10, 106.21, 69.36, 36.78, 23.35, 14.36, 8.82, 5.01 (floored)
    assert lt.train.targets.bincount(minlength=10).tolist() == [517, 314, 176, 106, 69, 36, 23, 14, 8, 5]
    assert torch.equal(lt.test.images, plain.test.images) and torch.equal(lt.test.targets, plain.test.targets)
