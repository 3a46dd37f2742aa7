"""`Storage` and `Locker` in memory: for tests (several managers sharing one in a process) and as
the smallest picture of what a shared backend must do (atomic values, leased locks)."""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from .storage import LOCK_LEASE, KeyInfo

logger = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class _Value:
    data: bytes
    modified: dt.datetime


@dataclass(slots=True)
class _Lease:
    holder: int          # which lock() call holds it
    expires: float       # monotonic seconds


class MemoryStorage:
    """Values in a dict; locks with leases that only their holder's refresher extends."""

    def __init__(self, *, lease: float = LOCK_LEASE,
                 clock: Callable[[], float] = time.monotonic,
                 sleep: Callable[[float], Awaitable[None]] = asyncio.sleep) -> None:
        self.lease = lease
        self._clock = clock
        self._sleep = sleep
        self._values: dict[str, _Value] = {}
        self._leases: dict[str, _Lease] = {}
        self._keepers: dict[str, asyncio.Task[None]] = {}
        self._released = asyncio.Event()
        self._next_holder = 0

    # -- Storage ---------------------------------------------------------------------------------

    def describe(self, key: str) -> str:
        return f"memory:{key}"

    async def load(self, key: str) -> bytes:
        v = self._values.get(key)
        if v is None:
            raise FileNotFoundError(2, "no such key", self.describe(key))
        return v.data

    async def store(self, key: str, value: bytes) -> None:
        self._values[key] = _Value(bytes(value), dt.datetime.now(dt.UTC))

    async def delete(self, key: str) -> None:
        below = key.rstrip("/") + "/"
        for k in [k for k in self._values if k == key or k.startswith(below)]:
            del self._values[k]

    async def exists(self, key: str) -> bool:
        below = key.rstrip("/") + "/"
        return key in self._values or any(k.startswith(below) for k in self._values)

    async def list(self, prefix: str) -> list[str]:
        base = f"{prefix.rstrip('/')}/" if prefix else ""
        out = set()
        for k in self._values:
            if k.startswith(base):
                out.add(base + k[len(base):].split("/", 1)[0])
        return sorted(out)

    async def stat(self, key: str) -> KeyInfo:
        v = self._values.get(key)
        if v is not None:
            return KeyInfo(key, v.modified, len(v.data))
        if await self.exists(key):
            return KeyInfo(key, dt.datetime.now(dt.UTC), 0, terminal=False)
        raise FileNotFoundError(2, "no such key", self.describe(key))

    # -- Locker ----------------------------------------------------------------------------------

    async def lock(self, name: str) -> None:
        self._next_holder += 1
        me = self._next_holder
        while True:
            lease = self._leases.get(name)
            now = self._clock()
            if lease is None or lease.expires <= now:
                if lease is not None:
                    logger.warning("taking over lock %s: its lease ran out", name)
                self._leases[name] = _Lease(me, now + self.lease)
                self._keepers[name] = asyncio.create_task(self._keep(name, me),
                                                          name=f"lease-{name}")
                return
            # Woken by any unlock, or when this lease would run out.
            self._released.clear()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(max(0.0, lease.expires - now)):
                    await self._released.wait()

    async def unlock(self, name: str) -> None:
        keeper = self._keepers.pop(name, None)
        if keeper is not None:
            keeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await keeper
        self._leases.pop(name, None)
        self._released.set()

    def expire(self, name: str) -> None:
        """Let the lease of `name` run out now, as if its holder had died (tests)."""
        keeper = self._keepers.pop(name, None)
        if keeper is not None:
            keeper.cancel()
        lease = self._leases.get(name)
        if lease is not None:
            lease.expires = self._clock()
        self._released.set()

    async def _keep(self, name: str, holder: int) -> None:
        while True:
            await self._sleep(self.lease / 3)
            lease = self._leases.get(name)
            if lease is None or lease.holder != holder:
                return
            lease.expires = self._clock() + self.lease
