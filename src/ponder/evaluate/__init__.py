"""Evaluation protocols; importing this package registers every protocol module in it."""

from ponder._autoimport import import_submodules

import_submodules(__name__, __path__)
