"""logrotate's convention, for real: `mv access.log access.log.1; kill -USR1 <pid>` on a running
`python -m lbproxy run`, with one process and with two workers (the control process forwards the
signal; each worker reopens its own file). Every line written before the signal is in the moved
file, every line after it in a new access.log, none lost, split or doubled (and an HTTPS line
names its TLS version). Waits are on the process's own log line saying the file was reopened,
bounded in time."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import ssl
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import trustme
from aiohttp import web

from lbproxy.certs import CertStore
from tests.support.pebble import free_port

STEP = 30.0  # one phase (start-up, a wait for the reopen) on a loaded 2-core machine
POLL = 0.05  # polling step for the process's log file, bounded by STEP
N = 30  # requests before and after the rotation


@pytest.fixture
async def backend() -> AsyncIterator[int]:
    async def handler(request: web.Request) -> web.Response:
        return web.Response(text="ok")
    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", handler)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    yield int(runner.addresses[0][1])
    await runner.cleanup()


def _config(backend: int, port: int, workers: int, secure: int) -> str:
    return f"""
state_dir = "state"
workers = {workers}
drain_timeout = 2
[admin]
enabled = false
[access_log]
path = "access.log"
format = "json"
[[vs]]
name = "web"
listen = "127.0.0.1:{port}"
real_servers = [ {{ address = "127.0.0.1:{backend}" }} ]
health_check = {{ type = "none" }}
[[vs]]
name = "secure"
listen = "127.0.0.1:{secure}"
protocol = "https"
tls = {{ certificates = ["site"], default_certificate = "site" }}
real_servers = [ {{ address = "127.0.0.1:{backend}" }} ]
health_check = {{ type = "none" }}
"""


async def _get_tls(port: int, ctx: ssl.SSLContext) -> int:
    reader, writer = await asyncio.wait_for(asyncio.open_connection(
        "127.0.0.1", port, ssl=ctx, server_hostname="site.test"), STEP)
    try:
        writer.write(b"GET /tls HTTP/1.1\r\nHost: site.test\r\nConnection: close\r\n\r\n")
        data = await asyncio.wait_for(reader.read(), STEP)
    finally:
        writer.close()
    return int(data.split(b" ", 2)[1])


def _text(path: Path) -> str:
    return path.read_text()


async def _wait_for(what: str, out: Path) -> None:
    """Until the process's output says `what` (every string of it), bounded by STEP."""
    deadline = time.monotonic() + STEP
    while not all(line in _text(out) for line in what.split("|")):
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what!r}; output:\n{_text(out)}")
        await asyncio.sleep(POLL)


async def _get(port: int, path: str) -> int:
    reader, writer = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port), STEP)
    try:
        writer.write(f"GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
        data = await asyncio.wait_for(reader.read(), STEP)
    finally:
        writer.close()
    return int(data.split(b" ", 2)[1])


async def _serving(port: int) -> bool:
    try:
        return await _get(port, "/ready") == 200
    except (OSError, asyncio.IncompleteReadError, TimeoutError, IndexError, ValueError):
        return False


def _uris(path: Path) -> list[str]:
    """The uri of every line of a json access log (each line must parse whole)."""
    return [json.loads(line)["uri"] for line in path.read_text().splitlines()]


@pytest.mark.parametrize("workers", [1, 2])
async def test_sigusr1_reopens_the_access_log(tmp_path: Path, backend: int, workers: int) -> None:
    port, secure = free_port(), free_port()
    ca = trustme.CA()
    leaf = ca.issue_cert("site.test")
    CertStore(tmp_path / "state").import_pem("site", leaf.cert_chain_pems[0].bytes(),
                                             leaf.private_key_pem.bytes())
    ctx = ssl.create_default_context()
    ca.configure_trust(ctx)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    (tmp_path / "lbproxy.toml").write_text(_config(backend, port, workers, secure))
    out = tmp_path / "lbproxy.out"
    with out.open("wb") as sink:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "lbproxy", "run", "-c", str(tmp_path / "lbproxy.toml"),
            "--log-level", "info",
            stdout=sink, stderr=asyncio.subprocess.STDOUT, stdin=asyncio.subprocess.DEVNULL,
            cwd=tmp_path)
    try:
        deadline = time.monotonic() + STEP
        while not await _serving(port):
            assert proc.returncode is None, out.read_text()
            assert time.monotonic() < deadline, out.read_text()
            await asyncio.sleep(POLL)
        for i in range(N):
            assert await _get(port, f"/before/{i}") == 200
        log = tmp_path / "access.log"
        log.rename(tmp_path / "access.log.1")
        os.kill(proc.pid, signal.SIGUSR1)
        if workers == 1:
            await _wait_for("access log reopened", out)
        else:
            await _wait_for("|".join(f"worker {w}: access log reopened" for w in range(workers)),
                            out)
        assert log.exists()  # opened afresh
        for i in range(N):
            assert await _get(port, f"/after/{i}") == 200
        assert await _get_tls(secure, ctx) == 200
    finally:
        if proc.returncode is None:
            proc.send_signal(signal.SIGTERM)
        try:
            await asyncio.wait_for(proc.wait(), STEP)
        except TimeoutError:
            proc.kill()
            await proc.wait()
    assert proc.returncode == 0, out.read_text()
    before = _uris(tmp_path / "access.log.1")
    lines = [json.loads(line) for line in log.read_text().splitlines()]
    after = [line["uri"] for line in lines if line["vs"] == "web"]
    ready = [u for u in before if u == "/ready"]
    assert sorted(u for u in before if u != "/ready") == sorted(f"/before/{i}" for i in range(N))
    assert len(ready) >= 1 and "/ready" not in after
    assert sorted(after) == sorted(f"/after/{i}" for i in range(N))
    assert all(line["tls_version"] is None for line in lines if line["vs"] == "web")
    (tls_line,) = (line for line in lines if line["vs"] == "secure")
    assert tls_line["tls_version"] == "TLSv1.3" and tls_line["uri"] == "/tls"


