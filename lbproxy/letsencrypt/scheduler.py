"""When orders run: the list of what is due (from policy.py), the background loop that sleeps
until the next one (clock and sleep injected, so a simulated year runs in seconds), ARI refresh,
and the bookkeeping of running orders (one per certificate at a time)."""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import heapq
import logging
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any

from acmeclient.errors import AcmeError

from ..certs.store import CertStore
from . import policy
from .codes import classify
from .issuer import Issuer
from .model import Clock, Entry
from .state import LeState

logger = logging.getLogger(__name__)

# The loop re-evaluates at least this often even with nothing due (wall clock jumps, ARI
# refresh); wake() makes it look at once.
MAX_SLEEP = 3600.0
# Never sleep less than this between two looks (a due time in the past is started by run_due).
MIN_SLEEP = 1.0
# The loop keeps each certificate's next attempt and next renewalInfo fetch in a heap, recomputed
# only for the certificate whose order just ended, or for all on wake(); once a day it recomputes
# all anyway, in case a change reached an entry without a wake(). (Recomputing every entry at
# every look made a simulated year of 1,000 certificates cost minutes of CPU.)
FULL_REPLAN = dt.timedelta(days=1)
# "Due at once" in the heap (a certificate never issued): before any real instant.
_AT_ONCE = dt.datetime.min.replace(tzinfo=dt.UTC)

Sleep = Callable[[float], Awaitable[None]]
Obtain = Callable[[Entry, bool], Coroutine[Any, Any, None]]


