"""The HTTP/1.1 relay over real sockets: keep-alive, pipelining, headers, framing, streaming."""

from __future__ import annotations

import asyncio
import gc
import tracemalloc

import aiohttp

from lbproxy.proxy import DataPlane

from .conftest import Client, RawUpstream, Upstream, answering, build, make_vs, read_head, serve

T = 10  # seconds: an upper bound for any single test step, never a synchronisation device


async def test_keep_alive_both_sides(dataplane: DataPlane, upstream: Upstream) -> None:
    ports = await serve(dataplane, make_vs(ports=(upstream.port,)))
    async with asyncio.timeout(T):
        c = await Client.connect(ports["web"])
        for i in range(20):
            r = await c.request(path=f"/k?i={i}")
            assert r.status == 200
            assert r.json()["path"] == f"/k?i={i}"
            assert r.header("Connection") is None
        c.close()
    # 20 requests on one client connection went over one pooled upstream connection.
    assert upstream.requests == 20
    assert len(upstream.peers) == 1
    stats = dataplane.stats()
    assert stats["virtual_services"]["web"]["requests"] == 20
    assert stats["virtual_services"]["web"]["connections"]["total"] == 1


async def test_upstream_pool_shared_by_sequential_clients(dataplane: DataPlane,
                                                          upstream: Upstream) -> None:
    ports = await serve(dataplane, make_vs(ports=(upstream.port,)))
    async with asyncio.timeout(T):
        for _ in range(5):
            c = await Client.connect(ports["web"])
            assert (await c.request()).status == 200
            c.close()
    assert len(upstream.peers) == 1


async def test_pipelined_requests_answered_in_order(dataplane: DataPlane,
                                                    upstream: Upstream) -> None:
    ports = await serve(dataplane, make_vs(ports=(upstream.port,)))
    async with asyncio.timeout(T):
        c = await Client.connect(ports["web"])
        # The slow one first: a proxy that answered out of order would return /p1 first.
        data = build(path="/slow?d=0.2") + b"".join(build(path=f"/p{i}") for i in range(1, 30))
        data += build("POST", "/p30", body=b"hello")
        await c.send(data)
        r = await c.response()
        assert r.body == b"slow"
        for i in range(1, 30):
            r = await c.response()
            assert r.json()["path"] == f"/p{i}"
        r = await c.response()
        assert r.json()["path"] == "/p30" and r.json()["body"] == "hello"
        c.close()


async def test_forwarded_headers_and_hop_by_hop(dataplane: DataPlane, upstream: Upstream) -> None:
    ports = await serve(dataplane, make_vs(ports=(upstream.port,)))
    async with asyncio.timeout(T):
        c = await Client.connect(ports["web"])
        r = await c.request(host="shop.example:8080", headers=(
            ("X-Forwarded-For", "10.1.1.1"), ("X-Forwarded-Proto", "https"),
            ("Connection", "keep-alive, X-Secret"), ("X-Secret", "s"), ("Keep-Alive", "300"),
            ("TE", "trailers"), ("Proxy-Connection", "keep-alive"), ("X-Other", "o")))
        seen = {k.lower(): v for k, v in r.json()["headers"]}
        assert seen["x-forwarded-for"] == "10.1.1.1, 127.0.0.1"
        assert seen["x-forwarded-proto"] == "http"
        assert seen["x-forwarded-host"] == "shop.example:8080"
        assert seen["host"] == "shop.example:8080"
        assert seen["x-other"] == "o"
        for gone in ("x-secret", "keep-alive", "te", "proxy-connection"):
            assert gone not in seen, gone
        assert seen.get("connection", "keep-alive").lower() == "keep-alive"
        # Hop-by-hop fields of the response are dropped too; end-to-end ones pass.
        r = await c.request(path="/hop")
        assert r.header("X-Kept") == "1"
        assert r.header("Keep-Alive") is None and r.header("Proxy-Connection") is None
        c.close()


async def test_forwarded_headers_can_be_off(dataplane: DataPlane, upstream: Upstream) -> None:
    ports = await serve(dataplane, make_vs(ports=(upstream.port,), add_forwarded_headers=False))
    async with asyncio.timeout(T):
        c = await Client.connect(ports["web"])
        r = await c.request(headers=(("X-Forwarded-For", "10.1.1.1"),))
        seen = {k.lower(): v for k, v in r.json()["headers"]}
        assert seen["x-forwarded-for"] == "10.1.1.1"
        assert "x-forwarded-proto" not in seen and "x-forwarded-host" not in seen
        c.close()


