"""Fetch an archive over HTTP(S), check its md5 and unpack it without path traversal."""

from __future__ import annotations

import hashlib
import os
import shutil
import tarfile
import urllib.error
import urllib.request
from pathlib import Path

from ponder.data.errors import DataError


def md5sum(path: str | Path, chunk: int = 1 << 20) -> str:
    """Hex md5 of a file, read in chunks."""
    h = hashlib.md5()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk), b""):
            h.update(block)
    return h.hexdigest()


def fetch(url: str, dest: Path, md5: str, timeout: float = 60.0) -> Path:
    """Download ``url`` to ``dest`` (via ``dest.part``, renamed once complete) and verify ``md5``.

    A complete ``dest`` with the right checksum is reused. Raises :class:`DataError` when the
    network is unreachable or the checksum differs (the bad file is removed).
    """
    dest.parent.mkdir(parents=True, exist_ok=True)
    if dest.is_file() and md5sum(dest) == md5:
        return dest
    part = dest.with_name(dest.name + ".part")
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp, open(part, "wb") as out:
            shutil.copyfileobj(resp, out)
    except (urllib.error.URLError, OSError) as e:
        part.unlink(missing_ok=True)
        reason = getattr(e, "reason", e)
        raise DataError(
            f"could not download {url} ({reason}); with no network, fetch it elsewhere, unpack it "
            f"and pass --data-dir pointing at the folder"
        ) from None
    got = md5sum(part)
    if got != md5:
        part.unlink()
        raise DataError(f"{url} downloaded with md5 {got}, expected {md5}; the file is corrupt or not the official one, try again")
    os.replace(part, dest)
    return dest


def safe_extract(archive: Path, dest: Path) -> None:
    """Unpack a tar(.gz) into ``dest``, refusing links, devices and members outside ``dest``."""
    dest = dest.resolve()
    try:
        with tarfile.open(archive, "r:*") as tar:
            members = tar.getmembers()
            for m in members:
                target = (dest / m.name).resolve()
                if not (m.isfile() or m.isdir()) or not target.is_relative_to(dest):
                    raise DataError(f"{archive} refuses to unpack: member {m.name!r} is a link, a device or points outside {dest}")
            kwargs = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}
            tar.extractall(dest, members=members, **kwargs)
    except (tarfile.TarError, EOFError, OSError) as e:
        raise DataError(f"{archive} is not a readable tar archive ({type(e).__name__}: {e}); delete it and download again") from None
