"""Where the project's shared, read-only data lives (``shared/``: the CIFAR-10 subset, official checkpoints).

``$PONDER_SHARED`` when set; otherwise the nearest ``shared`` folder beside the repository or one
level further up (a git worktree checked out one folder deeper than the main repository). Tests
that need it skip with a message when there is none.
"""

from __future__ import annotations

import os
from pathlib import Path

_REPO = Path(__file__).resolve().parents[1]


def shared_dir() -> Path | None:
    """The shared folder, or ``None`` when this checkout has none."""
    env = os.environ.get("PONDER_SHARED")
    candidates = [Path(env)] if env else [_REPO.parent / "shared", _REPO.parent.parent / "shared"]
    return next((p for p in candidates if p.is_dir()), None)


SHARED = shared_dir()
OFFICIAL = SHARED / "fixtures" / "official" if SHARED else None

