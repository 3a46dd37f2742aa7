"""The running process: hot reload under load, bad files rejected, SIGHUP, SIGTERM drain."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import sys
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web

from lbproxy.app import App
from lbproxy.config import load_file


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


SLOW_ARRIVED: dict[str, asyncio.Event] = {}


async def start_upstream(name: str, delay: asyncio.Event | None = None) -> web.AppRunner:
    async def handler(request: web.Request) -> web.Response:
        if delay is not None and request.path.endswith("/slow"):
            SLOW_ARRIVED.setdefault(name, asyncio.Event()).set()
            await delay.wait()
        return web.Response(text=f"{name} {request.path}")

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", handler)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    return runner


async def serve(runner: web.AppRunner) -> int:
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    server = site._server
    assert isinstance(server, asyncio.Server)
    port: int = server.sockets[0].getsockname()[1]
    return port


def config_text(port: int, backend: int, *, extra_vs: str = "", prefix: str = "/api/") -> str:
    return f"""
state_dir = "state"
[admin]
enabled = false
[access_log]
enabled = false
[[rule]]
name = "api"
match = "prefix"
pattern = "{prefix}"
[[vs]]
name = "web"
listen = "127.0.0.1:{port}"
content_switching = true
  [[vs.subvs]]
  name = "api"
  rules = ["api"]
  health_check = {{ type = "none" }}
  real_servers = [ {{ address = "127.0.0.1:{backend}" }} ]
  [[vs.subvs]]
  name = "rest"
  rules = ["default"]
  not_available = {{ status = 200, body = "rest" }}
{extra_vs}
"""


@pytest.fixture
async def backends() -> AsyncIterator[tuple[int, int, asyncio.Event]]:
    release = asyncio.Event()
    a = await start_upstream("A", release)
    b = await start_upstream("B", release)
    pa, pb = await serve(a), await serve(b)
    yield pa, pb, release
    release.set()
    await a.cleanup()
    await b.cleanup()


async def load_loop(url: Callable[[int], str], count: int, results: list[str],
                    failures: list[str],
                    milestones: dict[int, asyncio.Event] | None = None) -> None:
    conn = aiohttp.TCPConnector(limit=8)
    async with aiohttp.ClientSession(connector=conn) as session:
        async def one(i: int) -> None:
            try:
                async with session.get(url(i), timeout=aiohttp.ClientTimeout(total=10)) as r:
                    body = await r.text()
                    if r.status != 200:
                        failures.append(f"{r.status} {body}")
                    else:
                        results.append(body)
            except (aiohttp.ClientError, TimeoutError) as e:
                failures.append(repr(e))
            done = len(results) + len(failures)
            if milestones and done in milestones:
                milestones[done].set()

        sem = asyncio.Semaphore(8)

        async def bounded(i: int) -> None:
            async with sem:
                await one(i)

        await asyncio.gather(*(bounded(i) for i in range(count)))


async def test_reload_under_load_drops_nothing(tmp_path: Path,
                                               backends: tuple[int, int, asyncio.Event]) -> None:
    pa, pb, _ = backends
    port = free_port()
    cfg_path = tmp_path / "lb.toml"
    cfg_path.write_text(config_text(port, pa))
    app = App(cfg_path, load_file(cfg_path))
    await app.start(watch=False)
    try:
        results: list[str] = []
        failures: list[str] = []
        milestones = {(n + 1) * 150: asyncio.Event() for n in range(6)}
        loop_task = asyncio.create_task(load_loop(
            lambda i: f"http://127.0.0.1:{port}/api/{i}", 1500, results, failures, milestones))
        # Flip the pool between the two backends several times while the loop runs.
        for n in range(6):
            await asyncio.wait_for(milestones[(n + 1) * 150].wait(), 30)
            cfg_path.write_text(config_text(port, pb if n % 2 == 0 else pa))
            assert await app.reload()
        await asyncio.wait_for(loop_task, 60)
        assert failures == []
        assert len(results) == 1500
        assert {r.split()[0] for r in results} == {"A", "B"}
        assert app.reloads_ok == 6
    finally:
        await app.stop()


async def test_bad_file_keeps_old_config_serving(tmp_path: Path,
                                                 backends: tuple[int, int, asyncio.Event],
                                                 caplog: pytest.LogCaptureFixture) -> None:
    pa, _, _ = backends
    port = free_port()
    cfg_path = tmp_path / "lb.toml"
    cfg_path.write_text(config_text(port, pa))
    app = App(cfg_path, load_file(cfg_path))
    await app.start(watch=False)
    try:
        gen = app.runtime.current.generation
        cfg_path.write_text(config_text(port, pa).replace('match = "prefix"', 'match = "fuzzy"')
                            .replace('name = "web"', 'name = "web"\nscheduler = "best"'))
        assert not await app.reload()
        assert "rule[0].match: unknown value 'fuzzy'" in caplog.text
        assert "vs[0].scheduler: unknown value 'best'" in caplog.text
        assert app.runtime.current.generation == gen
        async with aiohttp.ClientSession() as s, s.get(f"http://127.0.0.1:{port}/api/x") as r:
            assert r.status == 200
            assert await r.text() == "A /api/x"
    finally:
        await app.stop()


async def test_reload_opens_new_listener_and_closes_removed(
        tmp_path: Path, backends: tuple[int, int, asyncio.Event]) -> None:
    pa, _, _ = backends
    port, port2 = free_port(), free_port()
    extra = f"""
