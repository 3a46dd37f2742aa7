"""The data plane's stats (`DataPlane.stats()`, merged across workers with worker processes) as
they are read: into Prometheus metric families at scrape time, and into request counters for the
requests-per-second meter; plus `Families`, the helper every lbproxy metric family is made with.

The stats shape read (every key optional; unknown keys are ignored):

    {"virtual_services": {VS: {
        "listen", "protocol", "kind",
        "connections": {"active", "total", "refused"}, "requests",
        "bytes_in", "bytes_out",                         # client side, bytes
        "responses": {"1xx": n, "2xx": n, ..., "5xx": n},
        "codes": {"200": n, "404": n, ...},             # by status code (optional)
        "latency_buckets": {upper_bound_seconds: n, ..., "+Inf": n},  # per bucket, NOT cumulative
        "latency_sum", "latency_count",                  # seconds, requests
        "rule_hits": {rule: n}, "limit_rejections": {limit: n},
        "rate_limits": {scope: {"limited", "entries", "evictions"}},  # scope "-": the VS's
        "compression": {"responses": {coding: n}, "bytes_in", "bytes_out"},
        "real_servers": [RS, ...],                       # a VS without SubVSs
        "subvs": {SubVS: {"requests", "not_available", "available", "bytes_in", "bytes_out",
                          "responses", "latency_buckets", "latency_sum", "latency_count",
                          "real_servers": [RS, ...]}}}},
     "draining_listeners": n, "upstream_pools": {address: {"idle", "connects"}}}
    RS = {"address", "weight", "enabled", "healthy", "active", "requests", "failures",
          "bytes_in", "bytes_out", "responses", "codes", "latency_buckets", "latency_sum",
          "latency_count"}

`latency_buckets` counts each request once, in the first bucket whose upper bound is at least its
latency (one increment per request on the hot path); the collector makes them cumulative as
Prometheus wants. A bucket "+Inf" (or float("inf")) holds the rest; without it, latency_count
minus the other buckets is used.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any, TypeVar

from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)

RESPONSE_CLASSES = ("1xx", "2xx", "3xx", "4xx", "5xx")
_LEVEL_LABELS: dict[str, tuple[str, ...]] = {
    "vs": ("vs",), "subvs": ("vs", "subvs"), "real_server": ("vs", "subvs", "real_server")}


def _num(v: Any) -> float | None:
    if isinstance(v, bool):
        return float(v)
    if isinstance(v, int | float) and not (isinstance(v, float) and math.isnan(v)):
        return float(v)
    return None


def _bound(key: Any) -> float | None:
    if isinstance(key, str) and key.strip().lower() in ("+inf", "inf"):
        return math.inf
    try:
        return float(key)
    except (TypeError, ValueError):
        return None


def cumulative_buckets(per_bucket: Mapping[Any, Any],
                       count: float | None) -> list[tuple[str, float]] | None:
    """Per-bucket counts -> Prometheus cumulative buckets ending with +Inf (None if unusable)."""
    bounds: list[tuple[float, float]] = []
    for k, v in per_bucket.items():
        b, n = _bound(k), _num(v)
        if b is None or n is None:
            return None
        bounds.append((b, n))
    bounds.sort()
    out: list[tuple[str, float]] = []
    total = 0.0
    for b, n in bounds:
        total += n
        if math.isinf(b):
            break
        out.append((repr(b), total))
    else:
        total = max(total, count or 0.0)
    out.append(("+Inf", total))
    return out


def _servers(node: Mapping[str, Any]) -> list[Mapping[str, Any]]:
    rs = node.get("real_servers")
    if isinstance(rs, Mapping):
        return [{"address": k, **v} for k, v in rs.items() if isinstance(v, Mapping)]
    if isinstance(rs, list):
        return [r for r in rs if isinstance(r, Mapping) and "address" in r]
    return []


def _vs_map(stats: Mapping[str, Any]) -> Mapping[str, Any]:
    vss = stats.get("virtual_services")
    return vss if isinstance(vss, Mapping) else {}


_F = TypeVar("_F", CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily)


class Families:
    """Metric families created on first use, so only present stats keys are exported."""

    def __init__(self) -> None:
        self.items: dict[str, Metric] = {}

    def family(self, kind: type[_F], name: str, doc: str, labels: tuple[str, ...]) -> _F:
        """The family `name` of class `kind`, made on first use."""
        m = self.items.get(name)
        if m is None:
            m = self.items[name] = kind(name, doc, labels=labels)
        assert isinstance(m, kind)
        return m

    def counter(self, name: str, doc: str, labels: tuple[str, ...]) -> CounterMetricFamily:
        return self.family(CounterMetricFamily, name, doc, labels)

    def gauge(self, name: str, doc: str, labels: tuple[str, ...]) -> GaugeMetricFamily:
        return self.family(GaugeMetricFamily, name, doc, labels)

    def numbers(self, prefix: str, label_names: tuple[str, ...], labels: list[str],
                node: Mapping[str, Any], table: tuple[tuple[str, str, str, str], ...]) -> None:
        """One sample per (stats key, "c" counter | "g" gauge, metric suffix, help) of `table`
        whose key `node` holds as a number, named `prefix` + suffix."""
        for key, kind, metric, doc in table:
            v = _num(node.get(key))
            if v is None:
                continue
            name = prefix + metric
            fam = (self.counter(name, doc, label_names) if kind == "c"
                   else self.gauge(name, doc, label_names))
            fam.add_metric(labels, v)

    def histogram(self, name: str, doc: str, labels: tuple[str, ...]) -> HistogramMetricFamily:
        return self.family(HistogramMetricFamily, name, doc, labels)


def _traffic(f: Families, level: str, labels: list[str], node: Mapping[str, Any]) -> None:
    """The optional per-level keys: bytes, response classes, latency."""
    names = _LEVEL_LABELS[level]
    for key, metric, doc in (
            ("bytes_in", "bytes_received", "Bytes received from clients."),
            ("bytes_out", "bytes_sent", "Bytes sent to clients.")):
        n = _num(node.get(key))
        if n is not None:
            f.counter(f"lbproxy_{level}_{metric}", doc, names).add_metric(labels, n)
    responses = node.get("responses")
    if isinstance(responses, Mapping):
        c = f.counter(f"lbproxy_{level}_responses", "Responses by status class.",
                      (*names, "class"))
        for cls, v in sorted(responses.items()):
            n = _num(v)
            if n is not None:
                c.add_metric([*labels, str(cls)], n)
    codes = node.get("codes")
    if isinstance(codes, Mapping):
        c = f.counter(f"lbproxy_{level}_responses_by_code", "Responses by status code.",
                      (*names, "code"))
        for code, v in sorted(codes.items(), key=lambda kv: str(kv[0])):
            n = _num(v)
            if n is not None:
                c.add_metric([*labels, str(code)], n)
    buckets = node.get("latency_buckets")
    if isinstance(buckets, Mapping):
        count = _num(node.get("latency_count"))
        cum = cumulative_buckets(buckets, count)
        if cum is not None:
            f.histogram(f"lbproxy_{level}_request_duration_seconds",
                        "Request duration from the request head to the end of the "
                        "response.", names).add_metric(
                labels, cum, _num(node.get("latency_sum")) or 0.0)


def _real_servers(f: Families, vs: str, subvs: str, servers: list[Mapping[str, Any]]) -> None:
    names = _LEVEL_LABELS["real_server"]
    for r in servers:
        labels = [vs, subvs, str(r["address"])]
        f.numbers("lbproxy_real_server_", names, labels, r, (
            ("requests", "c", "requests", "Requests sent to the real server."),
            ("failures", "c", "failures", "Failed attempts to reach the real server."),
            ("active", "g", "active", "Requests in flight to the real server."),
            ("healthy", "g", "up", "1 when the health check says up, else 0."),
            ("enabled", "g", "enabled", "1 when the real server takes new requests: enabled "
             "in the config and not disabled or drained at run time."),
            ("weight", "g", "weight", "Scheduling weight (the run-time one).")))
        _traffic(f, "real_server", labels, r)


def _rate_and_compression(f: Families, vs: str, node: Mapping[str, Any]) -> None:
    """Rate limits by scope ("-": the VS's own) and compression of a VS."""
    limits = node.get("rate_limits")
    if isinstance(limits, Mapping):
        for scope, t in sorted(limits.items()):
            if not isinstance(t, Mapping):
                continue
            f.numbers("lbproxy_rate_limit_", ("vs", "scope"), [vs, str(scope)], t, (
                ("limited", "c", "limited", "Requests answered 429 by a rate limit."),
                ("entries", "g", "entries", "Client addresses a rate limit tracks."),
                ("evictions", "c", "evictions",
                 "Client entries a full rate-limit table forgot before they refilled.")))
    comp = node.get("compression")
    if isinstance(comp, Mapping):
        by_enc = comp.get("responses")
        if isinstance(by_enc, Mapping):
            c = f.counter("lbproxy_compressed_responses", "Responses compressed, by coding.",
                          ("vs", "encoding"))
            for enc, v in sorted(by_enc.items()):
                x = _num(v)
                if x is not None:
                    c.add_metric([vs, str(enc)], x)
        for key, doc in (("bytes_in", "Response body bytes before compression."),
                         ("bytes_out", "Response body bytes after compression.")):
            x = _num(comp.get(key))
            if x is not None:
                f.counter(f"lbproxy_compression_{key}", doc, ("vs",)).add_metric([vs], x)


def dataplane_families(f: Families, stats: Mapping[str, Any]) -> None:
    """Into `f`, the metrics of every stats key present: per VS, SubVS and real server, then the
    listeners draining and the upstream pools."""
    for vs, node in sorted(_vs_map(stats).items()):
        if not isinstance(node, Mapping):
            continue
        f.gauge("lbproxy_vs_info", "A virtual service and its listener.",
                ("vs", "listen", "protocol", "kind")).add_metric(
            [vs, str(node.get("listen", "")), str(node.get("protocol", "")),
             str(node.get("kind", ""))], 1)
        n = _num(node.get("requests"))
        if n is not None:
            f.counter("lbproxy_vs_requests", "Requests received.", ("vs",)).add_metric(
                [vs], n)
        conns = node.get("connections")
        if isinstance(conns, Mapping):
            f.numbers("lbproxy_vs_", ("vs",), [vs], conns, (
                ("active", "g", "connections_active", "Open client connections."),
                ("total", "c", "connections", "Client connections accepted."),
                ("refused", "c", "connections_refused",
                 "Client connections refused at the max_connections limit.")))
        _traffic(f, "vs", [vs], node)
        for key, metric, label, doc in (
                ("rule_hits", "lbproxy_rule_hits", "rule", "Requests matched by each "
                 "content rule."),
                ("limit_rejections", "lbproxy_limit_rejections", "limit",
                 "Requests or connections refused by each limit.")):
            table = node.get(key)
            if isinstance(table, Mapping):
                c = f.counter(metric, doc, ("vs", label))
                for name, v in sorted(table.items()):
                    x = _num(v)
                    if x is not None:
                        c.add_metric([vs, str(name)], x)
        _rate_and_compression(f, vs, node)
        _real_servers(f, vs, "", _servers(node))
        subs = node.get("subvs")
        if isinstance(subs, Mapping):
            for sub, snode in sorted(subs.items()):
                if not isinstance(snode, Mapping):
                    continue
                labels = [vs, str(sub)]
                f.numbers("lbproxy_subvs_", ("vs", "subvs"), labels, snode, (
                    ("requests", "c", "requests", "Requests routed to the SubVS."),
                    ("not_available", "c", "not_available",
                     "Requests answered with the SubVS's not-available response."),
                    ("available", "g", "available",
                     "1 when at least one real server can take a request.")))
                _traffic(f, "subvs", labels, snode)
                _real_servers(f, vs, str(sub), _servers(snode))
    draining = _num(stats.get("draining_listeners"))
    if draining is not None:
        f.gauge("lbproxy_draining_listeners", "Listeners of removed VSs still draining.",
                ()).add_metric([], draining)
    pools = stats.get("upstream_pools")
    if isinstance(pools, Mapping):
        for addr, p in sorted(pools.items()):
            if not isinstance(p, Mapping):
                continue
            idle, connects = _num(p.get("idle")), _num(p.get("connects"))
            if idle is not None:
                f.gauge("lbproxy_upstream_idle_connections",
                        "Pooled keep-alive connections to a real server.",
                        ("real_server",)).add_metric([str(addr)], idle)
            if connects is not None:
                f.counter("lbproxy_upstream_connects",
                          "Upstream connections opened to a real server.",
                          ("real_server",)).add_metric([str(addr)], connects)


# -- requests per second --------------------------------------------------------------------------

def request_counters(stats: Mapping[str, Any]) -> dict[str, float]:
    """Every request counter of the stats, keyed "vs", "vs/subvs" and "vs/subvs/address"
    (subvs "" for the real servers of a VS without SubVSs)."""
    out: dict[str, float] = {}
    for vs, node in _vs_map(stats).items():
        if not isinstance(node, Mapping):
            continue
        n = _num(node.get("requests"))
        if n is not None:
            out[vs] = n
        for r in _servers(node):
            v = _num(r.get("requests"))
            if v is not None:
                out[f"{vs}//{r['address']}"] = v
        subs = node.get("subvs")
        if isinstance(subs, Mapping):
            for sub, snode in subs.items():
                if not isinstance(snode, Mapping):
                    continue
                v = _num(snode.get("requests"))
                if v is not None:
                    out[f"{vs}/{sub}"] = v
                for r in _servers(snode):
                    x = _num(r.get("requests"))
                    if x is not None:
                        out[f"{vs}/{sub}/{r['address']}"] = x
    return out
