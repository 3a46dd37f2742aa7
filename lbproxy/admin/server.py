"""Serving the admin application on its address (aiohttp AppRunner + TCPSite)."""

from __future__ import annotations

import logging
import ssl

from aiohttp import web

from ..config.model import Address

logger = logging.getLogger(__name__)

# Seconds an admin request in flight may take to finish when the process shuts down.
SHUTDOWN_TIMEOUT = 5.0


class AdminServer:
    """A running admin API; `port` is the bound port (useful with port 0)."""

    def __init__(self, runner: web.AppRunner, site: web.TCPSite, port: int) -> None:
        self._runner = runner
        self._site = site
        self.port = port

    async def close(self) -> None:
        await self._runner.cleanup()
        logger.info("admin API stopped")


async def start_admin(app: web.Application, address: Address,
                      ssl_context: ssl.SSLContext | None = None) -> AdminServer:
    """Start serving `app` on `address` (127.0.0.1:8444 by default in the config)."""
    # No access log: admin requests are few, and bodies (keys) are never logged anyway.
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=SHUTDOWN_TIMEOUT)
    await runner.setup()
    site = web.TCPSite(runner, address.host, address.port, ssl_context=ssl_context,
                       reuse_address=True)
    try:
        await site.start()
    except BaseException:
        await runner.cleanup()
        raise
    bound = runner.addresses
    port = int(bound[0][1]) if bound else address.port  # the real port when 0 was asked for
    logger.info("admin API listening on %s:%d%s", address.host, port,
                " (TLS)" if ssl_context else "")
    return AdminServer(runner, site, port)
