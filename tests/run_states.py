"""Comparing what two training runs left behind: nested states bit for bit, metrics without their timings."""

from __future__ import annotations

import torch


def assert_states_equal(a, b, path: str = "state") -> None:
    """Assert two nested training states are equal, tensors bit for bit (``path`` names the first difference)."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b), path
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), path
        for k in a:
            assert_states_equal(a[k], b[k], f"{path}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b)):
            assert_states_equal(x, y, f"{path}[{i}]")
    else:
        assert a == b, path


def strip_time(records: list[dict]) -> list[dict]:
    """Metrics records without their wall-clock ``time_s``."""
    return [{k: v for k, v in r.items() if k != "time_s"} for r in records]


def assert_metrics_close(one: list[dict], two: list[dict], tag: object) -> None:
    """Assert two runs' metrics records agree line by line, every value but ``time_s`` to 1e-4 relative
    (1e-6 absolute); ``tag`` names the run in the message."""
    import pytest

    for r1, r2 in zip(one, two, strict=True):
        for k, v in r1.items():
            if k != "time_s":
                assert r2[k] == pytest.approx(v, rel=1e-4, abs=1e-6), (tag, k)
