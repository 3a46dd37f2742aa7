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


def app_on(cfg_path: Path, text: str) -> App:
    """An App (not started) on `text`, written to `cfg_path` first."""
    cfg_path.write_text(text)
    return App(cfg_path, load_file(cfg_path))


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
                    milestones: dict[int, asyncio.Event] | None = None,
                    until: asyncio.Event | None = None) -> None:
    """`count` requests, 8 at a time; with `until`, then more until it is set (at most
    10 * count more), so that requests are in flight through whatever the test is doing."""
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
        extra = count
        while until is not None and not until.is_set() and extra < 11 * count:
            await asyncio.gather(*(one(i) for i in range(extra, extra + 8)))
            extra += 8


async def test_reload_under_load_drops_nothing(tmp_path: Path,
                                               backends: tuple[int, int, asyncio.Event]) -> None:
    pa, pb, _ = backends
    port = free_port()
    cfg_path = tmp_path / "lb.toml"
    app = app_on(cfg_path, config_text(port, pa))
    await app.start(watch=False)
    try:
        results: list[str] = []
        failures: list[str] = []
        milestones = {(n + 1) * 150: asyncio.Event() for n in range(6)}
        reloaded = asyncio.Event()
        loop_task = asyncio.create_task(load_loop(
            lambda i: f"http://127.0.0.1:{port}/api/{i}", 1500, results, failures, milestones,
            until=reloaded))
        # Flip the pool between the two backends several times while the loop runs (it keeps
        # sending until the last reload is done, however long reloads take on a busy machine).
        for n in range(6):
            await asyncio.wait_for(milestones[(n + 1) * 150].wait(), 30)
            cfg_path.write_text(config_text(port, pb if n % 2 == 0 else pa))
            assert await app.reload()
        answered_before = len(results)
        reloaded.set()
        await asyncio.wait_for(loop_task, 60)
        assert failures == []
        assert len(results) >= 1500
        assert {r.split()[0] for r in results} == {"A", "B"}
        # The last flip went back to A: what was sent after it reached A.
        assert all(r.startswith("A") for r in results[answered_before + 8:])
        assert app.reloads_ok == 6
    finally:
        await app.stop()


async def test_bad_file_keeps_old_config_serving(tmp_path: Path,
                                                 backends: tuple[int, int, asyncio.Event],
                                                 caplog: pytest.LogCaptureFixture) -> None:
    pa, _, _ = backends
    port = free_port()
    cfg_path = tmp_path / "lb.toml"
    app = app_on(cfg_path, config_text(port, pa))
    await app.start(watch=False)
    try:
        gen = app.runtime.current.generation
        cfg_path.write_text(config_text(port, pa).replace('match = "prefix"', 'match = "fuzzy"')
                            .replace('name = "web"', 'name = "web"\nscheduler = "best"'))
        assert not await app.reload()
        assert "lb.toml:9: rule \"api\" (rule[0]).match: unknown value 'fuzzy'" in caplog.text
        assert "lb.toml:13: vs \"web\" (vs[0]).scheduler: unknown value 'best'" in caplog.text
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
    app = app_on(cfg_path, config_text(port, pa))
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
    app = app_on(cfg_path, config_text(port, pa))
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


@pytest.mark.parametrize("workers", ["1", "2"])
async def test_process_sighup_reloads_and_sigterm_drains(
        tmp_path: Path, backends: tuple[int, int, asyncio.Event], workers: str) -> None:
    """As a single process and as a control process with two workers (where SIGHUP and SIGTERM
    reach the control process, which tells its workers)."""
    pa, pb, release = backends
    port = free_port()
    cfg_path = tmp_path / "lb.toml"
    cfg_path.write_text(config_text(port, pa))
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "lbproxy", "run", "-c", str(cfg_path), "--workers", workers,
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
            arrived = SLOW_ARRIVED["B"] = asyncio.Event()  # of this test's event loop
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
    app = app_on(cfg_path, text)
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


