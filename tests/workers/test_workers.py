"""Worker processes, for real: a control process (this test's App) and two worker processes on
127.0.0.1 accepting with SO_REUSEPORT. Which worker served a request is read from the
X-Lbproxy-Worker header the workers add in debug mode (`worker_id_header`), echoed by the real
server; fresh connections come from fresh source ports, which the kernel hashes over the workers."""

from __future__ import annotations

import asyncio
import itertools
import os
import signal
import socket
import ssl
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import trustme
from aiohttp import web
from cryptography import x509

from lbproxy.app import App
from lbproxy.certs import CertStore
from lbproxy.config import load_file
from lbproxy.letsencrypt.challenge import build_injection
from tests.support.pebble import free_port

STEP = 10.0  # any single step on a loaded 2-core machine
TRIES = 60  # fresh connections tried to reach both workers (each misses one with p = 1/2)


async def _backend(arrived: asyncio.Event) -> tuple[web.AppRunner, int]:
    async def handler(request: web.Request) -> web.Response:
        if request.path == "/slow":
            arrived.set()
            await asyncio.sleep(float(request.query.get("s", "1")))
        return web.Response(text=f"worker={request.headers.get('X-Lbproxy-Worker', '?')}")
    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", handler)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    return runner, int(runner.addresses[0][1])


def _config(backend: int, web: int, secure: int, *, body: str = "one") -> str:
    return f"""
state_dir = "state"
workers = 2
worker_id_header = true
drain_timeout = 5
[admin]
enabled = false
[access_log]
path = "access.log"
[[vs]]
name = "web"
listen = "127.0.0.1:{web}"
  [[vs.subvs]]
  name = "app"
  rules = ["default"]
  health_check = {{ type = "none" }}
  real_servers = [ {{ address = "127.0.0.1:{backend}" }} ]
  not_available = {{ status = 200, body = "{body}" }}
[[vs]]
name = "secure"
listen = "127.0.0.1:{secure}"
protocol = "https"
tls = {{ certificates = ["site"], default_certificate = "site" }}
real_servers = [ {{ address = "127.0.0.1:{backend}" }} ]
health_check = {{ type = "none" }}
"""


@dataclass
class Cluster:
    app: App
    ca: trustme.CA
    root: Path
    slow_arrived: asyncio.Event
    backend: int
    stopped: bool = False

    async def stop(self) -> None:
        if not self.stopped:
            self.stopped = True
            await self.app.stop()

    def port(self, vs: str) -> int:
        return self.app.dataplane.listening_ports()[vs][1]

    def client_ctx(self) -> ssl.SSLContext:
        ctx = ssl.create_default_context()
        self.ca.configure_trust(ctx)
        return ctx


def _seed_certificate(root: Path, ca: trustme.CA) -> None:
    """Certificate "site" (site.test, from `ca`) in the state directory under `root`."""
    leaf = ca.issue_cert("site.test")
    store = CertStore(root / "state")
    store.import_pem("site", leaf.cert_chain_pems[0].bytes(), leaf.private_key_pem.bytes())


@pytest.fixture
async def cluster(tmp_path: Path) -> AsyncIterator[Cluster]:
    arrived = asyncio.Event()
    runner, backend = await _backend(arrived)
    ca = trustme.CA()
    _seed_certificate(tmp_path, ca)
    cfg = tmp_path / "lbproxy.toml"
    cfg.write_text(_config(backend, free_port(), free_port()))
    app = App(cfg, load_file(cfg, to_run=True), workers=2)
    await app.start(watch=False)
    cluster = Cluster(app, ca, tmp_path, arrived, backend)
    try:
        yield cluster
    finally:
        await cluster.stop()
        await runner.cleanup()


async def fetch(port: int, path: str = "/", *, host: str = "site.test",
                ctx: ssl.SSLContext | None = None, then: str | None = None) -> list[str]:
    """Bodies of GET `path` (and `then`, on the same connection) over a fresh connection."""
    reader, writer = await asyncio.wait_for(asyncio.open_connection(
        "127.0.0.1", port, ssl=ctx, server_hostname=host if ctx else None), STEP)
    bodies = []
    try:
        for p in (path, then) if then else (path,):
            writer.write(f"GET {p} HTTP/1.1\r\nHost: {host}\r\n\r\n".encode())
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), STEP)
            status = int(head.split(b" ", 2)[1])
            length = next(int(line.split(b":")[1]) for line in head.split(b"\r\n")
                          if line.lower().startswith(b"content-length:"))
            body = (await asyncio.wait_for(reader.readexactly(length), STEP)).decode()
            bodies.append(f"{status} {body}")
    finally:
        writer.close()
    return bodies


