"""Prometheus metrics read at scrape time (no per-request cost), the /metrics route, and the
requests-per-second meter behind `lbproxy status`.

`MetricsCollector` is a prometheus_client custom collector: at each scrape it calls
`DataPlane.stats()`, the certificate status source and the ACME counters, and turns whatever keys
are present into metric families. The data plane keeps plain integer counters; nothing here runs
per request. On a node of a cluster, the /metrics route first reads the cluster's view (an
awaitable, bounded by CLUSTER_VIEW_WAIT) so that the synchronous collection never waits on Redis.
The stats keys read, and the metrics they become: `metrics_dataplane.py`.

Besides the data plane: a build-info gauge, the reload counters (`reloads`, App's), with worker
processes each worker's CPU time and resident memory (read from /proc at scrape time), and on the
registry `make_registry` builds, prometheus_client's process_* (this process: the control process
when there are workers), python_info and python_gc_* collectors.
"""

from __future__ import annotations

import asyncio
import logging
import os
import platform
import ssl
import time
from collections import deque
from collections.abc import Awaitable, Callable, Iterable, Iterator, Mapping
from typing import Any

from aiohttp import web
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    GCCollector,
    PlatformCollector,
    ProcessCollector,
    generate_latest,
)
from prometheus_client.core import Metric
from prometheus_client.registry import Collector, CollectorRegistry

from . import __version__
from .events import CertStatus, Events
from .metrics_dataplane import (
    RESPONSE_CLASSES,
    Families,
    cumulative_buckets,
    dataplane_families,
    request_counters,
)

__all__ = ["CLUSTER_VIEW_WAIT", "METRICS_PATH", "RESPONSE_CLASSES", "AcmeSource", "CertSource",
           "ClusterSource", "MetricsCollector", "RateMeter", "ReloadSource", "StatsSource",
           "cumulative_buckets", "make_registry", "metrics_routes", "request_counters"]

logger = logging.getLogger(__name__)

StatsSource = Callable[[], Mapping[str, Any]]
CertSource = Callable[[], Iterable[CertStatus]]
AcmeSource = Callable[[], Mapping[tuple[str, str], int]]
# A cluster node's view (ClusterNode.view: "connected", "nodes", ...); None: not in a cluster.
ClusterSource = Callable[[], Awaitable[Mapping[str, Any] | None]]
# Reloads so far by result: {"success": n, "failure": n} (App.reloads_ok, App.reloads_failed).
ReloadSource = Callable[[], Mapping[str, int]]
CLUSTER_VIEW_WAIT = 2.0   # seconds a scrape waits for it (it reads Redis); then: not connected

METRICS_PATH = "/metrics"


def _ts(v: Any) -> float | None:
    return v.timestamp() if v is not None else None


