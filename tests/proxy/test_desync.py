"""Issue 13's proxy faults over real sockets: Connection-named framing fields in both directions,
h2c, unsolicited 101, HEAD answered with a body, upstream "Connection: close", the body timeout and
half-close, the head deadline, truncated responses in the access log, hidden fields in the limits.

Each real server here is scripted (RawUpstream): it records the bytes it received, so a test sees
exactly what lbproxy forwarded, and answers exactly what the case needs.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Iterator

import pytest

from lbproxy.config.model import Limits, Timeouts
from lbproxy.proxy import DataPlane

from .conftest import Client, RawUpstream, Upstream, make_vs, read_head, serve

T = 10  # seconds: an upper bound for any step


class Recorder:
    """A scripted real server's log: the request heads and bodies it read, per connection."""

    def __init__(self) -> None:
        self.heads: list[bytes] = []
        self.bodies: list[bytes] = []
        self.connections = 0


def framed(rec: Recorder, answer: bytes = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok",
           ) -> RawUpstream:
    """A real server that reads each request by its own framing (Content-Length or chunked, as
    a strict server would) and answers `answer` to each, keeping the connection."""
    async def handler(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        rec.connections += 1
        while True:
            try:
                head = await read_head(r)
            except asyncio.IncompleteReadError:
                return
            rec.heads.append(head)
            fields = _fields(head)
            body = b""
            if fields.get("transfer-encoding", "").lower() == "chunked":
                while True:
                    size = int((await r.readuntil(b"\r\n")).split(b";")[0], 16)
                    if size == 0:
                        await r.readuntil(b"\r\n")
                        break
                    body += await r.readexactly(size)
                    await r.readexactly(2)
            elif "content-length" in fields:
                body = await r.readexactly(int(fields["content-length"]))
            rec.bodies.append(body)
            w.write(answer)
            await w.drain()
    return RawUpstream(handler)


def _fields(head: bytes) -> dict[str, str]:
    out = {}
    for line in head.decode("latin-1").split("\r\n")[1:]:
        if ":" in line:
            k, _, v = line.partition(":")
            out[k.strip().lower()] = v.strip()
    return out


@pytest.mark.parametrize("conn", [
    "content-length", "Content-Length", "close, content-length", "keep-alive,CONTENT-LENGTH ",
    "host, content-length, x-drop",
])
async def test_connection_cannot_remove_content_length(dataplane: DataPlane, conn: str) -> None:
    """The desync of issue 13: the body must reach the real server as this request's body, never
    as a second request, whatever Connection names; other named fields are still removed."""
    rec = Recorder()
    async with framed(rec) as up:
        ports = await serve(dataplane, make_vs(ports=(up.port,)))
        smuggled = b"GET /admin HTTP/1.1\r\nHost: example.com\r\n\r\n"
        raw = (b"POST /form HTTP/1.1\r\nHost: example.com\r\nConnection: " + conn.encode()
               + b"\r\nX-Drop: 1\r\nContent-Length: %d\r\n\r\n" % len(smuggled) + smuggled)
        async with asyncio.timeout(T):
            c = await Client.connect(ports["web"])
            await c.send(raw)
            r = await c.response()
            assert r.status == 200 and r.body == b"ok"
            if "close" not in conn:
                r = await c.request("GET", "/after")
                assert r.status == 200
            c.close()
    assert rec.bodies[0] == smuggled
    assert all(b"/admin" not in h for h in rec.heads)
    fields = _fields(rec.heads[0])
    assert fields["content-length"] == str(len(smuggled)) and fields["host"] == "example.com"
    assert ("x-drop" in fields) == ("x-drop" not in conn)


async def test_connection_cannot_remove_transfer_encoding(dataplane: DataPlane) -> None:
    rec = Recorder()
    async with framed(rec) as up:
        ports = await serve(dataplane, make_vs(ports=(up.port,)))
        inner = b"GET /admin HTTP/1.1\r\nHost: example.com\r\n\r\n"
        raw = (b"POST /form HTTP/1.1\r\nHost: example.com\r\nConnection: transfer-encoding\r\n"
               b"Transfer-Encoding: chunked\r\n\r\n%x\r\n%b\r\n0\r\n\r\n" % (len(inner), inner))
        async with asyncio.timeout(T):
            c = await Client.connect(ports["web"])
            await c.send(raw)
            r = await c.response()
            assert r.status == 200
            assert (await c.request("GET", "/after")).status == 200
            c.close()
    assert rec.bodies[0] == inner and len(rec.heads) == 2
    assert _fields(rec.heads[0])["transfer-encoding"] == "chunked"


async def test_response_connection_cannot_remove_framing(dataplane: DataPlane) -> None:
    """A real server's Connection naming Content-Length (or Transfer-Encoding) keeps the framing
    relayed to the client; a custom field it names is removed."""
    answer = (b"HTTP/1.1 200 OK\r\nConnection: content-length, x-secret\r\nX-Secret: s\r\n"
              b"Content-Length: 5\r\n\r\nhello")
    rec = Recorder()
    async with framed(rec, answer) as up:
        ports = await serve(dataplane, make_vs(ports=(up.port,)))
        async with asyncio.timeout(T):
            c = await Client.connect(ports["web"])
            for _ in range(2):  # the client's connection stays in step
                r = await c.request("GET", "/")
                assert r.status == 200 and r.body == b"hello"
                assert r.header("Content-Length") == "5" and r.header("X-Secret") is None
            c.close()
    chunked = (b"HTTP/1.1 200 OK\r\nConnection: Transfer-Encoding\r\n"
               b"Transfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n")
    async with framed(rec, chunked) as up:
        ports = await serve(dataplane, make_vs(ports=(up.port,)))
        async with asyncio.timeout(T):
            c = await Client.connect(ports["web"])
            for _ in range(2):
                r = await c.request("GET", "/")
                assert r.status == 200 and r.body == b"hello"
            c.close()


async def test_h2c_upgrade_is_not_forwarded(dataplane: DataPlane) -> None:
    rec = Recorder()
    async with framed(rec) as up:
        ports = await serve(dataplane, make_vs(ports=(up.port,)))
        for upgrade in (b"h2c", b"H2C"):
            async with asyncio.timeout(T):
                c = await Client.connect(ports["web"])
                await c.send(b"GET / HTTP/1.1\r\nHost: example.com\r\n"
                             b"Connection: Upgrade, HTTP2-Settings\r\nUpgrade: " + upgrade
                             + b"\r\nHTTP2-Settings: AAMAAABkAAQCAAAAAAIAAAAA\r\n\r\n")
                r = await c.response()
                assert r.status == 200 and r.header("Connection") == "close"
                assert await c.closed()
    for head in rec.heads:
        low = head.lower()
        assert b"upgrade" not in low and b"http2-settings" not in low and b"h2c" not in low


@pytest.mark.parametrize(("upgrade", "framing"), [
    (b"h2c", b"cl"), (b"h2c", b"chunked"), (b"websocket", b"cl"), (b"websocket", b"chunked")])
async def test_upgrade_with_a_body_goes_as_a_plain_request(dataplane: DataPlane, upgrade: bytes,
                                                           framing: bytes) -> None:
    """llhttp takes what follows an Upgrade request's head for the new protocol; the proxy reads
    the body by its framing all the same and relays it, without the upgrade."""
    rec = Recorder()
    inner = b"GET /admin HTTP/1.1\r\nHost: example.com\r\n\r\n"
    if framing == b"cl":
        frame, body = b"Content-Length: %d\r\n" % len(inner), inner
    else:
        frame, body = b"Transfer-Encoding: chunked\r\n", b"%x\r\n%b\r\n0\r\n\r\n" % (
            len(inner), inner)
    async with framed(rec) as up:
        ports = await serve(dataplane, make_vs(ports=(up.port,)))
        async with asyncio.timeout(T):
            c = await Client.connect(ports["web"])
            await c.send(b"POST /form HTTP/1.1\r\nHost: example.com\r\nConnection: Upgrade\r\n"
                         b"Upgrade: " + upgrade + b"\r\n" + frame + b"\r\n" + body)
            r = await c.response()
            assert r.status == 200 and r.header("Connection") == "close"
            assert await c.closed()
    assert rec.bodies == [inner] and len(rec.heads) == 1
    assert b"upgrade" not in rec.heads[0].lower()


async def test_unsolicited_101_is_refused(dataplane: DataPlane) -> None:
    """A 101 to a request that asked for no upgrade would make the client's connection a raw
    tunnel past the content rules: 502 instead."""
    rec = Recorder()
    async with framed(rec, b"HTTP/1.1 101 Switching Protocols\r\nConnection: upgrade\r\n"
                           b"Upgrade: h2c\r\n\r\n") as up:
        ports = await serve(dataplane, make_vs(ports=(up.port,)))
        async with asyncio.timeout(T):
            c = await Client.connect(ports["web"])
            r = await c.request("GET", "/")
            assert r.status == 502
            c.close()


async def test_websocket_upgrade_still_works(dataplane: DataPlane, upstream: Upstream) -> None:
    ports = await serve(dataplane, make_vs(ports=(upstream.port,)))
    async with asyncio.timeout(T):
        c = await Client.connect(ports["web"])
        await c.send(b"GET /ws HTTP/1.1\r\nHost: example.com\r\nConnection: Upgrade\r\n"
                     b"Upgrade: h2c, websocket\r\nSec-WebSocket-Version: 13\r\n"
                     b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n")
        r = await c.response()
        assert r.status == 101 and (r.header("Upgrade") or "").lower() == "websocket"
        c.close()


async def test_head_response_with_a_body_never_poisons_the_next(dataplane: DataPlane) -> None:
    """A real server that sends a body after its answer to HEAD (here one that looks like a
    response): the next request, on any connection, gets its own answer."""
    fake = b"HTTP/1.1 200 OK\r\nContent-Length: 8\r\n\r\npoisoned"

    async def handler(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        while True:
            head = await read_head(r)
            if head.startswith(b"HEAD"):
                w.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(fake))
                await w.drain()
                await asyncio.sleep(0.05)  # the body follows in its own segment
                w.write(fake)
            else:
                w.write(b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\nown")
            await w.drain()

    async with RawUpstream(handler) as up:
        ports = await serve(dataplane, make_vs(ports=(up.port,)))
        async with asyncio.timeout(T):
            for _ in range(5):
                a = await Client.connect(ports["web"])
                r = await a.request("HEAD", "/")
                assert r.status == 200 and r.header("Content-Length") == str(len(fake))
                r = await a.request("GET", "/")
                assert r.body == b"own"
                b = await Client.connect(ports["web"])
                r = await b.request("GET", "/")
                assert r.body == b"own"
                a.close()
                b.close()


async def test_upstream_connection_close_keeps_the_client(dataplane: DataPlane) -> None:
    """Issue 13 item 6: the real server closes its hop (HTTP/1.0 style); the client's keep-alive
    connection goes on."""
    rec = Recorder()
    answers = (b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 2\r\n\r\nok",
               b"HTTP/1.0 200 OK\r\nContent-Length: 2\r\n\r\nok")
    for answer in answers:
        async def handler(r: asyncio.StreamReader, w: asyncio.StreamWriter,
                          answer: bytes = answer) -> None:
            rec.heads.append(await read_head(r))
            w.write(answer)
            await w.drain()
        async with RawUpstream(handler) as up:
            ports = await serve(dataplane, make_vs(ports=(up.port,)))
            async with asyncio.timeout(T):
                c = await Client.connect(ports["web"])
                for _ in range(3):
                    r = await c.request("GET", "/")
                    assert r.status == 200 and r.body == b"ok"
                    assert r.header("Connection") != "close"
                c.close()
            assert up.connections == 3


def _body_vs(port: int, body: float = 0.3) -> object:
    return make_vs(ports=(port,), timeouts=Timeouts(body=body, head=5, request=30))


@pytest.fixture
def access_lines() -> Iterator[list[str]]:
    """The access log's lines, as the lbproxy.access logger emits them."""
    lines: list[str] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            lines.extend(record.getMessage().split("\n"))

    log = logging.getLogger("lbproxy.access")
    handler = Keep()
    old = (log.level, log.propagate)
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    log.propagate = False
    yield lines
    log.removeHandler(handler)
    log.setLevel(old[0])
    log.propagate = old[1]


async def test_body_timeout_cuts_a_stalled_upload(dataplane: DataPlane,
                                                  access_lines: list[str]) -> None:
    rec = Recorder()
    async with framed(rec) as up:
        ports = await serve(dataplane, _body_vs(up.port))  # type: ignore[arg-type]
        async with asyncio.timeout(T):
            c = await Client.connect(ports["web"])
            await c.send(b"POST /up HTTP/1.1\r\nHost: a\r\nContent-Length: 100\r\n\r\nabc")
            t0 = time.monotonic()
            r = await c.response()
            took = time.monotonic() - t0
            assert r.status == 408 and await c.closed()
    assert 0.25 <= took < 1.0, took  # t_body = 0.3 s, the sweep a tenth of it
    lim = dataplane.stats()["virtual_services"]["web"]["limit_rejections"]
    assert lim["body_timeout"] == 1
    assert any('"POST /up" 408' in line for line in access_lines), access_lines


async def test_body_that_keeps_coming_is_not_cut(dataplane: DataPlane) -> None:
    rec = Recorder()
    async with framed(rec) as up:
        ports = await serve(dataplane, _body_vs(up.port))  # type: ignore[arg-type]
        async with asyncio.timeout(T):
            c = await Client.connect(ports["web"])
            await c.send(b"POST /up HTTP/1.1\r\nHost: a\r\nContent-Length: 8\r\n\r\n")
            for _ in range(8):  # 8 x 0.15 s: longer than t_body in all, never between reads
                await asyncio.sleep(0.15)
                await c.send(b"x")
            r = await c.response()
            assert r.status == 200
            c.close()
    assert rec.bodies == [b"x" * 8]


async def test_half_close_mid_body_ends_the_exchange(dataplane: DataPlane,
                                                     access_lines: list[str]) -> None:
    closed = asyncio.Event()
    began = asyncio.Event()
    got: list[bytes] = []

    async def handler(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        await read_head(r)
        got.append(await r.readexactly(3))
        began.set()
        got.append(await r.read())  # until the proxy closes its side
        closed.set()

    async with RawUpstream(handler) as up:
        ports = await serve(dataplane, _body_vs(up.port, body=30))  # type: ignore[arg-type]
        async with asyncio.timeout(T):
            c = await Client.connect(ports["web"])
            await c.send(b"POST /up HTTP/1.1\r\nHost: a\r\nContent-Length: 100\r\n\r\nabc")
            await began.wait()  # the request is on its way to the real server
            c.w.write_eof()
            r = await c.response()
            assert r.status == 400 and await c.closed()
            await closed.wait()  # the upstream connection was closed at once, not after 30 s
    assert got == [b"abc", b""]
    lim = dataplane.stats()["virtual_services"]["web"]["limit_rejections"]
    assert lim["body_incomplete"] == 1
    assert any('"POST /up" 400' in line for line in access_lines), access_lines


async def test_half_close_after_pipelined_requests_answers_them(dataplane: DataPlane,
                                                                upstream: Upstream) -> None:
    ports = await serve(dataplane, make_vs(ports=(upstream.port,)))
    async with asyncio.timeout(T):
        c = await Client.connect(ports["web"])
        await c.send(b"GET /slow?d=0.1 HTTP/1.1\r\nHost: a\r\n\r\n"
                     b"GET /a HTTP/1.1\r\nHost: a\r\n\r\nGET /b HTTP/1.1\r\nHost: a\r\n\r\n")
        c.w.write_eof()
        assert [(await c.response()).status for _ in range(3)] == [200, 200, 200]
        assert await c.closed()


async def test_head_deadline_runs_from_the_connection(dataplane: DataPlane,
                                                      upstream: Upstream) -> None:
    """Silent for most of the head timeout, then dribbling: 408 at the head timeout counted from
    the connection, not from the first byte."""
    vs = make_vs(ports=(upstream.port,), timeouts=Timeouts(head=0.6))
    ports = await serve(dataplane, vs)
    async with asyncio.timeout(T):
        t0 = time.monotonic()
        c = await Client.connect(ports["web"])
        await asyncio.sleep(0.4)
        got: list[int] = []

        async def dribble() -> None:
            for b in b"GET / HTTP/1.1\r\nHost: a\r\nX: yyyyyyyyyyyyyyy":
                await c.send(bytes([b]))
                await asyncio.sleep(0.03)

        task = asyncio.create_task(dribble())
        r = await c.response()
        got.append(r.status)
        took = time.monotonic() - t0
        task.cancel()
        with pytest.raises((asyncio.CancelledError, ConnectionError)):
            await task
    assert got == [408]
    assert took < 0.9, took  # 0.6 s from the connection (+ the sweep), not 0.4 + 0.6


async def test_truncated_response_is_logged_as_cut(dataplane: DataPlane,
                                                   access_lines: list[str]) -> None:
    async def handler(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        await read_head(r)
        w.write(b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n" + b"x" * 100)
        await w.drain()  # then the connection ends, 900 bytes short

    async with RawUpstream(handler) as up:
        ports = await serve(dataplane, make_vs(ports=(up.port,)))
        async with asyncio.timeout(T):
            c = await Client.connect(ports["web"])
            await c.send(b"GET /cut HTTP/1.1\r\nHost: a\r\n\r\n")
            assert await c.r.read() != b""  # the head and part of the body, then the abort
            c.close()
            for _ in range(100):  # the batch is written at the end of the loop pass
                if any("/cut" in line for line in access_lines):
                    break
                await asyncio.sleep(0.01)
    (line,) = [line for line in access_lines if "/cut" in line]
    assert line.endswith(" cut") and '"GET /cut" 200 100 ' in line, line


@pytest.mark.parametrize("name", [b"TE", b"Keep-Alive", b"Proxy-Connection", b"Trailer"])
async def test_hop_by_hop_fields_count_toward_max_headers(dataplane: DataPlane,
                                                          upstream: Upstream,
                                                          name: bytes) -> None:
    ports = await serve(dataplane, make_vs(ports=(upstream.port,),
                                           limits=Limits(max_headers=20)))
    async with asyncio.timeout(T):
        c = await Client.connect(ports["web"])
        await c.send(b"GET / HTTP/1.1\r\nHost: a\r\n" + (name + b": x\r\n") * 2000 + b"\r\n")
        r = await c.response()
        assert r.status == 431 and await c.closed()
        c = await Client.connect(ports["web"])  # 19 of them pass
        await c.send(b"GET / HTTP/1.1\r\nHost: a\r\n" + (name + b": x\r\n") * 19 + b"\r\n")
        assert (await c.response()).status == 200
        c.close()


async def test_hop_by_hop_bytes_count_toward_max_header_bytes(dataplane: DataPlane,
                                                              upstream: Upstream) -> None:
    ports = await serve(dataplane, make_vs(ports=(upstream.port,),
                                           limits=Limits(max_header_bytes=4096)))
    async with asyncio.timeout(T):
        c = await Client.connect(ports["web"])
        await c.send(b"GET / HTTP/1.1\r\nHost: a\r\nTE: " + b"x" * 5000 + b"\r\n\r\n")
        r = await c.response()
        assert r.status == 431 and await c.closed()
