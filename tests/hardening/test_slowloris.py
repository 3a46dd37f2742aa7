"""500 slow-header connections held open do not slow down normal clients (p99 under 3x its
unloaded value, no errors), and the head timeout closes every one of them with a 408."""

from __future__ import annotations

import asyncio
import time

from lbproxy.config.model import Timeouts
from lbproxy.proxy import DataPlane

from ..proxy.conftest import make_vs, serve
from .conftest import RecordingUpstream
from .slowloris_load import SlowClients, load_loop

SLOW = 500
HEAD_TIMEOUT = 3.0
# The unloaded p99 on loopback is a fraction of a millisecond, where one scheduler hiccup of the
# shared test machine is already 3x; the bar is taken against at least this.
P99_FLOOR = 0.002


async def test_slowloris(dataplane: DataPlane, recorder: RecordingUpstream) -> None:
    vs = make_vs(ports=(recorder.port,), timeouts=Timeouts(head=HEAD_TIMEOUT, idle=30.0))
    port = (await serve(dataplane, vs))["web"]
    async with asyncio.timeout(30):
        await load_loop(port, 4, 50, 1.0)  # warm-up: pooled upstream connections
        base = await load_loop(port, 4, 150, 1.0)
        assert base.errors == 0 and len(base.latencies) >= 100
        slow = SlowClients(port, SLOW, every=0.5, drip_for=HEAD_TIMEOUT - 1.0)
        t_open = time.monotonic()
        await slow.open()
        try:
            opened = time.monotonic() - t_open
            assert opened < HEAD_TIMEOUT - 1.5, f"opening took {opened:.2f}s"
            active = dataplane.stats()["virtual_services"]["web"]["connections"]["active"]
            assert active >= SLOW
            # The load runs while every slow connection is still held (their deadline is
            # HEAD_TIMEOUT after each opened): at most 1 s, ending 0.5 s before the first one.
            loaded = await load_loop(port, 4, 150, min(1.0, HEAD_TIMEOUT - 0.5 - opened))
            assert loaded.errors == 0 and len(loaded.latencies) >= 50
            p99_0, p99_1 = base.p(0.99), loaded.p(0.99)
            assert p99_1 < 3 * max(p99_0, P99_FLOOR), (p99_0, p99_1)
            closed, answered = await slow.wait_closed()
        finally:
            slow.stop()
        took = time.monotonic() - t_open
    assert closed == SLOW and answered == SLOW, (closed, answered, {a[:20] for a in slow.answers})
    assert took < HEAD_TIMEOUT * 2
    limits = dataplane.stats()["virtual_services"]["web"]["limit_rejections"]
    assert limits["head_timeout"] == SLOW
    assert recorder.heads >= len(base.latencies) + len(loaded.latencies)
