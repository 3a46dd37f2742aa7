"""Strict HTTP/1.1 readers for the desync rig (RFC 9112): what a message's bytes say and every way
they could also be read (`odd`): the real server's request reader and the client's response
reader. Lenient where a lenient peer would be (obs-fold unfolded, a name with a space before its
colon still counted), so that a message two parsers read differently is flagged, not dropped."""

from __future__ import annotations

import asyncio
import contextlib
import re
from dataclasses import dataclass, replace

from .desync_cases import Seen

TOKEN = re.compile(rb"[!#$%&'*+.^_`|~0-9A-Za-z-]+")
REQUEST_LINE = re.compile(rb"([A-Z]+) (\S+) HTTP/1\.([01])")
STATUS_LINE = re.compile(rb"HTTP/1\.[01] ([0-9]{3})(?: [^\r\n]*)?")
CHUNK_SIZE = re.compile(rb"[0-9a-fA-F]{1,15}")
# Fields a Connection header may name but whose removal by the next hop changes the message's
# framing or route: a message that still lists them can be read two ways.
PROTECTED = frozenset((b"content-length", b"transfer-encoding", b"host"))
MAX_HEAD = 64 * 1024  # bytes without the end of a head: not HTTP any more
MAX_LINE = 1024  # bytes of a chunk-size or trailer line without its CRLF: not HTTP any more


class Unparsable(Exception):
    """The bytes are no HTTP/1.1 message at all: the reader gives up on the connection."""


@dataclass(frozen=True, slots=True)
class Head:
    first: bytes  # the request or status line
    fields: tuple[tuple[bytes, bytes], ...]  # (lower-case name, value), obs-fold unfolded
    odd: tuple[str, ...]
    end: int  # where the body starts

    def values(self, name: bytes) -> list[bytes]:
        return [v for n, v in self.fields if n == name]

    def tokens(self, name: bytes) -> list[bytes]:
        """The list elements of every `name` field, lower case (empty elements left out)."""
        return [t.strip(b" \t").lower() for v in self.values(name) for t in v.split(b",")
                if t.strip(b" \t")]


def parse_head(buf: bytes) -> Head | None:
    """The head at the start of `buf`; None while it is incomplete."""
    end = buf.find(b"\r\n\r\n")
    if end < 0:
        if b"\n\n" in buf or b"\n\r\n" in buf or len(buf) > MAX_HEAD:
            raise Unparsable("a head that does not end in CRLF CRLF")
        return None
    lines = buf[:end].split(b"\r\n")
    odd: list[str] = []
    if any(b"\n" in line or b"\r" in line for line in lines):
        odd.append("bare CR or LF")
    fields: list[tuple[bytes, bytes]] = []
    for line in lines[1:]:
        if line[:1] in (b" ", b"\t"):
            odd.append("obs-fold")
            if fields:
                name, value = fields[-1]
                fields[-1] = (name, value + b" " + line.strip(b" \t"))
            continue
        name, colon, value = line.partition(b":")
        if not colon:
            odd.append(f"field line without a colon {line[:30]!r}")
            continue
        if not TOKEN.fullmatch(name):
            odd.append(f"field name {name[:30]!r}")
            name = name.strip(b" \t")
        value = value.strip(b" \t")
        if any((c < 32 and c != 9) or c == 127 for c in value):
            odd.append(f"control byte in {name[:30]!r}")
        fields.append((name.lower(), value))
    return Head(lines[0], tuple(fields), tuple(odd), end + 4)


def framing(h: Head, request: bool) -> tuple[list[str], bool, int | None]:
    """(odd, chunked, Content-Length) of a head; neither: no body (request) or one delimited by
    the end of the connection (response)."""
    odd = []
    te = h.values(b"transfer-encoding")
    cl = h.values(b"content-length")
    if te and cl:
        odd.append("Content-Length and Transfer-Encoding")
    if len(cl) > 1:
        odd.append("several Content-Length")
    if len(te) > 1:
        odd.append("several Transfer-Encoding")
    codings = h.tokens(b"transfer-encoding")
    if te and codings != [b"chunked"]:
        odd.append("Transfer-Encoding: " + ", ".join(v.decode("latin-1") for v in te))
    for t in h.tokens(b"connection"):
        if t in PROTECTED:
            odd.append(f"Connection names {t.decode('latin-1')}")
    if codings and codings[-1] == b"chunked":
        return odd, True, None
    if te:
        if request:
            raise Unparsable("a Transfer-Encoding whose final coding is not chunked")
        return odd, False, None
    if cl:
        if not cl[0].isdigit():
            raise Unparsable(f"Content-Length {cl[0][:20]!r}")
        return odd, False, int(cl[0])
    return odd, False, None


def dechunk(buf: bytes, pos: int) -> tuple[bytes, int] | None:
    """The chunked body starting at `pos` and where it ends; None while it is incomplete."""
    parts: list[bytes] = []
    while True:
        eol = buf.find(b"\r\n", pos)
        if eol < 0:
            if len(buf) - pos > MAX_LINE:
                raise Unparsable("a chunk-size line without CRLF")
            return None
        size_s = buf[pos:eol].split(b";", 1)[0]
        if not CHUNK_SIZE.fullmatch(size_s):
            raise Unparsable(f"chunk size {size_s[:20]!r}")
        size = int(size_s, 16)
        pos = eol + 2
        if size == 0:
            while True:  # trailer fields, up to the empty line
                eol = buf.find(b"\r\n", pos)
                if eol < 0:
                    if len(buf) - pos > MAX_LINE:
                        raise Unparsable("a trailer line without CRLF")
                    return None
                if eol == pos:
                    return b"".join(parts), eol + 2
                pos = eol + 2
        if len(buf) < pos + size + 2:
            return None
        if buf[pos + size:pos + size + 2] != b"\r\n":
            raise Unparsable("chunk data not followed by CRLF")
        parts.append(buf[pos:pos + size])
        pos += size + 2


