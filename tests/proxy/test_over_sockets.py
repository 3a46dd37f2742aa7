"""Content rules and schedulers through the running data plane: real sockets on 127.0.0.1, real
aiohttp upstreams (the router and balancer themselves are unit-tested in tests/routing and
test_balancer.py; here the proxy's wiring of them is: subjects taken from the real request,
source addresses from the real connection, picks counted per real server)."""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import AsyncIterator

import pytest

from lbproxy.config.model import (
    Address,
    ContentRule,
    HealthCheck,
    HealthCheckType,
    MatchOn,
    MatchType,
    NotAvailable,
    RealServer,
    Scheduler,
    SubVS,
)
from lbproxy.proxy import DataPlane

from .conftest import NO_CHECK, Client, Upstream, make_vs, serve, start_upstream

T = 10.0
TOKEN = (("X-Token", "t"),)


def named(name: str) -> SubVS:
    """A SubVS without real servers that answers 200 with its own name."""
    return SubVS(name, rules=(name,), health_check=NO_CHECK,
                 not_available=NotAvailable(200, f"{name}\n".encode(), "text/plain"))


RULES = (
    ContentRule("deny", MatchType.PREFIX, "/deny", fail_on_match=True),
    ContentRule("mark", MatchType.PREFIX, "yes", on=MatchOn.HEADER, header="X-Beta", set_flag=1),
    ContentRule("beta", MatchType.PREFIX, "/app", only_if_flag=1),
    ContentRule("app", MatchType.PREFIX, "/app", only_if_not_flag=1),
    ContentRule("write", MatchType.REGEX, "^(PUT|DELETE)$", on=MatchOn.METHOD),
    ContentRule("host", MatchType.POSTFIX, ".example.org", on=MatchOn.HOST),
    ContentRule("src", MatchType.REGEX, r"^127\.0\.0\.9$", on=MatchOn.SRC_IP),
    ContentRule("body", MatchType.REGEX, "magic-[0-9]+", on=MatchOn.BODY),
    ContentRule("img", MatchType.POSTFIX, ".PNG", ignore_case=True),
    ContentRule("panel", MatchType.PREFIX, "admin.example.com/panel", include_host=True),
    ContentRule("search", MatchType.REGEX, r"^/search\?q=", include_query=True),
    ContentRule("real", MatchType.PREFIX, "/real/"),
    ContentRule("anon", MatchType.REGEX, ".", on=MatchOn.HEADER, header="X-Token", negate=True),
)


async def answer(port: int, method: str = "GET", path: str = "/", host: str = "example.com",
                 headers: tuple[tuple[str, str], ...] = TOKEN, body: bytes | None = None,
                 src: str = "127.0.0.1") -> tuple[int, bytes]:
    r, w = await asyncio.open_connection("127.0.0.1", port, local_addr=(src, 0))
    c = Client(r, w)
    try:
        resp = await c.request(method, path, host, headers, body)
        return resp.status, resp.body
    finally:
        c.close()


