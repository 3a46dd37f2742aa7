"""Real-server health checks: rise/fall counting (sans-I/O) and the asyncio loop that probes.

`HealthMonitor` runs one task per backend of a pool: probe (TCP connect, or an HTTP GET whose
status must be in `expect_status`) bounded by the check's timeout, feed the result to that
backend's `HealthState`, write `Backend.healthy`, log a transition at WARNING, sleep until the next
interval. A pool whose check type is `none` gets no tasks and all its backends are healthy.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import time
from collections.abc import Awaitable, Callable, Sequence

from ..config.model import Address, HealthCheck, HealthCheckType
from .balancer import Backend

logger = logging.getLogger(__name__)

# An HTTP status line is short ("HTTP/1.1 200 OK\r\n"); a server that sends more than this before
# the first CRLF is not speaking HTTP. Bounds what one probe buffers.
_MAX_STATUS_LINE = 1024
# What may go into the request line and Host header: visible ASCII, no spaces (RFC 9112 3.2).
_TOKEN_SAFE = re.compile(r"[!-~]+")

Probe = Callable[[Address, HealthCheck], Awaitable[str | None]]
"""Probes one server once: None when healthy, else the reason it is not. Must honour the timeout."""

Clock = Callable[[], float]
Sleep = Callable[[float], Awaitable[None]]
OnChange = Callable[[Backend, bool, str], None]
"""Told (backend, healthy, reason) after every up/down transition, e.g. for metrics or tests."""


class HealthState:
    """Rise/fall counting for one server: `fall` failures in a row take an up server down, `rise`
    successes in a row bring a down server up; a result that agrees with the state resets the count.

    `provisional` (a server no check has reported on yet, see `Backend`): the first result alone
    sets the state, so a dead server found at start-up goes down at once instead of after `fall`.
    """

    __slots__ = ("fall", "healthy", "provisional", "rise", "streak")

    def __init__(self, rise: int, fall: int, healthy: bool = True,
                 provisional: bool = False) -> None:
        if rise < 1 or fall < 1:
            raise ValueError(f"rise and fall must be at least 1, got rise={rise} fall={fall}")
        self.rise = rise
        self.fall = fall
        self.healthy = healthy
        self.provisional = provisional
        self.streak = 0  # consecutive results that contradict `healthy`

    def observe(self, ok: bool) -> bool | None:
        """Count one probe result; returns the new state on a transition, else None."""
        if self.provisional:
            self.provisional = False
            self.streak = 0
            if ok != self.healthy:
                self.healthy = ok
                return ok
            return None
        if ok == self.healthy:
            self.streak = 0
            return None
        self.streak += 1
        if self.streak < (self.rise if ok else self.fall):
            return None
        self.healthy = ok
        self.streak = 0
        return ok


def _describe(e: BaseException) -> str:
    return f"{type(e).__name__}: {e}" if str(e) else type(e).__name__


async def probe_tcp(address: Address, check: HealthCheck) -> str | None:
    """Healthy when a TCP connection opens within the timeout."""
    try:
        async with asyncio.timeout(check.timeout):
            _, writer = await asyncio.open_connection(address.host, address.port)
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()
    except TimeoutError:
        return f"no TCP connection within {check.timeout:g}s"
    except OSError as e:
        return f"TCP connect failed: {_describe(e)}"
    return None


async def probe_http(address: Address, check: HealthCheck) -> str | None:
    """Healthy when `GET check.path` answers a status in `check.expect_status` within the timeout.

    Only the status line is read; the connection is closed right after (`Connection: close`).
    """
    host = check.host or str(address)
    if not _TOKEN_SAFE.fullmatch(check.path) or not _TOKEN_SAFE.fullmatch(host):
        # Config validation should stop these; never put them on the wire (request splitting).
        return f"health check path or host is not printable ASCII: {check.path!r} {host!r}"
    request = (f"GET {check.path} HTTP/1.1\r\nHost: {host}\r\nUser-Agent: lbproxy-health\r\n"
               f"Accept: */*\r\nConnection: close\r\n\r\n").encode("ascii")
    writer = None
    try:
        async with asyncio.timeout(check.timeout):
            reader, writer = await asyncio.open_connection(
                address.host, address.port, limit=_MAX_STATUS_LINE)
            writer.write(request)
            await writer.drain()
            try:
                line = await reader.readuntil(b"\r\n")
            except asyncio.IncompleteReadError as e:
                return f"connection closed before a status line ({len(e.partial)} bytes)"
            except asyncio.LimitOverrunError:
                return f"no status line in the first {_MAX_STATUS_LINE} bytes"
    except TimeoutError:
        return f"no HTTP answer within {check.timeout:g}s"
    except OSError as e:
        return f"HTTP check failed: {_describe(e)}"
    finally:
        if writer is not None:
            writer.close()
    parts = line.split(None, 2)
    if len(parts) < 2 or not parts[0].startswith(b"HTTP/") or not parts[1].isdigit():
        return f"not an HTTP status line: {line[:80]!r}"
    status = int(parts[1])
    if status not in check.expect_status:
        expected = ", ".join(str(s) for s in check.expect_status)
        return f"GET {check.path} answered {status}, expected {expected}"
    return None


class HealthMonitor:
    """Probes every backend of one pool on the check's interval and keeps `Backend.healthy` true.

    `label` names the pool in log lines ("SubVS api of VS web"). Start with `start()` from a
    running loop, end with `await stop()`. On reload, stop the old generation's monitor and start
    one over the new Balancer's backends: the adopted ones keep their state (see balancer.py).
    """

    def __init__(self, backends: Sequence[Backend], check: HealthCheck, label: str, *,
                 clock: Clock = time.monotonic, sleep: Sleep = asyncio.sleep,
                 probe: Probe | None = None, on_change: OnChange | None = None) -> None:
        self.backends = tuple(backends)
        self.check = check
        self.label = label
        self._clock = clock
        self._sleep = sleep
        if probe is None:
            probe = probe_http if check.type is HealthCheckType.HTTP else probe_tcp
        self._probe = probe
        self._on_change = on_change
        self._tasks: list[asyncio.Task[None]] = []

    def start(self) -> None:
        if self._tasks:
            raise RuntimeError(f"health monitor for {self.label} is already running")
        if self.check.type is HealthCheckType.NONE:
            for b in self.backends:
                b.healthy = True
                b.checked = False
                b.down_reason = ""
            return
        for b in self.backends:
            task = asyncio.create_task(self._run(b), name=f"health {b.address} {self.label}")
            self._tasks.append(task)

    async def stop(self) -> None:
        tasks, self._tasks = self._tasks, []
        for t in tasks:
            t.cancel()
        # The probes are all bounded by the check's timeout and cancellation interrupts them, so
        # this returns promptly; results of tasks that crashed were already logged by _run.
        await asyncio.gather(*tasks, return_exceptions=True)

    async def _run(self, b: Backend) -> None:
        check = self.check
        state = HealthState(check.rise, check.fall, healthy=b.healthy, provisional=not b.checked)
        while True:
            started = self._clock()
            try:
                reason = await self._probe(b.address, check)
            except Exception as e:  # a probe bug must not stop the checks; CancelledError passes
                logger.exception("health probe of %s in %s crashed", b.address, self.label)
                reason = f"probe error: {_describe(e)}"
            self._record(b, state, reason)
            # The interval runs from the start of one probe to the start of the next.
            await self._sleep(max(0.0, started + check.interval - self._clock()))

    def _record(self, b: Backend, state: HealthState, reason: str | None) -> None:
        change = state.observe(reason is None)
        b.healthy = state.healthy
        b.checked = True
        if state.healthy:
            b.down_reason = ""
        elif reason is not None:
            b.down_reason = reason
        if change is None:
            return
        if change:
            logger.warning("real server %s in %s is UP", b.address, self.label)
        else:
            logger.warning("real server %s in %s is DOWN: %s", b.address, self.label, reason)
        if self._on_change is not None:
            self._on_change(b, change, reason or "")
