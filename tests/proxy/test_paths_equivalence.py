"""The relay's fast path and its general path give the same stats and access-log lines.

The same traffic goes through a fresh DataPlane twice, against one scripted real server on
127.0.0.1: once as production runs it, once with the shortcuts off: `Service.fast` = FAST_NONE
(dispatch through `_start`'s general branches instead of the one its VS kind allows) and the
connection pools' `parse_all` set (every response through the parser, as one that came in
pieces would, instead of upstream.py's `_fast_response`). The stats (timings aside) and the
access-log lines (timestamp and duration aside) must be equal, every `pick()` released, and each
run must really have taken its path.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterator
from typing import Any

import pytest

from lbproxy.config.model import ContentRule, MatchType, SubVS, VirtualService
from lbproxy.proxy import DataPlane
from lbproxy.proxy import dataplane as dataplane_module
from lbproxy.proxy.service import FAST_DIRECT, FAST_NONE, FAST_ROUTE, Service

from .conftest import NO_CHECK, Client, RawUpstream, build, make_vs, read_head, serve, servers

T = 10
MAX_EXCHANGES = 64  # per upstream connection of the scripted real server


def _response(method: str, target: str, body: bytes) -> bytes:
    """The scripted real server's answer: one write, fixed bytes (no Date), keep-alive."""
    if target.startswith("/chunked"):
        return (b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nTransfer-Encoding: chunked\r\n"
                b"\r\n5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n")
    status, reason = ((404, "Not Found") if target.startswith("/missing")
                      else (201, "Created") if method == "POST" else (200, "OK"))
    payload = f"{method} {target} {len(body)} {body[:8].decode('latin-1')}\n".encode()
    head = (f"HTTP/1.1 {status} {reason}\r\nContent-Type: text/plain\r\n"
            f"Content-Length: {len(payload)}\r\nConnection: keep-alive\r\n\r\n").encode()
    return head if method == "HEAD" else head + payload


async def _read_body(r: asyncio.StreamReader, fields: dict[str, str]) -> bytes:
    if "content-length" in fields:
        return await r.readexactly(int(fields["content-length"]))
    if fields.get("transfer-encoding", "").lower() != "chunked":
        return b""
    parts = []
    for _ in range(MAX_EXCHANGES):
        size = int((await r.readuntil(b"\r\n")).split(b";")[0], 16)
        if size == 0:
            await r.readuntil(b"\r\n")
            break
        parts.append(await r.readexactly(size))
        await r.readexactly(2)
    return b"".join(parts)


