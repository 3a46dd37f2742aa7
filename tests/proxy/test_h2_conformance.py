"""HTTP/2 conformance of lbproxy's HTTPS VS (h2conn.py, h2stream.py), in the manner of h2spec
(not packaged in Debian, nor on PyPI or npm without a download from GitHub): raw frames sent over
a real TLS connection (ALPN h2) to a running DataPlane, each case named by the RFC 9113 (and RFC
7541, HPACK) section it checks, each asserting the outcome the RFC requires.

Outcomes: a connection error is a GOAWAY with one of the codes allowed (then the close); a stream
error is a RST_STREAM on that stream (`or_goaway`: where the RFC lets an endpoint make a stream
error a connection error (§5.4.1) and h2, the framing library, does so, a GOAWAY with the same
code passes too); malformed requests (§8.1.1) must be stream errors, and the connection must go on
serving (checked by a request after them)."""

from __future__ import annotations

import asyncio
import random
import ssl
import struct
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

import h2.exceptions
import hpack
import pytest
from h2.utilities import HeaderValidationFlags, validate_headers

from lbproxy.proxy.h2stream import malformed
from tests.proxy.conftest import Upstream
from tests.proxy.test_http2 import NAME, Site, make_site
from tests.proxy.test_http2 import site as site  # the fixture, re-exported

WAIT = 5.0
PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"

# Frame types and flags (RFC 9113 §6).
DATA, HEADERS, PRIORITY, RST_STREAM, SETTINGS, PUSH_PROMISE, PING, GOAWAY, WINDOW_UPDATE, \
    CONTINUATION = range(10)
END_STREAM = ACK = 0x1
END_HEADERS = 0x4
PADDED = 0x8
PRIO = 0x20

# Error codes (§7).
NO_ERROR, PROTOCOL_ERROR, INTERNAL_ERROR, FLOW_CONTROL_ERROR, SETTINGS_TIMEOUT, STREAM_CLOSED, \
    FRAME_SIZE_ERROR, REFUSED_STREAM, CANCEL, COMPRESSION_ERROR = range(10)
ENHANCE_YOUR_CALM = 0xB

REQUEST = [(":method", "GET"), (":scheme", "https"), (":path", "/"), (":authority", NAME)]
POST = [(":method", "POST"), *REQUEST[1:]]


def get(path: str) -> list[tuple[str, str]]:
    return [*REQUEST[:2], (":path", path), REQUEST[3]]


def frame(kind: int, flags: int, sid: int, payload: bytes = b"") -> bytes:
    return len(payload).to_bytes(3, "big") + bytes((kind, flags)) + sid.to_bytes(4, "big") + \
        payload


def settings(*pairs: tuple[int, int], flags: int = 0, sid: int = 0) -> bytes:
    return frame(SETTINGS, flags, sid, b"".join(struct.pack("!HI", k, v) for k, v in pairs))


@dataclass
class Frame:
    kind: int
    flags: int
    sid: int
    payload: bytes

    @property
    def code(self) -> int:
        """The error code of a RST_STREAM or GOAWAY."""
        return int.from_bytes(self.payload[:4] if self.kind == RST_STREAM else
                              self.payload[4:8], "big")


