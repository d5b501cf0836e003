"""Thread counts follow the free cores; timing tables say how noisy they were."""

import json

import pytest
import torch

from ponder import threads
from ponder.cli import main


@pytest.fixture
def restore_threads():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def fake_proc_stat(monkeypatch, load, cpus=(0, 1)):
    """``/proc/stat`` whose CPUs have ``(busy, idle)`` jiffies ``(10, 10)`` at the first read and
    ``load[i]`` more at the second."""
    reads = iter([[(10, 10)] * len(cpus), [(10 + b, 10 + i) for b, i in load]])

    def read_text(self):
        per_cpu = next(reads)
        lines = ["cpu  0 0 0 0 0 0 0 0 0 0"]
        lines += [f"cpu{c} {busy} 0 0 {idle} 0 0 0 0 0 0" for c, (busy, idle) in zip(cpus, per_cpu)]
        return "\n".join(lines + ["intr 1 2 3"]) + "\n"

    monkeypatch.setattr(threads.Path, "read_text", read_text)
    monkeypatch.setattr(threads, "usable_cpus", lambda: set(cpus))
    monkeypatch.setattr(threads.time, "sleep", lambda s: None)
    monkeypatch.setattr(threads.time, "process_time", lambda: 0.0)


@pytest.mark.parametrize("load, expected", [
    ([(0, 0), (0, 0)], None),  # no time passed: unknown
    ([(100, 0), (0, 100)], 1),  # another process kept one CPU busy: one thread
    ([(10, 90), (30, 70)], 2),  # 0.4 of a CPU busy: both threads
    ([(100, 0), (80, 20)], 1),  # 1.8 CPUs busy: still one thread
])
def test_threads_follow_the_free_cores(monkeypatch, restore_threads, load, expected):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    torch.set_num_threads(2)
    fake_proc_stat(monkeypatch, load)
    assert threads.use_free_cores() == expected
    assert torch.get_num_threads() == (expected or 2)


def test_the_users_thread_count_wins(monkeypatch, restore_threads):
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    torch.set_num_threads(2)
    fake_proc_stat(monkeypatch, [(100, 0), (100, 0)])
    assert threads.use_free_cores() is None and torch.get_num_threads() == 2


def test_busy_cores_leaves_out_this_process(monkeypatch):
    fake_proc_stat(monkeypatch, [(20, 0), (10, 10)])  # 1.5 CPUs busy over 0.2 s ...
    clock = iter([0.0, 0.1])  # ... 0.5 of them this process
    monkeypatch.setattr(threads.time, "process_time", lambda: next(clock))
    assert threads.busy_cores(0.2) == pytest.approx(1.0)


def test_real_proc_stat_is_read_where_there_is_one():
    busy = threads.busy_cores(0.05)
    assert busy is None or 0 <= busy <= len(threads.usable_cpus())


def test_static_bench_reports_its_spread(capsys):
    assert main(["bench", "resnet20_cifar", "--batch", "2", "--repeats", "3", "--warmup", "1", "--threads", "1",
                 "--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    lo, hi = d["ms_range"]
    assert 0 < lo <= d["ms"] <= hi
    assert main(["bench", "resnet20_cifar", "--batch", "2", "--repeats", "3", "--warmup", "1", "--threads", "1"]) == 0
    assert "(single rounds: " in capsys.readouterr().out
