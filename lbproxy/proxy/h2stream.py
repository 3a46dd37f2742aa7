"""One HTTP/2 stream as one HTTP/1.1 exchange: the request's HEADERS turned into an HTTP/1.1 head
(with the checks HTTP/2 adds to HTTP/1.1's), and the transport a per-stream `ClientConnection`
writes its HTTP/1.1 response into, turned back into HEADERS and DATA.

Each stream gets its own `ClientConnection` (client.py), fed the request as HTTP/1.1 bytes
(`Connection: close`: one request each), so routing, the request checks, limits, deadlines,
retries, accounting and the access log are those of HTTP/1.1, from the same code. Its transport
is the `H2Stream` below: what the connection writes (a relayed response or a local answer) is
parsed by llhttp and sent as frames within the client's flow-control windows; what it cannot send
yet is held, and above HIGH_WATER the connection is told to pause (its real server's reads stop),
as a real transport's full buffer would. Reading pauses become withheld WINDOW_UPDATEs: the
client cannot send more request body than the stream's window.
"""

from __future__ import annotations

import asyncio
import re
from typing import TYPE_CHECKING, Any, Protocol

import httptools
from h2.errors import ErrorCodes

from .http import CRLF

if TYPE_CHECKING:
    from .client import ClientConnection

# Held response bytes of one stream above which its real server's reads pause / below which
# they resume (flow control toward the client is the client's window; this bounds our memory).
HIGH_WATER = 256 * 1024
LOW_WATER = 64 * 1024

# RFC 9113 §8.2.2: fields that are specific to a connection never appear in HTTP/2; the response
# loses them on the way (the request is refused for them, by h2 and by `request_head`).
CONNECTION_FIELDS = frozenset((b"connection", b"keep-alive", b"proxy-connection",
                               b"transfer-encoding", b"upgrade", b"te", b"http2-settings"))
_TOKEN = re.compile(rb"[!#$%&'*+\-.^_`|~0-9a-z]+\Z")
_BAD_VALUE = re.compile(rb"[\x00\r\n]")
_BAD_TARGET = re.compile(rb"[\x00-\x20\x7f]")


class Session(Protocol):
    """What a stream needs from its connection (h2conn.py's H2Session, which this module cannot
    import: it imports this one)."""

    @property
    def transport(self) -> asyncio.Transport: ...

    def ack(self, sid: int, flow: int) -> None: ...

    def reset(self, s: H2Stream, code: ErrorCodes) -> None: ...

    def push(self, s: H2Stream) -> None: ...

    def schedule(self) -> None: ...

    def conn_done(self, s: H2Stream) -> None: ...

    def send_headers(self, s: H2Stream, status: int, headers: list[tuple[bytes, bytes]],
                     end: bool) -> None: ...


# RFC 9113 §8.2.1: a field name is lower case, of visible ASCII, with a colon only as the first
# byte of a pseudo-header; a value holds no NUL, CR or LF and neither starts nor ends with SP/HTAB.
_H2_NAME = re.compile(rb":?[\x21-\x39\x3b-\x40\x5b-\x7e]+\Z")
_H2_BAD_VALUE = re.compile(rb"[\x00\r\n]|\A[ \t]|[ \t]\Z")
# §8.2.2 (TE is allowed with "trailers" only, below).
_H2_CONNECTION = frozenset((b"connection", b"proxy-connection", b"keep-alive",
                            b"transfer-encoding", b"upgrade"))
# §8.3.1 (and :protocol, RFC 8441, with CONNECT only).
_H2_PSEUDO = frozenset((b":method", b":scheme", b":authority", b":path", b":protocol"))


