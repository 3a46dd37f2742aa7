"""Property test of the client-side request parser (httptools glue + our checks), in-process with
fake transports: any bytes, and valid requests mutated byte by byte, never raise out of the
protocol, never hang, and end in either forwarded requests that a strict parser accepts or a clean
error answer (4xx/5xx, connection closed)."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Iterator
from typing import Any

import httptools
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lbproxy.config.model import Address, Limits, RealServer
from lbproxy.proxy.client import ClientConnection
from lbproxy.proxy.connpool import PoolKey
from lbproxy.proxy.counters import Counters
from lbproxy.proxy.outbox import Outbox
from lbproxy.proxy.service import Listener, PoolFactory, build_service
from lbproxy.proxy.upstream import UpstreamConnection

from ..proxy.conftest import NO_CHECK, make_vs

OK = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"


class FakeTransport:
    def __init__(self) -> None:
        self.data = bytearray()
        self.closed = False

    def write(self, d: bytes) -> None:
        assert not self.closed or True
        self.data += d

    def get_extra_info(self, key: str, default: Any = None) -> Any:
        return ("127.0.0.1", 40000) if key == "peername" else default

    def set_write_buffer_limits(self, *a: Any) -> None:
        pass

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass

    def is_closing(self) -> bool:
        return self.closed

    def close(self) -> None:
        self.closed = True

    def abort(self) -> None:
        self.closed = True


class Rig:
    """One client connection of a VS whose real server is one pooled fake upstream connection."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        vs = make_vs(real_servers=(RealServer(Address("127.0.0.1", 9)),),
                     health_check=NO_CHECK, limits=Limits(max_body=4096))
        outbox = Outbox(loop)  # one for the client and upstream sides, as in the DataPlane
        factory = PoolFactory(loop, {}, {}, {}, lambda b, c, label: None, outbox)  # type: ignore[arg-type,return-value]
        svc = build_service(vs, {}, (), factory, Counters(), None, 80)
        self.listener = Listener(loop, ("fuzz",), svc, svc.counters, outbox)
        self.client = ClientConnection(self.listener)
        self.ct = FakeTransport()
        self.client.connection_made(self.ct)  # type: ignore[arg-type]
        self.cp = factory.conn_pools[PoolKey("127.0.0.1", 9)]
        self.ups: list[tuple[UpstreamConnection, FakeTransport]] = []
        self.add_upstream()

    def add_upstream(self) -> None:
        up = UpstreamConnection(self.cp)
        ut = FakeTransport()
        up.connection_made(ut)  # type: ignore[arg-type]
        self.cp.release(up, self.cp.loop.time())
        self.ups.append((up, ut))

    def feed(self, data: bytes) -> None:
        """Feed `data`, answering each request that reached the fake upstream (bounded)."""
        while len(self.cp.idle) < 4:  # pipelined requests find pooled connections, no connect
            self.add_upstream()
        self.client.data_received(data)
        for _ in range(64):
            answered = False
            for up, ut in self.ups:
                if up.req is not None and ut.data and not ut.closed:
                    up.data_received(OK)
                    answered = True
            if not answered:
                break
            if self.ct.closed:
                break
            while len(self.cp.idle) < 4:
                self.add_upstream()


@pytest.fixture(scope="module")
def loop() -> Iterator[asyncio.AbstractEventLoop]:
    lp = asyncio.new_event_loop()
    yield lp
    lp.close()


def _strict_requests(data: bytes) -> int:
    """Parse what went upstream with a fresh strict parser; the number of complete requests."""
    done = 0

    class P:
        def on_message_complete(self) -> None:
            nonlocal done
            done += 1

    httptools.HttpRequestParser(P()).feed_data(data)  # raises on anything malformed
    return done


def _check(rig: Rig) -> None:
    out = bytes(rig.ct.data)
    if out:
        assert out.startswith(b"HTTP/1.1 "), out[:40]
    for _, ut in rig.ups:
        if ut.data and not ut.closed:
            # Everything forwarded in full is canonical HTTP/1.1 a strict parser takes.
            _strict_requests(bytes(ut.data))
    if rig.client.closed or rig.ct.closed:
        return
    statuses = [int(line[9:12]) for line in out.split(b"\r\n") if line.startswith(b"HTTP/1.1 ")]
    for s in statuses:
        if s >= 400 and s not in (502, 503):
            assert rig.ct.closed, f"{s} answered but the connection stays open"


GOOD = (b"GET /a?b=1 HTTP/1.1\r\nHost: example.com\r\nX-A: 1\r\n\r\n",
        b"POST /p HTTP/1.1\r\nHost: example.com\r\nContent-Length: 5\r\n\r\nhello",
        b"POST /c HTTP/1.1\r\nHost: example.com\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"5\r\nhello\r\n0\r\n\r\n",
        b"GET / HTTP/1.0\r\n\r\n",
        b"GET http://example.com/x HTTP/1.1\r\nHost: example.com\r\n\r\n",
        b"OPTIONS * HTTP/1.1\r\nHost: example.com\r\nConnection: close, X-A\r\n\r\n")
SPICE = (b"\r", b"\n", b"\r\n", b" ", b"\t", b":", b"\x00", b"\x7f", b"\xff", b",", b";",
         b"Transfer-Encoding: chunked\r\n", b"Content-Length: 3\r\n", b"Host: b\r\n",
         b"0\r\n\r\n", b"HTTP/1.1", b"chunked", b"-1", b"ffffffff")


@st.composite
def mutated(draw: st.DrawFn) -> list[bytes]:
    data = bytearray(b"".join(draw(st.lists(st.sampled_from(GOOD), min_size=1, max_size=3))))
    for _ in range(draw(st.integers(0, 4))):
        i = draw(st.integers(0, len(data)))
        op = draw(st.integers(0, 2))
        if op == 0 and i < len(data):
            del data[i]
        elif op == 1:
            data[i:i] = draw(st.sampled_from(SPICE))
        elif i < len(data):
            data[i] = draw(st.integers(0, 255))
    cuts = sorted(draw(st.lists(st.integers(0, len(data)), max_size=3)))
    pieces, last = [], 0
    for c in cuts:
        pieces.append(bytes(data[last:c]))
        last = c
    pieces.append(bytes(data[last:]))
    return [p for p in pieces if p]


def _examples(n: int) -> int:
    """`n` keeps the suite fast; LBPROXY_FUZZ_SCALE=5 (say) runs five times as many."""
    return int(n * float(os.environ.get("LBPROXY_FUZZ_SCALE", "1")))


@settings(max_examples=_examples(1500), deadline=None, suppress_health_check=[
    HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(mutated())
def test_mutated_requests(loop: asyncio.AbstractEventLoop, pieces: list[bytes]) -> None:
    rig = Rig(loop)
    for p in pieces:
        rig.feed(p)
    _check(rig)


@settings(max_examples=_examples(1000), deadline=None, suppress_health_check=[
    HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(st.lists(st.binary(max_size=64), max_size=4))
def test_random_bytes(loop: asyncio.AbstractEventLoop, pieces: list[bytes]) -> None:
    rig = Rig(loop)
    for p in pieces:
        rig.feed(p)
    _check(rig)
