"""The running process: wires config, runtime, data plane, certificate store and admin API
together, reloads on SIGHUP, `POST /api/reload` or (when watching is on) a file change, reopens
the access log on SIGUSR1, and shuts down gracefully on SIGTERM."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import gc
import hashlib
import json
import logging
import os
import signal
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from .accesslog import configure_access_log, reopen_access_log
from .admin import AdminServer, create_app, load_or_create_token, start_admin
from .admin.le_api import le_routes
from .admin.ops_api import ops_routes
from .admin.server import AdminTLS
from .certs import CertStore, config_usage
from .config import load_file
from .config.diff import config_diff, diff_summary
from .config.model import AccessLogSettings, Config
from .errors import CannotListen, ConfigError, ConfigProblem, LBProxyError
from .events import Events
from .letsencrypt import LEManager
from .letsencrypt.dns01 import Rfc2136Factory
from .metrics import METRICS_PATH, MetricsCollector, metrics_routes
from .proxy import MODE as HOT_PATH
from .proxy import DataPlane, ListenError
from .proxy.tls import TLSContexts
from .runtime import Runtime, RuntimeStore, new_generation, off_loop, parse_apart
from .sdnotify import notify_ready, notify_reloading, notify_stopping
from .servercontrol import STATE_FILE, ServerControl
from .workers import Supervisor

logger = logging.getLogger(__name__)

# How often the config file is looked at for changes, when watching is on (`lbproxy run --watch`
# or `watch_config = true`; off, only SIGHUP and POST /api/reload apply the file): stat only,
# content hashed on change.
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
        self._watch_asked = False  # `lbproxy run --watch`; or the config's watch_config
        self._watching = False
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
        # dns-01: a responder per order from the running config's [letsencrypt.dns] (a reload
        # that changes it is used by the next order; the TSIG secret is read then).
        self.manager = LEManager(self.state_dir, self.runtime, self.store,
                                 config_path=config_path, events=self.events,
                                 apply_config=self.apply_file, cluster=config.cluster,
                                 dns01=Rfc2136Factory(
                                     lambda: self.runtime.current.config.letsencrypt.dns))
        self._cluster_settings = config.cluster
        self.events.watch(self.manager.cert_statuses)
        sup = self.supervisor
        self.metrics = MetricsCollector(
            self.dataplane.stats, certs=self.manager.cert_statuses,
            acme=lambda: self.manager.acme_requests, events=self.events,
            refresh=sup.refresh if sup is not None else None,
            workers=sup.workers if sup is not None else None,
            cluster=self.manager.cluster_view,
            reloads=lambda: {"success": self.reloads_ok, "failure": self.reloads_failed})
        self.admin: AdminServer | None = None
        # Run-time real-server overrides, kept in the state directory across restarts.
        self.servers = ServerControl(self.state_dir / STATE_FILE, push=self.dataplane.set_servers)
        self.servers.load(config)

    @property
    def config(self) -> Config:
        return self.runtime.current.config

    async def start(self, *, watch: bool = False) -> None:
        """Serve. `watch` (`lbproxy run --watch`): apply the file once a change has settled,
        whatever the config's `watch_config` says (which does the same when true)."""
        if self.supervisor is None:  # else each worker writes its own lines (see workers)
            configure_access_log(self.config.access_log, self.config_path.parent)
        # Real-server overrides first (a new generation is served with the ones it allows), then
        # certificates, so https listeners open with their SNI contexts ready.
        self.runtime.subscribe(self.servers.on_runtime)
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
                                           metrics_routes(self.metrics),
                                           ops_routes(self.reload_report, self.servers)],
                             open_paths=(METRICS_PATH,) if self.config.admin.metrics_public
                             else (),
                             refresh_stats=sup.refresh if (sup := self.supervisor) else None,
                             workers=sup.workers if sup is not None else None)
            # HTTPS while a certificate is assigned to "admin"; follows (un)assignments.
            self.admin = await start_admin(app, self.config.admin.listen,
                                           tls=AdminTLS(self.store))
            logger.info("admin API on %s://%s (token in %s)", self.admin.scheme,
                        self.config.admin.listen, self.state_dir / "admin.token")
        self._watch_asked = watch
        self._set_watching(watch or self.config.watch_config)
        if HOT_PATH != "compiled":  # proxy/compiled.py; bench/README.md has the cost
            logger.warning("the data plane's hot modules run as Python (%s), about 15 %% "
                           "more CPU per relayed request; `pip install` with gcc and python3-dev "
                           "compiles them (README, 'Install it')", HOT_PATH)
        logger.info("lbproxy started: %d virtual services, generation %d%s; hot path %s",
                    len(self.config.virtual_services), self.runtime.current.generation,
                    f", {self.supervisor.count} worker processes" if self.supervisor else "",
                    HOT_PATH)
        # systemd (Type=notify): every listener accepts (in each worker), the admin API answers.
        notify_ready()

    async def reload(self) -> bool:
        """Re-read the config file; a bad file is logged and the running config keeps serving."""
        try:
            await self._reload_logged()
        except LBProxyError:
            return False
        return True

    async def reload_report(self) -> dict[str, Any]:
        """The reload of `POST /api/reload` (and `lbproxy reload`): {"generation", "changed"
        (the config differs from the one it replaced), "diff" (lbproxy.config.diff)}. Raises
        ConfigError (the file) or LBProxyError (the runtime refused it), logged and counted as
        a SIGHUP's; the running config keeps serving then."""
        old, rt = await self._reload_logged()

        def compare() -> tuple[bool, dict[str, Any]]:
            return old != rt.config, config_diff(old, rt.config)

        changed, diff = await off_loop(compare)  # 10,000 rules: milliseconds of comparing
        for line in diff_summary(diff):
            logger.info("generation %d: %s", rt.generation, line)
        return {"generation": rt.generation, "changed": changed, "diff": diff}

    async def _reload_logged(self) -> tuple[Config, Runtime]:
        """apply_file with its outcome logged and counted: (the config replaced, the new
        runtime), or the error re-raised."""
        try:
            return await self._apply_locked()
        except _NoVirtualService:
            # allow_empty only lets a process start empty: a reload that would close every
            # listener is far likelier a half-written file than a wish.
            self.reloads_failed += 1
            logger.error("reload of %s rejected: it defines no virtual service (allow_empty "
                         "applies at start only); still serving generation %d",
                         self.config_path, self.runtime.current.generation)
            raise
        except ConfigError as e:
            self.reloads_failed += 1
            logger.error("reload of %s rejected (%d problems); still serving generation %d",
                         self.config_path, len(e.problems), self.runtime.current.generation)
            for p in e.problems:
                logger.error("  %s", p)
            raise
        except LBProxyError as e:
            self.reloads_failed += 1
            logger.error("reload of %s failed: %s; still serving generation %d",
                         self.config_path, e, self.runtime.current.generation)
            raise

    async def apply_file(self) -> Runtime:
        """Make the config file the running config now: the reload path, also taken right after
        lbproxy writes the file itself (`vs convert`, `restore --vs`, `le delete`), so the file
        and the running config are one generation. Raises ConfigError (the file) or
        LBProxyError (the runtime refused it) only while the old config still runs.

        The file is read, parsed and validated in a child process (`runtime.parse_apart`: 10,000
        rules are about half a second of CPU), so requests keep being served meanwhile; one call
        at a time, so that the file read last is the one that runs."""
        return (await self._apply_locked())[1]

    async def _apply_locked(self) -> tuple[Config, Runtime]:
        """apply_file's work: (the config it replaced, the new runtime)."""
        async with self._apply_lock:
            notify_reloading()  # systemd shows "reloading" until READY=1
            try:
                old = self.runtime.current.config
                return old, await self._apply_file()
            finally:
                notify_ready()  # the new config, or the old one still, serves

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
        if self._watching != (self._watch_asked or cfg.watch_config):
            self._set_watching(self._watch_asked or cfg.watch_config)
        logger.info("reloaded %s: generation %d", self.config_path, rt.generation)
        return rt

    def _set_watching(self, on: bool) -> None:
        """Start or stop watching the file (the watcher stops itself at its next tick, so that a
        reload it runs is never cancelled from within)."""
        self._watching = on
        if on and (self._watch_task is None or self._watch_task.done()):
            self._watch_task = asyncio.create_task(self._watch(), name="config-watch")
            logger.info("watching %s: a change is applied once it has settled", self.config_path)
        elif not on:
            logger.info("not watching %s: apply changes with `lbproxy reload` or SIGHUP",
                        self.config_path)

    async def _watch(self) -> None:
        while self._watching:
            await self.watch_tick()
            if not self._watching:
                return
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

    def reopen_logs(self) -> None:
        """SIGUSR1 (logrotate's postrotate): reopen the access-log file, here or, with workers,
        in each worker (each writes its own lines)."""
        if self.supervisor is not None:
            self.supervisor.reopen_logs()
        elif reopen_access_log():
            logger.info("access log reopened")

    async def wait_stopped(self) -> None:
        await self._stopping.wait()

    async def stop(self) -> None:
        notify_stopping()
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


