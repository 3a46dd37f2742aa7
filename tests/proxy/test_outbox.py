"""The outbox: fast-path writes held to the end of the loop iteration, in order, never after a
close, never behind a direct write."""

from __future__ import annotations

import asyncio

from lbproxy.config.model import ContentRule, MatchType, NotAvailable, SubVS
from lbproxy.proxy import DataPlane
from lbproxy.proxy.outbox import Outbox

from .conftest import NO_CHECK, Client, RawUpstream, answering, make_vs, serve
from .conftest import servers as rs

T = 10  # seconds: a bound on each test, never reached when it passes


class FakeTransport:
    def __init__(self, log: list[tuple[str, bytes]], name: str) -> None:
        self.log = log
        self.name = name
        self.closing = False

    def is_closing(self) -> bool:
        return self.closing

    def write(self, data: bytes) -> None:
        self.log.append((self.name, data))

    def writelines(self, data: list[bytes]) -> None:
        self.log.append((self.name + "*", b"".join(data)))  # one write of several pieces


async def test_held_writes_go_out_in_order_at_the_end_of_the_iteration() -> None:
    loop = asyncio.get_running_loop()
    box = Outbox(loop)
    log: list[tuple[str, bytes]] = []
    a, b, c = FakeTransport(log, "a"), FakeTransport(log, "b"), FakeTransport(log, "c")
    box.add(a, b"1")  # type: ignore[arg-type]
    box.add(b, b"2")  # type: ignore[arg-type]
    box.add(a, b"3")  # type: ignore[arg-type]
    box.add(c, b"4")  # type: ignore[arg-type]
    c.closing = True  # closed meanwhile: its bytes are dropped, not written to a dead transport
    assert log == []
    done = loop.create_future()
    loop.call_soon(done.set_result, None)  # queued after the outbox's callback
    await done
    assert log == [("a", b"1"), ("b", b"2"), ("a", b"3")]
    assert not box.scheduled and box.items == []
    # An early flush (before a direct write) empties it; the pending callback then finds nothing.
    box.add(a, b"5")  # type: ignore[arg-type]
    box.flush()
    assert log[-1] == ("a", b"5")
    box.add(b, b"6")  # type: ignore[arg-type]
    await asyncio.sleep(0)
    assert log[-1] == ("b", b"6") and len(log) == 5


async def test_pieces_for_one_transport_in_a_row_go_out_in_one_write() -> None:
    """Pipelined answers to one client: one write of them all (not a send() each); the order
    across transports is kept (a piece for `a` after one for `b` is a write of its own)."""
    loop = asyncio.get_running_loop()
    box = Outbox(loop)
    log: list[tuple[str, bytes]] = []
    a, b = FakeTransport(log, "a"), FakeTransport(log, "b")
    for data in (b"1", b"2", b"3"):
        box.add(a, data)  # type: ignore[arg-type]
    box.add(b, b"4")  # type: ignore[arg-type]
    box.add(a, b"5")  # type: ignore[arg-type]
    box.add(a, b"6")  # type: ignore[arg-type]
    box.flush()
    assert log == [("a*", b"123"), ("b", b"4"), ("a*", b"56")]


async def test_close_after_a_held_response_delivers_it(dataplane: DataPlane) -> None:
    """Pipelined: the first response takes the fast path (held), the second request is answered
    by the proxy itself (written directly) and the third says close: all three arrive, in order,
    before the connection closes."""
    ok = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"

    async with RawUpstream(answering([ok] * 4)) as raw, asyncio.timeout(T):
        vs = make_vs(subvs=(
            SubVS("local", rules=("two",), health_check=NO_CHECK,
                  not_available=NotAvailable(200, b"local", "text/plain")),
            SubVS("up", real_servers=rs(raw.port), rules=("default",), health_check=NO_CHECK),
        ), content_switching=True)
        ports = await serve(dataplane, vs, rules=(ContentRule("two", MatchType.PREFIX, "/2"),))
        c = await Client.connect(ports["web"])
        await c.send(b"GET /1 HTTP/1.1\r\nHost: a\r\n\r\n"
                     b"GET /2 HTTP/1.1\r\nHost: a\r\n\r\n"
                     b"GET /3 HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n")
        first = await c.response()
        second = await c.response()
        third = await c.response()
        assert (first.status, first.body) == (200, b"ok")
        assert (second.status, second.body) == (200, b"local")
        assert (third.status, third.body) == (200, b"ok")
        assert third.header("Connection") == "close"
        assert await c.closed()
        c.close()
