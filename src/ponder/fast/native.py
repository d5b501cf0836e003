"""ponder's compiled C++ kernels (``csrc/*.cpp``): built ahead of time, loaded without compiling.

``ponder kernels build`` (run by the set-up script) compiles each module once per machine into
``<cache>/kernels/<name>-<digest>/`` (:func:`ponder.fast.routes.cache_root`), where the digest covers
the source, the compiler flags, the torch and Python versions and, for ``-march=native`` builds, the
CPU (:func:`cpu_tag`): a changed source or another machine never loads a stale build. A forward pass
only *loads* a module that is already built; it never compiles. Without a build (or a C++ compiler
and ``ninja``: ``pip install ponder[kernels]``), :func:`load` returns ``None``, one line on stderr
says how to build them, and every caller runs its PyTorch ops (same results up to float rounding;
tested).
"""

from __future__ import annotations

import hashlib
import importlib.util
import platform
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ponder.machine import cache_root, cpu_tag

_CSRC = Path(__file__).with_name("csrc")


@dataclass(frozen=True)
class KernelModule:
    """One compiled module: its source in ``csrc/``, compiler flags and what it holds (for messages)."""

    name: str
    source: str
    cflags: tuple[str, ...]
    what: str

    @property
    def native(self) -> bool:
        """Built for this CPU's instruction set (``-march=native``)."""
        return "-march=native" in self.cflags

    def digest(self) -> str:
        """Hash of everything the build depends on: source, flags, torch, Python, and the CPU for native builds."""
        h = hashlib.sha1((_CSRC / self.source).read_bytes())
        h.update(" ".join(self.cflags).encode())
        h.update(f"{torch.__version__}|{sys.version_info[:2]}|{platform.machine()}".encode())
        if self.native:
            h.update(cpu_tag().encode())
        return h.hexdigest()[:12]

    @property
    def module_name(self) -> str:
        return f"ponder_{self.name}"

    def build_dir(self) -> Path:
        return cache_root() / "kernels" / f"{self.name}-{self.digest()}"

    def library(self) -> Path:
        return self.build_dir() / f"{self.module_name}.so"

    def built(self) -> bool:
        return self.library().is_file()


MODULES: dict[str, KernelModule] = {m.name: m for m in (
    KernelModule("spatial", "fused_spatial.cpp", ("-O3", "-ffp-contract=off", "-fopenmp"),
                 "the fused spatial kernels (SACT)"),
    KernelModule("small_conv", "small_conv.cpp", ("-O3", "-march=native", "-ffp-contract=fast", "-fopenmp"),
                 "the small-convolution kernels (3x3 convolutions, block GEMMs, exit heads)"),
    KernelModule("exit_step", "exit_step.cpp", ("-O3",), "the early-exit step kernel"),
    KernelModule("plan", "plan.cpp", ("-O3",), "the plan fingerprint"),
)}

_LOADED: dict[str, Any] = {}
_HINTED: list[bool] = [False]


def load(name: str) -> Any:
    """The built module ``name`` (a key of :data:`MODULES`), or ``None`` when it is not built.

    Never compiles. The first miss prints one line on stderr naming ``ponder kernels build``.
    """
    if name in _LOADED:
        return _LOADED[name]
    mod = MODULES[name]
    module = None
    if mod.built():
        try:
            spec = importlib.util.spec_from_file_location(mod.module_name, mod.library())
            module = importlib.util.module_from_spec(spec)  # type: ignore[arg-type]
            spec.loader.exec_module(module)  # type: ignore[union-attr]
        except (ImportError, OSError) as err:  # a build for another torch that kept its digest
            print(f"ponder: cannot load {mod.what} ({type(err).__name__}: {err}); using PyTorch ops; "
                  f"rebuild with `ponder kernels build --force`", file=sys.stderr)
            module = None
    elif not _HINTED[0]:
        _HINTED[0] = True
        print("ponder: compiled kernels are not built on this machine; fast paths use PyTorch ops "
              "(run `ponder kernels build` once, about 2-4 minutes)", file=sys.stderr)
    _LOADED[name] = module
    return module


def build(name: str, force: bool = False) -> Path:
    """Compile module ``name`` into its build directory (a no-op when built, unless ``force``);
    returns the library path. Raises with the compiler's message when the build fails.

    A compiler without OpenMP (``-fopenmp``; Apple's clang, for one) builds the module without it, saying so
    on stderr: its kernels then run on one thread whatever ``torch.set_num_threads`` says."""
    mod = MODULES[name]
    if mod.built() and not force:
        return mod.library()
    from torch.utils.cpp_extension import load as compile_and_load

    directory = mod.build_dir()
    directory.mkdir(parents=True, exist_ok=True)

    def compile_with(cflags: list[str]) -> None:
        compile_and_load(name=mod.module_name, sources=[str(_CSRC / mod.source)], extra_cflags=cflags,
                         extra_ldflags=["-fopenmp"] if "-fopenmp" in cflags else [],
                         build_directory=str(directory), verbose=False)

    try:
        compile_with(list(mod.cflags))
    except Exception as e:  # (torch raises a RuntimeError holding the compiler's output)
        about_openmp = any(k in str(e).lower() for k in ("openmp", "omp.h", "gomp", "libomp"))
        if "-fopenmp" not in mod.cflags or not about_openmp:
            raise
        print(f"ponder: {name} does not build with OpenMP here; building it for one thread", file=sys.stderr)
        compile_with([f for f in mod.cflags if f != "-fopenmp"])
    _LOADED.pop(name, None)
    _TAG[0] = None
    return mod.library()


def builds_tag() -> str:
    """A short hash of which kernel builds this process would load (each built module's digest): the
    stored routes are kept per tag, so a changed or newly built kernel is timed again rather than
    judged by routes timed without it."""
    if _TAG[0] is None:
        digests = [f"{m.name}:{m.digest() if m.built() else '-'}" for m in MODULES.values()]
        _TAG[0] = hashlib.sha1("|".join(digests).encode()).hexdigest()[:8]
    return _TAG[0]


_TAG: list[str | None] = [None]


def forget_loaded() -> None:
    """Drop the loaded-module memo (tests; after a build in this process)."""
    _LOADED.clear()
    _HINTED[0] = False
    _TAG[0] = None
