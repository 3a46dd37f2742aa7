"""The access-log formats (lbproxy, combined, json), their microsecond durations, the latency
histograms fed from the same precise clock, and the per-status-code counters of stats().

Sans-I/O tests format lines from a fake loop; the others run a real DataPlane on loopback with a
real aiohttp backend and read the access-log file it wrote."""

from __future__ import annotations

import asyncio
import json
import logging
import re
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest

from lbproxy.accesslog import ACCESS_LOGGER, BufferedFileHandler, configure_access_log
from lbproxy.config.loader import parse_config
from lbproxy.config.model import AccessLogFormat, AccessLogSettings
from lbproxy.errors import ConfigError
from lbproxy.proxy import DataPlane
from lbproxy.proxy.accesslog import JSON_FIELDS, AccessLog, clf_quoted, request_headers
from lbproxy.proxy.connpool import ConnPool
from lbproxy.proxy.counters import Counters, ServerStats
from lbproxy.proxy.outbox import Outbox
from lbproxy.proxy.request import Request
from lbproxy.proxy.service import Service
from tests.support.pebble import free_port

from .conftest import Client, Upstream, make_vs, serve
from .test_accesslog import FakeLoop

T = 10.0  # any single step on a loaded machine

# The combined log format as standard parsers read it (Logstash's COMBINEDAPACHELOG, GoAccess's
# COMBINED): host ident user [time] "request" status bytes "referer" "agent", where quoted fields
# may hold backslash escapes.
COMBINED = re.compile(
    r'^(?P<host>\S+) (?P<ident>\S+) (?P<user>\S+) \[(?P<time>[^\]]+)\] '
    r'"(?P<method>[A-Z]+) (?P<url>\S+) HTTP/(?P<version>\d\.\d)" (?P<status>\d{3}) '
    r'(?P<bytes>\d+|-) "(?P<referer>(?:[^"\\]|\\.)*)" "(?P<agent>(?:[^"\\]|\\.)*)"$')


def parse_combined(line: str) -> dict[str, Any]:
    m = COMBINED.match(line)
    assert m is not None, line
    out: dict[str, Any] = m.groupdict()
    out["time"] = datetime.strptime(out["time"], "%d/%b/%Y:%H:%M:%S %z")
    return out


def parse_json(line: str) -> dict[str, Any]:
    """One json line, every field present and of its documented type."""
    obj = json.loads(line)
    assert isinstance(obj, dict) and list(obj) == list(JSON_FIELDS), obj
    for key, kinds in JSON_FIELDS.items():
        value = obj[key]
        ok = any(value is None if k is None else type(value) is k for k in kinds)
        assert ok, (key, value, kinds)
    datetime.strptime(obj["time"], "%Y-%m-%dT%H:%M:%SZ")
    return obj


def _service() -> Service:
    """A real Service (the hot path's classes take no stand-ins once compiled), without a log."""
    vs = parse_config('[[vs]]\nname = "web"\nlisten = "127.0.0.1:1"\n').virtual_services[0]
    return Service(vs, Counters(), None, 1)


def fake_request(method: bytes = b"GET", url: bytes = b"/", headers: tuple[tuple[bytes, bytes],
                 ...] = (), status: int = 200, nbytes: int = 5) -> Request:
    req = Request(_service(), "10.1.2.3", 0.0, url)
    req.method_b = method
    for name, value in headers:
        req.fwd += (name, b": ", value, b"\r\n")
        if name.lower() == b"host":
            req.host_b = value
    req.fwd.append(b"X-Forwarded-For: 10.1.2.3\r\n")  # what the proxy appends is not a field
    req.status = status
    req.resp_bytes = nbytes
    req.hlen = 100
    return req


