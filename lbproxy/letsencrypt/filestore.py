"""The state directory as `Storage` and `Locker`: one file per key under
`<state_dir>/letsencrypt/`, written atomically (temp file, fsync, rename, fsync of the directory)
on a worker thread, and lock files whose lease is their modification time.

The layout is the one lbproxy always had (settings.json, account.json, account.key,
certs/<id>.json, challenges.json), so existing state is read as it is; new keys add directories
(issued/, locks/). Every path built from a key goes through `files.safe_path`. What a crash
mid-write leaves (`.tmp-*`) is removed when the storage is opened, before anything writes.

A lock is `locks/<name>.lock`, created exclusively (O_EXCL). Its holder touches it every third
of the lease; a waiter takes over a lock untouched for a whole lease, or at once one whose holder
(named in the file: host, pid) is a process of this host that no longer exists (kill -9).
Creating the file needs no data block, so a full disk still locks; the owner line in it is
written when it can be.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import json
import logging
import os
import secrets
import shutil
import socket
import stat
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

from ..certs.files import TMP_PREFIX, mkdir_private, remove_debris, safe_path, write_atomic
from .blocking import on_thread as _on_thread
from .storage import ENTRIES, LOCK_LEASE, LOCK_POLL, KeyInfo

logger = logging.getLogger(__name__)

LOCKS = "locks"

class FileStorage:
    """`Storage` and `Locker` on a directory (0700; files 0600)."""

    def __init__(self, root: Path, *, lease: float = LOCK_LEASE, poll: float = LOCK_POLL,
                 clock: Callable[[], float] = time.time,
                 sleep: Callable[[float], Awaitable[None]] = asyncio.sleep) -> None:
        self.root = Path(root)
        self.lease = lease
        self.poll = poll
        self._clock = clock   # wall time: other processes read the leases
        self._sleep = sleep
        self._host = socket.gethostname()
        self._owner = f"{self._host}:{os.getpid()}:{secrets.token_hex(8)}"
        self._held: dict[str, asyncio.Task[None]] = {}
        mkdir_private(self.root)
        mkdir_private(self.root / ENTRIES)
        for d in (self.root, self.root / ENTRIES):  # nothing writes there before this
            remove_debris(d)

    # -- Storage ---------------------------------------------------------------------------------

    def path(self, key: str) -> Path:
        """The file of a key; never outside the root (UnsafePathError otherwise)."""
        return safe_path(self.root, *key.split("/"))

    def describe(self, key: str) -> str:
        return str(self.root.joinpath(*key.split("/")))

    async def load(self, key: str) -> bytes:
        return await _on_thread(self.path(key).read_bytes)

    async def store(self, key: str, value: bytes) -> None:
        path = self.path(key)

        def write() -> None:
            if path.parent != self.root and not path.parent.is_dir():
                mkdir_private(path.parent)
            write_atomic(path, value)
        await _on_thread(write)

    async def delete(self, key: str) -> None:
        path = self.path(key)

        def remove() -> None:
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path)
            else:
                with contextlib.suppress(FileNotFoundError):
                    path.unlink()
        await _on_thread(remove)

    async def exists(self, key: str) -> bool:
        return await _on_thread(self.path(key).exists)

    async def list(self, prefix: str) -> list[str]:
        directory = self.path(prefix) if prefix else self.root

        def names() -> list[str]:
            try:
                return sorted(p.name for p in directory.iterdir()
                              if not p.name.startswith(TMP_PREFIX))
            except FileNotFoundError:
                return []
        base = f"{prefix.rstrip('/')}/" if prefix else ""
        return [base + n for n in await _on_thread(names)]

    async def stat(self, key: str) -> KeyInfo:
        path = self.path(key)
        st = await _on_thread(lambda: os.stat(path))
        return KeyInfo(key, dt.datetime.fromtimestamp(st.st_mtime, dt.UTC), st.st_size,
                       terminal=not stat.S_ISDIR(st.st_mode))

    # -- Locker ----------------------------------------------------------------------------------

    def _lock_path(self, name: str) -> Path:
        return safe_path(self.root, LOCKS, f"{name}.lock")

    async def lock(self, name: str) -> None:
        if name in self._held:
            raise RuntimeError(f"lock {name} is already held by this instance")
        path = self._lock_path(name)
        while not await _on_thread(lambda: self._try_create(path)):
            if await _on_thread(lambda: self._stale(path)):
                continue
            await self._sleep(self.poll)
        self._held[name] = asyncio.create_task(self._keep(name, path), name=f"lease-{name}")

    async def unlock(self, name: str) -> None:
        keeper = self._held.pop(name, None)
        if keeper is None:
            return
        keeper.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await keeper
        path = self._lock_path(name)

        def release() -> None:
            if self._owner_of(path) in (self._owner, ""):
                with contextlib.suppress(FileNotFoundError):
                    path.unlink()
            else:
                logger.error("lock %s was taken over while held (its lease ran out)", path)
        await _on_thread(release)

    def _try_create(self, path: Path) -> bool:
        if not path.parent.is_dir():
            mkdir_private(path.parent)
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            return False
        try:
            os.write(fd, json.dumps({"owner": self._owner, "host": self._host,
                                     "pid": os.getpid()}).encode())
        except OSError as exc:  # a full disk: the lock holds, without its owner line
            logger.info("lock %s taken without its owner line: %s", path, exc.strerror or exc)
        finally:
            os.close(fd)
        return True

    @staticmethod
    def _read(path: Path) -> dict[str, object]:
        try:
            d = json.loads(path.read_bytes() or b"{}")
        except (OSError, ValueError):
            return {}
        return d if isinstance(d, dict) else {}

    def _owner_of(self, path: Path) -> str:
        return str(self._read(path).get("owner", ""))

    def _stale(self, path: Path) -> bool:
        """Remove the lock if its holder is gone; True if it was removed (or is gone)."""
        try:
            age = self._clock() - path.stat().st_mtime
        except FileNotFoundError:
            return True
        d = self._read(path)
        pid = d.get("pid")
        dead = (d.get("host") == self._host and isinstance(pid, int)
                and pid != os.getpid() and not _alive(pid))
        if age <= self.lease and not dead:
            return False
        why = f"process {pid} is gone" if dead else f"not refreshed for {age:.0f} s"
        logger.warning("taking over lock %s of %s: %s", path, d.get("owner", "?"), why)
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
        return True

    async def _keep(self, name: str, path: Path) -> None:
        """Extend the lease while the lock is held."""
        while True:
            await self._sleep(self.lease / 3)
            try:
                await _on_thread(lambda: os.utime(path))
            except OSError as exc:
                logger.error("cannot extend the lease of lock %s: %s", path,
                             exc.strerror or exc)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True
