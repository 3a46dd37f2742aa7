"""Rate limits per client address (proxy/ratelimit.py): through the running data plane on real
sockets (a burst then 429 with Retry-After, refill, addresses independent, a SubVS's own limit,
counters and metrics, a reload keeping the state), and the table itself with a fake clock (GCRA
figures, a flood of 100,000 distinct addresses bounded, IPv6 by prefix), and the config's errors."""

from __future__ import annotations

import asyncio
import time
import tracemalloc

import pytest
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from lbproxy.config.model import (
    Address,
    ContentRule,
    MatchType,
    RateLimit,
    RealServer,
    SubVS,
)
from lbproxy.errors import ConfigError
from lbproxy.metrics import MetricsCollector, make_registry
from lbproxy.proxy import DataPlane
from lbproxy.proxy.ratelimit import RateTable, too_many
from lbproxy.workers.merge import merge_stats

from .conftest import NO_CHECK, Client, Upstream, make_vs, serve

T = 10.0


async def connect(port: int, src: str = "127.0.0.1") -> Client:
    r, w = await asyncio.open_connection("127.0.0.1", port, local_addr=(src, 0))
    return Client(r, w)


async def get(c: Client, path: str = "/") -> tuple[int, str | None]:
    resp = await asyncio.wait_for(c.request("GET", path), T)
    return resp.status, resp.header("Retry-After")


# -- through the data plane ------------------------------------------------------------------


async def test_burst_then_429_with_retry_after_then_refill(dataplane: DataPlane,
                                                           upstream: Upstream) -> None:
    # 1/s: the three requests of the burst would have to take over 1/3 s each for a fourth to
    # find a token already back.
    vs = make_vs(ports=(upstream.port,), rate_limit=RateLimit(rate=1.0, burst=3))
    port = (await serve(dataplane, vs))["web"]
    c = await connect(port)
    try:
        assert [await get(c) for _ in range(3)] == [(200, None)] * 3
        refused_at = time.monotonic()
        status, retry = await get(c)
        assert (status, retry) == (429, "1")  # at most 1 s to the next token, rounded up
        assert upstream.requests == 3  # the refused request never reached the real server
        # The connection stays usable; a token comes back 1/rate = 1 s after the burst began.
        for _ in range(100):  # bounded: 100 x 50 ms
            status, _ = await get(c)
            if status == 200:
                break
            await asyncio.sleep(0.05)
        assert status == 200
        assert time.monotonic() - refused_at >= 0.5
    finally:
        c.close()
    st = dataplane.stats()["virtual_services"]["web"]
    assert st["rate_limits"]["-"]["limited"] >= 2
    assert st["rate_limits"]["-"]["entries"] == 1
    assert st["limit_rejections"]["rate_limited"] == st["rate_limits"]["-"]["limited"]
    assert st["codes"]["429"] == st["rate_limits"]["-"]["limited"]


async def test_addresses_are_limited_independently(dataplane: DataPlane,
                                                   upstream: Upstream) -> None:
    vs = make_vs(ports=(upstream.port,), rate_limit=RateLimit(rate=0.01, burst=2))
    port = (await serve(dataplane, vs))["web"]
    a = await connect(port, "127.0.0.1")
    b = await connect(port, "127.0.0.2")
    try:
        assert [s for s, _ in [await get(a) for _ in range(3)]] == [200, 200, 429]
        _, retry = await get(a)
        assert retry is not None and 99 <= int(retry) <= 101  # 1/0.01 s for the next token
        # Another address has its own burst, whatever the first one did.
        assert [s for s, _ in [await get(b) for _ in range(3)]] == [200, 200, 429]
    finally:
        a.close()
        b.close()
    rl = dataplane.stats()["virtual_services"]["web"]["rate_limits"]["-"]
    assert rl == {"limited": 3, "entries": 2, "evictions": 0}


async def test_a_refused_request_with_a_body_leaves_the_connection_in_step(
        dataplane: DataPlane, upstream: Upstream) -> None:
    vs = make_vs(ports=(upstream.port,), rate_limit=RateLimit(rate=0.01, burst=1))
    port = (await serve(dataplane, vs))["web"]
    c = await connect(port)
    try:
        assert (await get(c))[0] == 200
        resp = await asyncio.wait_for(c.request("POST", "/sink", body=b"x" * 100_000), T)
        assert resp.status == 429 and resp.header("Retry-After") == "100"
        # The body was read and dropped: the next request on the connection is parsed as one.
        assert (await get(c))[0] == 429
        chunked = (("Transfer-Encoding", "chunked"),)
        resp = await asyncio.wait_for(
            c.request("POST", "/sink", headers=chunked, body=b"5\r\nhello\r\n0\r\n\r\n"), T)
        assert resp.status == 429
        assert (await get(c))[0] == 429
    finally:
        c.close()
    assert upstream.requests == 1


