"""Response compression (proxy/compress.py) through the running data plane on real sockets: a
scripted real server answers exact heads; the client decodes what it gets. gzip (and brotli when
installed) for the configured types with the head rewritten (no Content-Length, chunked, Vary,
weak ETag); streamed as it comes; left alone for small bodies, other types, encoded bodies, HEAD,
304, Range/206, no-transform, HTTP/1.0, and codings the client refuses (q=0, identity); the
Accept-Encoding rules; counters; and the config's errors."""

from __future__ import annotations

import asyncio
import importlib.util
import zlib
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest

from lbproxy.config.model import Compression
from lbproxy.errors import ConfigError
from lbproxy.proxy import DataPlane
from lbproxy.proxy.compress import parse_accept_encoding

from .conftest import Client, RawUpstream, Response, make_vs, read_head, serve

T = 10.0
HTML = b"<html><body>" + b"<p>hello compressible world</p>\n" * 400 + b"</body></html>\n"
GZ = (("Accept-Encoding", "gzip, deflate"),)
HAS_BROTLI = importlib.util.find_spec("brotli") is not None


def response(body: bytes = HTML, ctype: str = "text/html; charset=utf-8", status: str = "200 OK",
             extra: str = "", chunked: bool = False) -> bytes:
    head = f"HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\n{extra}"
    if chunked:
        mid = len(body) // 2
        parts = b"".join(b"%x\r\n%b\r\n" % (len(p), p) for p in (body[:mid], body[mid:]) if p)
        return (head + "Transfer-Encoding: chunked\r\n\r\n").encode() + parts + b"0\r\n\r\n"
    return (head + f"Content-Length: {len(body)}\r\n\r\n").encode() + body


ROUTES: dict[str, bytes] = {
    "/page": response(extra='ETag: "v1"\r\n'),
    "/chunked": response(chunked=True),
    "/small": response(b"<p>tiny</p>"),
    "/png": response(b"\x89PNG" + bytes(4000), "image/png"),
    "/encoded": response(zlib.compress(HTML), extra="Content-Encoding: deflate\r\n"),
    "/304": b'HTTP/1.1 304 Not Modified\r\nETag: "v1"\r\n\r\n',
    "/206": response(HTML[:2000], status="206 Partial Content",
                     extra=f"Content-Range: bytes 0-1999/{len(HTML)}\r\n"),
    "/notransform": response(extra="Cache-Control: public, no-transform\r\n"),
    "/vary": response(extra="Vary: Origin\r\n"),
    "/json": response(b'{"k": "' + b"v" * 3000 + b'"}', "application/json"),
}


async def _route(r: asyncio.StreamReader, w: asyncio.StreamWriter,
                 routes: dict[str, bytes]) -> None:
    for _ in range(50):  # bounded: requests per connection
        head = await read_head(r)
        method, path = head.split(b" ")[:2]
        resp = routes[path.decode()]
        if method == b"HEAD":
            resp = resp.split(b"\r\n\r\n")[0] + b"\r\n\r\n"
        w.write(resp)
        await w.drain()


@pytest.fixture
async def site(dataplane: DataPlane) -> AsyncIterator[Callable[..., asyncio.Future[int]]]:
    async with RawUpstream(lambda r, w: _route(r, w, ROUTES)) as up:
        async def start(**kw: Any) -> int:
            kw.setdefault("compression", Compression())
            vs = make_vs(ports=(up.port,), **kw)
            return (await serve(dataplane, vs))["web"]
        yield start  # type: ignore[misc]


async def fetch(port: int, path: str, headers: tuple[tuple[str, str], ...] = GZ,
                method: str = "GET") -> Response:
    c = await Client.connect(port)
    try:
        return await asyncio.wait_for(c.request(method, path, headers=headers), T)
    finally:
        c.close()


def gunzip(data: bytes) -> bytes:
    d = zlib.decompressobj(31)
    out = d.decompress(data)
    assert d.eof and not d.unused_data  # one complete gzip member, nothing after
    return out