class Scheduler:
    """Starts due orders through `obtain(entry, manual)`; tracks them until they end."""

    def __init__(self, state: LeState, store: CertStore, issuer: Issuer, obtain: Obtain, *,
                 clock: Clock, sleep: Sleep = asyncio.sleep) -> None:
        self.state = state
        self.store = store
        self.issuer = issuer
        self._obtain = obtain
        self.clock = clock
        self.sleep = sleep
        self.running: dict[str, asyncio.Task[None]] = {}
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        # The plan: id -> next attempt / next renewalInfo fetch, and heaps of (time, id) over
        # them (an item whose time no longer matches the plan is stale and skipped).
        self._attempt_at: dict[str, dt.datetime] = {}
        self._ari_at: dict[str, dt.datetime] = {}
        self._attempts: list[tuple[dt.datetime, str]] = []
        self._aris: list[tuple[dt.datetime, str]] = []
        self._stale: set[str] = set()
        self._replan_all_at: dt.datetime | None = None   # None: recompute every entry

    # -- lifecycle --------------------------------------------------------------------------------

    def start(self) -> None:
        self._task = asyncio.create_task(self._loop(), name="le-scheduler")

    async def stop(self) -> None:
        tasks = [t for t in (self._task, *self.running.values()) if t is not None]
        for t in tasks:
            t.cancel()
        for t in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await t
        self._task = None
        self.running.clear()

    def wake(self) -> None:
        """Look at the schedule now (after a clock change in tests, or a settings change)."""
        self._replan_all_at = None
        self._wake.set()

    # -- orders ---------------------------------------------------------------------------------

    def launch(self, entry: Entry, *, manual: bool = False) -> asyncio.Task[None]:
        running = self.running.get(entry.id)
        if running is not None and not running.done():
            return running  # one order per certificate at a time
        task = asyncio.create_task(self._obtain(entry, manual), name=f"le-{entry.id}")
        self.running[entry.id] = task
        cert_id = entry.id
        task.add_done_callback(lambda t: self._done(cert_id, t))
        return task

    def _done(self, cert_id: str, task: asyncio.Task[None]) -> None:
        if self.running.get(cert_id) is task:
            del self.running[cert_id]
        self._stale.add(cert_id)   # only this certificate's plan changed
        self._wake.set()

    async def cancel(self, cert_id: str) -> None:
        running = self.running.pop(cert_id, None)
        if running is not None:
            running.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await running

    async def wait_idle(self) -> None:
        """Wait for every running order to end (tests, shutdown of a CLI run)."""
        while self.running:
            await asyncio.gather(*self.running.values(), return_exceptions=True)

    # -- the schedule ---------------------------------------------------------------------------

    def validity(self, cert_id: str) -> policy.Validity | None:
        info = self.store.get(cert_id)
        return policy.Validity(info.not_before, info.not_after) if info else None

    def due(self, now: dt.datetime) -> list[tuple[dt.datetime, Entry]]:
        """(next attempt, entry) for every auto-renewing certificate, earliest first."""
        out = []
        for e in self.state.entries.values():
            if not e.auto_renew:
                continue
            when = policy.next_attempt(now, self.validity(e.id),
                                       self.state.settings.renew_period_days, e.ari,
                                       e.failures, jitter=e.jitter)
            out.append((when, e))
        return sorted(out, key=lambda p: p[0])

    async def run_due(self) -> int:
        """Start every order that is due now (and refresh ARI windows); returns how many.
        Everything is recomputed first: a caller may have changed any entry."""
        self._replan_all_at = None
        return await self._step(self.clock())

    def _replan(self, now: dt.datetime) -> None:
        if self._replan_all_at is None or now >= self._replan_all_at:
            ids: set[str] = set(self.state.entries) | set(self._attempt_at) | set(self._ari_at)
            self._replan_all_at = now + FULL_REPLAN
            self._stale.clear()
            self._attempts.clear()   # rebuilt below, without the stale items
            self._aris.clear()
            self._attempt_at.clear()
            self._ari_at.clear()
        else:
            ids, self._stale = self._stale, set()
        for cid in ids:
            self._plan(cid)

    def _plan(self, cid: str) -> None:
        """Recompute one certificate's next attempt and next renewalInfo fetch."""
        self._attempt_at.pop(cid, None)
        self._ari_at.pop(cid, None)
        e = self.state.entries.get(cid)
        if e is None or not e.auto_renew:
            return
        validity = self.validity(cid)
        when = policy.planned_attempt(validity, self.state.settings.renew_period_days, e.ari,
                                      e.failures, jitter=e.jitter) or _AT_ONCE
        self._attempt_at[cid] = when
        heapq.heappush(self._attempts, (when, cid))
        if validity is not None:
            ari = _AT_ONCE if e.ari_checked is None else policy.next_ari_check(
                e.ari_checked, e.ari, validity)
            if e.ari_checked is not None and ari <= e.ari_checked:
                return   # expired since the last check: renewalInfo is not asked again
            self._ari_at[cid] = ari
            heapq.heappush(self._aris, (ari, cid))

    @staticmethod
    def _top(heap: list[tuple[dt.datetime, str]],
             plan: dict[str, dt.datetime]) -> tuple[dt.datetime, str] | None:
        """The earliest item of `heap` that is still the plan (stale ones dropped)."""
        while heap:
            when, cid = heap[0]
            if plan.get(cid) == when:
                return heap[0]
            heapq.heappop(heap)
        return None

    async def _step(self, now: dt.datetime) -> int:
        self._replan(now)
        if self.state.account is None:
            return 0
        while (top := self._top(self._aris, self._ari_at)) is not None and top[0] <= now:
            heapq.heappop(self._aris)
            cid = top[1]
            del self._ari_at[cid]
            e = self.state.entries.get(cid)
            if e is not None and cid not in self.running:   # an ending order replans it
                await self._refresh_ari(e, now)
                self._plan(cid)
        started = 0
        while (top := self._top(self._attempts, self._attempt_at)) is not None and (
                top[0] <= now):
            heapq.heappop(self._attempts)
            cid = top[1]
            del self._attempt_at[cid]
            e = self.state.entries.get(cid)
            if e is not None and cid not in self.running:
                self.launch(e)
                started += 1
        return started

    def _next_wake(self) -> dt.datetime | None:
        times = [t[0] for t in (self._top(self._attempts, self._attempt_at),
                                self._top(self._aris, self._ari_at)) if t is not None]
        return min(times) if times else None

    async def _refresh_ari(self, e: Entry, now: dt.datetime) -> None:
        """Fetch one certificate's renewalInfo; its entry is written only when the window
        changed (a fetch every six hours per certificate must not mean a state write)."""
        s = self.state
        e.ari_checked = now   # set first: a check that cannot run is not retried in a loop
        material = self.store.material(e.id)
        if s.account is None or material is None:
            return
        try:
            ri = await self.issuer.renewal_info(s.settings, s.account,
                                                material.chain_pem.decode())
        except (AcmeError, TimeoutError, ValueError) as exc:  # the period window stands
            logger.info("renewalInfo for %s not available: %s", e.id, exc)
            s.count("renewal_info", classify(exc, action="renewalInfo").code)
            return
        s.count("renewal_info", None)
        if ri is None:
            return
        ari = policy.AriWindow(ri.start, ri.end, ri.retry_after)
        if ari != e.ari:
            e.ari = ari
            await s.save_entry(e)

    async def _loop(self) -> None:
        while True:
            try:
                await self._step(self.clock())
            except asyncio.CancelledError:
                raise
            except Exception:
                logger.exception("Let's Encrypt scheduler step failed")
            now = self.clock()
            nxt = self._next_wake()
            delay = MAX_SLEEP
            if nxt is not None:
                delay = min(MAX_SLEEP, max(MIN_SLEEP, (nxt - now).total_seconds()))
            self._wake.clear()
            await self._nap(delay)

    async def _nap(self, delay: float) -> None:
        """`sleep(delay)`, cut short by wake()."""
        woken = asyncio.ensure_future(self._wake.wait())
        napping = asyncio.ensure_future(self.sleep(delay))
        try:
            await asyncio.wait((woken, napping), return_when=asyncio.FIRST_COMPLETED)
        finally:
            for f in (woken, napping):
                f.cancel()
            await asyncio.gather(woken, napping, return_exceptions=True)