async def test_chunked_request_and_response(dataplane: DataPlane, upstream: Upstream) -> None:
    ports = await serve(dataplane, make_vs(ports=(upstream.port,)))
    async with asyncio.timeout(T):
        c = await Client.connect(ports["web"])
        await c.send(b"POST /sink HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
                     b"5\r\nhello\r\n")
        await c.send(b"6\r\n world\r\n0\r\n\r\n")
        r = await c.response()
        assert r.status == 200 and r.body == b"11"
        # A streamed response without Content-Length reaches the client chunked.
        r = await c.request(path="/big?n=200000")
        assert r.header("Transfer-Encoding") == "chunked"
        assert r.body == b"x" * 200000
        # The connection is still usable.
        assert (await c.request(path="/after")).json()["path"] == "/after"
        c.close()


async def test_head_204_304(dataplane: DataPlane, upstream: Upstream) -> None:
    ports = await serve(dataplane, make_vs(ports=(upstream.port,)))
    async with asyncio.timeout(T):
        c = await Client.connect(ports["web"])
        r = await c.request("HEAD", "/status/200")
        assert r.status == 200 and r.header("Content-Length") == "10"
        r = await c.request("GET", "/status/204")
        assert r.status == 204
        r = await c.request("GET", "/status/304")
        assert r.status == 304 and r.header("ETag") == '"x"'
        r = await c.request("HEAD", "/big?n=1000&cl=1")
        assert r.status == 200 and r.header("Content-Length") == "1000"
        # After bodiless answers the stream is still in sync.
        r = await c.request("GET", "/status/201")
        assert r.status == 201 and r.body == b"status 201"
        c.close()
    # A response to HEAD that announces a body ends the use of its upstream connection (a server
    # that sent the body too would have it read as the next response): HEAD 200, then 204 and 304
    # on a second connection, HEAD /big, then 201 on a third.
    assert len(upstream.peers) == 3


