"""`merge_stats`: N workers' `DataPlane.stats()` read as one data plane's, counters summed and
config or state taken once, for the admin API, the metrics collector and the requests/s meter."""

from __future__ import annotations

import asyncio
import copy
from collections.abc import Sequence
from typing import Any

import pytest
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from lbproxy.config.model import ContentRule, MatchType, NotAvailable, SubVS
from lbproxy.metrics import MetricsCollector, make_registry, request_counters
from lbproxy.proxy import DataPlane
from lbproxy.proxy.counters import LATENCY_BUCKETS, LIMIT_KEYS, RESPONSE_CLASSES
from lbproxy.workers.merge import merge_stats

from ..proxy.conftest import NO_CHECK, Client, build, make_vs, serve, servers, start_upstream

T = 10


# -- two hand-written parts in the exact shape of DataPlane.stats() -------------------------------

def lat(**at: int) -> list[int]:
    """Per-bucket latency counts (last slot +Inf): lat(b0=2, inf=1)."""
    counts = [0] * (len(LATENCY_BUCKETS) + 1)
    for k, n in at.items():
        counts[-1 if k == "inf" else int(k[1:])] = n
    return counts


def traffic(resp: dict[str, int], bytes_in: int, bytes_out: int, counts: list[int],
            lat_sum: float) -> dict[str, Any]:
    """The traffic keys DataPlane.stats() gives a VS or SubVS (dataplane._traffic)."""
    flat: dict[str, int] = {str(b): n for b, n in zip(LATENCY_BUCKETS, counts, strict=False)}
    flat["+Inf"] = counts[-1]
    return {"bytes_in": bytes_in, "bytes_out": bytes_out,
            "responses": {c: resp.get(c, 0) for c in RESPONSE_CLASSES},
            "latency": {"buckets": list(LATENCY_BUCKETS), "counts": counts, "sum": lat_sum,
                        "count": sum(counts)},
            "latency_buckets": flat, "latency_sum": lat_sum, "latency_count": sum(counts)}


def rs(address: str, *, weight: int = 1, enabled: bool = True, healthy: bool = True,
       down_reason: str = "", active: int = 0, requests: int = 0, failures: int = 0,
       bytes_in: int = 0, bytes_out: int = 0, ok: int = 0) -> dict[str, Any]:
    return {"address": address, "weight": weight, "enabled": enabled, "healthy": healthy,
            "down_reason": down_reason, "active": active, "requests": requests,
            "failures": failures, "bytes_in": bytes_in, "bytes_out": bytes_out,
            "responses": {c: ok if c == "2xx" else 0 for c in RESPONSE_CLASSES}}


def limits(**hits: int) -> dict[str, int]:
    return {k: hits.get(k, 0) for k in LIMIT_KEYS}


def vs(listen: str, listening: bool, conns: tuple[int, int, int], requests: int, *,
       subvs: dict[str, Any] | None = None, real_servers: list[dict[str, Any]] | None = None,
       rule_hits: dict[str, int] | None = None, limit_rejections: dict[str, int] | None = None,
       **t: Any) -> dict[str, Any]:
    active, total, refused = conns
    return {"listen": listen, "listening": listening, "protocol": "https", "kind": "proxy",
            "connections": {"active": active, "total": total, "refused": refused},
            "requests": requests, "subvs": subvs or {}, "real_servers": real_servers or [],
            "rule_hits": rule_hits or {}, "limit_rejections": limit_rejections or limits(),
            **traffic(**t)}


def sub(requests: int, not_available: int, available: bool, servers: list[dict[str, Any]],
        **t: Any) -> dict[str, Any]:
    return {"requests": requests, "not_available": not_available, "available": available,
            "real_servers": servers, **traffic(**t)}


