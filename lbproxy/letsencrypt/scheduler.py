"""When orders run: the list of what is due (from policy.py), the background loop that sleeps
until the next one (clock and sleep injected, so a simulated year runs in seconds), ARI refresh,
and the bookkeeping of running orders (one per certificate at a time)."""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
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
        self.wake()

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
        """Start every order that is due now (and refresh ARI windows); returns how many."""
        now = self.clock()
        await self._refresh_ari(now)
        started = 0
        for when, e in self.due(now):
            if when > now:
                break
            if e.id not in self.running and self.state.account is not None:
                self.launch(e)
                started += 1
        return started

    async def _refresh_ari(self, now: dt.datetime) -> None:
        s = self.state
        if s.account is None:
            return
        for e in list(s.entries.values()):
            info = self.store.get(e.id)
            material = self.store.material(e.id)
            if not e.auto_renew or info is None or material is None or e.id in self.running:
                continue
            validity = policy.Validity(info.not_before, info.not_after)
            if e.ari_checked is not None and now < policy.next_ari_check(
                    e.ari_checked, e.ari, validity):
                continue
            e.ari_checked = now
            try:
                ri = await self.issuer.renewal_info(s.settings, s.account,
                                                    material.chain_pem.decode())
            except (AcmeError, TimeoutError, ValueError) as exc:  # the period window stands
                logger.info("renewalInfo for %s not available: %s", e.id, exc)
                s.count("renewal_info", classify(exc, action="renewalInfo").code)
                ri = None
            else:
                s.count("renewal_info", None)
            if ri is not None:
                e.ari = policy.AriWindow(ri.start, ri.end, ri.retry_after)
            await s.save_entry(e)

    async def _loop(self) -> None:
        while True:
            try:
                await self.run_due()
            except asyncio.CancelledError:
                raise
            except Exception:
                logger.exception("Let's Encrypt scheduler step failed")
            now = self.clock()
            pending = [w for w, e in self.due(now) if e.id not in self.running]
            delay = MAX_SLEEP
            if pending:
                delay = min(MAX_SLEEP, max(MIN_SLEEP, (pending[0] - now).total_seconds()))
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
