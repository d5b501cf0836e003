"""Intra-op thread counts that degrade gracefully on a busy machine.

PyTorch starts one OpenMP thread per core. When other processes keep some of those cores
busy, every parallel region ends at a barrier that waits for a thread the OS has descheduled,
while the threads that arrived first spin: on a 2-core machine with one other CPU-bound job,
training took 5 to 20 times longer with 2 threads than with 1. :func:`use_free_cores` counts
the cores other processes keep busy (from ``/proc/stat``, over a fraction of a second) and sets
torch's threads to the cores left free (at least one). The ``ponder`` command calls it for
``train``, ``eval`` and ``demo``; ``OMP_NUM_THREADS`` set by the user wins.
"""

from __future__ import annotations

import os
import time
from pathlib import Path


def _cpu_jiffies(cpus: set[int]) -> tuple[int, int] | None:
    """``(busy, total)`` jiffies of ``cpus`` since boot from ``/proc/stat`` (None where it cannot be read)."""
    try:
        lines = Path("/proc/stat").read_text().splitlines()
    except OSError:
        return None
    busy = total = 0
    for line in lines:
        name, *fields = line.split()
        if not (name.startswith("cpu") and name[3:].isdigit() and int(name[3:]) in cpus):
            continue
        values = [int(v) for v in fields[:8]]  # user nice system idle iowait irq softirq steal
        total += sum(values)
        busy += sum(values) - values[3] - values[4]
    return (busy, total) if total else None


def usable_cpus() -> set[int]:
    """The CPUs this process may run on."""
    try:
        return set(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not Linux
        return set(range(os.cpu_count() or 1))


def busy_cores(seconds: float = 0.2) -> float | None:
    """How many of this process's CPUs other processes kept busy over the next ``seconds``
    (this process's own CPU time left out); None where ``/proc/stat`` is missing."""
    cpus = usable_cpus()
    start, own = _cpu_jiffies(cpus), time.process_time()
    time.sleep(seconds)
    end, own = _cpu_jiffies(cpus), time.process_time() - own
    if start is None or end is None or end[1] == start[1]:
        return None
    fraction = (end[0] - start[0]) / (end[1] - start[1])  # of all listed CPUs' time
    return max(0.0, fraction * len(cpus) - own / seconds)


def use_free_cores(seconds: float = 0.2) -> int | None:
    """Set ``torch.set_num_threads`` to the cores no other process keeps busy (rounded, between 1
    and torch's current count); returns the count set, or None when ``OMP_NUM_THREADS`` is set
    (the user's choice) or the load cannot be measured."""
    import torch

    if os.environ.get("OMP_NUM_THREADS"):
        return None
    busy = busy_cores(seconds)
    if busy is None:
        return None
    threads = max(1, min(torch.get_num_threads(), round(len(usable_cpus()) - busy)))
    torch.set_num_threads(threads)
    return threads