@dataclass
class Raw:
    """A client that speaks HTTP/2 frames as bytes, and reads the server's as `Frame`s."""

    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter
    encoder: hpack.Encoder = field(default_factory=hpack.Encoder)
    decoder: hpack.Decoder = field(default_factory=hpack.Decoder)
    seen: list[Frame] = field(default_factory=list)

    @classmethod
    async def open(cls, site: Site, preface: bytes = PREFACE + settings()) -> Raw:
        ctx = ssl.create_default_context()
        site.ca.configure_trust(ctx)
        ctx.set_alpn_protocols(["h2"])
        reader, writer = await asyncio.open_connection("127.0.0.1", site.port, ssl=ctx,
                                                       server_hostname=NAME)
        assert writer.get_extra_info("ssl_object").selected_alpn_protocol() == "h2"
        c = cls(reader, writer)
        c.send(preface)
        return c

    async def ready(self) -> None:
        """The server's SETTINGS acknowledged, and ours acknowledged by it (§3.4, §6.5.3)."""
        await self.expect(lambda f: f.kind == SETTINGS and not f.flags & ACK, "SETTINGS")
        self.send(settings(flags=ACK))
        await self.expect(lambda f: f.kind == SETTINGS and bool(f.flags & ACK), "SETTINGS ACK")

    def send(self, data: bytes) -> None:
        self.writer.write(data)

    def block(self, headers: list[tuple[str, str]]) -> bytes:
        return bytes(self.encoder.encode(headers))

    def headers(self, sid: int, headers: list[tuple[str, str]] = REQUEST,
                flags: int = END_STREAM | END_HEADERS) -> None:
        self.send(frame(HEADERS, flags, sid, self.block(headers)))

    async def next(self) -> Frame | None:
        """The next frame, or None once the server closed."""
        try:
            head = await self.reader.readexactly(9)
            payload = await self.reader.readexactly(int.from_bytes(head[:3], "big"))
        except (asyncio.IncompleteReadError, ConnectionError, ssl.SSLError):
            return None
        f = Frame(head[3], head[4], int.from_bytes(head[5:9], "big") & 0x7FFFFFFF, payload)
        self.seen.append(f)
        return f

    async def expect(self, match: Callable[[Frame], bool], what: str) -> Frame:
        async with asyncio.timeout(WAIT):
            while True:
                f = await self.next()
                assert f is not None, f"closed before {what}; saw {self.seen}"
                if match(f):
                    return f

    async def connection_error(self, *codes: int) -> None:
        """GOAWAY with one of `codes` (§5.4.1), and the connection closes."""
        f = await self.expect(lambda f: f.kind in (GOAWAY, RST_STREAM), "GOAWAY")
        assert f.kind == GOAWAY and f.code in codes, f"wanted GOAWAY {codes}, got {f}"
        async with asyncio.timeout(WAIT):
            while await self.next() is not None:
                pass

    async def stream_error(self, sid: int, *codes: int, or_goaway: bool = False) -> None:
        """RST_STREAM on `sid` with one of `codes` (§5.4.2); `or_goaway`: a GOAWAY with one of
        them passes too (an endpoint MAY make a stream error a connection error, §5.4.1)."""
        f = await self.expect(lambda f: f.kind == GOAWAY or (f.kind == RST_STREAM
                                                             and f.sid == sid), "RST_STREAM")
        if f.kind == GOAWAY:
            assert or_goaway and f.code in codes, f"wanted RST_STREAM {codes}, got {f}"
        else:
            assert f.code in codes, f"wanted RST_STREAM {codes}, got {f}"

    async def response(self, sid: int) -> int:
        """The status of the response on `sid`."""
        f = await self.expect(lambda f: f.kind == GOAWAY or (
            f.sid == sid and f.kind in (HEADERS, RST_STREAM)), f"a response on {sid}")
        assert f.kind == HEADERS, f"wanted a response on {sid}, got {f}"
        hdrs = dict(self.decoder.decode(f.payload))
        return int(hdrs[":status"])

    async def still_serving(self, sid: int) -> None:
        """A good request on `sid` is answered: the connection went on after a stream error."""
        self.headers(sid)
        assert await self.response(sid) == 200

    async def ping_ack(self, payload: bytes) -> None:
        f = await self.expect(lambda f: f.kind == PING and bool(f.flags & ACK), "PING ACK")
        assert f.payload == payload

    def close(self) -> None:
        self.writer.close()


Case = Callable[[Raw], Awaitable[None]]
CASES: list[tuple[str, Case]] = []


def case(name: str) -> Callable[[Case], Case]:
    def add(fn: Case) -> Case:
        CASES.append((name, fn))
        return fn
    return add


PING_DATA = b"h2spec\x00\x01"

# -- §3.4 the connection preface, §4 frames ----------------------------------------------------


@case("4.1 unknown frame type is ignored")
async def _(c: Raw) -> None:
    c.send(frame(0x16, 0, 0, b"hello"))
    c.send(frame(PING, 0, 0, PING_DATA))
    await c.ping_ack(PING_DATA)


@case("4.1 undefined flags are ignored")
async def _(c: Raw) -> None:
    c.send(frame(PING, 0x16, 0, PING_DATA))
    await c.ping_ack(PING_DATA)


@case("4.1 the reserved bit of the stream id is ignored")
async def _(c: Raw) -> None:
    c.send(frame(HEADERS, END_STREAM | END_HEADERS, 0x80000001, c.block(REQUEST)))
    assert await c.response(1) == 200


@case("4.2 DATA over SETTINGS_MAX_FRAME_SIZE: FRAME_SIZE_ERROR")
async def _(c: Raw) -> None:
    c.headers(1, flags=END_HEADERS)
    c.send(frame(DATA, END_STREAM, 1, b"x" * 16385))
    await c.stream_error(1, FRAME_SIZE_ERROR, or_goaway=True)


