"""The Prometheus collector: every stats key present becomes a metric with VS / SubVS / real
server labels (optional keys the data plane adds later included), certificate gauges keyed by the
certificate id, ACME counts by result; the requests/s meter; and the exposition format parses."""

from __future__ import annotations

import datetime as dt
import math
from typing import Any

from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from lbproxy.config.model import EventSettings
from lbproxy.events import CertEvent, CertStatus, EventKind, Events
from lbproxy.metrics import (
    MetricsCollector,
    RateMeter,
    cumulative_buckets,
    make_registry,
    request_counters,
)

T0 = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)

TRAFFIC = {"bytes_in": 100, "bytes_out": 5000, "responses": {"2xx": 7, "5xx": 1},
           "latency_buckets": {0.005: 3, 0.05: 4, "+Inf": 1}, "latency_sum": 0.5,
           "latency_count": 8}
STATS: dict[str, Any] = {"virtual_services": {
    "shop": {"listen": "127.0.0.1:8443", "protocol": "https", "kind": "proxy",
             "connections": {"active": 3, "total": 40, "refused": 2}, "requests": 8,
             **TRAFFIC, "rule_hits": {"api": 5, "default": 3},
             "limit_rejections": {"max_connections": 2, "max_header_bytes": 1},
             "real_servers": [],
             "subvs": {"api": {"requests": 8, "not_available": 1, "available": True, **TRAFFIC,
                               "real_servers": [
                                   {"address": "10.0.0.1:80", "weight": 2, "enabled": True,
                                    "healthy": True, "active": 1, "requests": 4, "failures": 0,
                                    **TRAFFIC},
                                   {"address": "10.0.0.2:80", "weight": 1, "enabled": True,
                                    "healthy": False, "active": 0, "requests": 3,
                                    "failures": 2}]}}},
    "plain": {"listen": "127.0.0.1:8080", "protocol": "http", "kind": "proxy",
              "connections": {"active": 0, "total": 1, "refused": 0}, "requests": 1,
              "subvs": {},
              "real_servers": [{"address": "10.0.0.3:80", "healthy": True, "requests": 1}]}},
    "draining_listeners": 0, "upstream_pools": {"10.0.0.1:80": {"idle": 2, "connects": 5}}}


def scrape(collector: MetricsCollector) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    text = generate_latest(make_registry(collector)).decode()
    out = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def get(samples: dict[Any, float], name: str, **labels: str) -> float:
    return samples[(name, tuple(sorted(labels.items())))]


def test_dataplane_stats_become_metrics_at_every_level() -> None:
    m = scrape(MetricsCollector(lambda: STATS))
    assert get(m, "lbproxy_vs_requests_total", vs="shop") == 8
    assert get(m, "lbproxy_vs_connections_active", vs="shop") == 3
    assert get(m, "lbproxy_vs_connections_total", vs="shop") == 40
    assert get(m, "lbproxy_vs_connections_refused_total", vs="shop") == 2
    assert get(m, "lbproxy_vs_info", vs="shop", listen="127.0.0.1:8443", protocol="https",
               kind="proxy") == 1
    assert get(m, "lbproxy_subvs_requests_total", vs="shop", subvs="api") == 8
    assert get(m, "lbproxy_subvs_not_available_total", vs="shop", subvs="api") == 1
    assert get(m, "lbproxy_subvs_available", vs="shop", subvs="api") == 1
    rs = {"vs": "shop", "subvs": "api"}
    assert get(m, "lbproxy_real_server_up", **rs, real_server="10.0.0.1:80") == 1
    assert get(m, "lbproxy_real_server_up", **rs, real_server="10.0.0.2:80") == 0
    assert get(m, "lbproxy_real_server_requests_total", **rs, real_server="10.0.0.2:80") == 3
    assert get(m, "lbproxy_real_server_failures_total", **rs, real_server="10.0.0.2:80") == 2
    assert get(m, "lbproxy_real_server_active", **rs, real_server="10.0.0.1:80") == 1
    assert get(m, "lbproxy_real_server_weight", **rs, real_server="10.0.0.1:80") == 2
    assert get(m, "lbproxy_real_server_requests_total", vs="plain", subvs="",
               real_server="10.0.0.3:80") == 1
    # the keys the data plane adds later, at every level
    for level, labels in (("vs", {"vs": "shop"}), ("subvs", rs),
                          ("real_server", {**rs, "real_server": "10.0.0.1:80"})):
        assert get(m, f"lbproxy_{level}_bytes_received_total", **labels) == 100
        assert get(m, f"lbproxy_{level}_bytes_sent_total", **labels) == 5000
        assert get(m, f"lbproxy_{level}_responses_total", **labels, **{"class": "2xx"}) == 7
        assert get(m, f"lbproxy_{level}_responses_total", **labels, **{"class": "5xx"}) == 1
        h = f"lbproxy_{level}_request_duration_seconds"
        assert get(m, h + "_bucket", **labels, le="0.005") == 3
        assert get(m, h + "_bucket", **labels, le="0.05") == 7      # cumulative
        assert get(m, h + "_bucket", **labels, le="+Inf") == 8
        assert get(m, h + "_count", **labels) == 8 and get(m, h + "_sum", **labels) == 0.5
    assert ("lbproxy_real_server_bytes_received_total",
            (("real_server", "10.0.0.2:80"), ("subvs", "api"), ("vs", "shop"))) not in m
    assert get(m, "lbproxy_rule_hits_total", vs="shop", rule="api") == 5
    assert get(m, "lbproxy_limit_rejections_total", vs="shop", limit="max_connections") == 2
    assert get(m, "lbproxy_upstream_idle_connections", real_server="10.0.0.1:80") == 2
    assert get(m, "lbproxy_upstream_connects_total", real_server="10.0.0.1:80") == 5