# Worker 0 is on the current generation: rs 10.0.0.1 added, SubVS "static" and VS "new" added,
# VS "old" removed; it sees the SubVS "api" unavailable (its servers failing) and does not listen
# on "new" (a bind it lost). Worker 1 is still on the older generation.
W0: dict[str, Any] = {
    "virtual_services": {
        "shop": vs("0.0.0.0:443", True, (3, 40, 1), 10,
                   subvs={"api": sub(7, 1, False, [
                       rs("10.0.0.1:80", weight=2, healthy=False, down_reason="timeout",
                          requests=2, failures=2, bytes_in=100, bytes_out=0),
                       rs("10.0.0.2:80", weight=3, active=1, requests=4, bytes_in=400,
                          bytes_out=4000, ok=4)],
                       resp={"2xx": 4, "5xx": 3}, bytes_in=520, bytes_out=4300,
                       counts=lat(b0=4, b5=2, inf=1), lat_sum=10.5),
                          "static": sub(2, 0, True, [rs("10.0.0.9:80", requests=2, ok=2)],
                                        resp={"2xx": 2}, bytes_in=80, bytes_out=900,
                                        counts=lat(b1=2), lat_sum=0.004)},
                   rule_hits={"api": 6, "static": 2, "default": 2},
                   limit_rejections=limits(max_connections=1, bad_request=1),
                   resp={"2xx": 6, "4xx": 1, "5xx": 3}, bytes_in=650, bytes_out=5300,
                   counts=lat(b0=5, b1=2, b5=2, inf=1), lat_sum=10.6),
        "new": vs("0.0.0.0:8443", False, (0, 0, 0), 0,
                  resp={}, bytes_in=0, bytes_out=0, counts=lat(), lat_sum=0.0),
    },
    "draining_listeners": 0,
    "upstream_pools": {"10.0.0.1:80": {"idle": 0, "connects": 2},
                       "10.0.0.2:80": {"idle": 1, "connects": 3},
                       "10.0.0.9:80": {"idle": 1, "connects": 1}},
}
W1: dict[str, Any] = {
    "virtual_services": {
        "old": vs("0.0.0.0:80", True, (1, 5, 0), 5,
                  real_servers=[rs("10.0.0.5:80", requests=5, ok=5, bytes_in=50, bytes_out=500)],
                  resp={"2xx": 5}, bytes_in=50, bytes_out=500, counts=lat(b0=5), lat_sum=0.003),
        "shop": vs("0.0.0.0:443", False, (2, 30, 0), 6,
                   subvs={"api": sub(5, 0, True, [
                       rs("10.0.0.2:80", weight=1, requests=3, bytes_in=300, bytes_out=3000,
                          ok=3),
                       rs("10.0.0.3:80", active=2, requests=2, failures=1, bytes_in=200,
                          bytes_out=100, ok=1)],
                       resp={"2xx": 4, "5xx": 1}, bytes_in=500, bytes_out=3100,
                       counts=lat(b0=3, b12=1, inf=1), lat_sum=12.0),
                          "legacy": sub(1, 1, False, [], resp={"5xx": 1}, bytes_in=40,
                                        bytes_out=150, counts=lat(b0=1), lat_sum=0.0005)},
                   rule_hits={"api": 5, "legacy": 1},
                   limit_rejections=limits(max_connections=0, head_timeout=2),
                   resp={"2xx": 4, "4xx": 2, "5xx": 2}, bytes_in=560, bytes_out=3300,
                   counts=lat(b0=4, b12=1, inf=1), lat_sum=12.1),
    },
    "draining_listeners": 1,
    "upstream_pools": {"10.0.0.2:80": {"idle": 2, "connects": 2},
                       "10.0.0.3:80": {"idle": 0, "connects": 4},
                       "10.0.0.5:80": {"idle": 1, "connects": 1}},
}

MERGED = merge_stats([W0, W1])


def at(d: Any, path: Sequence[str | int]) -> Any:
    for p in path:
        d = d[p]
    return d


def api_rs(address: str) -> dict[str, Any]:
    servers = at(MERGED, ("virtual_services", "shop", "subvs", "api", "real_servers"))
    found: list[dict[str, Any]] = [r for r in servers if r["address"] == address]
    assert len(found) == 1
    return found[0]