@case("4.2 a frame length over SETTINGS_MAX_FRAME_SIZE is refused before its payload comes")
async def _(c: Raw) -> None:
    c.send(((1 << 24) - 1).to_bytes(3, "big") + bytes((DATA, 0)) + (1).to_bytes(4, "big") + b"x")
    await c.connection_error(FRAME_SIZE_ERROR)


@case("4.2 HEADERS over SETTINGS_MAX_FRAME_SIZE: connection FRAME_SIZE_ERROR")
async def _(c: Raw) -> None:
    c.send(frame(HEADERS, END_STREAM | END_HEADERS, 1,
                 bytes(c.encoder.encode([*REQUEST, ("x-big", "y" * 17000)], huffman=False))))
    await c.connection_error(FRAME_SIZE_ERROR)


@case("4.3 undecodable header block: connection COMPRESSION_ERROR")
async def _(c: Raw) -> None:
    c.send(frame(HEADERS, END_STREAM | END_HEADERS, 1, b"\xff\xff\xff\xff\xff\xff"))
    await c.connection_error(COMPRESSION_ERROR)


@case("4.3 PRIORITY inside a header block: connection PROTOCOL_ERROR")
async def _(c: Raw) -> None:
    block = c.block(REQUEST)
    c.send(frame(HEADERS, END_STREAM, 1, block[:5]))
    c.send(frame(PRIORITY, 0, 1, struct.pack("!IB", 0, 15)))
    c.send(frame(CONTINUATION, END_HEADERS, 1, block[5:]))
    await c.connection_error(PROTOCOL_ERROR)


# -- §5.1 stream states --------------------------------------------------------------------------


@case("5.1 idle: DATA: connection PROTOCOL_ERROR")
async def _(c: Raw) -> None:
    c.send(frame(DATA, END_STREAM, 1, b"x"))
    await c.connection_error(PROTOCOL_ERROR, STREAM_CLOSED)


@case("5.1 idle: RST_STREAM: connection PROTOCOL_ERROR")
async def _(c: Raw) -> None:
    c.send(frame(RST_STREAM, 0, 1, struct.pack("!I", CANCEL)))
    await c.connection_error(PROTOCOL_ERROR)


@case("5.1 idle: WINDOW_UPDATE: connection PROTOCOL_ERROR")
async def _(c: Raw) -> None:
    c.send(frame(WINDOW_UPDATE, 0, 1, struct.pack("!I", 100)))
    await c.connection_error(PROTOCOL_ERROR)


@case("5.1 idle: CONTINUATION: connection PROTOCOL_ERROR")
async def _(c: Raw) -> None:
    c.send(frame(CONTINUATION, END_HEADERS, 1, c.block(REQUEST)))
    await c.connection_error(PROTOCOL_ERROR)


@case("5.1 half-closed (remote): DATA: STREAM_CLOSED")
async def _(c: Raw) -> None:
    c.headers(1, get("/slow?d=0.3"))
    c.send(frame(DATA, END_STREAM, 1, b"x"))
    await c.stream_error(1, STREAM_CLOSED, or_goaway=True)


@case("5.1 half-closed (remote): HEADERS: STREAM_CLOSED")
async def _(c: Raw) -> None:
    c.headers(1, get("/slow?d=0.3"))
    c.headers(1)
    await c.stream_error(1, STREAM_CLOSED, or_goaway=True)


@case("5.1 closed: DATA after the stream ended: STREAM_CLOSED")
async def _(c: Raw) -> None:
    c.headers(1)
    await c.expect(lambda f: f.sid == 1 and bool(f.flags & END_STREAM), "the response's end")
    c.send(frame(DATA, END_STREAM, 1, b"x"))
    await c.stream_error(1, STREAM_CLOSED, or_goaway=True)


@case("5.1 closed: HEADERS after the stream ended: STREAM_CLOSED")
async def _(c: Raw) -> None:
    c.headers(1)
    await c.expect(lambda f: f.sid == 1 and bool(f.flags & END_STREAM), "the response's end")
    c.headers(1)
    await c.connection_error(STREAM_CLOSED, PROTOCOL_ERROR)


@case("5.1.1 even stream id from a client: connection PROTOCOL_ERROR")
async def _(c: Raw) -> None:
    c.headers(2)
    await c.connection_error(PROTOCOL_ERROR)


@case("5.1.1 stream id lower than a previous one: connection PROTOCOL_ERROR")
async def _(c: Raw) -> None:
    c.headers(5)
    assert await c.response(5) == 200
    c.headers(3)
    await c.connection_error(PROTOCOL_ERROR)


