"""The one error type of :mod:`ponder.data`."""

from __future__ import annotations


class DataError(ValueError):
    """A data folder or file is missing, malformed or unsafe; the message names it and the fix."""
