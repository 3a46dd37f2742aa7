"""The Let's Encrypt manager: account, certificate requests, renewal scheduling, persistence,
backup/restore and `vs convert`; the one object behind the admin API and the config file.

State lives in `<state_dir>/letsencrypt/` (directories 0700, files 0600, atomic writes):

    settings.json        directory URL, CA bundle, email, renew period (run-time values)
    account.json         account URL ("Account ID") and email; account.key: PEM, 0600
    certs/<id>.json      each certificate's order template and renewal status
    challenges.json      the journal of challenges in progress (cleared at start)

Every path built from an id or a backup goes through `files.safe_path`; what a crash mid-write
leaves (`.tmp-*`) is removed at start. A request is checked whole (id, uniqueness, names, VSs,
key, subject) before anything is written or sent to the CA; a restore (settings, account, VS
configuration, each certificate's id and PEM) before anything is written.

Certificates and their keys go into the SSL certificate store (managed_by="letsencrypt"). The
System Message File and Audit LogFile are in `<state_dir>` (see acme_log). `start()` never waits on
the CA: it loads state and starts the scheduler, which sleeps until the next renewal is due.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import dataclasses
import datetime as dt
import json
import logging
import os
import random
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from aiohttp import web

from acmeclient import AcmeClient, CsrSubject, KeyType, RenewalInfo
from acmeclient import cert_id as ari_cert_id
from acmeclient.crypto import (
    PrivateKey,
    generate_key,
    load_account_key,
    make_csr,
    private_key_to_pem,
)
from acmeclient.errors import (
    AccountDoesNotExistError,
    AcmeError,
    CryptoError,
    MalformedResponseError,
    NetworkError,
)

from ..config.loader import is_fqdn, parse_config
from ..config.model import (
    DEFAULT_RULE,
    MAX_SANS,
    CertificateRequest,
    Config,
    LetsEncryptSettings,
    SubVS,
    VirtualService,
)
from ..errors import AdminError, ConfigError, StoreError
from ..events import CertEvent, CertStatus, EventKind, EventSink, NullSink
from ..runtime import RuntimeStore
from . import acme_renewal as policy
from .acme_backup import BackupContents, BackupError, seal, unseal
from .acme_challenge import (
    ChallengeJournal,
    RuntimeHttp01Responder,
    eligible_services,
    ineligibility,
    verify_vs,
)
from .acme_log import AcmeCode, AcmeLog, LeError, classify
from .errors import CertInputError
from .files import mkdir_private, remove_debris, safe_path, write_atomic
from .parse import parse_pem
from .store import CertStore, check_id, storage_error, valid_id

logger = logging.getLogger(__name__)

MANAGED_BY = "letsencrypt"
LE_DIR = "letsencrypt"
# One order (authorizations, validation, finalize, download) must end within this; Let's Encrypt
# usually needs seconds, a slow validation a minute or two.
ORDER_TIMEOUT = 300.0
# Fetching the directory when it is set: one answer within this many seconds.
DIRECTORY_TIMEOUT = 30.0
# The scheduler re-evaluates at least this often even with nothing due (wall clock jumps,
# ARI refresh); a wake() makes it look at once.
MAX_SLEEP = 3600.0
_BACKUP_B64 = "base64"
# Keys of `LEManager.damaged` that are state files, not certificate ids.
_STATE_FILES = ("settings.json", "account.json", "account.key")


class Clock(Protocol):
    def __call__(self) -> dt.datetime: ...


def _utcnow() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


class AcmeClientLike(Protocol):
    """The part of acmeclient.AcmeClient the manager uses (a seam for fakes)."""

    account_url: str | None

    async def directory(self) -> Any: ...

    async def new_account(self, *, contact: Sequence[str] = (),
                          terms_of_service_agreed: bool = False,
                          only_return_existing: bool = False) -> Any: ...

    async def obtain_certificate(self, names: Sequence[str], cert_key: PrivateKey,
                                 responder: Any, *, subject: CsrSubject | None = None,
                                 replaces: str | None = None) -> str: ...

    async def fetch_renewal_info(self, cert_pem_or_id: str) -> RenewalInfo | None: ...

    async def close(self) -> None: ...


ClientFactory = Callable[[str, PrivateKey, str | None, str | None], AcmeClientLike]


def default_client_factory(directory_url: str, key: PrivateKey, account_url: str | None,
                           ca_bundle: str | None) -> AcmeClientLike:
    return AcmeClient(directory_url, key, account_url=account_url, ca_bundle=ca_bundle or None)


# -- persisted values ---------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class Settings:
    directory_url: str
    ca_bundle: str
    email: str
    renew_period_days: int

    @classmethod
    def from_config(cls, le: LetsEncryptSettings) -> Settings:
        return cls(le.directory_url, le.ca_bundle, le.email,
                   policy.clamp_period(le.renew_period_days))

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> Settings:
        return cls(str(d["directory_url"]), str(d.get("ca_bundle", "")), str(d.get("email", "")),
                   policy.clamp_period(int(d.get("renew_period_days", 30))))


@dataclass(frozen=True, slots=True)
class Template:
    """A certificate's order template: reused by every renewal."""

    common_name: str
    vs: str
    sans: tuple[tuple[str, str], ...] = ()
    key_type: str = "ec"
    key_size: int = 2048
    country: str = ""
    state: str = ""
    city: str = ""
    company: str = ""
    unit: str = ""
    email: str = ""

    @property
    def routes(self) -> tuple[tuple[str, str], ...]:
        """(name, VS) for the common name and every SAN, in order."""
        return ((self.common_name, self.vs), *self.sans)

    @property
    def names(self) -> list[str]:
        return [n for n, _ in self.routes]

    @property
    def acme_key_type(self) -> KeyType:
        if self.key_type == "ec":
            return KeyType.EC_P256
        return KeyType(f"rsa-{self.key_size}")

    def subject(self) -> CsrSubject:
        return CsrSubject(
            common_name=self.common_name, country=self.country or None,
            state=self.state or None, locality=self.city or None,
            organization=self.company or None, organizational_unit=self.unit or None,
            email=self.email or None)

    @classmethod
    def from_request(cls, r: CertificateRequest) -> Template:
        return cls(r.common_name, r.vs, r.sans, r.key_type, r.key_size, r.country, r.state,
                   r.city, r.company, r.unit, r.email)

    def to_json(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["sans"] = [{"name": n, "vs": v} for n, v in self.sans]
        return d

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> Template:
        sans = tuple((str(s["name"]), str(s["vs"])) for s in d.get("sans", []))
        return cls(str(d["common_name"]), str(d["vs"]), sans, str(d.get("key_type", "ec")),
                   int(d.get("key_size", 2048)), *(str(d.get(k, "")) for k in (
                       "country", "state", "city", "company", "unit", "email")))


@dataclass(slots=True)
class Entry:
    """One managed certificate: template, where it came from, and its renewal status."""

    id: str
    template: Template
    source: str = "api"            # "api" | "config"; "config" ones stop when removed
    auto_renew: bool = True
    failures: policy.Failures = field(default_factory=policy.Failures)
    last_error: str = ""
    last_code: int | None = None
    last_subcode: int | None = None
    ari: policy.AriWindow | None = None
    ari_checked: dt.datetime | None = None
    issued: dt.datetime | None = None
    renewals: int = 0
    jitter: float = field(default_factory=random.random)
    vs_seen: tuple[str, ...] = ()   # VSs that existed when they were stored (17.1 vs 17.2)

    def to_json(self) -> dict[str, Any]:
        def t(v: dt.datetime | None) -> str | None:
            return v.isoformat() if v else None
        return {
            "id": self.id, "template": self.template.to_json(), "source": self.source,
            "auto_renew": self.auto_renew,
            "failures": {"count": self.failures.count, "last_at": t(self.failures.last_at),
                         "retry_at": t(self.failures.retry_at)},
            "last_error": self.last_error, "last_code": self.last_code,
            "last_subcode": self.last_subcode,
            "ari": None if self.ari is None else {
                "start": self.ari.start.isoformat(), "end": self.ari.end.isoformat(),
                "retry_after": self.ari.retry_after},
            "ari_checked": t(self.ari_checked), "issued": t(self.issued),
            "renewals": self.renewals, "jitter": self.jitter, "vs_seen": list(self.vs_seen),
        }

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> Entry:
        def t(v: Any) -> dt.datetime | None:
            return dt.datetime.fromisoformat(v) if v else None
        f = d.get("failures") or {}
        a = d.get("ari")
        return cls(
            id=str(d["id"]), template=Template.from_json(d["template"]),
            source=str(d.get("source", "api")), auto_renew=bool(d.get("auto_renew", True)),
            failures=policy.Failures(int(f.get("count", 0)), t(f.get("last_at")),
                                     t(f.get("retry_at"))),
            last_error=str(d.get("last_error", "")), last_code=d.get("last_code"),
            last_subcode=d.get("last_subcode"),
            ari=None if not a else policy.AriWindow(
                dt.datetime.fromisoformat(a["start"]), dt.datetime.fromisoformat(a["end"]),
                a.get("retry_after")),
            ari_checked=t(d.get("ari_checked")), issued=t(d.get("issued")),
            renewals=int(d.get("renewals", 0)), jitter=float(d.get("jitter", 0.5)),
            vs_seen=tuple(d.get("vs_seen", ())),
        )


@dataclass(frozen=True, slots=True)
class Account:
    url: str
    email: str
    key: PrivateKey


def _dump(obj: Any) -> bytes:
    return json.dumps(obj, indent=1, sort_keys=True).encode() + b"\n"


def _is_file(path: str) -> bool:
    return os.path.isfile(path)


# -- the manager ----------------------------------------------------------------------------------

class LEManager:
    """Account, requests, renewals and persistence of Let's Encrypt certificates.

    Every public coroutine raises LeError (a LoadMaster code) or StoreError; every LeError is
    also written to the System Message File.
    """

    def __init__(self, state_dir: Path, runtime: RuntimeStore, store: CertStore, *,
                 clock: Clock = _utcnow, client_factory: ClientFactory = default_client_factory,
                 config_path: Path | None = None, hostname: str | None = None,
                 events: EventSink | None = None) -> None:
        self.state_dir = Path(state_dir)
        self.dir = self.state_dir / LE_DIR
        self.runtime = runtime
        self.store = store
        self.clock = clock
        self.client_factory = client_factory
        self.config_path = config_path
        self.log = AcmeLog(self.state_dir, now=clock, hostname=hostname)
        self.journal = ChallengeJournal(self.dir)
        # Codes 20-25 to provoke in the challenge injection (fault injection for tests).
        self.fault_codes: set[int] = set()
        self.settings = Settings.from_config(runtime.current.config.letsencrypt)
        self._config_le: LetsEncryptSettings | None = None
        self.account: Account | None = None
        self.account_problem: LeError | None = None
        self.entries: dict[str, Entry] = {}
        # State files found damaged at start: certificate id (or file name) -> what is wrong,
        # naming the path. Never silently used, never overwritten by the manager.
        self.damaged: dict[str, str] = {}
        self._locks: dict[str, asyncio.Lock] = {}
        self._running: dict[str, asyncio.Task[None]] = {}
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self.orders_placed = 0
        # Certificate events (requested ... deleted) go here; `lbproxy.events.Events` in a
        # running process, a NullSink when nobody listens.
        self.events: EventSink = events or NullSink()
        # ACME operations by (operation, result): result "success" or the LoadMaster code.
        self.acme_requests: Counter[tuple[str, str]] = Counter()

    # -- lifecycle --------------------------------------------------------------------------------

    async def start(self) -> None:
        """Load state, clear challenge leftovers, start the scheduler. Never waits on the CA."""
        mkdir_private(self.dir)
        mkdir_private(self.dir / "certs")
        for d in (self.dir, self.dir / "certs"):  # nothing writes there before start()
            remove_debris(d)
        self._load()
        for what in sorted(self.store.problems.values()):
            self.log.error(f"damaged certificate store state, not used: {what}")
        await self._clear_leftovers()
        await self.sync_config(self.runtime.current.config)
        self._task = asyncio.create_task(self._scheduler(), name="le-scheduler")

    async def stop(self) -> None:
        tasks = [t for t in (self._task, *self._running.values()) if t is not None]
        for t in tasks:
            t.cancel()
        for t in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await t
        self._task = None
        self._running.clear()

    def wake(self) -> None:
        """Look at the schedule now (after a clock change in tests, or a settings change)."""
        self._wake.set()

    def _path(self, *parts: str) -> Path:
        """A file of the Let's Encrypt state; never outside it (files.safe_path)."""
        return safe_path(self.dir, *parts)

    def _entry_path(self, cert_id: str) -> Path:
        """certs/<id>.json, for a valid id only (CertInputError otherwise)."""
        check_id(cert_id)
        return safe_path(self.dir, "certs", f"{cert_id}.json")

    def _load(self) -> None:
        p = self._path("settings.json")
        if p.exists():
            try:
                self.settings = Settings.from_json(json.loads(p.read_text()))
            except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
                self.damaged[p.name] = f"{p}: {exc}"
                self.log.error(f"{p} is damaged ({exc}); using the config file's settings, "
                               "the file is left as it is")
        self._load_account()
        for f in sorted((self.dir / "certs").glob("*.json")):
            try:
                e = Entry.from_json(json.loads(f.read_text()))
                if e.id != f.stem:
                    raise ValueError(f"it names certificate {e.id!r}")
                if not valid_id(e.id):
                    raise ValueError(f"{e.id!r} is not a valid certificate id")
            except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
                self.damaged[f.stem] = f"{f}: {exc}"
                self.log.error(f"certificate metadata {f} is damaged ({exc}); certificate "
                               f"{f.stem} is not renewed until the file is repaired or removed")
                continue
            self.entries[e.id] = e

    def _load_account(self) -> None:
        meta, keyf = self._path("account.json"), self._path("account.key")
        self.account, self.account_problem = None, None
        if not meta.exists() and not keyf.exists():
            return
        try:
            key = load_account_key(keyf.read_bytes())
        except (OSError, CryptoError) as exc:
            self.damaged[keyf.name] = f"{keyf}: {exc}"
            self.account_problem = self._problem(LeError(AcmeCode.INVALID_STORED_KEY,
                                  f"the stored account key {keyf} cannot be used: {exc}"))
            return
        why = "it has no account URL"
        try:
            d = json.loads(meta.read_text())
            url = str(d.get("url") or "") if isinstance(d, dict) else ""
        except (OSError, ValueError) as exc:
            url, d, why = "", {}, f"it is damaged ({exc})"
            self.damaged[meta.name] = f"{meta}: {exc}"
        if not url:
            self.account_problem = self._problem(LeError(AcmeCode.ACCOUNT_WITHOUT_URL,
                                  f"the stored account {meta} cannot be used: {why}"))
            return
        self.account = Account(url, str(d.get("email", "")), key)

    async def _clear_leftovers(self) -> None:
        """Challenges journaled by a previous run: remove any still injected, then forget them;
        their certificates are retried by the scheduler (never issued ones are due at once)."""
        leftovers = self.journal.entries()
        if self.journal.damaged:
            try:
                self.log.error(f"challenge journal {self.journal.damaged}; kept aside as "
                               f"{self.journal.set_aside()}")
            except OSError as exc:
                self.log.error(f"challenge journal {self.journal.damaged}; cannot set it "
                               f"aside: {exc.strerror or exc}")
        for e in leftovers:
            vs, subvs = e.get("vs", ""), e.get("subvs", "")
            if any(i.vs == vs and i.subvs.name == subvs for i in self.runtime.current.injections):
                await self.runtime.remove(vs, subvs)
            logger.info("removed challenge leftover %s/%s of %s", vs, subvs, e.get("cert"))
        if leftovers:
            self.journal.clear()

    # -- persistence ------------------------------------------------------------------------------

    def _write(self, path: Path, data: bytes, what: str) -> None:
        """An atomic state write; a failure is a StoreError naming the file and the cause."""
        try:
            write_atomic(path, data)
        except OSError as exc:
            raise storage_error(what, exc, path) from None

    def _save_settings(self) -> None:
        self._write(self._path("settings.json"), _dump(self.settings.to_json()),
                    "Let's Encrypt settings not stored")
        self.damaged.pop("settings.json", None)

    def _save_account(self, account: Account) -> None:
        # The key first: an account.json never points at a key that is not on disk.
        self._write(self._path("account.key"), private_key_to_pem(account.key),
                    "account key not stored")
        self._write(self._path("account.json"), _dump({"url": account.url,
                                                       "email": account.email}),
                    "account not stored")
        self.account, self.account_problem = account, None
        self.damaged.pop("account.key", None)
        self.damaged.pop("account.json", None)

    def _save_entry(self, e: Entry) -> None:
        self._write(self._entry_path(e.id), _dump(e.to_json()),
                    f"certificate {e.id} status not stored")

    def _save_entry_or_report(self, e: Entry) -> None:
        """Persist status after an order; a failed write is reported, the order's outcome and
        the in-memory status stand (the next successful write catches up)."""
        try:
            self._save_entry(e)
        except StoreError as exc:
            self.log.error(str(exc))

    def _problem(self, err: LeError) -> LeError:
        self.log.problem(err)
        return err

    def _count(self, operation: str, code: int | None) -> None:
        self.acme_requests[(operation, "success" if code is None else str(int(code)))] += 1

    def _emit(self, kind: EventKind, entry_id: str, message: str, *, code: int | None = None,
              subcode: int | None = None, failures: int = 0) -> None:
        info = self.store.get(entry_id)
        entry = self.entries.get(entry_id)
        names = tuple(entry.template.names) if entry else (info.names if info else ())
        self.events.emit(CertEvent(
            kind, entry_id, self.clock(), message, tuple(names),
            f"{info.serial:x}" if info else "", info.not_after if info else None,
            code, subcode, failures))

    # -- settings ---------------------------------------------------------------------------------

    async def _check_directory(self, url: str, ca_bundle: str) -> None:
        if not url.startswith("https://"):
            raise self._problem(LeError(AcmeCode.BAD_DIRECTORY,
                                        f"directory URL {url!r} is not https"))
        if ca_bundle and not _is_file(ca_bundle):
            raise self._problem(LeError(AcmeCode.BAD_DIRECTORY,
                                        f"CA bundle {ca_bundle!r} is not a readable file"))
        client = self.client_factory(url, generate_key(KeyType.EC_P256), None, ca_bundle or None)
        try:
            async with asyncio.timeout(DIRECTORY_TIMEOUT):
                await client.directory()
        except (NetworkError, TimeoutError) as exc:
            self._count("directory", AcmeCode.NETWORK)
            raise self._problem(LeError(AcmeCode.NETWORK,
                                        f"cannot fetch the directory {url}: {exc}")) from None
        except AcmeError as exc:
            self._count("directory", AcmeCode.BAD_DIRECTORY)
            raise self._problem(LeError(AcmeCode.BAD_DIRECTORY,
                                        f"bad directory at {url}: {exc}")) from None
        finally:
            await client.close()
        self._count("directory", None)

    async def set_directory(self, url: str, ca_bundle: str | None = None) -> Settings:
        bundle = self.settings.ca_bundle if ca_bundle is None else ca_bundle
        await self._check_directory(url, bundle)
        self.settings = dataclasses.replace(self.settings, directory_url=url, ca_bundle=bundle)
        self._save_settings()
        self.log.info(f"directory set to {url}")
        return self.settings

    async def set_renew_period(self, days: int) -> Settings:
        if not policy.MIN_RENEW_PERIOD_DAYS <= days <= policy.MAX_RENEW_PERIOD_DAYS:
            raise AdminError(f"the renew period must be 1 to 60 days, got {days}")
        self.settings = dataclasses.replace(self.settings, renew_period_days=days)
        self._save_settings()
        self.wake()
        return self.settings

    async def set_email(self, email: str) -> Settings:
        self.settings = dataclasses.replace(self.settings, email=email)
        self._save_settings()
        return self.settings

    # -- account ----------------------------------------------------------------------------------

    def _client(self, key: PrivateKey | None = None, url: str | None = None) -> AcmeClientLike:
        if key is None:
            if self.account is None:
                raise self._problem(self.account_problem or LeError(
                    AcmeCode.NOT_REGISTERED, "no Let's Encrypt account is registered"))
            key, url = self.account.key, self.account.url
        return self.client_factory(self.settings.directory_url, key, url,
                                   self.settings.ca_bundle or None)

    async def register(self, email: str | None = None) -> dict[str, Any]:
        """Register a new account with a generated key (code 6 if one is registered)."""
        if self.account is not None:
            raise self._problem(LeError(AcmeCode.ACCOUNT_EXISTS,
                                        f"an account is already registered: {self.account.url}"))
        mail = self.settings.email if email is None else email
        try:
            key = generate_key(KeyType.EC_P256)
            private_key_to_pem(key)
        except (ValueError, CryptoError) as exc:
            raise self._problem(LeError(AcmeCode.INVALID_ACCOUNT_KEY,
                                        f"the generated account key is invalid: {exc}")) from None
        client = self._client(key, None)
        try:
            res = await client.new_account(contact=[f"mailto:{mail}"] if mail else [],
                                           terms_of_service_agreed=True)
        except MalformedResponseError as exc:
            if "Location" in str(exc):
                self._count("new_account", AcmeCode.ACCOUNT_WITHOUT_URL)
                raise self._problem(LeError(AcmeCode.ACCOUNT_WITHOUT_URL, str(exc))) from None
            err = classify(exc, action="register account")
            self._count("new_account", err.code)
            raise self._problem(err) from None
        except AcmeError as exc:
            err = classify(exc, action="register account")
            self._count("new_account", err.code)
            raise self._problem(err) from None
        finally:
            await client.close()
        self._count("new_account", None)
        account = Account(res.url, mail, key)
        self._save_account(account)
        self.log.audit(f"account registered: {res.url}")
        return self.account_view()

    async def upload_key(self, data: bytes, passphrase: bytes | None = None) -> dict[str, Any]:
        """Link an existing account by its key: PEM (optionally encrypted) or certbot's JWK."""
        try:
            key = load_account_key(data, passphrase)
        except CryptoError as exc:
            raise self._problem(LeError(AcmeCode.INVALID_ACCOUNT_KEY,
                                        f"the uploaded account key is invalid: {exc}")) from None
        client = self._client(key, None)
        try:
            res = await client.new_account(only_return_existing=True)
        except AccountDoesNotExistError as exc:
            self._count("link_account", AcmeCode.NOT_REGISTERED)
            raise self._problem(LeError(
                AcmeCode.NOT_REGISTERED,
                f"the uploaded key has no account at {self.settings.directory_url}: "
                f"{exc.detail}")) from None
        except MalformedResponseError as exc:
            if "Location" in str(exc):
                self._count("link_account", AcmeCode.ACCOUNT_WITHOUT_URL)
                raise self._problem(LeError(AcmeCode.ACCOUNT_WITHOUT_URL, str(exc))) from None
            err = classify(exc, action="link account")
            self._count("link_account", err.code)
            raise self._problem(err) from None
        except AcmeError as exc:
            err = classify(exc, action="link account")
            self._count("link_account", err.code)
            raise self._problem(err) from None
        finally:
            await client.close()
        self._count("link_account", None)
        contact = [c.removeprefix("mailto:") for c in getattr(res.account, "contact", ())]
        self._save_account(Account(res.url, contact[0] if contact else "", key))
        self.log.audit(f"account linked by key upload: {res.url}")
        return self.account_view()

    def account_view(self) -> dict[str, Any]:
        return {
            "registered": self.account is not None,
            "account_id": self.account.url if self.account else "",
            "email": self.account.email if self.account else "",
            "problem": str(self.account_problem) if self.account_problem else "",
            "settings": self.settings.to_json(),
        }

    # -- requests ---------------------------------------------------------------------------------

    def validate_template(self, cert_id: str, t: Template, *, known: Iterable[str] = ()) -> None:
        """Every check before an order: the id, names, VSs (16, 17, 18), subject fields, and
        the CSR itself (built with a throw-away EC key: what acmeclient would refuse at
        finalize is refused here, before the CA is asked for anything)."""
        check_id(cert_id)
        if not t.common_name:
            raise self._problem(LeError(AcmeCode.NO_DOMAIN,
                                        f"certificate {cert_id}: no domain to sign"))
        names = [n.lower() for n in t.names]
        for n in names:
            if not is_fqdn(n):
                raise AdminError(f"{n!r} is not a fully qualified domain name")
        if len(set(names)) != len(names):
            raise AdminError(f"certificate {cert_id}: a name is listed twice")
        if len(t.sans) > MAX_SANS:
            raise AdminError(f"at most {MAX_SANS} SANs, got {len(t.sans)}")
        if any(not vs for _, vs in t.routes) or any(not n for n, _ in t.routes):
            raise self._problem(LeError(AcmeCode.NAMES_VS_MISMATCH,
                                        f"certificate {cert_id}: names and VSs do not match"))
        if t.key_type not in ("ec", "rsa") or (t.key_type == "rsa" and
                                               t.key_size not in (2048, 3072, 4096)):
            raise AdminError(f"key must be ec or rsa 2048/3072/4096, got {t.key_type} "
                             f"{t.key_size}")
        try:
            make_csr(generate_key(KeyType.EC_P256), names, t.subject())
        except CryptoError as exc:
            raise AdminError(f"certificate {cert_id}: {exc}") from None
        cfg = self.runtime.current.config
        seen = set(known)
        for _, vs in t.routes:
            try:
                verify_vs(cfg, vs, known_before=vs in seen)
            except LeError as err:
                err.text = f"certificate {cert_id}: {err.text}"
                raise self._problem(err) from None

    def _check_new_id(self, cert_id: str) -> None:
        """A new certificate's id: valid, and naming nothing stored, managed or not, whole or
        damaged (whose file would be overwritten)."""
        check_id(cert_id)
        if cert_id in self.entries:
            raise StoreError(f"certificate id {cert_id!r} already exists", status=409)
        info = self.store.get(cert_id)
        if info is not None and info.managed_by != MANAGED_BY:
            raise self._problem(LeError(
                AcmeCode.NAMES_VS_MISMATCH, f"certificate {cert_id}: the id is taken by a "
                "certificate not managed by Let's Encrypt; choose another id", status=409))
        if info is not None:
            raise StoreError(f"certificate id {cert_id!r} already exists", status=409)
        damage = self.store.problems.get(cert_id) or (
            self.damaged.get(cert_id) if cert_id not in _STATE_FILES else None)
        if damage:
            raise StoreError(f"certificate id {cert_id!r} is taken by damaged state ({damage}); "
                             "repair or remove it first", status=409)

    async def request(self, cert_id: str, template: Template, *, wait: bool = True,
                      source: str = "api") -> dict[str, Any]:
        """Request a new certificate; with `wait`, until it is issued or the order fails.
        The whole request (id, uniqueness, names, VSs, key, subject, account) is checked
        before anything is written or sent to the CA."""
        self._check_new_id(cert_id)
        template = dataclasses.replace(
            template, common_name=template.common_name.lower(),
            sans=tuple((n.lower(), v) for n, v in template.sans),
            country=template.country.upper())
        self.validate_template(cert_id, template)
        if self.account is None:
            raise self._problem(self.account_problem or LeError(
                AcmeCode.NOT_REGISTERED, "no Let's Encrypt account is registered"))
        cfg = self.runtime.current.config
        entry = Entry(cert_id, template, source=source,
                      vs_seen=tuple(sorted({vs for _, vs in template.routes
                                            if cfg.vs_by_name(vs)})))
        self.entries[cert_id] = entry
        self._save_entry(entry)
        task = self._launch(entry)
        if wait:
            await asyncio.shield(task)
            if self.store.get(cert_id) is None:
                # A request answered with its failure is not kept (nothing to retry for the
                # operator who saw the error); config-declared certificates keep retrying.
                if source == "api":
                    self.entries.pop(cert_id, None)
                    with contextlib.suppress(FileNotFoundError):
                        self._entry_path(cert_id).unlink()
                raise LeError(entry.last_code or AcmeCode.HTTP_STATUS, entry.last_error,
                              subcode=entry.last_subcode)
        return self.view(cert_id)

    async def renew(self, cert_id: str, *, wait: bool = True) -> dict[str, Any]:
        """Manual renewal, now, whatever the schedule says."""
        entry = self._entry(cert_id)
        before = self.store.get(cert_id)
        task = self._launch(entry, manual=True)
        if wait:
            await asyncio.shield(task)
            after = self.store.get(cert_id)
            if after is None or (before is not None and after.serial == before.serial):
                raise LeError(entry.last_code or AcmeCode.HTTP_STATUS, entry.last_error,
                              subcode=entry.last_subcode)
        return self.view(cert_id)

    async def delete(self, cert_id: str) -> None:
        """Delete a managed certificate; refused (409) while any VS or the admin uses it."""
        entry = self._entry(cert_id)
        info = self.store.get(cert_id)
        if info is not None:
            users = self.store.users(cert_id)
            if users:
                raise StoreError(f"certificate {cert_id!r} is in use by {', '.join(users)}; "
                                 "unassign it first", status=409)
        running = self._running.pop(cert_id, None)
        if running is not None:
            running.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await running
        if info is not None:
            self.store.delete(cert_id, override=True)
        with contextlib.suppress(FileNotFoundError):
            self._entry_path(cert_id).unlink()
        names = tuple(entry.template.names)
        del self.entries[entry.id]
        self.log.audit(f"certificate deleted: {cert_id}")
        self.events.emit(CertEvent(EventKind.DELETED, cert_id, self.clock(), "deleted", names,
                                   f"{info.serial:x}" if info else "",
                                   info.not_after if info else None))

    def _entry(self, cert_id: str) -> Entry:
        entry = self.entries.get(cert_id)
        if entry is None:
            raise StoreError(f"no Let's Encrypt certificate {cert_id!r}", status=404)
        return entry

    # -- views ------------------------------------------------------------------------------------

    def _vs_label(self, vs: str) -> str:
        vs_obj = self.runtime.current.config.vs_by_name(vs)
        return vs if vs_obj is not None and ineligibility(vs_obj) is None else "Unknown VS"

    def view(self, cert_id: str) -> dict[str, Any]:
        e = self._entry(cert_id)
        info = self.store.get(cert_id)
        now = self.clock()
        validity = policy.Validity(info.not_before, info.not_after) if info else None
        state = policy.state_at(now, validity, self.settings.renew_period_days, e.ari,
                                e.failures, cert_id in self._running)
        nxt = policy.next_attempt(now, validity, self.settings.renew_period_days, e.ari,
                                  e.failures, jitter=e.jitter) if e.auto_renew else None
        return {
            "id": cert_id,
            "common_name": e.template.common_name,
            "names": e.template.names,
            "sans": [{"name": n, "vs": v} for n, v in e.template.sans],
            "http_challenge_vs": [f"{n}: {self._vs_label(v)}" for n, v in e.template.routes],
            "key_type": e.template.key_type,
            "key_size": e.template.key_size if e.template.key_type == "rsa" else 256,
            "status": state.value,
            "source": e.source,
            "auto_renew": e.auto_renew,
            "serial": f"{info.serial:x}" if info else "",
            "not_before": info.not_before.isoformat() if info else "",
            "not_after": info.not_after.isoformat() if info else "",
            "in_use_by": list(self.store.users(cert_id)) if info else [],
            "last_error": e.last_error,
            "last_code": e.last_code,
            "last_subcode": e.last_subcode,
            "failures": e.failures.count,
            "next_attempt": nxt.isoformat() if nxt else "",
            "ari_window": None if e.ari is None else [e.ari.start.isoformat(),
                                                       e.ari.end.isoformat()],
            "renewals": e.renewals,
        }

    def cert_statuses(self) -> list[CertStatus]:
        """Every certificate of the store and every managed one not yet issued, with its
        renewal schedule and last error (for status, metrics and the expiry check)."""
        now = self.clock()
        out: list[CertStatus] = []
        seen: set[str] = set()
        for info in self.store.list():
            seen.add(info.id)
            e = self.entries.get(info.id)
            base = CertStatus(id=info.id, names=tuple(info.names),
                              managed_by=info.managed_by or "", serial=f"{info.serial:x}",
                              not_before=info.not_before, not_after=info.not_after,
                              state="imported", used_by=tuple(self.store.users(info.id)))
            out.append(base if e is None else self._status(e, base, now))
        for cid in sorted(set(self.damaged) - set(self.entries) - seen):
            if cid in _STATE_FILES:
                continue
            out.append(CertStatus(id=cid, names=(), managed_by=MANAGED_BY, state="damaged",
                                  auto_renew=False, last_error=self.damaged[cid]))
        for cid, what in sorted(self.store.problems.items()):
            if cid not in seen and cid not in self.entries and cid not in self.damaged:
                out.append(CertStatus(id=cid, names=(), state="damaged", last_error=what))
        for cid in sorted(self.entries):
            if cid not in seen:
                e = self.entries[cid]
                out.append(self._status(e, CertStatus(id=cid, names=tuple(e.template.names),
                                                      managed_by=MANAGED_BY), now))
        return out

    def _status(self, e: Entry, base: CertStatus, now: dt.datetime) -> CertStatus:
        validity = (policy.Validity(base.not_before, base.not_after)
                    if base.not_before and base.not_after else None)
        state = policy.state_at(now, validity, self.settings.renew_period_days, e.ari,
                                e.failures, e.id in self._running)
        nxt = policy.next_attempt(now, validity, self.settings.renew_period_days, e.ari,
                                  e.failures, jitter=e.jitter) if e.auto_renew else None
        return dataclasses.replace(
            base, managed_by=MANAGED_BY, state=state.value, auto_renew=e.auto_renew,
            next_attempt=nxt, last_success=e.issued, failures=e.failures.count,
            last_error=e.last_error, last_code=e.last_code,
            ari_start=e.ari.start if e.ari else None, ari_end=e.ari.end if e.ari else None,
            renewals=e.renewals)

    def list_view(self) -> list[dict[str, Any]]:
        return [self.view(i) for i in sorted(self.entries)]

    def eligible_vs(self) -> list[dict[str, Any]]:
        return [{"name": vs.name, "protocol": vs.protocol.value, "listen": str(vs.listen)}
                for vs in eligible_services(self.runtime.current.config)]

    # -- ordering ---------------------------------------------------------------------------------

    def _launch(self, entry: Entry, *, manual: bool = False) -> asyncio.Task[None]:
        running = self._running.get(entry.id)
        if running is not None and not running.done():
            return running  # one order per certificate at a time
        task = asyncio.create_task(self._obtain(entry, manual=manual), name=f"le-{entry.id}")
        self._running[entry.id] = task
        cert_id = entry.id
        task.add_done_callback(lambda t: self._done(cert_id, t))
        return task

    def _done(self, cert_id: str, task: asyncio.Task[None]) -> None:
        if self._running.get(cert_id) is task:
            del self._running[cert_id]
        self.wake()

    async def _obtain(self, entry: Entry, *, manual: bool = False) -> None:
        """One order for a certificate; success or failure both end in persisted status."""
        old = self.store.get(entry.id)
        action = f"{'renew' if old else 'request'} certificate {entry.id}"
        responder: RuntimeHttp01Responder | None = None
        try:
            self.validate_template(entry.id, entry.template, known=entry.vs_seen)
            if entry.id in self.store.problems:
                # Ordering would only burn a rate limit: the result could not be stored.
                raise LeError(AcmeCode.UNPARSABLE_CERT, f"{action}: the stored certificate is "
                              f"damaged: {self.store.problems[entry.id]}")
            replaces = None
            if old is not None:
                chain = self.store.material(entry.id)
                if chain is not None:
                    with contextlib.suppress(AcmeError, ValueError):
                        replaces = ari_cert_id(chain.chain_pem)
            client = self._client()
            responder = _ObservedResponder(
                self.runtime, entry.id, dict(entry.template.routes), self.journal,
                fail_at=self.fault_codes, on_present=lambda domain, vs: self._emit(
                    EventKind.CHALLENGE_PRESENTED, entry.id,
                    f"http-01 answer for {domain} served by VS {vs}"))
            key = generate_key(entry.template.acme_key_type)
            self.orders_placed += 1
            self._emit(EventKind.REQUESTED, entry.id,
                       f"{'renewal' if old else 'order'} placed for "
                       f"{', '.join(entry.template.names)}{' (manual)' if manual else ''}")
            try:
                async with asyncio.timeout(ORDER_TIMEOUT):
                    chain_pem = await client.obtain_certificate(
                        entry.template.names, key, responder, subject=entry.template.subject(),
                        replaces=replaces)
            except TimeoutError:
                raise LeError(AcmeCode.NETWORK,
                              f"{action}: the order did not end within {ORDER_TIMEOUT:.0f} s"
                              ) from None
            finally:
                await client.close()
            try:
                self.store.import_pem(entry.id, chain_pem.encode(), private_key_to_pem(key),
                                      replace=old is not None, managed_by=MANAGED_BY,
                                      override=True)
            except (CertInputError, ValueError) as exc:
                raise LeError(AcmeCode.UNPARSABLE_CERT,
                              f"{action}: the issued certificate cannot be used: {exc}") from None
            except StoreError as exc:  # the state directory refused the write
                raise LeError(AcmeCode.UNPARSABLE_CERT,
                              f"{action}: the issued certificate cannot be stored: {exc}"
                              ) from None
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            err = classify(exc, action=action)
            if not err.text.startswith(action) and err.code not in (17,):
                err.text = f"{action}: {err.text}"
            self.log.problem(err)
            info = self.store.get(entry.id)
            validity = policy.Validity(info.not_before, info.not_after) if info else None
            entry.failures = policy.record_failure(entry.failures, self.clock(), validity,
                                                   err.retry_after)
            entry.last_error, entry.last_code, entry.last_subcode = (
                err.text, err.code, err.subcode)
            self._save_entry_or_report(entry)
            self._count("order", err.code)
            self._emit(EventKind.FAILED, entry.id, err.text, code=err.code, subcode=err.subcode,
                       failures=entry.failures.count)
            return
        finally:
            if responder is not None:
                await responder.cleanup_all()
        cfg = self.runtime.current.config
        entry.failures = policy.succeeded(entry.failures)
        entry.last_error, entry.last_code, entry.last_subcode = "", None, None
        entry.ari, entry.ari_checked = None, None
        entry.issued = self.clock()
        entry.jitter = random.random()
        entry.vs_seen = tuple(sorted(set(entry.vs_seen) | {
            vs for _, vs in entry.template.routes if cfg.vs_by_name(vs)}))
        if old is not None:
            entry.renewals += 1
        self._save_entry_or_report(entry)
        new = self.store.require(entry.id)
        self.log.audit(f"certificate {'renewed' if old else 'issued'}: {entry.id} serial "
                       f"{new.serial:x} for {','.join(new.names)} until "
                       f"{new.not_after.isoformat()}{' (manual)' if manual else ''}")
        self._count("order", None)
        self._emit(EventKind.RENEWED if old else EventKind.ISSUED, entry.id,
                   f"{'renewed' if old else 'issued'} until {new.not_after.isoformat()}"
                   f"{' (manual)' if manual else ''}")

    # -- scheduling -------------------------------------------------------------------------------

    def due(self, now: dt.datetime) -> list[tuple[dt.datetime, Entry]]:
        """(next attempt, entry) for every auto-renewing certificate, earliest first."""
        out = []
        for e in self.entries.values():
            if not e.auto_renew:
                continue
            info = self.store.get(e.id)
            validity = policy.Validity(info.not_before, info.not_after) if info else None
            when = policy.next_attempt(now, validity, self.settings.renew_period_days, e.ari,
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
            if e.id not in self._running and self.account is not None:
                self._launch(e)
                started += 1
        return started

    async def wait_idle(self) -> None:
        """Wait for every running order to end (tests, shutdown of a CLI run)."""
        while self._running:
            await asyncio.gather(*self._running.values(), return_exceptions=True)

    async def _refresh_ari(self, now: dt.datetime) -> None:
        if self.account is None:
            return
        for e in self.entries.values():
            info = self.store.get(e.id)
            material = self.store.material(e.id)
            if not e.auto_renew or info is None or material is None or e.id in self._running:
                continue
            validity = policy.Validity(info.not_before, info.not_after)
            if e.ari_checked is not None and now < policy.next_ari_check(
                    e.ari_checked, e.ari, validity):
                continue
            e.ari_checked = now
            client = self._client()
            try:
                async with asyncio.timeout(DIRECTORY_TIMEOUT):
                    ri = await client.fetch_renewal_info(material.chain_pem.decode())
            except (AcmeError, TimeoutError, ValueError) as exc:
                logger.info("renewalInfo for %s not available: %s", e.id, exc)
                self._count("renewal_info", classify(exc, action="renewalInfo").code)
                ri = None
            else:
                self._count("renewal_info", None)
            finally:
                await client.close()
            if ri is not None:
                e.ari = policy.AriWindow(ri.start, ri.end, ri.retry_after)
            self._save_entry(e)

    async def _scheduler(self) -> None:
        while True:
            try:
                await self.run_due()
            except asyncio.CancelledError:
                raise
            except Exception:
                logger.exception("Let's Encrypt scheduler step failed")
            now = self.clock()
            pending = [w for w, e in self.due(now) if e.id not in self._running]
            delay = MAX_SLEEP
            if pending:
                delay = min(MAX_SLEEP, max(1.0, (pending[0] - now).total_seconds()))
            self._wake.clear()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(delay):
                    await self._wake.wait()

    # -- config file ------------------------------------------------------------------------------

    async def sync_config(self, config: Config) -> None:
        """Adopt [letsencrypt] when it changed; request declared certificates; stop renewing
        the ones removed from the file; a changed template is re-ordered."""
        if config.letsencrypt != self._config_le:
            if self._config_le is not None or not self._path("settings.json").exists():
                self.settings = Settings.from_config(config.letsencrypt)
                self._save_settings()
            self._config_le = config.letsencrypt
        declared = {r.id: r for r in config.certificates}
        for cid, req in declared.items():
            t = Template.from_request(req)
            e = self.entries.get(cid)
            if e is None and cid in self.damaged:
                continue  # reported at start; its file is not overwritten
            if e is None:
                if self.store.get(cid) is not None:
                    self._problem(LeError(AcmeCode.NAMES_VS_MISMATCH,
                                          f"certificate {cid}: the id is taken by a "
                                          "certificate not managed by Let's Encrypt"))
                    continue
                e = Entry(cid, t, source="config", vs_seen=tuple(sorted(
                    {vs for _, vs in t.routes if config.vs_by_name(vs)})))
                self.entries[cid] = e
                self._save_entry(e)
            elif e.template != t or not e.auto_renew or e.source != "config":
                names_changed = sorted(e.template.names) != sorted(t.names)
                e.template, e.auto_renew, e.source = t, True, "config"
                e.vs_seen = tuple(sorted(set(e.vs_seen) | {
                    vs for _, vs in t.routes if config.vs_by_name(vs)}))
                if names_changed:  # the certificate no longer covers the file's names
                    e.failures = policy.Failures()
                    e.ari = policy.AriWindow(self.clock() - dt.timedelta(minutes=1),
                                             self.clock(), None)
                self._save_entry(e)
        for e in self.entries.values():
            if e.source == "config" and e.id not in declared and e.auto_renew:
                e.auto_renew = False
                self._save_entry(e)
                self.log.info(f"certificate {e.id} removed from the config: no longer renewed")
        self.wake()

    # -- vs convert -------------------------------------------------------------------------------

    async def convert_vs(self, name: str) -> dict[str, Any]:
        """Move a VS's Real Servers into a new SubVS `<vs>-rs` reached by the default rule, at
        run time only; the answer carries the TOML to put in the config file."""
        cfg = self.runtime.current.config
        vs = cfg.vs_by_name(name)
        if vs is None:
            raise StoreError(f"no virtual service {name!r}", status=404)
        if not vs.real_servers:
            raise StoreError(f"VS {name!r} has no Real Servers on the parent; nothing to convert",
                             status=409)
        sub_name = f"{name}-rs"
        if vs.subvs_by_name(sub_name) is not None:
            raise StoreError(f"VS {name!r} already has a SubVS {sub_name!r}", status=409)
        sub = SubVS(name=sub_name, real_servers=vs.real_servers, scheduler=vs.scheduler,
                    rules=(DEFAULT_RULE,), health_check=vs.health_check,
                    not_available=vs.not_available)
        new_vs = dataclasses.replace(vs, real_servers=(), subvs=(sub,), content_switching=True,
                                     precedence=())
        new_cfg = dataclasses.replace(cfg, virtual_services=tuple(
            new_vs if v.name == name else v for v in cfg.virtual_services))
        await self.runtime.set_config(new_cfg)
        return {"vs": name, "subvs": sub_name, "runtime_only": True,
                "toml": convert_snippet(vs, sub)}

    # -- backup / restore -------------------------------------------------------------------------

    def backup(self, passphrase: str, *, include_vs: bool = False,
               include_certs: bool = False) -> bytes:
        account = None
        if self.account is not None:
            account = {"url": self.account.url, "email": self.account.email,
                       "key_pem": private_key_to_pem(self.account.key).decode()}
        vs_config = None
        if include_vs:
            if self.config_path is None or not self.config_path.is_file():
                raise BackupError("the config file is not known to the manager; no VS "
                                  "configuration to back up", status=409)
            vs_config = self.config_path.read_text()
        certs = None
        if include_certs:
            certs = []
            for e in self.entries.values():
                m = self.store.material(e.id)
                certs.append({"entry": e.to_json(),
                              "chain_pem": m.chain_pem.decode() if m else None,
                              "key_pem": m.key_pem.decode() if m else None})
        contents = BackupContents(self.settings.to_json(), account, vs_config, certs,
                                  self.clock().isoformat())
        data = seal(contents, passphrase)
        self.log.audit(f"backup made (vs={include_vs}, certificates={include_certs})")
        return data

    async def restore(self, data: bytes, passphrase: str, *, restore_vs: bool = False,
                      restore_certs: bool = False) -> dict[str, Any]:
        """Apply a backup. Everything in it is checked before the first write (settings,
        account key, VS configuration, each certificate's id, paths and PEM): a refused backup
        changes nothing, and the error names the entry at fault."""
        contents = unseal(data, passphrase)
        try:
            settings = Settings.from_json(contents.settings)
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise BackupError(f"the backup's settings are invalid: {exc!r}") from None
        account = None
        if contents.account is not None:
            try:
                key = load_account_key(str(contents.account["key_pem"]).encode())
            except (CryptoError, KeyError) as exc:
                raise self._problem(LeError(AcmeCode.INVALID_STORED_KEY,
                                            f"the backup's account key is invalid: {exc}")
                                    ) from None
            url = str(contents.account.get("url") or "")
            if not url:
                raise self._problem(LeError(AcmeCode.ACCOUNT_WITHOUT_URL,
                                            "the backup's account has no URL"))
            account = Account(url, str(contents.account.get("email", "")), key)
        cfg = None
        if restore_vs and contents.vs_config is not None:
            try:
                cfg = parse_config(contents.vs_config, base=self.config_path.parent
                                   if self.config_path else None, source="backup")
            except ConfigError as exc:
                raise BackupError(f"the backup's VS configuration is invalid: {exc}") from None
        certs = self._backup_certs(contents.certificates or []) if restore_certs else []

        self.settings = settings
        self._save_settings()
        restored: dict[str, Any] = {"account": "", "certificates": [], "vs": False}
        if account is not None:
            self._save_account(account)
            restored["account"] = account.url
        if cfg is not None and contents.vs_config is not None:
            write_atomic(self._path("restored-config.toml"), contents.vs_config.encode())
            await self.runtime.set_config(cfg)
            restored["vs"] = True
        for e, pem in certs:
            if pem is not None:
                self.store.import_pem(e.id, *pem, replace=self.store.get(e.id) is not None,
                                      managed_by=MANAGED_BY, override=True)
            self.entries[e.id] = e
            self._save_entry(e)
            restored["certificates"].append(e.id)
        self.log.audit(f"backup restored (account {restored['account'] or 'none'}, "
                       f"{len(restored['certificates'])} certificates, vs={restored['vs']})")
        self.wake()
        return restored

    def _backup_certs(self, items: list[Any]) -> list[tuple[Entry, tuple[bytes, bytes] | None]]:
        """A backup's certificates to restore, each with its (chain, key) PEM if it has one;
        BackupError naming the entry for anything that cannot be restored whole: a malformed
        entry, an id that is not valid or would leave the state directory, an id listed twice,
        a PEM the store would refuse, an id whose state here is damaged. An id held here by a
        certificate not managed by Let's Encrypt is skipped (with a warning), as it was."""
        out: list[tuple[Entry, tuple[bytes, bytes] | None]] = []
        seen: set[str] = set()
        for i, c in enumerate(items):
            where = f"the backup's certificates[{i}]"
            try:
                e = Entry.from_json(c["entry"])
            except (KeyError, TypeError, ValueError, AttributeError) as exc:
                raise BackupError(f"{where} is not a certificate entry: {exc!r}") from None
            where = f"{where} (id {e.id!r})"
            try:
                self._entry_path(e.id)
                safe_path(self.store.root, e.id)
            except CertInputError as exc:
                raise BackupError(f"{where}: {exc}") from None
            if e.id in seen:
                raise BackupError(f"{where}: the id is listed twice")
            seen.add(e.id)
            if e.id in self.store.problems:
                raise BackupError(f"{where}: the certificate stored here is damaged "
                                  f"({self.store.problems[e.id]}); move it away first",
                                  status=409)
            info = self.store.get(e.id)
            if info is not None and info.managed_by != MANAGED_BY:
                logger.warning("restore: %s is a non-managed certificate here; skipped", e.id)
                continue
            chain, key = c.get("chain_pem"), c.get("key_pem")
            pem = None
            if chain and key:
                if not isinstance(chain, str) or not isinstance(key, str):
                    raise BackupError(f"{where}: chain_pem and key_pem must be PEM text")
                pem = (chain.encode(), key.encode())
                try:
                    parse_pem(*pem, now=self.clock())
                except CertInputError as exc:
                    raise BackupError(f"{where}: {exc}") from None
            out.append((e, pem))
        return out

    # -- admin API ------------------------------------------------------------------------------

    def register_routes(self, app: web.Application) -> None:
        from ..admin.api import CERT_STATUS_KEY
        from ..admin.le_api import add_routes

        add_routes(app, self)
        app[CERT_STATUS_KEY] = self.cert_statuses


class _ObservedResponder(RuntimeHttp01Responder):
    """The runtime responder, telling `on_present(domain, vs)` once an answer is served."""

    def __init__(self, *args: Any, on_present: Callable[[str, str], None], **kw: Any) -> None:
        super().__init__(*args, **kw)
        self._on_present = on_present

    async def present(self, domain: str, token: str, key_authorization: str) -> None:
        await super().present(domain, token, key_authorization)
        live = self.live
        self._on_present(domain, live[-1].vs if live else "")


def convert_snippet(vs: VirtualService, sub: SubVS) -> str:
    """The TOML that keeps a `vs convert` across restarts (replace the VS's real_servers)."""
    lines = [f"# in [[vs]] name = {json.dumps(vs.name)}: remove its [[vs.real_servers]] and add",
             "[[vs.subvs]]", f"name = {json.dumps(sub.name)}", 'rules = ["default"]',
             f"scheduler = {json.dumps(sub.scheduler.value)}"]
    for rs in sub.real_servers:
        lines += ["[[vs.subvs.real_servers]]", f"address = {json.dumps(str(rs.address))}"]
        if rs.weight != 1:
            lines.append(f"weight = {rs.weight}")
        if not rs.enabled:
            lines.append("enabled = false")
    return "\n".join(lines) + "\n"


def backup_to_text(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def backup_from_text(text: str) -> bytes:
    try:
        return base64.b64decode(text, validate=True)
    except ValueError:
        raise BackupError(f"the backup is not {_BACKUP_B64}") from None


