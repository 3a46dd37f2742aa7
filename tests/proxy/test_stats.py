"""DataPlane.stats() counters for metrics: bytes, status classes, latency, rule hits, limits."""

from __future__ import annotations

import asyncio
import socket

from lbproxy.config.model import (
    Address,
    ContentRule,
    Limits,
    MatchType,
    NotAvailable,
    RealServer,
    SubVS,
    Timeouts,
)
from lbproxy.proxy import DataPlane
from lbproxy.proxy.counters import LIMIT_KEYS

from .conftest import NO_CHECK, Client, Upstream, build, make_vs, serve, servers

T = 10


def _sum_classes(node: dict) -> int:  # type: ignore[type-arg]
    return sum(node["responses"].values())


async def test_bytes_responses_latency_and_rule_hits(dataplane: DataPlane, upstream: Upstream,
                                                     upstream2: Upstream) -> None:
    rules = (ContentRule("api", MatchType.PREFIX, "/api/"),
             ContentRule("img", MatchType.POSTFIX, ".png"),
             ContentRule("admin", MatchType.PREFIX, "/admin", fail_on_match=True),
             ContentRule("st", MatchType.PREFIX, "/status/"),
             ContentRule("slow", MatchType.PREFIX, "/slow"))
    vs = make_vs(subvs=(
        SubVS("api", real_servers=servers(upstream.port), rules=("api", "admin", "st", "slow"),
              health_check=NO_CHECK),
        SubVS("img", real_servers=servers(upstream2.port), rules=("img",),
              health_check=NO_CHECK),
        SubVS("empty", rules=("default",), health_check=NO_CHECK,
              not_available=NotAvailable(503, b"none\n")),
    ), content_switching=True)
    ports = await serve(dataplane, vs, rules=rules)
    sent = bytearray()
    got = bytearray()
    async with asyncio.timeout(T):
        c = await Client.connect(ports["web"])
        plan = [("GET", "/api/a", None), ("POST", "/api/b", b"x" * 300),
                ("GET", "/status/404", None),
                ("GET", "/a.png", None), ("GET", "/slow?d=0.12", None), ("GET", "/nowhere", None)]
        for method, path, body in plan:
            raw = build(method, path, body=body)
            sent += raw
            await c.send(raw)
            r = await c.response()
            got += r.raw_head + r.body
        raw = build("GET", "/admin/x")
        sent += raw
        await c.send(raw)
        r = await c.response()
        got += r.raw_head + r.body
        assert r.status == 403 and await c.closed()
    st = dataplane.stats()["virtual_services"]["web"]
    # Client-side bytes, exactly what went over the client connection.
    assert st["bytes_in"] == len(sent)
    assert st["bytes_out"] == len(got)
    assert st["responses"] == {"1xx": 0, "2xx": 4, "3xx": 0, "4xx": 2, "5xx": 1}
    api, img, empty = st["subvs"]["api"], st["subvs"]["img"], st["subvs"]["empty"]
    assert st["rule_hits"] == {"api": 2, "img": 1, "admin": 1, "st": 1, "slow": 1, "default": 1}
    assert st["limit_rejections"]["refused_by_rule"] == 1
    assert api["responses"] == {"1xx": 0, "2xx": 3, "3xx": 0, "4xx": 1, "5xx": 0}
    assert img["responses"]["2xx"] == 1
    assert empty["responses"]["5xx"] == 1 and empty["responses"]["4xx"] == 0
    rs = api["real_servers"][0]
    assert rs["responses"]["2xx"] == 3 and rs["bytes_in"] > 300 and rs["bytes_out"] > 0
    assert api["bytes_in"] == rs["bytes_in"]
    # Latency: every answered request counted once, in VS and in its SubVS.
    lat = st["latency"]
    assert lat["buckets"][0] == 0.0001 and len(lat["counts"]) == len(lat["buckets"]) + 1
    assert lat["count"] == sum(lat["counts"]) == 7 == _sum_classes(st)
    assert api["latency"]["count"] == 4 and empty["latency"]["count"] == 1
    # The slow request (0.12 s) fell in a bucket above 0.1 s; the sum includes it.
    above = sum(n for b, n in zip(lat["buckets"], lat["counts"], strict=False) if b > 0.1)
    assert above + lat["counts"][-1] >= 1 and lat["sum"] >= 0.12
    assert st["latency_count"] == 7 and st["latency_buckets"]["+Inf"] == lat["counts"][-1]