async def test_interim_1xx_forwarded_and_close_delimited_body(dataplane: DataPlane) -> None:
    async def handler(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        await read_head(r)
        w.write(b"HTTP/1.1 103 Early Hints\r\nLink: </a.css>; rel=preload\r\n\r\n"
                b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n\r\nuntil the end")
        await w.drain()

    async with RawUpstream(handler) as raw, asyncio.timeout(T):
        ports = await serve(dataplane, make_vs(ports=(raw.port,)))
        c = await Client.connect(ports["web"])
        await c.send(build())
        r = await c.response()
        assert r.status == 103 and r.header("Link") == "</a.css>; rel=preload"
        r = await c.response()
        # Delimited by the end of the upstream connection: the client connection closes too.
        assert r.status == 200 and r.body == b"until the end"
        assert r.header("Connection") == "close"


async def test_expect_100_continue(dataplane: DataPlane, upstream: Upstream) -> None:
    ports = await serve(dataplane, make_vs(ports=(upstream.port,)))
    async with asyncio.timeout(T):
        c = await Client.connect(ports["web"])
        await c.send(b"PUT /sink HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\n"
                     b"Content-Length: 5\r\n\r\n")
        interim = await c.response()
        assert interim.status == 100
        await c.send(b"abcde")
        r = await c.response()
        assert r.status == 200 and r.body == b"5"
        c.close()


async def test_large_bodies_stream_with_bounded_memory(dataplane: DataPlane,
                                                       upstream: Upstream) -> None:
    size = 200 * 1024 * 1024
    ports = await serve(dataplane, make_vs(ports=(upstream.port,)))
    block = b"y" * (256 * 1024)

    async def gen() -> object:
        for _ in range(size // len(block)):
            yield block

    gc.collect()
    tracemalloc.start()
    try:
        async with asyncio.timeout(60), aiohttp.ClientSession() as s:
            base = f"http://127.0.0.1:{ports['web']}"
            async with s.post(f"{base}/sink", data=gen()) as r:
                assert r.status == 200
                assert int(await r.text()) == size
            got = 0
            async with s.get(f"{base}/big?n={size}&cl=1") as r:
                assert r.status == 200
                async for chunk in r.content.iter_chunked(256 * 1024):
                    got += len(chunk)
            assert got == size
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    # Client, proxy and real server all live in this process; every buffer is bounded by its
    # high-water mark, so the peak stays far below the body size (200 MB).
    assert peak < 16 * 1024 * 1024, peak


async def test_websocket_tunnel(dataplane: DataPlane, upstream: Upstream) -> None:
    ports = await serve(dataplane, make_vs(ports=(upstream.port,)))
    async with asyncio.timeout(T), aiohttp.ClientSession() as s:
        async with s.ws_connect(f"http://127.0.0.1:{ports['web']}/ws") as ws:
            for i in range(3):
                await ws.send_str(f"m{i}")
                assert (await ws.receive_str()) == f"echo:m{i}"
            await ws.send_bytes(b"\x00" * 100000)
            assert (await ws.receive_bytes()) == b"\x00" * 100000
    # Plain requests still work after the tunnel closed.
    async with asyncio.timeout(T):
        c = await Client.connect(ports["web"])
        assert (await c.request()).status == 200
        c.close()


async def test_http10_client(dataplane: DataPlane, upstream: Upstream) -> None:
    ports = await serve(dataplane, make_vs(ports=(upstream.port,)))
    async with asyncio.timeout(T):
        c = await Client.connect(ports["web"])
        await c.send(b"GET /big?n=3000 HTTP/1.0\r\nHost: x\r\n\r\n")
        # No chunked encoding for HTTP/1.0: the body runs to the end of the connection.
        r = await c.response()
        assert r.status == 200 and r.body == b"x" * 3000
        assert r.header("Transfer-Encoding") is None
        c2 = await Client.connect(ports["web"])
        await c2.send(b"GET /a HTTP/1.0\r\nHost: x\r\nConnection: keep-alive\r\n\r\n")
        r = await c2.response()
        assert r.status == 200 and r.header("Connection") == "keep-alive"
        await c2.send(b"GET /b HTTP/1.0\r\nHost: x\r\n\r\n")
        r = await c2.response()
        assert r.json()["path"] == "/b"
        assert await c2.closed()


async def test_response_shapes_relayed_exactly(dataplane: DataPlane) -> None:
    """Whole responses in one read (relayed without the parser) and split ones (parsed) agree."""
    answers = [
        [b"HTTP/1.1 200 OK\r\nConnection: keep-alive\r\nKeep-Alive: timeout=5\r\n"
         b"Content-Length: 3\r\nX-A: 1\r\n\r\nabc"],
        [b"HTTP/1.1 201 Created\r\nContent-Length: 3\r\n\r\na", b"bc"],
        [b"HTTP/1.1 200 OK\r\nContent-Len", b"gth: 3\r\n\r\nabc"],
        [b"HTTP/1.1 404 Not Found\r\ncontent-length:3\r\n\r\nabc"],
        [b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n"],
        [b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n"],
    ]

    async def handler(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        for pieces in answers:
            await read_head(r)
            for piece in pieces:
                w.write(piece)
                await w.drain()
                await asyncio.sleep(0.01)  # make the pieces separate reads (not a sync device)

    async with RawUpstream(handler) as raw, asyncio.timeout(T):
        ports = await serve(dataplane, make_vs(ports=(raw.port,)))
        c = await Client.connect(ports["web"])
        for i, status in enumerate((200, 201, 200, 404, 200, 200)):
            r = await c.request(path=f"/{i}")
            assert r.status == status
            assert r.body == (b"" if i == 5 else b"abc")
            names = [k.lower() for k, _ in r.headers]
            assert "connection" not in names and "keep-alive" not in names
            if i == 0:
                assert r.raw_head == (b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nX-A: 1\r\n\r\n")
        c.close()
        assert raw.connections == 1


async def test_mixed_pipeline_in_random_pieces(dataplane: DataPlane, upstream: Upstream) -> None:
    """Proxied, local, bodied, chunked and HEAD requests pipelined and cut at random points."""
    import random

    from lbproxy.config.model import ContentRule, MatchType, NotAvailable, SubVS

    from .conftest import NO_CHECK
    from .conftest import servers as rs

    local = SubVS("local", rules=("loc",), health_check=NO_CHECK,
                  not_available=NotAvailable(200, b"local!", "text/plain"))
    app = SubVS("app", real_servers=rs(upstream.port), rules=("default",), health_check=NO_CHECK)
    vs = make_vs(subvs=(local, app), content_switching=True)
    ports = await serve(dataplane, vs, rules=(ContentRule("loc", MatchType.PREFIX, "/local"),))
    rnd = random.Random(7)
    kinds = ["get", "post", "chunked", "local", "local-post", "head"]
    async with asyncio.timeout(20):
        for _ in range(5):
            plan = [rnd.choice(kinds) for _ in range(25)]
            data = b""
            for i, k in enumerate(plan):
                if k == "get":
                    data += build(path=f"/g{i}")
                elif k == "post":
                    data += build("POST", f"/p{i}", body=b"b" * rnd.randint(0, 3000))
                elif k == "chunked":
                    data += (f"POST /c{i} HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n"
                             f"\r\n3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n").encode()
                elif k == "local":
                    data += build(path=f"/local{i}")
                elif k == "local-post":
                    data += build("POST", f"/local{i}", body=b"z" * rnd.randint(1, 5000))
                else:
                    data += build("HEAD", f"/h{i}")
            c = await Client.connect(ports["web"])
            pos = 0
            while pos < len(data):  # bounded: pos grows by at least 1 per turn
                step = rnd.randint(1, 700)
                await c.send(data[pos:pos + step])
                pos += step
            for i, k in enumerate(plan):
                r = await c.response(head=k == "head")
                assert r.status == 200, (i, k)
                if k in ("local", "local-post"):
                    assert r.body == b"local!"
                elif k == "head":
                    assert r.body == b""
                else:
                    got = r.json()
                    assert got["path"] == f"/{k[0]}{i}"
                    if k == "chunked":
                        assert got["body"] == "abcde"
            c.close()


async def test_connection_field_follows_the_client_hop(dataplane: DataPlane) -> None:
    """The server's "Connection: keep-alive" (relayed as is on the fast path) never contradicts
    the client's hop: a client that asked to close gets exactly "Connection: close" and EOF, an
    HTTP/1.0 keep-alive client exactly one "Connection: keep-alive"."""
    body = b"0123456789"
    resp = (b"HTTP/1.1 200 OK\r\nConnection: keep-alive\r\nContent-Length: 10\r\n\r\n"
            + body)

    async with RawUpstream(answering([resp] * 8)) as raw, asyncio.timeout(T):  # 4 are sent
        ports = await serve(dataplane, make_vs(ports=(raw.port,)))
        c = await Client.connect(ports["web"])
        for _ in range(2):  # the second one takes the cached head
            r = await c.request(path="/ka")
            assert r.body == body
            assert [v for k, v in r.headers if k.lower() == "connection"] == ["keep-alive"]
        await c.send(b"GET /v10 HTTP/1.0\r\nHost: example.com\r\nConnection: keep-alive\r\n\r\n")
        r = await c.response()
        assert r.body == body
        assert [v.lower() for k, v in r.headers if k.lower() == "connection"] == ["keep-alive"]
        r = await c.request(path="/close", headers=(("Connection", "close"),))
        assert r.body == body
        assert [v for k, v in r.headers if k.lower() == "connection"] == ["close"], r.raw_head
        assert await c.closed()
        c.close()


async def test_response_hop_by_hop_fields_cut_in_any_letter_case(dataplane: DataPlane) -> None:
    """Responses written in one piece (the fast path, its cached head included) and the
    parser's path lose every hop-by-hop field whatever its letter case; the rest is relayed. A
    lone "Connection: keep-alive" may stay: it says what the proxy would say of the client's
    hop anyway."""
    body = b"0123456789"
    plain = (b"HTTP/1.1 200 OK\r\nX-Kept: 1\r\nConnection: keep-alive\r\n"
             b"Content-Length: 10\r\n\r\n" + body)
    heads = [
        plain, plain,  # the second one reuses what the first one's head taught the fast path
        b"HTTP/1.1 200 OK\r\nX-Kept: 1\r\ncONNECTION: KEEP-ALIVE\r\nkEEP-aLIVE: timeout=5\r\n"
        b"Content-Length: 10\r\n\r\n" + body,
        b"HTTP/1.1 200 OK\r\nX-Kept: 1\r\nKEEP-ALIVE: timeout=5\r\nPROXY-CONNECTION: keep-alive"
        b"\r\npRoXy-AuThEnTiCaTe: Basic\r\ntE: trailers\r\ntRAILER: X-T\r\nuPgRaDe: h2c\r\n"
        b"Content-Length: 10\r\n\r\n" + body,
        b"HTTP/1.1 200 OK\r\nX-Kept: 1\r\ntRaNsFeR-eNcOdInG: chunked\r\nCONNECTION: Keep-Alive"
        b"\r\n\r\na\r\n" + body + b"\r\n0\r\n\r\n",
        plain,
    ]
    hop = {"connection", "keep-alive", "proxy-connection", "proxy-authenticate", "te",
           "trailer", "upgrade"}

    async with RawUpstream(answering(heads)) as raw, asyncio.timeout(T):
        ports = await serve(dataplane, make_vs(ports=(raw.port,)))
        c = await Client.connect(ports["web"])
        for i in range(len(heads)):
            r = await c.request(path=f"/r{i}")
            assert r.status == 200 and r.body == body, i
            assert r.header("X-Kept") == "1", i
            names = {k.lower() for k, _ in r.headers}
            assert not names & (hop - {"connection"}), (i, r.raw_head)
            assert [v.lower() for k, v in r.headers if k.lower() == "connection"] in (
                [], ["keep-alive"]), (i, r.raw_head)
            te = r.header("Transfer-Encoding")
            assert te is None or te == "chunked", (i, r.raw_head)
        assert raw.connections == 1
        c.close()