def test_buckets_without_inf_use_the_count_and_bad_buckets_are_skipped() -> None:
    assert cumulative_buckets({"0.1": 2, 1: 3}, 6) == [("0.1", 2), ("1.0", 5), ("+Inf", 6)]
    assert cumulative_buckets({math.inf: 1, 0.5: 1}, None) == [("0.5", 1), ("+Inf", 2)]
    assert cumulative_buckets({"fast": 1}, 1) is None


def test_a_stats_shape_it_does_not_know_never_breaks_the_scrape() -> None:
    weird = {"virtual_services": {"a": "x", "b": {"requests": "many", "subvs": [1],
                                                  "real_servers": {"1.2.3.4:5": {"requests": 1}}}}}
    m = scrape(MetricsCollector(lambda: weird))
    assert get(m, "lbproxy_real_server_requests_total", vs="b", subvs="",
               real_server="1.2.3.4:5") == 1

    def broken() -> dict[str, Any]:
        raise RuntimeError("boom")
    certs = [CertStatus(id="x", not_after=T0)]
    m = scrape(MetricsCollector(broken, certs=lambda: certs))
    assert get(m, "lbproxy_certificate_not_after_timestamp_seconds", certificate="x") == \
        T0.timestamp()


def test_certificate_gauges_keyed_by_id_and_acme_counts() -> None:
    le = CertStatus(id="shop-cert", names=("a.test", "b.test"), managed_by="letsencrypt",
                    serial="abc", not_before=T0, not_after=T0 + dt.timedelta(days=90),
                    state="backoff", auto_renew=True, next_attempt=T0 + dt.timedelta(days=61),
                    last_success=T0, failures=3, last_error="x", last_code=13,
                    ari_start=T0 + dt.timedelta(days=59), ari_end=T0 + dt.timedelta(days=61),
                    renewals=2)
    imported = CertStatus(id="old", names=("c.test",), serial="1", not_before=T0,
                          not_after=T0 + dt.timedelta(days=10), state="imported")
    events = Events(EventSettings(webhook_url="http://127.0.0.1:9/hook"))
    events.emit(CertEvent(EventKind.ISSUED, "shop-cert", T0, "issued"))
    events.emit(CertEvent(EventKind.FAILED, "shop-cert", T0, "failed", code=13))
    c = MetricsCollector(lambda: {}, certs=lambda: [le, imported],
                         acme=lambda: {("order", "success"): 4, ("order", "13"): 3,
                                       ("renewal_info", "success"): 9}, events=events)
    m = scrape(c)
    cid = {"certificate": "shop-cert"}
    ts = T0.timestamp()
    assert get(m, "lbproxy_certificate_not_after_timestamp_seconds", **cid) == ts + 90 * 86400
    assert get(m, "lbproxy_certificate_next_renewal_timestamp_seconds", **cid) == ts + 61 * 86400
    assert get(m, "lbproxy_certificate_last_success_timestamp_seconds", **cid) == ts
    assert get(m, "lbproxy_certificate_renewal_failures", **cid) == 3
    assert get(m, "lbproxy_certificate_ari_window_start_timestamp_seconds", **cid) == \
        ts + 59 * 86400
    assert get(m, "lbproxy_certificate_ari_window_end_timestamp_seconds", **cid) == \
        ts + 61 * 86400
    assert get(m, "lbproxy_certificate_renewals_total", **cid) == 2
    assert get(m, "lbproxy_certificate_info", certificate="shop-cert", names="a.test,b.test",
               managed_by="letsencrypt", state="backoff", serial="abc") == 1
    assert get(m, "lbproxy_certificate_info", certificate="old", names="c.test",
               managed_by="imported", state="imported", serial="1") == 1
    assert get(m, "lbproxy_certificate_not_after_timestamp_seconds", certificate="old") == \
        ts + 10 * 86400
    assert ("lbproxy_certificate_renewal_failures", (("certificate", "old"),)) not in m
    assert get(m, "lbproxy_acme_requests_total", operation="order", result="success") == 4
    assert get(m, "lbproxy_acme_requests_total", operation="order", result="13") == 3
    assert get(m, "lbproxy_certificate_events_total", kind="failed") == 1
    assert get(m, "lbproxy_webhook_queue_length") == 2
    assert get(m, "lbproxy_webhook_events_total", result="delivered") == 0


def test_rate_meter_over_its_window() -> None:
    r = RateMeter(window=60, min_span=1)
    assert r.rates(0, {"a": 0}) == {}
    r.observe(0, {"a": 0, "b": 10})
    assert r.rates(0.5, {"a": 5}) == {}                # too short a span
    assert r.rates(10, {"a": 50, "b": 30}) == {"a": 5.0, "b": 2.0}
    for t in range(10, 200, 10):
        r.observe(t, {"a": 5 * t})
    assert r.rates(200, {"a": 1000}) == {"a": 5.0}
    assert r.rates(200, {"a": 3}) == {"a": 3 / 60}     # counter reset: counted from zero
    assert request_counters(STATS) == {
        "shop": 8, "shop/api": 8, "shop/api/10.0.0.1:80": 4, "shop/api/10.0.0.2:80": 3,
        "plain": 1, "plain//10.0.0.3:80": 1}
