"""CIFAR reading: real subset, generated CIFAR-10/100, restricted unpickling, bad files, download."""

from __future__ import annotations

import functools
import hashlib
import http.server
import io
import os
import pickle
import tarfile
import threading
from pathlib import Path

import numpy as np
import pytest
import torch

from cifar_fixtures import write_fake_cifar
from shared_dir import SHARED
from ponder.data import DataError, download_cifar, load_cifar_split, safe_load

REAL = (SHARED / "data/cifar-10-batches-py") if SHARED else Path("/nonexistent")
needs_real = pytest.mark.skipif(not REAL.is_dir(), reason="CIFAR-10 subset not present")


@needs_real
@pytest.mark.parametrize("root", [REAL, REAL.parent])
def test_real_subset_shapes_and_labels(root):
    x, y, classes = load_cifar_split(root, "cifar10", train=True)
    assert x.shape == (5085, 3, 32, 32) and x.dtype == torch.uint8
    assert y.shape == (5085,) and y.dtype == torch.int64
    assert int(y.min()) == 0 and int(y.max()) == 9
    assert classes[0] == "airplane" and classes[9] == "truck" and len(classes) == 10
    xt, yt, _ = load_cifar_split(root, "cifar10", train=False)
    assert xt.shape == (1017, 3, 32, 32) and yt.shape == (1017,)
    assert set(yt.tolist()) == set(range(10))


@needs_real
def test_real_first_image_matches_raw_bytes():
    x, _, _ = load_cifar_split(REAL, "cifar10", train=True)
    raw = safe_load(REAL / "data_batch_1")[b"data"][0]
    assert torch.equal(x[0].flatten(), torch.from_numpy(raw))  # channel-major: R plane, G plane, B plane


@pytest.mark.parametrize("name,k", [("cifar10", 10), ("cifar100", 100)])
def test_generated_cifar_round_trip(tmp_path, name, k):
    folder = write_fake_cifar(tmp_path, name, n_train=3 * k, n_test=k, seed=1)
    for root in (tmp_path, folder):
        x, y, classes = load_cifar_split(root, name, train=True)
        assert x.shape == (3 * k, 3, 32, 32) and y.shape == (3 * k,)
        assert torch.equal(y.bincount(minlength=k), torch.full((k,), 3))
        assert classes == [f"class{c}" for c in range(k)]
    xt, yt, _ = load_cifar_split(tmp_path, name, train=False)
    assert xt.shape == (k, 3, 32, 32) and yt.max() < k
    assert not torch.equal(x[:k], xt)


class _Evil:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_malicious_pickle_is_refused_and_never_runs(tmp_path):
    folder = write_fake_cifar(tmp_path, "cifar10", 50, 10)
    marker = tmp_path / "pwned"
    bad = {b"data": np.zeros((10, 3072), np.uint8), b"labels": [0] * 10, b"x": _Evil(marker)}
    (folder / "data_batch_2").write_bytes(pickle.dumps(bad, protocol=2))
    with pytest.raises(DataError, match=r"data_batch_2 refuses to load: it asks to import \w+\.system") as e:
        load_cifar_split(tmp_path, "cifar10", train=True)
    assert "\n" not in str(e.value)
    assert not marker.exists()


@pytest.mark.parametrize("payload", [
    b"cbuiltins\neval\n(S'1+1'\ntR.",                       # protocol 0 GLOBAL
    pickle.dumps(functools.partial(print, "hi"), protocol=4),  # STACK_GLOBAL
])
def test_other_globals_are_refused(tmp_path, payload):
    path = tmp_path / "f"
    path.write_bytes(payload)
    with pytest.raises(DataError, match="refuses to load"):
        safe_load(path)


