"""Obtaining one certificate, certmagic's way: check storage, lock, check storage again (another
holder of the storage may have just stored it), order, store, unlock; then this holder serves it
(its CertStore) and the outcome, success or failure with its code, is recorded in the entry.

Kept apart from the ACME client (issuer.py) and from when orders run (scheduler.py): this is the
one place that decides whether an order is placed at all.
"""

from __future__ import annotations

import asyncio
import errno
import logging
from collections.abc import Callable, Container

from ..certs.errors import CertInputError
from ..certs.parse import parse_pem
from ..certs.store import CertInfo, CertStore
from ..errors import StoreError
from ..events import CertEvent, EventKind, EventSink
from ..runtime import RuntimeStore
from . import policy
from .account import Accounts
from .blocking import Offload, on_thread
from .challenge import AnswerShare, ChallengeJournal
from .checks import validate_template
from .codes import AcmeCode, LeError, classify
from .issuer import ORDER_TIMEOUT, Issuer, ServedCertIds, new_cert_key
from .model import MANAGED_BY, Clock, Entry, Issued, Jitter
from .solvers import Solver, Solvers
from .state import LeState
from .storage import LOCK_LEASE, Locker, issued_key, load_or_none, obtain_lock

logger = logging.getLogger(__name__)

# A lock that cannot be written because of the disk (not the network): the certificate could
# not be stored either.
_DISK_FULL_OR_DENIED = (errno.ENOSPC, errno.EDQUOT, errno.EACCES, errno.EPERM, errno.EROFS)