async def test_every_rule_option_precedence_and_flags(dataplane: DataPlane,
                                                      upstream: Upstream) -> None:
    subvs = [named(r.name) for r in RULES if r.name not in ("mark", "real")]
    subvs.append(SubVS("real", real_servers=(RealServer(Address("127.0.0.1", upstream.port)),),
                       rules=("real",), health_check=NO_CHECK))
    subvs.append(SubVS("fallback", rules=("default",), health_check=NO_CHECK,
                       not_available=NotAvailable(200, b"fallback\n", "text/plain")))
    # The marker belongs to a SubVS like any rule, but never selects it.
    subvs[subvs.index(named("beta"))] = SubVS(
        "beta", rules=("mark", "beta"), health_check=NO_CHECK,
        not_available=NotAvailable(200, b"beta\n", "text/plain"))
    vs = make_vs(subvs=tuple(subvs), content_switching=True,
                 precedence=(*(r.name for r in RULES), "default"))
    port = (await serve(dataplane, vs, rules=RULES))["web"]
    cases: list[tuple[dict[str, object], str]] = [
        # each option on its own
        (dict(path="/app", headers=(*TOKEN, ("X-Beta", "yes"))), "beta"),  # flag set, then tested
        (dict(path="/app"), "app"),  # flag not set
        (dict(path="/app", headers=(*TOKEN, ("X-Beta", "no"))), "app"),
        (dict(method="DELETE", path="/thing"), "write"),  # method
        (dict(path="/", host="www.example.org"), "host"),  # host, postfix
        (dict(path="/", host="www.example.org:8080"), "host"),  # matched without the port
        (dict(path="/", host="www.example.org.test"), "fallback"),
        (dict(path="/x", src="127.0.0.9"), "src"),  # source address of the connection
        (dict(path="/x", src="127.0.0.19"), "fallback"),
        (dict(method="POST", path="/submit", body=b"hello magic-42 bye"), "body"),
        (dict(method="POST", path="/submit", body=b"hello magic-x"), "fallback"),
        (dict(path="/a/B.png"), "img"),  # ignore case
        (dict(path="/panel/x", host="admin.example.com"), "panel"),  # include host
        (dict(path="/panel/x", host="www.example.com"), "fallback"),
        (dict(path="/search?q=lb"), "search"),  # include query
        (dict(path="/search"), "fallback"),
        (dict(path="/other", headers=()), "anon"),  # negation: no X-Token
        (dict(path="/other"), "fallback"),  # the default rule
        # precedence: the first matching rule in order wins
        (dict(method="PUT", path="/app"), "app"),  # app (4) before write (5)
        (dict(method="PUT", path="/search?q=1"), "write"),  # write (5) before search (11)
        (dict(path="/img.png", host="a.example.org"), "host"),  # host (6) before img (9)
        (dict(path="/real/x.PNG"), "img"),  # img (9) before real (12)
        (dict(path="/x", headers=(), src="127.0.0.9"), "src"),  # src (7) before anon (13)
    ]
    async with asyncio.timeout(T):
        for kw, expected in cases:
            status, body = await answer(port, **kw)  # type: ignore[arg-type]
            assert (status, body) == (200, f"{expected}\n".encode()), (kw, status, body)
        # fail on match refuses, and wins over a later rule that also matches
        for path in ("/deny/x", "/deny.PNG"):
            assert (await answer(port, path=path))[0] == 403
        # a rule that leads to real servers proxies the request
        status, body = await answer(port, path="/real/y?z=1")
        assert status == 200 and b'"port": %d' % upstream.port in body
        assert b'"path": "/real/y?z=1"' in body
    # Each request counted once, for the rule that decided it (a marker decides nothing).
    want = Counter("default" if e == "fallback" else e for _, e in cases)
    want.update({"deny": 2, "real": 1})
    hits = dataplane.stats()["virtual_services"]["web"]["rule_hits"]
    assert {k: v for k, v in hits.items() if v} == dict(want)


@pytest.fixture
async def three() -> AsyncIterator[list[Upstream]]:
    ups = [await start_upstream() for _ in range(3)]
    yield ups
    for up in ups:
        assert up.runner is not None
        await up.runner.cleanup()


async def balance(dataplane: DataPlane, ups: list[Upstream], scheduler: Scheduler,
                  weights: tuple[int, ...] = (1, 1, 1)) -> int:
    vs = make_vs(real_servers=tuple(RealServer(Address("127.0.0.1", u.port), w)
                                    for u, w in zip(ups, weights, strict=True)),
                 scheduler=scheduler)
    return (await serve(dataplane, vs))["web"]


async def served_by(port: int, paths: list[str], src: str = "127.0.0.1") -> list[int]:
    """The upstream port that answered each request, sent in turn on one connection."""
    r, w = await asyncio.open_connection("127.0.0.1", port, local_addr=(src, 0))
    c = Client(r, w)
    try:
        return [(await c.request(path=p)).json()["port"] for p in paths]
    finally:
        c.close()


async def concurrent(port: int, n: int) -> list[int]:
    """n slow requests on n connections, all sent before any is answered: the upstream of each
    (the proxy picks for each while the earlier ones are still in flight)."""
    conns = [Client(*await asyncio.open_connection("127.0.0.1", port)) for _ in range(n)]
    try:
        for c in conns:
            await c.send(b"GET /slow?d=0.5 HTTP/1.1\r\nHost: x\r\n\r\n")
        answers = await asyncio.gather(*(c.response() for c in conns))
        assert all(a.status == 200 and a.body == b"slow" for a in answers)
        return [int(a.header("X-Upstream") or 0) for a in answers]
    finally:
        for c in conns:
            c.close()