async def both_workers(port: int, **kw: object) -> dict[str, int]:
    """Fresh connections until each worker has served one: worker id -> requests it served."""
    seen: dict[str, int] = {}
    for _ in range(TRIES):
        (body,) = await fetch(port, **kw)  # type: ignore[arg-type]
        seen[body] = seen.get(body, 0) + 1
        if len(seen) == 2:
            break
    return seen


async def test_both_workers_accept_and_log(cluster: Cluster) -> None:
    app = cluster.app
    assert app.supervisor is not None
    pids = {w["pid"] for w in app.supervisor.workers()}
    assert len(pids) == 2 and os.getpid() not in pids
    seen = await both_workers(cluster.port("web"))
    assert set(seen) == {"200 worker=0", "200 worker=1"}
    await app.supervisor.refresh()
    total = app.dataplane.stats()["virtual_services"]["web"]["requests"]
    assert total == sum(seen.values())
    # Both workers write whole lines into the one access log (O_APPEND), flushed on stop.
    await cluster.stop()
    lines = (cluster.root / "access.log").read_text().splitlines()
    assert len(lines) == sum(seen.values())
    assert all(" web app 127.0.0.1:" in line and '"GET /" 200 ' in line for line in lines)


async def test_reload_reaches_both_workers_with_no_failed_request(cluster: Cluster) -> None:
    app = cluster.app
    assert app.supervisor is not None
    port = cluster.port("web")
    failures: list[str] = []
    served = 0
    stop = asyncio.Event()
    marks: list[tuple[int, asyncio.Event]] = []

    def reached(n: int) -> asyncio.Event:
        ev = asyncio.Event()
        marks.append((n, ev))
        return ev

    async def load() -> None:
        nonlocal served
        deadline = time.monotonic() + 30
        while not stop.is_set() and time.monotonic() < deadline and served < 3000:
            try:
                (body,) = await fetch(port, "/slow?s=0.05")
                if not body.startswith("200 worker="):
                    failures.append(body)
            except Exception as e:
                failures.append(repr(e))
            served += 1
            for n, ev in marks:
                if served >= n:
                    ev.set()

    warm = reached(50)
    tasks = [asyncio.create_task(load()) for _ in range(8)]
    try:
        await asyncio.wait_for(warm.wait(), 30)
        path = cluster.root / "lbproxy.toml"
        for body in ("two", "three", "four"):
            path.write_text(_config(cluster.backend, cluster.port("web"), cluster.port("secure"),
                                    body=body))
            await app.apply_file()
        await asyncio.wait_for(reached(served + 50).wait(), 30)
    finally:
        stop.set()
        await asyncio.gather(*tasks)
    assert failures == []
    gen = app.runtime.current.generation
    assert gen == 4
    assert [w["generation"] for w in app.supervisor.workers()] == [gen, gen]


async def test_challenge_answer_is_served_by_every_worker(cluster: Cluster) -> None:
    app = cluster.app
    token = "tok_" + "A" * 39
    inj = build_injection(app.runtime.current, "web", "site.test", token, token + ".thumb", ())
    await app.runtime.inject(inj)  # returns once every worker serves the new generation
    seen: set[str] = set()
    for _ in range(TRIES):
        answer, who = await fetch(cluster.port("web"), f"/.well-known/acme-challenge/{token}",
                                  then="/")
        assert answer == f"200 {token}.thumb"
        seen.add(who)
        if len(seen) == 2:
            break
    assert seen == {"200 worker=0", "200 worker=1"}


async def test_renewed_certificate_is_served_by_every_worker_within_a_second(
        cluster: Cluster) -> None:
    app = cluster.app
    port = cluster.port("secure")
    ctx = cluster.client_ctx()
    leaf = cluster.ca.issue_cert("site.test")
    chain = leaf.cert_chain_pems[0].bytes()
    await asyncio.to_thread(app.store.import_pem, "site", chain, leaf.private_key_pem.bytes(),
                            replace=True)
    swapped = time.monotonic()
    want = x509.load_pem_x509_certificate(chain).serial_number
    # The store has the new certificate; each worker hears of it through the channel, so a
    # handshake may still meet the old one, but only before that worker's first new one.
    first: dict[str, float] = {}  # worker -> seconds from the swap to its first new handshake
    for _ in range(TRIES):
        tls = await asyncio.to_thread(_tls_request, port, ctx, None)
        if tls.serial == want:
            first.setdefault(tls.worker, time.monotonic() - swapped)
        else:
            assert tls.worker not in first, (tls.worker, "served the old one again", first)
        if len(first) == 2:
            break
    assert set(first) == {"worker=0", "worker=1"}
    assert max(first.values()) < 1.0, first


