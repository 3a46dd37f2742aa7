"""The admin API (aiohttp) and the `lbproxy` CLI that talks to it."""

from .api import create_app, load_or_create_token
from .server import AdminServer, start_admin

__all__ = ["AdminServer", "create_app", "load_or_create_token", "start_admin"]