def test_truncated_file_names_the_file(tmp_path):
    folder = write_fake_cifar(tmp_path, "cifar10", 50, 10)
    path = folder / "data_batch_3"
    path.write_bytes(path.read_bytes()[: 5000])
    with pytest.raises(DataError, match="data_batch_3 is truncated") as e:
        load_cifar_split(tmp_path, "cifar10", train=True)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("obj,match", [
    ([1, 2, 3], "not a CIFAR batch"),
    ({b"data": np.zeros((4, 100), np.uint8), b"labels": [0] * 4}, r"uint8 array of shape \[N, 3072\]"),
    ({b"data": np.zeros((4, 3072), np.uint8), b"labels": [0] * 3}, "4 images but labels"),
    ({b"data": np.zeros((4, 3072), np.uint8), b"labels": [0, 1, 2, 99]}, r"labels outside 0\.\.9"),
])
def test_malformed_batch_is_named(tmp_path, obj, match):
    folder = write_fake_cifar(tmp_path, "cifar10", 50, 10)
    (folder / "test_batch").write_bytes(pickle.dumps(obj, protocol=2))
    with pytest.raises(DataError, match=match):
        load_cifar_split(tmp_path, "cifar10", train=False)


def test_missing_folder_and_file_messages(tmp_path):
    assert issubclass(DataError, ValueError)  # the CLI turns ValueErrors into one-line messages
    with pytest.raises(DataError, match=r"CIFAR-100 not found at .*--data-dir.*download_cifar"):
        load_cifar_split(tmp_path / "nowhere", "cifar100", train=True)
    folder = write_fake_cifar(tmp_path, "cifar10", 50, 10)
    (folder / "data_batch_4").unlink()
    with pytest.raises(DataError, match="data_batch_4 does not exist"):
        load_cifar_split(tmp_path, "cifar10", train=True)


# ---- download against a local server -------------------------------------------------------------

def _serve(directory: Path):
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(directory))
    handler.log_message = lambda *a, **k: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


def _tar(path: Path, source: Path | None = None, extra: list[tarfile.TarInfo] | None = None) -> str:
    with tarfile.open(path, "w:gz") as tar:
        if source is not None:
            tar.add(source, arcname=source.name)
        for info in extra or []:
            tar.addfile(info, io.BytesIO(b"x" * info.size) if info.isfile() else None)
    return hashlib.md5(path.read_bytes()).hexdigest()


@pytest.fixture
def server_dir(tmp_path):
    d = tmp_path / "www"
    d.mkdir()
    server = _serve(d)
    yield d, f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_download_verifies_and_extracts(tmp_path, server_dir):
    www, url = server_dir
    md5 = _tar(www / "cifar-10-python.tar.gz", write_fake_cifar(tmp_path / "src", "cifar10", 50, 10))
    dest = tmp_path / "data"
    folder = download_cifar(dest, "cifar10", base_url=url, md5=md5)
    assert folder == dest / "cifar-10-batches-py"
    x, y, _ = load_cifar_split(dest, "cifar10", train=True)
    assert x.shape == (50, 3, 32, 32)
    (www / "cifar-10-python.tar.gz").unlink()  # already there: no second download
    assert download_cifar(dest, "cifar10", base_url=url, md5=md5) == folder


def test_download_checksum_mismatch(tmp_path, server_dir):
    www, url = server_dir
    _tar(www / "cifar-100-python.tar.gz", write_fake_cifar(tmp_path / "src", "cifar100", 100, 100))
    dest = tmp_path / "data"
    with pytest.raises(DataError, match="expected eb9058c3a382ffc7106e4002c42a8d85"):
        download_cifar(dest, "cifar100", base_url=url)  # the official md5 cannot match the fake archive
    assert list(dest.iterdir()) == []


def test_download_offline_is_clear(tmp_path, server_dir):
    _, url = server_dir
    with pytest.raises(DataError, match=r"could not download .*--data-dir"):
        download_cifar(tmp_path, "cifar10", base_url=url + "/missing")


@pytest.mark.parametrize("member", ["../evil.txt", "/tmp/ponder_abs_evil.txt", "link"])
def test_download_refuses_path_traversal(tmp_path, server_dir, member):
    www, url = server_dir
    info = tarfile.TarInfo(member)
    if member == "link":
        info.type, info.linkname = tarfile.SYMTYPE, "../../etc/passwd"
    else:
        info.size = 1
    md5 = _tar(www / "cifar-10-python.tar.gz", extra=[info])
    dest = tmp_path / "data"
    with pytest.raises(DataError, match="refuses to unpack"):
        download_cifar(dest, "cifar10", base_url=url, md5=md5)
    assert not (tmp_path / "evil.txt").exists() and not (dest / "link").exists()
