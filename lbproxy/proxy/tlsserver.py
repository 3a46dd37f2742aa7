"""The listening side of every HTTPS VS: accepts connections, reads a PROXY header first where
the VS takes one, and starts TLS on the socket itself (tlssock.py).

A VS without `proxy_protocol_from` goes straight to TLS. With it, a connection from a listed
source must begin with a v1 or v2 header (proxyproto.parse): the header is read with MSG_PEEK,
and only the bytes it is made of are taken from the socket, so the ClientHello behind it (sent in
the same segment or not) is left for TLS; the connection (alpn.ALPNClientConnection) then sees
the client the header named, as on an HTTP VS (rules, logs, X-Forwarded-For,
send_proxy_protocol). A connection from any other source goes to TLS once its first byte shows no
PROXY signature (a ClientHello's first byte does), and is refused if it begins with one: a client
must not choose its own address. Bounds: MAX_V2 bytes (v1: 107); the VS's head timeout from the
accept (for the header, then again for the handshake); connections being looked at,
max_connections. A malformed, truncated, late or unwanted header closes the connection, logged
as on an HTTP VS and counted in `limit_rejections` (`proxy_protocol`; `head_timeout` when nothing
decisive came in time; `max_connections`). Closing the server ends the handshakes in progress
(connections past it are the listener's, which drains them).
"""

from __future__ import annotations

import asyncio
import socket
import ssl
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Final

from .clientstate import logger  # the client connections' logger: the same lines as HTTP VSs'
from .proxyproto import MAX_V2, V2_SIG, Addresses, ProxyHeaderError, parse, starts_with_signature
from .tlssock import TLSSocketTransport, start_tls

if TYPE_CHECKING:
    from .service import Listener

# Connections taken per wake-up of the listening socket (then the loop's other callbacks run).
_ACCEPTS_PER_WAKE: Final = 64
# Out of file descriptors (EMFILE/ENFILE): accepting pauses this long, as asyncio's server does.
_ACCEPT_RETRY: Final = 1.0
# A recv() that returns fewer peeked bytes than asked is retried at most this often.
_TAKE_TRIES: Final = 4

ConnFactory = Callable[[Addresses | None], asyncio.BaseProtocol]


class _Pending:
    """A connection whose header is being read (`trusted`: from a listed source), or, from any
    other source, whose first bytes are looked at for a PROXY signature."""

    __slots__ = ("buf", "ip", "sock", "timer", "trusted")

    def __init__(self, sock: socket.socket, ip: str, timer: asyncio.TimerHandle,
                 trusted: bool) -> None:
        self.sock = sock
        self.ip = ip
        self.timer = timer
        self.trusted = trusted
        self.buf = b""  # the header's (or signature's) bytes taken from the socket so far