def malformed(headers: list[tuple[bytes, bytes]], trailers: bool = False) -> str | None:
    """Why a request's decoded header list (or its trailers) is malformed by RFC 9113 §8.1.1,
    or None: an invalid or upper-case name, a value with NUL/CR/LF or surrounding spaces, a
    connection-specific field, TE other than "trailers", a pseudo-header unknown, repeated,
    after a regular field or in trailers, :method/:scheme/:path missing (CONNECT: :scheme and
    :path present without :protocol), an empty :path, no :authority nor Host, two Host fields,
    :authority and Host differing. The verdicts of h2's own `validate_headers` (which makes them
    a connection error; this is a stream error), in one pass rather than six chained generators
    (tests/proxy/test_h2_conformance.py compares the two on mutated header lists)."""
    pseudo: set[bytes] = set()
    regular = False
    method = authority = host = None
    for name, value in headers:
        if not _H2_NAME.match(name):
            return f"invalid field name {name[:40]!r}"
        if value and _H2_BAD_VALUE.search(value):
            return f"invalid value of {name[:40]!r}"
        if name[0] == 0x3A:  # ':'
            if name in pseudo:
                return f"repeated {name!r}"
            if regular:
                return f"{name[:40]!r} after a regular field"
            if name not in _H2_PSEUDO:
                return f"pseudo-header {name[:40]!r} in a request"
            pseudo.add(name)
            if name == b":method":
                method = value
            elif name == b":authority":
                authority = value
            elif name == b":path" and not value:
                return "empty :path"
        else:
            regular = True
            if name in _H2_CONNECTION:
                return f"connection-specific field {name!r}"
            if name == b"te" and value.lower() != b"trailers":
                return "TE other than trailers"
            if name == b"host":
                if host is not None and not trailers:
                    return "two Host fields"
                host = value
    if trailers:
        return f"pseudo-header in trailers: {sorted(pseudo)}" if pseudo else None
    if method is None:
        return "no :method"
    connect = method == b"CONNECT"
    if connect and b":protocol" not in pseudo:
        if b":scheme" in pseudo or b":path" in pseudo:
            return "CONNECT with :scheme or :path"
    elif b":scheme" not in pseudo or b":path" not in pseudo:
        return "no :scheme or :path"
    elif not connect and b":protocol" in pseudo:
        return ":protocol without CONNECT"
    if authority is None and host is None:
        return "no :authority nor Host"
    if authority is not None and host is not None and authority != host:
        return ":authority and Host differ"
    return None


class BadRequest(Exception):
    """A request HTTP/2 itself allows through but HTTP/1.1 could not carry as sent (answered 400
    on its stream)."""


def request_head(headers: list[tuple[bytes, bytes]], end_stream: bool
                 ) -> tuple[bytes, bool, int]:
    """The HTTP/1.1 head (`Connection: close`) for a request's decoded header list, whether its
    body goes chunked, and its Content-Length (-1: none). Raises BadRequest.

    `malformed` already refused what RFC 9113 calls malformed (pseudo-fields out of place,
    upper case names, connection-specific fields, a missing :method/:path/:scheme).
    Here: control bytes in names or values (a CR LF would start a field of its own on the HTTP/1.1
    side), one Host (from :authority, or the host field when there is none; both must agree),
    one Content-Length, TE other than "trailers", cookies joined (§8.2.3)."""
    method = path = authority = b""
    host = clen = b""
    fields: list[bytes] = []
    cookies: list[bytes] = []
    for name, value in headers:
        if _BAD_VALUE.search(value):
            raise BadRequest(f"control bytes in the value of {name!r}")
        if name[:1] == b":":
            if name == b":method":
                method = value
            elif name == b":path":
                path = value
            elif name == b":authority":
                authority = value
            elif name != b":scheme":
                raise BadRequest(f"unknown pseudo-header {name!r}")
            continue
        if not _TOKEN.match(name):
            raise BadRequest(f"bad field name {name!r}")
        if name in CONNECTION_FIELDS:
            if name == b"te" and value.strip().lower() == b"trailers":
                continue  # allowed in HTTP/2; hop-by-hop, so not forwarded
            raise BadRequest(f"connection-specific field {name!r}")
        if name == b"host":
            if host:
                raise BadRequest("several host fields")
            host = value
        elif name == b"content-length":
            if clen and clen != value:
                raise BadRequest("several Content-Length values")
            if not value.isdigit() or len(value) > 18:
                raise BadRequest("bad Content-Length")
            clen = value
        elif name == b"cookie":
            cookies.append(value)
        else:
            fields += (name, b": ", value, CRLF)
    if not _TOKEN.match(method.lower()) or not method:
        raise BadRequest("bad :method")
    if method == b"CONNECT":
        path = authority  # answered by the HTTP/1.1 side (405), as for HTTP/1.1 clients
    elif not path or _BAD_TARGET.search(path) or not (path[:1] == b"/" or path == b"*"):
        raise BadRequest("bad :path")
    if authority and host and authority != host:
        raise BadRequest(":authority and host differ")
    host = authority or host
    if not host or _BAD_TARGET.search(host):
        raise BadRequest("no :authority or host")
    length = int(clen) if clen else -1
    if end_stream and length > 0:
        raise BadRequest("Content-Length without the body")
    chunked = not end_stream and length < 0
    parts = [method, b" ", path, b" HTTP/1.1\r\nHost: ", host, CRLF]
    parts += fields
    if cookies:
        parts += (b"cookie: ", b"; ".join(cookies), CRLF)
    if clen:
        parts += (b"Content-Length: ", clen, CRLF)
    elif chunked:
        parts.append(b"Transfer-Encoding: chunked\r\n")
    parts.append(b"Connection: close\r\n\r\n")
    return b"".join(parts), chunked, length