async def test_a_subvs_has_its_own_limit(dataplane: DataPlane, upstream: Upstream) -> None:
    rs = (RealServer(Address("127.0.0.1", upstream.port)),)
    vs = make_vs(subvs=(
        SubVS("login", real_servers=rs, rules=("login",), health_check=NO_CHECK,
              rate_limit=RateLimit(rate=0.01, burst=1)),
        SubVS("rest", real_servers=rs, rules=("default",), health_check=NO_CHECK),
    ), content_switching=True, real_servers=())
    rules = (ContentRule("login", MatchType.PREFIX, "/login"),)
    port = (await serve(dataplane, vs, rules=rules))["web"]
    c = await connect(port)
    try:
        assert (await get(c, "/login"))[0] == 200
        assert (await get(c, "/login"))[0] == 429
        # The rest of the site is not limited.
        assert [(await get(c, "/page"))[0] for _ in range(5)] == [200] * 5
        assert (await get(c, "/login"))[0] == 429
    finally:
        c.close()
    st = dataplane.stats()["virtual_services"]["web"]
    assert set(st["rate_limits"]) == {"login"}
    assert st["rate_limits"]["login"]["limited"] == 2
    m = {(s.name, tuple(sorted(s.labels.items()))): s.value
         for f in text_string_to_metric_families(
             generate_latest(make_registry(MetricsCollector(dataplane.stats))).decode())
         for s in f.samples}
    assert m[("lbproxy_rate_limit_limited_total", (("scope", "login"), ("vs", "web")))] == 2
    assert m[("lbproxy_rate_limit_entries", (("scope", "login"), ("vs", "web")))] == 1
    assert m[("lbproxy_rate_limit_evictions_total", (("scope", "login"), ("vs", "web")))] == 0
    assert m[("lbproxy_limit_rejections_total", (("limit", "rate_limited"), ("vs", "web")))] == 2


async def test_a_reload_keeps_the_state_of_an_unchanged_limit(dataplane: DataPlane,
                                                              upstream: Upstream) -> None:
    limit = RateLimit(rate=0.01, burst=1)
    port = (await serve(dataplane, make_vs(ports=(upstream.port,), rate_limit=limit)))["web"]
    c = await connect(port)
    try:
        assert (await get(c))[0] == 200
        # A new generation with the same limit (and another change): still limited.
        await serve(dataplane, make_vs(ports=(upstream.port,), rate_limit=limit,
                                       add_forwarded_headers=False), generation=2)
        assert (await get(c))[0] == 429
        # The limit removed: nothing is limited, and the table is gone from the stats.
        await serve(dataplane, make_vs(ports=(upstream.port,)), generation=3)
        assert (await get(c))[0] == 200
    finally:
        c.close()
    assert dataplane.stats()["virtual_services"]["web"]["rate_limits"] == {}


# -- the table, with a fake clock ----------------------------------------------------------


def test_gcra_lets_a_burst_through_then_one_per_interval() -> None:
    t = RateTable(RateLimit(rate=10.0, burst=5))
    now = 1000.0
    assert [t.check("1.1.1.1", now) for _ in range(5)] == [0.0] * 5
    wait = t.check("1.1.1.1", now)
    assert wait == pytest.approx(0.1)
    assert t.check("1.1.1.1", now + 0.05) == pytest.approx(0.05)  # refused: not counted
    assert t.check("1.1.1.1", now + 0.1) == 0.0  # one token back after 1/rate
    assert t.check("1.1.1.1", now + 0.1) > 0
    # A client within the rate is never refused.
    steady = RateTable(RateLimit(rate=10.0, burst=1))
    assert all(steady.check("2.2.2.2", now + i * 0.1) == 0.0 for i in range(100))
    assert t.limited == 3 and steady.limited == 0


def test_retry_after_is_whole_seconds_at_least_one() -> None:
    assert b"Retry-After: 1\r\n" in too_many(0.01).keep
    assert b"Retry-After: 3\r\n" in too_many(2.2).keep
    assert too_many(2.2).status == 429


def test_a_flood_of_distinct_addresses_stays_bounded_and_serves_real_clients() -> None:
    size = 1000
    t = RateTable(RateLimit(rate=1.0, burst=2, table_size=size))
    now = 0.0
    legit_ok = 0
    abuser_refused = 0
    tracemalloc.start()
    base = tracemalloc.get_traced_memory()[0]
    peak_after_fill = 0
    for i in range(100_000):
        now += 0.0001  # 10,000 requests/s of spoofed sources, each new
        assert t.check(f"10.{i >> 16 & 255}.{i >> 8 & 255}.{i & 255}", now) == 0.0
        if i == 2 * size:
            peak_after_fill = tracemalloc.get_traced_memory()[0]
        if i % 10_000 == 0:  # a real client at 1 request/s: always within its limit
            legit_ok += t.check("192.0.2.1", now) == 0.0
        if i % 10 == 0:  # an abusive one at 1,000 requests/s: limited throughout
            abuser_refused += t.check("192.0.2.66", now) > 0
        assert len(t.tat) <= size
    grown = tracemalloc.get_traced_memory()[0] - base
    tracemalloc.stop()
    assert legit_ok == 10
    # An abusive client at 1,000 requests/s keeps its entry (it is always recent): over these
    # 10 s it gets its burst of 2 and about one request per second, no more.
    assert 10_000 - abuser_refused <= 2 + 10 + 1
    assert len(t.tat) == size
    assert t.evictions > 90_000  # the spoofed entries pushed each other out, counted
    # Memory after 100,000 addresses is about what the full table held after 2,000: bounded.
    full = peak_after_fill - base
    assert 0 < full and grown < 1.5 * full + 64 * 1024
    assert grown < 512 * 1024


