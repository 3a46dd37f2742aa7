"""Certificate events and where they go: the event values, the log and webhook sinks, and the
expiry check that warns before a certificate runs out.

The Let's Encrypt manager calls `EventSink.emit(event)` (never blocks, never raises) for every
certificate event; `ExpiryMonitor` looks at every certificate on an interval and emits `expiring`
once per certificate version entering the warning threshold, and `renewal_failing` at every check
while a certificate is within a third of its lifetime of expiry and its last renewal failed.

A `WebhookSink` POSTs each event as JSON to a configured URL from a bounded queue (the oldest event
is dropped, with a log line, when the queue is full), with a deadline per attempt and a bounded
number of retries with exponential backoff, so the manager never waits on the webhook.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import enum
import json
import logging
from collections import Counter, deque
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import aiohttp

logger = logging.getLogger(__name__)

# Statuses worth another attempt: the receiver is overloaded, timed out, or failing for now.
RETRY_STATUSES = frozenset({408, 425, 429, 500, 502, 503, 504})
# The webhook's User-Agent, so receivers can tell lbproxy's calls apart.
USER_AGENT = "lbproxy-events/1"


class EventKind(enum.StrEnum):
    REQUESTED = "requested"                       # an order was placed (new or renewal)
    CHALLENGE_PRESENTED = "challenge_presented"   # an HTTP-01 answer is being served
    ISSUED = "issued"                             # a new certificate is in the store
    RENEWED = "renewed"                           # a renewed certificate replaced the old one
    FAILED = "failed"                             # an order failed (with its LoadMaster code)
    DELETED = "deleted"                           # a managed certificate was deleted
    EXPIRING = "expiring"                         # entered the expiry warning threshold
    RENEWAL_FAILING = "renewal_failing"           # within 1/3 of its lifetime, renewal failing


# Which level each kind is logged at.
_LEVELS: dict[EventKind, int] = {
    EventKind.FAILED: logging.WARNING,
    EventKind.EXPIRING: logging.WARNING,
    EventKind.RENEWAL_FAILING: logging.WARNING,
}


@dataclass(frozen=True, slots=True)
class CertEvent:
    """One certificate event, as logged and as sent to the webhook (`to_json`)."""

    kind: EventKind
    cert_id: str
    at: dt.datetime
    message: str
    names: tuple[str, ...] = ()
    serial: str = ""
    not_after: dt.datetime | None = None
    code: int | None = None
    subcode: int | None = None
    failures: int = 0

    @property
    def days_left(self) -> float | None:
        if self.not_after is None:
            return None
        return round((self.not_after - self.at).total_seconds() / 86400, 2)

    def to_json(self) -> dict[str, Any]:
        return {
            "type": f"certificate.{self.kind.value}",
            "certificate": self.cert_id,
            "time": self.at.isoformat(),
            "message": self.message,
            "names": list(self.names),
            "serial": self.serial,
            "not_after": self.not_after.isoformat() if self.not_after else None,
            "days_left": self.days_left,
            "code": self.code,
            "sub_code": self.subcode,
            "failures": self.failures,
        }


class EventSink(Protocol):
    """Takes events; `emit` returns at once and never raises."""

    def emit(self, event: CertEvent) -> None: ...


class NullSink:
    def emit(self, event: CertEvent) -> None:
        pass


class LogSink:
    """Every event as one line of the `lbproxy.events` logger (WARNING for problems)."""

    def __init__(self, log: logging.Logger = logger) -> None:
        self._log = log

    def emit(self, event: CertEvent) -> None:
        extra = f" (code: {event.code})" if event.code is not None else ""
        left = f", {event.days_left:.1f} days left" if event.days_left is not None else ""
        self._log.log(_LEVELS.get(event.kind, logging.INFO), "certificate %s %s: %s%s%s",
                      event.cert_id, event.kind.value, event.message, extra, left)


class FanOut:
    """Hands each event to several sinks; a failing sink is logged and the others still run."""

    def __init__(self, sinks: Sequence[EventSink]) -> None:
        self.sinks = tuple(sinks)

    def emit(self, event: CertEvent) -> None:
        for s in self.sinks:
            try:
                s.emit(event)
            except Exception:
                logger.exception("event sink %s failed", type(s).__name__)


class RecordingSink:
    """Keeps every event in memory (tests, and the admin API's recent events)."""

    def __init__(self, limit: int = 1000) -> None:
        self.events: deque[CertEvent] = deque(maxlen=limit)

    def emit(self, event: CertEvent) -> None:
        self.events.append(event)

    def kinds(self) -> list[str]:
        return [e.kind.value for e in self.events]


# -- webhook -------------------------------------------------------------------------------------

@dataclass(slots=True)
class WebhookCounters:
    delivered: int = 0
    failed: int = 0        # gave up after the last retry
    dropped: int = 0       # pushed out of a full queue
    attempts: int = 0


class WebhookSink:
    """POSTs events as JSON to `url` from a bounded queue, in order, one at a time.

    Each attempt has its own deadline (`timeout`); a network error, a timeout or a status in
    RETRY_STATUSES is retried up to `retries` more times after `backoff`, doubling up to
    `backoff_cap`. Any other non-2xx answer is final. `start()` launches the sender; `stop()`
    gives it until `drain_timeout` to deliver what is queued, then cancels it.
    """

    def __init__(self, url: str, *, timeout: float = 5.0, retries: int = 5,
                 backoff: float = 1.0, backoff_cap: float = 60.0, queue_size: int = 1000,
                 headers: Mapping[str, str] | None = None) -> None:
        if queue_size < 1:
            raise ValueError("queue_size must be at least 1")
        self.url = url
        self.timeout = timeout
        self.retries = retries
        self.backoff = backoff
        self.backoff_cap = backoff_cap
        self.queue_size = queue_size
        self.headers = {"User-Agent": USER_AGENT, **(headers or {})}
        self.counters = WebhookCounters()
        self._queue: deque[CertEvent] = deque()
        self._more = asyncio.Event()
        self._idle = asyncio.Event()
        self._idle.set()
        self._task: asyncio.Task[None] | None = None
        self._session: aiohttp.ClientSession | None = None

    @property
    def queued(self) -> int:
        return len(self._queue)

    def emit(self, event: CertEvent) -> None:
        if len(self._queue) >= self.queue_size:
            lost = self._queue.popleft()
            self.counters.dropped += 1
            logger.warning("webhook queue full (%d events): dropped the oldest, %s of %s at %s",
                           self.queue_size, lost.kind.value, lost.cert_id, lost.at.isoformat())
        self._queue.append(event)
        self._idle.clear()
        self._more.set()

    async def start(self) -> None:
        if self._task is None:
            self._session = aiohttp.ClientSession(headers=self.headers)
            self._task = asyncio.create_task(self._run(), name="events-webhook")

    async def wait_idle(self) -> None:
        """Until every queued event is delivered or given up (tests, shutdown)."""
        await self._idle.wait()

    async def stop(self, drain_timeout: float = 5.0) -> None:
        task, self._task = self._task, None
        if task is not None:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(drain_timeout):
                    await self._idle.wait()
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if self._queue:
            logger.warning("webhook stopped with %d events undelivered", len(self._queue))
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def _run(self) -> None:
        while True:
            if not self._queue:
                self._idle.set()
                self._more.clear()
                await self._more.wait()
                continue
            event = self._queue[0]
            await self._deliver(event)
            if self._queue and self._queue[0] is event:
                self._queue.popleft()

    async def _deliver(self, event: CertEvent) -> None:
        body = json.dumps(event.to_json()).encode()
        delay = self.backoff
        for attempt in range(self.retries + 1):
            self.counters.attempts += 1
            why = await self._attempt(body)
            if why is None:
                self.counters.delivered += 1
                return
            if why.startswith("final"):
                break
            if attempt < self.retries:
                logger.info("webhook %s: %s; retry %d/%d in %.1f s", self.url, why,
                            attempt + 1, self.retries, delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, self.backoff_cap)
        self.counters.failed += 1
        logger.warning("webhook %s: gave up on %s of %s: %s", self.url, event.kind.value,
                       event.cert_id, why)

    async def _attempt(self, body: bytes) -> str | None:
        """None when delivered, else why not ("final: ..." when a retry cannot help)."""
        assert self._session is not None
        try:
            async with asyncio.timeout(self.timeout):
                async with self._session.post(
                        self.url, data=body,
                        headers={"Content-Type": "application/json"}) as resp:
                    await resp.read()
                    if 200 <= resp.status < 300:
                        return None
                    if resp.status in RETRY_STATUSES:
                        return f"HTTP {resp.status}"
                    return f"final: HTTP {resp.status}"
        except TimeoutError:
            return f"no answer within {self.timeout:.1f} s"
        except aiohttp.ClientError as e:
            return f"{type(e).__name__}: {e}"


# -- expiry check --------------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class CertStatus:
    """What an operator sees of one certificate (store and Let's Encrypt manager together);
    read by `lbproxy status`, the metrics and the expiry check."""

    id: str
    names: tuple[str, ...] = ()
    managed_by: str = ""                      # "letsencrypt" or "" (imported)
    serial: str = ""
    not_before: dt.datetime | None = None     # None: never issued yet
    not_after: dt.datetime | None = None
    state: str = ""                           # RenewalState value, or "imported"
    auto_renew: bool = False
    next_attempt: dt.datetime | None = None
    last_success: dt.datetime | None = None
    failures: int = 0
    last_error: str = ""
    last_code: int | None = None
    ari_start: dt.datetime | None = None
    ari_end: dt.datetime | None = None
    renewals: int = 0
    used_by: tuple[str, ...] = field(default=())

    def days_left(self, now: dt.datetime) -> float | None:
        if self.not_after is None:
            return None
        return (self.not_after - now).total_seconds() / 86400

    def in_last_third(self, now: dt.datetime) -> bool:
        """Within a third of its lifetime of expiry (or past it): renewal should be done."""
        if self.not_before is None or self.not_after is None:
            return False
        return self.not_after - now <= (self.not_after - self.not_before) / 3

    def to_json(self, now: dt.datetime) -> dict[str, Any]:
        def t(v: dt.datetime | None) -> str | None:
            return v.isoformat() if v else None
        left = self.days_left(now)
        return {
            "id": self.id, "names": list(self.names), "managed_by": self.managed_by,
            "serial": self.serial, "not_before": t(self.not_before),
            "not_after": t(self.not_after),
            "days_left": None if left is None else round(left, 2),
            "state": self.state, "auto_renew": self.auto_renew,
            "next_renewal": t(self.next_attempt), "last_success": t(self.last_success),
            "failures": self.failures, "last_error": self.last_error,
            "last_code": self.last_code, "ari_window": None if self.ari_start is None else
            [t(self.ari_start), t(self.ari_end)], "renewals": self.renewals,
            "used_by": list(self.used_by),
        }


ExpiryKey = tuple[str, dt.datetime]


def expiry_alerts(now: dt.datetime, certs: Iterable[CertStatus], warn_within: dt.timedelta,
                  warned: frozenset[ExpiryKey] = frozenset()
                  ) -> tuple[list[CertEvent], frozenset[ExpiryKey]]:
    """The events one check raises, and the certificate versions already warned about.

    `expiring`: once per certificate version (id, not_after) whose expiry is within
    `warn_within` (an imported certificate too: nothing renews it). `renewal_failing`: at every
    check while a managed certificate is within a third of its lifetime of expiry and its last
    renewal failed.
    """
    events: list[CertEvent] = []
    keep: set[ExpiryKey] = set()
    for c in certs:
        if c.not_after is None:
            continue
        key = (c.id, c.not_after)
        left = c.not_after - now
        if left <= warn_within:
            keep.add(key)
            if key not in warned:
                what = "expired" if left <= dt.timedelta(0) else "expires"
                renew = (" and is not renewed automatically" if not c.auto_renew
                         else f"; next renewal {c.next_attempt.isoformat()}"
                         if c.next_attempt else "")
                events.append(CertEvent(
                    EventKind.EXPIRING, c.id, now,
                    f"{what} {c.not_after.isoformat()}{renew}", c.names, c.serial, c.not_after,
                    c.last_code, failures=c.failures))
        if c.managed_by and c.failures and c.in_last_third(now):
            events.append(CertEvent(
                EventKind.RENEWAL_FAILING, c.id, now,
                f"renewal failed {c.failures} time(s) and the certificate expires "
                f"{c.not_after.isoformat()}: {c.last_error or 'no error text'}",
                c.names, c.serial, c.not_after, c.last_code, failures=c.failures))
    return events, frozenset(keep)


Clock = Callable[[], dt.datetime]


def _utcnow() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


class ExpiryMonitor:
    """Runs `expiry_alerts` over `source()` every `interval` seconds and emits the events."""

    def __init__(self, source: Callable[[], Iterable[CertStatus]], sink: EventSink, *,
                 warn_within: dt.timedelta = dt.timedelta(days=14), interval: float = 3600.0,
                 clock: Clock = _utcnow) -> None:
        self.source = source
        self.sink = sink
        self.warn_within = warn_within
        self.interval = interval
        self.clock = clock
        self.checks = 0
        self._warned: frozenset[ExpiryKey] = frozenset()
        self._task: asyncio.Task[None] | None = None

    def check(self) -> list[CertEvent]:
        """One check now; returns (and emits) its events."""
        events, self._warned = expiry_alerts(self.clock(), self.source(), self.warn_within,
                                             self._warned)
        self.checks += 1
        for e in events:
            self.sink.emit(e)
        return events

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name="expiry-monitor")

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def _run(self) -> None:
        while True:
            try:
                self.check()
            except Exception:
                logger.exception("certificate expiry check failed")
            await asyncio.sleep(self.interval)


