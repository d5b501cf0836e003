"""Timed routes: decided once per machine, kept on disk, the same in every process.

A *route* is a choice between equivalent computations (PyTorch's convolution or a compiled kernel,
a unit in channels-last or NCHW, the density above which a sparse unit runs densely...). Routes
agree only up to float rounding, so a route chosen by timing in each process would let two runs of
the same checkpoint differ near a decision threshold. Here every route is decided the first time
it is needed on this machine (:func:`decide`: timed, outside any ``FlopCounterMode``) and written to
one JSON file per machine and kernel build (:func:`routes_file`); every later call, in this process or
another, reads it. ``ponder kernels`` lists the stored routes; ``ponder kernels --clear-routes`` forgets them.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from contextlib import contextmanager
from typing import Any, Callable, Iterator, Sequence

import torch
from torch.utils._python_dispatch import _get_current_dispatch_mode

from ponder.files import atomic_write_text
from ponder.machine import cache_root, cpu_tag
from ponder.fast.native import builds_tag
from ponder.fast.timing import fastest

_MEMORY: dict[str, Any] = {}  # key_text -> value: the file's contents as this process last read them
_HOT: dict[tuple, Any] = {}  # (op, *key) -> value: the lookup every call makes (no text formatting)
_LOADED: list[Path | None] = [None]
_OVERRIDE: dict[str, Any] = {}  # op -> value forced for every key (:func:`override`: tests, experiments)


def routes_file() -> Path:
    """``$PONDER_ROUTES_FILE``, else ``<cache>/routes/<cpu>-torch<version>-k<kernel builds>.json`` (one file per
    CPU type, torch version and set of kernel builds: :func:`ponder.fast.native.builds_tag`)."""
    if os.environ.get("PONDER_ROUTES_FILE"):
        return Path(os.environ["PONDER_ROUTES_FILE"]).expanduser()
    return cache_root() / "routes" / f"{cpu_tag()}-torch{torch.__version__}-k{builds_tag()}.json"


def key_text(op: str, key: Sequence[Any]) -> str:
    """The stored name of route ``key`` of ``op``: JSON of its parts (sizes as lists, dtypes and devices as text)."""
    return f"{op}|{json.dumps([_plain(k) for k in key], separators=(',', ':'))}"


def _plain(v: Any) -> Any:
    if isinstance(v, (torch.Size, tuple, list)):
        return [_plain(x) for x in v]
    if isinstance(v, (torch.dtype, torch.device)):
        return str(v)
    if v is None or isinstance(v, (bool, int, float, str)):
        return v
    raise TypeError(f"route keys hold sizes, numbers, strings, dtypes and devices, got {type(v).__name__}")


def decide(op: str, key: tuple, measure: Callable[[], Any]) -> Any:
    """The stored value of route ``key`` (a hashable tuple) of ``op``, or ``measure()`` (a JSON value),
    stored for good.

    Concurrent processes agree: the first to decide writes under a file lock, the others read its value.
    A hit costs one dictionary lookup.
    """
    if _OVERRIDE and op in _OVERRIDE:
        return _OVERRIDE[op]
    hot = (op, *key)
    value = _HOT.get(hot, _MISSING)
    if value is _MISSING:
        value = _HOT[hot] = _lookup(op, key, measure)
    return value


_MISSING = object()


def _lookup(op: str, key: tuple, measure: Callable[[], Any]) -> Any:
    name = key_text(op, key)
    path = routes_file()
    if _LOADED[0] != path:
        _MEMORY.clear()
        _MEMORY.update(_read(path))
        _LOADED[0] = path
    if name in _MEMORY:
        return _MEMORY[name]
    with _locked(path):
        stored = _read(path)
        if name not in stored:
            from torch.utils._python_dispatch import _disable_current_modes

            with _disable_current_modes(), torch.no_grad():  # never seen by a FlopCounterMode
                value = measure()  # (may decide nested routes, which write the file themselves)
            stored = _read(path)
            stored[name] = value
            _write(path, stored)
        _MEMORY.update(stored)
    return _MEMORY[name]


def choose(op: str, key: tuple, routes: Callable[[], Sequence[tuple[str, Callable[[], object]]]]) -> str:
    """The name of the fastest of ``routes()`` (``(name, call)`` pairs computing the same thing) for
    ``key``, timed once on this machine (:func:`ponder.fast.timing.fastest`; ties go to the first) and
    stored. ``routes`` is called on the first use of ``key`` in a process: a stored route that is not
    among them (a compiled kernel since removed) gives way to the first, for this process only."""
    offered: list[list[tuple[str, Callable[[], object]]]] = []

    def measure() -> str:
        options = routes()
        offered.append(options)
        return options[0][0] if len(options) == 1 else options[fastest([call for _, call in options])][0]

    hot = (op, *key)
    if hot in _HOT or (_OVERRIDE and op in _OVERRIDE):
        return decide(op, key, measure)
    if _get_current_dispatch_mode() is not None:  # no route is timed (or stored)
        return routes()[0][0]  # under a user's FlopCounterMode: the first, and the user sees no timing runs
    value = decide(op, key, measure)
    names = [name for name, _ in (offered[0] if offered else routes())]
    if value not in names:  # stored when a route this process lacks was there (kernels since cleared)
        value = _HOT[hot] = names[0]
    return value


@contextmanager
def override(op: str, value: Any) -> Iterator[None]:
    """Within the block, every route of ``op`` is ``value`` (nothing is timed or stored): tests and experiments."""
    before = _OVERRIDE.get(op, _MISSING)
    _OVERRIDE[op] = value
    try:
        yield
    finally:
        if before is _MISSING:
            del _OVERRIDE[op]
        else:
            _OVERRIDE[op] = before


def stored_routes() -> dict[str, Any]:
    """Every route stored on this machine (``key_text -> value``)."""
    return _read(routes_file())


def clear() -> None:
    """Forget every stored route (on disk and in this process)."""
    path = routes_file()
    with _locked(path):
        path.unlink(missing_ok=True)
    forget_memory()


def forget_memory() -> None:
    """Drop this process's copy of the stored routes (the file stays): tests, or after another process wrote."""
    _MEMORY.clear()
    _HOT.clear()
    _LOADED[0] = None


def _read(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):  # missing, or a torn file from a killed writer: re-time what is needed
        return {}
    return data if isinstance(data, dict) else {}


def _write(path: Path, data: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps(data, indent=0, sort_keys=True))


_HELD: list[int] = [0]  # this process's lock depth: a route timed under the lock may decide nested ones


class _locked:
    """An exclusive, re-entrant (within the process) lock on ``<path>.lock`` (``fcntl``; a no-op where missing)."""

    def __init__(self, path: Path) -> None:
        self.path = path.with_name(path.name + ".lock")
        self.fd: int | None = None

    def __enter__(self) -> None:
        _HELD[0] += 1
        if _HELD[0] > 1:
            return
        try:
            import fcntl
        except ImportError:  # pragma: no cover - not POSIX
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        fcntl.flock(self.fd, fcntl.LOCK_EX)

    def __exit__(self, *exc: object) -> None:
        _HELD[0] -= 1
        if self.fd is not None:
            import fcntl

            fcntl.flock(self.fd, fcntl.LOCK_UN)
            os.close(self.fd)
            self.fd = None
