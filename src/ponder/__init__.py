"""ponder: dynamic inference networks with honest cost and speed measurement."""

from ponder.cost import CostLedger, Profile, count_macs
from ponder.models.base import profile
from ponder.official import load_official
from ponder.output import DynamicOutput
from ponder.registry import create_model, list_models, register_model
from ponder.version import __version__


__all__ = [
    "CostLedger", "DynamicOutput", "Profile", "count_macs", "create_model", "list_models", "load_official",
    "profile", "register_model", "__version__",
]
