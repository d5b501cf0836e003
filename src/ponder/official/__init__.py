"""Checkpoints of the official MSDNet, RANet, BlockDrop and SkipNet repositories, run in ponder.

``load_official(path)`` reads a released (or self-trained) checkpoint without running code from
it, recognises the repository from its layout, and returns the matching ponder model with those
weights; ``convert_official(path, run_dir)`` (``ponder convert PATH --to RUN_DIR``) writes it as a
ponder run directory. One mapping file per repository: :mod:`~ponder.official.msdnet`,
:mod:`~ponder.official.ranet`, :mod:`~ponder.official.blockdrop`, :mod:`~ponder.official.skipnet`.
"""

from ponder.official.layout import OfficialCheckpointError
from ponder.official.load import OfficialCheckpoint, convert_official, load_official

__all__ = ["OfficialCheckpoint", "OfficialCheckpointError", "convert_official", "load_official"]
