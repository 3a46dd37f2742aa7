"""The Let's Encrypt manager: the one object the composition root, the admin API and the config
file talk to; it wires the feature's parts together and keeps none of their work.

    state.py     settings, account, managed certificates (in memory, persisted in Storage)
    account.py   register, link by key          checks.py   a request checked whole
    obtain.py    check, lock, check, order, store   issuer.py   the long-lived ACME client
    scheduler.py when orders run                views.py    what the API shows
    backup.py    backup / restore               convert.py  `vs convert`
    challenge.py the challenge SubVS and its journal   certcommands.py  request, renew, delete
    storage.py   the Storage / Locker seams (filestore.py: the state directory, the default)

State lives in `<state_dir>/letsencrypt/` unless another `Storage` is given. Certificates and
their keys go into the SSL certificate store (managed_by="letsencrypt"). The System Message File
and Audit LogFile are in `<state_dir>` (codes.py). `start()` never waits on the CA: it loads state
and starts the scheduler, which sleeps until the next renewal is due. Every public coroutine
raises LeError (a LoadMaster code) or StoreError; every LeError is also written to the System
Message File. Clock, sleep and jitter are injected (defaults real) so a test can run a year;
so is `offload`, how an order's certificate store work leaves the loop (a worker thread).
"""

from __future__ import annotations

import asyncio
import dataclasses
import datetime as dt
import json
import logging
import os
import random
from collections.abc import Awaitable, Callable, Iterable
from pathlib import Path
from typing import Any

from acmeclient.errors import AcmeError, NetworkError

from ..certs.store import CertStore, valid_id
from ..config.model import ClusterSettings, Config, LetsEncryptSettings
from ..config.writer import ConfigFile
from ..errors import AdminError, ConfigError, ConfigProblem
from ..events import CertStatus, EventSink, NullSink
from ..runtime import RuntimeStore
from . import policy
from .account import Accounts
from .backup import Backups
from .blocking import Offload, on_thread
from .certcommands import CertCommands
from .challenge import ChallengeJournal, clear_leftovers
from .checks import validate_template
from .cluster import ClusterNode, Hooks
from .codes import AcmeCode, AcmeLog, LeError
from .convert import convert_vs, reload_from_file
from .filestore import FileStorage
from .issuer import ClientFactory, Issuer, ServedCertIds, default_client_factory
from .model import Account, Clock, Entry, Jitter, Settings, Template, utcnow
from .obtain import Obtainer
from .redisstore import RedisStorage
from .scheduler import Scheduler
from .sealing import Sealer, SealError
from .solvers import Dns01Factory, Solvers
from .state import LeState
from .storage import SETTINGS, Locker, Storage, entry_key, journal_key
from .views import Views

logger = logging.getLogger(__name__)

LE_DIR = "letsencrypt"
# How long `start()` waits for a cluster's Redis before serving without the shared state.
CLUSTER_START_WAIT = 5.0


def _redis_storage(cluster: ClusterSettings) -> RedisStorage:
    """The cluster's storage; a key or password file that cannot be used is a ConfigError."""
    try:
        return RedisStorage.from_settings(cluster, Sealer.from_file(
            cluster.encryption_key_file))
    except SealError as exc:
        raise ConfigError([ConfigProblem("cluster.encryption_key_file", str(exc))]) from None
    except OSError as exc:
        raise ConfigError([ConfigProblem("cluster.password_file",
                                         f"{exc.filename}: {exc.strerror or exc}")]) from None