@dataclass
class TLSRequest:
    worker: str  # "worker=N", from the real server's answer
    serial: int  # of the certificate the server presented
    reused: bool  # the session was resumed
    session: ssl.SSLSession | None  # to resume next time


def _tls_request(port: int, ctx: ssl.SSLContext, session: ssl.SSLSession | None) -> TLSRequest:
    """One request over a fresh TLS connection (offering `session` to resume)."""
    with socket.create_connection(("127.0.0.1", port), timeout=STEP) as raw, \
            ctx.wrap_socket(raw, server_hostname="site.test", session=session) as s:
        s.sendall(b"GET / HTTP/1.1\r\nHost: site.test\r\nConnection: close\r\n\r\n")
        data = b""
        while chunk := s.recv(65536):
            data += chunk
        der = s.getpeercert(binary_form=True)
        assert der is not None
        return TLSRequest(data.split(b"\r\n\r\n", 1)[1].decode(),
                          x509.load_der_x509_certificate(der).serial_number, s.session_reused,
                          s.session)


@pytest.mark.parametrize("version", [ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_3])
async def test_a_tls_session_from_one_worker_resumes_on_the_other(
        cluster: Cluster, version: ssl.TLSVersion) -> None:
    ctx = cluster.client_ctx()
    ctx.maximum_version = version
    port = cluster.port("secure")
    first = await asyncio.to_thread(_tls_request, port, ctx, None)
    session = first.session
    assert not first.reused and session is not None
    resumed: dict[str, bool] = {}
    for _ in range(TRIES):
        tls = await asyncio.to_thread(_tls_request, port, ctx, session)
        resumed[tls.worker] = resumed.get(tls.worker, True) and tls.reused
        if len(resumed) == 2:
            break
    assert set(resumed) == {"worker=0", "worker=1"}, first.worker
    assert resumed == {"worker=0": True, "worker=1": True}


async def test_a_killed_worker_is_restarted_and_traffic_continues(cluster: Cluster) -> None:
    app = cluster.app
    sup = app.supervisor
    assert sup is not None
    port = cluster.port("web")
    victim = sup.workers()[0]
    errors = ok = 0
    os.kill(victim["pid"], signal.SIGKILL)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            (body,) = await fetch(port)
            ok += 1 if body.startswith("200 worker=") else 0
        except (OSError, asyncio.IncompleteReadError, TimeoutError):
            errors += 1
        w = sup.workers()[0]
        if w["state"] == "running" and w["pid"] != victim["pid"] and ok >= 20:
            break
    w = sup.workers()[0]
    assert w["restarts"] == 1 and w["pid"] != victim["pid"] and w["state"] == "running"
    # Connections the kernel had queued on the dead worker's socket are reset; a few at most.
    assert errors <= 5, errors
    assert set(await both_workers(port)) == {"200 worker=0", "200 worker=1"}
    print(f"kill -9 of one worker: {errors} failed requests, {ok} served meanwhile")


async def test_stop_drains_requests_in_flight(cluster: Cluster) -> None:
    app = cluster.app
    assert app.supervisor is not None
    pids = [w["pid"] for w in app.supervisor.workers()]
    slow = asyncio.create_task(fetch(cluster.port("web"), "/slow?s=1"))
    await asyncio.wait_for(cluster.slow_arrived.wait(), STEP)
    await cluster.stop()
    assert (await slow)[0] in ("200 worker=0", "200 worker=1")
    for pid in pids:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)