def test_reopen_keeps_the_old_file_when_the_path_cannot_be_opened(tmp_path: Path) -> None:
    from lbproxy.accesslog import BufferedFileHandler

    d = tmp_path / "logs"
    d.mkdir()
    handler = BufferedFileHandler(d / "access.log")
    try:
        handler.write_batch(b"one\n")
        (d / "access.log").rename(tmp_path / "moved.log")
        d.rmdir()  # the path's directory is gone: the new file cannot be made
        handler.reopen()
        handler.write_batch(b"two\n")
        handler.flush()
        assert (tmp_path / "moved.log").read_bytes() == b"one\ntwo\n"
    finally:
        handler.close()


def test_where_the_log_goes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from lbproxy.accesslog import access_log_path
    from lbproxy.config.model import AccessLogSettings

    monkeypatch.delenv("LOGS_DIRECTORY", raising=False)
    assert access_log_path(AccessLogSettings(), tmp_path) is None  # stderr
    assert access_log_path(AccessLogSettings(path="a.log"), tmp_path) == tmp_path / "a.log"
    assert access_log_path(AccessLogSettings(path="/x/a.log"), tmp_path) == Path("/x/a.log")
    # Under systemd's LogsDirectory= the default is a file there; "-" still means stderr.
    monkeypatch.setenv("LOGS_DIRECTORY", f"{tmp_path}/logs:{tmp_path}/other")
    assert access_log_path(AccessLogSettings(), tmp_path) == tmp_path / "logs" / "access.log"
    assert access_log_path(AccessLogSettings(path="-"), tmp_path) is None
    assert access_log_path(AccessLogSettings(path="a.log"), tmp_path) == tmp_path / "a.log"


async def test_a_worker_still_starting_gets_the_signal_once_it_runs(tmp_path: Path) -> None:
    """The forward itself: a running worker is signalled at once; one still starting (no
    handler yet: SIGUSR1 would kill it) is marked, and _spawn signals it once it runs."""
    from lbproxy.workers.supervisor import Supervisor

    sup = Supervisor(2, lookup=lambda name: None, base_dir=tmp_path)  # type: ignore[arg-type]
    running, starting = sup._workers
    # A stand-in for a running worker: exits 0 on SIGUSR1 (and 1 if it never comes).
    running.proc = await asyncio.create_subprocess_exec(
        sys.executable, "-c",
        "import signal, sys, time\n"
        "signal.signal(signal.SIGUSR1, lambda *a: sys.exit(0))\n"
        "print('ready', flush=True)\n"
        "time.sleep(30)\nsys.exit(1)\n",
        stdout=asyncio.subprocess.PIPE)
    assert running.proc.stdout is not None
    assert await asyncio.wait_for(running.proc.stdout.readline(), STEP) == b"ready\n"
    running.state = "running"
    assert starting.state == "starting" and starting.proc is None
    sup.reopen_logs()
    assert await asyncio.wait_for(running.proc.wait(), STEP) == 0
    assert running.reopen is False and starting.reopen is True
