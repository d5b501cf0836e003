"""Training objectives, one per paper; importing this package registers every method module in it."""

from ponder._autoimport import import_submodules
from ponder.methods.base import Method, StepOutput, create_method, list_methods, register_method

import_submodules(__name__, __path__)

__all__ = ["Method", "StepOutput", "create_method", "list_methods", "register_method"]