class MetricsCollector(Collector):
    """Every lbproxy metric, computed when Prometheus scrapes."""

    def __init__(self, stats: StatsSource, *, certs: CertSource | None = None,
                 acme: AcmeSource | None = None, events: Events | None = None,
                 clock: Callable[[], float] = time.time,
                 refresh: Callable[[], Awaitable[None]] | None = None,
                 workers: Callable[[], list[dict[str, Any]]] | None = None,
                 cluster: ClusterSource | None = None,
                 cluster_wait: float = CLUSTER_VIEW_WAIT,
                 reloads: ReloadSource | None = None) -> None:
        self.stats = stats
        self.reloads = reloads
        # On a node of a cluster: its view, read by `refresh_cluster()` before each scrape.
        self.cluster = cluster
        self.cluster_wait = cluster_wait
        self.cluster_view: Mapping[str, Any] | None = None
        # With worker processes: each worker's slot, pid, generation, connections, restarts.
        self.workers = workers
        # With worker processes: collects their stats, which `stats` then reads.
        self.refresh = refresh
        self.certs = certs
        self.acme = acme
        self.events = events
        self.clock = clock
        self.scrapes = 0

    def collect(self) -> Iterator[Metric]:
        self.scrapes += 1
        f = Families()
        f.gauge("lbproxy_build_info", "Always 1: the lbproxy version and what it runs on.",
                ("version", "python", "implementation", "openssl")).add_metric(
            [__version__, platform.python_version(), platform.python_implementation(),
             ssl.OPENSSL_VERSION], 1)
        if self.reloads is not None:
            c = f.counter("lbproxy_reloads", "Config reloads (SIGHUP, API, file watch) by "
                          "result: success (applied) or failure (refused; the old config "
                          "kept serving).", ("result",))
            for result, n in sorted(self.reloads().items()):
                c.add_metric([result], n)
        try:
            dataplane_families(f, self.stats())
        except Exception:  # a stats shape we do not understand must not break the scrape
            logger.exception("metrics: data plane stats could not be read")
        if self.certs is not None:
            self._certs(f, list(self.certs()))
        if self.acme is not None:
            c = f.counter("lbproxy_acme_requests", "ACME operations by result (success or the "
                          "LoadMaster code of the failure).", ("operation", "result"))
            for (op, result), n in sorted(self.acme().items()):
                c.add_metric([op, result], n)
        if self.events is not None:
            self._events(f, self.events)
        if self.workers is not None:
            self._workers(f, self.workers())
        if self.cluster_view is not None:
            self._cluster(f, self.cluster_view)
        yield from f.items.values()

    async def refresh_cluster(self) -> None:
        """Read the cluster's view for the next collection (within `cluster_wait`)."""
        if self.cluster is None:
            return
        try:
            async with asyncio.timeout(self.cluster_wait):
                self.cluster_view = await self.cluster()
            return
        except TimeoutError:  # Redis accepted the connection but does not answer in time
            logger.warning("metrics: no cluster state within %.1f s", self.cluster_wait)
        except Exception:  # a bug: the scrape goes on without it
            logger.exception("metrics: the cluster's state could not be read")
        self.cluster_view = {"connected": False, "nodes": None}   # only a cluster node gets here

    @staticmethod
    def _cluster(f: Families, view: Mapping[str, Any]) -> None:
        connected = bool(view.get("connected"))
        f.gauge("lbproxy_cluster_connected", "1 while this node reaches the cluster's Redis, "
                "else 0.", ()).add_metric([], 1 if connected else 0)
        nodes = view.get("nodes")
        # Known only while connected, and when they could be read (else last_error says why).
        if connected and isinstance(nodes, list) and not view.get("last_error"):
            f.gauge("lbproxy_cluster_nodes", "Nodes of the cluster seen recently (a heartbeat "
                    "not yet expired), this one included.", ()).add_metric([], len(nodes))

    @staticmethod
    def _workers(f: Families, workers: list[dict[str, Any]]) -> None:
        names = ("worker",)
        for w in workers:
            label = [str(w["id"])]
            f.gauge("lbproxy_worker_up", "1 while the worker process serves, 0 while it is "
                    "being (re)started.", names).add_metric(label, 1 if w["state"] == "running"
                                                            else 0)
            f.gauge("lbproxy_worker_generation", "The config generation the worker serves.",
                    names).add_metric(label, w["generation"])
            f.gauge("lbproxy_worker_connections", "Client connections open in the worker.",
                    names).add_metric(label, w["connections"])
            f.counter("lbproxy_worker_restarts", "Times the worker process died and was "
                      "started again.", names).add_metric(label, w["restarts"])
            usage = _proc_usage(w.get("pid"))
            if usage is not None:
                f.counter("lbproxy_worker_cpu_seconds", "CPU time (user + system) of the "
                          "worker process.", names).add_metric(label, usage[0])
                f.gauge("lbproxy_worker_resident_memory_bytes", "Resident memory of the "
                        "worker process.", names).add_metric(label, usage[1])

    # -- certificates -------------------------------------------------------------------------

    def _certs(self, f: Families, certs: list[CertStatus]) -> None:
        lab = ("certificate",)
        info = f.gauge("lbproxy_certificate_info", "One per certificate: names, issuer side, "
                       "renewal state and serial (the serial changes at renewal; the "
                       "certificate label does not).",
                       ("certificate", "names", "managed_by", "state", "serial"))
        gauges = (
            ("not_after", "lbproxy_certificate_not_after_timestamp_seconds",
             "Expiry (notAfter) as a Unix time."),
            ("not_before", "lbproxy_certificate_not_before_timestamp_seconds",
             "Start of validity (notBefore) as a Unix time."),
            ("next_attempt", "lbproxy_certificate_next_renewal_timestamp_seconds",
             "When the next renewal attempt is scheduled, as a Unix time."),
            ("last_success", "lbproxy_certificate_last_success_timestamp_seconds",
             "When the certificate was last issued or renewed, as a Unix time."),
            ("ari_start", "lbproxy_certificate_ari_window_start_timestamp_seconds",
             "Start of the CA's suggested renewal window (ARI, RFC 9773)."),
            ("ari_end", "lbproxy_certificate_ari_window_end_timestamp_seconds",
             "End of the CA's suggested renewal window (ARI, RFC 9773)."),
        )
        for c in certs:
            info.add_metric([c.id, ",".join(c.names), c.managed_by or "imported",
                             c.state, c.serial], 1)
            for attr, name, doc in gauges:
                v = _ts(getattr(c, attr))
                if v is not None:
                    f.gauge(name, doc, lab).add_metric([c.id], v)
            if c.managed_by:
                f.gauge("lbproxy_certificate_renewal_failures",
                        "Consecutive failed renewal attempts (0 after a success).",
                        lab).add_metric([c.id], c.failures)
                f.counter("lbproxy_certificate_renewals",
                          "Renewals since the certificate was first issued.",
                          lab).add_metric([c.id], c.renewals)

    def _events(self, f: Families, events: Events) -> None:
        c = f.counter("lbproxy_certificate_events", "Certificate events by kind.", ("kind",))
        for kind, n in sorted(events.counts.items()):
            c.add_metric([kind], n)
        wh = events.webhook
        if wh is not None:
            d = f.counter("lbproxy_webhook_events", "Events handed to the webhook, by outcome.",
                          ("result",))
            d.add_metric(["delivered"], wh.counters.delivered)
            d.add_metric(["failed"], wh.counters.failed)
            d.add_metric(["dropped"], wh.counters.dropped)
            f.counter("lbproxy_webhook_attempts", "HTTP attempts made to the webhook.",
                      ()).add_metric([], wh.counters.attempts)
            f.gauge("lbproxy_webhook_queue_length", "Events waiting for the webhook.",
                    ()).add_metric([], wh.queued)


