"""The operator's commands on one managed certificate: request it, renew it now, delete it.

Each checks what it is asked whole before anything is written or sent to the CA, hands the order
itself to the scheduler, and answers with the certificate's view (views.py). The certificates a
config file declares come and go through `LEManager.sync_config` instead.
"""

from __future__ import annotations

import asyncio
from typing import Any

from ..certs.store import CertStore
from ..config.writer import ConfigFile, remove_certificate_edit
from ..errors import StoreError
from ..events import CertEvent, EventKind, EventSink
from ..runtime import RuntimeStore
from .account import Accounts
from .blocking import on_thread
from .checks import check_new_id, validate_template
from .codes import AcmeCode, AcmeLog, LeError
from .model import Clock, Entry, Jitter, Template
from .scheduler import Scheduler
from .solvers import Solvers
from .state import LeState
from .storage import Storage, issued_key
from .views import Views


class CertCommands:
    """Request, renew, delete; `clustered`: other nodes share the state (a request may join
    theirs)."""

    def __init__(self, state: LeState, store: CertStore, runtime: RuntimeStore, *,
                 storage: Storage, scheduler: Scheduler, solvers: Solvers, accounts: Accounts,
                 views: Views, config_file: ConfigFile, log: AcmeLog, events: EventSink,
                 clock: Clock, jitter: Jitter, clustered: bool) -> None:
        self.state = state
        self.store = store
        self.runtime = runtime
        self.storage = storage
        self.scheduler = scheduler
        self.solvers = solvers
        self.accounts = accounts
        self.views = views
        self.config_file = config_file
        self.log = log
        self.events = events
        self.clock = clock
        self.jitter = jitter
        self.clustered = clustered

    def view(self, cert_id: str) -> dict[str, Any]:
        return self.views.view(cert_id, self.clock())

    async def request(self, cert_id: str, template: Template, *, wait: bool = True,
                      source: str = "api") -> dict[str, Any]:
        """Request a new certificate; with `wait`, until it is issued or the order fails.
        The whole request (id, uniqueness, names, VSs, key, subject, account) is checked
        before anything is written or sent to the CA."""
        template = template.normalized()
        entry = self.state.entries.get(cert_id)
        # In a cluster another node may have asked for the same certificate: this request
        # joins it (one order for the cluster, by the lock) rather than being refused.
        joining = self.clustered and entry is not None and entry.template == template
        if entry is None or not joining:
            check_new_id(self.state, self.store, cert_id)
            validate_template(self.state, self.runtime.current.config, cert_id, template)
            try:
                self.solvers.check_available(cert_id, template)
            except LeError as err:
                raise self.state.problem(err) from None
            self.accounts.require()
            entry = Entry(cert_id, template, source=source, jitter=self.jitter())
            entry.see_vs(self.runtime.current.config)
            self.state.entries[cert_id] = entry
            await self.state.save_entry(entry)
        task = self.scheduler.launch(entry)
        if wait:
            await asyncio.shield(task)
            if self.store.get(cert_id) is None:
                # A request answered with its failure is not kept (nothing to retry for the
                # operator who saw the error); config-declared certificates keep retrying.
                if source == "api" and not joining:
                    self.state.entries.pop(cert_id, None)
                    await self.state.forget_entry(cert_id)
                raise LeError(entry.last_code or AcmeCode.HTTP_STATUS, entry.last_error,
                              subcode=entry.last_subcode)
        return self.view(cert_id)

    async def renew(self, cert_id: str, *, wait: bool = True) -> dict[str, Any]:
        """Manual renewal, now, whatever the schedule says."""
        entry = self.state.entry(cert_id)
        before = self.store.get(cert_id)
        task = self.scheduler.launch(entry, manual=True)
        if wait:
            await asyncio.shield(task)
            after = self.store.get(cert_id)
            if after is None or (before is not None and after.serial == before.serial):
                raise LeError(entry.last_code or AcmeCode.HTTP_STATUS, entry.last_error,
                              subcode=entry.last_subcode)
        return self.view(cert_id)

    async def delete(self, cert_id: str) -> None:
        """Delete a managed certificate; refused (409) while any VS or the admin uses it."""
        entry = self.state.entry(cert_id)
        info = self.store.get(cert_id)
        if info is not None:
            users = self.store.users(cert_id)
            if users:
                raise StoreError(f"certificate {cert_id!r} is in use by {', '.join(users)}; "
                                 "unassign it first", status=409)
        cfg = self.runtime.current.config
        if any(c.id == cert_id for c in cfg.certificates):
            # Declared with [[certificate]]: the next reload would order it again. Its table
            # leaves the file first (that reload stops its renewals), or nothing is deleted.
            await self.config_file.edit(
                remove_certificate_edit(cert_id), running=cfg, what=f"`le delete {cert_id}`",
                snippet=f'# remove the [[certificate]] table with id = "{cert_id}", then '
                        "delete again\n")
        await self.scheduler.cancel(cert_id)
        if info is not None:
            await on_thread(lambda: self.store.delete(cert_id, override=True))
        await self.state.forget_entry(cert_id)
        await self.storage.delete(issued_key(cert_id))
        names = tuple(entry.template.names)
        del self.state.entries[entry.id]
        self.log.audit(f"certificate deleted: {cert_id}")
        self.events.emit(CertEvent(EventKind.DELETED, cert_id, self.clock(), "deleted", names,
                                   f"{info.serial:x}" if info else "",
                                   info.not_after if info else None))