[[vs]]
name = "second"
listen = "127.0.0.1:{port2}"
not_available = {{ status = 200, body = "second" }}
"""
    cfg_path = tmp_path / "lb.toml"
    cfg_path.write_text(config_text(port, pa))
    app = App(cfg_path, load_file(cfg_path))
    await app.start(watch=False)
    try:
        cfg_path.write_text(config_text(port, pa, extra_vs=extra))
        assert await app.reload()
        async with aiohttp.ClientSession() as s:
            async with s.get(f"http://127.0.0.1:{port2}/") as r:
                assert (r.status, await r.text()) == (200, "second")
        cfg_path.write_text(config_text(port, pa))
        assert await app.reload()
        with pytest.raises(aiohttp.ClientConnectionError):
            async with aiohttp.ClientSession() as s, s.get(f"http://127.0.0.1:{port2}/"):
                pass
    finally:
        await app.stop()


async def test_bind_failure_on_reload_keeps_serving(
        tmp_path: Path, backends: tuple[int, int, asyncio.Event]) -> None:
    pa, _, _ = backends
    port = free_port()
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    busy = taken.getsockname()[1]
    extra = f'[[vs]]\nname = "second"\nlisten = "127.0.0.1:{busy}"\n'
    cfg_path = tmp_path / "lb.toml"
    cfg_path.write_text(config_text(port, pa))
    app = App(cfg_path, load_file(cfg_path))
    await app.start(watch=False)
    try:
        gen = app.runtime.current.generation
        cfg_path.write_text(config_text(port, pa, extra_vs=extra, prefix="/v2/"))
        assert not await app.reload()
        assert app.runtime.current.generation == gen
        assert app.runtime.current.config.rules[0].pattern == "/api/"
        async with aiohttp.ClientSession() as s, s.get(f"http://127.0.0.1:{port}/api/x") as r:
            assert await r.text() == "A /api/x"
    finally:
        taken.close()
        await app.stop()


async def _wait_port(port: int, deadline: float = 20.0) -> None:
    async with asyncio.timeout(deadline):
        while True:
            try:
                _, w = await asyncio.open_connection("127.0.0.1", port)
                w.close()
                return
            except OSError:
                await asyncio.sleep(0.05)


async def _wait_closed(port: int, deadline: float = 20.0) -> None:
    async with asyncio.timeout(deadline):
        while True:
            try:
                _, w = await asyncio.open_connection("127.0.0.1", port)
                w.close()
                await asyncio.sleep(0.02)
            except OSError:
                return


async def test_process_sighup_reloads_and_sigterm_drains(
        tmp_path: Path, backends: tuple[int, int, asyncio.Event]) -> None:
    pa, pb, release = backends
    port = free_port()
    cfg_path = tmp_path / "lb.toml"
    cfg_path.write_text(config_text(port, pa))
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "lbproxy", "run", "-c", str(cfg_path),
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE,
        env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        await _wait_port(port)
        async with aiohttp.ClientSession() as s:
            async with s.get(f"http://127.0.0.1:{port}/api/1") as r:
                assert await r.text() == "A /api/1"
            cfg_path.write_text(config_text(port, pb))
            proc.send_signal(signal.SIGHUP)
            async with asyncio.timeout(20):
                while True:
                    async with s.get(f"http://127.0.0.1:{port}/api/2") as r:
                        if (await r.text()).startswith("B"):
                            break
                    await asyncio.sleep(0.05)
            # An in-flight request survives SIGTERM: it completes, then the process exits 0.
            arrived = SLOW_ARRIVED.setdefault("B", asyncio.Event())
            arrived.clear()
            slow = asyncio.ensure_future(s.get(f"http://127.0.0.1:{port}/api/slow"))
            await asyncio.wait_for(arrived.wait(), 20)
            proc.send_signal(signal.SIGTERM)
            # New connections are refused once the listener has closed, while the slow one waits.
            await _wait_closed(port)
            release.set()
            r = await asyncio.wait_for(slow, 20)
            assert r.status == 200
            r.release()
        rc = await asyncio.wait_for(proc.wait(), 30)
        assert rc == 0
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


async def test_admin_metrics_and_status_are_wired(
        tmp_path: Path, backends: tuple[int, int, asyncio.Event]) -> None:
    pa, _, _ = backends
    port, admin_port = free_port(), free_port()
    text = config_text(port, pa).replace(
        "[admin]\nenabled = false", f'[admin]\nlisten = "127.0.0.1:{admin_port}"')
    cfg_path = tmp_path / "lb.toml"
    cfg_path.write_text(text)
    app = App(cfg_path, load_file(cfg_path))
    await app.start(watch=False)
    try:
        token = (tmp_path / "state" / "admin.token").read_text().strip()
        assert (tmp_path / "state" / "admin.token").stat().st_mode & 0o777 == 0o600
        base = f"http://127.0.0.1:{admin_port}"
        auth = {"Authorization": f"Bearer {token}"}
        async with aiohttp.ClientSession() as s:
            for _ in range(3):
                async with s.get(f"http://127.0.0.1:{port}/api/m") as r:
                    assert r.status == 200
            async with s.get(f"{base}/metrics") as r:
                assert r.status == 401
            async with s.get(f"{base}/metrics", headers=auth) as r:
                assert r.status == 200
                body = await r.text()
            async with s.get(f"{base}/api/status", headers=auth) as r:
                assert r.status == 200
                status = await r.json()
        samples = [line for line in body.splitlines()
                   if line.startswith("lbproxy_") and 'vs="web"' in line]
        assert samples, body[:2000]
        assert "web" in json.dumps(status)
    finally:
        await app.stop()