class H2Stream:
    """One stream: the transport of its `ClientConnection` (the asyncio.Transport methods it
    uses) and the state of both directions."""

    __slots__ = (
        "body_left", "chunked", "closed", "conn", "ended", "fields", "framed", "in_buf",
        "in_paused", "interim", "is_head", "msg_done", "out", "out_size", "parser", "req_done",
        "sent_head", "session", "sid", "up_paused")

    def __init__(self, session: Session, sid: int, is_head: bool, chunked: bool,
                 length: int) -> None:
        self.session = session
        self.sid = sid
        self.conn: ClientConnection | None = None
        self.parser: Any = httptools.HttpResponseParser(self)
        self.is_head = is_head
        self.chunked = chunked  # the request body goes chunked (no Content-Length given)
        self.body_left = length  # request body bytes still owed (-1: no Content-Length)
        self.fields: list[tuple[bytes, bytes]] = []
        self.out: list[bytes] = []  # response DATA not sent yet (window, or the TCP buffer)
        self.out_size = 0
        self.in_buf: list[tuple[bytes, int]] = []  # request DATA held while reading is paused
        self.in_paused = False
        self.up_paused = False  # we told the connection to pause (its real server's reads)
        self.closed = False  # the ClientConnection closed its transport (or it was reset)
        self.ended = False  # END_STREAM or RST_STREAM went out: nothing more to send
        self.sent_head = False
        self.msg_done = False
        self.framed = True  # the response has Content-Length or chunked (not ended by close)
        self.interim = False
        self.req_done = False  # the client's END_STREAM came (or the request was given up)

    # -- the request body, toward the ClientConnection -----------------------------------------

    def feed(self, data: bytes, flow: int) -> None:
        """DATA from the client (`flow`: its flow-controlled length, padding included)."""
        if self.conn is None or self.closed:
            self.session.ack(self.sid, flow)  # answered already: read and dropped
            return
        if self.body_left >= 0:
            self.body_left -= len(data)
            if self.body_left < 0:
                self.session.reset(self, ErrorCodes.PROTOCOL_ERROR)  # more than Content-Length
                return
        if self.in_paused or self.in_buf:
            self.in_buf.append((data, flow))
            return
        self._deliver(data, flow)

    def end_request(self) -> None:
        """The client's END_STREAM (trailers, if any, are not forwarded)."""
        self.req_done = True
        if self.body_left > 0:
            self.session.reset(self, ErrorCodes.PROTOCOL_ERROR)  # less than Content-Length
            return
        if self.chunked:
            if self.in_paused or self.in_buf:
                self.in_buf.append((b"", -1))
            else:
                self._deliver(b"", -1)

    def _deliver(self, data: bytes, flow: int) -> None:
        conn = self.conn
        if conn is None or self.closed:
            if flow > 0:
                self.session.ack(self.sid, flow)
            return
        if flow < 0:
            conn.data_received(b"0\r\n\r\n")
            return
        if data:
            conn.data_received(b"%x\r\n%b\r\n" % (len(data), data) if self.chunked else data)
        if flow and not self.closed:
            self.session.ack(self.sid, flow)

    def pause_reading(self) -> None:
        self.in_paused = True

    def resume_reading(self) -> None:
        if not self.in_paused:
            return
        self.in_paused = False
        while self.in_buf and not self.in_paused and not self.closed:
            data, flow = self.in_buf.pop(0)
            self._deliver(data, flow)
        if self.closed:
            self.drop_input()
        self.session.schedule()

    def drop_input(self) -> None:
        """Give back the window of request body held and never delivered."""
        held, self.in_buf = self.in_buf, []
        for _, flow in held:
            if flow > 0:
                self.session.ack(self.sid, flow)

    # -- the transport the ClientConnection writes its HTTP/1.1 response into -------------------

    def write(self, data: bytes) -> None:
        if self.ended or self.msg_done:
            return
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError:
            if not (self.is_head and self.sent_head):
                self.session.reset(self, ErrorCodes.INTERNAL_ERROR)
                return
        self.session.push(self)

    def writelines(self, chunks: list[bytes]) -> None:
        self.write(b"".join(chunks))

    def is_closing(self) -> bool:
        return self.closed

    def close(self) -> None:
        """The ClientConnection is done with this stream: the response ends here (a response
        delimited by the close, or one cut short: then the stream is reset)."""
        if self.closed:
            return
        self.closed = True
        self.drop_input()
        if not self.ended:
            if self.sent_head and (self.msg_done or not self.framed or self.is_head):
                self.msg_done = True
                self.session.push(self)
            else:
                self.session.reset(self, ErrorCodes.INTERNAL_ERROR)
        self.session.conn_done(self)

    def abort(self) -> None:
        if self.closed:
            return
        self.closed = True
        self.drop_input()
        if not self.ended:
            self.session.reset(self, ErrorCodes.INTERNAL_ERROR)
        self.session.conn_done(self)

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return self.session.transport.get_extra_info(name, default)

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        pass  # HIGH_WATER / LOW_WATER above

    def get_write_buffer_size(self) -> int:
        return self.out_size

    # -- httptools callbacks: the HTTP/1.1 response --------------------------------------------

    def on_header(self, name: bytes, value: bytes) -> None:
        self.fields.append((name.lower(), value))

    def on_headers_complete(self) -> None:
        status = self.parser.get_status_code()
        fields, self.fields = self.fields, []
        if status < 200:
            self.interim = True
            if status == 101:
                raise httptools.HttpParserError("101 on an HTTP/2 stream")
            self.session.send_headers(self, status, [], end=False)
            return
        chunked = False
        headers = []
        has_length = False
        for name, value in fields:
            if name in CONNECTION_FIELDS:
                chunked |= name == b"transfer-encoding"
                continue
            if name == b"content-length":
                has_length = True
            headers.append((name, value))
        no_body = self.is_head or status in (204, 304)
        self.framed = chunked or has_length or no_body
        self.sent_head = True
        self.session.send_headers(self, status, headers, end=no_body)
        if no_body:
            self.msg_done = True
            self.ended = True

    def on_body(self, data: bytes) -> None:
        self.out.append(data)
        self.out_size += len(data)

    def on_message_complete(self) -> None:
        if self.interim:
            self.interim = False
            return
        self.msg_done = True