@dataclass(frozen=True, slots=True)
class Received:
    """One request as the real server read it."""

    seen: Seen
    head: Head
    odd: tuple[str, ...]


def parse_request(buf: bytes) -> tuple[Received, int] | None:
    """The request at the start of `buf` and its length; None while it is incomplete."""
    h = parse_head(buf)
    if h is None:
        return None
    m = REQUEST_LINE.fullmatch(h.first)
    if m is None:
        raise Unparsable(f"request line {h.first[:40]!r}")
    odd, chunked, length = framing(h, request=True)
    odd[:0] = h.odd
    hosts = h.values(b"host")
    if not hosts and m.group(3) == b"1":
        odd.append("no Host")
    if len(hosts) > 1:
        odd.append("several Host")
    if any(t.startswith(b"h2c") for t in h.tokens(b"upgrade")):
        odd.append("Upgrade: h2c")  # the real server would switch to HTTP/2 past the proxy
    if chunked:
        got = dechunk(buf, h.end)
        if got is None:
            return None
        body, end = got
    else:
        end = h.end + (length or 0)
        if len(buf) < end:
            return None
        body = buf[h.end:end]
    return Received(Seen(m.group(1), m.group(2), body), h, tuple(odd)), end


@dataclass(frozen=True, slots=True)
class Got:
    """One final response as the client read it."""

    status: int  # 0: none came
    target: bytes | None  # the real server's X-Target; None: the proxy's own answer
    body: bytes = b""
    interim: tuple[int, ...] = ()  # the 1xx statuses before it
    odd: tuple[str, ...] = ()
    end: str = ""  # "" for a whole response, else "closed", "timeout" or what was unparsable
    close: bool = False  # it said Connection: close


class Reader:
    """Reads responses from a client connection until `deadline` (loop time)."""

    def __init__(self, r: asyncio.StreamReader, deadline: float) -> None:
        self.r = r
        self.deadline = deadline
        self.buf = b""
        self.eof = False

    async def more(self) -> str:
        """Read more bytes: "" when some came, else "closed" or "timeout"."""
        if self.eof:
            return "closed"
        left = self.deadline - asyncio.get_running_loop().time()
        if left <= 0:
            return "timeout"
        try:
            async with asyncio.timeout(left):
                data = await self.r.read(65536)
        except TimeoutError:
            return "timeout"
        except OSError:
            data = b""
        if not data:
            self.eof = True
            return "closed"
        self.buf += data
        return ""

    async def exactly(self, n: int) -> bytes:
        while len(self.buf) < n and not await self.more():
            pass
        out, self.buf = self.buf[:n], self.buf[n:]
        return out

    async def response(self, head_only: bool) -> Got:
        interim: list[int] = []
        odd: list[str] = []
        while True:
            try:
                h = parse_head(self.buf)
            except Unparsable as e:
                return Got(0, None, interim=tuple(interim), odd=tuple(odd), end=str(e))
            if h is None:
                why = await self.more()
                if why:
                    return Got(0, None, interim=tuple(interim), odd=tuple(odd), end=why)
                continue
            m = STATUS_LINE.fullmatch(h.first)
            if m is None:
                return Got(0, None, interim=tuple(interim), end=f"status line {h.first[:30]!r}")
            status = int(m.group(1))
            odd += h.odd
            self.buf = self.buf[h.end:]
            if not 100 <= status < 200 or status == 101:
                break
            interim.append(status)
        targets = h.values(b"x-target")
        target = targets[0] if targets else None
        close = b"close" in h.tokens(b"connection")
        got = Got(status, target, b"", tuple(interim), tuple(odd), "", close)
        try:
            more_odd, chunked, length = framing(h, request=False)
        except Unparsable as e:
            return replace(got, end=str(e))
        got = replace(got, odd=(*odd, *more_odd))
        if head_only or status in (101, 204, 304):
            return got
        if chunked:
            while True:
                try:
                    found = dechunk(self.buf, 0)
                except Unparsable as e:
                    return replace(got, end=str(e))
                if found is not None:
                    body, end = found
                    self.buf = self.buf[end:]
                    return replace(got, body=body)
                why = await self.more()
                if why:
                    return replace(got, body=self.buf, end=why)
        if length is not None:
            while len(self.buf) < length:
                why = await self.more()
                if why:
                    return replace(got, body=self.buf, end=why)
            body, self.buf = self.buf[:length], self.buf[length:]
            return replace(got, body=body)
        while not (why := await self.more()):  # delimited by the end of the connection
            pass
        body, self.buf = self.buf, b""
        return replace(got, body=body, end="" if why == "closed" else why)


async def send(w: asyncio.StreamWriter, data: bytes) -> bool:
    """Write `data`; False if the peer had closed or reset the connection."""
    try:
        w.write(data)
        await w.drain()
    except OSError:
        return False
    return True


async def close(w: asyncio.StreamWriter) -> None:
    w.close()
    with contextlib.suppress(OSError):
        await w.wait_closed()
