"""Where ponder keeps per-machine files (compiled kernels, timed routes) and how it names the machine."""

from __future__ import annotations

import functools
import hashlib
import os
import platform
from pathlib import Path


def cache_root() -> Path:
    """``$PONDER_CACHE_DIR``, else ``$XDG_CACHE_HOME/ponder``, else ``~/.cache/ponder``."""
    if os.environ.get("PONDER_CACHE_DIR"):
        return Path(os.environ["PONDER_CACHE_DIR"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "ponder"


@functools.lru_cache(maxsize=1)
def cpu_tag() -> str:
    """A short hash of this CPU's model and instruction-set flags.

    Part of the digest of ``-march=native`` builds and of the routes file's name, so a shared cache
    never hands one machine's build or timings to a CPU that differs.
    """
    try:
        info = Path("/proc/cpuinfo").read_text()
        lines = [ln for ln in info.splitlines() if ln.startswith(("model name", "flags"))][:2]
        text = "\n".join(lines)
    except OSError:  # not Linux: the platform's own description
        text = platform.processor() or platform.machine()
    return hashlib.sha1(text.encode()).hexdigest()[:8]


def cpu_name() -> str:
    """The CPU's model name (``/proc/cpuinfo``), or the platform's description."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()