class LEManager:
    """Account, requests, renewals and persistence of Let's Encrypt certificates."""

    def __init__(self, state_dir: Path, runtime: RuntimeStore, store: CertStore, *,
                 clock: Clock = utcnow, sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
                 jitter: Jitter = random.random,
                 client_factory: ClientFactory = default_client_factory,
                 storage: Storage | None = None, locker: Locker | None = None,
                 config_path: Path | None = None, hostname: str | None = None,
                 events: EventSink | None = None,
                 apply_config: Callable[[], Awaitable[object]] | None = None,
                 cluster: ClusterSettings | None = None, offload: Offload = on_thread,
                 dns01: Dns01Factory | None = None) -> None:
        self.state_dir = Path(state_dir)
        self.dir = self.state_dir / LE_DIR
        self.runtime = runtime
        self.store = store
        self.clock = clock
        self.jitter = jitter
        self.config_path = config_path
        # Edits of the config file (`vs convert`, `restore --vs`, `le delete`), applied through
        # `apply_config`: the composition root's reload; without one, the manager's own.
        self.config_file = ConfigFile(config_path, apply_config or reload_from_file(
            runtime, config_path, self.sync_config))
        redis: RedisStorage | None = None
        if cluster is not None:   # [cluster]: the state is shared through Redis
            redis = _redis_storage(cluster)
            storage, locker = redis, redis
        if storage is None:
            files = FileStorage(self.dir)
            storage, locker = files, locker or files
        if locker is None:
            raise ValueError("a Storage other than the state directory needs its Locker")
        self.storage = storage
        self.locker = locker
        self.log = AcmeLog(self.state_dir, now=self._now, hostname=hostname)
        self.journal = ChallengeJournal(storage, journal_key(cluster.node() if cluster else None))
        # Codes 20-25 to provoke in the challenge injection (fault injection for tests).
        self.fault_codes: set[int] = set()
        self.state = LeState(storage, self.log,
                             Settings.from_config(runtime.current.config.letsencrypt))
        self._config_le: LetsEncryptSettings | None = None
        self._declared: set[str] = set()   # the [[certificate]] ids of the last config synced
        self.issuer = Issuer(client_factory)
        self.accounts = Accounts(self.state, self.issuer)
        # Certificate events (requested ... deleted) go here; `lbproxy.events.Events` in a
        # running process, a NullSink when nobody listens.
        self.events: EventSink = events or NullSink()
        self.cluster: ClusterNode | None = None
        if redis is not None and cluster is not None:
            self.cluster = ClusterNode(redis, runtime, self.log, self._cluster_hooks(),
                                       poll_interval=cluster.poll_interval)
        # Each order's solver by challenge type; `dns01` is where a dns-01 provider plugs in.
        self.solvers = Solvers(runtime, self.journal, fault_codes=lambda: self.fault_codes,
                               share=self.cluster, dns01=dns01)
        self.obtainer = Obtainer(self.state, self.accounts, self.issuer, locker, store, runtime,
                                 self.journal, self.events, clock=self._now, jitter=jitter,
                                 fault_codes=lambda: self.fault_codes, share=self.cluster,
                                 offload=offload, cert_ids=ServedCertIds(store),
                                 solvers=self.solvers)
        self.scheduler = Scheduler(self.state, store, self.issuer, self._obtain, clock=self._now,
                                   sleep=sleep, cert_ids=self.obtainer.cert_ids)
        self.views = Views(self.state, store, runtime, self.scheduler.running, self.solvers)
        self.backups = Backups(self.state, self.accounts, store, runtime, clock=self._now,
                               config_path=config_path, wake=self.wake,
                               config_file=self.config_file)
        self.commands = CertCommands(
            self.state, store, runtime, storage=storage, scheduler=self.scheduler,
            solvers=self.solvers, accounts=self.accounts, views=self.views,
            config_file=self.config_file, log=self.log, events=self.events, clock=self._now,
            jitter=jitter, clustered=self.cluster is not None)

    def _now(self) -> dt.datetime:
        return self.clock()   # read at each call: a test may swap the clock

    async def _obtain(self, entry: Entry, manual: bool) -> None:
        await self.obtainer.obtain(entry, manual=manual)

    # -- the state the API and tests read ---------------------------------------------------------

    @property
    def settings(self) -> Settings:
        return self.state.settings

    @settings.setter
    def settings(self, value: Settings) -> None:
        self.state.settings = value

    @property
    def account(self) -> Account | None:
        return self.state.account

    @account.setter
    def account(self, value: Account | None) -> None:
        self.state.account = value

    @property
    def account_problem(self) -> LeError | None:
        return self.state.account_problem

    @property
    def entries(self) -> dict[str, Entry]:
        return self.state.entries

    @property
    def damaged(self) -> dict[str, str]:
        return self.state.damaged

    @property
    def orders_placed(self) -> int:
        return self.state.orders_placed

    @property
    def acme_requests(self) -> Any:
        """ACME operations by (operation, result): a Counter."""
        return self.state.acme_requests

    @property
    def client_factory(self) -> ClientFactory:
        return self.issuer.factory

    @client_factory.setter
    def client_factory(self, factory: ClientFactory) -> None:
        self.issuer.factory = factory

    # -- lifecycle --------------------------------------------------------------------------------

    async def start(self) -> None:
        """Load state, clear challenge leftovers, start the scheduler. Never waits on the CA.
        In a cluster, waits a little for Redis (CLUSTER_START_WAIT); without it, the node
        serves what it has and loads the state once Redis answers."""
        if self.cluster is None:
            await self._load()
            return
        self.cluster.start()
        try:
            async with asyncio.timeout(CLUSTER_START_WAIT):
                await self.cluster.loaded.wait()
        except TimeoutError:
            self.log.error(f"cluster: the shared state is not loaded yet ("
                           f"{self.cluster.link.last_error or 'Redis does not answer'}); "
                           "serving what this node has")

    async def _load(self) -> None:
        await self.state.load_settings()
        await self.accounts.load()
        await self.state.load_entries()
        for what in sorted(self.store.problems.values()):
            self.log.error(f"damaged certificate store state, not used: {what}")
        await clear_leftovers(self.journal, self.runtime, self.log)
        await self.sync_config(self.runtime.current.config)
        self.scheduler.start()

    async def stop(self) -> None:
        await self.scheduler.stop()
        if self.cluster is not None:
            await self.cluster.stop()
        await self.issuer.close()
        self.state.cpu.close()

    # -- a cluster node following the others ------------------------------------------------------

    def _cluster_hooks(self) -> Hooks:
        return Hooks(load=self._load, reload_settings=self.state.load_settings,
                     reload_account=self.accounts.load, entry_changed=self._entry_changed,
                     entry_deleted=self._entry_deleted, issued_changed=self._issued_changed,
                     known_ids=lambda: list(self.state.entries))

    def _ordering(self, cert_id: str) -> bool:
        task = self.scheduler.running.get(cert_id)
        return task is not None and not task.done()

    async def _entry_changed(self, cert_id: str) -> None:
        """Another node stored a certificate's entry: adopt it (its order's outcome, or a new
        certificate to serve and renew), unless an order for it runs here."""
        if self._ordering(cert_id) or not valid_id(cert_id):
            return
        try:
            entry = Entry.from_json(json.loads(await self.storage.load(entry_key(cert_id))))
        except FileNotFoundError:
            return
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            where = self.storage.describe(entry_key(cert_id))
            self.log.error(f"cluster: certificate metadata {where} is damaged ({exc}); "
                           "not adopted")
            return
        if entry.id != cert_id:
            return
        self.state.entries[cert_id] = entry
        self.wake()

    async def _entry_deleted(self, cert_id: str) -> None:
        if cert_id in self.state.entries and not self._ordering(cert_id):
            del self.state.entries[cert_id]
            self.log.info(f"cluster: certificate {cert_id} was deleted on another node; no "
                          "longer renewed here (the certificate served stays until deleted "
                          "here)")

    async def _issued_changed(self, cert_id: str) -> None:
        if cert_id not in self.state.entries:
            await self._entry_changed(cert_id)
        entry = self.state.entries.get(cert_id)
        if entry is not None and not self._ordering(cert_id):
            await self.obtainer.pick_up(entry)

    async def cluster_view(self) -> dict[str, Any] | None:
        return None if self.cluster is None else await self.cluster.view()

    def wake(self) -> None:
        """Look at the schedule now (after a clock change in tests, or a settings change)."""
        self.scheduler.wake()

    # -- settings ---------------------------------------------------------------------------------

    async def set_directory(self, url: str, ca_bundle: str | None = None) -> Settings:
        s = self.state
        bundle = s.settings.ca_bundle if ca_bundle is None else ca_bundle
        if not url.startswith("https://"):
            raise s.problem(LeError(AcmeCode.BAD_DIRECTORY, f"directory URL {url!r} is not https"))
        if bundle and not await on_thread(lambda: os.path.isfile(bundle)):
            raise s.problem(LeError(AcmeCode.BAD_DIRECTORY,
                                    f"CA bundle {bundle!r} is not a readable file"))
        try:
            await self.issuer.check_directory(url, bundle)
        except (NetworkError, TimeoutError) as exc:
            s.count("directory", AcmeCode.NETWORK)
            raise s.problem(LeError(AcmeCode.NETWORK,
                                    f"cannot fetch the directory {url}: {exc}")) from None
        except AcmeError as exc:
            s.count("directory", AcmeCode.BAD_DIRECTORY)
            raise s.problem(LeError(AcmeCode.BAD_DIRECTORY,
                                    f"bad directory at {url}: {exc}")) from None
        s.count("directory", None)
        s.settings = dataclasses.replace(s.settings, directory_url=url, ca_bundle=bundle)
        await s.save_settings()
        await self.issuer.close()   # the next order talks to the new directory
        self.log.info(f"directory set to {url}")
        return s.settings

    async def set_renew_period(self, days: int) -> Settings:
        if not policy.MIN_RENEW_PERIOD_DAYS <= days <= policy.MAX_RENEW_PERIOD_DAYS:
            raise AdminError(f"the renew period must be 1 to 60 days, got {days}")
        self.state.settings = dataclasses.replace(self.state.settings, renew_period_days=days)
        await self.state.save_settings()
        self.wake()
        return self.state.settings

    async def set_email(self, email: str) -> Settings:
        self.state.settings = dataclasses.replace(self.state.settings, email=email)
        await self.state.save_settings()
        return self.state.settings

    # -- account ----------------------------------------------------------------------------------

    async def register(self, email: str | None = None) -> dict[str, Any]:
        return await self.accounts.register(email)

    async def upload_key(self, data: bytes, passphrase: bytes | None = None, *,
                         replace: bool = False) -> dict[str, Any]:
        return await self.accounts.upload_key(data, passphrase, replace=replace)

    def account_view(self) -> dict[str, Any]:
        return self.accounts.view()

    # -- certificates -----------------------------------------------------------------------------

    def validate_template(self, cert_id: str, t: Template, *, known: Iterable[str] = ()) -> None:
        validate_template(self.state, self.runtime.current.config, cert_id, t, known=known)

    async def request(self, cert_id: str, template: Template, *, wait: bool = True,
                      source: str = "api") -> dict[str, Any]:
        return await self.commands.request(cert_id, template, wait=wait, source=source)

    async def renew(self, cert_id: str, *, wait: bool = True) -> dict[str, Any]:
        return await self.commands.renew(cert_id, wait=wait)

    async def delete(self, cert_id: str) -> None:
        await self.commands.delete(cert_id)

    # -- schedule ---------------------------------------------------------------------------------

    def due(self, now: dt.datetime) -> list[tuple[dt.datetime, Entry]]:
        return self.scheduler.due(now)

    async def run_due(self) -> int:
        return await self.scheduler.run_due()

    async def wait_idle(self) -> None:
        await self.scheduler.wait_idle()

    # -- views ------------------------------------------------------------------------------------

    def view(self, cert_id: str) -> dict[str, Any]:
        return self.views.view(cert_id, self.clock())

    def list_view(self) -> list[dict[str, Any]]:
        return self.views.list_view(self.clock())

    def cert_statuses(self) -> list[CertStatus]:
        return self.views.cert_statuses(self.clock())

    def eligible_vs(self) -> list[dict[str, Any]]:
        return self.views.eligible_vs()

    # -- config file ------------------------------------------------------------------------------

    async def sync_config(self, config: Config) -> None:
        """Adopt [letsencrypt] when it changed; request declared certificates; stop renewing
        the ones removed from the file; a changed template is re-ordered."""
        s = self.state
        # [letsencrypt.dns] is read at each dns-01 order: a change there is no settings change.
        le = dataclasses.replace(config.letsencrypt, dns=None)
        if le != self._config_le:
            if self._config_le is not None or not await self.storage.exists(SETTINGS):
                s.settings = Settings.from_config(le)
                await s.save_settings()
            self._config_le = le
        declared = {r.id: r for r in config.certificates}
        for cid, req in declared.items():
            t = Template.from_request(req)
            e = s.entries.get(cid)
            if e is None and cid in s.damaged:
                continue  # reported at start; its file is not overwritten
            if e is None:
                if self.store.get(cid) is not None:
                    s.problem(LeError(AcmeCode.NAMES_VS_MISMATCH,
                                      f"certificate {cid}: the id is taken by a "
                                      "certificate not managed by Let's Encrypt"))
                    continue
                e = Entry(cid, t, source="config", jitter=self.jitter())
                e.see_vs(config)
                s.entries[cid] = e
                await s.save_entry(e)
            elif e.template != t or not e.auto_renew or e.source != "config":
                names_changed = sorted(e.template.names) != sorted(t.names)
                e.template, e.auto_renew, e.source = t, True, "config"
                e.see_vs(config)
                if names_changed:  # the certificate no longer covers the file's names
                    e.failures = policy.Failures()
                    e.ari = policy.AriWindow(self.clock() - dt.timedelta(minutes=1),
                                             self.clock(), None)
                await s.save_entry(e)
        for e in s.entries.values():
            # In a cluster an entry may be another node's declaration: only one this node's
            # own file declared before stops being renewed when it leaves the file.
            mine = self.cluster is None or e.id in self._declared
            if e.source == "config" and e.id not in declared and e.auto_renew and mine:
                e.auto_renew = False
                await s.save_entry(e)
                self.log.info(f"certificate {e.id} removed from the config: no longer renewed")
        self._declared = set(declared)
        self.wake()

    # -- vs convert, backup / restore -------------------------------------------------------------

    async def convert_vs(self, name: str) -> dict[str, Any]:
        return await convert_vs(self.runtime, self.config_file, name)

    async def backup(self, passphrase: str, *, include_vs: bool = False,
                     include_certs: bool = False) -> bytes:
        return await self.backups.make(passphrase, include_vs=include_vs,
                                       include_certs=include_certs)

    async def restore(self, data: bytes, passphrase: str, *, restore_vs: bool = False,
                      restore_certs: bool = False) -> dict[str, Any]:
        return await self.backups.restore(data, passphrase, restore_vs=restore_vs,
                                          restore_certs=restore_certs)
