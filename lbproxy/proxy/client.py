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
- an upgraded connection (a WebSocket tunnel after the 101) with no bytes either way, 3600 s
  (websocket_idle; the keep-alive idle does not apply to it): close both sides; idle_timeout
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
from typing import TYPE_CHECKING, Final, cast

import httptools

from .admission import make_room
from .clientstate import (
    CLIENT_CLOSED,
    D_BODY,
    D_FIRST_BYTE,
    D_HEAD,
    D_IDLE,
    D_IDLE_HELD,
    D_REQUEST,
    D_TUNNEL,
    P_BUFFER,
    P_STOP,
    P_UPGRADE,
    P_UPSTREAM,
    P_WRITE,
    logger,
)
from .clock import clock
from .exchange import server_name
from .http import CRLF, ERRORS
from .proxyproto import Addresses, HeaderReader
from .reqparse import LIMIT_OF, Rebody, RequestParsing, rebody_head
from .upstream import HIGH_WATER, LOW_WATER

if TYPE_CHECKING:
    from .request import Request
    from .service import Listener
    from .upstream import UpstreamConnection

# A client address's bytes and X-Forwarded-For line, made once and shared by the connections of
# one client (~100 bytes each otherwise); emptied when full.
_NAMED: Final[dict[str, tuple[bytes, bytes]]] = {}
_NAMED_MAX: Final = 4096


