"""The client side of the relay: one asyncio.Protocol per accepted connection.

Requests are parsed by httptools in callbacks; each one is routed, balanced and relayed over a
pooled upstream connection without a Task or Future. Pipelined requests queue behind the one in
flight (reading pauses while any wait) and are answered in order. Deadlines are plain floats checked
by the listener's periodic sweep (no timer handle per request).

Strict HTTP/1.1 (RFC 9112), enforced here and by llhttp (strict mode): a malformed or ambiguous
request is answered and the connection closed; nothing of it is forwarded. 400 for: Content-Length
with Transfer-Encoding, several or malformed Content-Lengths, a Transfer-Encoding other than one
lone "chunked" (unknown codings, chunked not last, two fields, chunked in HTTP/1.0), obs-fold,
whitespace before a colon, bare CR or LF, bad chunk sizes or extensions, NUL/control bytes in the
request line or fields, several Host fields or one that is not host[:port], HTTP/1.1 without Host,
an absolute-form target whose authority differs from Host (an agreeing one goes upstream in
origin-form), "*" with a method other than OPTIONS, unknown methods; 405 for CONNECT; 505 for
versions other than HTTP/1.0 and 1.1. Fields go upstream rebuilt as "Name: value" CRLF (the
request line always HTTP/1.1); responses are checked by llhttp too (upstream.py).

Hop-by-hop fields (RFC 9110 §7.6.1) are dropped, and so are the fields a Connection header names,
except Content-Length, Transfer-Encoding and Host: what frames or routes a message is never
removed because a peer named it (the name is ignored; the same in responses). Upgrade: h2c is never
relayed (the request goes on without it and the connection closes after the response), nor is any
upgrade offered on a request with a body (its body is relayed as any other); a 101 to a request that
asked for no upgrade is a bad response (502).

Limits (per VS in [vs.limits] / [vs.timeouts]; the answer; the stats() counter in
`limit_rejections`):
- request line + fields, 16 KiB in total (max_header_bytes, like HAProxy's bufsize): 431 + close;
  header_too_large
- fields, 100 (max_headers): 431 + close; too_many_headers
- request body (max_body, 0 = none; streamed, never buffered): 413 + close (from Content-Length
  before anything is forwarded, or mid-body: the upstream exchange is aborted); body_too_large
- connections per listener, 10 000 (max_connections): 503 + close at once, nothing read;
  max_connections (but see eviction below)
- head, 10 s from the connection (or from the end of the previous response when the next head had
  begun by then, or else from its first byte after a keep-alive wait) to the end of the head (not
  extended by trickled bytes: slowloris): 408 + close; head_timeout
- idle keep-alive, 60 s: close; idle_timeout
- request body, 30 s between two reads (body; nginx's client_body_timeout): 408 + close, the
  upstream exchange aborted; body_timeout. A half-close before the body's end: 400 + close, the
  same; body_incomplete
- at max_connections, the connection that has waited longest on its client (idle keep-alive, a
  head or a body that stopped coming) is closed (408 when a head or body was pending) to make room;
  evicted. Only when every connection is busy with a real server does a new one get the 503.
- upstream connect, 3 s: another real server for an idempotent method, else 502; upstream_timeout
- upstream first byte, 30 s after the whole request went out: 504 (close if the body was not
  read whole); upstream_timeout
- whole request, 300 s from its first byte: 408 (upload stalled) or 504 (response not started)
  + close, or abort mid-response; request_timeout
- malformed (above): 400/405/505 + close; bad_request. A fail-on-match rule: 403 + close;
  refused_by_rule.
"""

from __future__ import annotations

import asyncio
import logging
from bisect import bisect_left
from collections import deque
from math import inf
from typing import TYPE_CHECKING, Any, cast

import httptools

from ..config.model import BODY_MATCH_LIMIT
from ..routing import MEMO_URL, REFUSE
from . import http as h
from .accesslog import CUT, line_prefix
from .http import CRLF, ERRORS, LocalResponse, Request
from .service import (
    FAST_DIRECT,
    LATENCY_BUCKETS,
    M_DIRECT,
    M_REDIRECT,
    M_SWITCH,
    ROUTE_MEMO_SIZE,
)
from .upstream import HIGH_WATER, LOW_WATER, UpstreamConnection

if TYPE_CHECKING:
    from .service import Listener, Service, Target, Traffic

logger = logging.getLogger(__name__)

# Why reading from the client is paused (a bit mask: reading resumes when all are clear).
P_PIPELINE = 1  # requests are queued behind the one in flight
P_BUFFER = 2  # request body buffered while no upstream connection is ready yet
P_UPSTREAM = 4  # the upstream connection's write buffer is above the high-water mark
P_WRITE = 8  # our own write buffer to the client is above the high-water mark
P_UPGRADE = 16  # an Upgrade request waits for the real server's 101
P_STOP = 32  # no more requests are read on this connection

# What the connection's single deadline means when it passes.
D_NONE = 0
D_HEAD = 1  # reading a request head -> 408
D_IDLE = 2  # keep-alive idle -> close
D_FIRST_BYTE = 3  # waiting for the response head -> 504
D_TUNNEL = 4  # an idle WebSocket/Upgrade tunnel -> close
D_REQUEST = 5  # a whole exchange took too long (a stalled upload or download) -> 408/504/abort
D_BODY = 6  # reading a request body: no bytes for t_body (or the whole exchange too long) -> 408

_CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"
# The status logged for a request whose client went away before any response (nginx's 499).
CLIENT_CLOSED = 499


class _Reject(Exception):
    """Raised inside a parser callback to stop parsing; the status is in ClientConnection.reject."""


