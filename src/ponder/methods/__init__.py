"""Training objectives, one per paper; importing this package registers them."""

from ponder.methods.base import Method, StepOutput, create_method, list_methods, register_method

__all__ = ["Method", "StepOutput", "create_method", "list_methods", "register_method"]
