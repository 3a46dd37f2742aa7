"""The state of one client connection and what every part of it shares: flow control, the one
deadline (each kind set by one method here), the release of a request's real server and the end
of every request (its accounting and its access-log line, one place for every path).

`ClientConnection` (client.py) is this class and the layers above it, one concern each:
`Answers` (answers.py: local answers, the end of every answered request, the pipelined queue),
`Exchange` (exchange.py: where a request goes, its exchange with a real server) and
`RequestParsing` (reqparse.py: the httptools callbacks), then the asyncio protocol itself. The
layers split one class; only this one has slots, so an attribute costs what it did in one class.
"""

from __future__ import annotations

import asyncio
import logging
from math import inf
from typing import TYPE_CHECKING, Any, Final

import httptools

from .accesslog import CUT
from .clock import clock
from .counters import latency_slot
from .request import Request

if TYPE_CHECKING:
    from .counters import ServerStats, Traffic
    from .service import Listener, Service, Target
    from .upstream import UpstreamConnection

# One logger for every layer of the client connection.
logger = logging.getLogger("lbproxy.proxy.client")

# Why reading from the client is paused (a bit mask: reading resumes when all are clear).
P_PIPELINE: Final = 1  # requests are queued behind the one in flight
P_BUFFER: Final = 2  # request body buffered while no upstream connection is ready yet
P_UPSTREAM: Final = 4  # the upstream connection's write buffer is above the high-water mark
P_WRITE: Final = 8  # our own write buffer to the client is above the high-water mark
P_UPGRADE: Final = 16  # an Upgrade request waits for the real server's 101
P_STOP: Final = 32  # no more requests are read on this connection

# What the connection's single deadline means when it passes (client.py, on_timeout).
D_NONE: Final = 0
D_HEAD: Final = 1  # reading a request head -> 408
D_IDLE: Final = 2  # keep-alive idle -> close
D_FIRST_BYTE: Final = 3  # waiting for the response head -> 504
D_TUNNEL: Final = 4  # an idle WebSocket/Upgrade tunnel -> close
# a whole exchange took too long (a stalled upload or download) -> 408/504/abort
D_REQUEST: Final = 5
# reading a request body: no bytes for t_body (or the whole exchange too long) -> 408
D_BODY: Final = 6
D_IDLE_HELD: Final = 7  # keep-alive idle, the request parser still held -> release it, then D_IDLE

# The status logged for a request whose client went away before any response (nginx's 499).
CLIENT_CLOSED: Final = 499