async def test_failed_protocol_change_is_rolled_back(
        tmp_path: Path, backends: tuple[int, int, asyncio.Event]) -> None:
    """A reload turns "web" https while a new VS cannot bind (port taken): it is refused, "web"
    keeps serving http on its port (its open connection too), the data plane reports it as
    listening from its socket, and the next good reload applies."""
    pa, _, _ = backends
    port = free_port()
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    busy = taken.getsockname()[1]
    cfg_path = tmp_path / "lb.toml"
    app = app_on(cfg_path, config_text(port, pa))
    await app.start(watch=False)
    try:
        async with asyncio.timeout(20), aiohttp.ClientSession() as s:
            async with s.get(f"http://127.0.0.1:{port}/api/1") as r:
                assert await r.text() == "A /api/1"
            tls = config_text(port, pa, extra_vs=(
                f'[[vs]]\nname = "second"\nlisten = "127.0.0.1:{busy}"\n')).replace(
                'content_switching = true',
                'content_switching = true\nprotocol = "https"\ntls = { certificates = ["c"] }')
            cfg_path.write_text(tls)
            assert not await app.reload()
            assert app.runtime.current.generation == 1
            # The same pooled connection and a new one are both served, as plain http.
            async with s.get(f"http://127.0.0.1:{port}/api/2") as r:
                assert await r.text() == "A /api/2"
            _, w = await asyncio.open_connection("127.0.0.1", port)
            w.close()
            vss = app.dataplane.stats()["virtual_services"]
            assert set(vss) == {"web"} and vss["web"]["listening"] is True
            cfg_path.write_text(config_text(port, pa, prefix="/v2/"))
            assert await app.reload()
            async with s.get(f"http://127.0.0.1:{port}/v2/3") as r:
                assert await r.text() == "A /v2/3"
            assert app.dataplane.stats()["virtual_services"]["web"]["listening"] is True
    finally:
        taken.close()
        await app.stop()


async def test_a_reload_to_no_virtual_service_is_refused(
        tmp_path: Path, backends: tuple[int, int, asyncio.Event],
        caplog: pytest.LogCaptureFixture) -> None:
    """An empty file, and a file with allow_empty = true but no VS, are both refused at reload,
    with the file named; the running config keeps serving."""
    pa, _, _ = backends
    port = free_port()
    cfg_path = tmp_path / "lb.toml"
    app = app_on(cfg_path, config_text(port, pa))
    await app.start(watch=False)
    try:
        cfg_path.write_text("")
        assert not await app.reload()
        assert f"{cfg_path}: is empty; refused" in caplog.text
        cfg_path.write_text('allow_empty = true\nstate_dir = "state"\n[admin]\nenabled = false\n')
        assert not await app.reload()
        assert f"reload of {cfg_path} rejected: it defines no virtual service" in caplog.text
        assert (app.reloads_ok, app.reloads_failed) == (0, 2)
        assert app.runtime.current.generation == 1
        async with aiohttp.ClientSession() as s, s.get(f"http://127.0.0.1:{port}/api/x") as r:
            assert await r.text() == "A /api/x"
    finally:
        await app.stop()


async def test_start_without_virtual_service_needs_allow_empty(
        tmp_path: Path, caplog: pytest.LogCaptureFixture,
        capsys: pytest.CaptureFixture[str]) -> None:
    """`lbproxy run` and `lbproxy check` refuse a file with no VS, naming it; with
    allow_empty = true, check passes and the process starts with no listener."""
    from lbproxy.__main__ import main as cli_main
    from lbproxy.app import _main

    cfg_path = tmp_path / "lb.toml"
    base = 'state_dir = "state"\n[admin]\nenabled = false\n[access_log]\nenabled = false\n'
    for text, what in (("", "is empty"), (base, "defines no virtual service ([[vs]])")):
        cfg_path.write_text(text)
        assert await _main(cfg_path, demo_backends=False) == 1
        assert f"{cfg_path}: {what}; refused (set allow_empty = true" in caplog.text
        assert cli_main(["check", "-c", str(cfg_path)]) == 1
        assert f"{cfg_path}: {what}; refused" in capsys.readouterr().err
    cfg_path.write_text("allow_empty = true\n" + base)
    assert cli_main(["check", "-c", str(cfg_path)]) == 0
    assert "OK (0 virtual services" in capsys.readouterr().out
    app = App(cfg_path, load_file(cfg_path))
    await app.start(watch=False)
    try:
        assert app.dataplane.stats()["virtual_services"] == {}
    finally:
        await app.stop()


