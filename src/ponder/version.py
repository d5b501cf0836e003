"""ponder's version (one place; ``ponder.__version__`` reads it)."""

__version__ = "0.1.0"
