"""The TLS transport on the socket itself (proxy/tlssock.py), driven by real TLS clients over
loopback: bytes both ways whole and in order through OpenSSL's would-block paths, flow control,
close after the last byte, end of input, and handshakes that fail, stall or outlive their server."""

from __future__ import annotations

import asyncio
import hashlib
import socket
import ssl
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import pytest
import trustme

from lbproxy.proxy.tlssock import TLSSocketTransport, start_tls

T = 10


class Recorder(asyncio.Protocol):
    """Records what the transport does to it; `echo` sends every byte back."""

    def __init__(self, echo: bool = False, keep_on_eof: bool = False,
                 crash: bool = False) -> None:
        self.echo = echo
        self.crash = crash
        self.keep_on_eof = keep_on_eof
        self.transport: Any = None
        self.data = bytearray()
        self.paused = 0
        self.resumed = 0
        self.eof = asyncio.Event()
        self.lost = asyncio.Event()
        self.arrived = asyncio.Condition()

    async def received(self, data: bytes) -> None:
        """Until the bytes read so far are `data`."""
        async with self.arrived:
            await self.arrived.wait_for(lambda: bytes(self.data) == data)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        if self.crash:
            raise RuntimeError("a bug in the protocol")
        self.data += data
        if self.echo:
            self.transport.write(data)
        asyncio.get_running_loop().create_task(self._notify())

    async def _notify(self) -> None:
        async with self.arrived:
            self.arrived.notify_all()

    def eof_received(self) -> bool:
        self.eof.set()
        return self.keep_on_eof

    def pause_writing(self) -> None:
        self.paused += 1

    def resume_writing(self) -> None:
        self.resumed += 1

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost.set()


@dataclass
class Site:
    port: int
    client_ctx: ssl.SSLContext
    options: dict[str, bool] = field(default_factory=dict)  # for the next Recorder
    protocols: list[Recorder] = field(default_factory=list)
    made: asyncio.Event = field(default_factory=asyncio.Event)
    accepted: asyncio.Event = field(default_factory=asyncio.Event)
    handshakes: set[TLSSocketTransport] = field(default_factory=set)
    transports: list[TLSSocketTransport] = field(default_factory=list)


@pytest.fixture
async def site() -> AsyncIterator[Site]:
    """A listening socket whose connections get TLSSocketTransport (handshake timeout 0.5 s) and
    a Recorder each (made with `options`)."""
    ca = trustme.CA()
    server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ca.issue_cert("tls.test").configure_cert(server_ctx)
    client_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ca.configure_trust(client_ctx)
    loop = asyncio.get_running_loop()
    lsock = socket.socket()
    lsock.bind(("127.0.0.1", 0))
    lsock.listen(16)
    lsock.setblocking(False)
    s = Site(lsock.getsockname()[1], client_ctx)

    def make() -> Recorder:
        p = Recorder(**s.options)
        s.protocols.append(p)
        s.made.set()
        return p

    def accept() -> None:
        conn, addr = lsock.accept()
        conn.setblocking(False)
        # Small kernel buffers: a few hundred KiB make SSL_write block (the paths under test).
        conn.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 16384)
        t = start_tls(loop, conn, addr, server_ctx, make, 0.5, s.handshakes)
        if t is not None:
            s.transports.append(t)
        s.accepted.set()

    loop.add_reader(lsock.fileno(), accept)
    yield s
    loop.remove_reader(lsock.fileno())
    lsock.close()
    for t in s.transports:
        t.abort()


async def connect(s: Site, **options: bool
                  ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter, Recorder]:
    """A TLS client, once the server side has its protocol."""
    s.options = options
    r, w = await asyncio.open_connection("127.0.0.1", s.port, ssl=s.client_ctx,
                                         server_hostname="tls.test")
    await s.made.wait()
    return r, w, s.protocols[-1]


async def test_megabytes_both_ways_whole_in_order_with_flow_control(site: Site) -> None:
    """4 MiB echoed while the client does not read: SSL_write would block, the rest is kept in
    order, the protocol is paused above the high-water mark and resumed once all is sent."""
    payload = bytes(range(256)) * (4 * 4096)  # 4 MiB
    async with asyncio.timeout(T):
        r, w, proto = await connect(site, echo=True)
        w.write(payload)
        await w.drain()
        await proto.received(payload)  # the server read it all
        assert proto.transport.get_write_buffer_size() > 0  # the client has not read yet
        got = await r.readexactly(len(payload))
    assert hashlib.sha256(got).digest() == hashlib.sha256(payload).digest()
    assert proto.paused >= 1 and proto.resumed == proto.paused
    assert proto.transport.get_write_buffer_size() == 0
    w.close()


