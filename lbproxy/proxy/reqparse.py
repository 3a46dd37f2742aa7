"""The client connection's httptools callbacks: a request head checked and rebuilt for upstream
as it is parsed, its body streamed (or buffered until a connection is ready), and the checks of
client.py's docstring that llhttp does not make itself.

A callback that refuses a request sets `reject` (and maybe `reject_key`) and raises `_Reject`,
which llhttp turns into the parser error that `ClientConnection.data_received` answers.
"""

from __future__ import annotations

from typing import Final

from ..config.model import BODY_MATCH_LIMIT
from . import http as h
from .clientstate import D_BODY, D_REQUEST, P_BUFFER, P_PIPELINE, P_STOP
from .clock import clock
from .exchange import Exchange
from .http import (
    CRLF,
    FIELD_CODES,
    H_CLEN,
    H_CONNECTION,
    H_EXPECT,
    H_HOST,
    H_TE,
    H_UPGRADE,
    H_XFF,
    H_XFH,
    H_XFP,
    HOST_CHARS,
    field_code,
)
from .request import Request
from .upstream import HIGH_WATER


class _Reject(Exception):
    """Raised inside a parser callback to stop parsing; the status is in `reject`."""


# The limit counted when a parser callback rejects with a status and names none.
LIMIT_OF: Final = {400: "bad_request", 405: "bad_request", 505: "bad_request",
                   413: "body_too_large", 431: "header_too_large"}


class RequestParsing(Exchange):
    """httptools' callbacks for the client connection (the parser is `self.parser`)."""

    __slots__ = ()

    def on_url(self, url: bytes) -> None:
        req = self.req
        if req is not None:  # the URL arrived in pieces
            req.url += url
            return
        # The first callback of a request (cheaper than a separate on_message_begin). A head that
        # does not end in this read gets its deadline when the read is done (data_received).
        self.req = Request(self.listener.service, self.src_ip, clock(), url)
        self.in_head = True
        self.clen = b""
        self.conn_extra = None

    def on_header(self, name: bytes, value: bytes) -> None:
        req = self.req
        assert req is not None
        code = FIELD_CODES.get(name)
        if code is None:
            code = field_code(name)
        if not code:
            req.fwd += (name, b": ", value, CRLF)
            return
        if code == H_HOST:
            # Several Host fields, or one that is not a host[:port]: 400. A keep-alive client
            # repeats its Host: the last good one is not checked again.
            if req.host_b or (value != self.host_ok and (
                    value.translate(None, HOST_CHARS) or not value)):
                self.reject = 400
                raise _Reject
            self.host_ok = value
            req.host_b = value
            req.fwd += (name, b": ", value, CRLF)
            return
        if code == H_CLEN:
            self.clen = value
            req.fwd += (name, b": ", value, CRLF)
            return
        # The fields below are rebuilt or dropped, so not in `fwd` as they came: they still count
        # toward the limits (their number, and their bytes as name ": " value CRLF).
        req.hidden += 1
        req.hidden_bytes += len(name) + len(value) + 4
        if code == H_TE:
            # Only a lone "chunked" (RFC 9112 §6.1): we decode no other coding, and llhttp has
            # already refused one whose final coding is not chunked, and a second field.
            if req.chunked or value.rstrip(b" \t").lower() != b"chunked":
                self.reject = 400
                raise _Reject
            req.chunked = True
        elif code == H_CONNECTION:
            # Not None once a Connection field was seen; holds the field names it lists, less
            # those that frame or route the message (never removed, whoever names them).
            if self.conn_extra is None:
                self.conn_extra = []
            self.conn_extra += h.connection_names(value)
        elif code == H_UPGRADE:
            # The protocols offered, less those never relayed (h2c); several fields form a list.
            offered = [t.strip(b" \t") for t in value.split(b",")]
            kept = b", ".join(t for t in offered if t and t.lower() not in h.NO_UPGRADE)
            if req.upgrade_b and kept:
                req.upgrade_b += b", " + kept
            elif kept:
                req.upgrade_b = kept
        elif code == H_EXPECT:
            if value.lower() == b"100-continue":
                req.expect = True
            else:
                _as_is(req, name, value)
        elif code == H_XFF:
            if self.listener.service.add_forwarded:
                req.xff = req.xff + b", " + value if req.xff else value
            else:
                _as_is(req, name, value)
        elif code == H_XFP or code == H_XFH:
            if not self.listener.service.add_forwarded:
                _as_is(req, name, value)
        # H_HOP: dropped

    def on_headers_complete(self) -> None:
        req = self.req
        assert req is not None
        svc = req.svc
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
            _drop_connection_fields(req, self.conn_extra)
        if self.cur is None and not self.queue:
            self.cur = req
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
        max_body = req.svc.max_body
        if max_body and req.body_bytes > max_body:
            self.reject = 413
            raise _Reject
        if req.discard:
            return
        up = req.up
        if up is not None:
            self._up_send(up, b"%x\r\n%b\r\n" % (len(data), data) if req.chunked else data)
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
                self._up_send(up, b"0\r\n\r\n")
            if self.dkind in (D_REQUEST, D_BODY) and req is self.cur and not req.resp_started:
                # The body went out whole: now the real server has first_byte to answer.
                self._wait_first_byte(req, clock())
        elif req.waiting_route:
            self._route_now(req)
        if not req.keep_alive:
            self.pause(P_STOP)


def _drop_connection_fields(req: Request, names: list[bytes]) -> None:
    """Take the fields a Connection header named out of what goes upstream."""
    drop = set(names)
    old = req.fwd
    fwd = old[:4]
    for i in range(4, len(old) - 3, 4):
        if old[i].lower() not in drop:
            fwd += old[i:i + 4]
    req.fwd = fwd


def _as_is(req: Request, name: bytes, value: bytes) -> None:
    """Forward a field counted as hidden as it came after all (it is counted once, in `fwd`)."""
    req.fwd += (name, b": ", value, CRLF)
    req.hidden -= 1
    req.hidden_bytes -= len(name) + len(value) + 4


class Rebody:
    """Parser callbacks after an Upgrade request whose upgrade was dropped (h2c) and which has a
    body: the head of our own that starts the new parser is skipped, then every callback is the
    connection's (the body, then any request that follows)."""

    __slots__ = ("conn", "skip")

    def __init__(self, conn: RequestParsing) -> None:
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


def rebody_head(req: Request, clen: bytes) -> bytes:
    """A head that frames a body as `req`'s is framed, by Transfer-Encoding or by Content-Length
    `clen` (for Rebody's parser)."""
    if req.chunked:
        return b"PUT / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
    return b"PUT / HTTP/1.1\r\nHost: x\r\nContent-Length: %b\r\n\r\n" % clen
