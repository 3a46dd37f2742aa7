"""The seams the Let's Encrypt state lives behind, in the style of certmagic: `Storage` (values by
key, each store atomic) and `Locker` (named locks with a lease that expires if the holder dies),
and the layout of the keys the feature uses.

Keys are `/`-separated relative names ("settings.json", "certs/www.json"). Implementations raise
`FileNotFoundError` for a key that is absent and any other `OSError` for a failed operation, with
`filename` naming where (a path, or the key): callers report it as it is. Two implementations
exist: `filestore.FileStorage` (the state directory, the default for one host) and
`memstore.MemoryStorage` (tests, and the shape a shared backend such as Redis will take).

Obtaining a certificate through these seams (certmagic's `obtainCert`): check storage, lock, check
storage again (another holder may have stored it meanwhile), order, store, unlock.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Protocol

logger = logging.getLogger(__name__)

# A lock's lease: a holder refreshes it every third of this while it holds the lock; a lock not
# refreshed for a whole lease belongs to a holder that died and is taken over. 20 s: far above
# any pause of a healthy event loop (blocking work runs on threads), short beside an order.
LOCK_LEASE = 20.0
# How often a waiter looks at a lock held by another process (a file cannot notify).
LOCK_POLL = 0.25

# -- the key layout (the state directory's file names, which existing installations hold) ----------

SETTINGS = "settings.json"        # directory URL, CA bundle, e-mail, renew period
ACCOUNT = "account.json"          # account URL ("Account ID") and e-mail
ACCOUNT_KEY = "account.key"       # the account key, PEM
JOURNAL = "challenges.json"       # challenges in progress (cleared at start)
ENTRIES = "certs"                 # certs/<id>.json: each certificate's template and status
ISSUED = "issued"                 # issued/<id>.json: the latest chain and key, for every holder
ANSWERS = "answers"               # answers/<token>.json: a cluster's challenge answers (cluster.py)
NODES = "nodes"                   # nodes/<node>/...: what belongs to one node of a cluster
STATE_FILES = (SETTINGS, ACCOUNT, ACCOUNT_KEY)


def entry_key(cert_id: str) -> str:
    return f"{ENTRIES}/{cert_id}.json"


def issued_key(cert_id: str) -> str:
    return f"{ISSUED}/{cert_id}.json"


def answer_key(token: str) -> str:
    return f"{ANSWERS}/{token}.json"


def journal_key(node: str | None) -> str:
    """The challenge journal: one per node of a cluster (each clears only its own leftovers)."""
    return JOURNAL if node is None else f"{NODES}/{node}/{JOURNAL}"


def obtain_lock(cert_id: str) -> str:
    """The lock held while a certificate is checked, ordered and stored."""
    return f"cert-{cert_id}"


# -- the seams ------------------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class KeyInfo:
    """What `Storage.stat` tells about a key."""

    key: str
    modified: dt.datetime
    size: int
    terminal: bool = True   # False for a "directory" (a prefix of other keys)


class Storage(Protocol):
    """Values by key. `store` is atomic: a reader sees the old value or the new, never a mix."""

    async def load(self, key: str) -> bytes: ...

    async def store(self, key: str, value: bytes) -> None: ...

    async def delete(self, key: str) -> None:
        """Remove a key (and, for a prefix, every key below it); absent is not an error."""
        ...

    async def exists(self, key: str) -> bool: ...

    async def list(self, prefix: str) -> list[str]:
        """The keys directly below `prefix`, sorted (not recursive)."""
        ...

    async def stat(self, key: str) -> KeyInfo: ...

    def describe(self, key: str) -> str:
        """Where a key lives, for messages (a file's path)."""
        ...


class Locker(Protocol):
    """Named locks across every instance sharing a storage. A lock is held under a lease the
    holder keeps extending; if the holder dies the lease runs out and another may take it."""

    async def lock(self, name: str) -> None:
        """Wait until `name` is ours (the caller bounds the wait with a deadline)."""
        ...

    async def unlock(self, name: str) -> None: ...


@contextlib.asynccontextmanager
async def locked(locker: Locker, name: str) -> AsyncIterator[None]:
    """Hold `name` for the body; released however the body ends (cancellation included)."""
    await locker.lock(name)
    try:
        yield
    finally:
        await locker.unlock(name)


async def load_or_none(storage: Storage, key: str) -> bytes | None:
    try:
        return await storage.load(key)
    except FileNotFoundError:
        return None
