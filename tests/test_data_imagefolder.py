"""Image folders: one sentence per bad file (with loader workers too), skipping bad files, image size from the model."""

import struct
import zlib

import numpy as np
import pytest
import torch
import yaml

from ponder.config import DataConfig, config_from_dict
from ponder.data import DataError, build_datasets, build_loaders
from ponder.engine import train
from ponder.engine.checkpoint import read_metrics

Image = pytest.importorskip("PIL.Image")


def make_folder(root, size=32, per_class=4):
    for split in ("train", "val"):
        for c, name in enumerate(["cat", "dog"]):
            d = root / split / name
            d.mkdir(parents=True)
            for i in range(per_class):
                Image.fromarray(np.full((size, size + 8, 3), 60 * c + 10 * i, np.uint8)).save(d / f"{i}.png")
    return root


def write_bomb(path, side=20000):
    """A valid small PNG whose header claims ``side x side`` pixels."""
    Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(path)
    data = bytearray(path.read_bytes())
    data[16:24] = struct.pack(">II", side, side)  # IHDR width, height
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))
    path.write_bytes(bytes(data))


def iterate(cfg):
    bundle = build_datasets(cfg, 0)
    loader = build_loaders(bundle, cfg, 0)[0]
    return loader, [y for _, y in loader]


@pytest.mark.parametrize("workers", [0, 2])
@pytest.mark.parametrize("bad", ["corrupt", "bomb"])
def test_a_bad_image_is_one_sentence_naming_it(tmp_path, workers, bad):
    root = make_folder(tmp_path)
    path = root / "train" / "dog" / "9.png"
    if bad == "corrupt":
        path.write_bytes(b"\x89PNG\r\n\x1a\n this is not an image")
    else:
        write_bomb(path)
    cfg = DataConfig(dataset="imagefolder", data_dir=str(root), batch_size=3, workers=workers)
    with pytest.raises(DataError) as info:
        iterate(cfg)
    message = str(info.value)
    assert str(path) in message and "\n" not in message and "Traceback" not in message and "worker" not in message
    assert ("decompression bomb" if bad == "bomb" else "is not a readable image") in message
    assert "data.skip_bad_images=true" in message


def test_bad_images_can_be_skipped_and_are_counted(tmp_path):
    root = make_folder(tmp_path)
    (root / "train" / "cat" / "bad.png").write_bytes(b"garbage")
    write_bomb(root / "train" / "dog" / "bomb.png")
    cfg = DataConfig(dataset="imagefolder", data_dir=str(root), batch_size=4, workers=2, skip_bad_images=True)
    loader, targets = iterate(cfg)
    assert sum(len(y) for y in targets) == 8  # the 10 files less the 2 bad ones
    assert sorted(loader.skipped) == sorted([str(root / "train" / "cat" / "bad.png"),
                                             str(root / "train" / "dog" / "bomb.png")])


def test_image_size_follows_the_recipe(tmp_path):
    root = make_folder(tmp_path, size=40)
    bundle = build_datasets(DataConfig(dataset="imagefolder", data_dir=str(root), image_size=24), 0)
    assert bundle.input_size == (3, 24, 24)
    assert bundle.train[(0, 1)][0].shape == bundle.test[0][0].shape == (3, 24, 24)
    assert build_datasets(DataConfig(dataset="imagefolder", data_dir=str(root)), 0).input_size == (3, 224, 224)


def test_cifar_network_on_32px_folders_skipping_a_bad_file(tmp_path, capsys):
    root = make_folder(tmp_path / "data")
    (root / "train" / "cat" / "broken.jpg").write_bytes(b"not a jpeg")
    cfg = config_from_dict({
        "model": {"name": "resnet20_cifar"},
        "data": {"dataset": "imagefolder", "data_dir": str(root), "batch_size": 4, "eval_batch_size": 8,
                 "skip_bad_images": True},
        "optim": {"lr": 0.01}, "train": {"epochs": 1, "device": "cpu"},
    })
    run = train(cfg, tmp_path / "run", verbose=True)
    saved = yaml.safe_load((run / "config.yaml").read_text())
    assert saved["data"]["image_size"] == 32  # the CIFAR network's own input size, not 224
    assert read_metrics(run)[0]["skipped_images"] == 1
    assert "skipped 1 unreadable image " in capsys.readouterr().out
    from ponder.engine import load_run

    model, _ = load_run(run)
    x = build_datasets(DataConfig(**saved["data"]), 0).test[0][0]
    assert x.shape == (3, 32, 32) and torch.isfinite(model(x[None]).logits).all()