# /proc/<pid>/stat counts CPU time in clock ticks and resident memory in pages.
_CLK_TCK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
_PAGE_SIZE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def _proc_usage(pid: Any) -> tuple[float, float] | None:
    """(CPU seconds, resident bytes) of process `pid` from /proc (Linux), or None."""
    if not isinstance(pid, int) or pid <= 0:
        return None
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:
            stat = fh.read()
    except OSError:  # gone, or no /proc
        return None
    # The fields after the command name (which may hold spaces and parentheses).
    fields = stat[stat.rfind(b")") + 2:].split()
    try:
        ticks = int(fields[11]) + int(fields[12])   # utime, stime
        rss_pages = int(fields[21])
    except (IndexError, ValueError):
        return None
    return ticks / _CLK_TCK, float(rss_pages * _PAGE_SIZE)


class _ProcessCollector(ProcessCollector):
    """prometheus_client's process_* collector, with the boot time (for
    process_start_time_seconds) from the clocks instead of /proc/stat, which systemd's
    ProcSubset=pid (the example unit) hides: without it the collector exports nothing."""

    def _boot_time(self) -> float:
        return time.time() - time.clock_gettime(time.CLOCK_BOOTTIME)


def make_registry(collector: MetricsCollector) -> CollectorRegistry:
    """A registry of its own (no process-wide default registry, no globals): lbproxy's collector
    and prometheus_client's process_*, python_info and python_gc_* ones (for this process)."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(collector)
    _ProcessCollector(registry=registry)
    PlatformCollector(registry=registry)
    GCCollector(registry=registry)
    return registry


def metrics_routes(collector: MetricsCollector) -> Callable[[web.Application], None]:
    """A registrar for `create_app(extra_routes=...)` adding GET /metrics."""
    registry = make_registry(collector)

    async def metrics(_request: web.Request) -> web.Response:
        if collector.refresh is not None:
            await collector.refresh()
        await collector.refresh_cluster()
        body = generate_latest(registry)
        resp = web.Response(body=body)
        resp.headers["Content-Type"] = CONTENT_TYPE_LATEST
        return resp

    def register(app: web.Application) -> None:
        app.router.add_get(METRICS_PATH, metrics)

    return register


class RateMeter:
    """Rates of growing counters over the last `window` seconds, from samples taken by the
    caller at times it passes in (sans-I/O)."""

    def __init__(self, window: float = 60.0, min_span: float = 1.0) -> None:
        self.window = window
        self.min_span = min_span
        self._samples: deque[tuple[float, dict[str, float]]] = deque()

    def observe(self, now: float, counters: Mapping[str, float]) -> None:
        self._samples.append((now, dict(counters)))
        # Keep one sample older than the window so a rate always spans close to all of it.
        while len(self._samples) > 2 and now - self._samples[1][0] >= self.window:
            self._samples.popleft()

    def rates(self, now: float, counters: Mapping[str, float]) -> dict[str, float]:
        """Per-second rate of each counter since the oldest usable sample; a key with no
        sample far enough back is left out. A counter that went down (a VS re-created) counts
        from zero."""
        base: tuple[float, dict[str, float]] | None = None
        for t, sample in self._samples:
            if self.min_span <= now - t:
                base = (t, sample)
                if now - t <= self.window:
                    break
        if base is None:
            return {}
        t, sample = base
        span = now - t
        out: dict[str, float] = {}
        for k, v in counters.items():
            old = sample.get(k, 0.0)
            out[k] = (v - old if v >= old else v) / span
        return out
