"""``ponder kernels``: build the compiled modules ahead of time and report what is built and routed."""

from __future__ import annotations

import subprocess
import sys
import time
from collections import Counter
from typing import TextIO

from ponder.fast import native, routes
from ponder.fast.switch import enabled


def build_all(force: bool = False, jobs: int = 2, out: TextIO = sys.stdout) -> list[str]:
    """Compile every module that is not built yet (or all, with ``force``), ``jobs`` at a time, each in
    its own process, with one progress line per module and the real time taken. Returns the names that
    failed (their compiler output is printed)."""
    todo = [m for m in native.MODULES.values() if force or not m.built()]
    for m in native.MODULES.values():
        if m not in todo:
            print(f"  {m.name:<11s} already built ({m.library()})", file=out, flush=True)
    if not todo:
        return []
    print(f"ponder: building {len(todo)} kernel module(s), {jobs} at a time (about 1-2 minutes each)...",
          file=out, flush=True)
    start, failed, done = time.perf_counter(), [], 0
    waiting = list(todo)
    running: dict[str, tuple[subprocess.Popen, float]] = {}
    while waiting or running:
        while waiting and len(running) < max(1, jobs):
            m = waiting.pop(0)
            code = f"from ponder.fast.native import build; build({m.name!r}, force={force!r})"
            proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                    text=True)
            running[m.name] = (proc, time.perf_counter())
        time.sleep(0.2)
        for name, (proc, t0) in list(running.items()):
            if proc.poll() is None:
                continue
            del running[name]
            done += 1
            log = proc.stdout.read() if proc.stdout else ""
            took = time.perf_counter() - t0
            if proc.returncode == 0:
                print(f"  [{done}/{len(todo)}] {name:<11s} built in {took:.0f} s", file=out, flush=True)
            else:
                failed.append(name)
                tail = "\n".join(log.strip().splitlines()[-15:])
                print(f"  [{done}/{len(todo)}] {name:<11s} FAILED after {took:.0f} s:\n{tail}", file=out, flush=True)
    print(f"ponder: kernels done in {time.perf_counter() - start:.0f} s"
          + (f"; {len(failed)} failed: fast paths use PyTorch ops for them" if failed else ""), file=out, flush=True)
    native.forget_loaded()
    return failed


def status_lines(show_routes: bool = False) -> list[str]:
    """What ``ponder kernels`` prints: the switch, each module (built or not, where), the stored routes
    (counted per operation, or each with ``show_routes``)."""
    lines = [f"fast paths: {'on' if enabled() else 'off (PONDER_FAST=0)'}"]
    for m in native.MODULES.values():
        state = f"built   {m.library()}" if m.built() else "missing (run `ponder kernels build`)"
        lines.append(f"  {m.name:<11s} {state}")
    stored = routes.stored_routes()
    lines.append(f"stored routes: {len(stored)} in {routes.routes_file()}")
    if show_routes:
        lines += [f"  {key} -> {value}" for key, value in sorted(stored.items())]
    else:
        per_op = Counter(key.split("|", 1)[0] for key in stored)
        lines += [f"  {op:<14s} {n} shapes" for op, n in sorted(per_op.items())]
        if stored:
            lines.append("  (`ponder kernels --routes` lists each shape's route)")
    return lines