CASES: list[tuple[str, tuple[str | int, ...], Any]] = [
    # Counters: summed.
    ("VS requests", ("virtual_services", "shop", "requests"), 16),
    ("VS connections", ("virtual_services", "shop", "connections"),
     {"active": 5, "total": 70, "refused": 1}),
    ("VS bytes in", ("virtual_services", "shop", "bytes_in"), 1210),
    ("VS bytes out", ("virtual_services", "shop", "bytes_out"), 8600),
    ("VS responses", ("virtual_services", "shop", "responses"),
     {"1xx": 0, "2xx": 10, "3xx": 0, "4xx": 3, "5xx": 5}),
    ("VS latency counts", ("virtual_services", "shop", "latency", "counts"),
     lat(b0=9, b1=2, b5=2, b12=1, inf=2)),
    ("VS latency count", ("virtual_services", "shop", "latency", "count"), 16),
    ("VS latency sum", ("virtual_services", "shop", "latency", "sum"), pytest.approx(22.7)),
    ("VS latency bounds: not summed", ("virtual_services", "shop", "latency", "buckets"),
     list(LATENCY_BUCKETS)),
    ("VS flat latency 100 us", ("virtual_services", "shop", "latency_buckets", "0.0001"), 9),
    ("VS flat latency 1 s", ("virtual_services", "shop", "latency_buckets", "1.0"), 1),
    ("VS flat latency +Inf", ("virtual_services", "shop", "latency_buckets", "+Inf"), 2),
    ("VS flat latency count", ("virtual_services", "shop", "latency_count"), 16),
    ("VS flat latency sum", ("virtual_services", "shop", "latency_sum"), pytest.approx(22.7)),
    ("rule hits: union of rules", ("virtual_services", "shop", "rule_hits"),
     {"api": 11, "static": 2, "default": 2, "legacy": 1}),
    ("limit rejections", ("virtual_services", "shop", "limit_rejections"),
     limits(max_connections=1, bad_request=1, head_timeout=2)),
    ("SubVS requests", ("virtual_services", "shop", "subvs", "api", "requests"), 12),
    ("SubVS not available", ("virtual_services", "shop", "subvs", "api", "not_available"), 1),
    ("SubVS responses", ("virtual_services", "shop", "subvs", "api", "responses", "5xx"), 4),
    ("SubVS latency count", ("virtual_services", "shop", "subvs", "api", "latency_count"), 12),
    ("draining listeners", ("draining_listeners",), 1),
    ("upstream pool in both", ("upstream_pools", "10.0.0.2:80"), {"idle": 3, "connects": 5}),
    ("upstream pool in one", ("upstream_pools", "10.0.0.3:80"), {"idle": 0, "connects": 4}),
    # Config and state: the first part's; listening and available: any part's.
    ("listen", ("virtual_services", "shop", "listen"), "0.0.0.0:443"),
    ("protocol", ("virtual_services", "shop", "protocol"), "https"),
    ("kind", ("virtual_services", "shop", "kind"), "proxy"),
    ("listening if any worker listens", ("virtual_services", "shop", "listening"), True),
    ("not listening if none does", ("virtual_services", "new", "listening"), False),
    ("available if any worker can send",
     ("virtual_services", "shop", "subvs", "api", "available"), True),
    ("unavailable if none can", ("virtual_services", "shop", "subvs", "legacy", "available"),
     False),
    # A VS or SubVS of only one part (another generation) is there, as that part has it.
    ("VS of the newer generation only", ("virtual_services", "new", "requests"), 0),
    ("VS of the older generation only", ("virtual_services", "old"),
     W1["virtual_services"]["old"]),
    ("SubVS of the newer generation only", ("virtual_services", "shop", "subvs", "static"),
     W0["virtual_services"]["shop"]["subvs"]["static"]),
    ("SubVS of the older generation only", ("virtual_services", "shop", "subvs", "legacy"),
     W1["virtual_services"]["shop"]["subvs"]["legacy"]),
]


@pytest.mark.parametrize(("path", "expected"), [(p, e) for _, p, e in CASES],
                         ids=[name for name, _, _ in CASES])
def test_merged_field(path: tuple[str | int, ...], expected: Any) -> None:
    assert at(MERGED, path) == expected