@case("5.1.2 over SETTINGS_MAX_CONCURRENT_STREAMS: PROTOCOL_ERROR or REFUSED_STREAM")
async def _(c: Raw) -> None:
    for i in range(101):  # 100 allowed; each waits for its request body
        c.headers(1 + 2 * i, POST, flags=END_HEADERS)
    await c.stream_error(201, PROTOCOL_ERROR, REFUSED_STREAM, or_goaway=True)


# -- §5.3 priority, §5.5 extensions --------------------------------------------------------------


@case("5.3.1 HEADERS depending on its own stream: PROTOCOL_ERROR")
async def _(c: Raw) -> None:
    c.send(frame(HEADERS, END_STREAM | END_HEADERS | PRIO, 1,
                 struct.pack("!IB", 1, 15) + c.block(REQUEST)))
    await c.stream_error(1, PROTOCOL_ERROR, or_goaway=True)


@case("5.3.1 PRIORITY depending on its own stream: PROTOCOL_ERROR")
async def _(c: Raw) -> None:
    c.send(frame(PRIORITY, 0, 1, struct.pack("!IB", 1, 15)))
    await c.stream_error(1, PROTOCOL_ERROR, or_goaway=True)


@case("5.5 unknown frame inside a header block: connection PROTOCOL_ERROR")
async def _(c: Raw) -> None:
    block = c.block(REQUEST)
    c.send(frame(HEADERS, END_STREAM, 1, block[:5]))
    c.send(frame(0x16, 0, 1, b"x"))
    c.send(frame(CONTINUATION, END_HEADERS, 1, block[5:]))
    await c.connection_error(PROTOCOL_ERROR)


# -- §6.1 DATA, §6.2 HEADERS, §6.3 PRIORITY, §6.4 RST_STREAM ------------------------------------


@case("6.1 DATA on stream 0: connection PROTOCOL_ERROR")
async def _(c: Raw) -> None:
    c.send(frame(DATA, END_STREAM, 0, b"x"))
    await c.connection_error(PROTOCOL_ERROR)


@case("6.1 DATA with a pad length over its payload: connection PROTOCOL_ERROR")
async def _(c: Raw) -> None:
    c.headers(1, flags=END_HEADERS)
    c.send(frame(DATA, END_STREAM | PADDED, 1, b"\x09abc"))
    await c.connection_error(PROTOCOL_ERROR)


@case("6.2 HEADERS on stream 0: connection PROTOCOL_ERROR")
async def _(c: Raw) -> None:
    c.headers(0)
    await c.connection_error(PROTOCOL_ERROR)


@case("6.2 HEADERS with a pad length over its payload: connection PROTOCOL_ERROR")
async def _(c: Raw) -> None:
    c.send(frame(HEADERS, END_STREAM | END_HEADERS | PADDED, 1, b"\xff" + c.block(REQUEST)))
    await c.connection_error(PROTOCOL_ERROR)


@case("6.2 HEADERS followed by DATA before END_HEADERS: connection PROTOCOL_ERROR")
async def _(c: Raw) -> None:
    block = c.block(REQUEST)
    c.send(frame(HEADERS, 0, 1, block[:5]))
    c.send(frame(DATA, END_STREAM, 1, b"x"))
    await c.connection_error(PROTOCOL_ERROR)


@case("6.2 HEADERS followed by CONTINUATION of another stream: connection PROTOCOL_ERROR")
async def _(c: Raw) -> None:
    block = c.block(REQUEST)
    c.send(frame(HEADERS, END_STREAM, 1, block[:5]))
    c.send(frame(CONTINUATION, END_HEADERS, 3, block[5:]))
    await c.connection_error(PROTOCOL_ERROR)


@case("6.3 PRIORITY on stream 0: connection PROTOCOL_ERROR")
async def _(c: Raw) -> None:
    c.send(frame(PRIORITY, 0, 0, struct.pack("!IB", 1, 15)))
    await c.connection_error(PROTOCOL_ERROR)


@case("6.3 PRIORITY of 4 bytes: FRAME_SIZE_ERROR")
async def _(c: Raw) -> None:
    c.send(frame(PRIORITY, 0, 1, struct.pack("!I", 0)))
    await c.stream_error(1, FRAME_SIZE_ERROR, or_goaway=True)


@case("6.4 RST_STREAM on stream 0: connection PROTOCOL_ERROR")
async def _(c: Raw) -> None:
    c.send(frame(RST_STREAM, 0, 0, struct.pack("!I", CANCEL)))
    await c.connection_error(PROTOCOL_ERROR)


