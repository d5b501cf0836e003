"""Loading ponder's optional C++ kernels (``csrc/*.cpp``), compiled on first use.

Torch's ``cpp_extension`` builds each module once per machine into its extension cache
(``TORCH_EXTENSIONS_DIR``); that needs a C++ compiler and ``ninja`` (``pip install ponder[kernels]``).
Without them, or with ``PONDER_NO_KERNELS=1``, :func:`load_kernels` returns ``None`` and every
caller runs its PyTorch ops instead (same results up to float rounding; tested).
"""

from __future__ import annotations

import functools
import hashlib
import os
import sys
from pathlib import Path
from typing import Any, Callable

import torch
from torch import Tensor
from torch.utils._python_dispatch import _get_current_dispatch_mode

_CSRC = Path(__file__).with_name("csrc")


def load_kernels(name: str, source: str, cflags: tuple[str, ...], what: str) -> Any:
    """The module built from ``csrc/<source>`` as ``name`` (once per machine), or ``None`` if unavailable.

    Call it through :func:`kernel_loader`, which keeps the result.

    ``what`` names the kernels in the one-line messages on stderr (compiling, or unavailable).
    """
    if os.environ.get("PONDER_NO_KERNELS"):
        return None
    try:
        from torch.utils.cpp_extension import load

        if not _built(name):
            print(f"ponder: compiling {what} (once per machine, about 20 s)...", file=sys.stderr)
        return load(name=name, sources=[str(_CSRC / source)], extra_cflags=list(cflags), verbose=False)
    except Exception as err:  # no compiler, no ninja, a read-only cache...: the PyTorch path serves
        print(f"ponder: {what} unavailable ({type(err).__name__}: {err}); using PyTorch ops", file=sys.stderr)
        return None


def kernel_loader(name: str | Callable[[], str], source: str, cflags: tuple[str, ...], what: str) -> Callable[[], Any]:
    """A function returning :func:`load_kernels`' module (or ``None``), loaded on its first call and then
    read from a list: the kernels' callers check it on every call. ``name`` may be computed lazily."""
    loaded: list[Any] = []

    def load() -> Any:
        if not loaded:
            loaded.append(load_kernels(name() if callable(name) else name, source, cflags, what))
        return loaded[0]

    return load


def _built(name: str) -> bool:
    """Whether a build of ``name`` is already in torch's extension cache (then loading takes no compile)."""
    try:
        from torch.utils.cpp_extension import _get_build_directory

        return (Path(_get_build_directory(name, verbose=False)) / f"{name}.so").exists()
    except Exception:  # a private helper of torch: if it moves, just say we compile
        return False


@functools.lru_cache(maxsize=1)
def cpu_tag() -> str:
    """A short hash of this CPU's model and instruction-set flags.

    Part of the name of modules built with ``-march=native``, so a shared extension cache never
    hands one machine's build to a CPU that lacks its instructions.
    """
    try:
        info = Path("/proc/cpuinfo").read_text()
        lines = [ln for ln in info.splitlines() if ln.startswith(("model name", "flags"))][:2]
        text = "\n".join(lines)
    except OSError:  # not Linux: the platform's own description
        import platform

        text = platform.processor() or platform.machine()
    return hashlib.sha1(text.encode()).hexdigest()[:8]


def cpu_inference(t: Tensor) -> bool:
    """No autograd, no dispatch mode (a ``FlopCounterMode`` cannot see inside a kernel), ``t`` on the CPU."""
    return not torch.is_grad_enabled() and t.device.type == "cpu" and _get_current_dispatch_mode() is None