class ClientState:
    """One client connection's state (every slot of `ClientConnection`) and shared primitives.

    It implements asyncio.Protocol without subclassing it, as its subclasses do: a compiled
    class (docs/architecture.md, "Compiled hot path") cannot derive from an interpreted one."""

    __slots__ = (
        "clen", "closed", "closing", "conn_extra", "cur", "deadline", "dkind", "eof", "feeding",
        "head_bytes", "host_ok", "hstart", "in_head", "ip_b", "listener", "log_prefix",
        "log_server", "log_svc", "log_target", "loop", "nmark", "nread", "out", "out_up", "outbox",
        "parser", "paused", "pending_error", "queue", "raw", "reject", "reject_key", "req",
        "running", "src_ip", "transport", "tunnel", "upgraded", "write_paused", "xff_b")

    # Set by connection_made, which asyncio calls before anything else can use it.
    transport: asyncio.Transport
    # The listener's connections are client.py's ClientConnection, which says so; this module
    # cannot name it (it would import the module above it).
    listener: Listener[Any]

    def __init__(self, listener: Listener[Any]) -> None:
        self.listener = listener
        self.loop = listener.loop
        self.outbox = listener.outbox
        # None while a keep-alive connection idles (D_IDLE_HELD, above): data_received remakes it.
        self.parser: Any = httptools.HttpRequestParser(self)
        self.src_ip = ""
        self.ip_b = b""
        # The access-log line prefix of the last request and what it was made of (by identity).
        self.log_prefix = b""
        self.log_svc: Service | None = None
        self.log_target: Target | None = None
        self.log_server: ServerStats | None = None
        self.xff_b = b""
        self.req: Request | None = None  # being parsed
        self.cur: Request | None = None  # being answered
        # Pipelined requests behind `cur`: a list, not a deque (an empty deque holds a 64-slot
        # block, ~700 bytes per idle connection; a pipeline is a few requests deep at most).
        self.queue: list[Request] = []
        self.paused = 0
        self.write_paused = False
        self.closing = False
        self.closed = False
        self.eof = False  # the client half-closed: answer what it sent whole, then close
        self.deadline = inf
        self.dkind = D_NONE
        self.feeding = False
        self.out_up: UpstreamConnection[Request] | None = None
        self.out: list[bytes] = []
        self.tunnel: UpstreamConnection[Request] | None = None
        self.upgraded = False
        self.raw: list[bytes] | None = None  # read after an Upgrade head, before the 101
        self.in_head = False
        self.head_bytes = 0
        self.reject = 0
        self.reject_key = ""
        self.host_ok = b"\x00"  # the last Host value that passed the check
        self.nread = 0  # bytes read from the client
        self.hstart = 0  # ... when the head being read had not begun yet
        self.nmark = 0  # ... of which already counted to a finished request
        self.pending_error = 0
        self.running = False
        self.clen = b""
        self.conn_extra: list[bytes] | None = None

    # -- writes and flow control --------------------------------------------------------------

    def _write(self, data: bytes) -> None:
        """Write to the client now, after whatever the outbox holds (the order of the bytes)."""
        self.outbox.write(self.transport, data)

    def _close(self) -> None:
        """Close the client connection once what is written and held has gone out."""
        self.outbox.close(self.transport)

    def pause(self, why: int) -> None:
        if not self.paused and not self.closed:
            self.transport.pause_reading()
        self.paused |= why

    def resume(self, why: int) -> None:
        if self.paused & why:
            self.paused &= ~why
            if not self.paused and not self.closed:
                self.transport.resume_reading()

    def pause_for_upstream(self) -> None:
        self.pause(P_UPSTREAM)

    def resume_for_upstream(self) -> None:
        self.resume(P_UPSTREAM)

    # -- the one deadline: each kind is set here and nowhere else -----------------------------
    # Those of the connection read the listener's current Service; those of a request, the
    # Service it started with.

    def _no_deadline(self) -> None:
        self.deadline = inf
        self.dkind = D_NONE

    def _wait_head(self, now: float) -> None:
        """A request head is being read (or awaited after a response that ended mid-head)."""
        self.deadline = now + self.listener.service.t_head
        self.dkind = D_HEAD

    def _wait_idle(self, now: float) -> None:
        """Keep-alive: nothing of the next request yet (an HTTP/2 session, or the rest of an
        HTTP/1.1 idle spell once its parser is released)."""
        self.deadline = now + self.listener.service.t_idle
        self.dkind = D_IDLE

    def _keep_alive(self, now: float) -> None:
        """HTTP/1.1 keep-alive: nothing of the next request yet, the parser held for t_hold
        (on_timeout releases it and waits out the rest of t_idle)."""
        self.deadline = now + self.listener.service.t_hold
        self.dkind = D_IDLE_HELD

    def _release_parser(self, now: float) -> bool:
        """The first t_hold of a keep-alive wait passed: release the parser if no request has
        begun, and wait out the rest of t_idle. False when t_idle is over too."""
        if self.req is None and not self.in_head:
            self.parser = None  # data_received makes one at the next byte
        svc = self.listener.service
        deadline = self.deadline + (svc.t_idle - svc.t_hold)
        if deadline <= now:
            return False
        self.deadline = deadline
        self.dkind = D_IDLE
        return True

    def _wait_tunnel(self, now: float) -> None:
        """An Upgrade tunnel (WebSocket): websocket_idle, pushed back by the bytes through it
        either way."""
        self.deadline = now + self.listener.service.t_tunnel
        self.dkind = D_TUNNEL

    def touch(self) -> None:
        self._wait_tunnel(clock())

    def _wait_first_byte(self, req: Request, now: float) -> None:
        """`req` went out whole at `now`: its real server has first_byte to answer."""
        self.deadline = now + req.svc.t_first_byte
        self.dkind = D_FIRST_BYTE

    def _wait_response(self, req: Request) -> None:
        """The response to `req` streams, bounded by the request timeout as a whole."""
        self.deadline = req.ts + req.svc.t_request
        self.dkind = D_REQUEST

    def _await_body(self, req: Request) -> None:
        """The client owes the rest of `req`'s body: it has t_body for its next bytes, and the
        exchange as a whole its request timeout (nginx's client_body_timeout, per read)."""
        svc = req.svc
        self.deadline = min(clock() + svc.t_body, req.ts + svc.t_request)
        self.dkind = D_BODY

    def waiting_since(self) -> float:
        """When this connection began to wait on its client (a head, a body, the next request),
        or inf if it does not (an exchange with a real server, a tunnel, closing): the deadlines
        above, read backwards (for eviction at max_connections, admission.py)."""
        if self.closed or self.closing or self.eof:
            return inf
        kind = self.dkind
        svc = self.listener.service
        if kind == D_IDLE:
            return self.deadline - svc.t_idle
        if kind == D_IDLE_HELD:
            return self.deadline - svc.t_hold
        if kind == D_HEAD and self.cur is None:
            return self.deadline - svc.t_head
        if kind == D_BODY:
            return self.deadline - svc.t_body
        return inf

    # -- the end of a request -----------------------------------------------------------------

    def _release(self, req: Request, ok: bool) -> None:
        """`req` no longer holds the real server it was picked for (`ok`: it did not fail there):
        every pick() is matched here, once."""
        backend = req.backend
        if backend is not None:
            req.backend = None
            target = req.target
            if target is not None and target.balancer is not None:
                target.balancer.release(backend, ok)

    def _drop_upstream(self, req: Request) -> None:
        """Give up `req`'s exchange with its real server: the connection is aborted (never
        reused: a response may be under way)."""
        up = req.up
        req.up = None
        if up is not None and up.req is req:
            up.abandon()

    def _record(self, req: Request, end: float) -> None:
        """Count a finished request and write its access-log line: the one place for every path
        (relayed, answered locally, refused, cut). Latency, bytes and the status code go to its
        real server (or pool, or VS): one object per figure, and stats() adds the levels up.
        It ended at `end` (clock.py)."""
        svc = req.svc
        target = req.target
        dt = end - req.ts
        server = req.server
        srv: Traffic = server or (target.counters if target is not None else svc.counters)
        srv.lat[latency_slot(dt)] += 1
        srv.lat_sum += dt
        srv.codes[req.status] += 1
        nread = self.nread
        nin = nread - self.nmark
        srv.bytes_in += nin
        self.nmark = nread
        srv.bytes_out += req.hlen + req.resp_bytes
        log = svc.log
        if log is not None:
            if (self.log_svc is not svc or self.log_target is not target
                    or self.log_server is not server):
                # The constant part of this connection's lines, remade when what it names does
                # (and by the log of its Service, whose format it is made for).
                self.log_svc = svc
                self.log_target = target
                self.log_server = server
                self.log_prefix = log.prefix(
                    svc.name, target.name if target is not None else "-",
                    str(server.address) if server is not None else "-", req.src_ip,
                    None if log.plain else self._tls_version())
            if log.plain:
                log.entry(self.log_prefix, req.method_b, req.url, req.status, req.resp_bytes,
                          req.ts, end, CUT if req.cut else b"")
            else:
                log.request(self.log_prefix, req, nin, end)

    def _tls_version(self) -> str | None:
        """The TLS version of this connection ("TLSv1.3"), None for plain HTTP."""
        ssl_object = self.transport.get_extra_info("ssl_object")
        return ssl_object.version() if ssl_object is not None else None
