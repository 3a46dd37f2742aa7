"""An idle keep-alive connection gives its request parser back after t_hold and makes one anew at
its next byte (clientstate.py, D_IDLE_HELD); the idle timeout still counts from the end of the last
response. The sweep is called with the deadlines it would reach, so no test waits for a clock."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from lbproxy.config.model import Timeouts
from lbproxy.proxy import DataPlane
from lbproxy.proxy.clientstate import D_HEAD, D_IDLE, D_IDLE_HELD
from lbproxy.proxy.service import PARSER_HOLD, Listener

from .conftest import Client, Upstream, build, make_vs, serve

T = 10
IDLE = 30.0


def the_listener(dataplane: DataPlane) -> Listener[Any]:
    (lst,) = dataplane._listeners.values()
    return lst


async def open_site(dataplane: DataPlane, upstream: Upstream, idle: float
                    ) -> tuple[Listener[Any], Client]:
    ports = await serve(dataplane, make_vs(ports=(upstream.port,), timeouts=Timeouts(idle=idle)))
    return the_listener(dataplane), await Client.connect(ports["web"])


async def served_once(lst: Listener[Any], c: Client) -> Any:
    """One request answered on `c`: its connection, idle and holding its parser."""
    assert (await c.request()).status == 200
    (conn,) = lst.conns
    assert conn.dkind == D_IDLE_HELD and conn.parser is not None
    return conn


@pytest.fixture
async def site(dataplane: DataPlane, upstream: Upstream) -> tuple[Listener[Any], Client]:
    return await open_site(dataplane, upstream, IDLE)


async def test_the_parser_is_released_after_t_hold_and_made_anew(
        site: tuple[Listener[Any], Client]) -> None:
    lst, c = site
    async with asyncio.timeout(T):
        conn = await served_once(lst, c)
        went_idle = conn.deadline - PARSER_HOLD
        assert conn.waiting_since() == pytest.approx(went_idle)
        lst.sweep(conn.deadline)
        assert conn.parser is None and not conn.closed
        assert conn.dkind == D_IDLE and conn.deadline == pytest.approx(went_idle + IDLE)
        assert conn.waiting_since() == pytest.approx(went_idle)
        # The next request, in pieces, then two pipelined ones: all answered by the new parser.
        head = build(path="/split")
        await c.send(head[:7])
        await c.send(head[7:])
        r = await c.response()
        assert r.status == 200 and r.json()["path"] == "/split"
        assert conn.parser is not None
        lst.sweep(conn.deadline)
        await c.send(build(path="/a") + build(path="/b"))
        assert [(await c.response()).json()["path"] for _ in range(2)] == ["/a", "/b"]
    assert lst.counters.limits["idle_timeout"] == 0
    c.close()


async def test_the_idle_timeout_still_counts_from_the_last_response(
        site: tuple[Listener[Any], Client]) -> None:
    lst, c = site
    async with asyncio.timeout(T):
        conn = await served_once(lst, c)
        final = conn.deadline - PARSER_HOLD + IDLE
        lst.sweep(conn.deadline)
        lst.sweep(final - 0.001)
        assert not conn.closed
        lst.sweep(final)
        assert await c.closed()
    assert conn.closed and lst.counters.limits["idle_timeout"] == 1


async def test_a_head_begun_in_the_hold_keeps_its_parser(
        site: tuple[Listener[Any], Client]) -> None:
    lst, c = site
    async with asyncio.timeout(T):
        conn = await served_once(lst, c)
        held_until = conn.deadline
        head = build(path="/late")
        conn.data_received(head[:10])  # what the transport calls with the head's first bytes
        assert conn.dkind == D_HEAD
        lst.sweep(held_until)
        assert conn.parser is not None and not conn.closed
        await c.send(head[10:])
        r = await c.response()
        assert r.status == 200 and r.json()["path"] == "/late"
    c.close()


async def test_an_idle_timeout_shorter_than_the_hold_closes_at_once(
        dataplane: DataPlane, upstream: Upstream) -> None:
    lst, c = await open_site(dataplane, upstream, 0.5)
    async with asyncio.timeout(T):
        conn = await served_once(lst, c)
        lst.sweep(conn.deadline)
        assert await c.closed()
    assert lst.counters.limits["idle_timeout"] == 1
