"""The running process: wires config, runtime, data plane, certificate store and admin API
together, reloads on SIGHUP or a file change, and shuts down gracefully on SIGTERM."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import gc
import hashlib
import logging
import os
import signal
from collections.abc import Awaitable, Callable
from pathlib import Path

from .accesslog import configure_access_log
from .admin import AdminServer, create_app, load_or_create_token, start_admin
from .admin.le_api import le_routes
from .admin.server import AdminTLS
from .certs import CertStore, config_usage
from .config import load_file
from .config.model import AccessLogSettings, Config
from .errors import ConfigError, ConfigProblem, LBProxyError
from .events import Events
from .letsencrypt import LEManager
from .metrics import METRICS_PATH, MetricsCollector, metrics_routes
from .proxy import DataPlane
from .proxy.tls import TLSContexts
from .runtime import Runtime, RuntimeStore, new_generation, off_loop, parse_apart
from .workers import Supervisor

logger = logging.getLogger(__name__)

# How often the config file is looked at for changes (stat only; content hashed on change).
# A change is applied once the file looked the same on two polls in a row: an editor's
# truncate-then-write takes milliseconds, so a second look one interval later sees it finished.
WATCH_INTERVAL = 1.0

FileState = tuple[tuple[int, int, int], str]  # (_fingerprint, _digest) of the config file


class _NoVirtualService(ConfigError):
    """A file with no [[vs]] at reload: allow_empty applies at start only."""


def _fingerprint(path: Path) -> tuple[int, int, int] | None:
    try:
        st = path.stat()
    except OSError:
        return None
    return (st.st_mtime_ns, st.st_size, st.st_ino)


def _digest(path: Path) -> str | None:
    try:
        return hashlib.sha256(path.read_bytes()).hexdigest()
    except OSError:
        return None


class App:
    """One lbproxy process. `start()` serves; `reload()` re-reads the file; `stop()` drains.

    `workers` > 1: this is the control process and that many worker processes serve traffic
    (lbproxy.workers); 1: this process serves too, as before workers existed.
    """

    def __init__(self, config_path: Path, config: Config, *, workers: int = 1,
                 log_level: int = logging.INFO) -> None:
        self.config_path = config_path
        self.runtime = RuntimeStore(config)
        self._digest = _digest(config_path)
        self._fp = _fingerprint(config_path)
        self._watch_task: asyncio.Task[None] | None = None
        # What the watcher waits for between two polls (tests drive it by hand).
        self.watch_tick: Callable[[], Awaitable[object]] = lambda: asyncio.sleep(WATCH_INTERVAL)
        self._unsettled: FileState | None = None  # a change seen once, not yet twice
        self._stopping = asyncio.Event()
        self._apply_lock = asyncio.Lock()  # one apply_file at a time
        self.reloads_ok = 0
        self._access_log = config.access_log
        self._admin_settings = config.admin
        self._workers_setting = config.workers
        self.reloads_failed = 0
        self.state_dir = config.state_path(config_path)
        self.store = CertStore(self.state_dir,
                               usage=config_usage(lambda: self.runtime.current.config))
        self.tls = TLSContexts(self.store, self.runtime.current.effective_services())
        self.supervisor: Supervisor | None = None
        self.dataplane: DataPlane | Supervisor
        if workers > 1:
            self.supervisor = self.dataplane = Supervisor(
                workers, lookup=self.store, base_dir=config_path.parent, log_level=log_level,
                request_tag=config.worker_id_header)
            self.store.watch(self.supervisor.certs_changed)
        else:
            self.dataplane = DataPlane(tls_factory=self.tls.factory)
        self.events = Events(config.events)
        self.manager = LEManager(self.state_dir, self.runtime, self.store,
                                 config_path=config_path, events=self.events,
                                 apply_config=self.apply_file, cluster=config.cluster)
        self._cluster_settings = config.cluster
        self.events.watch(self.manager.cert_statuses)
        sup = self.supervisor
        self.metrics = MetricsCollector(
            self.dataplane.stats, certs=self.manager.cert_statuses,
            acme=lambda: self.manager.acme_requests, events=self.events,
            refresh=sup.refresh if sup is not None else None,
            workers=sup.workers if sup is not None else None,
            cluster=self.manager.cluster_view)
        self.admin: AdminServer | None = None

    @property
    def config(self) -> Config:
        return self.runtime.current.config

    async def start(self, *, watch: bool = True) -> None:
        if self.supervisor is None:  # else each worker writes its own lines (see workers)
            configure_access_log(self.config.access_log, self.config_path.parent)
        # Certificates first, so https listeners open with their SNI contexts ready.
        self.runtime.subscribe(self.tls.on_runtime)
        self.runtime.subscribe(self.dataplane.apply)
        await self.dataplane.apply(self.runtime.current)
        # Never waits on the CA: renewals and declared certificates are scheduled, not awaited.
        await self.manager.start()
        await self.events.start()
        if self.config.admin.enabled:
            app = create_app(runtime=self.runtime, dataplane_stats=self.dataplane.stats,
                             store=self.store, tls=self.tls,
                             token=load_or_create_token(self.state_dir),
                             extra_routes=[le_routes(self.manager),
                                           metrics_routes(self.metrics)],
                             open_paths=(METRICS_PATH,) if self.config.admin.metrics_public
                             else (),
                             refresh_stats=sup.refresh if (sup := self.supervisor) else None,
                             workers=sup.workers if sup is not None else None)
            # HTTPS while a certificate is assigned to "admin"; follows (un)assignments.
            self.admin = await start_admin(app, self.config.admin.listen,
                                           tls=AdminTLS(self.store))
            logger.info("admin API on %s://%s (token in %s)", self.admin.scheme,
                        self.config.admin.listen, self.state_dir / "admin.token")
        if watch:
            self._watch_task = asyncio.create_task(self._watch(), name="config-watch")
        logger.info("lbproxy started: %d virtual services, generation %d%s",
                    len(self.config.virtual_services), self.runtime.current.generation,
                    f", {self.supervisor.count} worker processes" if self.supervisor else "")

    async def reload(self) -> bool:
        """Re-read the config file; a bad file is logged and the running config keeps serving."""
        try:
            await self.apply_file()
        except _NoVirtualService:
            # allow_empty only lets a process start empty: a reload that would close every
            # listener is far likelier a half-written file than a wish.
            self.reloads_failed += 1
            logger.error("reload of %s rejected: it defines no virtual service (allow_empty "
                         "applies at start only); still serving generation %d",
                         self.config_path, self.runtime.current.generation)
            return False
        except ConfigError as e:
            self.reloads_failed += 1
            logger.error("reload of %s rejected (%d problems); still serving generation %d",
                         self.config_path, len(e.problems), self.runtime.current.generation)
            for p in e.problems:
                logger.error("  %s", p)
            return False
        except LBProxyError as e:
            self.reloads_failed += 1
            logger.error("reload of %s failed: %s; still serving generation %d",
                         self.config_path, e, self.runtime.current.generation)
            return False
        return True

    async def apply_file(self) -> Runtime:
        """Make the config file the running config now: the reload path, also taken right after
        lbproxy writes the file itself (`vs convert`, `restore --vs`, `le delete`), so the file
        and the running config are one generation. Raises ConfigError (the file) or
        LBProxyError (the runtime refused it) only while the old config still runs.

        The file is read, parsed and validated in a child process (`runtime.parse_apart`: 10,000
        rules are about half a second of CPU), so requests keep being served meanwhile; one call
        at a time, so that the file read last is the one that runs."""
        async with self._apply_lock:
            return await self._apply_file()

    async def _apply_file(self) -> Runtime:
        self._fp = _fingerprint(self.config_path)
        self._digest = await off_loop(_digest, self.config_path)  # 1 MB: ~2 ms of SHA-256
        self._unsettled = None
        with new_generation():
            cfg = await parse_apart(self.config_path)
            if not cfg.virtual_services:
                raise _NoVirtualService([ConfigProblem(str(self.config_path),
                                                       "defines no virtual service")])
            rt = await self.runtime.set_config(cfg)
        self.reloads_ok += 1
        try:
            await self.manager.sync_config(cfg)
        except Exception:
            # The new config runs; the certificates it declares are looked at again next time.
            logger.exception("reloaded %s, but its certificates could not be synced",
                             self.config_path)
        if cfg.admin != self._admin_settings:
            logger.warning("admin settings changed; they take effect at the next restart")
        if cfg.workers != self._workers_setting:
            logger.warning("workers changed; it takes effect at the next restart")
        if cfg.cluster != self._cluster_settings:
            logger.warning("[cluster] changed; it takes effect at the next restart")
        if cfg.access_log != self._access_log:
            if self.supervisor is None:
                configure_access_log(cfg.access_log, self.config_path.parent)
            self._access_log = cfg.access_log
        logger.info("reloaded %s: generation %d", self.config_path, rt.generation)
        return rt

    async def _watch(self) -> None:
        while True:
            await self.watch_tick()
            await self.poll_config()

    async def poll_config(self) -> bool:
        """One look at the config file (the watcher's, every WATCH_INTERVAL): reload when its
        content differs from the last one read and the file has settled, i.e. was the same
        (size, mtime, inode, SHA-256) at the previous poll. True if a reload applied."""
        fp = _fingerprint(self.config_path)
        if fp is None or fp == self._fp:
            self._unsettled = None  # gone (an editor's rename in progress) or back as it was
            return False
        digest = _digest(self.config_path)
        if digest is None:
            self._unsettled = None
            return False
        if digest == self._digest:
            self._fp = fp  # touched, same content
            self._unsettled = None
            return False
        seen = (fp, digest)
        if self._unsettled != seen:
            self._unsettled = seen
            logger.debug("%s is changing; waiting for it to settle", self.config_path)
            return False
        self._unsettled = None
        logger.info("%s changed on disk; reloading", self.config_path)
        return await self.reload()

    def request_stop(self) -> None:
        self._stopping.set()

    async def wait_stopped(self) -> None:
        await self._stopping.wait()

    async def stop(self) -> None:
        if self._watch_task is not None:
            self._watch_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._watch_task
        if self.admin is not None:
            await self.admin.close()
        await self.manager.stop()
        await self.events.stop()
        await self.dataplane.shutdown(self.config.drain_timeout)
        if self.supervisor is None:
            configure_access_log(AccessLogSettings(enabled=False), self.config_path.parent)
        logger.info("lbproxy stopped")


async def _main(config_path: Path, demo_backends: bool, workers: int | None = None) -> int:
    try:
        config = load_file(config_path, to_run=True)
    except ConfigError as e:
        for p in e.problems:
            logger.error("%s", p)
        return 1
    demo: list[asyncio.Server] = []
    if demo_backends:
        from .demo import start_demo_backends

        demo = await start_demo_backends(config)
    if not config.virtual_services:
        logger.warning("%s defines no virtual service; starting anyway (allow_empty = true)",
                       config_path)
    # --workers N stands for the file's `workers` (0: one per core) for this run.
    count = (config if workers is None
             else dataclasses.replace(config, workers=workers)).worker_count()
    try:
        app = App(config_path, config, workers=count,
                  log_level=logging.getLogger().getEffectiveLevel())
    except ConfigError as e:
        for p in e.problems:
            logger.error("%s: %s", config_path, p)
        return 1
    # Signals are taken from the start: a SIGHUP's default action would kill the process (and a
    # supervisor sending one as soon as a port answers is right to). One that arrives while
    # starting reloads once started; SIGTERM/SIGINT then stop at once.
    loop = asyncio.get_running_loop()
    hup_pending = asyncio.Event()
    reloads: set[asyncio.Task[bool]] = set()

    def reload_now() -> None:
        task = loop.create_task(app.reload(), name="reload")
        reloads.add(task)
        task.add_done_callback(reloads.discard)

    def hup() -> None:
        if not started:
            hup_pending.set()
        else:
            reload_now()

    started = False
    loop.add_signal_handler(signal.SIGTERM, app.request_stop)
    loop.add_signal_handler(signal.SIGINT, app.request_stop)
    loop.add_signal_handler(signal.SIGHUP, hup)
    try:
        await app.start()
    except LBProxyError as e:
        logger.error("cannot start: %s", e)
        return 1
    # What start-up built (modules, the config, compiled rules, certificates) lives as long as the
    # process: it is moved out of the cyclic collector's reach, so that a full collection under
    # load walks only what was made since (a full walk of it takes 20-30 ms here: a latency spike).
    # The price: frozen objects caught in reference cycles are never freed, so the first
    # generation's config stays in memory after a reload replaces it (once, not per reload).
    gc.collect()
    gc.freeze()
    started = True
    if hup_pending.is_set():
        reload_now()
    await app.wait_stopped()
    logger.info("stopping: draining for up to %.0f s", app.config.drain_timeout)
    await app.stop()
    for s in demo:
        s.close()
    return 0


def run_forever(config: str | os.PathLike[str], *, demo_backends: bool = False,
                workers: int | None = None) -> int:
    """Run until SIGTERM/SIGINT; `workers` overrides the config's `workers`."""
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency; stay usable without it
        return asyncio.run(_main(Path(config), demo_backends, workers))
    return uvloop.run(_main(Path(config), demo_backends, workers))