async def test_gzip_for_html_with_the_head_rewritten(site: Callable[..., asyncio.Future[int]],
                                                     dataplane: DataPlane) -> None:
    port = await site()
    c = await Client.connect(port)
    try:
        for _ in range(2):  # and the connection stays usable after a compressed response
            resp = await asyncio.wait_for(c.request("GET", "/page", headers=GZ), T)
            assert resp.status == 200
            assert resp.header("Content-Encoding") == "gzip"
            assert resp.header("Content-Length") is None
            assert resp.header("Transfer-Encoding") == "chunked"
            assert resp.header("Vary") == "Accept-Encoding"
            assert resp.header("ETag") == 'W/"v1"'
            assert gunzip(resp.body) == HTML
            assert len(resp.body) < len(HTML) // 10
    finally:
        c.close()
    comp = dataplane.stats()["virtual_services"]["web"]["compression"]
    assert comp["responses"] == {"gzip": 2}
    assert comp["bytes_in"] == 2 * len(HTML)
    assert 0 < comp["bytes_out"] < comp["bytes_in"] // 10


async def test_chunked_and_json_bodies_are_compressed(
        site: Callable[..., asyncio.Future[int]]) -> None:
    port = await site()
    resp = await fetch(port, "/chunked")
    assert resp.header("Content-Encoding") == "gzip"
    assert gunzip(resp.body) == HTML
    resp = await fetch(port, "/json")
    assert resp.header("Content-Encoding") == "gzip"
    assert gunzip(resp.body).startswith(b'{"k": "vvv')


async def test_what_is_left_alone(site: Callable[..., asyncio.Future[int]]) -> None:
    port = await site()
    for path, status in (("/small", 200), ("/png", 200), ("/encoded", 200), ("/304", 304),
                         ("/206", 206), ("/notransform", 200)):
        resp = await fetch(port, path)
        assert resp.status == status, path
        assert resp.header("Content-Encoding") in (None, "deflate"), path
        assert resp.header("Vary") is None, path
        assert resp.raw_head == ROUTES[path].split(b"\r\n\r\n")[0] + b"\r\n\r\n", path
    assert zlib.decompress((await fetch(port, "/encoded")).body) == HTML  # not twice
    head = await fetch(port, "/page", method="HEAD")
    assert head.header("Content-Encoding") is None
    assert head.header("Content-Length") == str(len(HTML))
    ranged = await fetch(port, "/page", headers=(*GZ, ("Range", "bytes=0-99")))
    assert ranged.header("Content-Encoding") is None and ranged.body == HTML


async def test_accept_encoding_is_honoured(site: Callable[..., asyncio.Future[int]]) -> None:
    port = await site()
    for accept, coded in (("gzip;q=0", False), ("identity", False), ("br", False),
                          ("*", True), ("*;q=0, gzip;q=0.001", True), ("gzip;q=0, *", False),
                          ("GZIP", True), ("x-gzip", True), ("gzip;q=abc", False),
                          ("deflate, gzip;q=1.5", False)):
        resp = await fetch(port, "/page", headers=(("Accept-Encoding", accept),))
        assert (resp.header("Content-Encoding") == "gzip") is coded, accept
        assert (gunzip(resp.body) if coded else resp.body) == HTML, accept
    plain = await fetch(port, "/page", headers=())
    assert plain.header("Content-Encoding") is None and plain.body == HTML


def test_accept_encoding_parsing() -> None:
    assert parse_accept_encoding(b"gzip;q=0.5, br ; q=1.0, identity;q=0, *;q=0") == {
        "gzip": 0.5, "br": 1.0, "identity": 0.0, "*": 0.0}
    assert parse_accept_encoding(b" , gzip;level=1;q=0.2,,") == {"gzip": 0.2}


async def test_an_existing_vary_is_extended(site: Callable[..., asyncio.Future[int]]) -> None:
    resp = await fetch(await site(), "/vary")
    assert resp.header("Vary") == "Origin, Accept-Encoding"


async def test_http10_clients_get_the_body_as_it_is(
        site: Callable[..., asyncio.Future[int]]) -> None:
    port = await site()
    r, w = await asyncio.open_connection("127.0.0.1", port)
    try:
        w.write(b"GET /page HTTP/1.0\r\nHost: x\r\nAccept-Encoding: gzip\r\n\r\n")
        data = await asyncio.wait_for(r.read(), T)
    finally:
        w.close()
    head, _, body = data.partition(b"\r\n\r\n")
    assert b"Content-Encoding" not in head and body == HTML


async def test_without_compression_nothing_changes(
        site: Callable[..., asyncio.Future[int]], dataplane: DataPlane) -> None:
    port = await site(compression=None)
    resp = await fetch(port, "/page")
    assert resp.raw_head == ROUTES["/page"].split(b"\r\n\r\n")[0] + b"\r\n\r\n"
    assert "compression" not in dataplane.stats()["virtual_services"]["web"]


