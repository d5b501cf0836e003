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


def _fast_enabled() -> bool:
    from ponder.fast import enabled

    return enabled()


#: marks a test of the fast paths themselves (compiled kernels, routes, plans): skipped when they are off
fast_paths = pytest.mark.skipif(not _fast_enabled(), reason="fast paths are off (PONDER_FAST=0)")