async def _serve_script(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
    for _ in range(MAX_EXCHANGES):
        try:
            head = await read_head(r)
        except asyncio.IncompleteReadError:
            return
        lines = head.decode("latin-1").split("\r\n")
        method, target, _ = lines[0].split(" ")
        fields = {}
        for line in lines[1:]:
            if line:
                k, _, v = line.partition(":")
                fields[k.strip().lower()] = v.strip()
        body = await _read_body(r, fields)
        w.write(_response(method, target, body))
        await w.drain()


async def _traffic(port: int, switched: bool) -> list[tuple[int, bytes]]:
    """Every shape of exchange the two paths share; what the client got, in order."""
    got: list[tuple[int, bytes]] = []
    async with asyncio.timeout(T):
        c = await Client.connect(port)
        for method, path, body in (("GET", "/a", None), ("GET", "/missing?q=1", None),
                                   ("HEAD", "/c", None), ("POST", "/d", b"p" * 300),
                                   ("GET", "/chunked", None), ("GET", "/a", None)):
            r = await c.request(method, path, body=body)
            got.append((r.status, r.body))
        # A chunked upload, then two requests pipelined in one write.
        await c.send(build("POST", "/up", headers=(("Transfer-Encoding", "chunked"),)) +
                     b"4\r\nabcd\r\n0\r\n\r\n" + build("GET", "/f") + build("GET", "/g?x"))
        for _ in range(3):
            r = await c.response()
            got.append((r.status, r.body))
        # Expect: 100-continue: the body goes once the proxy says so.
        await c.send(build("POST", "/e", headers=(("Expect", "100-continue"),
                                                  ("Content-Length", "5"))))
        r = await c.response()
        got.append((r.status, r.body))
        await c.send(b"hello")
        r = await c.response()
        got.append((r.status, r.body))
        r = await c.request("GET", "/last", headers=(("Connection", "close"),))
        got.append((r.status, r.body))
        assert await c.closed()
        # HTTP/1.0 without Host: goes upstream as HTTP/1.1 with one; the connection then ends.
        c = await Client.connect(port)
        await c.send(b"GET /ten HTTP/1.0\r\n\r\n")
        r = await c.response()
        got.append((r.status, r.body))
        assert await c.closed()
        if switched:  # a request the rules refuse: answered here, 403 and close
            c = await Client.connect(port)
            r = await c.request("GET", "/admin/x")
            got.append((r.status, r.body))
            assert await c.closed()
    return got


def _vs(port: int, switched: bool) -> tuple[VirtualService, tuple[ContentRule, ...]]:
    if not switched:
        return make_vs(ports=(port,)), ()
    rules = (ContentRule("admin", MatchType.PREFIX, "/admin", fail_on_match=True),
             ContentRule("app", MatchType.PREFIX, "/"))
    return make_vs(subvs=(SubVS("app", real_servers=servers(port), rules=("admin", "app"),
                                health_check=NO_CHECK),),
                   content_switching=True), rules


def _timeless(stats: dict[str, Any]) -> dict[str, Any]:
    """stats() without what timing decides: latency distribution, the listen port, connections
    the proxy has not yet seen close. Latency counts stay."""
    out: dict[str, Any] = {}
    for k, v in stats.items():
        if k in ("latency", "latency_buckets", "latency_sum", "listen"):
            continue
        if k == "connections":
            v = {"total": v["total"], "refused": v["refused"]}
        out[k] = _timeless(v) if isinstance(v, dict) else (
            [_timeless(x) if isinstance(x, dict) else x for x in v] if isinstance(v, list) else v)
    return out


def _line_shape(line: str) -> str:
    """An access-log line without its timestamp and duration (checked to be there)."""
    parts = line.split(" ")
    ms = -2 if parts[-1] == "cut" else -1
    assert float(parts[ms]) >= 0, line
    parts[ms] = "<ms>"
    return " ".join(parts[1:])


@pytest.fixture
def access_lines() -> Iterator[list[str]]:
    lines: list[str] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            lines.extend(record.getMessage().split("\n"))

    log = logging.getLogger("lbproxy.access")
    handler = Keep()
    old = (log.level, log.propagate)
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    log.propagate = False
    yield lines
    log.removeHandler(handler)
    log.setLevel(old[0])
    log.propagate = old[1]


async def _run(up_port: int, switched: bool, lines: list[str], parse_all: bool
               ) -> tuple[list[tuple[int, bytes]], dict[str, Any], list[str], int]:
    """The traffic through a fresh DataPlane: what the client got, stats, log lines, and how
    many responses were relayed whole (none with `parse_all`: every one through the parser)."""
    vs, rules = _vs(up_port, switched)
    dp = DataPlane()
    try:
        ports = await serve(dp, vs, rules=rules)
        for cp in dp._conn_pools.values():
            cp.parse_all = parse_all
        del lines[:]
        got = await _traffic(ports["web"], switched)
        return got, dp.stats(), list(lines), sum(cp.whole for cp in dp._conn_pools.values())
    finally:
        await dp.shutdown(0.5)


@pytest.mark.parametrize("switched", [False, True], ids=["real-servers", "content-switching"])
async def test_fast_and_general_paths_count_and_log_alike(
        switched: bool, access_lines: list[str], monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.ERROR, logger="lbproxy.proxy.balancer")
    real_build = dataplane_module.build_service
    kinds: list[int] = []  # Service.fast of each Service built, in order
    general = False

    def building(*a: Any, **kw: Any) -> Service:
        svc = real_build(*a, **kw)
        if general:
            svc.fast = FAST_NONE
        kinds.append(svc.fast)
        return svc

    monkeypatch.setattr(dataplane_module, "build_service", building)
    async with RawUpstream(_serve_script) as up:
        got, stats, lines, relayed_whole = await _run(up.port, switched, access_lines, False)
        general = True
        g_got, g_stats, g_lines, g_whole = await _run(up.port, switched, access_lines, True)

    # Each run took its path: the shortcut dispatch and whole-response relay, or neither.
    assert kinds == [FAST_ROUTE if switched else FAST_DIRECT, FAST_NONE]
    # Ten responses have a body and come in one write; a read split by the kernel would send one
    # through the parser, which the comparison below must not notice either.
    assert relayed_whole >= 9 and g_whole == 0, (relayed_whole, g_whole)
    # The client saw the same answers.
    statuses = [s for s, _ in got]
    assert statuses == [s for s, _ in g_got]
    assert [b for _, b in got] == [b for _, b in g_got]
    assert statuses[:6] == [200, 404, 200, 201, 200, 200] and 100 in statuses
    # The same stats, timings aside.
    assert _timeless(stats) == _timeless(g_stats)
    web = stats["virtual_services"]["web"]
    n = len(got) - 1  # the 100 Continue is not a request of its own
    assert web["requests"] == n and web["latency_count"] == n
    assert sum(web["responses"].values()) == n
    rs = (web["subvs"]["app"] if switched else web)["real_servers"]
    assert len(rs) == 1 and rs[0]["active"] == 0 and rs[0]["failures"] == 0
    assert rs[0]["requests"] == n - switched  # the refused one never reached the balancer
    # The same access-log lines, timestamps and durations aside.
    assert len(lines) == n, lines
    assert [_line_shape(x) for x in lines] == [_line_shape(x) for x in g_lines]
    assert '"GET /missing?q=1" 404' in lines[1] and lines[1].split(" ")[2] == (
        "app" if switched else "-")
    # Every pick() was matched by one release().
    assert "without a matching pick" not in caplog.text
