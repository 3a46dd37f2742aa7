"""The data plane: listeners, per-connection protocol, upstream pools, schedulers, health checks."""

from .compiled import MODE  # first: it decides where the hot modules are loaded from
from .dataplane import DataPlane
from .errors import ListenError

__all__ = ["MODE", "DataPlane", "ListenError"]
