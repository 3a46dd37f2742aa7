"""The running process: wires config, runtime, data plane, certificate store and admin API
together, reloads on SIGHUP or a file change, and shuts down gracefully on SIGTERM."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import os
import signal
from pathlib import Path
from typing import Any

from .accesslog import configure_access_log
from .config import load_file
from .config.model import AccessLogSettings, Config
from .errors import ConfigError, LBProxyError
from .runtime import RuntimeStore

logger = logging.getLogger(__name__)

# How often the config file is looked at for changes (stat only; content hashed on change).
WATCH_INTERVAL = 1.0


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
    """One lbproxy process. `start()` serves; `reload()` re-reads the file; `stop()` drains."""

    def __init__(self, config_path: Path, config: Config) -> None:
        self.config_path = config_path
        self.runtime = RuntimeStore(config)
        self._digest = _digest(config_path)
        self._fp = _fingerprint(config_path)
        self._watch_task: asyncio.Task[None] | None = None
        self._stopping = asyncio.Event()
        self._closers: list[Any] = []
        self.reloads_ok = 0
        self._access_log = config.access_log
        self.reloads_failed = 0
        from .proxy import DataPlane

        self.dataplane = DataPlane()

    @property
    def config(self) -> Config:
        return self.runtime.current.config

    async def start(self, *, watch: bool = True) -> None:
        state = Path(self.config.state_dir)
        if not state.is_absolute():
            state = self.config_path.parent / state
        state.mkdir(mode=0o700, parents=True, exist_ok=True)
        configure_access_log(self.config.access_log, self.config_path.parent)
        self.runtime.subscribe(self.dataplane.apply)
        await self.dataplane.apply(self.runtime.current)
        if watch:
            self._watch_task = asyncio.create_task(self._watch(), name="config-watch")
        logger.info("lbproxy started: %d virtual services, generation %d",
                    len(self.config.virtual_services), self.runtime.current.generation)

    async def reload(self) -> bool:
        """Re-read the config file; a bad file is logged and the running config keeps serving."""
        self._fp = _fingerprint(self.config_path)
        self._digest = _digest(self.config_path)
        try:
            cfg = load_file(self.config_path)
        except ConfigError as e:
            self.reloads_failed += 1
            logger.error("reload of %s rejected (%d problems); still serving generation %d",
                         self.config_path, len(e.problems), self.runtime.current.generation)
            for p in e.problems:
                logger.error("  %s", p)
            return False
        try:
            rt = await self.runtime.set_config(cfg)
        except LBProxyError as e:
            self.reloads_failed += 1
            logger.error("reload of %s failed: %s; still serving generation %d",
                         self.config_path, e, self.runtime.current.generation)
            return False
        self.reloads_ok += 1
        if cfg.access_log != self._access_log:
            configure_access_log(cfg.access_log, self.config_path.parent)
            self._access_log = cfg.access_log
        logger.info("reloaded %s: generation %d", self.config_path, rt.generation)
        return True

    async def _watch(self) -> None:
        while True:
            await asyncio.sleep(WATCH_INTERVAL)
            fp = _fingerprint(self.config_path)
            if fp is None or fp == self._fp:
                continue
            self._fp = fp
            digest = _digest(self.config_path)
            if digest is not None and digest != self._digest:
                logger.info("%s changed on disk; reloading", self.config_path)
                await self.reload()

    def request_stop(self) -> None:
        self._stopping.set()

    async def wait_stopped(self) -> None:
        await self._stopping.wait()

    async def stop(self) -> None:
        if self._watch_task is not None:
            self._watch_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._watch_task
        for close in reversed(self._closers):
            await close()
        await self.dataplane.shutdown(self.config.drain_timeout)
        configure_access_log(AccessLogSettings(enabled=False), self.config_path.parent)
        logger.info("lbproxy stopped")


async def _main(config_path: Path, demo_backends: bool) -> int:
    try:
        config = load_file(config_path)
    except ConfigError as e:
        for p in e.problems:
            logger.error("%s", p)
        return 1
    demo: list[asyncio.Server] = []
    if demo_backends:
        from .demo import start_demo_backends

        demo = await start_demo_backends(config)
    app = App(config_path, config)
    try:
        await app.start()
    except LBProxyError as e:
        logger.error("cannot start: %s", e)
        return 1
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, app.request_stop)
    loop.add_signal_handler(signal.SIGINT, app.request_stop)
    loop.add_signal_handler(signal.SIGHUP, lambda: asyncio.ensure_future(app.reload()))
    await app.wait_stopped()
    logger.info("stopping: draining for up to %.0f s", app.config.drain_timeout)
    await app.stop()
    for s in demo:
        s.close()
    return 0


def run_forever(config: str | os.PathLike[str], *, demo_backends: bool = False) -> int:
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency; stay usable without it
        return asyncio.run(_main(Path(config), demo_backends))
    return uvloop.run(_main(Path(config), demo_backends))
