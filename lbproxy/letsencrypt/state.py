"""What the Let's Encrypt feature knows at run time (settings, account, managed certificates,
damaged state files, counters) and how settings and certificates are read from and written to
`Storage`. Every component of the feature shares one `LeState`."""

from __future__ import annotations

import json
import logging
from collections import Counter
from dataclasses import dataclass, field

from ..certs.store import check_id, storage_error, valid_id
from ..errors import StoreError
from .blocking import CpuWorkers
from .codes import AcmeLog, LeError
from .model import Account, Entry, Settings, dump
from .storage import SETTINGS, Storage, entry_key, load_or_none

logger = logging.getLogger(__name__)


@dataclass(slots=True)
class LeState:
    """The feature's run-time state; `storage` holds its persistent part."""

    storage: Storage
    log: AcmeLog
    settings: Settings
    account: Account | None = None
    account_problem: LeError | None = None
    entries: dict[str, Entry] = field(default_factory=dict)
    # State files found damaged at start: certificate id (or file name) -> what is wrong,
    # naming the path. Never silently used, never overwritten by the manager.
    damaged: dict[str, str] = field(default_factory=dict)
    orders_placed: int = 0
    # ACME operations by (operation, result): result "success" or the LoadMaster code.
    acme_requests: Counter[tuple[str, str]] = field(default_factory=Counter)
    # Low-priority threads for CPU-bound work (RSA keys, scrypt), shared by every part.
    cpu: CpuWorkers = field(default_factory=CpuWorkers)

    def count(self, operation: str, code: int | None) -> None:
        self.acme_requests[(operation, "success" if code is None else str(int(code)))] += 1

    def problem(self, err: LeError) -> LeError:
        """Write a problem to the System Message File; returns it for `raise`."""
        self.log.problem(err)
        return err

    # -- reading --------------------------------------------------------------------------------

    async def load_settings(self) -> None:
        where = self.storage.describe(SETTINGS)
        try:
            data = await load_or_none(self.storage, SETTINGS)
            if data is not None:
                self.settings = Settings.from_json(json.loads(data))
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
            self.damaged[SETTINGS] = f"{where}: {exc}"
            self.log.error(f"{where} is damaged ({exc}); using the config file's settings, "
                           "the file is left as it is")

    async def load_entries(self) -> None:
        for key in await self.storage.list("certs"):
            if not key.endswith(".json"):
                continue
            stem = key.rsplit("/", 1)[1].removesuffix(".json")
            where = self.storage.describe(key)
            try:
                e = Entry.from_json(json.loads(await self.storage.load(key)))
                if e.id != stem:
                    raise ValueError(f"it names certificate {e.id!r}")
                if not valid_id(e.id):
                    raise ValueError(f"{e.id!r} is not a valid certificate id")
            except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
                self.damaged[stem] = f"{where}: {exc}"
                self.log.error(f"certificate metadata {where} is damaged ({exc}); certificate "
                               f"{stem} is not renewed until the file is repaired or removed")
                continue
            self.entries[e.id] = e

    # -- writing --------------------------------------------------------------------------------

    async def write(self, key: str, data: bytes, what: str) -> None:
        """An atomic state write; a failure is a StoreError naming the file and the cause."""
        try:
            await self.storage.store(key, data)
        except OSError as exc:
            raise storage_error(what, exc, self.storage.describe(key)) from None

    async def save_settings(self) -> None:
        await self.write(SETTINGS, dump(self.settings.to_json()),
                         "Let's Encrypt settings not stored")
        self.damaged.pop(SETTINGS, None)

    async def save_entry(self, e: Entry) -> None:
        check_id(e.id)
        await self.write(entry_key(e.id), dump(e.to_json()),
                         f"certificate {e.id} status not stored")

    async def save_entry_or_report(self, e: Entry) -> None:
        """Persist status after an order; a failed write is reported, the order's outcome and
        the in-memory status stand (the next successful write catches up)."""
        try:
            await self.save_entry(e)
        except StoreError as exc:
            self.log.error(str(exc))

    async def forget_entry(self, cert_id: str) -> None:
        check_id(cert_id)
        await self.storage.delete(entry_key(cert_id))

    def entry(self, cert_id: str) -> Entry:
        entry = self.entries.get(cert_id)
        if entry is None:
            raise StoreError(f"no Let's Encrypt certificate {cert_id!r}", status=404)
        return entry