def test_quiet_entries_go_first_when_the_table_is_full() -> None:
    t = RateTable(RateLimit(rate=1.0, burst=1, table_size=16))
    for i in range(16):
        t.check(f"10.0.0.{i}", 0.0)
    # Later every old entry has refilled: making room for new ones forgets nothing.
    for i in range(8):
        t.check(f"10.0.1.{i}", 100.0)
    assert t.evictions == 0 and len(t.tat) <= 16


def test_ipv6_clients_count_by_their_prefix() -> None:
    t = RateTable(RateLimit(rate=0.01, burst=1))
    assert t.check("2001:db8:1:2::1", 0.0) == 0.0
    assert t.check("2001:db8:1:2:ffff::9", 0.0) > 0  # the same /64
    assert t.check("2001:db8:1:3::1", 0.0) == 0.0  # another /64
    assert t.key("::ffff:192.0.2.1") == "192.0.2.1"
    exact = RateTable(RateLimit(rate=1, burst=1, ipv6_prefix=128))
    assert exact.key("2001:db8::1") != exact.key("2001:db8::2")
    assert exact.key("fe80::1%eth0") == exact.key("fe80::1")


def test_workers_stats_add_up() -> None:
    part = {"virtual_services": {"web": {
        "rate_limits": {"-": {"limited": 2, "entries": 5, "evictions": 1}},
        "compression": {"responses": {"gzip": 3}, "bytes_in": 300, "bytes_out": 30}}}}
    other = {"virtual_services": {"web": {
        "rate_limits": {"-": {"limited": 1, "entries": 4, "evictions": 0},
                        "login": {"limited": 7, "entries": 1, "evictions": 0}},
        "compression": {"responses": {"gzip": 1, "br": 2}, "bytes_in": 100, "bytes_out": 9}}}}
    web = merge_stats([part, other])["virtual_services"]["web"]
    assert web["rate_limits"] == {"-": {"limited": 3, "entries": 9, "evictions": 1},
                                  "login": {"limited": 7, "entries": 1, "evictions": 0}}
    assert web["compression"] == {"responses": {"gzip": 4, "br": 2}, "bytes_in": 400,
                                  "bytes_out": 39}


# -- config --------------------------------------------------------------------------------


def _load(extra: str) -> str:
    from lbproxy.config.loader import parse_config
    text = ('[[vs]]\nname = "web"\nlisten = "127.0.0.1:8080"\n'
            '[[vs.real_servers]]\naddress = "127.0.0.1:9000"\n' + extra)
    with pytest.raises(ConfigError) as e:
        parse_config(text)
    return str(e.value)


def test_bad_rate_limits_are_refused_with_their_key() -> None:
    err = _load("[vs.rate_limit]\nrate = 0\nburst = -1\ntable_size = 1\nipv6_prefix = 200\n"
                "per = 1\n")
    for key in ("vs[0]).rate_limit.rate", "rate_limit.burst", "rate_limit.table_size",
                "rate_limit.ipv6_prefix", "rate_limit.per"):
        assert key in err, err
    assert "rate_limit.rate: is required" in _load("[vs.rate_limit]\nburst = 5\n")
    assert "rate_limit.rate: expected a number" in _load('[vs.rate_limit]\nrate = "10/s"\n')


def test_a_redirect_vs_takes_no_rate_limit() -> None:
    from lbproxy.config.loader import parse_config
    with pytest.raises(ConfigError, match=r"vs\[0\]\)?\.rate_limit: a redirect VS sends no"):
        parse_config('[[vs]]\nname = "r"\nlisten = "127.0.0.1:8080"\nkind = "redirect"\n'
                     '[vs.rate_limit]\nrate = 1\n')


def test_a_rate_limit_reads_with_a_default_burst() -> None:
    from lbproxy.config.loader import parse_config
    cfg = parse_config('[[vs]]\nname = "web"\nlisten = "127.0.0.1:8080"\n'
                       '[vs.rate_limit]\nrate = 2.5\n'
                       '[[vs.subvs]]\nname = "a"\n[vs.subvs.rate_limit]\nrate = 1\nburst = 9\n')
    vs = cfg.virtual_services[0]
    assert vs.rate_limit == RateLimit(rate=2.5, burst=0)
    assert RateTable(vs.rate_limit).window == pytest.approx(3 / 2.5)  # burst: 2.5 rounded up
    assert vs.subvs[0].rate_limit == RateLimit(rate=1.0, burst=9)
