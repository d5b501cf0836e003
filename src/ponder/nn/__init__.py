"""Reusable parts of dynamic networks (executors, gates, halting, sparse kernels, exit heads)."""

from ponder.nn.executor import EXECUTORS, get_executor, set_executor

__all__ = ["EXECUTORS", "get_executor", "set_executor"]
