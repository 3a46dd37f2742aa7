"""What the rest of the relay needs from a client connection and its requests, as Protocols
(typing only).

`ClientConnection` (client.py) meets both client Protocols (its `Exchange` layer, exchange.py,
already meets the first), and request.py's `Request` meets `RequestForUpstream`. upstream.py and
service.py name these instead of them, so neither imports the modules above them, and mypy checks
that they are met wherever the client connection hands itself or a request over. Nothing here is
called: a Protocol adds no indirection to the hot path.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

if TYPE_CHECKING:
    from .compress import Offer
    from .headerrules import ResponseEdit
    from .outbox import Outbox


class PoolForUpstream(Protocol):
    """What an upstream connection needs of the keep-alive pool it belongs to (connpool.py's
    `ConnPool`, which creates it): the loop's outbox, and taking it back or forgetting it."""

    outbox: Outbox
    send_proxy: int  # the PROXY protocol version its connections begin with (0: none)
    whole: int  # responses its connections relayed whole, without the parser (upstream.py)
    parse_all: bool  # every response through the parser (the path-equivalence test's switch)

    def release(self, up: Any, now: float) -> None: ...

    def discard(self, up: Any) -> None: ...


class RequestForUpstream(Protocol):
    """What an upstream connection reads and writes of the request whose exchange it serves:
    how to answer it, and the response's status and sizes (for the client's accounting)."""

    status: int  # the response's
    hlen: int  # response head bytes sent to the client
    resp_bytes: int  # response body bytes
    resp_started: bool
    keep_alive: bool  # the client connection stays open after the response

    @property
    def complete(self) -> bool:
        """The whole request was read from the client (and went upstream)."""

    @property
    def is_head(self) -> bool: ...

    @property
    def v10(self) -> bool: ...

    @property
    def upgrade(self) -> bool:
        """It asks to switch protocols (a 101 may answer it)."""

    @property
    def sent_continue(self) -> bool:
        """The proxy answered its Expect: 100-continue itself."""

    @property
    def up(self) -> object:
        """The upstream connection of its exchange, if any yet."""

    @property
    def backend(self) -> object:
        """The real server it holds, if any (None once released)."""

    @property
    def compress(self) -> Offer | None:
        """The coding its response may be compressed with (compress.py), if any."""

    @property
    def hresp(self) -> ResponseEdit | None:
        """What header rules do to its response head (headerrules.py), if any."""


# The upstream connection and the request handed back to the client (upstream.py's
# UpstreamConnection, request.py's Request): parameters, so that this module need not import the
# modules that use it.
Upstream_contra = TypeVar("Upstream_contra", contravariant=True)
Request_contra = TypeVar("Request_contra", bound=RequestForUpstream, contravariant=True)


class ClientForUpstream(Protocol[Upstream_contra, Request_contra]):
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

    def attach(self, req: Request_contra, up: Upstream_contra) -> None:
        """A connection opened for `req` is ready (ConnPool.connect): send `req` on it."""

    def connect_failed(self, req: Request_contra, why: str, timed_out: bool = False) -> None:
        """No connection for `req` could be opened."""

    def upstream_failed(self, req: Request_contra, why: str, retry_ok: bool) -> None:
        """The connection serving `req` failed; `retry_ok`: nothing of it was answered yet."""

    def first_byte(self, req: Request_contra) -> None:
        """The response to `req` begins to stream."""

    def response_done(self, req: Request_contra) -> None:
        """The response to `req` went out whole."""

    def start_tunnel(self, req: Request_contra, up: Upstream_contra) -> None:
        """`req` was answered 101: from now on the two connections are a tunnel through `up`."""

    def tunnel_closed(self) -> None:
        """The real server's side of the tunnel closed."""

    def pause_for_upstream(self) -> None:
        """The upstream write buffer is above its high-water mark: stop reading the client."""

    def resume_for_upstream(self) -> None:
        """The upstream write buffer drained below its low-water mark: read the client again."""

    def touch(self) -> None:
        """Bytes came through the tunnel: push the connection's idle deadline back."""

    def proxy_header(self, version: int) -> bytes:
        """The PROXY protocol header (`version` 1 or 2) that names this client to a real
        server."""


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