class Ticker:
    """Stands in for the watcher's sleep: `step()` lets exactly one poll run and returns once it
    (and the reload it started, if any) is done."""

    def __init__(self) -> None:
        self._go = asyncio.Semaphore(0)
        self._waiting = asyncio.Event()  # set while the watcher waits for its next tick

    async def __call__(self) -> None:
        self._waiting.set()
        await self._go.acquire()

    async def step(self) -> None:
        async with asyncio.timeout(10):
            await self._waiting.wait()
            self._waiting.clear()
            self._go.release()
            await self._waiting.wait()


async def test_watcher_applies_a_file_once_it_has_settled(
        tmp_path: Path, backends: tuple[int, int, asyncio.Event]) -> None:
    """An editor's truncate-then-write caught half-way: the watcher reloads only a content it
    saw twice in a row, so neither the empty nor the half-written file is ever loaded."""
    pa, pb, _ = backends
    port = free_port()
    cfg_path = tmp_path / "lb.toml"
    app = app_on(cfg_path, config_text(port, pa))
    ticker = Ticker()
    app.watch_tick = ticker
    await app.start(watch=True)
    try:
        new = config_text(port, pb)
        cfg_path.write_text("")  # truncated...
        await ticker.step()
        cfg_path.write_text(new[: len(new) // 2])  # ...half written...
        await ticker.step()
        cfg_path.write_text(new)  # ...done
        await ticker.step()
        assert (app.reloads_ok, app.reloads_failed) == (0, 0)
        assert app.runtime.current.generation == 1
        await ticker.step()  # the same content twice in a row: applied
        assert (app.reloads_ok, app.reloads_failed) == (1, 0)
        async with aiohttp.ClientSession() as s, s.get(f"http://127.0.0.1:{port}/api/x") as r:
            assert await r.text() == "B /api/x"
        # Unchanged since: nothing more happens.
        await ticker.step()
        await ticker.step()
        assert (app.reloads_ok, app.reloads_failed) == (1, 0)
    finally:
        await app.stop()


async def test_watcher_refuses_a_file_left_empty(
        tmp_path: Path, backends: tuple[int, int, asyncio.Event]) -> None:
    """A file that stays empty is tried once it has settled, refused, and not retried; the old
    config keeps serving and the next real save applies."""
    pa, pb, _ = backends
    port = free_port()
    cfg_path = tmp_path / "lb.toml"
    app = app_on(cfg_path, config_text(port, pa))
    await app.start(watch=False)
    try:
        cfg_path.write_text("")
        assert not await app.poll_config()
        assert not await app.poll_config()  # settled: tried, and refused
        assert (app.reloads_ok, app.reloads_failed) == (0, 1)
        assert not await app.poll_config()
        assert app.reloads_failed == 1
        async with aiohttp.ClientSession() as s:
            async with s.get(f"http://127.0.0.1:{port}/api/x") as r:
                assert await r.text() == "A /api/x"
            cfg_path.write_text(config_text(port, pb))
            assert not await app.poll_config()
            assert await app.poll_config()
            assert app.reloads_ok == 1
            async with s.get(f"http://127.0.0.1:{port}/api/y") as r:
                assert await r.text() == "B /api/y"
    finally:
        await app.stop()
