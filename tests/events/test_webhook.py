"""The webhook sink against a real aiohttp receiver on 127.0.0.1: retries with backoff after
failures and timeouts, gives up on a final answer, keeps order, and drops the oldest event (with
a log line) when its bounded queue is full."""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import logging
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

import pytest
from aiohttp import web

from lbproxy.events import CertEvent, EventKind, WebhookSink

T0 = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)
# Every wait in these tests ends well within this (the webhook's own retries take milliseconds).
DEADLINE = 10.0


def event(cert: str = "c", kind: EventKind = EventKind.ISSUED) -> CertEvent:
    return CertEvent(kind, cert, T0, "issued until 2026-04-01", ("a.test",), "1f",
                     T0 + dt.timedelta(days=90))


@dataclass
class Receiver:
    """Answers each POST with the next planned status (200 once the plan is used up);
    "hang" waits until the client gives up."""

    url: str = ""
    plan: list[int | str] = field(default_factory=list)
    attempts: int = 0
    bodies: list[dict[str, Any]] = field(default_factory=list)
    headers: list[dict[str, str]] = field(default_factory=list)
    got: asyncio.Event = field(default_factory=asyncio.Event)
    want: int = 1

    async def handle(self, request: web.Request) -> web.Response:
        self.attempts += 1
        self.headers.append(dict(request.headers))
        step = self.plan.pop(0) if self.plan else 200
        if step == "hang":
            await asyncio.Event().wait()
        body = await request.json()
        assert isinstance(step, int)
        if step == 200:
            self.bodies.append(body)
            if len(self.bodies) >= self.want:
                self.got.set()
        return web.Response(status=step)


@pytest.fixture
async def receiver() -> AsyncIterator[Receiver]:
    rec = Receiver()
    app = web.Application()
    app.router.add_post("/hook", rec.handle)
    runner = web.AppRunner(app, shutdown_timeout=0.1)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    rec.url = f"http://127.0.0.1:{port}/hook"
    yield rec
    await runner.cleanup()


@pytest.fixture
async def make_sink() -> AsyncIterator[Callable[..., WebhookSink]]:
    sinks: list[WebhookSink] = []

    def make(url: str, **kw: Any) -> WebhookSink:
        kw.setdefault("backoff", 0.01)
        kw.setdefault("timeout", 2.0)
        s = WebhookSink(url, **kw)
        sinks.append(s)
        return s

    yield make
    for s in sinks:
        await s.stop(drain_timeout=0.1)


async def test_retries_after_failures_then_delivers_the_json(
        receiver: Receiver, make_sink: Callable[..., WebhookSink]) -> None:
    receiver.plan = [503, 500]
    sink = make_sink(receiver.url, retries=3, headers={"Authorization": "Bearer s3cret"})
    await sink.start()
    sink.emit(event())
    async with asyncio.timeout(DEADLINE):
        await receiver.got.wait()
        await sink.wait_idle()
    assert receiver.attempts == 3
    assert receiver.bodies == [{
        "type": "certificate.issued", "certificate": "c", "time": T0.isoformat(),
        "message": "issued until 2026-04-01", "names": ["a.test"], "serial": "1f",
        "not_after": (T0 + dt.timedelta(days=90)).isoformat(), "days_left": 90.0,
        "code": None, "sub_code": None, "failures": 0}]
    assert receiver.headers[-1]["Authorization"] == "Bearer s3cret"
    assert receiver.headers[-1]["Content-Type"] == "application/json"
    assert (sink.counters.delivered, sink.counters.failed, sink.counters.attempts) == (1, 0, 3)


async def test_an_attempt_that_hangs_times_out_and_is_retried(
        receiver: Receiver, make_sink: Callable[..., WebhookSink]) -> None:
    receiver.plan = ["hang"]
    sink = make_sink(receiver.url, retries=2, timeout=0.2)
    await sink.start()
    sink.emit(event())
    async with asyncio.timeout(DEADLINE):
        await receiver.got.wait()
    assert receiver.attempts == 2 and len(receiver.bodies) == 1


async def test_gives_up_after_the_retries_and_goes_on_with_the_next_event(
        receiver: Receiver, make_sink: Callable[..., WebhookSink],
        caplog: pytest.LogCaptureFixture) -> None:
    receiver.plan = [503, 503, 503]
    sink = make_sink(receiver.url, retries=2)
    await sink.start()
    sink.emit(event("first"))
    sink.emit(event("second"))
    async with asyncio.timeout(DEADLINE):
        await receiver.got.wait()
        await sink.wait_idle()
    assert receiver.attempts == 4
    assert [b["certificate"] for b in receiver.bodies] == ["second"]
    assert (sink.counters.delivered, sink.counters.failed) == (1, 1)
    assert "gave up on issued of first" in caplog.text


async def test_a_final_answer_is_not_retried(
        receiver: Receiver, make_sink: Callable[..., WebhookSink]) -> None:
    receiver.plan = [404]
    sink = make_sink(receiver.url, retries=5)
    await sink.start()
    sink.emit(event())
    async with asyncio.timeout(DEADLINE):
        await sink.wait_idle()
    assert receiver.attempts == 1 and sink.counters.failed == 1


async def test_a_receiver_that_is_down_is_retried_then_given_up(
        make_sink: Callable[..., WebhookSink]) -> None:
    # A port nobody listens on: bind one, note it, close it.
    server = await asyncio.start_server(lambda r, w: None, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    server.close()
    await server.wait_closed()
    sink = make_sink(f"http://127.0.0.1:{port}/hook", retries=2)
    await sink.start()
    sink.emit(event())
    async with asyncio.timeout(DEADLINE):
        await sink.wait_idle()
    assert (sink.counters.attempts, sink.counters.failed) == (3, 1)


async def test_a_full_queue_drops_the_oldest_with_a_log_line_and_keeps_order(
        receiver: Receiver, make_sink: Callable[..., WebhookSink],
        caplog: pytest.LogCaptureFixture) -> None:
    sink = make_sink(receiver.url, queue_size=2)
    with caplog.at_level(logging.WARNING, logger="lbproxy.events"):
        for name in ("e1", "e2", "e3"):  # emitted before the sender runs: never blocks
            sink.emit(event(name))
    assert sink.queued == 2 and sink.counters.dropped == 1
    assert "dropped the oldest, issued of e1" in caplog.text
    receiver.want = 2
    await sink.start()
    async with asyncio.timeout(DEADLINE):
        await receiver.got.wait()
    assert [b["certificate"] for b in receiver.bodies] == ["e2", "e3"]


async def test_stop_delivers_what_is_queued_within_its_deadline(
        receiver: Receiver, make_sink: Callable[..., WebhookSink]) -> None:
    sink = make_sink(receiver.url)
    await sink.start()
    sink.emit(event("a"))
    sink.emit(event("b"))
    await sink.stop(drain_timeout=DEADLINE)
    assert [b["certificate"] for b in receiver.bodies] == ["a", "b"]
    assert json.dumps(receiver.bodies)  # plain JSON