def test_real_servers_merged_by_address_in_order_of_first_appearance() -> None:
    servers = MERGED["virtual_services"]["shop"]["subvs"]["api"]["real_servers"]
    assert [r["address"] for r in servers] == ["10.0.0.1:80", "10.0.0.2:80", "10.0.0.3:80"]
    both = api_rs("10.0.0.2:80")
    # Counters summed; weight, enabled, health: the first part's (worker 0's weight 3, not 1).
    assert both == rs("10.0.0.2:80", weight=3, active=1, requests=7, bytes_in=700,
                      bytes_out=7000, ok=7)
    assert api_rs("10.0.0.1:80") == W0["virtual_services"]["shop"]["subvs"]["api"][
        "real_servers"][0]
    assert api_rs("10.0.0.3:80")["failures"] == 1 and api_rs("10.0.0.3:80")["active"] == 2
    # The SubVS's requests are still its not-available answers plus its servers' requests.
    api = MERGED["virtual_services"]["shop"]["subvs"]["api"]
    assert api["requests"] == api["not_available"] + sum(r["requests"] for r in servers)


def test_order_of_vss_and_subvss_is_first_appearance() -> None:
    assert list(MERGED["virtual_services"]) == ["shop", "new", "old"]
    assert list(MERGED["virtual_services"]["shop"]["subvs"]) == ["api", "static", "legacy"]
    assert list(MERGED) == ["virtual_services", "draining_listeners", "upstream_pools"]


def test_the_first_part_wins_config_and_state() -> None:
    swapped = merge_stats([W1, W0])
    assert swapped["virtual_services"]["shop"]["listening"] is True
    rs2 = next(r for r in swapped["virtual_services"]["shop"]["subvs"]["api"]["real_servers"]
               if r["address"] == "10.0.0.2:80")
    assert rs2["weight"] == 1 and rs2["requests"] == 7
    # Counters do not depend on the order.
    assert request_counters(swapped) == request_counters(MERGED)


def test_one_part_is_itself_and_no_part_is_an_empty_data_plane() -> None:
    assert merge_stats([W0]) == W0
    assert merge_stats([]) == {"virtual_services": {}, "draining_listeners": 0,
                               "upstream_pools": {}}


def test_parts_are_not_modified_nor_shared() -> None:
    before = copy.deepcopy([W0, W1])
    merged = merge_stats([W0, W1])
    assert [W0, W1] == before
    merged["virtual_services"]["new"]["latency"]["buckets"].append(99.0)
    merged["virtual_services"]["old"]["real_servers"][0]["responses"]["2xx"] = 1000
    merged["virtual_services"]["shop"]["subvs"]["static"]["real_servers"].clear()
    assert [W0, W1] == before


def test_unknown_keys_are_merged_by_what_they_are() -> None:
    a = {"virtual_services": {"v": {"requests": 1, "new_counter": 2, "new_table": {"x": 1},
                                    "new_label": "a", "new_flag": False, "hist": [1, 2],
                                    "real_servers": [{"address": "r", "requests": 1},
                                                     {"requests": 7}]}},
         "new_top": 3}
    b = {"virtual_services": {"v": {"requests": 2, "new_counter": 3, "new_table": {"y": 2},
                                    "new_label": "b", "new_flag": True, "hist": [1, 2, 3],
                                    "real_servers": [{"address": "r", "requests": 4}]}},
         "new_top": 4}
    v = merge_stats([a, b])["virtual_services"]["v"]
    assert v["new_counter"] == 5 and v["new_table"] == {"x": 1, "y": 2}
    assert v["new_label"] == "a" and v["new_flag"] is False and v["hist"] == [2, 4, 3]
    # An entry without an address cannot be matched: kept as it is.
    assert v["real_servers"] == [{"address": "r", "requests": 5}, {"requests": 7}]
    assert merge_stats([a, b])["new_top"] == 7


# -- the readers of the merged stats --------------------------------------------------------------

def test_request_counters_of_the_merge_are_the_sums() -> None:
    expected: dict[str, float] = {}
    for part in (W0, W1):
        for k, n in request_counters(part).items():
            expected[k] = expected.get(k, 0.0) + n
    assert request_counters(MERGED) == expected
    assert expected["shop/api/10.0.0.2:80"] == 7


Samples = dict[tuple[str, tuple[tuple[str, str], ...]], tuple[str, float]]


def scrape(stats: dict[str, Any]) -> Samples:
    """Every sample the collector exports for `stats`: (name, labels) -> (family type, value)."""
    text = generate_latest(make_registry(MetricsCollector(lambda: stats))).decode()
    out: Samples = {}
    for fam in text_string_to_metric_families(text):
        if not fam.name.startswith("lbproxy_"):
            continue  # process_* and python_*: this test process's, not the stats'
        for s in fam.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = (fam.type, s.value)
    return out


