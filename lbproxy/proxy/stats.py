"""The data plane's counters as the admin API and metrics read them: `dataplane_stats` adds up
the live listeners' and targets' counters at call time (nothing per request) into one dict.

Per VS, SubVS and real server: `bytes_in`/`bytes_out` (client side: bytes read from the client for
the requests it took / response head + body sent; chunk framing excluded), `responses` by status
class, `codes` by exact status ({"200": n, "404": n}: only codes seen), and `latency` (request
start to response end, on the precise clock: `buckets` bounds in seconds, per-bucket `counts` NOT
cumulative with a last +Inf slot, `sum` seconds, `count`), also flat as `latency_buckets` {bound:
n, "+Inf": n}, `latency_sum`, `latency_count` (the shape lbproxy.metrics reads). Per VS:
`rule_hits` (content switching) and `limit_rejections`. A real server's counters survive reloads by
address; a VS's include SubVSs removed by a reload.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any

from .counters import LATENCY_BUCKETS, RESPONSE_CLASSES

if TYPE_CHECKING:
    from .connpool import ConnPool
    from .counters import TargetCounters, Traffic
    from .service import Listener


def dataplane_stats(listeners: Iterable[Listener[Any]],
                    target_counters: Mapping[tuple[str, str], TargetCounters],
                    conn_pools: Iterable[ConnPool], draining: int) -> dict[str, Any]:
    """Per VS, SubVS and real server, from the listeners' current Services and counters, the
    counters of targets removed by reloads (`target_counters`, by VS and SubVS name), the
    upstream pools, and the number of listeners still draining."""

    out: dict[str, Any] = {}
    by_vs: dict[str, list[TargetCounters]] = {}
    for (vs_name, _), tc in target_counters.items():
        by_vs.setdefault(vs_name, []).append(tc)
    for lst in listeners:
        svc = lst.service
        c = lst.counters
        targets: dict[str, Any] = {}
        all_targets = [*svc.pre_targets, *svc.targets]
        if svc.direct is not None:
            all_targets.append(svc.direct)
        for t in all_targets:
            servers: list[dict[str, Any]] = []
            if t.balancer is not None:
                for b in t.balancer.backends:
                    st = t.pools[b]
                    servers.append({
                        "address": str(b.address), "weight": b.weight, "enabled": b.enabled,
                        "state": b.state,
                        "healthy": b.healthy, "down_reason": b.down_reason,
                        "active": b.active, "requests": b.requests, "failures": b.failures,
                        **_traffic([st]),  # bytes, responses, latency
                    })
            tc = t.counters
            # Requests sent to a real server are counted by the balancer (Backend.requests).
            targets[t.name] = {
                "requests": tc.not_available + sum(s["requests"] for s in servers),
                "not_available": tc.not_available,
                "available": t.balancer.any_available() if t.balancer is not None else False,
                "real_servers": servers,
                **_traffic([tc, *tc.servers.values()]),
            }
        vs_entry = {
            "listen": f"{lst.sockname[0]}:{lst.sockname[1]}",
            "listening": lst.listening,  # the socket's state, not the config's wish
            "protocol": lst.protocol.value,
            "kind": svc.vs.kind.value,
            "connections": {"active": len(lst.conns), "total": c.connections,
                            "refused": c.refused},
            "requests": c.requests,
            "subvs": {k: v for k, v in targets.items() if k != "-"},
            "real_servers": targets["-"]["real_servers"] if "-" in targets else [],
            "rule_hits": c.rule_totals(),
            "limit_rejections": dict(c.limits),
            # Per limit ("-": the VS's, else a SubVS's): refused, table entries, evictions.
            "rate_limits": {k: t.stats() for k, t in c.rate_tables.items()},
        }
        if svc.vs.compression is not None or c.compressed.responses:
            vs_entry["compression"] = c.compressed.stats()
        parts: list[Traffic] = [c]
        for tc in by_vs.get(lst.name, ()):
            parts.append(tc)
            parts.extend(tc.servers.values())
        vs_entry.update(_traffic(parts))
        out[lst.name] = vs_entry
    pools: dict[str, dict[str, int]] = {}
    for cp in conn_pools:  # a server's plain and PROXY-protocol pools: one
        p = pools.setdefault(cp.address, {"idle": 0, "connects": 0})
        p["idle"] += len(cp.idle)
        p["connects"] += cp.connects
    return {"virtual_services": out,
            "draining_listeners": draining,
            "upstream_pools": pools}


def _classes(codes: Mapping[int, int]) -> dict[str, int]:
    """Status classes 1xx..5xx (a status above 599 counts as 5xx; below 100, not at all)."""
    out = dict.fromkeys(RESPONSE_CLASSES, 0)
    for code, n in codes.items():
        if code >= 100:
            out[RESPONSE_CLASSES[min(code // 100, 5) - 1]] += n
    return out


def _codes(codes: Mapping[int, int]) -> dict[str, int]:
    """Responses by exact status code, {"200": n, ...} in code order (codes seen, >= 100)."""
    return {str(code): codes[code] for code in sorted(codes) if code >= 100 and codes[code]}


def _traffic(parts: list[Traffic]) -> dict[str, Any]:
    """The sum of some Traffic counters as stats() shows them."""
    codes: Counter[int] = Counter()
    lat = [0] * (len(LATENCY_BUCKETS) + 1)
    total = 0.0
    bytes_in = bytes_out = 0
    for p in parts:
        bytes_in += p.bytes_in
        bytes_out += p.bytes_out
        total += p.lat_sum
        codes.update(p.codes)
        for i, n in enumerate(p.lat):
            lat[i] += n
    count = sum(lat)
    flat: dict[str, int] = {str(b): n for b, n in zip(LATENCY_BUCKETS, lat, strict=False)}
    flat["+Inf"] = lat[-1]
    return {
        "bytes_in": bytes_in, "bytes_out": bytes_out, "responses": _classes(codes),
        "codes": _codes(codes),
        "latency": {"buckets": list(LATENCY_BUCKETS), "counts": lat, "sum": total,
                    "count": count},
        "latency_buckets": flat, "latency_sum": total, "latency_count": count,
    }