async def test_health_is_probed_once_per_host_and_obeyed_by_every_worker(
        tmp_path: Path) -> None:
    """One prober per real server in the control process (its probes are never closer together
    than the interval, as two probers' would be), and every worker stops sending to a server it
    reported down, and starts again when it is back."""
    hits: list[float] = []
    healthy = True
    changed = asyncio.Event()

    async def handler(request: web.Request) -> web.Response:
        if request.path == "/health":
            hits.append(time.monotonic())
            if len(hits) >= 8:
                changed.set()
            return web.Response(status=200 if healthy else 503)
        return web.Response(text=f"worker={request.headers.get('X-Lbproxy-Worker', '?')}")
    app_ = web.Application()
    app_.router.add_route("*", "/{tail:.*}", handler)
    runner = web.AppRunner(app_, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    backend = int(runner.addresses[0][1])
    interval = 0.2
    cfg = tmp_path / "lbproxy.toml"
    cfg.write_text(f"""
state_dir = "state"
worker_id_header = true
[admin]
enabled = false
[access_log]
enabled = false
[[vs]]
name = "web"
listen = "127.0.0.1:{free_port()}"
real_servers = [ {{ address = "127.0.0.1:{backend}" }} ]
health_check = {{ type = "http", path = "/health", interval = {interval}, rise = 1, fall = 1 }}
not_available = {{ status = 200, body = "sorry" }}
""")
    app = App(cfg, load_file(cfg, to_run=True), workers=2)
    await app.start(watch=False)
    try:
        await asyncio.wait_for(changed.wait(), STEP)
        gaps = [b - a for a, b in itertools.pairwise(hits)]
        assert min(gaps) > interval * 0.5, gaps  # two probers would interleave
        port = app.dataplane.listening_ports()["web"][1]
        assert set(await both_workers(port)) == {"200 worker=0", "200 worker=1"}

        healthy = False
        seen: set[str] = set()
        deadline = time.monotonic() + STEP
        while seen != {"200 sorry"} and time.monotonic() < deadline:
            # Fresh connections reach both workers; once down everywhere, only "sorry".
            bodies = {(await fetch(port))[0] for _ in range(16)}
            seen = bodies
        assert seen == {"200 sorry"}
        states = app.supervisor.health() if app.supervisor else {}
        assert states[("web", "")][f"127.0.0.1:{backend}"][0] is False

        healthy = True
        deadline = time.monotonic() + STEP
        while "200 sorry" in seen and time.monotonic() < deadline:
            seen = {(await fetch(port))[0] for _ in range(16)}
        assert set(await both_workers(port)) == {"200 worker=0", "200 worker=1"}
    finally:
        await app.stop()
        await runner.cleanup()


async def test_status_and_metrics_add_up_the_workers_and_list_each(tmp_path: Path) -> None:
    import io
    import json

    import aiohttp

    from lbproxy.admin.cli import main as cli_main

    arrived = asyncio.Event()
    runner, backend = await _backend(arrived)
    admin_port = free_port()
    cfg = tmp_path / "lbproxy.toml"
    cfg.write_text(_config(backend, free_port(), free_port()).replace(
        "[admin]\nenabled = false", f'[admin]\nlisten = "127.0.0.1:{admin_port}"'))
    _seed_certificate(tmp_path, trustme.CA())
    app = App(cfg, load_file(cfg, to_run=True), workers=2)
    await app.start(watch=False)
    try:
        served = await both_workers(app.dataplane.listening_ports()["web"][1])
        token = (tmp_path / "state" / "admin.token").read_text().strip()
        auth = {"Authorization": f"Bearer {token}"}
        async with aiohttp.ClientSession() as s:
            async with s.get(f"http://127.0.0.1:{admin_port}/api/status", headers=auth) as r:
                status = await r.json()
            async with s.get(f"http://127.0.0.1:{admin_port}/metrics", headers=auth) as r:
                metrics = await r.text()
        assert status["dataplane"]["virtual_services"]["web"]["requests"] == sum(served.values())
        workers = status["workers"]
        assert [w["id"] for w in workers] == [0, 1]
        assert all(w["state"] == "running" and w["generation"] == 1 for w in workers)
        assert len({w["pid"] for w in workers}) == 2
        assert 'lbproxy_worker_up{worker="0"} 1.0' in metrics
        assert 'lbproxy_worker_restarts_total{worker="1"} 0.0' in metrics
        assert f'lbproxy_vs_requests_total{{vs="web"}} {float(sum(served.values()))}' in metrics
        out = io.StringIO()
        code = await asyncio.to_thread(
            cli_main, ["status", "--admin", f"http://127.0.0.1:{admin_port}", "--token-file",
                       str(tmp_path / "state" / "admin.token")], out=out)
        assert code == 0
        table = out.getvalue()[out.getvalue().index("WORKER"):].splitlines()
        assert [line.split()[:2] for line in table[1:3]] == [
            ["0", str(workers[0]["pid"])], ["1", str(workers[1]["pid"])]], json.dumps(workers)
    finally:
        await app.stop()
        await runner.cleanup()