# -- wiring --------------------------------------------------------------------------------------

class Events:
    """Every sink of the process from the `[events]` settings: logs always, the webhook when a
    URL is set, and the expiry monitor once `watch(source)` is called."""

    def __init__(self, settings: Any, *, clock: Clock = _utcnow) -> None:
        # `settings` is config.model.EventSettings (typed loosely: no config import needed here).
        self.settings = settings
        self.recent = RecordingSink(limit=200)
        sinks: list[EventSink] = [LogSink(), self.recent]
        self.webhook: WebhookSink | None = None
        if settings.webhook_url:
            self.webhook = WebhookSink(
                settings.webhook_url, timeout=settings.webhook_timeout,
                retries=settings.webhook_retries, backoff=settings.webhook_backoff,
                backoff_cap=settings.webhook_backoff_cap, queue_size=settings.webhook_queue,
                headers=dict(settings.webhook_headers))
            sinks.append(self.webhook)
        self.sink = FanOut(sinks)
        self.clock = clock
        self.monitor: ExpiryMonitor | None = None
        self.counts: Counter[str] = Counter()

    def emit(self, event: CertEvent) -> None:
        self.counts[event.kind.value] += 1
        self.sink.emit(event)

    def watch(self, source: Callable[[], Iterable[CertStatus]]) -> ExpiryMonitor:
        self.monitor = ExpiryMonitor(
            source, self, warn_within=dt.timedelta(days=self.settings.expiry_warning_days),
            interval=self.settings.check_interval, clock=self.clock)
        return self.monitor

    async def start(self) -> None:
        if self.webhook is not None:
            await self.webhook.start()
        if self.monitor is not None:
            self.monitor.start()

    async def stop(self) -> None:
        if self.monitor is not None:
            await self.monitor.stop()
        if self.webhook is not None:
            await self.webhook.stop()