class Obtainer:
    """Runs one certificate's order to its recorded end; never raises but CancelledError."""

    def __init__(self, state: LeState, accounts: Accounts, issuer: Issuer, locker: Locker,
                 store: CertStore, runtime: RuntimeStore, journal: ChallengeJournal,
                 events: EventSink, *, clock: Clock, jitter: Jitter,
                 fault_codes: Callable[[], Container[int]],
                 share: AnswerShare | None = None, offload: Offload = on_thread,
                 cert_ids: ServedCertIds | None = None, solvers: Solvers | None = None) -> None:
        self.state = state
        # Each order's solver, by its template's challenge type (dns-01 plugs in there)
        self.solvers = solvers or Solvers(runtime, journal, fault_codes=fault_codes,
                                          share=share)
        self.cert_ids = cert_ids or ServedCertIds(store)   # `replaces` of a renewal
        self.new_key = new_cert_key   # a certificate's fresh key and its PEM (tests: a pool)
        # id -> (the stored blob last read or written, the chain in it): an unchanged blob
        # holding the certificate served here is not parsed again (twice per order)
        self._seen: dict[str, tuple[bytes, bytes]] = {}
        self.offload = offload   # the certificate store's writes and parsing leave the loop
        self.share = share   # a cluster node's: every node answers this node's challenges
        self.accounts = accounts
        self.issuer = issuer
        self.locker = locker
        self.store = store
        self.runtime = runtime
        self.journal = journal
        self.events = events
        self.clock = clock
        self.jitter = jitter
        self.fault_codes = fault_codes

    def emit(self, kind: EventKind, entry_id: str, message: str, *, code: int | None = None,
             subcode: int | None = None, failures: int = 0) -> None:
        info = self.store.get(entry_id)
        entry = self.state.entries.get(entry_id)
        names = tuple(entry.template.names) if entry else (info.names if info else ())
        self.events.emit(CertEvent(
            kind, entry_id, self.clock(), message, tuple(names),
            f"{info.serial:x}" if info else "", info.not_after if info else None,
            code, subcode, failures))

    async def obtain(self, entry: Entry, *, manual: bool = False) -> None:
        """One order for a certificate (or none, if storage already holds a newer one)."""
        old = self.store.get(entry.id)
        action = f"{'renew' if old else 'request'} certificate {entry.id}"
        responder: Solver | None = None
        try:
            validate_template(self.state, self.runtime.current.config, entry.id,
                              entry.template, known=entry.vs_seen)
            self.solvers.check_available(entry.id, entry.template)
            if entry.id in self.store.problems:
                # Ordering would only burn a rate limit: the result could not be stored.
                raise LeError(AcmeCode.UNPARSABLE_CERT, f"{action}: the stored certificate is "
                              f"damaged: {self.store.problems[entry.id]}")
            account = self.accounts.require()
            if await self._adopt(entry, old):                       # 1. check storage
                await self._succeeded(entry, old, manual, adopted=True)
                return
            name = obtain_lock(entry.id)
            await self._lock(name, action)                          # 2. lock
            try:
                if await self._adopt(entry, old):                   # 3. check again
                    await self._succeeded(entry, old, manual, adopted=True)
                    return
                replaces = self.cert_ids(entry.id) if old else None  # 4. order
                responder = self.solvers.make(entry, lambda text: self.emit(
                    EventKind.CHALLENGE_PRESENTED, entry.id, text))
                await self.solvers.preflight(responder, entry.template.names)
                key, key_pem = await self.new_key(entry.template.acme_key_type,
                                                    self.state.cpu)
                self.state.orders_placed += 1
                self.emit(EventKind.REQUESTED, entry.id,
                          f"{'renewal' if old else 'order'} placed for "
                          f"{', '.join(entry.template.names)}{' (manual)' if manual else ''}")
                try:
                    chain_pem = await self.issuer.order(
                        self.state.settings, account, entry.template.names, key, responder,
                        subject=entry.template.subject(), replaces=replaces)
                except TimeoutError:
                    raise LeError(AcmeCode.NETWORK, f"{action}: the order did not end within "
                                  f"{ORDER_TIMEOUT:.0f} s") from None
                await self._serve(entry.id, chain_pem.encode(), key_pem, old, action)
                await self._share(entry.id, Issued(chain_pem.encode(), key_pem))  # 5. store
            finally:
                await self.locker.unlock(name)                      # 6. unlock
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            await self._failed(entry, exc, action)
            return
        finally:
            if responder is not None:
                await responder.cleanup_all()
        await self._succeeded(entry, old, manual, adopted=False)

    async def _lock(self, name: str, action: str) -> None:
        # Another holder's order ends within ORDER_TIMEOUT; a dead holder's lease (the locker's,
        # e.g. [cluster] lock_lease) runs out within one lease: twice more for a loaded machine.
        wait = ORDER_TIMEOUT + 3 * float(getattr(self.locker, "lease", LOCK_LEASE))
        try:
            async with asyncio.timeout(wait):
                await self.locker.lock(name)
        except TimeoutError:
            raise LeError(AcmeCode.NETWORK, f"{action}: the lock {name} stayed held by another "
                          f"instance for {wait:.0f} s") from None
        except OSError as exc:
            if exc.errno in _DISK_FULL_OR_DENIED:
                raise LeError(AcmeCode.UNPARSABLE_CERT,
                              f"{action}: the certificate cannot be stored: cannot write the "
                              f"lock {exc.filename or name}: {exc.strerror or exc}") from None
            raise LeError(AcmeCode.NETWORK,   # a shared store out of reach: no order
                          f"{action}: cannot take the lock {exc.filename or name}: "
                          f"{exc.strerror or exc}; no order placed") from None

    async def pick_up(self, entry: Entry) -> bool:
        """Serve the certificate another node stored for `entry`, if it is newer than the one
        served here (a cluster node following the others); the entry itself is theirs."""
        old = self.store.get(entry.id)
        try:
            adopted = await self._adopt(entry, old)
        except LeError as exc:
            self.state.log.problem(exc)
            return False
        if adopted:
            new = self.store.require(entry.id)
            self.emit(EventKind.RENEWED if old else EventKind.ISSUED, entry.id,
                      f"picked up from storage, valid until {new.not_after.isoformat()}")
        return adopted

    async def _adopt(self, entry: Entry, old: CertInfo | None) -> bool:
        """Serve the certificate another holder stored, if it covers this template's names
        and is newer than the one served here; False when an order is needed."""
        try:
            data = await load_or_none(self.state.storage, issued_key(entry.id))
        except OSError as exc:
            logger.warning("cannot read the stored certificate %s: %s", entry.id, exc)
            return False
        if data is None:
            return False
        served = self.store.material(entry.id)
        seen = self._seen.get(entry.id)
        if (old is not None and served is not None and seen is not None
                and seen[1] == served.chain_pem and (seen[0] is data or seen[0] == data)):
            return False   # the one served here, as read (or written) last time
        try:
            issued = Issued.from_bytes(data)
            if old is not None and served is not None and served.chain_pem == issued.chain_pem:
                self._seen[entry.id] = (data, issued.chain_pem)
                return False   # the one served here (parsing it would say so, at a cost)
            parsed = await self.offload(lambda: parse_pem(issued.chain_pem, issued.key_pem,
                                                       now=self.clock(), trusted_key=True))
        except (ValueError, KeyError, TypeError, CertInputError) as exc:
            logger.info("stored certificate %s not usable (%s); ordering", entry.id, exc)
            return False
        if sorted(n.lower() for n in parsed.names) != sorted(entry.template.names):
            return False
        if old is not None and (parsed.serial == old.serial
                                or parsed.not_after <= old.not_after):
            return False
        await self._serve(entry.id, issued.chain_pem, issued.key_pem, old,
                          f"pick up certificate {entry.id}")
        self.state.log.info(f"certificate {entry.id} picked up from storage (serial "
                            f"{parsed.serial:x}, ordered by another instance)")
        return True

    async def _serve(self, cert_id: str, chain_pem: bytes, key_pem: bytes,
                     old: CertInfo | None, action: str) -> None:
        """Into this holder's certificate store (its disk writes on a worker thread)."""
        try:
            await self.offload(lambda: self.store.import_pem(
                cert_id, chain_pem, key_pem, replace=old is not None, managed_by=MANAGED_BY,
                override=True, trusted_key=True))
        except (CertInputError, ValueError) as exc:
            raise LeError(AcmeCode.UNPARSABLE_CERT,
                          f"{action}: the issued certificate cannot be used: {exc}") from None
        except StoreError as exc:  # the state directory refused the write
            raise LeError(AcmeCode.UNPARSABLE_CERT,
                          f"{action}: the issued certificate cannot be stored: {exc}") from None

    async def _share(self, cert_id: str, issued: Issued) -> None:
        """For every other holder of the storage; a failure costs them an order of their
        own, not this holder's certificate: reported, not fatal."""
        blob = issued.to_bytes()
        try:
            await self.state.storage.store(issued_key(cert_id), blob)
            self._seen[cert_id] = (blob, issued.chain_pem)
        except OSError as exc:
            self.state.log.error(f"certificate {cert_id} is served here but not shared: "
                                 f"cannot write {exc.filename or issued_key(cert_id)}: "
                                 f"{exc.strerror or exc}")

    async def _failed(self, entry: Entry, exc: Exception, action: str) -> None:
        err = classify(exc, action=action)
        if not err.text.startswith(action) and err.code not in (AcmeCode.VS_VERIFY,):
            err.text = f"{action}: {err.text}"
        self.state.log.problem(err)
        info = self.store.get(entry.id)
        validity = policy.Validity(info.not_before, info.not_after) if info else None
        entry.failures = policy.record_failure(entry.failures, self.clock(), validity,
                                               err.retry_after)
        entry.last_error, entry.last_code, entry.last_subcode = (err.text, err.code, err.subcode)
        await self.state.save_entry_or_report(entry)
        self.state.count("order", err.code)
        self.emit(EventKind.FAILED, entry.id, err.text, code=err.code, subcode=err.subcode,
                  failures=entry.failures.count)

    async def _succeeded(self, entry: Entry, old: CertInfo | None, manual: bool, *,
                         adopted: bool) -> None:
        cfg = self.runtime.current.config
        entry.failures = policy.succeeded(entry.failures)
        entry.last_error, entry.last_code, entry.last_subcode = "", None, None
        entry.ari, entry.ari_checked = None, None
        entry.issued = self.clock()
        entry.jitter = self.jitter()
        entry.see_vs(cfg)
        if old is not None:
            entry.renewals += 1
        await self.state.save_entry_or_report(entry)
        new = self.store.require(entry.id)
        how = "renewed" if old else "issued"
        tail = f"{' (manual)' if manual else ''}{' (from storage)' if adopted else ''}"
        self.state.log.audit(f"certificate {how}: {entry.id} serial {new.serial:x} for "
                             f"{','.join(new.names)} until {new.not_after.isoformat()}{tail}")
        if not adopted:
            self.state.count("order", None)
        self.emit(EventKind.RENEWED if old else EventKind.ISSUED, entry.id,
                  f"{how} until {new.not_after.isoformat()}{tail}")