class ClientConnection(RequestParsing):
    """One accepted client connection: the asyncio protocol over the layers it is made of
    (clientstate.py, answers.py, exchange.py, reqparse.py), its deadlines fired and its
    eviction."""

    __slots__ = ("addrs",)

    listener: Listener[ClientConnection]

    # -- asyncio.Protocol ---------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports do not subclass asyncio.Transport; they implement it.
        transport = cast(asyncio.Transport, transport)
        self.transport = transport
        listener = self.listener
        svc = listener.service
        if listener.closing or (len(listener.conns) >= svc.max_connections
                                and not make_room(listener)):
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
        self._name_client(peer[0] if peer else "")
        self.addrs = None
        self._wait_head(clock())
        sources = svc.pp_sources
        if sources is not None:  # the PROXY protocol comes first (proxyproto.py)
            ip = self.src_ip
            if not ip:  # reset before its address could be read: no source to check
                self._close()
                return
            transport.set_protocol(HeaderReader(self, transport, ip, ip in sources))

    def proxied(self, addrs: Addresses | None) -> None:
        """A PROXY header named the client: it is the one rules, logs and headers see."""
        if addrs is not None:
            self.addrs = addrs
            self._name_client(addrs[0])

    def _name_client(self, ip: str) -> None:
        """The client's address as rules (src_ip), logs and X-Forwarded-For see it."""
        self.src_ip = ip
        named = _NAMED.get(ip)
        if named is None:
            if len(_NAMED) >= _NAMED_MAX:
                _NAMED.clear()
            ip_b = ip.encode("latin-1")
            named = _NAMED[ip] = (ip_b, b"X-Forwarded-For: " + ip_b + CRLF)
        self.ip_b, self.xff_b = named

    def refuse_proxy(self, why: str) -> None:
        """A PROXY header refused (or missing): logged, counted, closed."""
        logger.warning("VS %s: %s; connection closed", self.listener.name, why)
        self.listener.counters.limits["proxy_protocol"] += 1
        self.closing = True
        self.pause(P_STOP)
        self._no_deadline()
        self._close()

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
            self._drop_upstream(cur)
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
        up = self._upstream()
        if up is not None:
            up.pause_reading()

    def resume_writing(self) -> None:
        self.write_paused = False
        self.resume(P_WRITE)
        up = self._upstream()
        if up is not None:
            up.resume_reading()

    def _upstream(self) -> UpstreamConnection[Request] | None:
        """The upstream connection whose reads feed our writes: the tunnel's or the exchange's."""
        if self.tunnel is not None:
            return self.tunnel
        return self.cur.up if self.cur is not None else None

    def data_received(self, data: bytes) -> None:
        tunnel = self.tunnel
        if tunnel is not None:
            tunnel.write(data)
            self._wait_tunnel(clock())
            return
        if self.req is None:
            self.hstart = self.nread  # the next request head starts in `data` or later
        self.nread += len(data)
        if self.upgraded or self.paused & P_STOP:
            if self.upgraded and not self.paused & P_STOP:
                self._hold_raw(data)
                self.pause(P_UPGRADE)
            return
        parser = self.parser
        if parser is None:  # released while the connection idled (clientstate.py, D_IDLE_HELD)
            parser = self.parser = httptools.HttpRequestParser(self)
        self.feeding = True
        try:
            try:
                parser.feed_data(data)
            except httptools.HttpParserUpgrade as e:
                req = self.req
                if req is None or not req.rebody:
                    raise
                # llhttp reads all that follows an Upgrade request's head as the new protocol's;
                # this upgrade was dropped (h2c), so its body and what follows go to a parser that
                # never saw it, after a head of our own that frames the body the same way.
                rest = data[e.args[0]:]
                self.parser = httptools.HttpRequestParser(Rebody(self))
                data = rebody_head(req, self.clen) + rest
                self.parser.feed_data(data)
        except httptools.HttpParserUpgrade as e:
            self.feeding = False
            if self.out:
                self._flush_out()  # the upgrade request's own head and body go out first
            rest = data[e.args[0]:]
            self.upgraded = True
            if rest:
                self._hold_raw(rest)
            self.pause(P_UPGRADE)
        except httptools.HttpParserError as e:
            status = self.reject or 400
            key = self.reject_key or LIMIT_OF[status]
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
            req = self.req
            if req is not None and self.cur is None and self.dkind in (D_IDLE_HELD, D_IDLE):
                # A head begun after a keep-alive wait: t_head from its first byte (nginx's
                # keepalive_timeout, then client_header_timeout). The first head of a connection,
                # or one begun before the previous response ended, keeps the deadline set then.
                self._wait_head(req.ts)
            self.head_bytes += len(data)
            if self.head_bytes > self.listener.service.max_header_bytes:
                self._bad(431, "header_too_large")
        elif self.req is not None:
            req = self.req
            if req is self.cur or req.discard:
                self._await_body(req)  # a body being read: the client has t_body for more

    def _hold_raw(self, data: bytes) -> None:
        """Bytes after an Upgrade head: the new protocol's, kept for the tunnel (start_tunnel)."""
        if self.raw is None:
            self.raw = []
        self.raw.append(data)

    # -- deadlines (called by the listener's sweep) -------------------------------------------

    def on_timeout(self, now: float) -> None:
        kind = self.dkind
        if kind == D_IDLE_HELD and self._release_parser(now):
            return  # still within t_idle
        self._no_deadline()
        cur = self.cur
        limits = self.listener.counters.limits
        if kind == D_FIRST_BYTE and cur is not None:
            limits["upstream_timeout"] += 1
            self._drop_upstream(cur)
            logger.warning("VS %s: real server %s did not answer in time", self.listener.name,
                           server_name(cur))
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
            elif now >= req.ts + svc.t_request:
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
        elif kind in (D_IDLE_HELD, D_IDLE, D_TUNNEL, D_HEAD):
            limits["head_timeout" if kind == D_HEAD else "idle_timeout"] += 1
            self._close()

    def evict(self) -> None:
        """Close this connection, which waits on its client, to make room for a new one (it no
        longer counts toward max_connections from now on)."""
        self.listener.conns.discard(self)
        self.listener.counters.limits["evicted"] += 1
        req = self.req
        kind = self.dkind
        self._no_deadline()
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

    def shutdown(self) -> None:
        """Stop reading new requests: close now if idle, else after the response in flight."""
        self.closing = True
        if self.cur is None and not self.queue and self.tunnel is None and not self.in_head:
            self._close()