class TLSServer:
    """One listening socket of an HTTPS VS: what a Listener uses of asyncio.Server
    (`start_serving`, `close`, `is_serving`, `sockets`)."""

    def __init__(self, loop: asyncio.AbstractEventLoop, sock: socket.socket,
                 listener: Listener[Any], ctx: ssl.SSLContext, factory: ConnFactory) -> None:
        self.loop = loop
        self._sock = sock
        self._listener = listener
        self._ctx = ctx
        self._factory = factory
        self._pending: dict[int, _Pending] = {}
        self._handshakes: set[TLSSocketTransport] = set()
        self._serving = False
        self._closed = False
        self._retry: asyncio.TimerHandle | None = None

    # -- what Listener and DataPlane use --------------------------------------------------------

    @property
    def sockets(self) -> tuple[socket.socket, ...]:
        return () if self._closed else (self._sock,)

    def is_serving(self) -> bool:
        return self._serving

    def get_loop(self) -> asyncio.AbstractEventLoop:
        return self.loop

    async def start_serving(self) -> None:
        if not self._serving and not self._closed:
            self._serving = True
            self.loop.add_reader(self._sock.fileno(), self._accept)

    def close(self) -> None:
        """Stop accepting; connections whose header is still being read, or whose handshake has
        not ended, are closed (those past it are the listener's, which drains them)."""
        if self._closed:
            return
        self._closed = True
        if self._serving:
            self._serving = False
            self.loop.remove_reader(self._sock.fileno())
        if self._retry is not None:
            self._retry.cancel()
        self._sock.close()
        for p in list(self._pending.values()):
            self._forget(p)
            p.sock.close()
        for t in list(self._handshakes):
            t.abort_handshake()
        self._handshakes.clear()

    async def wait_closed(self) -> None:
        pass  # close() ended every connection it owned at once

    # -- accepting ------------------------------------------------------------------------------

    def _accept(self) -> None:
        for _ in range(_ACCEPTS_PER_WAKE):
            try:
                conn, addr = self._sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as e:
                if e.errno is not None and e.errno in (24, 23):  # EMFILE, ENFILE
                    logger.error("VS %s: cannot accept: %s; retrying in %gs",
                                 self._listener.name, e, _ACCEPT_RETRY)
                    self.loop.remove_reader(self._sock.fileno())
                    self._retry = self.loop.call_later(_ACCEPT_RETRY, self._resume)
                # Anything else (ECONNABORTED: the client left before accept): the next one.
                return
            self._accepted(conn, addr)

    def _resume(self) -> None:
        self._retry = None
        if self._serving:
            self.loop.add_reader(self._sock.fileno(), self._accept)

    def _accepted(self, conn: socket.socket, addr: Any) -> None:
        lst = self._listener
        svc = lst.service
        conn.setblocking(False)
        try:
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except OSError:  # reset already: the handshake fails and says so
            pass
        sources = svc.pp_tls_sources
        ip = str(addr[0]) if isinstance(addr, tuple) else ""
        if sources is None or not ip:  # (no address: reset already; the handshake fails)
            self._start_tls(conn, None, addr)
            return
        if len(self._pending) >= svc.max_connections:
            lst.counters.refused += 1
            lst.counters.limits["max_connections"] += 1
            conn.close()
            return
        fd = conn.fileno()
        timer = self.loop.call_later(svc.t_head, self._expire, fd)
        self._pending[fd] = _Pending(conn, ip, timer, ip in sources)
        self.loop.add_reader(fd, self._read, fd)

    # -- the header -----------------------------------------------------------------------------

    def _read(self, fd: int) -> None:
        p = self._pending.get(fd)
        if p is None:
            return
        sock = p.sock
        if not p.trusted:
            self._sniff(p)
            return
        try:
            peek = sock.recv(MAX_V2 - len(p.buf), socket.MSG_PEEK)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:  # reset: nothing to tell (an HTTP VS logs none either)
            self._drop(p)
            return
        if not peek:
            if p.buf:
                self._refuse(p, f"{p.ip} closed before its PROXY protocol header ended")
            else:  # a balancer's TCP check sends nothing: not logged
                self._drop(p)
            return
        data = p.buf + peek if p.buf else peek
        try:
            got = parse(data)
        except ProxyHeaderError as e:
            self._refuse(p, f"bad PROXY protocol header from {p.ip}: {e}")
            return
        try:
            if got is None:  # every byte so far is the header's (it has not ended): take them
                _take(sock, len(peek))
                p.buf = data
                return
            n, addrs = got
            _take(sock, n - len(p.buf))  # the header's last bytes, and not one more
        except OSError:
            self._drop(p)
            return
        self._forget(p)
        self._start_tls(sock, addrs, _peer(sock))

    def _sniff(self, p: _Pending) -> None:
        """A source not listed: TLS if its first bytes are not a PROXY signature (a ClientHello
        shows it in its first byte), refused if they are, as on an HTTP VS."""
        sock = p.sock
        try:
            peek = sock.recv(len(V2_SIG) - len(p.buf), socket.MSG_PEEK)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            self._drop(p)
            return
        if not peek:
            self._drop(p)
            return
        data = p.buf + peek if p.buf else peek
        sig = starts_with_signature(data)
        if sig is None:  # a signature's beginning, not TLS: taken, to wait for more
            try:
                _take(sock, len(peek))
            except OSError:
                self._drop(p)
                return
            p.buf = data
        elif sig:
            self._refuse(p, f"a PROXY protocol header from {p.ip}, which is not in "
                            "proxy_protocol_from")
        elif p.buf:  # neither a PROXY header nor TLS
            logger.debug("VS %s: %s sent neither TLS nor a PROXY header; connection closed",
                         self._listener.name, p.ip)
            self._drop(p)
        else:
            self._forget(p)
            self._start_tls(sock, None, _peer(sock))

    def _expire(self, fd: int) -> None:
        p = self._pending.get(fd)
        if p is None:
            return
        lst = self._listener
        lst.counters.limits["head_timeout"] += 1
        logger.info("VS %s: no %s from %s in %gs; connection closed", lst.name,
                    "PROXY protocol header" if p.trusted else "TLS handshake", p.ip,
                    lst.service.t_head)
        self._drop(p)

    def _refuse(self, p: _Pending, why: str) -> None:
        lst = self._listener
        logger.warning("VS %s: %s; connection closed", lst.name, why)
        lst.counters.limits["proxy_protocol"] += 1
        self._drop(p)

    def _forget(self, p: _Pending) -> None:
        fd = p.sock.fileno()
        self._pending.pop(fd, None)
        p.timer.cancel()
        if fd >= 0:
            self.loop.remove_reader(fd)

    def _drop(self, p: _Pending) -> None:
        self._forget(p)
        p.sock.close()

    # -- TLS ------------------------------------------------------------------------------------

    def _start_tls(self, sock: socket.socket, addrs: Addresses | None, peer: Any) -> None:
        """The handshake, bounded by the VS's head timeout as it is now (a reload may change
        it under a running listener)."""
        factory = self._factory
        start_tls(self.loop, sock, peer, self._ctx, lambda: factory(addrs),
                  self._listener.service.t_head, self._handshakes)


def _peer(sock: socket.socket) -> Any:
    try:
        return sock.getpeername()
    except OSError:
        return None


def _take(sock: socket.socket, n: int) -> None:
    """Read exactly `n` bytes that a MSG_PEEK showed are there (so never more than them)."""
    for _ in range(_TAKE_TRIES):
        if n <= 0:
            return
        n -= len(sock.recv(n))
    if n > 0:
        raise OSError(f"{n} peeked bytes could not be read")
