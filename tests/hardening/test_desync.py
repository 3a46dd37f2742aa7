"""Every vector of the desync table (issue 13) through a running data plane: lbproxy forwards none
ambiguously and desyncs none (each case followed by a request on the same connection and one from
the next client on the pooled upstream connection), and each gets its documented verdict; the
chosen behaviours are checked on what the real server read (framing fields named in Connection
kept, the other named fields removed, h2c never upgraded, WebSocket still tunnelled)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

from lbproxy.config.model import Limits
from lbproxy.proxy import DataPlane

from ..proxy.conftest import make_vs, serve
from .desync_cases import AMBIGUOUS, CASES, DESYNC, FORWARDED, REJECTED, SCRIPTS, Case
from .desync_rig import Outcome, Upstream, next_path, run_case, same_path
from .smuggling_cases import MAX_BODY

WAIT = 3.0  # seconds: an upper bound for any one read (lbproxy answers each case at once)
SETTLE = 2.0  # seconds: an upper bound for the real server's connections to end or be probed
CLASSES = ("Connection names framing", "Connection names framing (response)", "upgrade",
           "obs-fold", "whitespace before colon", "Transfer-Encoding values", "1xx responses",
           "HEAD answered with a body", "pipelined after an error", "Connection in responses")


@pytest.fixture
async def rig() -> AsyncIterator[Upstream]:
    up = Upstream(SCRIPTS)
    await up.start()
    yield up
    await up.stop()


async def run(dataplane: DataPlane, up: Upstream, case: Case) -> Outcome:
    port = (await serve(dataplane, make_vs(ports=(up.port,),
                                           limits=Limits(max_body=MAX_BODY))))["web"]
    async with asyncio.timeout(4 * WAIT + SETTLE):
        return await run_case(port, case, up, WAIT, SETTLE)


def test_the_table() -> None:
    assert len(CASES) >= 20
    assert len({c.name for c in CASES}) == len(CASES)
    assert set(CLASSES) <= {c.kind for c in CASES}
    assert all(c.lbproxy in (REJECTED, FORWARDED) for c in CASES)
    assert all(c.readings for c in CASES if c.lbproxy == FORWARDED)


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
async def test_lbproxy_verdict(dataplane: DataPlane, rig: Upstream, case: Case) -> None:
    o = await run(dataplane, rig, case)
    assert o.verdict not in (AMBIGUOUS, DESYNC), (o.verdict, o.notes, o.cell())
    assert o.verdict == case.lbproxy, (o.cell(), [r.seen for r in o.received])
    # lbproxy answers every case (a hang is no rejection), and the next client is served.
    assert o.got and o.stop != "timeout", o.cell()
    assert (o.next.status, o.next.target) == (200, next_path(case)), o.next


def fields_read(o: Outcome) -> list[tuple[bytes, bytes]]:
    """The fields of the one request the real server read."""
    assert len(o.received) == 1, (o.cell(), o.notes, [r.seen for r in o.received])
    return list(o.received[0].head.fields)


async def test_connection_keeps_framing_and_still_removes_the_rest(
        dataplane: DataPlane, rig: Upstream) -> None:
    """`Connection: keep-alive, x-trace, content-length`: Content-Length reaches the real server
    (the body with it), X-Trace does not."""
    case = next(c for c in CASES if c.name == "conn_cl_in_list")
    o = await run(dataplane, rig, case)
    names = [n for n, _ in fields_read(o)]
    assert b"content-length" in names and b"x-trace" not in names, names
    assert b"connection" not in names or o.received[0].head.tokens(b"connection") in (
        [b"keep-alive"], [])


async def test_connection_naming_host_keeps_it(dataplane: DataPlane, rig: Upstream) -> None:
    o = await run(dataplane, rig, next(c for c in CASES if c.name == "conn_host"))
    assert (b"host", b"example.com") in fields_read(o)


@pytest.mark.parametrize("name", ["h2c", "h2c_upper_no_settings", "h2c_with_body"])
async def test_h2c_goes_upstream_as_a_plain_request(dataplane: DataPlane, rig: Upstream,
                                                     name: str) -> None:
    o = await run(dataplane, rig, next(c for c in CASES if c.name == name))
    names = [n for n, _ in fields_read(o)]
    assert b"upgrade" not in names and b"http2-settings" not in names, names
    assert o.got[0].status == 200 and o.tunnel is None


@pytest.mark.parametrize("name", ["websocket", "h2c_then_websocket"])
async def test_websocket_upgrades_keep_working(dataplane: DataPlane, rig: Upstream,
                                               name: str) -> None:
    o = await run(dataplane, rig, next(c for c in CASES if c.name == name))
    assert o.got[0].status == 101 and o.tunnel, o.cell()
    assert o.received[0].head.tokens(b"upgrade") == [b"websocket"]


async def test_a_real_server_closing_keeps_the_client_connection(
        dataplane: DataPlane, rig: Upstream) -> None:
    """Client and upstream persistence are independent: the real server's Connection: close ends
    its connection only; the client's follow-up is answered on the same one."""
    case = next(c for c in CASES if c.name == "resp_conn_close")
    o = await run(dataplane, rig, case)
    assert o.got[0].status == 200 and not o.got[0].close, o.got
    assert o.same is not None and (o.same.status, o.same.target) == (200, same_path(case)), o.same