async def test_limit_counters(dataplane: DataPlane, upstream: Upstream) -> None:
    vs = make_vs(ports=(upstream.port,), limits=Limits(max_body=10, max_connections=3),
                 timeouts=Timeouts(head=0.3, idle=0.3, first_byte=0.3))
    ports = await serve(dataplane, vs)
    port = ports["web"]
    async with asyncio.timeout(T):
        c = await Client.connect(port)
        r = await c.request("POST", "/", body=b"y" * 20)
        assert r.status == 413 and await c.closed()
        c = await Client.connect(port)
        r = await c.request(path="/slow?d=1")
        assert r.status == 504
        c.close()
        c = await Client.connect(port)
        await c.send(b"GET / HTTP/1.1\r\nHost: a\r\n")
        r = await c.response()
        assert r.status == 408 and await c.closed()
        c = await Client.connect(port)
        assert (await c.request()).status == 200
        assert await c.closed()  # idle timeout
        c = await Client.connect(port)
        await c.send(b"GET / HTTP/1.1\r\nHost: a\r\nX: \x01\r\n\r\n")
        assert (await c.response()).status == 400
        # Connections busy with a real server are not closed: a new one gets 503.
        busy = [await Client.connect(port) for _ in range(3)]
        seen = upstream.requests
        for b in busy:
            await b.send(b"GET /slow?d=0.25 HTTP/1.1\r\nHost: a\r\n\r\n")
        await upstream.wait_requests(seen + 3)  # all three wait on the real server
        extra = await Client.connect(port)
        assert (await extra.response()).status == 503
        assert await extra.closed()
        for b in busy:
            assert (await b.response()).status == 200
            b.close()
    limits = dataplane.stats()["virtual_services"]["web"]["limit_rejections"]
    # Every limit key is there; those not hit here (the ones listed at 0, and any added later:
    # rate_limited, HTTP/2's) are 0.
    assert limits == {**dict.fromkeys(limits, 0),
                      "bad_request": 1, "head_timeout": 1, "idle_timeout": 1,
                      "header_too_large": 0, "too_many_headers": 0, "body_too_large": 1,
                      "max_connections": 1, "request_timeout": 0, "upstream_timeout": 1,
                      "refused_by_rule": 0, "body_timeout": 0, "body_incomplete": 0,
                      "evicted": 0}
    assert set(LIMIT_KEYS) <= set(limits)


async def test_connect_timeout_counts_as_upstream_timeout(dataplane: DataPlane) -> None:
    # A listener that never accepts, its backlog filled: further SYNs are dropped, connects hang.
    lsock = socket.socket()
    lsock.bind(("127.0.0.1", 0))
    lsock.listen(0)
    port = lsock.getsockname()[1]
    fillers = []
    for _ in range(3):
        f = socket.socket()
        f.setblocking(False)
        f.connect_ex(("127.0.0.1", port))
        fillers.append(f)
    vs = make_vs(real_servers=(RealServer(Address("127.0.0.1", port)),),
                 timeouts=Timeouts(connect=0.3))
    ports = await serve(dataplane, vs)
    try:
        async with asyncio.timeout(T):
            c = await Client.connect(ports["web"])
            r = await c.request("POST", "/", body=b"z")  # not idempotent: no retry
            assert r.status == 502
    finally:
        for f in fillers:
            f.close()
        lsock.close()
    limits = dataplane.stats()["virtual_services"]["web"]["limit_rejections"]
    assert limits["upstream_timeout"] == 1


async def test_counters_survive_a_reload(dataplane: DataPlane, upstream: Upstream) -> None:
    ports = await serve(dataplane, make_vs(ports=(upstream.port,)))
    async with asyncio.timeout(T):
        c = await Client.connect(ports["web"])
        for _ in range(3):
            assert (await c.request()).status == 200
        c.close()
    before = dataplane.stats()["virtual_services"]["web"]
    await serve(dataplane, make_vs(ports=(upstream.port,), limits=Limits(max_headers=50)))
    after = dataplane.stats()["virtual_services"]["web"]
    assert after["responses"] == before["responses"] and after["bytes_in"] == before["bytes_in"]
    assert after["real_servers"][0]["responses"]["2xx"] == 3
    # A real server removed by a reload keeps counting in its VS's totals.
    await serve(dataplane, make_vs())
    gone = dataplane.stats()["virtual_services"]["web"]
    assert gone["responses"]["2xx"] == 3 and gone["latency"]["count"] == 3
