"""Built-in models; importing this package registers every model module in it."""

from ponder._autoimport import import_submodules
from ponder.models.base import PonderModel

import_submodules(__name__, __path__)

__all__ = ["PonderModel"]