@case("6.4 RST_STREAM of 3 bytes: connection FRAME_SIZE_ERROR")
async def _(c: Raw) -> None:
    c.headers(1, flags=END_HEADERS)
    c.send(frame(RST_STREAM, 0, 1, b"\x00\x00\x08"))
    await c.connection_error(FRAME_SIZE_ERROR)


# -- §6.5 SETTINGS ----------------------------------------------------------------------------


@case("6.5 SETTINGS ACK with a payload: connection FRAME_SIZE_ERROR")
async def _(c: Raw) -> None:
    c.send(settings((1, 4096), flags=ACK))
    await c.connection_error(FRAME_SIZE_ERROR)


@case("6.5 SETTINGS on a stream: connection PROTOCOL_ERROR")
async def _(c: Raw) -> None:
    c.send(settings((1, 4096), sid=1))
    await c.connection_error(PROTOCOL_ERROR)


@case("6.5 SETTINGS of a length not a multiple of 6: connection FRAME_SIZE_ERROR")
async def _(c: Raw) -> None:
    c.send(frame(SETTINGS, 0, 0, b"\x00\x01\x00\x00\x10"))
    await c.connection_error(FRAME_SIZE_ERROR)


@case("6.5.2 SETTINGS_ENABLE_PUSH 2: connection PROTOCOL_ERROR")
async def _(c: Raw) -> None:
    c.send(settings((2, 2)))
    await c.connection_error(PROTOCOL_ERROR)


@case("6.5.2 SETTINGS_INITIAL_WINDOW_SIZE over 2^31-1: connection FLOW_CONTROL_ERROR")
async def _(c: Raw) -> None:
    c.send(settings((4, 1 << 31)))
    await c.connection_error(FLOW_CONTROL_ERROR)


@case("6.5.2 SETTINGS_MAX_FRAME_SIZE under 16384: connection PROTOCOL_ERROR")
async def _(c: Raw) -> None:
    c.send(settings((5, 16383)))
    await c.connection_error(PROTOCOL_ERROR)


@case("6.5.2 SETTINGS_MAX_FRAME_SIZE over 2^24-1: connection PROTOCOL_ERROR")
async def _(c: Raw) -> None:
    c.send(settings((5, 1 << 24)))
    await c.connection_error(PROTOCOL_ERROR)


@case("6.5.2 unknown setting is ignored (and acknowledged)")
async def _(c: Raw) -> None:
    c.send(settings((0xFF, 1)))
    await c.expect(lambda f: f.kind == SETTINGS and bool(f.flags & ACK), "SETTINGS ACK")
    await c.still_serving(1)


@case("6.5.3 SETTINGS are acknowledged, and applied (SETTINGS_MAX_FRAME_SIZE)")
async def _(c: Raw) -> None:
    c.send(settings((5, 20000)))
    await c.expect(lambda f: f.kind == SETTINGS and bool(f.flags & ACK), "SETTINGS ACK")
    c.headers(1, get("/big?n=100000"))
    f = await c.expect(lambda f: f.kind == DATA and f.sid == 1 and len(f.payload) > 16384,
                       "a DATA frame over 16384 bytes")
    assert len(f.payload) <= 20000


@case("6.5.2 a header list over SETTINGS_MAX_HEADER_LIST_SIZE (an HPACK bomb): refused")
async def _(c: Raw) -> None:
    # One 4000-byte field into the dynamic table (§6.2.1 of RFC 7541), then 9 references to it
    # (index 62, the first dynamic entry): 40 KB decoded from 4 KB sent, over the 32 KiB allowed.
    enc = hpack.Encoder()
    block = bytes(enc.encode([*REQUEST, ("x-bomb", "b" * 4000)], huffman=False)) + b"\xbe" * 9
    c.send(frame(HEADERS, END_STREAM | END_HEADERS, 1, block))
    await c.connection_error(ENHANCE_YOUR_CALM, PROTOCOL_ERROR)


# -- §6.7 PING, §6.8 GOAWAY, §6.9 WINDOW_UPDATE ---------------------------------------------


@case("6.7 PING is answered with ACK and the same payload")
async def _(c: Raw) -> None:
    c.send(frame(PING, 0, 0, PING_DATA))
    await c.ping_ack(PING_DATA)


@case("6.7 PING with ACK is not answered")
async def _(c: Raw) -> None:
    c.send(frame(PING, ACK, 0, b"unwanted"))
    c.send(frame(PING, 0, 0, PING_DATA))
    await c.ping_ack(PING_DATA)  # the first ACK seen is the second PING's


@case("6.7 PING on a stream: connection PROTOCOL_ERROR")
async def _(c: Raw) -> None:
    c.send(frame(PING, 0, 1, PING_DATA))
    await c.connection_error(PROTOCOL_ERROR)


