"""The keep-alive pools of the relay's real-server side: one `ConnPool` per real-server address
(and PROXY protocol version, `PoolKey`) keeps idle connections in a LIFO list (the most recently
used is the warmest and the least likely to have been closed by the server), opens new ones, and
closes expired ones in `sweep()`. The connections themselves are upstream.py's.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Any, Final, NamedTuple, cast

from .outbox import Outbox
from .upstream import Req, UpstreamConnection, _describe

if TYPE_CHECKING:
    from .upstream import Client

# An idle pool bigger than this closes the extra connections instead of keeping them: bounds the
# file descriptors one real server can hold while idle (wrk-style load uses far fewer).
MAX_IDLE_PER_SERVER: Final = 512


class PoolKey(NamedTuple):
    """What a `ConnPool` is found by: its real server's address, and the PROXY protocol version
    its connections begin with (0: none). A server that is sent the PROXY protocol by one VS and
    not by another has two pools (proxyproto.ProxyConnPool beside a plain one)."""

    host: str
    port: int
    send_proxy: int = 0


class ConnPool:
    """Idle keep-alive connections to one real server (shared by every VS that uses it)."""

    __slots__ = ("address", "connects", "host", "idle", "idle_timeout", "loop", "outbox",
                 "parse_all", "port", "retired", "send_proxy", "whole")

    def __init__(self, loop: asyncio.AbstractEventLoop, host: str, port: int,
                 idle_timeout: float, outbox: Outbox) -> None:
        self.loop = loop
        self.outbox = outbox
        self.host = host
        self.port = port
        self.address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        # Idle connections serve whatever request comes next: of any request type.
        self.idle: list[UpstreamConnection[Any]] = []
        self.idle_timeout = idle_timeout
        self.connects = 0
        self.retired = False
        # PROXY protocol version written first on each new connection (0: none; Exchange.attach).
        self.send_proxy = 0
        # Responses relayed whole by upstream.py's fast path; `parse_all` turns that path off
        # (the fast/general path equivalence test does; nothing else changes it).
        self.whole = 0
        self.parse_all = False

    def acquire(self, now: float) -> UpstreamConnection[Any] | None:
        """The most recently used idle connection still fresh at `now`, or None (the one way a
        pooled connection is taken; those found expired or closing are closed on the way)."""
        idle = self.idle
        limit = now - self.idle_timeout
        while idle:
            up = idle.pop()
            if up.idle_since < limit or up.transport is None or up.transport.is_closing():
                up.close()
                continue
            up.reused = True
            return up
        return None

    def release(self, up: UpstreamConnection[Any], now: float) -> None:
        """Keep `up`, idle since `now`, for the next request (the one way a connection returns to
        the pool), or close it: the pool is retired or full, or the connection is gone."""
        if self.retired or len(self.idle) >= MAX_IDLE_PER_SERVER or up.transport is None:
            up.close()
            return
        up.idle_since = now
        self.idle.append(up)

    def discard(self, up: UpstreamConnection[Any]) -> None:
        try:
            self.idle.remove(up)
        except ValueError:
            pass

    def sweep(self, now: float) -> None:
        """Close connections idle for longer than the idle timeout (oldest are first)."""
        idle = self.idle
        limit = now - self.idle_timeout
        n = 0
        while n < len(idle) and idle[n].idle_since < limit:
            n += 1
        if n:
            expired, self.idle = idle[:n], idle[n:]
            for up in expired:
                up.close()

    def close_idle(self) -> None:
        idle, self.idle = self.idle, []
        for up in idle:
            up.close()

    def connect(self, client: Client[Req], req: Req, timeout: float) -> None:
        """Open a connection for `req`; calls back client.attach() or client.connect_failed()."""
        self.connects += 1
        task = self.loop.create_task(self._connect(self.loop.time() + timeout))

        def done(t: asyncio.Task[UpstreamConnection[Any]]) -> None:
            if t.cancelled():
                return
            exc = t.exception()
            if exc is not None:
                client.connect_failed(req, f"connect to {self.address}: {_describe(exc)}",
                                      timed_out=isinstance(exc, TimeoutError))
                return
            up = t.result()
            if client.closed or req.up is not None or req.backend is None:
                # The client went away while we connected: keep the connection for the next one.
                self.release(up, self.loop.time())
                return
            client.attach(req, up)

        task.add_done_callback(done)

    async def _connect(self, deadline: float) -> UpstreamConnection[Any]:
        async with asyncio.timeout_at(deadline):
            # An asyncio.Protocol by what it implements (upstream.py), not by its base class.
            _, proto = await self.loop.create_connection(
                lambda: cast(asyncio.Protocol, UpstreamConnection(self)), self.host, self.port)
        return cast(UpstreamConnection[Any], proto)
