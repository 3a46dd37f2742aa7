"""Worker processes: one control process feeds N worker processes that each run the data plane
and accept on every listener with SO_REUSEPORT (see supervisor.py, addresses.py, worker.py,
channel.py)."""

from .supervisor import Supervisor

__all__ = ["Supervisor"]