@case("6.7 PING of 6 bytes: connection FRAME_SIZE_ERROR")
async def _(c: Raw) -> None:
    c.send(frame(PING, 0, 0, b"123456"))
    await c.connection_error(FRAME_SIZE_ERROR)


@case("6.8 GOAWAY on a stream: connection PROTOCOL_ERROR")
async def _(c: Raw) -> None:
    c.send(frame(GOAWAY, 0, 1, struct.pack("!II", 0, NO_ERROR)))
    await c.connection_error(PROTOCOL_ERROR)


@case("6.8 GOAWAY from the client: the server closes")
async def _(c: Raw) -> None:
    c.send(frame(GOAWAY, 0, 0, struct.pack("!II", 0, NO_ERROR)))
    async with asyncio.timeout(WAIT):
        while await c.next() is not None:
            pass


@case("6.9 WINDOW_UPDATE of 0 on the connection: connection PROTOCOL_ERROR")
async def _(c: Raw) -> None:
    c.send(frame(WINDOW_UPDATE, 0, 0, struct.pack("!I", 0)))
    await c.connection_error(PROTOCOL_ERROR)


@case("6.9 WINDOW_UPDATE of 0 on a stream: PROTOCOL_ERROR")
async def _(c: Raw) -> None:
    c.headers(1, flags=END_HEADERS)
    c.send(frame(WINDOW_UPDATE, 0, 1, struct.pack("!I", 0)))
    await c.stream_error(1, PROTOCOL_ERROR, or_goaway=True)


@case("6.9 WINDOW_UPDATE of 3 bytes: connection FRAME_SIZE_ERROR")
async def _(c: Raw) -> None:
    c.send(frame(WINDOW_UPDATE, 0, 0, b"\x00\x00\x01"))
    await c.connection_error(FRAME_SIZE_ERROR)


@case("6.9.1 connection window over 2^31-1: connection FLOW_CONTROL_ERROR")
async def _(c: Raw) -> None:
    c.send(frame(WINDOW_UPDATE, 0, 0, struct.pack("!I", 0x7FFFFFFF)))
    c.send(frame(WINDOW_UPDATE, 0, 0, struct.pack("!I", 0x7FFFFFFF)))
    await c.connection_error(FLOW_CONTROL_ERROR)


@case("6.9.1 stream window over 2^31-1: FLOW_CONTROL_ERROR")
async def _(c: Raw) -> None:
    c.headers(1, flags=END_HEADERS)
    c.send(frame(WINDOW_UPDATE, 0, 1, struct.pack("!I", 0x7FFFFFFF)))
    c.send(frame(WINDOW_UPDATE, 0, 1, struct.pack("!I", 0x7FFFFFFF)))
    await c.stream_error(1, FLOW_CONTROL_ERROR, or_goaway=True)


@case("6.9.2 SETTINGS_INITIAL_WINDOW_SIZE overflowing a stream window: FLOW_CONTROL_ERROR")
async def _(c: Raw) -> None:
    c.headers(1, flags=END_HEADERS)
    c.send(frame(WINDOW_UPDATE, 0, 1, struct.pack("!I", 0x7FFFFFFF - 65535)))
    c.send(settings((4, 65536)))
    await c.stream_error(1, FLOW_CONTROL_ERROR, or_goaway=True)


# -- §6.10 CONTINUATION -----------------------------------------------------------------------


@case("6.10 a header block over several CONTINUATIONs is one request")
async def _(c: Raw) -> None:
    block = c.block(REQUEST)
    c.send(frame(HEADERS, END_STREAM, 1, block[:3]))
    c.send(frame(CONTINUATION, 0, 1, block[3:6]))
    c.send(frame(CONTINUATION, END_HEADERS, 1, block[6:]))
    assert await c.response(1) == 200


@case("6.10 CONTINUATION after END_HEADERS: connection PROTOCOL_ERROR")
async def _(c: Raw) -> None:
    block = c.block(REQUEST)
    c.send(frame(HEADERS, END_HEADERS, 1, block))
    c.send(frame(CONTINUATION, END_HEADERS, 1, c.block([("x-more", "1")])))
    await c.connection_error(PROTOCOL_ERROR)


@case("6.10 CONTINUATION on stream 0: connection PROTOCOL_ERROR")
async def _(c: Raw) -> None:
    block = c.block(REQUEST)
    c.send(frame(HEADERS, END_STREAM, 1, block[:5]))
    c.send(frame(CONTINUATION, END_HEADERS, 0, block[5:]))
    await c.connection_error(PROTOCOL_ERROR)


