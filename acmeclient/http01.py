"""HTTP-01 responders: the pluggable `Http01Responder` seam and a minimal standalone aiohttp one."""

from __future__ import annotations

import logging
import re
from typing import Protocol

from aiohttp import web

logger = logging.getLogger(__name__)

CHALLENGE_PREFIX = "/.well-known/acme-challenge/"
_TOKEN = re.compile(r"[A-Za-z0-9_-]+")  # base64url alphabet (RFC 8555 §8.3)


class Http01Responder(Protocol):
    """Something that serves key authorizations at /.well-known/acme-challenge/<token>."""

    async def present(self, domain: str, token: str, key_authorization: str) -> None:
        """Start answering; must be serving when this returns."""

    async def cleanup(self, domain: str, token: str) -> None:
        """Stop answering for this token. Idempotent: it is also called for a token whose
        present() failed or was cancelled."""


class StandaloneHttp01Responder:
    """An aiohttp server that answers challenges only (text/plain, Host and token checked).

    Use as `async with StandaloneHttp01Responder(port=80): ...` or start()/stop().
    """

    def __init__(self, host: str = "0.0.0.0", port: int = 80) -> None:
        self.host = host
        self.port = port
        self._answers: dict[str, tuple[str, str]] = {}  # token -> (domain, key authorization)
        self._runner: web.AppRunner | None = None

    async def present(self, domain: str, token: str, key_authorization: str) -> None:
        if not _TOKEN.fullmatch(token):
            raise ValueError(f"token {token!r} is not base64url")
        self._answers[token] = (domain.lower().rstrip("."), key_authorization)

    async def cleanup(self, domain: str, token: str) -> None:
        self._answers.pop(token, None)

    async def _handle(self, request: web.Request) -> web.Response:
        token = request.match_info["token"]
        entry = self._answers.get(token)
        host = (request.host or "").rsplit(":", 1)[0].lower().rstrip(".")
        if entry is None or entry[0] != host:
            return web.Response(status=404, text="not found\n", content_type="text/plain")
        return web.Response(text=entry[1], content_type="text/plain")

    async def start(self) -> None:
        app = web.Application()
        app.router.add_get(CHALLENGE_PREFIX + "{token}", self._handle)
        self._runner = web.AppRunner(app, access_log=None, handle_signals=False)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.host, self.port, reuse_address=True)
        await site.start()
        if self.port == 0:  # an ephemeral port was asked for: report the real one
            self.port = int(self._runner.addresses[0][1])

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def __aenter__(self) -> StandaloneHttp01Responder:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()