async def test_round_robin_and_weighted_round_robin(dataplane: DataPlane,
                                                    three: list[Upstream]) -> None:
    async with asyncio.timeout(T):
        port = await balance(dataplane, three, Scheduler.ROUND_ROBIN, (1, 2, 3))
        got = Counter(await served_by(port, ["/"] * 30))
        assert got == {u.port: 10 for u in three}  # weights ignored
        port = await balance(dataplane, three, Scheduler.WEIGHTED_ROUND_ROBIN, (1, 2, 3))
        order = await served_by(port, ["/"] * 60)
        assert Counter(order) == {three[0].port: 10, three[1].port: 20, three[2].port: 30}
        assert Counter(order[:6]) == {three[0].port: 1, three[1].port: 2, three[2].port: 3}


async def test_hash_schedulers_are_stable_and_spread(dataplane: DataPlane,
                                                     three: list[Upstream]) -> None:
    async with asyncio.timeout(T):
        port = await balance(dataplane, three, Scheduler.SOURCE_IP_HASH)
        by_ip = {}
        for i in range(10, 22):
            src = f"127.0.0.{i}"
            first = await served_by(port, ["/a", "/b", "/c"], src)
            again = await served_by(port, ["/d"], src)  # a new connection from the same address
            assert len(set(first + again)) == 1, src
            by_ip[src] = first[0]
        assert len(set(by_ip.values())) >= 2

        port = await balance(dataplane, three, Scheduler.URL_HASH)
        by_path = {}
        for i in range(12):
            got = await served_by(port, [f"/p{i}", f"/p{i}?v=2", f"/p{i}"])
            other = await served_by(port, [f"/p{i}"], "127.0.0.30")  # whatever the client
            assert len(set(got + other)) == 1, i  # the query is not part of the key
            by_path[i] = got[0]
        assert len(set(by_path.values())) >= 2


async def test_least_connections_and_weighted_least_connections(dataplane: DataPlane,
                                                                three: list[Upstream]) -> None:
    async with asyncio.timeout(T):
        port = await balance(dataplane, three, Scheduler.LEAST_CONNECTIONS, (1, 1, 2))
        assert Counter(await concurrent(port, 3)) == {u.port: 1 for u in three}  # weights ignored
        port = await balance(dataplane, three, Scheduler.WEIGHTED_LEAST_CONNECTIONS, (1, 1, 2))
        assert Counter(await concurrent(port, 4)) == {three[0].port: 1, three[1].port: 1,
                                                      three[2].port: 2}
        assert Counter(await concurrent(port, 8)) == {three[0].port: 2, three[1].port: 2,
                                                      three[2].port: 4}


async def answered(up: Upstream, status: int) -> None:
    """Until two health probes in a row got `status` from `up`: a monitor records a probe's answer
    before it sends the next, so the first of the two has been acted on."""
    while True:
        up.probed.clear()
        await up.probed.wait()
        if up.probes[-2:] == [status, status]:
            return


async def test_health_check_ejects_and_returns_a_server(dataplane: DataPlane, upstream: Upstream,
                                                        upstream2: Upstream) -> None:
    check = HealthCheck(type=HealthCheckType.HTTP, path="/hc", interval=0.02, timeout=2.0,
                        rise=1, fall=1)
    vs = make_vs(real_servers=tuple(RealServer(Address("127.0.0.1", u.port))
                                    for u in (upstream, upstream2)), health_check=check)
    port = (await serve(dataplane, vs))["web"]
    both = {upstream.port, upstream2.port}
    async with asyncio.timeout(T):
        await answered(upstream, 200)
        assert set(await served_by(port, ["/"] * 4)) == both
        upstream.health = 503
        await answered(upstream, 503)
        assert set(await served_by(port, ["/"] * 6)) == {upstream2.port}
        servers = dataplane.stats()["virtual_services"]["web"]["real_servers"]
        assert [s["healthy"] for s in servers] == [False, True]
        upstream.health = 200
        await answered(upstream, 200)
        assert set(await served_by(port, ["/"] * 4)) == both
