"""The metrics of issue 18: responses by exact status code at every level, the real-server
request duration histogram (from a real data plane), build info, reload counters, each worker's
CPU and memory, and prometheus_client's process_*/python_* collectors on the served registry."""

from __future__ import annotations

import asyncio
import os
import platform
import ssl
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry, ProcessCollector, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from lbproxy import __version__
from lbproxy.config.model import ContentRule, MatchType, SubVS
from lbproxy.metrics import MetricsCollector, _ProcessCollector, make_registry
from lbproxy.proxy import DataPlane
from tests.metrics.test_metrics import STATS, TRAFFIC
from tests.proxy.conftest import NO_CHECK, Client, make_vs, serve, servers, start_upstream

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def scrape(collector: MetricsCollector) -> tuple[Samples, dict[str, str]]:
    """(every sample by name and labels, every family's type by name), parsed by
    prometheus_client's own parser from the text /metrics serves."""
    text = generate_latest(make_registry(collector)).decode()
    samples: Samples = {}
    types: dict[str, str] = {}
    for fam in text_string_to_metric_families(text):
        types[fam.name] = fam.type
        for s in fam.samples:
            samples[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return samples, types


def get(samples: Samples, name: str, **labels: str) -> float:
    return samples[(name, tuple(sorted(labels.items())))]


CODES = {"200": 6, "204": 1, "404": 1}
WITH_CODES: dict[str, Any] = {"virtual_services": {"shop": {
    **TRAFFIC, "codes": CODES, "requests": 8,
    "subvs": {"api": {**TRAFFIC, "codes": CODES, "requests": 8, "real_servers": [
        {"address": "10.0.0.1:80", **TRAFFIC, "codes": {"200": 5, "404": 1}},
        {"address": "10.0.0.2:80", "requests": 2}]}}}}}


def test_responses_by_code_at_every_level() -> None:
    m, types = scrape(MetricsCollector(lambda: WITH_CODES))
    assert get(m, "lbproxy_vs_responses_by_code_total", vs="shop", code="204") == 1
    assert get(m, "lbproxy_subvs_responses_by_code_total", vs="shop", subvs="api",
               code="200") == 6
    rs = {"vs": "shop", "subvs": "api", "real_server": "10.0.0.1:80"}
    assert get(m, "lbproxy_real_server_responses_by_code_total", **rs, code="404") == 1
    assert types["lbproxy_real_server_responses_by_code"] == "counter"
    # The class counters are still there, and a server without "codes" has no per-code sample.
    assert get(m, "lbproxy_vs_responses_total", vs="shop", **{"class": "2xx"}) == 7
    assert not any(k[0] == "lbproxy_real_server_responses_by_code_total"
                   and ("real_server", "10.0.0.2:80") in k[1] for k in m)


def test_stats_without_codes_are_fine() -> None:
    m, types = scrape(MetricsCollector(lambda: STATS))
    assert not any(name.endswith("_responses_by_code") for name in types)
    assert get(m, "lbproxy_vs_requests_total", vs="shop") == 8


def test_build_info_and_reloads() -> None:
    counts = {"success": 3, "failure": 1}
    m, types = scrape(MetricsCollector(lambda: {}, reloads=lambda: counts))
    info = [dict(labels) for (name, labels), v in m.items()
            if name == "lbproxy_build_info" and v == 1]
    assert info == [{"version": __version__, "python": platform.python_version(),
                     "implementation": platform.python_implementation(),
                     "openssl": ssl.OPENSSL_VERSION}]
    assert types["lbproxy_build_info"] == "gauge"
    assert get(m, "lbproxy_reloads_total", result="success") == 3
    assert get(m, "lbproxy_reloads_total", result="failure") == 1
    counts["success"] = 4  # read at each scrape
    m, _ = scrape(MetricsCollector(lambda: {}, reloads=lambda: counts))
    assert get(m, "lbproxy_reloads_total", result="success") == 4
    # Without the source (an App always gives it): no reload family at all.
    _, types = scrape(MetricsCollector(lambda: {}))
    assert "lbproxy_reloads" not in types


def test_process_and_python_collectors_are_on_the_registry() -> None:
    m, types = scrape(MetricsCollector(lambda: {}))
    for name in ("process_cpu_seconds", "process_resident_memory_bytes",
                 "process_open_fds", "process_max_fds", "process_start_time_seconds",
                 "process_virtual_memory_bytes", "python_info", "python_gc_collections"):
        assert name in types, name
    assert get(m, "process_resident_memory_bytes") > 1 << 20
    # Each registry has its own collectors: two in one process do not clash.
    scrape(MetricsCollector(lambda: {}))


def test_each_workers_cpu_and_memory_from_proc() -> None:
    me = os.getpid()
    workers = [{"id": 0, "pid": me, "generation": 1, "connections": 0, "restarts": 0,
                "state": "running"},
               {"id": 1, "pid": None, "generation": 1, "connections": 0, "restarts": 2,
                "state": "starting"}]
    m, types = scrape(MetricsCollector(lambda: {}, workers=lambda: workers))
    assert types["lbproxy_worker_cpu_seconds"] == "counter"
    assert get(m, "lbproxy_worker_cpu_seconds_total", worker="0") > 0
    rss = get(m, "lbproxy_worker_resident_memory_bytes", worker="0")
    assert abs(rss - get(m, "process_resident_memory_bytes")) < 64 << 20  # the same process
    assert ("lbproxy_worker_cpu_seconds_total", (("worker", "1"),)) not in m  # no process yet
    assert get(m, "lbproxy_worker_restarts_total", worker="1") == 2


async def test_a_real_data_plane_exports_the_real_server_duration_and_codes() -> None:
    up = await start_upstream()
    dp = DataPlane()
    try:
        rules = (ContentRule("all", MatchType.PREFIX, "/"),)
        vs = make_vs(subvs=(SubVS("api", real_servers=servers(up.port), rules=("all",),
                                  health_check=NO_CHECK),), content_switching=True)
        ports = await serve(dp, vs, make_vs("plain", ports=(up.port,)), rules=rules)
        async with asyncio.timeout(10):
            for port, paths in ((ports["web"], ("/a", "/status/404", "/b")),
                                (ports["plain"], ("/c",))):
                c = await Client.connect(port)
                for path in paths:
                    r = await c.request("GET", path)
                    assert r.status == (404 if "404" in path else 200)
                c.close()
        m, types = scrape(MetricsCollector(dp.stats))
    finally:
        await dp.shutdown(0.5)
        assert up.runner is not None
        await up.runner.cleanup()
    server = f"127.0.0.1:{up.port}"
    rs = {"vs": "web", "subvs": "api", "real_server": server}
    assert types["lbproxy_real_server_request_duration_seconds"] == "histogram"
    assert get(m, "lbproxy_real_server_request_duration_seconds_count", **rs) == 3
    assert get(m, "lbproxy_real_server_request_duration_seconds_bucket", **rs, le="+Inf") == 3
    assert get(m, "lbproxy_real_server_request_duration_seconds_sum", **rs) > 0
    direct = {"vs": "plain", "subvs": "", "real_server": server}
    assert get(m, "lbproxy_real_server_request_duration_seconds_count", **direct) == 1
    # The levels still add up: the SubVS's histogram holds what its real server took.
    assert get(m, "lbproxy_subvs_request_duration_seconds_count", vs="web", subvs="api") == 3
    assert get(m, "lbproxy_vs_request_duration_seconds_count", vs="web") == 3
    codes: Mapping[str, float] = {
        dict(k[1])["code"]: v for k, v in m.items()
        if k[0] == "lbproxy_real_server_responses_by_code_total" and dict(k[1])["vs"] == "web"}
    assert codes == {"200": 2, "404": 1}
    assert get(m, "lbproxy_vs_responses_by_code_total", vs="plain", code="200") == 1


def test_process_metrics_without_proc_stat(tmp_path: Path) -> None:
    """Under the example unit (ProcSubset=pid) /proc shows process directories only: no
    /proc/stat, where prometheus_client reads the boot time, and without which its collector
    exports nothing. lbproxy's takes the boot time from the clocks."""
    (tmp_path / "self").symlink_to("/proc/self")  # a /proc with nothing but this process
    bare = CollectorRegistry()
    ProcessCollector(proc=str(tmp_path), registry=bare)
    assert "process_start_time_seconds" not in generate_latest(bare).decode()
    ours = CollectorRegistry()
    _ProcessCollector(proc=str(tmp_path), registry=ours)
    got = {s.name: s.value for f in text_string_to_metric_families(generate_latest(ours).decode())
           for s in f.samples}
    btime = next(float(line.split()[1]) for line in Path("/proc/stat").read_text().splitlines()
                 if line.startswith("btime "))
    fields = Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()
    started = btime + int(fields[19]) / os.sysconf("SC_CLK_TCK")
    assert abs(got["process_start_time_seconds"] - started) < 2.0
    assert got["process_resident_memory_bytes"] > 1 << 20 and got["process_open_fds"] > 0