@pytest.mark.skipif(not HAS_BROTLI, reason="the brotli package is not installed")
async def test_brotli_when_preferred(site: Callable[..., asyncio.Future[int]]) -> None:
    brotli = importlib.import_module("brotli")
    port = await site(compression=Compression(encodings=("br", "gzip")))
    resp = await fetch(port, "/page", headers=(("Accept-Encoding", "gzip, deflate, br"),))
    assert resp.header("Content-Encoding") == "br"
    assert brotli.decompress(resp.body) == HTML
    resp = await fetch(port, "/page", headers=(("Accept-Encoding", "gzip;q=1, br;q=0.5"),))
    assert resp.header("Content-Encoding") == "gzip"


async def test_a_large_body_is_streamed_not_buffered(dataplane: DataPlane) -> None:
    """The real server sends a first part, then waits until the client has decoded it before it
    sends the rest (4 MiB in all): only a proxy that relays as it compresses gets there."""
    first = HTML * 4
    decoded_first = asyncio.Event()
    rest = [bytes([65 + i % 26]) * 65536 for i in range(64)]

    async def stream(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        await read_head(r)
        w.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nTransfer-Encoding: chunked"
                b"\r\n\r\n" + b"%x\r\n%b\r\n" % (len(first), first))
        await w.drain()
        await asyncio.wait_for(decoded_first.wait(), T)
        for piece in rest:
            w.write(b"%x\r\n%b\r\n" % (len(piece), piece))
            await w.drain()
        w.write(b"0\r\n\r\n")
        await w.drain()

    async with RawUpstream(stream) as up:
        vs = make_vs(ports=(up.port,), compression=Compression())
        port = (await serve(dataplane, vs))["web"]
        r, w = await asyncio.open_connection("127.0.0.1", port)
        try:
            w.write(b"GET /s HTTP/1.1\r\nHost: x\r\nAccept-Encoding: gzip\r\n\r\n")
            head = await asyncio.wait_for(read_head(r), T)
            assert b"Content-Encoding: gzip" in head and b"Transfer-Encoding: chunked" in head
            d = zlib.decompressobj(31)
            out = bytearray()
            done = False
            for _ in range(100_000):  # bounded: chunks
                size = int((await asyncio.wait_for(r.readuntil(b"\r\n"), T)).strip(), 16)
                chunk = await asyncio.wait_for(r.readexactly(size + 2), T)
                if size == 0:
                    done = True
                    break
                out += d.decompress(chunk[:-2])
                if len(out) >= len(first):
                    decoded_first.set()
            assert done and d.eof
            assert bytes(out) == first + b"".join(rest)
        finally:
            w.close()


# -- config --------------------------------------------------------------------------------


def _load(extra: str) -> str:
    from lbproxy.config.loader import parse_config
    text = ('[[vs]]\nname = "web"\nlisten = "127.0.0.1:8080"\n'
            '[[vs.real_servers]]\naddress = "127.0.0.1:9000"\n[vs.compression]\n' + extra)
    with pytest.raises(ConfigError) as e:
        parse_config(text)
    return str(e.value)


def test_bad_compression_values_are_refused_with_their_key() -> None:
    err = _load('encodings = ["gzip", "lzma", "gzip"]\ntypes = ["text/html", "image/png", "html"]'
                '\nmin_length = -1\nlevel = 10\nbrotli_level = 12\nratio = 2\n')
    for where in ("compression.encodings[1]: unknown encoding 'lzma'",
                  "compression.encodings: names an encoding twice",
                  "compression.types[1]: 'image/png' is already compressed",
                  "compression.types[2]: 'html' is not a media type",
                  "compression.min_length", "compression.level: must be between 1 and 9",
                  "compression.brotli_level", "compression.ratio: unknown key"):
        assert where in err, (where, err)
    assert "compression.encodings: must name at least one" in _load("encodings = []\n")
    if not HAS_BROTLI:
        assert "needs the brotli package" in _load('encodings = ["br"]\n')


def test_compression_reads_with_defaults() -> None:
    from lbproxy.config.loader import parse_config
    cfg = parse_config('[[vs]]\nname = "web"\nlisten = "127.0.0.1:8080"\n[vs.compression]\n'
                       'types = ["Text/*", "application/json"]\nmin_length = 0\n')
    c = cfg.virtual_services[0].compression
    assert c == Compression(types=("text/*", "application/json"), min_length=0)
