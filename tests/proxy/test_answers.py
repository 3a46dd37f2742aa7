"""Answers the proxy gives itself: errors, limits, timeouts, not-available, redirects, routing."""

from __future__ import annotations

import asyncio
import socket

from lbproxy.config.model import (
    Address,
    ContentRule,
    Limits,
    MatchOn,
    MatchType,
    NotAvailable,
    RealServer,
    SubVS,
    Timeouts,
    VSKind,
)
from lbproxy.proxy import DataPlane
from lbproxy.runtime import Injection

from .conftest import (
    NO_CHECK,
    Client,
    RawUpstream,
    Upstream,
    build,
    make_vs,
    read_head,
    serve,
)
from .conftest import servers as rs

T = 10


def free_port() -> int:
    """A port nobody listens on (bound then released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


async def test_502_when_real_server_refuses(dataplane: DataPlane) -> None:
    ports = await serve(dataplane, make_vs(ports=(free_port(),)))
    async with asyncio.timeout(T):
        c = await Client.connect(ports["web"])
        r = await c.request()
        assert r.status == 502
        # The request was read whole, so the connection stays open.
        r = await c.request()
        assert r.status == 502
        c.close()
    servers = dataplane.stats()["virtual_services"]["web"]["real_servers"]
    assert servers[0]["failures"] >= 2 and servers[0]["active"] == 0


async def test_idempotent_request_retried_on_another_server(dataplane: DataPlane,
                                                            upstream: Upstream) -> None:
    dead = free_port()
    ports = await serve(dataplane, make_vs(ports=(dead, upstream.port)))
    async with asyncio.timeout(T):
        c = await Client.connect(ports["web"])
        for _ in range(4):
            assert (await c.request()).status == 200
        c.close()
    servers = dataplane.stats()["virtual_services"]["web"]["real_servers"]
    assert servers[0]["failures"] >= 1


async def test_503_when_no_server_is_up(dataplane: DataPlane) -> None:
    vs = make_vs(real_servers=(RealServer(Address("127.0.0.1", 9), enabled=False),))
    ports = await serve(dataplane, vs)
    async with asyncio.timeout(T):
        c = await Client.connect(ports["web"])
        r = await c.request()
        assert r.status == 503 and r.body == b"Service Unavailable\n"
        assert (await c.request()).status == 503
        c.close()


async def test_504_on_first_byte_timeout(dataplane: DataPlane, upstream: Upstream) -> None:
    ports = await serve(dataplane, make_vs(ports=(upstream.port,),
                                           timeouts=Timeouts(first_byte=0.2)))
    async with asyncio.timeout(T):
        c = await Client.connect(ports["web"])
        r = await c.request(path="/slow?d=3")
        assert r.status == 504
        assert (await c.request(path="/fast")).status == 200
        c.close()


async def test_real_server_dying_mid_response_closes_client(dataplane: DataPlane) -> None:
    async def handler(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        await read_head(r)
        w.write(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n0123456789")
        await w.drain()

    async with RawUpstream(handler) as raw, asyncio.timeout(T):
        ports = await serve(dataplane, make_vs(ports=(raw.port,)))
        c = await Client.connect(ports["web"])
        await c.send(build())
        head = await read_head(c.r)
        assert b"Content-Length: 100" in head
        rest = await c.r.read()
        assert rest == b"0123456789"  # then EOF: never a complete 100-byte body


async def test_malformed_response_is_502(dataplane: DataPlane) -> None:
    async def handler(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        await read_head(r)
        w.write(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\nhello")
        await w.drain()
        await r.read()

    async with RawUpstream(handler) as raw, asyncio.timeout(T):
        ports = await serve(dataplane, make_vs(ports=(raw.port,)))
        c = await Client.connect(ports["web"])
        assert (await c.request()).status == 502


async def test_bad_requests(dataplane: DataPlane, upstream: Upstream) -> None:
    ports = await serve(dataplane, make_vs(
        ports=(upstream.port,), timeouts=Timeouts(head=0.2),
        limits=Limits(max_header_bytes=2048, max_headers=10, max_body=100)))
    port = ports["web"]
    async with asyncio.timeout(T):
        cases = [
            (b"GARBAGE\r\n\r\n", 400),
            (build(headers=(("X-Big", "a" * 4000),)), 431),
            (build(headers=tuple((f"X-{i}", "v") for i in range(20))), 431),
            (build("POST", body=b"z" * 101), 413),
            (b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
             b"80\r\n" + b"z" * 128 + b"\r\n", 413),
            (b"GET / HTTP/1.1\r\nHost: x\r\n", 408),  # the head never ends
        ]
        for data, status in cases:
            c = await Client.connect(port)
            await c.send(data)
            r = await c.response()
            assert r.status == status, (data[:40], r.status)
            assert r.header("Connection") == "close"
            assert await c.closed()
        # A head sent in pieces that never completes but grows past the limit.
        c = await Client.connect(port)
        await c.send(b"GET / HTTP/1.1\r\nHost: x\r\nX-A: ")
        for _ in range(5):
            await c.send(b"b" * 1000)
        assert (await c.response()).status == 431


async def test_head_limit_holds_across_a_pipelined_boundary(dataplane: DataPlane,
                                                             upstream: Upstream) -> None:
    """A head whose first part came in the same read as the previous request, and whose rest
    arrives after that request was answered, is measured whole: 1500 + 1500 bytes > 2048."""
    ports = await serve(dataplane, make_vs(ports=(upstream.port,),
                                           limits=Limits(max_header_bytes=2048)))
    async with asyncio.timeout(T):
        c = await Client.connect(ports["web"])
        await c.send(build(path="/first") + b"GET /second HTTP/1.1\r\nHost: x\r\nX-A: "
                     + b"a" * 1500)
        assert (await c.response()).status == 200
        await c.send(b"\r\nX-B: " + b"b" * 1500 + b"\r\n\r\n")
        r = await c.response()
        assert r.status == 431 and r.header("Connection") == "close"
        assert await c.closed()


async def test_idle_keep_alive_timeout_closes(dataplane: DataPlane, upstream: Upstream) -> None:
    ports = await serve(dataplane, make_vs(ports=(upstream.port,), timeouts=Timeouts(idle=0.2)))
    async with asyncio.timeout(T):
        c = await Client.connect(ports["web"])
        assert (await c.request()).status == 200
        assert await c.closed()


async def test_max_connections(dataplane: DataPlane, upstream: Upstream) -> None:
    ports = await serve(dataplane, make_vs(ports=(upstream.port,),
                                           limits=Limits(max_connections=2)))
    async with asyncio.timeout(T):
        # Two busy connections (their requests wait on the real server): a third is answered 503
        # before it sends anything, and closed.
        a = await Client.connect(ports["web"])
        b = await Client.connect(ports["web"])
        await a.send(b"GET /slow?d=0.5 HTTP/1.1\r\nHost: a\r\n\r\n")
        await b.send(b"GET /slow?d=0.5 HTTP/1.1\r\nHost: a\r\n\r\n")
        await upstream.wait_requests(2)  # both wait on the real server (0.5 s)
        c = await Client.connect(ports["web"])
        r = await c.response()
        assert r.status == 503 and r.header("Connection") == "close"
        assert await c.closed()
        assert (await a.response()).status == 200
        assert (await b.response()).status == 200
        # Now both are idle keep-alive connections: a new one takes the place of the one idle
        # longest, as nginx reuses idle keep-alive connections at its limit. (Both went idle in
        # the same millisecond of uvloop's clock: either may be the one.)
        c = await Client.connect(ports["web"])
        assert (await c.request()).status == 200
        outcomes = []
        for x in (a, b):
            try:
                outcomes.append((await x.request()).status)
            except (asyncio.IncompleteReadError, ConnectionError):
                outcomes.append(0)  # closed to make room
        assert sorted(outcomes) == [0, 200]
        for x in (a, b, c):
            x.close()
    st = dataplane.stats()["virtual_services"]["web"]
    assert st["connections"]["refused"] == 1
    assert st["limit_rejections"]["evicted"] == 1


def _acme_subvs(token: str = "tok") -> tuple[SubVS, ContentRule]:
    na = NotAvailable(status=200, body=f"{token}.thumb".encode(), content_type="text/plain")
    rule = ContentRule(name=f"acme-{token}", match_type=MatchType.PREFIX,
                       pattern=f"/.well-known/acme-challenge/{token}")
    return SubVS(name=f"acme-{token}", rules=(rule.name,), not_available=na,
                 health_check=NO_CHECK), rule


async def test_content_switching(dataplane: DataPlane, upstream: Upstream,
                                 upstream2: Upstream) -> None:
    rules = (
        ContentRule("api", MatchType.PREFIX, "/api/"),
        ContentRule("img", MatchType.POSTFIX, ".png"),
        ContentRule("admin", MatchType.PREFIX, "/admin", fail_on_match=True),
        ContentRule("static-host", MatchType.REGEX, "^static\\.", on=MatchOn.HOST),
    )
    acme, acme_rule = _acme_subvs()
    vs = make_vs(subvs=(
        SubVS("api", real_servers=rs(upstream.port), rules=("api", "admin"),
              health_check=NO_CHECK),
        SubVS("img", real_servers=rs(upstream2.port), rules=("img", "static-host"),
              health_check=NO_CHECK),
        acme,
    ), content_switching=True, not_available=NotAvailable(404, b"no route\n", "text/plain"))
    ports = await serve(dataplane, vs, rules=(*rules, acme_rule))
    async with asyncio.timeout(T):
        c = await Client.connect(ports["web"])
        assert (await c.request(path="/api/x")).json()["port"] == upstream.port
        assert (await c.request(path="/a/b.png")).json()["port"] == upstream2.port
        assert (await c.request(path="/", host="static.example")).json()["port"] == upstream2.port
        r = await c.request(path="/nothing")
        assert r.status == 404 and r.body == b"no route\n"
        r = await c.request(path="/.well-known/acme-challenge/tok")
        assert r.status == 200 and r.body == b"tok.thumb"
        assert r.header("Content-Type") == "text/plain" and r.header("Content-Length") == "9"
        r = await c.request(path="/admin/x")
        assert r.status == 403
        assert await c.closed()
    stats = dataplane.stats()["virtual_services"]["web"]["subvs"]
    assert stats["api"]["requests"] == 1 and stats["img"]["requests"] == 2


async def test_remembered_decisions_follow_host_and_target(dataplane: DataPlane,
                                                           upstream: Upstream,
                                                           upstream2: Upstream) -> None:
    """Rules on the URL alone are decided once per request target and remembered (bounded);
    with "include host" the Host is part of what is remembered: the same path on two hosts keeps
    going to two SubVSs, request after request, across the memo being emptied."""
    from lbproxy.proxy.service import ROUTE_MEMO_SIZE

    rules = (ContentRule("a-host", MatchType.PREFIX, "a.example/x", include_host=True),
             ContentRule("q", MatchType.POSTFIX, "/x?b", include_query=True))
    vs = make_vs(subvs=(
        SubVS("a", real_servers=rs(upstream.port), rules=("a-host",), health_check=NO_CHECK),
        SubVS("q", real_servers=rs(upstream2.port), rules=("q",), health_check=NO_CHECK),
    ), content_switching=True, not_available=NotAvailable(404, b"none\n", "text/plain"))
    ports = await serve(dataplane, vs, rules=rules)
    svc = dataplane._listeners[("127.0.0.1", 0, "web")].service
    async with asyncio.timeout(T):
        c = await Client.connect(ports["web"])
        for _ in range(3):
            assert (await c.request(path="/x", host="a.example")).json()["port"] == upstream.port
            assert (await c.request(path="/x", host="A.EXAMPLE")).json()["port"] == upstream.port
            assert (await c.request(path="/x", host="b.example")).status == 404
            assert (await c.request(path="/x?b", host="b.example")).json()["port"] == (
                upstream2.port)
        assert len(svc.memo) == 3  # (host, target) keys: a.example/x, b.example/x, b.example/x?b
        svc.memo.update({("x", f"/f{i}".encode()): 0 for i in range(ROUTE_MEMO_SIZE)})
        assert (await c.request(path="/x", host="c.example")).status == 404
        assert len(svc.memo) == 1  # a new decision on a full memo empties it first
        assert (await c.request(path="/x", host="a.example")).json()["port"] == upstream.port
        c.close()


async def test_not_available_answer_is_exact_and_keeps_alive(dataplane: DataPlane) -> None:
    acme, rule = _acme_subvs("abc")
    vs = make_vs(subvs=(acme,), content_switching=True)
    ports = await serve(dataplane, vs, rules=(rule,))
    async with asyncio.timeout(T):
        c = await Client.connect(ports["web"])
        for _ in range(3):
            await c.send(build(path="/.well-known/acme-challenge/abc"))
            head = await read_head(c.r)
            assert head == (b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n"
                            b"Content-Length: 9\r\n\r\n")
            assert await c.r.readexactly(9) == b"abc.thumb"
        r = await c.request("HEAD", "/.well-known/acme-challenge/abc")
        assert r.status == 200 and r.header("Content-Length") == "9"
        # A body sent with a request answered locally is read and discarded.
        r = await c.request("POST", "/.well-known/acme-challenge/abc", body=b"q" * 5000)
        assert r.body == b"abc.thumb"
        assert (await c.request(path="/.well-known/acme-challenge/abc")).status == 200
        c.close()


async def test_ordered_subvs_without_content_switching(dataplane: DataPlane,
                                                       upstream: Upstream) -> None:
    vs = make_vs(subvs=(
        SubVS("first", real_servers=(RealServer(Address("127.0.0.1", 9), enabled=False),),
              health_check=NO_CHECK),
        SubVS("second", real_servers=rs(upstream.port), health_check=NO_CHECK),
    ), content_switching=False)
    ports = await serve(dataplane, vs)
    async with asyncio.timeout(T):
        c = await Client.connect(ports["web"])
        assert (await c.request()).json()["port"] == upstream.port
        c.close()


async def test_redirect_vs(dataplane: DataPlane) -> None:
    vs = make_vs(kind=VSKind.REDIRECT, redirect_status=308,
                 redirect_to="https://{hostname}:8443{path}#{port}")
    ports = await serve(dataplane, vs)
    async with asyncio.timeout(T):
        c = await Client.connect(ports["web"])
        r = await c.request(path="/a/b?c=d", host="www.example:8080")
        assert r.status == 308
        assert r.header("Location") == "https://www.example:8443/a/b?c=d#8080"
        assert r.header("Content-Length") == "0"
        r = await c.request(path="/", host="plain.example")
        assert r.header("Location") == f"https://plain.example:8443/#{ports['web']}"
        c.close()


async def test_injection_answers_on_redirect_vs(dataplane: DataPlane) -> None:
    from lbproxy.config.model import Config
    from lbproxy.runtime import Runtime

    acme, rule = _acme_subvs("t1")
    vs = make_vs(kind=VSKind.REDIRECT)
    rt = Runtime(2, Config(virtual_services=(vs,)), (Injection("web", acme, rule),))
    await dataplane.apply(rt)
    port = dataplane.listening_ports()["web"][1]
    async with asyncio.timeout(T):
        c = await Client.connect(port)
        r = await c.request(path="/.well-known/acme-challenge/t1")
        assert r.status == 200 and r.body == b"t1.thumb"
        r = await c.request(path="/other")
        assert r.status == 301 and r.header("Location") == "https://example.com/other"
        c.close()


async def test_injection_on_vs_with_real_servers_and_ordered_subvs(dataplane: DataPlane,
                                                                   upstream: Upstream) -> None:
    from lbproxy.config.model import Config
    from lbproxy.runtime import Runtime

    acme, rule = _acme_subvs("t2")
    direct = make_vs("direct", ports=(upstream.port,))
    ordered = make_vs("ordered", subvs=(
        SubVS("only", real_servers=rs(upstream.port), health_check=NO_CHECK),),
        content_switching=False)
    rt = Runtime(2, Config(virtual_services=(direct, ordered)),
                 (Injection("direct", acme, rule), Injection("ordered", acme, rule)))
    await dataplane.apply(rt)
    async with asyncio.timeout(T):
        for name in ("direct", "ordered"):
            c = await Client.connect(dataplane.listening_ports()[name][1])
            r = await c.request(path="/.well-known/acme-challenge/t2")
            assert r.status == 200 and r.body == b"t2.thumb"
            # Everything else is served as without the injection.
            assert (await c.request(path="/app")).json()["path"] == "/app"
            c.close()


async def test_http11_request_without_host_is_400(dataplane: DataPlane,
                                                  upstream: Upstream) -> None:
    ports = await serve(dataplane, make_vs(ports=(upstream.port,)))
    async with asyncio.timeout(T):
        c = await Client.connect(ports["web"])
        await c.send(b"GET / HTTP/1.1\r\n\r\n")
        assert (await c.response()).status == 400
        c2 = await Client.connect(ports["web"])
        await c2.send(b"GET /old HTTP/1.0\r\n\r\n")
        assert (await c2.response()).json()["path"] == "/old"


async def test_first_byte_wait_starts_after_the_request_body(dataplane: DataPlane,
                                                             upstream: Upstream) -> None:
    ports = await serve(dataplane, make_vs(ports=(upstream.port,),
                                           timeouts=Timeouts(first_byte=0.2)))
    async with asyncio.timeout(T):
        c = await Client.connect(ports["web"])
        await c.send(b"POST /sink HTTP/1.1\r\nHost: x\r\nContent-Length: 6\r\n\r\nab")
        for piece in (b"cd", b"ef"):
            await asyncio.sleep(0.2)  # a slow upload: longer in total than first_byte
            await c.send(piece)
        r = await c.response()
        assert r.status == 200 and r.body == b"6"
        c.close()


async def test_request_timeout_bounds_a_stalled_upload(dataplane: DataPlane,
                                                       upstream: Upstream) -> None:
    ports = await serve(dataplane, make_vs(ports=(upstream.port,),
                                           timeouts=Timeouts(request=0.3)))
    async with asyncio.timeout(T):
        c = await Client.connect(ports["web"])
        await c.send(b"POST /sink HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\nab")
        r = await c.response()  # the rest of the body never comes
        assert r.status == 408
        assert await c.closed()