# -- §8 HTTP semantics: malformed requests are stream errors (§8.1.1) ---------------------------


def _malformed(headers: list[tuple[str, str]], name: str) -> None:
    @case(name)
    async def _(c: Raw) -> None:
        c.headers(1, headers)
        await c.stream_error(1, PROTOCOL_ERROR)
        await c.still_serving(3)


_malformed([*REQUEST, ("X-Upper", "a")], "8.2 upper case field name: RST_STREAM PROTOCOL_ERROR")
_malformed([*REQUEST, ("connection", "keep-alive")],
           "8.2.2 connection-specific field: RST_STREAM PROTOCOL_ERROR")
_malformed([*REQUEST, ("te", "gzip")], "8.2.2 TE other than trailers: RST_STREAM PROTOCOL_ERROR")
_malformed([*REQUEST, ("x-bad", " padded ")],
           "8.2.1 value with surrounding whitespace: RST_STREAM PROTOCOL_ERROR")
_malformed([*REQUEST, (":foo", "bar")], "8.3 unknown pseudo-header: RST_STREAM PROTOCOL_ERROR")
_malformed([*REQUEST, (":status", "200")],
           "8.3 response pseudo-header in a request: RST_STREAM PROTOCOL_ERROR")
_malformed([*REQUEST, (":path", "/again")], "8.3 repeated :path: RST_STREAM PROTOCOL_ERROR")
_malformed([REQUEST[0], ("x-a", "b"), *REQUEST[1:]],
           "8.3 pseudo-header after a regular field: RST_STREAM PROTOCOL_ERROR")
_malformed([r for r in REQUEST if r[0] != ":method"],
           "8.3.1 missing :method: RST_STREAM PROTOCOL_ERROR")
_malformed([r for r in REQUEST if r[0] != ":scheme"],
           "8.3.1 missing :scheme: RST_STREAM PROTOCOL_ERROR")
_malformed([r for r in REQUEST if r[0] != ":path"],
           "8.3.1 missing :path: RST_STREAM PROTOCOL_ERROR")
_malformed(get(""),
           "8.3.1 empty :path: RST_STREAM PROTOCOL_ERROR")


@case("8.1 trailers with a pseudo-header: RST_STREAM PROTOCOL_ERROR")
async def _(c: Raw) -> None:
    c.headers(1, POST, flags=END_HEADERS)
    c.send(frame(DATA, 0, 1, b"x"))
    c.headers(1, [(":path", "/trailer")])
    await c.stream_error(1, PROTOCOL_ERROR)
    await c.still_serving(3)


@case("8.1 trailers without END_STREAM: PROTOCOL_ERROR")
async def _(c: Raw) -> None:
    c.headers(1, flags=END_HEADERS)
    c.send(frame(DATA, 0, 1, b"x"))
    c.headers(1, [("x-trailer", "1")], flags=END_HEADERS)
    await c.stream_error(1, PROTOCOL_ERROR, or_goaway=True)


@case("8.1.1 DATA longer than content-length: PROTOCOL_ERROR")
async def _(c: Raw) -> None:
    c.headers(1, [*POST, ("content-length", "1")], flags=END_HEADERS)
    c.send(frame(DATA, END_STREAM, 1, b"toolong"))
    await c.stream_error(1, PROTOCOL_ERROR, or_goaway=True)


@case("8.1 a stream error leaves the other open streams going")
async def _(c: Raw) -> None:
    c.headers(1, get("/slow?d=0.2"))
    c.headers(3, [*REQUEST, ("connection", "close")])
    await c.stream_error(3, PROTOCOL_ERROR)
    assert await c.response(1) == 200


# -- RFC 7541 HPACK -----------------------------------------------------------------------------


@case("HPACK 4.2 dynamic table size update over SETTINGS_HEADER_TABLE_SIZE: COMPRESSION_ERROR")
async def _(c: Raw) -> None:
    # 0x3f 0xe1 0x7f: a size update to 31 + 0x61 + (0x7f << 7) = 16384, over the 4096 allowed.
    c.send(frame(HEADERS, END_STREAM | END_HEADERS, 1, b"\x3f\xe1\x7f" + c.block(REQUEST)))
    await c.connection_error(COMPRESSION_ERROR)


@case("HPACK 2.3.3 index out of the tables: COMPRESSION_ERROR")
async def _(c: Raw) -> None:
    c.send(frame(HEADERS, END_STREAM | END_HEADERS, 1, b"\xff\x80\x01"))
    await c.connection_error(COMPRESSION_ERROR)


