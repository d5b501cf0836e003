"""Built-in models; importing this package registers them."""

from ponder.models import resnet  # noqa: F401
from ponder.models.base import PonderModel

__all__ = ["PonderModel"]