async def test_close_sends_everything_then_close_notify(site: Site) -> None:
    async with asyncio.timeout(T):
        r, w, proto = await connect(site)
        proto.transport.write(b"a" * 300_000)
        proto.transport.write(b"end")
        proto.transport.close()
        assert proto.transport.is_closing()
        got = await r.read()  # to EOF: a clean TLS close (close_notify), not a reset
        await proto.lost.wait()
    assert got == b"a" * 300_000 + b"end"
    w.close()


async def test_the_clients_close_is_end_of_input(site: Site) -> None:
    async with asyncio.timeout(T):
        _r, w, proto = await connect(site)
        w.write(b"bye")
        await w.drain()
        w.close()
        await proto.eof.wait()
        await proto.lost.wait()  # eof_received returned false: closed
    assert bytes(proto.data) == b"bye"


async def test_a_tcp_fin_is_end_of_input_too(site: Site) -> None:
    """A client that shuts down its sending side without close_notify: eof_received, then the
    connection closes even though the protocol asked to keep it (OpenSSL writes nothing more)."""
    async with asyncio.timeout(T):
        _r, w, proto = await connect(site, keep_on_eof=True)
        w.write(b"question")
        await w.drain()
        await proto.received(b"question")
        w.get_extra_info("socket").shutdown(socket.SHUT_WR)
        await proto.eof.wait()
        await proto.lost.wait()
    w.close()


async def test_pause_and_resume_reading(site: Site) -> None:
    async with asyncio.timeout(T):
        _r, w, proto = await connect(site)
        w.write(b"one")
        await proto.received(b"one")
        proto.transport.pause_reading()
        assert not proto.transport.is_reading()
        w.write(b"two")
        await w.drain()
        # Round trips of the loop while paused: nothing is read.
        for _ in range(20):
            await asyncio.sleep(0)
        assert bytes(proto.data) == b"one"
        proto.transport.resume_reading()
        await proto.received(b"onetwo")
    w.close()


async def test_a_handshake_that_never_comes_is_closed_at_its_timeout(site: Site) -> None:
    async with asyncio.timeout(T):
        r, w = await asyncio.open_connection("127.0.0.1", site.port)  # plain TCP, silent
        assert await r.read() == b""  # closed by the server (after 0.5 s)
    assert site.protocols == [] and not site.handshakes
    w.close()


async def test_not_tls_is_refused_without_a_protocol(site: Site) -> None:
    async with asyncio.timeout(T):
        r, w = await asyncio.open_connection("127.0.0.1", site.port)
        w.write(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        try:
            rest = await r.read()
        except ConnectionResetError:
            rest = b""
        assert b"HTTP/1.1 " not in rest
    assert site.protocols == [] and not site.handshakes
    w.close()


async def test_a_server_that_closes_ends_the_handshakes_in_progress(site: Site) -> None:
    async with asyncio.timeout(T):
        r, w = await asyncio.open_connection("127.0.0.1", site.port)
        w.write(b"\x16")  # a record's first byte: the handshake waits for the rest
        await w.drain()
        await site.accepted.wait()
        assert site.handshakes
        for t in list(site.handshakes):
            t.abort_handshake()
        try:
            assert await r.read() == b""
        except ConnectionResetError:  # closed with the client's byte unread: a reset
            pass
    assert site.protocols == []
    w.close()


async def test_extra_info(site: Site) -> None:
    async with asyncio.timeout(T):
        _r, w, proto = await connect(site)
    t = proto.transport
    assert t.get_extra_info("peername") == w.get_extra_info("sockname")
    assert t.get_extra_info("sockname") == ("127.0.0.1", site.port)
    assert t.get_extra_info("ssl_object").version() in ("TLSv1.2", "TLSv1.3")
    assert t.get_extra_info("cipher") is not None
    assert t.get_extra_info("nothing", 7) == 7
    w.close()


async def test_a_protocol_that_raises_ends_its_connection_only(site: Site,
                                                              caplog: pytest.LogCaptureFixture
                                                              ) -> None:
    async with asyncio.timeout(T):
        r1, w1, bad = await connect(site, crash=True)
        site.made.clear()
        r2, w2, _good = await connect(site, echo=True)
        w1.write(b"boom")
        try:
            assert await r1.read() == b""  # aborted
        except ConnectionResetError:
            pass
        await bad.lost.wait()
        w2.write(b"still here")
        assert await r2.readexactly(10) == b"still here"
    assert "data_received failed" in caplog.text
    w1.close()
    w2.close()
