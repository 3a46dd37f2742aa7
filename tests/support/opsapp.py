"""Counting real servers and a running App with its admin API, for the reload and real-server
control tests (tests/admin/test_reload_api.py, tests/proxy/test_server_control.py,
tests/workers/test_server_control_workers.py)."""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web

from lbproxy.app import App
from lbproxy.config import load_file
from tests.support.pebble import free_port

STEP = 10.0  # bound of any single wait on a loaded 2-core machine


@dataclass
class Backends:
    """Real servers on 127.0.0.1 named "b0", "b1", ...: `hits` counts the requests each took
    (`by_worker`: by (name, X-Lbproxy-Worker header) too); GET /slow waits for `release` (and
    sets `slow_arrived[name]` on arrival)."""

    ports: list[int] = field(default_factory=list)
    hits: Counter[str] = field(default_factory=Counter)
    by_worker: Counter[tuple[str, str]] = field(default_factory=Counter)
    release: asyncio.Event = field(default_factory=asyncio.Event)
    slow_arrived: dict[str, asyncio.Event] = field(default_factory=dict)
    runners: list[web.AppRunner] = field(default_factory=list)

    def address(self, i: int) -> str:
        return f"127.0.0.1:{self.ports[i]}"

    async def start(self, n: int) -> None:
        for i in range(n):
            name = f"b{i}"
            self.slow_arrived[name] = asyncio.Event()

            async def handler(request: web.Request, name: str = name) -> web.Response:
                self.hits[name] += 1
                self.by_worker[(name, request.headers.get("X-Lbproxy-Worker", "-"))] += 1
                if request.path == "/slow":
                    self.slow_arrived[name].set()
                    await self.release.wait()
                return web.Response(text=name)

            app = web.Application()
            app.router.add_route("*", "/{tail:.*}", handler)
            runner = web.AppRunner(app, access_log=None)
            await runner.setup()
            site = web.TCPSite(runner, "127.0.0.1", 0)
            await site.start()
            self.runners.append(runner)
            self.ports.append(int(runner.addresses[0][1]))

    async def slow_one(self) -> int:
        """The index of the real server a GET /slow arrived at (waits for the first)."""
        waits = {asyncio.create_task(e.wait()): i
                 for i, e in enumerate(self.slow_arrived.values())}
        try:
            async with asyncio.timeout(STEP):
                done, _ = await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for t in waits:
                t.cancel()
        return waits[next(iter(done))]

    async def stop(self) -> None:
        self.release.set()
        for r in self.runners:
            await r.cleanup()


@asynccontextmanager
async def backends(n: int) -> AsyncIterator[Backends]:
    b = Backends()
    try:
        await b.start(n)
        yield b
    finally:
        await b.stop()


def head(admin_port: int, *, workers: int = 1, extra: str = "") -> str:
    """The top of a config: state beside it, the admin API on `admin_port`, no access log."""
    return f"""
state_dir = "state"
workers = {workers}
drain_timeout = 5
{extra}
[admin]
enabled = true
listen = "127.0.0.1:{admin_port}"
[access_log]
enabled = false
"""


@dataclass
class Running:
    app: App
    path: Path
    admin_port: int
    session: aiohttp.ClientSession

    @property
    def token(self) -> str:
        return (self.app.state_dir / "admin.token").read_text().strip()

    @property
    def admin_url(self) -> str:
        return f"http://127.0.0.1:{self.admin_port}"

    async def api(self, method: str, path: str, body: Any = None) -> tuple[int, Any]:
        async with self.session.request(
                method, self.admin_url + path, json=body,
                headers={"Authorization": f"Bearer {self.token}"}) as r:
            return r.status, await r.json()

    def port(self, vs: str) -> int:
        return self.app.dataplane.listening_ports()[vs][1]

    async def get(self, vs: str, path: str = "/", *, fresh: bool = False) -> tuple[int, str]:
        """GET `path` from VS `vs` (`fresh`: on a new connection, closed after)."""
        headers = {"Connection": "close"} if fresh else {}
        async with self.session.get(f"http://127.0.0.1:{self.port(vs)}{path}",
                                    headers=headers) as r:
            return r.status, await r.text()


@asynccontextmanager
async def running(tmp_path: Path, text: str, *, admin_port: int, workers: int = 1,
                  watch: bool = False) -> AsyncIterator[Running]:
    """An App on config `text` (written to tmp_path/lbproxy.toml), started; stopped after."""
    path = tmp_path / "lbproxy.toml"
    path.write_text(text)
    app = App(path, load_file(path, to_run=True), workers=workers)
    await app.start(watch=watch)
    try:
        timeout = aiohttp.ClientTimeout(total=STEP)
        async with aiohttp.ClientSession(timeout=timeout) as session:
            yield Running(app, path, admin_port, session)
    finally:
        await app.stop()


__all__ = ["STEP", "Backends", "Running", "backends", "free_port", "head", "running"]
