"""The ACME CA unreachable (connection refused) or answering 5xx (problem document with
Retry-After, or a bare 500): HTTPS traffic keeps being served with the current certificate,
renewals back off (growing delays, Retry-After honoured), the failure is visible (code 3/4 in the
System Message File, status, last error), and the renewal succeeds once the CA is back."""

from __future__ import annotations

import asyncio
import dataclasses
import datetime as dt
import json
import ssl
import time
from collections.abc import AsyncIterator
from pathlib import Path

import trustme
from aiohttp import web

from lbproxy.letsencrypt import Template
from tests.e2e.le_node import Node, config, https_get, trust
from tests.support.pebble import PebbleInstance, free_port

LOAD_SECONDS = 60.0  # upper bound of the load loop
LOAD_MAX_REQUESTS = 3000


class ShiftedClock:
    """The real clock plus an offset the test moves forward (renewal windows are days away)."""

    def __init__(self) -> None:
        self.offset = dt.timedelta(0)

    def __call__(self) -> dt.datetime:
        return dt.datetime.now(dt.UTC) + self.offset

    def move_to(self, when: dt.datetime) -> None:
        self.offset += when - self()


async def failing_ca(tmp: Path, status: int, *, problem: bool,
                     retry_after: int) -> AsyncIterator[tuple[str, str, list[str]]]:
    """An HTTPS server answering every request with `status` (+ Retry-After)."""
    hits: list[str] = []

    async def handler(r: web.Request) -> web.Response:
        hits.append(r.path)
        if problem:
            return web.Response(status=status, content_type="application/problem+json",
                                headers={"Retry-After": str(retry_after)},
                                text=json.dumps({"type": "urn:ietf:params:acme:error:"
                                                 "serverInternal", "detail": "maintenance",
                                                 "status": status}))
        return web.Response(status=status, text="Internal Server Error",
                            headers={"Retry-After": str(retry_after)})
    ca = trustme.CA()
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1").configure_cert(ctx)
    bundle = tmp / f"ca-{status}.pem"
    ca.cert_pem.write_to_path(str(bundle))
    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", handler)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port, ssl_context=ctx).start()
    try:
        yield f"https://127.0.0.1:{port}/dir", str(bundle), hits
    finally:
        await runner.cleanup()


async def test_ca_down_traffic_untouched_renewals_back_off(
        pebble: PebbleInstance, tmp_path: Path, upstream: int,
        boot: tuple[bytes, bytes]) -> None:
    https_port = free_port()
    node = Node(tmp_path / "n", config(pebble, upstream, https_port), bootstrap=boot)
    node.root.mkdir()
    await node.start()
    m = node.manager
    clock = ShiftedClock()
    try:
        await m.register("ops@le.test")
        await m.request("site", Template("www.le.test", "web"))
        await m.stop()  # the scheduler is driven by hand: run_due() at chosen instants
        m.clock = clock
        ctx = trust(pebble)
        serial0 = node.store.require("site").serial
        good = m.settings

        failures: list[str] = []
        served: set[int] = set()
        done = asyncio.Event()

        async def load() -> int:
            n, t_end = 0, time.monotonic() + LOAD_SECONDS
            while not done.is_set() and n < LOAD_MAX_REQUESTS and time.monotonic() < t_end:
                try:
                    st, body, serial = await https_get("127.0.0.1", https_port, "www.le.test",
                                                       ctx)
                    if (st, body) != (200, b"hello from the real server"):
                        failures.append(f"{st} {body[:60]!r}")
                    served.add(serial)
                except Exception as exc:  # any failed request counts
                    failures.append(repr(exc))
                n += 1
            return n
        loader = asyncio.create_task(load())

        async def attempt(expect_code: int) -> dt.timedelta:
            """Move to the next attempt; it must start (and fail with `expect_code`), and the
            schedule must not start another one just before the backoff ends."""
            when = m.due(clock())[0][0]
            clock.move_to(when)
            assert await m.run_due() == 1
            await m.wait_idle()
            v = m.view("site")
            assert v["last_code"] == expect_code, v
            assert v["status"] == "backoff"
            retry = m.entries["site"].failures.retry_at
            assert retry is not None
            clock.move_to(retry - dt.timedelta(seconds=1))
            assert await m.run_due() == 0, "retried before the backoff ended"
            return retry - when

        # 1. connection refused (a dead port)
        m.settings = dataclasses.replace(good, directory_url=f"https://127.0.0.1:"
                                                             f"{free_port()}/dir")
        d1 = await attempt(3)
        d2 = await attempt(3)
        assert d2 > d1 >= dt.timedelta(minutes=1), (d1, d2)
        assert "network failure" in m.view("site")["last_error"]
        # 2. 503 with a problem document and Retry-After: 5 hours (beyond the backoff)
        async for url, bundle, hits in failing_ca(tmp_path, 503, problem=True,
                                                  retry_after=5 * 3600):
            m.settings = dataclasses.replace(good, directory_url=url, ca_bundle=bundle)
            d3 = await attempt(4)
            assert hits and d3 >= dt.timedelta(hours=5), d3
            assert "503" in m.view("site")["last_error"]
        # 3. a bare 500 (no problem document) with Retry-After: 7 hours
        async for url, bundle, hits in failing_ca(tmp_path, 500, problem=False,
                                                  retry_after=7 * 3600):
            m.settings = dataclasses.replace(good, directory_url=url, ca_bundle=bundle)
            d4 = await attempt(4)
            assert hits and d4 >= dt.timedelta(hours=7), d4
        # visible: System Message File codes, status, metrics
        codes = [c for c, _ in m.log.codes()]
        assert codes.count(3) >= 2 and codes.count(4) >= 2, codes
        st = {s.id: s for s in m.cert_statuses()}["site"]
        assert st.failures == 4 and st.last_code == 4 and st.state == "backoff"
        assert m.acme_requests[("order", "3")] == 2 and m.acme_requests[("order", "4")] == 2
        # traffic never noticed, and still the first certificate
        assert failures == [] and served == {serial0}
        # 4. the CA is back: the next attempt renews
        m.settings = good
        clock.move_to(m.due(clock())[0][0])
        assert await m.run_due() == 1
        await m.wait_idle()
        v = m.view("site")
        # (not "valid": the shifted clock may already sit in the new certificate's window)
        assert v["status"] != "backoff" and v["failures"] == 0 and v["last_code"] is None, v
        serial1 = node.store.require("site").serial
        assert serial1 != serial0
        done.set()
        requests = await loader
        assert requests > 0 and failures == []
        assert (await https_get("127.0.0.1", https_port, "www.le.test", ctx))[2] == serial1
    finally:
        await node.stop()
