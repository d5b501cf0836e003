"""Splits, long-tail, transforms, ImageFolder and the digits demo set."""

from __future__ import annotations


import numpy as np
import pytest
import torch

from ponder.data import DataError, ImageFolder, long_tail_indices, train_val_split
from ponder.data.digits import digits_split, load_digits
from ponder.data.transforms import (
    CenterCrop, Normalize, RandomCrop, RandomHorizontalFlip, RandomResizedCrop, Resize, cifar_transforms, imagenet_transforms,
)


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# ---- splits ----------------------------------------------------------------------------------------

def test_train_val_split_is_seeded_disjoint_and_complete():
    tr, va = train_val_split(1000, 100, seed=3)
    assert len(va) == 100 and len(tr) == 900
    assert not set(tr.tolist()) & set(va.tolist())
    assert sorted(tr.tolist() + va.tolist()) == list(range(1000))
    tr2, va2 = train_val_split(1000, 100, seed=3)
    assert torch.equal(va, va2) and torch.equal(tr, tr2)
    assert not torch.equal(va, train_val_split(1000, 100, seed=4)[1])


@pytest.mark.parametrize("bad", [-1, 1000, 5000])
def test_train_val_split_rejects_bad_size(bad):
    with pytest.raises(DataError, match="data.val_size"):
        train_val_split(1000, bad, seed=0)


def test_long_tail_counts_follow_the_ratio_and_keep_file_order():
    labels = torch.arange(10).repeat_interleave(100)[torch.randperm(1000, generator=gen(0))]
    keep = long_tail_indices(labels, ratio=10, num_classes=10)
    counts = labels[keep].bincount(minlength=10).tolist()
    # mu = 10**(-1/9): 100, 77.4, 59.9, 46.4, 35.9, 27.8, 21.5, 16.7, 12.9, 10 (floored)
    assert counts == [100, 77, 59, 46, 35, 27, 21, 16, 12, 10]
    first_of_class_3 = (labels == 3).nonzero().flatten()[: counts[3]]
    assert set(first_of_class_3.tolist()) <= set(keep.tolist())
    assert torch.equal(long_tail_indices(labels, 1), torch.arange(1000))
    with pytest.raises(DataError, match="long_tail_ratio"):
        long_tail_indices(labels, 0.5)


@pytest.mark.parametrize("ratio,num_classes,n,last", [(100, 10, 5000, 50), (50, 10, 5000, 100), (10, 10, 5000, 500),
                                                      (200, 10, 5000, 25), (50, 100, 500, 10), (10, 100, 500, 50)])
def test_long_tail_last_class_is_exactly_one_over_ratio(ratio, num_classes, n, last):
    # mu**(K-1) in floating point is just below 1/ratio for these ratios: floor would lose an image
    labels = torch.arange(num_classes).repeat_interleave(n)
    counts = labels[long_tail_indices(labels, ratio, num_classes)].bincount(minlength=num_classes)
    assert counts[0] == n and counts[-1] == last


# ---- transforms ------------------------------------------------------------------------------------

def test_cifar_train_transform_shapes_and_seed():
    x = torch.randint(0, 256, (16, 3, 32, 32), dtype=torch.uint8)
    t = cifar_transforms("cifar10", train=True)
    a, b = t(x, gen(1)), t(x, gen(1))
    assert a.shape == (16, 3, 32, 32) and a.dtype == torch.float32
    assert torch.equal(a, b)
    assert not torch.equal(a, t(x, gen(2)))
    single = t(x[0], gen(1))
    assert single.shape == (3, 32, 32)


def test_random_crop_is_a_window_of_the_padded_image():
    x = torch.arange(2 * 3 * 8 * 8, dtype=torch.uint8).view(2, 3, 8, 8)
    y = RandomCrop(8, padding=2)(x, gen(0))
    padded = torch.nn.functional.pad(x, (2, 2, 2, 2))
    for i in range(2):
        windows = [padded[i, :, r : r + 8, c : c + 8] for r in range(5) for c in range(5)]
        assert any(torch.equal(y[i], w) for w in windows)
    offsets = {tuple(RandomCrop(8, padding=2)(x[:1], gen(s)).flatten()[:3].tolist()) for s in range(30)}
    assert len(offsets) > 5


def test_flip_and_normalize():
    x = torch.randint(0, 256, (4, 3, 5, 5), dtype=torch.uint8)
    assert torch.equal(RandomHorizontalFlip(1.0)(x), x.flip(-1))
    assert torch.equal(RandomHorizontalFlip(0.0)(x), x)
    mean, std = (0.5, 0.25, 0.0), (0.5, 0.25, 1.0)
    y = Normalize(mean, std)(x)
    ref = (x.float() / 255 - torch.tensor(mean).view(3, 1, 1)) / torch.tensor(std).view(3, 1, 1)
    torch.testing.assert_close(y, ref)
    with pytest.raises(DataError, match="uint8"):
        Normalize(mean, std)(x.float())


