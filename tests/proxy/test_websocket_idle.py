"""An upgraded connection (WebSocket after the real server's 101) has its own idle deadline,
[vs.timeouts] websocket_idle, instead of the keep-alive `idle`: a quiet tunnel outlives `idle`,
and one quiet past `websocket_idle` is closed on both sides."""

from __future__ import annotations

import asyncio
import contextlib
import time

import pytest

from lbproxy.config import parse_config
from lbproxy.config.model import Timeouts
from lbproxy.errors import ConfigError
from lbproxy.proxy import DataPlane

from .conftest import Client, RawUpstream, make_vs, read_head, serve

IDLE = 0.2        # keep-alive idle: a tunnel quiet this long must stay open
WS_IDLE = 1.5     # the tunnel's own idle deadline
T = 15.0          # bound on every wait of a test

UPGRADE = (b"GET /chat HTTP/1.1\r\nHost: example.com\r\nConnection: Upgrade\r\n"
           b"Upgrade: websocket\r\nSec-WebSocket-Version: 13\r\n"
           b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n")
SWITCHING = (b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
             b"Sec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n\r\n")


class EchoAfter101:
    """A real server answering an upgrade with 101, then echoing the tunnel's bytes until the
    proxy closes its side (`closed` is set then, `closed_at` is its time.monotonic()); other
    requests get a 200."""

    def __init__(self) -> None:
        self.closed = asyncio.Event()
        self.closed_at = 0.0

    async def __call__(self, r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        while b"upgrade: websocket" not in (await read_head(r)).lower():
            w.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
            await w.drain()
        try:
            w.write(SWITCHING)
            await w.drain()
            while data := await r.read(65536):
                w.write(data)
                await w.drain()
        finally:
            self.closed_at = time.monotonic()
            self.closed.set()


async def _tunnel(port: int) -> Client:
    c = await Client.connect(port)
    await c.send(UPGRADE)
    r = await c.response()
    assert r.status == 101
    return c


async def _stays_open(c: Client, seconds: float) -> bool:
    """True if nothing arrives and the connection is not closed for `seconds`."""
    read = asyncio.create_task(c.r.read(1))
    done, _ = await asyncio.wait({read}, timeout=seconds)
    read.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await read
    return not done


async def _echo(c: Client, data: bytes) -> None:
    await c.send(data)
    assert await c.r.readexactly(len(data)) == data


async def test_a_quiet_tunnel_outlives_idle_and_closes_after_websocket_idle(
        dataplane: DataPlane) -> None:
    backend = EchoAfter101()
    async with RawUpstream(backend) as up:
        ports = await serve(dataplane, make_vs(
            ports=(up.port,), timeouts=Timeouts(idle=IDLE, websocket_idle=WS_IDLE)))
        async with asyncio.timeout(T):
            # A keep-alive connection with nothing to do is closed after `idle`: the deadline
            # this test compares against is really that short.
            plain = await Client.connect(ports["web"])
            assert (await plain.request()).status == 200
            t0 = time.monotonic()
            assert await plain.closed()
            assert time.monotonic() - t0 < WS_IDLE
            plain.close()

            c = await _tunnel(ports["web"])
            await _echo(c, b"hello")
            # Quiet for 4 x idle (still well inside websocket_idle): the tunnel is open, and
            # both directions still carry bytes.
            assert await _stays_open(c, 4 * IDLE), "the tunnel closed while quiet for 4 x idle"
            assert not backend.closed.is_set()
            await _echo(c, b"still here")

            # Then quiet for good: the proxy closes the client side and the real server's.
            last = time.monotonic()
            assert await c.closed()
            waited = time.monotonic() - last
            await backend.closed.wait()
            assert WS_IDLE * 0.9 <= waited, f"closed after {waited:.2f} s, before websocket_idle"
            assert backend.closed_at - last >= WS_IDLE * 0.9
            c.close()
    limits = dataplane.stats()["virtual_services"]["web"]["limit_rejections"]
    assert limits["idle_timeout"] == 2  # the plain connection and the tunnel


async def test_traffic_keeps_a_tunnel_open_past_websocket_idle(dataplane: DataPlane) -> None:
    backend = EchoAfter101()
    async with RawUpstream(backend) as up:
        ports = await serve(dataplane, make_vs(
            ports=(up.port,), timeouts=Timeouts(idle=IDLE, websocket_idle=0.6)))
        async with asyncio.timeout(T):
            c = await _tunnel(ports["web"])
            start = time.monotonic()
            n = 0
            # A message every 0.2 s for 3 x websocket_idle: each one pushes the deadline back.
            while time.monotonic() - start < 1.8:
                await _echo(c, b"m%d" % n)
                n += 1
                assert await _stays_open(c, 0.2), (
                    f"the tunnel closed after {time.monotonic() - start:.2f} s")
            assert not backend.closed.is_set()
            c.close()
            await backend.closed.wait()


def test_websocket_idle_config_key() -> None:
    vs = ('[[vs]]\nname = "w"\nlisten = "127.0.0.1:8080"\n'
          'real_servers = [{ address = "127.0.0.1:9000" }]\n')
    assert parse_config(vs).virtual_services[0].timeouts.websocket_idle == 3600.0
    cfg = parse_config(vs + "[vs.timeouts]\nwebsocket_idle = 86400\nidle = 30\n")
    assert cfg.virtual_services[0].timeouts.websocket_idle == 86400.0
    assert cfg.virtual_services[0].timeouts.idle == 30.0
    with pytest.raises(ConfigError) as e:
        parse_config(vs + "[vs.timeouts]\nwebsocket_idle = 0\n")
    assert "websocket_idle" in str(e.value.problems[0])
