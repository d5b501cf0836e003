"""Test-session settings: a fresh store of timed routes, so tests never read or write the user's."""

from __future__ import annotations

import os
import tempfile

import pytest

# set before ponder is imported by any test module; subprocesses started by tests inherit it
os.environ.setdefault("PONDER_ROUTES_FILE", os.path.join(tempfile.mkdtemp(prefix="ponder-test-routes-"), "routes.json"))


@pytest.fixture
def fresh_routes(tmp_path, monkeypatch):
    """An empty route store for one test (the module ``ponder.fast.routes``); restored afterwards."""
    from ponder.fast import routes

    monkeypatch.setenv("PONDER_ROUTES_FILE", str(tmp_path / "routes.json"))
    routes.forget_memory()
    yield routes
    routes.forget_memory()


def stored(routes, op: str) -> dict:
    """The routes of ``op`` stored in the current file."""
    return {k: v for k, v in routes.stored_routes().items() if k.startswith(op + "|")}


def assert_bound_steps_match(bank, inputs: list, atol: float) -> None:
    """A router or gate bank's batch-1 steps (``bank.bound_steps()``) give ``bank.step``'s logits and states,
    step after step, to float rounding; ``inputs``: the map each router reads, in order."""
    import torch

    with torch.no_grad():
        steps = bank.bound_steps()
        ours = want = bank.init_state(inputs[0])
        for j, x in enumerate(inputs):
            got, ours = steps[j](x, ours)
            logits, want = bank.step(j, x, want)
            torch.testing.assert_close(got, logits, rtol=1e-5, atol=atol)
            for a, b in zip(ours or (), want or ()):
                torch.testing.assert_close(a, b, rtol=1e-5, atol=atol)


def _fast_enabled() -> bool:
    from ponder.fast import enabled

    return enabled()


#: marks a test of the fast paths themselves (compiled kernels, routes, plans): skipped when they are off
fast_paths = pytest.mark.skipif(not _fast_enabled(), reason="fast paths are off (PONDER_FAST=0)")
