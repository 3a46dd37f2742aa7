"""Upstream connection pools, flow control against a stalled client, access log, stats."""

from __future__ import annotations

import asyncio
import gc
import json
import logging
import tracemalloc
from pathlib import Path

import pytest

from lbproxy.accesslog import ACCESS_LOGGER, BufferedFileHandler, configure_access_log
from lbproxy.config.model import AccessLogSettings, Timeouts
from lbproxy.proxy import DataPlane

from .conftest import Client, RawUpstream, Upstream, build, make_vs, read_head, serve

T = 10


async def test_stale_pooled_connection_is_retried(dataplane: DataPlane) -> None:
    """A server that closes a kept-alive connection just as a request arrives costs no error."""

    async def handler(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        first = raw.connections == 1
        await read_head(r)
        w.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        await w.drain()
        await read_head(r)
        if first:
            return  # closes without answering the second request
        w.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        await w.drain()
        await r.read()

    async with RawUpstream(handler) as raw, asyncio.timeout(T):
        ports = await serve(dataplane, make_vs(ports=(raw.port,)))
        c = await Client.connect(ports["web"])
        assert (await c.request()).body == b"ok"
        r = await c.request()
        assert r.status == 200 and r.body == b"ok"
        assert raw.connections == 2
        c.close()


async def test_idle_upstream_connections_expire(dataplane: DataPlane, upstream: Upstream) -> None:
    ports = await serve(dataplane, make_vs(ports=(upstream.port,),
                                           timeouts=Timeouts(upstream_idle=0.1)))
    async with asyncio.timeout(T):
        c = await Client.connect(ports["web"])
        assert (await c.request()).status == 200
        pools = dataplane.stats()["upstream_pools"]
        assert [p["idle"] for p in pools.values()] == [1]
        for _ in range(200):  # the sweep runs every 25 ms here; no event tells when it did
            if [p["idle"] for p in dataplane.stats()["upstream_pools"].values()] == [0]:
                break
            await asyncio.sleep(0.02)
        assert [p["idle"] for p in dataplane.stats()["upstream_pools"].values()] == [0]
        assert (await c.request()).status == 200
        c.close()
    assert len(upstream.peers) == 2


async def test_stalled_client_pauses_the_real_server(dataplane: DataPlane,
                                                     upstream: Upstream) -> None:
    size = 64 * 1024 * 1024
    ports = await serve(dataplane, make_vs(ports=(upstream.port,)))
    gc.collect()
    tracemalloc.start()
    try:
        async with asyncio.timeout(30):
            c = await Client.connect(ports["web"])
            await c.send(build(path=f"/big?n={size}&cl=1"))
            await asyncio.sleep(0.5)  # read nothing: every buffer on the way fills up
            held, _ = tracemalloc.get_traced_memory()
            head = await read_head(c.r)
            assert b"Content-Length: %d" % size in head
            got = 0
            while got < size:
                got += len(await c.r.read(1 << 20))
            assert got == size
            c.close()
    finally:
        tracemalloc.stop()
    # Socket buffers hold some of it; the proxy holds at most its high-water marks.
    assert held < 8 * 1024 * 1024, held


def access_lines(caplog: pytest.LogCaptureFixture) -> list[str]:
    """The access lines logged so far. A line is handed to logging in the loop pass that writes
    its response (AccessLog.flush is scheduled right after the outbox), so once a client has read
    a response, its line is here: no waiting."""
    return [line for r in caplog.records if r.name == "lbproxy.access"
            for line in r.getMessage().split("\n")]


async def test_access_log_lines(dataplane: DataPlane, upstream: Upstream,
                                caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="lbproxy.access")
    ports = await serve(dataplane, make_vs(ports=(upstream.port,)))
    async with asyncio.timeout(T):
        c = await Client.connect(ports["web"])
        for i in range(3):
            assert (await c.request(path=f"/log{i}?q=1")).status == 200
        assert (await c.request(path="/status/404")).status == 404
        c.close()
    lines = access_lines(caplog)
    assert len(lines) == 4
    server = f"127.0.0.1:{upstream.port}"
    for i in range(3):
        parts = lines[i].split(" ")
        assert parts[1:5] == ["web", "-", server, "127.0.0.1"]
        assert parts[5:7] == ['"GET', f'/log{i}?q=1"']
        assert parts[7] == "200" and int(parts[8]) > 0 and float(parts[9]) >= 0
    assert lines[3].split(" ")[7] == "404"



async def test_access_log_file_gets_the_batches_whole(dataplane: DataPlane, upstream: Upstream,
                                                      tmp_path: Path) -> None:
    """With the file handler alone, batches are written to it directly (no LogRecord); with a
    second handler beside it, through logging to both. Either way: one line per request."""
    seen: list[str] = []

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            seen.extend(record.getMessage().split("\n"))

    path = tmp_path / "access.log"
    access = logging.getLogger(ACCESS_LOGGER)
    saved = access.handlers[:], access.level, access.propagate
    configure_access_log(AccessLogSettings(enabled=True, path=str(path)), tmp_path)
    (handler,) = access.handlers
    assert isinstance(handler, BufferedFileHandler)
    try:
        ports = await serve(dataplane, make_vs(ports=(upstream.port,)))
        async with asyncio.timeout(T):
            c = await Client.connect(ports["web"])
            for i in range(3):  # the line is batched before the response goes out
                assert (await c.request(path=f"/direct{i}")).status == 200
            access.addHandler(Collect())
            for i in range(2):
                assert (await c.request(path=f"/both{i}")).status == 200
            c.close()
        handler.flush()
        lines = path.read_text().splitlines()
        assert [ln.split(" ")[6] for ln in lines] == [
            '/direct0"', '/direct1"', '/direct2"', '/both0"', '/both1"']
        assert [ln.split(" ")[6] for ln in seen] == ['/both0"', '/both1"']
    finally:
        configure_access_log(AccessLogSettings(enabled=False), tmp_path)  # closes the file
        access.handlers[:] = saved[0]
        access.setLevel(saved[1])  # setLevel, not .level: it clears logging's enabled cache
        access.propagate = saved[2]


async def test_access_log_follows_the_server_on_one_connection(
        dataplane: DataPlane, upstream: Upstream, upstream2: Upstream,
        caplog: pytest.LogCaptureFixture) -> None:
    """The constant part of a line is kept per connection: it follows the real server when
    round robin alternates them under one keep-alive connection."""
    caplog.set_level(logging.INFO, logger="lbproxy.access")
    ports = await serve(dataplane, make_vs(ports=(upstream.port, upstream2.port)))
    async with asyncio.timeout(T):
        c = await Client.connect(ports["web"])
        for i in range(4):
            assert (await c.request(method="PROPFIND" if i == 3 else "GET",
                                    path=f"/rr{i}")).status in (200, 405)
        c.close()
    lines = access_lines(caplog)
    assert len(lines) == 4
    servers = [line.split(" ")[3] for line in lines]
    assert set(servers) == {f"127.0.0.1:{upstream.port}", f"127.0.0.1:{upstream2.port}"}
    assert servers[0] != servers[1] and servers[0] == servers[2]
    assert [line.split(" ")[5] for line in lines] == ['"GET'] * 3 + ['"PROPFIND']


async def test_stats_are_json(dataplane: DataPlane, upstream: Upstream) -> None:
    ports = await serve(dataplane, make_vs(ports=(upstream.port,)))
    async with asyncio.timeout(T):
        c = await Client.connect(ports["web"])
        assert (await c.request()).status == 200
        stats = json.loads(json.dumps(dataplane.stats()))
        web = stats["virtual_services"]["web"]
        assert web["listen"] == f"127.0.0.1:{ports['web']}"
        assert web["connections"]["active"] == 1
        assert web["requests"] == 1
        assert web["real_servers"][0]["requests"] == 1
        assert web["real_servers"][0]["healthy"] is True
        c.close()


async def test_health_check_takes_a_dead_server_out(dataplane: DataPlane,
                                                    upstream: Upstream) -> None:
    import socket

    from lbproxy.config.model import HealthCheck, HealthCheckType

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        dead = s.getsockname()[1]
    check = HealthCheck(type=HealthCheckType.TCP, interval=0.05, timeout=0.5, rise=1, fall=1)
    ports = await serve(dataplane, make_vs(ports=(dead, upstream.port), health_check=check))
    async with asyncio.timeout(T):
        for _ in range(200):  # until the first probe of the dead server has answered
            servers = dataplane.stats()["virtual_services"]["web"]["real_servers"]
            if not servers[0]["healthy"]:
                break
            await asyncio.sleep(0.02)
        assert not servers[0]["healthy"]
        c = await Client.connect(ports["web"])
        for _ in range(6):
            assert (await c.request()).json()["port"] == upstream.port
        c.close()
    servers = dataplane.stats()["virtual_services"]["web"]["real_servers"]
    assert servers[0]["failures"] == 0 and servers[1]["requests"] == 6


async def test_half_closed_client_still_gets_its_answer(dataplane: DataPlane,
                                                        upstream: Upstream) -> None:
    ports = await serve(dataplane, make_vs(ports=(upstream.port,)))
    async with asyncio.timeout(T):
        c = await Client.connect(ports["web"])
        await c.send(build(path="/slow?d=0.1"))
        c.w.write_eof()
        r = await c.response()
        assert r.status == 200 and r.body == b"slow"
        assert await c.closed()


async def test_client_gone_mid_response_frees_everything(dataplane: DataPlane,
                                                         upstream: Upstream) -> None:
    ports = await serve(dataplane, make_vs(ports=(upstream.port,)))
    async with asyncio.timeout(T):
        c = await Client.connect(ports["web"])
        await c.send(build(path=f"/big?n={32 * 1024 * 1024}&cl=1"))
        await read_head(c.r)
        await c.r.readexactly(100_000)
        c.w.transport.abort()
        for _ in range(200):  # no event tells when the proxy noticed; bounded
            web = dataplane.stats()["virtual_services"]["web"]
            if web["connections"]["active"] == 0:
                break
            await asyncio.sleep(0.01)
        assert web["connections"]["active"] == 0
        assert web["real_servers"][0]["active"] == 0
        # The half-read upstream connection was closed, not pooled: a new request works.
        c2 = await Client.connect(ports["web"])
        assert (await c2.request(path="/after")).json()["path"] == "/after"
        c2.close()
