"""The client connection of an HTTPS VS that offers HTTP/2: it reads the protocol its TLS
handshake chose and, for "h2", hands its transport to an `H2Session` (h2conn.py).

An HTTPS VS with `http2 = true` offers ALPN "h2" before "http/1.1" and accepts connections as
`ALPNClientConnection`: a `ClientConnection` whose `connection_made` reads the protocol the
handshake chose. HTTP/1.1 stays on the ordinary path untouched; "h2" hands the transport to an
`H2Session` (`transport.set_protocol`), and the connection object stays in the listener's set as
the session's handle for the deadline sweep, eviction and drain. A tls-alpn-01 validator
(ALPN "acme-tls/1", tls.py) is closed once its handshake is done.
"""

from __future__ import annotations

import asyncio
from typing import Any, cast

from h2.errors import ErrorCodes

from .client import ClientConnection
from .clienthello import ACME_TLS_ALPN
from .h2conn import H2Session
from .proxyproto import Addresses


class ALPNClientConnection(ClientConnection):
    """A client connection of an HTTPS VS that offers h2: HTTP/1.1 as ever, unless the handshake
    chose "h2"; then its `H2Session` is the transport's protocol and this object its handle in
    the listener (deadlines, eviction, drain)."""

    __slots__ = ("h2", "pp_addrs")

    def __init__(self, listener: Any, pp_addrs: Addresses | None = None) -> None:
        """`pp_addrs`: what the PROXY header read before TLS named (tlsserver.py), if any."""
        super().__init__(listener)
        self.h2: H2Session | None = None
        self.pp_addrs = pp_addrs

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        ssl_object = transport.get_extra_info("ssl_object")
        super().connection_made(transport)
        if self.pp_addrs is not None and not self.closed:
            self.proxied(self.pp_addrs)
        if ssl_object is None or self.closed:
            return
        alpn = ssl_object.selected_alpn_protocol()
        if alpn != "h2":
            if alpn == ACME_TLS_ALPN:   # a tls-alpn-01 validator (tls.py): nothing follows
                self._close()
            return
        session = H2Session(self, cast(asyncio.Transport, transport))
        self.h2 = session
        self.parser = None  # HTTP/1.1's, never used by this connection now
        transport.set_protocol(session)
        session.start()

    def on_timeout(self, now: float) -> None:
        if self.h2 is not None:
            self.h2.on_timeout(now)
        else:
            super().on_timeout(now)

    def shutdown(self) -> None:
        if self.h2 is not None:
            self.h2.shutdown()
        else:
            super().shutdown()

    def waiting_since(self) -> float:
        if self.h2 is not None:
            return self.h2.waiting_since()
        return super().waiting_since()

    def evict(self) -> None:
        if self.h2 is not None:
            self.listener.conns.discard(self)
            self.listener.counters.limits["evicted"] += 1
            self.h2.goaway(ErrorCodes.NO_ERROR)
        else:
            super().evict()
