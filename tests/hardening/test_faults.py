"""Faults of real servers, each reproduced with its outcome asserted: bad responses never reach a
client as something else, truncated bodies are never passed on as complete, and only idempotent
requests are retried on another real server after a connect failure."""

from __future__ import annotations

import asyncio
import socket

import pytest

from lbproxy.config.model import Address, RealServer, Scheduler
from lbproxy.proxy import DataPlane

from ..proxy.conftest import Client, RawUpstream, Upstream, build, make_vs, read_head, serve

T = 10

# Responses a real server must not be able to use to split or desynchronise a client connection.
BAD_RESPONSES = {
    "cl_and_te": b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n"
                 b"0\r\n\r\nhello",
    "two_cl": b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\nhello!",
    "two_cl_same": b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nContent-Length: 5\r\n\r\nhello",
    "bare_lf": b"HTTP/1.1 200 OK\r\nContent-Length: 5\nX-A: b\r\n\r\nhello",
    "bare_cr": b"HTTP/1.1 200 OK\r\nX-A: b\rContent-Length: 9\r\nContent-Length: 5\r\n\r\nhello",
    "obs_fold": b"HTTP/1.1 200 OK\r\nX-A: b\r\n Content-Length: 99\r\nContent-Length: 5\r\n\r\n"
                b"hello",
    "space_before_colon": b"HTTP/1.1 200 OK\r\nContent-Length : 5\r\n\r\nhello",
    "nul_in_value": b"HTTP/1.1 200 OK\r\nX-A: a\x00b\r\nContent-Length: 5\r\n\r\nhello",
    "te_gzip_chunked": b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, chunked\r\n\r\n"
                       b"5\r\nhello\r\n0\r\n\r\n",
    "bad_chunk_size": b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nhello\r\n",
    "status_two_digits": b"HTTP/1.1 20 OK\r\nContent-Length: 5\r\n\r\nhello",
    "not_http": b"SSH-2.0-OpenSSH_9.2\r\n\r\n",
}


@pytest.mark.parametrize("name", sorted(BAD_RESPONSES))
async def test_bad_response_is_502_and_never_relayed(dataplane: DataPlane, name: str) -> None:
    answer = BAD_RESPONSES[name]

    async def handler(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        await read_head(r)
        w.write(answer)  # one write: the shape the unparsed fast path would take
        await w.drain()
        await r.read()

    async with RawUpstream(handler) as raw, asyncio.timeout(T):
        ports = await serve(dataplane, make_vs(ports=(raw.port,)))
        c = await Client.connect(ports["web"])
        r = await c.request()
        assert r.status == 502 and b"hello" not in r.body
        # The client connection is still in step: the next request gets its own answer.
        r = await c.request()
        assert r.status == 502 and b"hello" not in r.body


async def test_chunked_body_cut_short_closes_the_client(dataplane: DataPlane) -> None:
    async def handler(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        await read_head(r)
        w.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n")
        await w.drain()
        # ... and the real server dies before the last chunk.

    async with RawUpstream(handler) as raw, asyncio.timeout(T):
        ports = await serve(dataplane, make_vs(ports=(raw.port,)))
        c = await Client.connect(ports["web"])
        await c.send(build())
        await read_head(c.r)
        try:
            rest = await c.r.read()
        except ConnectionError:
            rest = b""
    assert b"0\r\n\r\n" not in rest  # never the terminating chunk of a complete body


async def test_content_length_body_cut_short_on_the_parser_path(dataplane: DataPlane) -> None:
    async def handler(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        await read_head(r)
        w.write(b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n")
        await w.drain()
        w.write(b"x" * 10)
        await w.drain()

    async with RawUpstream(handler) as raw, asyncio.timeout(T):
        ports = await serve(dataplane, make_vs(ports=(raw.port,)))
        c = await Client.connect(ports["web"])
        await c.send(build())
        head = await read_head(c.r)
        try:
            rest = await c.r.read()
        except ConnectionError:
            rest = b""
    assert b"Content-Length: 1000" in head and len(rest) < 1000


async def test_trailing_bytes_after_a_response_never_answer_the_next_request(
        dataplane: DataPlane) -> None:
    """A real server that appends a forged second response: the client's next request must not
    get it (the connection it came on is not reused)."""
    async def handler(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        await read_head(r)
        w.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"
                b"HTTP/1.1 200 OK\r\nContent-Length: 6\r\n\r\nforged")
        await w.drain()
        try:
            await read_head(r)
            w.write(b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\nreal")
            await w.drain()
        except asyncio.IncompleteReadError:
            pass

    async with RawUpstream(handler) as raw, asyncio.timeout(T):
        ports = await serve(dataplane, make_vs(ports=(raw.port,)))
        c = await Client.connect(ports["web"])
        first = await c.request()
        assert first.status in (200, 502)
        c = await Client.connect(ports["web"])
        second = await c.request()
    assert second.body != b"forged"


def _refused_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port: int = s.getsockname()[1]
    s.close()  # nothing listens there now: connects are refused
    return port


@pytest.mark.parametrize(("method", "retried"), [("GET", True), ("HEAD", True), ("PUT", True),
                                                 ("DELETE", True), ("POST", False),
                                                 ("PATCH", False)])
async def test_connect_failure_retries_only_idempotent_requests(
        dataplane: DataPlane, upstream: Upstream, method: str, retried: bool) -> None:
    dead = _refused_port()
    vs = make_vs(real_servers=(RealServer(Address("127.0.0.1", dead)),
                               RealServer(Address("127.0.0.1", upstream.port))),
                 scheduler=Scheduler.ROUND_ROBIN)
    ports = await serve(dataplane, vs)
    async with asyncio.timeout(T):
        c = await Client.connect(ports["web"])
        # Round robin starts with the dead server.
        r = await c.request(method, "/r", body=None if method in ("GET", "HEAD") else b"b")
    if retried:
        assert r.status == 200 and upstream.requests == 1
    else:
        assert r.status == 502 and upstream.requests == 0