# -- the validator against h2's own --------------------------------------------------------------

_NAMES = [b":method", b":scheme", b":path", b":authority", b":status", b":protocol", b":foo",
          b":", b"", b"host", b"te", b"connection", b"keep-alive", b"proxy-connection",
          b"transfer-encoding", b"upgrade", b"content-length", b"x-a", b"X-A", b"x:y", b"a b",
          b"x\x7f", b"x\xe9", b"cookie"]
_VALUES = [b"GET", b"POST", b"CONNECT", b"/", b"", b"https", b"h.example", b"other.example",
           b" x", b"x\t", b"a\r\nb", b"a\x00", b"trailers", b"TRAILERS", b"gzip", b"websocket"]


@pytest.mark.parametrize("trailers", [False, True])
def test_malformed_agrees_with_h2s_validator(trailers: bool) -> None:
    """h2stream.malformed (one pass) and h2's validate_headers (what h2 runs when
    validate_inbound_headers is on) give the same verdict on 20,000 seeded mutations of a valid
    request's header list (and of trailers)."""
    rng = random.Random(9113)
    flags = HeaderValidationFlags(is_client=False, is_trailer=trailers, is_response_header=False,
                                  is_push_promise=False)
    base = [(k.encode(), v.encode()) for k, v in REQUEST] + [(b"x-a", b"1")]
    if trailers:
        base = [(b"x-trailer", b"1")]
    disagreements = []
    for _ in range(20_000):
        h = list(base)
        for _ in range(rng.randint(0, 3)):
            op = rng.randrange(4)
            i = rng.randrange(len(h) + 1)
            pair = (rng.choice(_NAMES), rng.choice(_VALUES))
            if op == 0 or not h:
                h.insert(i, pair)
            elif op == 1:
                del h[min(i, len(h) - 1)]
            elif op == 2:
                h[min(i, len(h) - 1)] = pair
            else:
                j = rng.randrange(len(h))
                h[min(i, len(h) - 1)], h[j] = h[j], h[min(i, len(h) - 1)]
        try:
            list(validate_headers(h, flags))
            theirs = True
        except h2.exceptions.ProtocolError:
            theirs = False
        ours = malformed(h, trailers) is None
        if ours != theirs:
            disagreements.append((h, ours, theirs))
    assert not disagreements, disagreements[:5]


@pytest.mark.parametrize("name_case", CASES, ids=[name for name, _ in CASES])
async def test_rfc9113(name_case: tuple[str, Case], site: Site) -> None:
    _, run = name_case
    c = await Raw.open(site)
    try:
        await c.ready()
        await run(c)
    finally:
        c.close()


async def test_invalid_connection_preface_is_a_connection_error(site: Site) -> None:
    """§3.4: a client preface other than PRI * HTTP/2.0...: PROTOCOL_ERROR (GOAWAY) and close."""
    c = await Raw.open(site, preface=b"PRI * HTTP/1.1\r\n\r\nSM\r\n\r\n" + settings())
    try:
        await c.connection_error(PROTOCOL_ERROR)
    finally:
        c.close()


async def test_preface_must_be_followed_by_settings(site: Site) -> None:
    """§3.4: the client preface ends with a SETTINGS frame; anything else is PROTOCOL_ERROR."""
    c = await Raw.open(site, preface=PREFACE + frame(PING, 0, 0, PING_DATA))
    try:
        await c.connection_error(PROTOCOL_ERROR)
    finally:
        c.close()


async def test_malformed_requests_count_as_resets(tmp_path: Path, upstream: Upstream,
                                                  upstream2: Upstream) -> None:
    """Each malformed request costs the client a reset of the `max_resets` budget (resets the
    server is made to send, "MadeYouReset"): past it, GOAWAY ENHANCE_YOUR_CALM."""
    s = await make_site(tmp_path, upstream, upstream2, "http2_limits = { max_resets = 10 }\n")
    try:
        c = await Raw.open(s)
        try:
            await c.ready()
            bad = [*REQUEST, ("X-Upper", "a")]
            for i in range(10):
                c.headers(1 + 2 * i, bad)
                await c.stream_error(1 + 2 * i, PROTOCOL_ERROR)
            c.headers(21, bad)
            await c.connection_error(ENHANCE_YOUR_CALM)
        finally:
            c.close()
        lim = s.dataplane.stats()["virtual_services"]["h2site"]["limit_rejections"]
        assert lim["h2_rapid_reset"] == 1 and lim["h2_protocol_error"] == 11
    finally:
        await s.dataplane.shutdown(1.0)
