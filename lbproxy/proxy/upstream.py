"""The real-server side of the relay: one protocol per upstream connection.

An `UpstreamConnection` parses responses with httptools and writes them straight into the client
transport of the exchange it serves (one coalesced write per read); the keep-alive pools it comes
from and returns to are connpool.py's.
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING, Any, Final, Generic, TypeAlias, TypeVar, cast

import httptools

from .clock import clock
from .contract import PoolForUpstream, RequestForUpstream
from .headerrules import edit_response
from .http import CRLF, connection_names
from .resphead import (
    _CONTENT_LENGTH,
    _HOP_FIELD,
    MAX_RESPONSE_HEAD,
    Validator,
    _announces_body,
    _is_keep_alive,
    _without_hop_fields,
    frame_whole,
)

# The request an upstream connection serves (request.py's Request), as this side sees it.
Req = TypeVar("Req", bound=RequestForUpstream)

if TYPE_CHECKING:
    from .compress import Encoder
    from .contract import ClientForUpstream

    # The client connection of an exchange, as this side sees it (client.py's ClientConnection).
    Client: TypeAlias = ClientForUpstream["UpstreamConnection[Req]", Req]

logger = logging.getLogger(__name__)

# Write-buffer water marks (bytes) for both sides of the relay: above HIGH the peer stops reading,
# below LOW it resumes. 256 KiB covers a few socket buffers so loopback stays saturated while a
# stalled peer costs at most that much memory per direction.
HIGH_WATER: Final = 256 * 1024
LOW_WATER: Final = 64 * 1024


class _HeadDone(Exception):
    """Raised from on_headers_complete to stop the parser after a response to HEAD.

    httptools cannot be told that a response to HEAD has no body (llhttp's skip-body return value
    is not exposed), so the parser is stopped and replaced instead.
    """


def _describe(e: BaseException) -> str:
    if isinstance(e, TimeoutError):
        return "timed out"
    return str(e) or type(e).__name__


class UpstreamConnection(Generic[Req]):
    """One keep-alive connection to a real server, serving one exchange at a time (an
    asyncio.Protocol without subclassing it, as ClientState)."""

    __slots__ = (
        "client", "close_delim", "cout", "ctransport", "enc", "hbuf", "head_body", "head_done",
        "heads", "idle_since", "interim", "out_chunked", "outbox", "parser", "pending_head", "pool",
        "pp_key", "read_paused", "req", "reused", "status",
        "transport", "tunnel", "validator", "vframe", "vhead", "want_head")

    def __init__(self, pool: PoolForUpstream) -> None:
        self.pool = pool
        self.outbox = pool.outbox
        self.transport: asyncio.Transport | None = None
        self.parser: Any = httptools.HttpResponseParser(self)
        self.validator = Validator()
        self.vhead = b""  # the last response head (with its blank line) the validator passed
        # What the fast path derived from `vhead`: its Content-Length, the hop-by-hop spans to cut,
        # whether the only one is "Connection: keep-alive", and the status. A function of the
        # head's bytes alone, so reused as is when the same head recurs.
        self.vframe: tuple[int, tuple[tuple[int, int], ...], bool, int] = (0, (), False, 0)
        self.client: Client[Req] | None = None
        self.ctransport: asyncio.Transport | None = None
        self.req: Req | None = None
        self.cout: list[bytes] = []
        self.heads: list[bytes] = []
        self.hbuf = b""
        self.status = 0
        self.idle_since = 0.0
        self.pp_key = b""  # the PROXY header it began with (proxyproto.ProxyConnPool), if any
        self.want_head = True
        self.out_chunked = False
        self.close_delim = False
        self.interim = False
        self.head_done = False
        self.head_body = False  # the response to HEAD announced a body: not reused after it
        self.pending_head = False  # a final response head waits in cout, not sent yet
        self.reused = False
        self.read_paused = False
        self.tunnel = False
        self.enc: Encoder | None = None  # the body being compressed (compress.py)

    # -- asyncio.Protocol ---------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports do not subclass asyncio.Transport; they implement it.
        transport = cast(asyncio.Transport, transport)
        self.transport = transport
        transport.set_write_buffer_limits(HIGH_WATER, LOW_WATER)

    def data_received(self, data: bytes) -> None:
        if self.tunnel:
            ct = self.ctransport
            if ct is not None:
                self.outbox.write(ct, data)
                client = self.client
                if client is not None:
                    client.touch()
            return
        if self.req is None:
            # Bytes on an idle connection: the server is confused; never reuse it.
            self.close()
            return
        if self.want_head:
            if not self.hbuf and self._fast_response(data):
                self.pool.whole += 1
                return
            if not self._collect_heads(data):
                return
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade as e:
            self._flush()
            self._start_tunnel(data[e.args[0]:])
            return
        except httptools.HttpParserError as e:
            if self.head_done:
                self.head_done = False
                self.parser = httptools.HttpResponseParser(self)
                self._flush()
                # Reused only if the head announced no body and nothing followed it in this read.
                keep = not self.head_body and data.endswith(b"\r\n\r\n")
                self.head_body = False
                client, req = self.client, self.req
                if client is not None and req is not None:
                    self._done(client, req, keep)
                return
            req = self.req
            if self.pending_head and req is not None:
                # Nothing of this response reached the client yet: it gets a clean 502 instead.
                self.cout = []
                self.pending_head = False
                req.resp_started = False
                req.status = 0
            self._flush()
            self._fail(f"bad response: {e}", parse_error=True)
            return
        if self.cout:
            self._flush()

    def _fast_response(self, data: bytes) -> bool:
        """Relay a whole response that arrived in one read without running the parser.

        Only the common, unambiguous shape: HTTP/1.1, a final status with a body, exactly one
        Content-Length and the body complete in `data` with nothing after it, no hop-by-hop field
        but "Connection: keep-alive"/"Keep-Alive". The parser sits at a message boundary before
        and after, so anything else simply takes the parser's path. Returns True if handled.
        """
        req = self.req
        client = self.client
        if (req is None or client is None or req.is_head or req.compress is not None
                or req.hresp is not None or self.pool.parse_all):
            return False
        vhead = self.vhead
        if vhead and data.startswith(vhead):
            # Byte-identical to the last head that passed (same Date second, same resource): the
            # same status, Content-Length, hop-by-hop fields and llhttp verdict. `vhead` holds one
            # blank line, at its end: this head ends there too.
            clen, cuts, ka_only, code = self.vframe
            end = len(vhead) - 4
            hend = end + 2  # the head's last field ends here; the blank line follows
            if hend + 2 + clen != len(data):
                return False
        else:
            framed = frame_whole(data, self.validator)
            if framed is None:
                return False
            end, clen, cuts, ka_only, code = framed
            self.vhead = data[:end + 4]
            self.vframe = (clen, cuts, ka_only, code)
        req.status = code
        req.resp_started = True
        req.resp_bytes = clen
        extra = b""
        if not req.keep_alive or client.closing or req.upgrade:
            req.keep_alive = False
            extra = b"\r\nConnection: close"
        elif ka_only:
            cuts = ()  # the server's "Connection: keep-alive" holds for the client's hop too
        elif req.v10:
            extra = b"\r\nConnection: keep-alive"
        if not cuts and not extra:
            out = data  # forwarded as it came
        else:
            pieces = []
            pos = 0
            for a, b in cuts:
                pieces.append(data[pos:a])
                pos = b
            pieces += (data[pos:end], extra, data[end:])
            out = b"".join(pieces)
        req.hlen = len(out) - req.resp_bytes
        self.outbox.add(client.transport, out)
        self._done(client, req, True)
        return True

    def _collect_heads(self, data: bytes) -> bool:
        """Keep the raw bytes of the response heads that start in `data` (1xx ones included)."""
        buf = self.hbuf + data if self.hbuf else data
        pos = 0
        while True:
            end = buf.find(b"\r\n\r\n", pos)
            if end < 0:
                self.hbuf = buf[pos:]
                if len(self.hbuf) > MAX_RESPONSE_HEAD:
                    self._fail("response head too large", parse_error=True)
                    return False
                return True
            head = buf[pos:end + 2]
            self.heads.append(head)
            pos = end + 4
            if head[9:10] != b"1" or head[9:12] == b"101":
                self.hbuf = b""
                self.want_head = False
                return True

    def eof_received(self) -> bool | None:
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        transport, self.transport = self.transport, None
        if transport is None:
            return
        client = self.client
        if self.tunnel:
            if client is not None:
                client.tunnel_closed()
            return
        req = self.req
        if req is None or client is None:
            self.pool.discard(self)
            return
        if self.close_delim and req.resp_started and not self.head_done:
            # The end of a response delimited by the end of the connection.
            self._flush()
            self._done(client, req, False)
            return
        why = _describe(exc) if exc is not None else "closed by the real server"
        self._flush()
        self._fail(why, parse_error=False)

    def pause_writing(self) -> None:
        client = self.client
        if client is not None:
            client.pause_for_upstream()

    def resume_writing(self) -> None:
        client = self.client
        if client is not None:
            client.resume_for_upstream()

    # -- httptools callbacks ------------------------------------------------------------------

    def on_headers_complete(self) -> None:
        status = self.parser.get_status_code()
        req = self.req
        assert req is not None
        self.status = status
        heads = self.heads
        head = heads.pop(0) if heads else b""
        if not head:
            raise httptools.HttpParserError("response head not found")
        chunked = False
        upgrade = b""
        if status == 101 and not req.upgrade:
            # Switching protocols that the client never asked for would turn its connection
            # into a raw tunnel past the content rules.
            raise httptools.HttpParserError("101 to a request that asked for no upgrade")
        if head.startswith(b"HTTP/1.0"):
            head = b"HTTP/1.1" + head[8:]
        matches = list(_HOP_FIELD.finditer(head))
        named: list[bytes] = []
        for m in matches:
            name = m.group(1).lower()
            if name == b"transfer-encoding":
                # llhttp passed it; we relay only chunked (no other coding is re-framed).
                if m.group(2).rstrip(b" \t").lower() != b"chunked":
                    raise httptools.HttpParserError("unsupported Transfer-Encoding")
                chunked = True
            elif name == b"upgrade":
                upgrade = m.group(2)
            elif name == b"connection":
                named += connection_names(m.group(2))
        if status < 200 and status != 101:
            self.interim = True
            # RFC 9110 §15.2: an HTTP/1.0 client gets no 1xx; our own 100 Continue went already.
            if not req.v10 and not (status == 100 and req.sent_continue):
                self.cout += (_without_hop_fields(head, matches, named), CRLF)
            return
        client = self.client
        assert client is not None
        client.first_byte(req)
        extra = b""
        if status == 101:
            extra = b"Connection: upgrade\r\nUpgrade: " + upgrade + CRLF
        elif req.is_head or status == 204 or status == 304:
            pass
        elif chunked:
            if req.v10:
                req.keep_alive = False
            else:
                self.out_chunked = True
                extra = b"Transfer-Encoding: chunked\r\n"
        elif not self.parser.should_keep_alive() and _CONTENT_LENGTH.search(head) is None:
            # No Content-Length, not chunked: the body ends when the connection does. (With a
            # Content-Length, a server's "Connection: close" ends only this hop: the client keeps
            # its connection.)
            self.close_delim = True
            req.keep_alive = False
        if req.upgrade and status != 101:
            req.keep_alive = False
        if not req.keep_alive or client.closing:
            req.keep_alive = False
            extra += b"Connection: close\r\n"
        elif req.v10:
            extra += b"Connection: keep-alive\r\n"
        if extra or len(matches) != 1 or not _is_keep_alive(matches[0]):
            head = _without_hop_fields(head, matches, named)
        # else the server's "Connection: keep-alive", its only hop-by-hop field, holds for the
        # client's hop too: the head goes as it came, as _fast_response relays it.
        hresp = req.hresp
        if hresp is not None and status != 101:
            head = edit_response(head, hresp)  # header rules (headerrules.py)
        if req.compress is not None and not self.close_delim and status != 101:
            started = req.compress.start(head, status)
            if started is not None:  # compressed: sent chunked (the client speaks HTTP/1.1)
                head, self.enc = started
                if not self.out_chunked:
                    self.out_chunked = True
                    extra = b"Transfer-Encoding: chunked\r\n" + extra
        self.cout += (head, extra, CRLF) if extra else (head, CRLF)
        req.hlen = len(head) + len(extra) + 2
        self.pending_head = True
        req.status = status
        req.resp_started = True
        if req.is_head:
            self.head_done = True
            if chunked or _announces_body(head):
                # A server that also sent the body it announced would have it read as the next
                # response on this connection: it is not reused (RFC 9110 §9.3.2).
                self.head_body = True
            raise _HeadDone

    def on_body(self, data: bytes) -> None:
        req = self.req
        assert req is not None
        if self.out_chunked:
            enc = self.enc
            if enc is not None:
                data = enc.feed(data)
                if not data:
                    return
            self.cout += (b"%x\r\n" % len(data), data, CRLF)
        else:
            self.cout.append(data)
        req.resp_bytes += len(data)
        if len(self.cout) > 64:
            self._flush()

    def on_message_complete(self) -> None:
        if self.interim:
            self.interim = False
            return
        if self.status == 101:
            return  # HttpParserUpgrade follows
        cout = self.cout
        self.pending_head = False
        if self.out_chunked:
            self.out_chunked = False
            enc = self.enc
            if enc is not None:
                self.enc = None
                tail = enc.finish()
                if tail:
                    cout += (b"%x\r\n" % len(tail), tail, CRLF)
                    if self.req is not None:
                        self.req.resp_bytes += len(tail)
            cout.append(b"0\r\n\r\n")
        client = self.client
        req = self.req
        if client is None or req is None:
            return
        self.cout = []
        self.outbox.add(client.transport, b"".join(cout) if len(cout) > 1 else cout[0])
        self._done(client, req, self.parser.should_keep_alive())

    # -- relay --------------------------------------------------------------------------------

    def start(self, client: Client[Req], req: Req) -> asyncio.Transport:
        """Serve `req` for `client` (pooled or just connected): the transport to send it on."""
        t = self.transport
        assert t is not None  # taken from the pool or just connected: connection_lost not yet
        self.client = client
        self.ctransport = client.transport
        self.req = req
        self.want_head = True
        self.status = 0
        if client.write_paused and not self.read_paused:
            self.read_paused = True
            t.pause_reading()
        return t

    def write(self, data: bytes) -> None:
        t = self.transport
        if t is not None:
            self.outbox.write(t, data)

    def _flush(self) -> None:
        self.pending_head = False
        cout = self.cout
        if cout:
            self.cout = []
            ct = self.ctransport
            if ct is not None:
                self.outbox.write(ct, b"".join(cout))

    def _detach(self) -> None:
        """Serve no exchange any more (reading resumes if the client had paused it)."""
        self.client = None
        self.ctransport = None
        self.req = None
        if self.read_paused:
            self.resume_reading()

    def _done(self, client: Client[Req], req: Req, keep_alive: bool) -> None:
        """The response to `req` went out whole (handed to the outbox or written): the one end of
        a completed exchange, whichever path relayed it. The connection goes back to the pool if
        it can serve another request (the response keeps it alive and this request went out
        whole), else it is closed; then the client hears of it (and may reuse it at once)."""
        self._detach()
        if keep_alive and req.complete:
            self.pool.release(self, clock())
        else:
            self.close()
        client.response_done(req)

    def abandon(self) -> None:
        """The client gave up the exchange (timeout, bad request, gone): never reused."""
        self._detach()
        self.abort()

    def _fail(self, why: str, *, parse_error: bool) -> None:
        client, req = self.client, self.req
        self._detach()
        self.close()
        if client is not None and req is not None:
            client.upstream_failed(req, why, retry_ok=self.reused and not req.resp_started
                                   and not parse_error and self.status == 0)

    def _start_tunnel(self, rest: bytes) -> None:
        client = self.client
        req = self.req
        if client is None or req is None:
            self.close()
            return
        self.tunnel = True
        if rest:
            self.outbox.write(client.transport, rest)
        client.start_tunnel(req, self)

    def pause_reading(self) -> None:
        t = self.transport
        if t is not None and not self.read_paused:
            self.read_paused = True
            t.pause_reading()

    def resume_reading(self) -> None:
        t = self.transport
        if t is not None and self.read_paused:
            self.read_paused = False
            t.resume_reading()

    def close(self) -> None:
        t = self.transport
        if t is not None:
            self.outbox.close(t)

    def abort(self) -> None:
        t = self.transport
        if t is not None:
            t.abort()