def log_of(fmt: str, name: str) -> tuple[AccessLog, FakeLoop, list[str]]:
    """An AccessLog of format `fmt` on a fake loop, and the lines its logger receives."""
    handler = _Lines()
    log = logging.getLogger(name)
    log.handlers[:] = [handler]
    log.propagate = False
    log.setLevel(logging.INFO)
    loop = FakeLoop()
    return AccessLog(loop, log, fmt), loop, handler.lines  # type: ignore[arg-type]


class _Lines(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines += record.getMessage().split("\n")


# -- sans-I/O --------------------------------------------------------------------------------------

def test_combined_lines_parse_with_a_standard_combined_regex() -> None:
    alog, loop, lines = log_of("combined", "test.access.combined")
    prefix = alog.prefix("web", "api", "10.0.0.1:80", "10.1.2.3", None)
    ua = b'Mozilla/5.0 "quoted" \\ caf\xc3\xa9'
    alog.request(prefix, fake_request(b"GET", b"/a?x=%d%s", (
        (b"Host", b"shop.test"), (b"User-Agent", ua), (b"Referer", b"https://r.test/p"))),
        bytes_in=80, end=1.0)
    alog.request(prefix, fake_request(b"POST", b"/caf\xe9", ((b"Host", b"h"),), 404, 0),
                 bytes_in=0, end=1.0)
    loop.run_soon()
    first, second = (parse_combined(line) for line in lines)
    assert first["host"] == "10.1.2.3" and first["ident"] == first["user"] == "-"
    assert (first["method"], first["url"], first["version"]) == ("GET", "/a?x=%d%s", "1.1")
    assert (first["status"], first["bytes"]) == ("200", "5")
    assert first["referer"] == "https://r.test/p"
    # `"`, `\` and bytes outside printable ASCII are escaped as nginx does.
    assert first["agent"] == 'Mozilla/5.0 \\x22quoted\\x22 \\x5C caf\\xC3\\xA9'
    assert abs((datetime.now(first["time"].tzinfo) - first["time"]).total_seconds()) < 5
    assert second["url"] == "/caf\\xE9" and second["status"] == "404"
    assert second["referer"] == second["agent"] == "-"


def test_a_request_that_never_had_a_head_is_logged_as_dash_in_combined() -> None:
    alog, loop, lines = log_of("combined", "test.access.combined.dash")
    alog.request(alog.prefix("web", "-", "-", "::1", None),
                 fake_request(b"-", b"-", status=400), bytes_in=7, end=1.0)
    loop.run_soon()
    (line,) = lines
    assert re.fullmatch(r'::1 - - \[[^\]]+\] "-" 400 5 "-" "-"', line), line


def test_json_lines_have_every_field_typed() -> None:
    alog, loop, lines = log_of("json", "test.access.json")
    prefix = alog.prefix('w"eb', "-", "-", "127.0.0.1", "TLSv1.3")
    req = fake_request(b"GET", b'/q?a="1"&b=\xff', (
        (b"Host", b"shop.test"), (b"user-agent", b"curl/8 \xc3\xa9"), (b"X-Other", b"1")))
    req.ts = 10.0
    req.cut = True
    alog.request(prefix, req, bytes_in=123, end=10.0012345)
    relayed = fake_request(b"GET", b"/", ((b"Host", b"x"),))
    relayed.server = ServerStats(ConnPool(loop, "127.0.0.1", 9, 60.0, Outbox(loop)))
    relayed.ts, relayed.t_up, relayed.t_conn, relayed.t_hdr = 5.0, 5.0001, 5.0003, 5.0020
    alog.request(prefix, relayed, bytes_in=0, end=5.0025)
    loop.run_soon()
    one, two = (parse_json(line) for line in lines)
    assert one["vs"] == 'w"eb' and one["subvs"] is None and one["server"] is None
    assert one["client"] == "127.0.0.1" and one["tls_version"] == "TLSv1.3"
    assert one["uri"] == '/q?a="1"&b=\\xff' and one["method"] == "GET"
    assert one["protocol"] == "HTTP/1.1" and one["host"] == "shop.test"
    assert one["user_agent"] == "curl/8 \u00e9" and one["referer"] is None
    assert one["status"] == 200 and one["body_bytes"] == 5 and one["bytes_out"] == 105
    assert one["bytes_in"] == 123 and one["cut"] is True
    assert 1234 <= one["duration_us"] <= 1235
    assert one["upstream_connect_us"] is one["upstream_header_us"] is None
    assert two["cut"] is False
    assert 199 <= two["upstream_connect_us"] <= 200
    assert 1899 <= two["upstream_header_us"] <= 1900
    assert 2399 <= two["upstream_response_us"] <= 2400
    assert 2499 <= two["duration_us"] <= 2500


def test_lbproxy_lines_show_microseconds() -> None:
    alog, loop, lines = log_of("lbproxy", "test.access.lbproxy.us")
    alog.entry(alog.prefix("web", None, None, "::1", None), b"GET", b"/", 200, 0, 1.0,
               1.000321)
    loop.run_soon()
    assert lines[0].endswith(' web - - ::1 "GET /" 200 0 0.321'), lines[0]


def test_user_agent_and_referer_come_from_the_fields_as_parsed() -> None:
    req = fake_request(headers=((b"Referer", b"r1"), (b"USER-AGENT", b"u1"), (b"Referer", b"r2")))
    assert request_headers(req.fwd) == (b"u1", b"r1")
    assert request_headers(fake_request().fwd) == (None, None)
    assert clf_quoted(b"plain /x") == b"plain /x"


def test_an_unknown_format_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown access log format 'xml'"):
        AccessLog(FakeLoop(), fmt="xml")  # type: ignore[arg-type]


def test_the_format_key_is_read_and_checked() -> None:
    base = '[[vs]]\nname = "w"\nlisten = "127.0.0.1:8080"\n' \
           'real_servers = [{ address = "127.0.0.1:9000" }]\n'
    cfg = parse_config('[access_log]\nformat = "JSON"\n' + base)
    assert cfg.access_log.format == AccessLogFormat.JSON
    assert parse_config(base).access_log.format == AccessLogFormat.LBPROXY
    with pytest.raises(ConfigError) as e:
        parse_config('[access_log]\nformat = "xml"\n' + base)
    assert any(p.where == "access_log.format" and "'xml'" in p.message and "combined" in p.message
               for p in e.value.problems), e.value.problems


# -- a real data plane -----------------------------------------------------------------------------

@pytest.fixture
def access_file(tmp_path: Path) -> Iterator[Path]:
    """The access logger writing to a file (restored afterwards)."""
    path = tmp_path / "access.log"
    access = logging.getLogger(ACCESS_LOGGER)
    saved = access.handlers[:], access.level, access.propagate
    configure_access_log(AccessLogSettings(enabled=True, path=str(path)), tmp_path)
    try:
        yield path
    finally:
        configure_access_log(AccessLogSettings(enabled=False), tmp_path)
        access.handlers[:] = saved[0]
        access.setLevel(saved[1])
        access.propagate = saved[2]


def read_lines(path: Path) -> list[str]:
    # (pytest may add its capture handlers beside the file's)
    for handler in logging.getLogger(ACCESS_LOGGER).handlers:
        if isinstance(handler, BufferedFileHandler):
            handler.flush()
    return path.read_text().splitlines()


async def _settle() -> None:
    """One loop pass: the access log flushes its batch at the end of the pass it was filled in."""
    await asyncio.sleep(0)


def _log(fmt: AccessLogFormat, path: Path) -> AccessLogSettings:
    return AccessLogSettings(enabled=True, path=str(path), format=fmt)


async def test_json_over_a_real_exchange(dataplane: DataPlane, upstream: Upstream,
                                         access_file: Path) -> None:
    ports = await serve(dataplane, make_vs(ports=(upstream.port,)),
                        access_log=_log(AccessLogFormat.JSON, access_file))
    async with asyncio.timeout(T):
        c = await Client.connect(ports["web"])
        r = await c.request(path="/slow?d=0.003", host="shop.test",
                            headers=(("User-Agent", "t/1"), ("Referer", "http://r/")))
        assert r.status == 200
        assert (await c.request(path="/slow?d=0.007", host="shop.test")).status == 200
        c.close()
    await _settle()
    first, second = (parse_json(line) for line in read_lines(access_file))
    assert first["vs"] == "web" and first["subvs"] is None
    assert first["server"] == f"127.0.0.1:{upstream.port}" and first["tls_version"] is None
    assert first["uri"] == "/slow?d=0.003" and first["host"] == "shop.test"
    assert first["user_agent"] == "t/1" and first["referer"] == "http://r/"
    assert first["bytes_in"] > 50 and first["bytes_out"] > first["body_bytes"] == 4
    # The first request opened the connection, the second reused it.
    assert first["upstream_connect_us"] > 0 and second["upstream_connect_us"] == 0
    for line, delay_us in ((first, 3000), (second, 7000)):
        assert delay_us <= line["upstream_header_us"] <= line["upstream_response_us"]
        assert line["upstream_response_us"] <= line["duration_us"]
    # Microseconds, not whole milliseconds (the event loop's clock would give 3000/7000 or
    # 4000/8000): each at least its backend's delay, and sub-ms digits that are not both zero
    # (a chance of 1 in a million for a precise clock).
    assert first["duration_us"] >= 3000 and second["duration_us"] >= 7000
    assert (first["duration_us"] % 1000, second["duration_us"] % 1000) != (0, 0)
    assert first["duration_us"] != second["duration_us"]


async def test_lbproxy_durations_have_sub_millisecond_digits(
        dataplane: DataPlane, upstream: Upstream, access_file: Path) -> None:
    ports = await serve(dataplane, make_vs(ports=(upstream.port,)),
                        access_log=_log(AccessLogFormat.LBPROXY, access_file))
    async with asyncio.timeout(T):
        c = await Client.connect(ports["web"])
        for d in ("0.003", "0.007"):
            assert (await c.request(path=f"/slow?d={d}")).status == 200
        c.close()
    await _settle()
    ms = [float(line.rsplit(" ", 1)[1]) for line in read_lines(access_file)]
    assert ms[0] >= 3.0 and ms[1] >= 7.0
    # Not whole milliseconds (the event loop's clock would give 3.000/7.000 or 4.000/8.000): the
    # chance that both land on a whole ms by accident is 1 in a million.
    assert any(round(m * 1000) % 1000 for m in ms), ms


async def test_a_fast_local_answer_takes_under_a_millisecond_not_zero(
        dataplane: DataPlane, access_file: Path) -> None:
    vs = make_vs(ports=())  # no real server: the VS answers itself (not available)
    ports = await serve(dataplane, vs, access_log=_log(AccessLogFormat.JSON, access_file))
    async with asyncio.timeout(T):
        c = await Client.connect(ports["web"])
        r = await c.request(path="/x")
        c.close()
    await _settle()
    (line,) = (parse_json(s) for s in read_lines(access_file))
    assert line["status"] == r.status and line["server"] is None
    assert line["upstream_connect_us"] is None and line["upstream_response_us"] is None
    assert 0 < line["duration_us"] < 1000, line
    st = dataplane.stats()["virtual_services"]["web"]["latency"]
    assert st["buckets"][:4] == [0.0001, 0.00025, 0.0005, 0.001]
    assert sum(st["counts"][:4]) == 1 and st["sum"] > 0


async def test_combined_over_a_real_exchange(dataplane: DataPlane, upstream: Upstream,
                                             access_file: Path) -> None:
    ports = await serve(dataplane, make_vs(ports=(upstream.port,)),
                        access_log=_log(AccessLogFormat.COMBINED, access_file))
    async with asyncio.timeout(T):
        c = await Client.connect(ports["web"])
        r = await c.request(path="/status/404", headers=(("User-Agent", 'a "b"'),))
        assert r.status == 404
        c.close()
    await _settle()
    (line,) = (parse_combined(s) for s in read_lines(access_file))
    assert line["url"] == "/status/404" and line["status"] == "404"
    assert line["bytes"] == str(len(r.body)) and line["agent"] == "a \\x22b\\x22"


async def test_the_histograms_and_stats_get_the_same_precise_durations(
        dataplane: DataPlane, upstream: Upstream, access_file: Path) -> None:
    ports = await serve(dataplane, make_vs(ports=(upstream.port,)),
                        access_log=_log(AccessLogFormat.JSON, access_file))
    async with asyncio.timeout(T):
        c = await Client.connect(ports["web"])
        for _ in range(3):
            assert (await c.request(path="/slow?d=0.003")).status == 200
        c.close()
    await _settle()
    logged = sum(parse_json(s)["duration_us"] for s in read_lines(access_file)) / 1e6
    lat = dataplane.stats()["virtual_services"]["web"]["latency"]
    assert lat["count"] == 3 and lat["sum"] == pytest.approx(logged, abs=3e-6)
    # 3 ms each: in the (0.0025, 0.005] bucket or above, never in the sub-ms ones.
    assert sum(lat["counts"][:4]) == 0


async def test_responses_are_counted_per_code(dataplane: DataPlane, upstream: Upstream) -> None:
    ports = await serve(dataplane, make_vs(ports=(upstream.port,)))
    async with asyncio.timeout(T):
        c = await Client.connect(ports["web"])
        for code in (200, 200, 404, 201, 503, 404, 404):
            assert (await c.request(path=f"/status/{code}")).status == code
        c.close()
    web = dataplane.stats()["virtual_services"]["web"]
    expected = {"200": 2, "201": 1, "404": 3, "503": 1}
    assert web["codes"] == expected and list(web["codes"]) == sorted(expected)
    assert web["responses"] == {"1xx": 0, "2xx": 3, "3xx": 0, "4xx": 3, "5xx": 1}
    (rs,) = web["real_servers"]
    assert rs["codes"] == expected and rs["responses"] == web["responses"]


def test_what_the_proxy_appended_is_not_taken_for_a_field() -> None:
    req = fake_request(headers=((b"Host", b"h"),))
    assert len(req.fwd) == 9
    # Pieces as _build_head appends them, client values where a field's name would be (4k).
    req.fwd += (b"X-Forwarded-For: ", b"a", b", ", b"User-Agent", b", ", b"10.1.2.3", b"\r\n",
                b"referer")
    assert req.fwd[12] == b"User-Agent" and req.fwd[16] == b"referer"
    assert request_headers(req.fwd) == (None, None)
    req.fwd[4:4] = [b"Referer", b": ", b"r", b"\r\n"]  # a real field before them is found
    assert request_headers(req.fwd) == (None, b"r")


async def test_json_when_the_real_server_cannot_be_reached(dataplane: DataPlane,
                                                           access_file: Path) -> None:
    closed = free_port()  # nothing listens there: the connection is refused
    ports = await serve(dataplane, make_vs(ports=(closed,)),
                        access_log=_log(AccessLogFormat.JSON, access_file))
    async with asyncio.timeout(T):
        c = await Client.connect(ports["web"])
        assert (await c.request(path="/x")).status == 502
        c.close()
    await _settle()
    (line,) = (parse_json(s) for s in read_lines(access_file))
    assert line["status"] == 502 and line["server"] == f"127.0.0.1:{closed}"
    # No connection was made and no response head came; the attempt itself took time.
    assert line["upstream_connect_us"] is None and line["upstream_header_us"] is None
    assert 0 < line["upstream_response_us"] <= line["duration_us"]