def test_cifar_eval_is_normalize_only():
    x = torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8)
    mean = torch.tensor((0.5071, 0.4865, 0.4409)).view(3, 1, 1)
    std = torch.tensor((0.2673, 0.2564, 0.2762)).view(3, 1, 1)
    torch.testing.assert_close(cifar_transforms("cifar100", train=False)(x), (x.float() / 255 - mean) / std)


def test_imagenet_transforms():
    img = torch.randint(0, 256, (3, 300, 400), dtype=torch.uint8)
    train = imagenet_transforms(train=True)
    a = train(img, gen(5))
    assert a.shape == (3, 224, 224) and torch.equal(a, train(img, gen(5)))
    assert imagenet_transforms(train=False)(img).shape == (3, 224, 224)
    assert Resize(256)(img).shape == (3, 256, 341)
    assert Resize(256)(img.transpose(1, 2)).shape == (3, 341, 256)
    flat = torch.full((3, 256, 256), 77, dtype=torch.uint8)
    assert torch.equal(Resize(128)(flat), torch.full((3, 128, 128), 77, dtype=torch.uint8))
    grid = torch.arange(10).view(1, 1, 10).expand(3, 10, 10).to(torch.uint8)
    assert CenterCrop(4)(grid)[0, 0].tolist() == [3, 4, 5, 6]


def test_random_resized_crop_window_respects_scale_and_ratio():
    rrc = RandomResizedCrop(32, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3))
    g = gen(0)
    for _ in range(50):
        top, left, h, w = rrc.window(100, 150, g)
        assert 0 <= top and top + h <= 100 and 0 <= left and left + w <= 150
        assert 0.06 <= h * w / 15000 <= 1.0
        assert 0.7 <= w / h <= 1.4


# ---- ImageFolder -----------------------------------------------------------------------------------

def _png(path, value, size=(5, 4), mode="RGB"):
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    arr = np.full((size[1], size[0], 3), value, np.uint8) if mode == "RGB" else np.full((size[1], size[0]), value, np.uint8)
    Image.fromarray(arr, mode=mode).save(path)


def test_imagefolder_indices_match_torchvision_rules(tmp_path):
    _png(tmp_path / "zebra" / "b.png", 10)
    _png(tmp_path / "zebra" / "a.PNG", 20)
    _png(tmp_path / "apple" / "sub" / "x.png", 30)
    _png(tmp_path / "apple" / "c.bmp", 40)
    _png(tmp_path / "Mango" / "g.png", 50, mode="L")
    (tmp_path / "apple" / "notes.txt").write_text("not an image")
    ds = ImageFolder(tmp_path)
    assert ds.classes == ["Mango", "apple", "zebra"]
    names = [(p[len(str(tmp_path)) + 1 :], c) for p, c in ds.samples]
    assert names == [("Mango/g.png", 0), ("apple/c.bmp", 1), ("apple/sub/x.png", 1), ("zebra/a.PNG", 2), ("zebra/b.png", 2)]
    img, label = ds[0]
    assert img.shape == (3, 4, 5) and img.dtype == torch.uint8 and label == 0
    assert int(img.min()) == int(img.max()) == 50  # grayscale -> RGB
    sub = ds.subset([3, 4])
    assert [s[1] for s in sub.samples] == [2, 2] and sub.classes == ds.classes


def test_imagefolder_errors(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        ImageFolder(tmp_path / "missing")
    _png(tmp_path / "a" / "x.png", 1)
    (tmp_path / "b").mkdir()
    with pytest.raises(DataError, match="class\\(es\\) b"):
        ImageFolder(tmp_path)


# ---- digits ----------------------------------------------------------------------------------------

def test_digits_load_and_split():
    images, labels = load_digits()
    assert images.shape == (1797, 1, 16, 16) and images.dtype == torch.uint8
    assert int(images.max()) == 255 and int(images.min()) == 0
    assert sorted(labels.unique().tolist()) == list(range(10))
    assert torch.equal(images[:, :, 0::2, 0::2], images[:, :, 1::2, 1::2])  # nearest 2x: exact 2x2 blocks
    tr, te = digits_split(len(labels))
    assert len(tr) == 1397 and len(te) == 400 and not set(tr.tolist()) & set(te.tolist())
    assert torch.equal(te, digits_split(len(labels))[1])