async def _main(config_path: Path, demo_backends: bool, workers: int | None = None,
                watch: bool = False) -> int:
    try:
        config = load_file(config_path, to_run=True)
    except ConfigError as e:
        for p in e.problems:
            logger.error("%s", p)
        return 1
    demo: list[asyncio.Server] = []
    if demo_backends:
        from .demo import start_demo_backends

        try:
            demo = await start_demo_backends(config)
        except CannotListen as e:
            print(f"lbproxy: {e}", file=sys.stderr)
            return 1
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
    loop.add_signal_handler(signal.SIGUSR1, app.reopen_logs)
    try:
        await app.start(watch=watch)
    except (CannotListen, ListenError) as e:
        # A port clash is the operator's to fix: one line, no traceback; what started is stopped.
        print(f"lbproxy: {_cannot_listen(e)}", file=sys.stderr)
        with contextlib.suppress(Exception):
            await app.stop()
        for s in demo:
            s.close()
        return 1
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


def _cannot_listen(e: CannotListen | ListenError) -> CannotListen:
    """A VS's ListenError said as the other start-up port clashes are."""
    if isinstance(e, CannotListen):
        return e
    what = f"vs {json.dumps(e.vs)}"
    if isinstance(e.__cause__, OSError):
        return CannotListen.from_os_error(e.address, what, e.__cause__)
    return CannotListen(e.address, what, str(e).rpartition(f"{e.address}: ")[2])


def run_forever(config: str | os.PathLike[str], *, demo_backends: bool = False,
                workers: int | None = None, watch: bool = False) -> int:
    """Run until SIGTERM/SIGINT; `workers` overrides the config's `workers`; `watch` applies
    the file whenever a change to it has settled (as the config's `watch_config = true`)."""
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency; stay usable without it
        return asyncio.run(_main(Path(config), demo_backends, workers, watch))
    return uvloop.run(_main(Path(config), demo_backends, workers, watch))
