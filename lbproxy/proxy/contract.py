"""What the rest of the relay needs from a client connection, as Protocols (typing only).

`ClientConnection` (client.py) meets both. upstream.py and service.py name these instead of it, so
neither imports client.py, and mypy checks that it meets them wherever client.py hands itself over.
Nothing here is called: a Protocol adds no indirection to the hot path.
"""

from __future__ import annotations

import asyncio
from typing import Protocol, TypeVar

from .http import Request

# The upstream connection handed back to the client (upstream.py's UpstreamConnection): a parameter
# so that this module need not import the module that uses it.
Upstream_contra = TypeVar("Upstream_contra", contravariant=True)


class ClientForUpstream(Protocol[Upstream_contra]):
    """What an upstream connection and its pool need from the client connection of the exchange
    they serve: its loop and transport (responses are written straight into it), its state, and
    the callbacks of an exchange's course."""

    @property
    def loop(self) -> asyncio.AbstractEventLoop: ...

    @property
    def transport(self) -> asyncio.Transport: ...

    @property
    def closed(self) -> bool: ...

    @property
    def closing(self) -> bool: ...

    @property
    def write_paused(self) -> bool: ...

    def attach(self, req: Request, up: Upstream_contra) -> None:
        """A connection for `req` is ready (pooled or just connected): send `req` on it."""

    def connect_failed(self, req: Request, why: str, timed_out: bool = False) -> None:
        """No connection for `req` could be opened."""

    def upstream_failed(self, req: Request, why: str, retry_ok: bool) -> None:
        """The connection serving `req` failed; `retry_ok`: nothing of it was answered yet."""

    def first_byte(self, req: Request) -> None:
        """The response to `req` begins to stream."""

    def response_done(self, req: Request) -> None:
        """The response to `req` went out whole."""

    def start_tunnel(self, req: Request, up: Upstream_contra) -> None:
        """`req` was answered 101: from now on the two connections are a tunnel through `up`."""

    def tunnel_closed(self) -> None:
        """The real server's side of the tunnel closed."""

    def pause_for_upstream(self) -> None:
        """The upstream write buffer is above its high-water mark: stop reading the client."""

    def resume_for_upstream(self) -> None:
        """The upstream write buffer drained below its low-water mark: read the client again."""

    def touch(self) -> None:
        """Bytes came through the tunnel: push the connection's idle deadline back."""


class ClientForListener(Protocol):
    """What a listener needs from each of its connections: the deadline its sweep fires and the
    ways to end one (shut down after the response in flight, or abort at the drain deadline)."""

    @property
    def deadline(self) -> float: ...

    @property
    def closed(self) -> bool: ...

    @property
    def transport(self) -> asyncio.Transport: ...

    def on_timeout(self, now: float) -> None:
        """The deadline passed: answer or close as its kind says."""

    def shutdown(self) -> None:
        """Stop reading new requests: close now if idle, else after the response in flight."""