class ClientConnection(asyncio.Protocol):
    __slots__ = (
        "clen", "closed", "closing", "conn_extra", "cur", "deadline", "dkind", "eof", "feeding",
        "head_bytes", "host_ok", "hstart", "in_head", "ip_b", "listener", "log_prefix",
        "log_server", "log_svc", "log_target", "loop", "nmark", "nread", "out", "out_up", "outbox",
        "parser",
        "paused", "pending_error", "queue", "raw", "reject", "reject_key", "req", "running",
        "src_ip", "transport", "tunnel", "upgraded", "write_paused", "xff_b")

    def __init__(self, listener: Listener[ClientConnection]) -> None:
        self.listener = listener
        self.loop = listener.loop
        self.outbox = listener.outbox
        self.transport: asyncio.Transport = None  # type: ignore[assignment]
        self.parser: Any = httptools.HttpRequestParser(self)
        self.src_ip = ""
        self.ip_b = b""
        # The access-log line prefix of the last request and what it was made of (by identity).
        self.log_prefix = b""
        self.log_svc: object = None
        self.log_target: object = None
        self.log_server: object = None
        self.xff_b = b""
        self.req: Request | None = None  # being parsed
        self.cur: Request | None = None  # being answered
        self.queue: deque[Request] = deque()
        self.paused = 0
        self.write_paused = False
        self.closing = False
        self.closed = False
        self.eof = False  # the client half-closed: answer what it sent whole, then close
        self.deadline = inf
        self.dkind = D_NONE
        self.feeding = False
        self.out_up: UpstreamConnection | None = None
        self.out: list[bytes] = []
        self.tunnel: UpstreamConnection | None = None
        self.upgraded = False
        self.raw: list[bytes] = []
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

    # -- asyncio.Protocol ---------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports do not subclass asyncio.Transport; they implement it.
        transport = cast(asyncio.Transport, transport)
        self.transport = transport
        listener = self.listener
        svc = listener.service
        if listener.closing or (len(listener.conns) >= svc.max_connections
                                and not _make_room(listener)):
            self.closed = True
            listener.counters.refused += 1
            if listener.closing:
                transport.abort()
                return
            # Over the limit: a 503 the client and the operator can read rather than a reset
            # (one write and a close; nothing of the connection is read).
            listener.counters.limits["max_connections"] += 1
            transport.write(ERRORS[503].close_full)
            transport.close()
            return
        listener.conns.add(self)
        listener.counters.connections += 1
        transport.set_write_buffer_limits(HIGH_WATER, LOW_WATER)
        peer = transport.get_extra_info("peername")
        self.src_ip = peer[0] if peer else ""
        self.ip_b = self.src_ip.encode("latin-1")
        self.xff_b = b"X-Forwarded-For: " + self.ip_b + CRLF
        self.deadline = self.loop.time() + svc.t_head
        self.dkind = D_HEAD

    def connection_lost(self, exc: Exception | None) -> None:
        if self.closed and self not in self.listener.conns:
            return
        self.closed = True
        listener = self.listener
        listener.conns.discard(self)
        if listener.closing and not listener.conns:
            listener.drained.set()
        tunnel, self.tunnel = self.tunnel, None
        if tunnel is not None:
            tunnel.close()
        cur = self.cur
        if cur is not None:
            up = cur.up
            if isinstance(up, UpstreamConnection) and up.req is cur:
                up._detach()
                up.abort()
            self._release(cur, True)
            cur.discard = True
            if not cur.resp_started:
                cur.status = CLIENT_CLOSED
            self._finish_cut(cur)  # logged, marked as cut
            self.cur = None
        self.queue.clear()

    def eof_received(self) -> bool | None:
        req = self.req
        if req is not None:
            # A request cut short by the half-close: its head or body can never end.
            self.req = None
            if req is self.cur and req.started and not req.discard:
                logger.info("VS %s: client %s closed before its request body ended",
                            self.listener.name, self.src_ip)
                self._cut(req, 400, "body_incomplete")
                return True
            if self.queue and self.queue[-1] is req:
                self.queue.pop()
        # A client that half-closes after sending whole requests still gets their answers.
        if self.cur is not None or self.queue:
            self.eof = True
            self.paused |= P_STOP  # nothing more to read (and the transport need not be told)
            return True
        self.outbox.flush()  # the transport closes on return: held answers go out first
        return False

    def pause_writing(self) -> None:
        self.write_paused = True
        self.pause(P_WRITE)
        up = self.tunnel
        if up is None and self.cur is not None:
            up = self.cur.up  # type: ignore[assignment]
        if up is not None:
            up.pause_reading()

    def resume_writing(self) -> None:
        self.write_paused = False
        self.resume(P_WRITE)
        up = self.tunnel
        if up is None and self.cur is not None:
            up = self.cur.up  # type: ignore[assignment]
        if up is not None:
            up.resume_reading()

    def data_received(self, data: bytes) -> None:
        tunnel = self.tunnel
        if tunnel is not None:
            tunnel.write(data)
            self.deadline = self.loop.time() + self.listener.service.t_idle
            return
        if self.req is None:
            self.hstart = self.nread  # the next request head starts in `data` or later
        self.nread += len(data)
        if self.upgraded or self.paused & P_STOP:
            if self.upgraded and not self.paused & P_STOP:
                self.raw.append(data)
                self.pause(P_UPGRADE)
            return
        self.feeding = True
        try:
            try:
                self.parser.feed_data(data)
            except httptools.HttpParserUpgrade as e:
                req = self.req
                if req is None or not req.rebody:
                    raise
                # llhttp reads all that follows an Upgrade request's head as the new protocol's;
                # this upgrade was dropped (h2c), so its body and what follows go to a parser that
                # never saw it, after a head of our own that frames the body the same way.
                rest = data[e.args[0]:]
                self.parser = httptools.HttpRequestParser(_Rebody(self))
                data = _rebody_head(req, self.clen) + rest
                self.parser.feed_data(data)
        except httptools.HttpParserUpgrade as e:
            self.feeding = False
            if self.out:
                self._flush_out()  # the upgrade request's own head and body go out first
            rest = data[e.args[0]:]
            self.upgraded = True
            if rest:
                self.raw.append(rest)
            self.pause(P_UPGRADE)
        except httptools.HttpParserError as e:
            status = self.reject or 400
            key = self.reject_key or _LIMIT_OF[status]
            self.reject = 0
            self.reject_key = ""
            if status == 400:
                logger.debug("bad request from %s: %s", self.src_ip, e)
            self.feeding = False
            if self.req is not None and self.req is self.cur:
                # Bytes coalesced for the upstream of the bad request itself: never sent.
                self.out = []
                self.out_up = None
            else:
                self._flush_out()  # those of an earlier, good request
            self._bad(status, key)
            return
        self.feeding = False
        if self.out:
            self._flush_out()
        if self.in_head:
            self.head_bytes += len(data)
            if self.head_bytes > self.listener.service.max_header_bytes:
                self._bad(431, "header_too_large")
        elif self.req is not None:
            req = self.req
            if req is self.cur or req.discard:
                self._await_body(req)  # a body being read: the client has t_body for more

    def _write(self, data: bytes) -> None:
        """Write to the client now, after whatever the outbox holds (the order of the bytes)."""
        self.outbox.write(self.transport, data)

    def _close(self) -> None:
        """Close the client connection once what is written and held has gone out."""
        self.outbox.close(self.transport)

    # -- deadlines (called by the listener's sweep) -------------------------------------------

    def on_timeout(self, now: float) -> None:
        kind = self.dkind
        self.deadline = inf
        self.dkind = D_NONE
        cur = self.cur
        limits = self.listener.counters.limits
        if kind == D_FIRST_BYTE and cur is not None:
            limits["upstream_timeout"] += 1
            up = cur.up
            if isinstance(up, UpstreamConnection) and up.req is cur:
                up._detach()
                up.abort()
            cur.up = None
            logger.warning("VS %s: real server %s did not answer in time", self.listener.name,
                           _server(cur))
            self._release(cur, False)
            if cur.resp_started:
                self._abort_mid_response(cur)
            else:
                self._local(cur, ERRORS[504], close=not cur.complete)
        elif kind == D_REQUEST and cur is not None:
            self._cut(cur, 504 if cur.complete else 408, "request_timeout")
        elif kind == D_BODY:
            req = self.req
            svc = self.listener.service
            if req is None or req.complete:
                self._close()
            elif now >= req.t0 + svc.t_request:
                if req is cur:
                    self._cut(req, 408, "request_timeout")
                else:
                    limits["request_timeout"] += 1
                    self._close()
            elif self.paused & (P_UPSTREAM | P_BUFFER | P_WRITE):
                self._await_body(req)  # we are not reading: the client is not the one late
            else:
                logger.info("VS %s: client %s sent no request body bytes for %gs",
                            self.listener.name, self.src_ip, svc.t_body)
                if req is cur:
                    self._cut(req, 408, "body_timeout")
                else:  # answered already; the rest of its body was being discarded
                    limits["body_timeout"] += 1
                    self._close()
        elif kind == D_HEAD and cur is None:
            self._bad(408, "head_timeout")
        elif kind in (D_IDLE, D_TUNNEL, D_HEAD):
            limits["head_timeout" if kind == D_HEAD else "idle_timeout"] += 1
            self._close()

    def _cut(self, req: Request, status: int, key: str) -> None:
        """End the exchange of `req` (the one being answered) early: its upstream connection is
        aborted; the client gets `status` and a close, or an abort if its response had begun."""
        self.listener.counters.limits[key] += 1
        up = req.up
        if isinstance(up, UpstreamConnection) and up.req is req:
            up._detach()
            up.abort()
        req.up = None
        self._release(req, True)
        if self.req is req:
            self.req = None
        if req.resp_started:
            self._abort_mid_response(req)
        else:
            self._local(req, ERRORS[status], close=True)

    def _abort_mid_response(self, req: Request) -> None:
        """The response to `req` cannot be finished: log it as cut and abort the connection."""
        self._finish_cut(req)
        self.pause(P_STOP)
        self.transport.abort()

    def _finish_cut(self, req: Request) -> None:
        """Count and log a request whose response did not go out whole (marked in the log)."""
        if req.cut:
            return
        req.cut = True
        self._record(req)
        if req is self.cur:
            self.cur = None

    def evict(self) -> None:
        """Close this connection, which waits on its client, to make room for a new one (it no
        longer counts toward max_connections from now on)."""
        self.listener.conns.discard(self)
        self.listener.counters.limits["evicted"] += 1
        req = self.req
        kind = self.dkind
        self.deadline = inf
        self.dkind = D_NONE
        if kind == D_BODY and req is not None and req is self.cur:
            self.listener.counters.limits["evicted"] -= 1  # counted once, by _cut
            self._cut(req, 408, "evicted")
        elif kind == D_HEAD and self.in_head:
            self.pause(P_STOP)
            self.closing = True
            self.req = None
            self._write_error_and_close(408)
        else:
            self.pause(P_STOP)
            self._close()

    def touch(self) -> None:
        self.deadline = self.loop.time() + self.listener.service.t_idle

    def shutdown(self) -> None:
        """Stop reading new requests: close now if idle, else after the response in flight."""
        self.closing = True
        if self.cur is None and not self.queue and self.tunnel is None and not self.in_head:
            self._close()

    # -- flow control -------------------------------------------------------------------------

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

    # -- httptools callbacks ------------------------------------------------------------------

    def on_url(self, url: bytes) -> None:
        req = self.req
        if req is not None:  # the URL arrived in pieces
            req.url += url
            return
        # The first callback of a request (cheaper than a separate on_message_begin).
        now = self.loop.time()
        svc = self.listener.service
        self.req = Request(svc, self.src_ip, now, url)
        self.in_head = True
        self.clen = b""
        self.conn_extra = None
        if self.cur is None and self.dkind == D_IDLE:
            # A request after a keep-alive wait: its head has t_head from its first byte (nginx's
            # keepalive_timeout, then client_header_timeout). The first head of a connection, or
            # one begun before the previous response ended, keeps the deadline set then.
            self.deadline = now + svc.t_head
            self.dkind = D_HEAD

    def on_header(self, name: bytes, value: bytes) -> None:
        req = self.req
        assert req is not None
        code = h.SPECIAL.get(name.lower())
        if code is None:
            req.fwd += (name, b": ", value, CRLF)
            return
        if code == h.H_HOST:
            # Several Host fields, or one that is not a host[:port]: 400. A keep-alive client
            # repeats its Host: the last good one is not checked again.
            if req.host_b or (value != self.host_ok and (
                    value.translate(None, h.HOST_CHARS) or not value)):
                self.reject = 400
                raise _Reject
            self.host_ok = value
            req.host_b = value
            req.fwd += (name, b": ", value, CRLF)
            return
        if code == h.H_CLEN:
            self.clen = value
            req.fwd += (name, b": ", value, CRLF)
            return
        # The fields below are rebuilt or dropped, so not in `fwd` as they came: they still count
        # toward the limits (their number, and their bytes as name ": " value CRLF).
        req.hidden += 1
        req.hidden_bytes += len(name) + len(value) + 4
        if code == h.H_TE:
            # Only a lone "chunked" (RFC 9112 §6.1): we decode no other coding, and llhttp has
            # already refused one whose final coding is not chunked, and a second field.
            if req.chunked or value.rstrip(b" \t").lower() != b"chunked":
                self.reject = 400
                raise _Reject
            req.chunked = True
        elif code == h.H_CONNECTION:
            # Not None once a Connection field was seen; holds the field names it lists, less
            # those that frame or route the message (never removed, whoever names them).
            if self.conn_extra is None:
                self.conn_extra = []
            self.conn_extra += h.connection_names(value)
        elif code == h.H_UPGRADE:
            # The protocols offered, less those never relayed (h2c); several fields form a list.
            offered = [t.strip(b" \t") for t in value.split(b",")]
            kept = b", ".join(t for t in offered if t and t.lower() not in h.NO_UPGRADE)
            if req.upgrade_b and kept:
                req.upgrade_b += b", " + kept
            elif kept:
                req.upgrade_b = kept
        elif code == h.H_EXPECT:
            if value.lower() == b"100-continue":
                req.expect = True
            else:
                _as_is(req, name, value)
        elif code == h.H_XFF:
            if self.listener.service.add_forwarded:
                req.xff = req.xff + b", " + value if req.xff else value
            else:
                _as_is(req, name, value)
        elif code == h.H_XFP or code == h.H_XFH:
            if not self.listener.service.add_forwarded:
                _as_is(req, name, value)
        # H_HOP: dropped

    def on_headers_complete(self) -> None:
        req = self.req
        assert req is not None
        svc: Service = req.svc  # type: ignore[assignment]
        p = self.parser
        self.in_head = False
        self.head_bytes = 0
        req.keep_alive = ka = p.should_keep_alive()
        req.method_b = m = p.get_method()
        req.is_head = m == b"HEAD"
        if not ka or self.conn_extra is not None or req.upgrade_b:
            # Only then can it be HTTP/1.0 (which keeps alive only when asked), an Upgrade, or
            # another version (llhttp takes 0.9 and 2.0; their keep-alive works like 1.0's).
            version = p.get_http_version()
            if version != "1.1" and version != "1.0":
                self.reject = 505
                raise _Reject
            req.v10 = version == "1.0"
            req.upgrade = p.should_upgrade()
            if req.upgrade and not req.upgrade_b:
                # Only protocols we never relay were offered (h2c): a plain request upstream.
                # llhttp reads what follows as the new protocol's, so the connection ends with
                # the response (the client then speaks HTTP/1.1 on a new one).
                req.upgrade = False
                req.keep_alive = False
        fwd = req.fwd
        fwd[0] = m
        url = req.url
        if m == b"CONNECT":
            self.reject = 405
            raise _Reject
        if url[0] != 47:  # not origin-form ("/..."): the rare shapes are checked off the fast path
            self._check_target(req, url)
        fwd[2] = req.url
        if len(fwd) + 4 * req.hidden > svc.max_fwd:
            self.reject = 431
            self.reject_key = "too_many_headers"
            raise _Reject
        # The head began at `hstart` or later: fewer bytes read since cannot make it too big.
        if (self.nread - self.hstart > svc.max_header_bytes
                and sum(map(len, fwd)) + req.hidden_bytes > svc.max_header_bytes):
            self.reject = 431
            raise _Reject
        if not req.host_b and p.get_http_version() != "1.0":
            self.reject = 400  # RFC 9112 §3.2: an HTTP/1.1 request without Host
            raise _Reject
        clen = self.clen
        if (clen and clen != b"0") or req.chunked:
            req.has_body = True
            if req.chunked and p.get_http_version() != "1.1":
                self.reject = 400  # RFC 9112 §6.1: chunked framing is HTTP/1.1 only
                raise _Reject
        if svc.max_body and clen and int(clen) > svc.max_body:
            self.reject = 413
            raise _Reject
        if req.has_body and p.should_upgrade():
            # An upgrade offered on a request with a body (WebSocket's is a GET; h2c from curl
            # on a POST): declined, as for h2c. The request goes upstream without it, its body
            # read as any other (llhttp would take it for the new protocol's bytes), and the
            # connection ends with the response.
            req.upgrade = False
            req.upgrade_b = b""
            req.keep_alive = False
            req.rebody = 1
        if self.conn_extra:
            self._drop_connection_fields(req, self.conn_extra)
        if self.cur is None and not self.queue:
            self.cur = req
            fast = svc.fast
            if fast:
                # _start(), inlined for the two common kinds of VS.
                req.started = True
                svc.counters.requests += 1
                if fast == FAST_DIRECT:
                    self._serve(req, svc.direct, None)  # type: ignore[arg-type]
                else:
                    self._route_now(req)
            else:
                self._start(req)
        else:
            self.queue.append(req)
            self.pause(P_PIPELINE)

    def _check_target(self, req: Request, url: bytes) -> None:
        """The request target is not origin-form: "*" (OPTIONS only) or absolute-form, whose
        authority must agree with Host (RFC 9112 §3.2.2); it goes upstream as origin-form."""
        if url == b"*":
            if req.method_b != b"OPTIONS":
                self.reject = 400
                raise _Reject
            return
        m = h.ABSOLUTE_FORM.fullmatch(url)
        if m is None or m.group(2).lower() != req.host_b.lower():
            self.reject = 400
            raise _Reject
        path = m.group(3) or b"/"
        req.url = b"/" + path if path[0] == 63 else path  # 63 = "?"

    def on_body(self, data: bytes) -> None:
        req = self.req
        assert req is not None
        req.body_bytes += len(data)
        max_body = req.svc.max_body  # type: ignore[attr-defined]
        if max_body and req.body_bytes > max_body:
            self.reject = 413
            raise _Reject
        if req.discard:
            return
        up = req.up
        if up is not None:
            if req.chunked:
                self._up_send(up, b"%x\r\n%b\r\n" % (len(data), data))  # type: ignore[arg-type]
            else:
                self._up_send(up, data)  # type: ignore[arg-type]
            return
        req.chunks.append(data)
        req.buffered += len(data)
        if req.buffered > HIGH_WATER:
            self.pause(P_BUFFER)
        if req.waiting_route and req.buffered >= BODY_MATCH_LIMIT:
            self._route_now(req)

    def on_message_complete(self) -> None:
        req = self.req
        assert req is not None
        if req.rebody == 1:
            req.rebody = 2  # llhttp ends an Upgrade request at its head: the body is still to come
            return
        self.req = None
        req.complete = True
        if req.discard:
            return
        up = req.up
        if up is not None:
            if req.chunked:
                self._up_send(up, b"0\r\n\r\n")  # type: ignore[arg-type]
            if self.dkind in (D_REQUEST, D_BODY) and req is self.cur and not req.resp_started:
                # The body went out whole: now the real server has first_byte to answer.
                self.deadline = self.loop.time() + req.svc.t_first_byte  # type: ignore[attr-defined]
                self.dkind = D_FIRST_BYTE
        elif req.waiting_route:
            self._route_now(req)
        if not req.keep_alive:
            self.pause(P_STOP)

    # -- dispatch -----------------------------------------------------------------------------

    def _start(self, req: Request) -> None:
        req.started = True
        svc: Service = req.svc  # type: ignore[assignment]
        svc.counters.requests += 1
        pre = svc.pre_router
        if pre is not None:
            idx = pre.route(req)
            if idx >= 0:
                self._serve(req, svc.pre_targets[idx], None)
                return
        mode = svc.mode
        if mode == M_DIRECT:
            target = svc.direct
            assert target is not None
            self._serve(req, target, None)
        elif mode == M_SWITCH:
            if svc.router.needs_body and not req.complete:
                req.waiting_route = True
                if req.expect and not req.v10:
                    req.sent_continue = True
                    self._write(_CONTINUE)
                return
            self._route_now(req)
        elif mode == M_REDIRECT:
            self._redirect(req, svc)
        else:  # M_ORDERED: the first SubVS with an available real server
            for t in svc.targets:
                bal = t.balancer
                if bal is not None and bal.any_available():
                    self._serve(req, t, None)
                    return
            self._local(req, svc.na)

    def _route_now(self, req: Request) -> None:
        req.waiting_route = False
        svc: Service = req.svc  # type: ignore[assignment]
        router = svc.router
        if router.needs_body and req.chunks:
            body = b"".join(req.chunks)
            req.body = body[:BODY_MATCH_LIMIT]
        # router.route() split in two to count the deciding rule (route_with_rule without the
        # tuple): the index of the rule, then its outcome. A decision that is a function of the
        # request target alone is remembered.
        memo_by = router.memo_by
        if memo_by:
            key: object = req.url if memo_by == MEMO_URL else (req.host_b.lower(), req.url)
            memo = svc.memo
            i = memo.get(key, -1)
            if i < 0:
                i = router.decide(req)
                if len(memo) >= ROUTE_MEMO_SIZE:
                    memo.clear()
                memo[key] = i
        else:
            i = router.decide(req)
        svc.rule_hits[i] += 1
        idx = router.outcomes[i]
        if idx >= 0:
            self._serve(req, svc.targets[idx], None)
        elif idx == REFUSE:
            svc.counters.limits["refused_by_rule"] += 1
            self._local(req, ERRORS[403], close=True)
        else:
            self._local(req, svc.na)

    def _serve(self, req: Request, target: Target, exclude: Any) -> None:
        req.target = target
        bal = target.balancer
        if bal is None:
            target.counters.not_available += 1
            self._local(req, target.na)
            return
        url = req.url.decode("latin-1") if target.needs_url else ""
        # Balancer.pick(), inlined: the scheduler's choice, counted.
        backend = bal.choose(self.src_ip, url, exclude)
        if backend is not None:
            backend.active += 1
            backend.requests += 1
        else:
            if exclude is not None:  # a retry found no other server: the failure stands
                self._local(req, ERRORS[502], close=not req.complete)
                return
            target.counters.not_available += 1
            self._local(req, target.na)
            return
        req.backend = backend
        srv = target.pools[backend]
        req.server = srv  # counts the request; its address, preformatted, names it in logs
        pool = srv.cp
        if not req.head:
            req.head = self._build_head(req)
        idle = pool.idle
        if idle and idle[-1].idle_since >= req.t0 - pool.idle_timeout:
            up: UpstreamConnection | None = idle.pop()
            up.reused = True  # type: ignore[union-attr]
        else:
            up = pool.acquire(req.t0)
        if up is not None:
            t = up.transport
            if not req.has_body and not req.expect and t is not None and not self.write_paused:
                # The fast path: a pooled connection and a request without a body.
                req.up = up
                up.client = self
                up.ctransport = self.transport
                up.req = req
                up.want_head = True
                up.status = 0
                self.outbox.add(t, req.head)
                self.deadline = req.t0 + req.svc.t_first_byte  # type: ignore[attr-defined]
                self.dkind = D_FIRST_BYTE
            else:
                self.attach(req, up)
        else:
            pool.connect(self, req, req.svc.t_connect)  # type: ignore[attr-defined]

    def _build_head(self, req: Request) -> bytes:
        svc: Service = req.svc  # type: ignore[assignment]
        parts = req.fwd
        if svc.add_forwarded:
            if req.xff:
                parts += (b"X-Forwarded-For: ", req.xff, b", ", self.ip_b, CRLF)
            else:
                parts.append(self.xff_b)
            parts.append(svc.xfp_line)
            if req.host_b:
                parts += (b"X-Forwarded-Host: ", req.host_b, CRLF)
        if not req.host_b:
            # An HTTP/1.0 request without Host goes out as HTTP/1.1, which requires one.
            parts.append(f"Host: {req.backend.address}\r\n".encode())  # type: ignore[attr-defined]
        if req.chunked:
            parts.append(b"Transfer-Encoding: chunked\r\n")
        if req.upgrade:
            parts += (b"Connection: upgrade\r\nUpgrade: ", req.upgrade_b, CRLF)
        parts.append(CRLF)
        return b"".join(parts)

    @staticmethod
    def _drop_connection_fields(req: Request, names: list[bytes]) -> None:
        drop = set(names)
        old = req.fwd
        fwd = old[:4]
        for i in range(4, len(old) - 3, 4):
            if old[i].lower() not in drop:
                fwd += old[i:i + 4]
        req.fwd = fwd

    def attach(self, req: Request, up: UpstreamConnection) -> None:
        """Send `req` on `up` (pooled or just connected)."""
        if self.closed or req is not self.cur:
            up.pool.release(up, self.loop.time())
            self._release(req, True)
            return
        req.up = up
        up.start(self, req)
        if req.expect and not req.sent_continue and not req.v10 and not req.complete:
            req.sent_continue = True
            self._write(_CONTINUE)
        data = req.head
        chunks = req.chunks
        if chunks:
            parts = [data]
            if req.chunked:
                for c in chunks:
                    parts += (b"%x\r\n" % len(c), c, CRLF)
            else:
                parts += chunks
            req.chunks = []
            req.buffered = 0
            if req.complete and req.chunked:
                parts.append(b"0\r\n\r\n")
            data = b"".join(parts)
            self.resume(P_BUFFER)
        elif req.complete and req.chunked:
            data += b"0\r\n\r\n"
        self._up_send(up, data)
        if req.complete:
            self.deadline = self.loop.time() + req.svc.t_first_byte  # type: ignore[attr-defined]
            self.dkind = D_FIRST_BYTE
        else:
            # The first-byte wait starts once the whole request went out (on_message_complete);
            # until then the client has t_body between reads, within the request timeout.
            self._await_body(req)

    def _await_body(self, req: Request) -> None:
        """The client owes the rest of `req`'s body: it has t_body for its next bytes, and the
        exchange as a whole its request timeout (nginx's client_body_timeout, per read)."""
        svc: Service = req.svc  # type: ignore[assignment]
        self.deadline = min(self.loop.time() + svc.t_body, req.t0 + svc.t_request)
        self.dkind = D_BODY

    def _up_send(self, up: UpstreamConnection, data: bytes) -> None:
        if self.feeding:
            if self.out_up is not up:
                self._flush_out()
                self.out_up = up
            self.out.append(data)
        else:
            up.write(data)

    def _flush_out(self) -> None:
        out = self.out
        up = self.out_up
        self.out_up = None
        if out:
            self.out = []
            if up is not None:
                up.write(out[0] if len(out) == 1 else b"".join(out))

    def first_byte(self, req: Request) -> None:
        if req is self.cur:
            # The response streams now, bounded by the request timeout as a whole.
            self.deadline = req.t0 + req.svc.t_request  # type: ignore[attr-defined]
            self.dkind = D_REQUEST

    # -- answers ------------------------------------------------------------------------------

    def _local(self, req: Request, resp: LocalResponse, close: bool = False) -> None:
        keep = req.keep_alive and not close and not self.closing
        if keep and not req.complete and req.expect and not req.sent_continue:
            keep = False  # the client waits for 100 before sending a body we never asked for
        req.keep_alive = keep
        if req.is_head:
            data = (resp.keep10 if req.v10 else resp.keep) if keep else resp.close
            req.hlen = len(data)
        elif keep:
            data = resp.keep_full if not req.v10 else resp.keep10 + resp.body
            req.resp_bytes = len(resp.body)
            req.hlen = len(data) - req.resp_bytes
        else:
            data = resp.close_full
            req.resp_bytes = len(resp.body)
            req.hlen = len(data) - req.resp_bytes
        req.status = resp.status
        req.resp_started = True
        self.outbox.add(self.transport, data)  # held like a relayed response (outbox.py)
        self._finish(req)

    def _redirect(self, req: Request, svc: Service) -> None:
        host = req.host_b.decode("latin-1")
        hostname, port = _split_host(host, svc.port)
        url = req.url.decode("latin-1")
        try:
            location = svc.redirect_to.format(host=host, hostname=hostname, port=port, path=url)
        except (KeyError, IndexError, ValueError):
            self._local(req, ERRORS[500])
            return
        if "\r" in location or "\n" in location:
            self._local(req, ERRORS[400], close=True)
            return
        resp = LocalResponse(svc.redirect_status, b"", "", (("Location", location),))
        self._local(req, resp)

    def response_done(self, req: Request) -> None:
        """The real server's answer went out whole (the per-request fast path, inlined)."""
        backend = req.backend
        if backend is not None:
            req.backend = None
            # Balancer.release(backend), inlined: a pick() is always matched here.
            backend.active -= 1  # type: ignore[attr-defined]
        svc: Service = req.svc  # type: ignore[assignment]
        now = self.loop.time()
        # _account(), inlined: the hot path.
        dt = now - req.t0
        tc = req.target.counters  # type: ignore[attr-defined]
        # Most answers take under a millisecond: the first bucket without a bisect.
        tc.lat[0 if dt <= 0.001 else bisect_left(LATENCY_BUCKETS, dt)] += 1
        tc.lat_sum += dt
        srv = req.server
        srv.resp[req.status // 100] += 1  # type: ignore[attr-defined]
        nread = self.nread
        srv.bytes_in += nread - self.nmark  # type: ignore[attr-defined]
        self.nmark = nread
        srv.bytes_out += req.hlen + req.resp_bytes  # type: ignore[attr-defined]
        log = svc.log
        if log is not None:
            # _log_access(), inlined.
            target = req.target
            if self.log_svc is not svc or self.log_target is not target or (
                    self.log_server is not srv):
                self._log_prefix(svc, req)
            log.entry(self.log_prefix, req.method_b, req.url, req.status, req.resp_bytes, req.t0,
                      now)
        if req is self.cur:
            self.cur = None
        if (self.paused or not req.keep_alive or self.closing or not req.complete or self.queue
                or self.in_head):
            self._finish_slow(req)
            return
        self.deadline = now + svc.t_idle
        self.dkind = D_IDLE

    def _record(self, req: Request) -> None:
        """Count a finished request and write its access-log line (response_done inlines both for
        the per-request fast path)."""
        now = self.loop.time()
        self._account(req, now)
        svc: Service = req.svc  # type: ignore[assignment]
        if svc.log is not None:
            _log_access(self, svc, req, now)

    def _account(self, req: Request, now: float) -> None:
        """Count a finished request: latency in its pool (or VS), bytes and status class in its
        real server (or pool, or VS). One object per figure; stats() adds the levels up."""
        dt = now - req.t0
        target = req.target
        tc: Traffic = (target.counters if target is not None  # type: ignore[attr-defined]
                       else req.svc.counters)  # type: ignore[attr-defined]
        tc.lat[bisect_left(LATENCY_BUCKETS, dt)] += 1
        tc.lat_sum += dt
        srv: Traffic = req.server or tc  # type: ignore[assignment]
        srv.resp[req.status // 100] += 1
        nread = self.nread
        srv.bytes_in += nread - self.nmark
        self.nmark = nread
        srv.bytes_out += req.hlen + req.resp_bytes

    def upstream_failed(self, req: Request, why: str, retry_ok: bool) -> None:
        if req is not self.cur or self.closed:
            self._release(req, True)
            return
        req.up = None
        if req.resp_started:
            logger.warning("VS %s: real server %s failed mid-response: %s", self.listener.name,
                           _server(req), why)
            self._release(req, False)
            self._abort_mid_response(req)
            return
        if retry_ok and req.attempts < 1 and req.body_bytes == 0 and req.complete:
            # A pooled connection the server had closed: resend on a fresh one.
            req.attempts += 1
            target: Target = req.target  # type: ignore[assignment]
            pool = target.pools[req.backend].cp  # type: ignore[index]
            up = pool.acquire(self.loop.time())
            if up is not None:
                self.attach(req, up)
            else:
                pool.connect(self, req, req.svc.t_connect)  # type: ignore[attr-defined]
            return
        logger.warning("VS %s: real server %s failed: %s", self.listener.name, _server(req), why)
        self._release(req, False)
        self._local(req, ERRORS[502], close=not req.complete)

    def connect_failed(self, req: Request, why: str, timed_out: bool = False) -> None:
        backend = req.backend
        if req is not self.cur or self.closed or backend is None:
            self._release(req, True)
            return
        if timed_out:
            self.listener.counters.limits["upstream_timeout"] += 1
        logger.warning("VS %s: %s", self.listener.name, why)
        self._release(req, False)
        target: Target = req.target  # type: ignore[assignment]
        if req.attempts < 1 and req.method_b in h.IDEMPOTENT:
            req.attempts += 1
            self._serve(req, target, backend)
            return
        self._local(req, ERRORS[502], close=not req.complete)

    def _release(self, req: Request, ok: bool) -> None:
        backend = req.backend
        if backend is not None:
            req.backend = None
            target: Target = req.target  # type: ignore[assignment]
            if target.balancer is not None:
                target.balancer.release(backend, ok)  # type: ignore[arg-type]

    def _finish(self, req: Request) -> None:
        self._record(req)
        if req is self.cur:
            self.cur = None
        self._finish_slow(req)

    def _finish_slow(self, req: Request) -> None:
        if self.paused & P_UPSTREAM:
            self.resume(P_UPSTREAM)
        if not req.keep_alive or self.closing or (self.eof and not self.queue):
            self.pause(P_STOP)
            if not self.closed:
                self._close()
            return
        if not req.complete:
            # Answered before the body was read (not available, redirect, early response): read
            # and discard the rest so the connection stays usable.
            req.discard = True
            req.chunks = []
            self.resume(P_BUFFER)
        if not self.running:
            self._run_queue()

    def _run_queue(self) -> None:
        self.running = True
        try:
            queue = self.queue
            while self.cur is None and queue:
                req = queue.popleft()
                self.cur = req
                self._start(req)
                if self.closed:
                    return
        finally:
            self.running = False
        if not self.queue:
            self.resume(P_PIPELINE)
        if self.cur is None:
            if self.pending_error:
                status, self.pending_error = self.pending_error, 0
                self._write_error_and_close(status)
                return
            now = self.loop.time()
            svc = self.listener.service
            if self.in_head:
                self.deadline = now + svc.t_head
                self.dkind = D_HEAD
            else:
                self.deadline = now + svc.t_idle
                self.dkind = D_IDLE

    def _bad(self, status: int, key: str) -> None:
        """A request that cannot be served (malformed, too big, too slow): answer `status`, count
        it under the limit `key`, and close."""
        self.listener.counters.limits[key] += 1
        self.pause(P_STOP)
        self.closing = True
        bad = self.req
        cur = self.cur
        if bad is not None and bad is cur and bad.started:
            up = bad.up
            if isinstance(up, UpstreamConnection) and up.req is bad:
                up._detach()
                up.abort()
            self._release(bad, True)
            if bad.resp_started:
                self._abort_mid_response(bad)
                return
            self.cur = None
            self._write_error_and_close(status, bad)
            return
        if bad is not None and self.queue and self.queue[-1] is bad:
            self.queue.pop()
        if cur is None and not self.queue:
            self._write_error_and_close(status)
        else:
            self.pending_error = status

    def _write_error_and_close(self, status: int, req: Request | None = None) -> None:
        resp = ERRORS[status]
        if req is None:
            svc = self.listener.service
            req = Request(svc, self.src_ip, self.loop.time(), b"-")
            req.method_b = b"-"
            svc.counters.requests += 1
        req.status = status
        req.resp_bytes = len(resp.body)
        req.hlen = len(resp.close_full) - req.resp_bytes
        if not self.closed:
            self._write(resp.close_full)
            self._close()
        self._record(req)

    def _log_prefix(self, svc: Service, req: Request) -> None:
        """Remake the constant part of this connection's access-log lines for `req`."""
        target = req.target
        backend = req.server
        self.log_svc = svc
        self.log_target = target
        self.log_server = backend
        self.log_prefix = line_prefix(
            svc.name, target.name if target is not None else "-",  # type: ignore[attr-defined]
            backend.address if backend is not None else "-",  # type: ignore[attr-defined]
            req.src_ip)

    # -- Upgrade tunnels ----------------------------------------------------------------------

    def start_tunnel(self, req: Request, up: UpstreamConnection) -> None:
        self.first_byte(req)
        self._release(req, True)
        self._record(req)
        self.cur = None
        self.tunnel = up
        raw, self.raw = self.raw, []
        for chunk in raw:
            up.write(chunk)
        self.deadline = self.loop.time() + req.svc.t_idle  # type: ignore[attr-defined]
        self.dkind = D_TUNNEL
        self.resume(P_UPGRADE | P_PIPELINE)

    def tunnel_closed(self) -> None:
        self.tunnel = None
        if not self.closed:
            self._close()


# The limit counted when a parser callback rejects with a status and names none.
_LIMIT_OF = {400: "bad_request", 405: "bad_request", 505: "bad_request", 413: "body_too_large",
             431: "header_too_large"}


def _waiting_since(c: ClientConnection) -> float:
    """When `c` began to wait on its client (a head, a body, the next request), or inf if it
    does not (an exchange with a real server, a tunnel, closing)."""
    if c.closed or c.closing or c.eof:
        return inf
    kind = c.dkind
    svc = c.listener.service
    if kind == D_IDLE:
        return c.deadline - svc.t_idle
    if kind == D_HEAD and c.cur is None:
        return c.deadline - svc.t_head
    if kind == D_BODY:
        return c.deadline - svc.t_body
    return inf


def _make_room(listener: Listener[ClientConnection]) -> bool:
    """At max_connections: close the connection that has waited longest on its client (an idle
    keep-alive one, a head or a body that stopped coming), so that clients that stall cannot hold
    the limit against active ones (nginx reuses idle keep-alive connections the same way). False
    when every connection is busy with a real server, a tunnel or its close: the new one gets 503.

    The candidates are sorted once and then taken in turn (each checked to still be waiting), so
    a burst of new connections at the limit costs one scan, not one per connection.
    """
    victims = listener.victims
    for _ in range(2):
        while victims:
            c = victims.pop()
            if c in listener.conns and _waiting_since(c) != inf:
                c.evict()
                return True
        waiting = [(t, id(c), c) for c in listener.conns if (t := _waiting_since(c)) != inf]
        if not waiting:
            return False
        waiting.sort(reverse=True)  # the longest wait last: pop() takes it first
        victims[:] = [c for _, _, c in waiting]
    return False


class _Rebody:
    """Parser callbacks after an Upgrade request whose upgrade was dropped (h2c) and which has a
    body: the head of our own that starts the new parser is skipped, then every callback is the
    connection's (the body, then any request that follows)."""

    __slots__ = ("conn", "skip")

    def __init__(self, conn: ClientConnection) -> None:
        self.conn = conn
        self.skip = True

    def on_url(self, url: bytes) -> None:
        if not self.skip:
            self.conn.on_url(url)

    def on_header(self, name: bytes, value: bytes) -> None:
        if not self.skip:
            self.conn.on_header(name, value)

    def on_headers_complete(self) -> None:
        if self.skip:
            self.skip = False
        else:
            self.conn.on_headers_complete()

    def on_body(self, data: bytes) -> None:
        self.conn.on_body(data)

    def on_message_complete(self) -> None:
        self.conn.on_message_complete()


def _rebody_head(req: Request, clen: bytes) -> bytes:
    """A head that frames a body as `req`'s is framed, by Transfer-Encoding or by Content-Length
    `clen` (for _Rebody's parser)."""
    if req.chunked:
        return b"PUT / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
    return b"PUT / HTTP/1.1\r\nHost: x\r\nContent-Length: %b\r\n\r\n" % clen


def _as_is(req: Request, name: bytes, value: bytes) -> None:
    """Forward a field counted as hidden as it came after all (it is counted once, in `fwd`)."""
    req.fwd += (name, b": ", value, CRLF)
    req.hidden -= 1
    req.hidden_bytes -= len(name) + len(value) + 4


def _server(req: Request) -> str:
    b = req.server
    return str(b.address) if b is not None else "-"  # type: ignore[attr-defined]


def _split_host(host: str, default_port: int) -> tuple[str, str]:
    if host.startswith("["):
        end = host.find("]")
        name = host[:end + 1]
        rest = host[end + 1:]
        return name, rest[1:] if rest.startswith(":") else str(default_port)
    name, sep, port = host.rpartition(":")
    if sep and port.isdigit():
        return name, port
    return host, str(default_port)


def _log_access(conn: ClientConnection, svc: Service, req: Request, now: float) -> None:
    target = req.target
    if conn.log_svc is not svc or conn.log_target is not target or conn.log_server is not (
            req.server):
        conn._log_prefix(svc, req)
    svc.log.entry(  # type: ignore[union-attr]
        conn.log_prefix, req.method_b, req.url, req.status, req.resp_bytes, req.t0, now,
        CUT if req.cut else b"")
