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

from acmeclient.errors import AcmeError, NetworkError

from ..certs.store import CertStore
from . import policy
from .codes import classify
from .issuer import Issuer, ServedCertIds
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
# renewalInfo checks run on a grid of this step: a check is made at the first grid point at or
# after its time (RFC 9773 §4.3.3 asks to poll again *after* Retry-After; a few minutes late is
# harmless beside the ~6 h it is), so all checks falling in one step share one wake-up instead of
# one wake-up each (1,000 certificates polled every 6 h: 4,000 wake-ups a day, now at most 96).
ARI_BATCH = dt.timedelta(minutes=15)
_EPOCH = dt.datetime(2000, 1, 1, tzinfo=dt.UTC)
# This many renewalInfo fetches in a row that could not reach the CA (network error, timeout)
# end a pass: the CA is down. Fewer would let one flaky connection postpone every check.
UNREACHABLE_AFTER = 3
# "Due at once" in the heap (a certificate never issued): before any real instant.
_AT_ONCE = dt.datetime.min.replace(tzinfo=dt.UTC)
# LeState.count("renewal_info", None)'s key, counted inline on the fetch path.
_ARI_SUCCESS = ("renewal_info", "success")

Sleep = Callable[[float], Awaitable[None]]


def ari_grid(when: dt.datetime) -> dt.datetime:
    """The first ARI_BATCH grid point at or after `when`."""
    if when <= _AT_ONCE:
        return when
    steps = -((_EPOCH - when) // ARI_BATCH)   # ceil((when - epoch) / step)
    return _EPOCH + steps * ARI_BATCH
Obtain = Callable[[Entry, bool], Coroutine[Any, Any, None]]


class Scheduler:
    """Starts due orders through `obtain(entry, manual)`; tracks them until they end."""

    def __init__(self, state: LeState, store: CertStore, issuer: Issuer, obtain: Obtain, *,
                 clock: Clock, sleep: Sleep = asyncio.sleep,
                 cert_ids: ServedCertIds | None = None) -> None:
        self.state = state
        self.store = store
        self.issuer = issuer
        self._obtain = obtain
        self.clock = clock
        self.sleep = sleep
        self.running: dict[str, asyncio.Task[None]] = {}
        # wake(): look again at once. The flag is cleared before each look, so a wake-up that
        # comes during one is not lost; a nap in progress is cancelled.
        self._woken = False
        self._napping: asyncio.Future[None] | None = None
        self._task: asyncio.Task[None] | None = None
        # The plan: id -> next attempt / next renewalInfo fetch, and heaps of (time, id) over
        # them (an item whose time no longer matches the plan is stale and skipped).
        self._attempt_at: dict[str, dt.datetime] = {}
        self._ari_at: dict[str, dt.datetime] = {}
        self._attempts: list[tuple[dt.datetime, str]] = []
        self._aris: list[tuple[dt.datetime, str]] = []
        self._stale: set[str] = set()
        self._replan_all_at: dt.datetime | None = None   # None: recompute every entry
        self.cert_ids = cert_ids or ServedCertIds(store)
        # id -> (the store's CertInfo, its Validity): made once per certificate served.
        self._validities: dict[str, tuple[object, policy.Validity]] = {}
        self._planned_from: dict[str, tuple[object, ...]] = {}   # id -> _inputs() at _plan

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
        self._poke()

    def _poke(self) -> None:
        self._woken = True
        if self._napping is not None:
            self._napping.cancel()

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
        self._poke()

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
        if info is None:
            return None
        known = self._validities.get(cert_id)
        if known is not None and known[0] is info:
            return known[1]
        validity = policy.Validity(info.not_before, info.not_after)
        self._validities[cert_id] = (info, validity)
        return validity

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
            self._replan_all_at = now + FULL_REPLAN
            self._stale.clear()
            entries = self.state.entries
            for cid in set(entries) | set(self._attempt_at) | set(self._ari_at):
                e = entries.get(cid)
                if (e is None or cid not in self._attempt_at
                        or self._planned_from.get(cid) != self._inputs(e)):
                    self._plan(cid)
            # the heaps again, without their stale items (in place: a pass may hold them)
            self._attempts[:] = [(w, c) for c, w in self._attempt_at.items()]
            heapq.heapify(self._attempts)
            self._aris[:] = [(w, c) for c, w in self._ari_at.items()]
            heapq.heapify(self._aris)
            return
        ids, self._stale = self._stale, set()
        for cid in ids:
            self._plan(cid)

    def _inputs(self, e: Entry) -> tuple[object, ...]:
        """What a certificate's plan is computed from (`_plan` is a pure function of it and
        of `ari_checked`, which only a renewalInfo check moves, and the check replans its next
        one itself): a full replan recomputes only the certificates where one of them changed."""
        return (e, self.store.get(e.id), e.auto_renew, e.ari, e.failures, e.jitter,
                self.state.settings.renew_period_days)

    def _plan(self, cid: str) -> None:
        """Recompute one certificate's next attempt and next renewalInfo fetch."""
        self._attempt_at.pop(cid, None)
        self._ari_at.pop(cid, None)
        e = self.state.entries.get(cid)
        if e is None:
            self._validities.pop(cid, None)
            self.cert_ids.forget(cid)
            self._planned_from.pop(cid, None)
            return
        self._planned_from[cid] = self._inputs(e)
        if not e.auto_renew:
            return
        validity = self.validity(cid)
        when = policy.planned_attempt(validity, self.state.settings.renew_period_days, e.ari,
                                      e.failures, jitter=e.jitter) or _AT_ONCE
        self._attempt_at[cid] = when
        heapq.heappush(self._attempts, (when, cid))
        if validity is not None:
            self._plan_ari(e, validity)

    def _plan_ari(self, e: Entry, validity: policy.Validity) -> None:
        """Put one certificate's next renewalInfo check in the plan."""
        ari = _AT_ONCE if e.ari_checked is None else policy.next_ari_check(
            e.ari_checked, e.ari, validity)
        if e.ari_checked is not None and ari <= e.ari_checked:
            return   # expired since the last check: renewalInfo is not asked again
        self._ari_at[e.id] = ari
        heapq.heappush(self._aris, (ari, e.id))

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
        await self._check_aris(now)
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
        times = []
        if (attempt := self._top(self._attempts, self._attempt_at)) is not None:
            times.append(attempt[0])
        if (ari := self._top(self._aris, self._ari_at)) is not None:
            times.append(ari_grid(ari[0]))
        return min(times) if times else None

    async def _check_aris(self, now: dt.datetime) -> None:
        """Every renewalInfo check due by `now`, in one pass. A window that did not change
        moves only the next check (the attempt stands); a new window replans the certificate.
        After UNREACHABLE_AFTER fetches in a row could not reach the CA, the rest of the pass
        waits for the next grid point: a CA that is down costs a few timeouts per pass, not
        one per certificate (one reset connection alone postpones nothing)."""
        misses = 0
        aris, plan, entries = self._aris, self._ari_at, self.state.entries
        while aris and aris[0][0] <= now:
            when, cid = heapq.heappop(aris)
            if plan.get(cid) != when:
                continue   # stale
            del plan[cid]
            e = entries.get(cid)
            if e is None or cid in self.running:   # an ending order replans it
                continue
            if misses >= UNREACHABLE_AFTER:
                self._postponed(cid, now)
                continue
            changed, unreachable = await self._refresh_ari(e, now)
            misses = misses + 1 if unreachable else 0
            if changed:
                self._plan(cid)
            elif (validity := self.validity(cid)) is not None:
                self._plan_ari(e, validity)

    def _postponed(self, cid: str, now: dt.datetime) -> None:
        """To the next grid point (after `now`, so this pass does not see it again)."""
        when = ari_grid(now + ARI_BATCH)
        self._ari_at[cid] = when
        heapq.heappush(self._aris, (when, cid))

    async def _refresh_ari(self, e: Entry, now: dt.datetime) -> tuple[bool, bool]:
        """Fetch one certificate's renewalInfo: (the window changed, the CA was unreachable).
        Its entry is written only when the window changed (a fetch every six hours per
        certificate must not mean a state write)."""
        s = self.state
        e.ari_checked = now   # set first: a check that cannot run is not retried in a loop
        if s.account is None:
            return False, False
        ident = self.cert_ids(e.id)
        if ident is None:
            return False, False
        try:
            ri = await self.issuer.renewal_info(s.settings, s.account, ident)
        except (AcmeError, TimeoutError, ValueError) as exc:  # the period window stands
            logger.info("renewalInfo for %s not available: %s", e.id, exc)
            s.count("renewal_info", classify(exc, action="renewalInfo").code)
            return False, isinstance(exc, NetworkError | TimeoutError)
        s.acme_requests[_ARI_SUCCESS] += 1
        if ri is None:
            return False, False
        old = e.ari
        if old is not None and (old.start, old.end, old.retry_after) == (
                ri.start, ri.end, ri.retry_after):
            return False, False
        e.ari = policy.AriWindow(ri.start, ri.end, ri.retry_after)
        await s.save_entry(e)
        return True, False

    async def _loop(self) -> None:
        while True:
            self._woken = False   # a wake() from here on makes the nap below return at once
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
            await self._nap(delay)

    async def _nap(self, delay: float) -> None:
        """`sleep(delay)`, cut short by wake() (which cancels it)."""
        if self._woken:
            return
        napping = self._napping = asyncio.ensure_future(self.sleep(delay))
        try:
            await napping
        except asyncio.CancelledError:
            current = asyncio.current_task()
            if not self._woken or (current is not None and current.cancelling()):
                raise   # stop(), not wake()
        finally:
            self._napping = None
