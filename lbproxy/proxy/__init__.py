"""The data plane: listeners, per-connection protocol, upstream pools, schedulers, health checks."""

from .dataplane import DataPlane
from .errors import ListenError

__all__ = ["DataPlane", "ListenError"]