def test_metrics_of_the_merge_sum_every_counter_and_histogram() -> None:
    merged, w0, w1 = scrape(MERGED), scrape(W0), scrape(W1)
    assert set(merged) == set(w0) | set(w1)
    summed = 0
    for key, (kind, value) in merged.items():
        if kind in ("counter", "histogram"):
            parts = [p[key][1] for p in (w0, w1) if key in p]
            assert value == pytest.approx(sum(parts)), key
            summed += 1
    assert summed > 100
    get = {k: v for k, (_, v) in merged.items()}
    assert get[("lbproxy_vs_connections_active", (("vs", "shop"),))] == 5
    assert get[("lbproxy_subvs_available", (("subvs", "api"), ("vs", "shop")))] == 1
    assert get[("lbproxy_real_server_weight",
                (("real_server", "10.0.0.2:80"), ("subvs", "api"), ("vs", "shop")))] == 3
    assert get[("lbproxy_draining_listeners", ())] == 1


# -- real data planes ------------------------------------------------------------------------------

async def _session(port: int, requests: Sequence[tuple[str, str, bytes | None]]) -> Client:
    """One client connection that sends `requests` one at a time and reads each answer; left
    open (so that the active connections are known when stats are read)."""
    c = await Client.connect(port)
    for method, path, body in requests:
        await c.send(build(method, path, body=body))
        await c.response()
    return c


def _comparable(stats: dict[str, Any]) -> dict[str, Any]:
    """What does not depend on timing or ports: without the listen address, latency reduced to
    its count, upstream pools reduced to their addresses (keep-alive reuse differs)."""
    out = copy.deepcopy(stats)
    for node in out["virtual_services"].values():
        del node["listen"]
        levels = [node, *node["subvs"].values()]
        levels += [rs for lvl in list(levels) for rs in lvl["real_servers"]]
        for lvl in levels:
            if "latency" in lvl:  # durations are measured to the ns: only the count compares
                lvl["latency"] = lvl["latency"]["count"]
                del lvl["latency_buckets"], lvl["latency_sum"]
    out["upstream_pools"] = sorted(out["upstream_pools"])
    return out


async def test_two_data_planes_merge_as_one_that_served_everything() -> None:
    up = await start_upstream()
    rules = (ContentRule("st", MatchType.PREFIX, "/status/"),)
    config = make_vs(subvs=(
        SubVS("api", real_servers=servers(up.port), rules=("st",), health_check=NO_CHECK),
        SubVS("empty", rules=("default",), health_check=NO_CHECK,
              not_available=NotAvailable(503, b"none\n")),
    ), content_switching=True)
    first = [("GET", "/status/200", None), ("GET", "/nowhere", None)]
    second = [("POST", "/status/201", b"x" * 300), ("GET", "/status/404", None),
              ("GET", "/status/200", None)]
    a, b, one = DataPlane(), DataPlane(), DataPlane()
    clients: list[Client] = []
    try:
        async with asyncio.timeout(T):
            pa, pb, p1 = [(await serve(dp, config, rules=rules))["web"] for dp in (a, b, one)]
            clients += [await _session(pa, first), await _session(pb, second),
                        await _session(p1, first), await _session(p1, second)]
            sa, sb, s1 = a.stats(), b.stats(), one.stats()
    finally:
        for c in clients:
            c.close()
        for dp in (a, b, one):
            await dp.shutdown(0.5)
        assert up.runner is not None
        await up.runner.cleanup()
    merged = merge_stats([sa, sb])
    web = merged["virtual_services"]["web"]
    assert web["requests"] == 5 and web["connections"]["active"] == 2
    assert web["responses"] == {"1xx": 0, "2xx": 3, "3xx": 0, "4xx": 1, "5xx": 1}
    assert web["rule_hits"] == {"st": 4, "default": 1}
    assert len(web["subvs"]["api"]["real_servers"]) == 1
    assert web["latency"]["count"] == sum(web["latency"]["counts"]) == 5
    assert _comparable(merged) == _comparable(s1)
    assert request_counters(merged) == request_counters(s1)
    assert merge_stats([sa]) == sa
