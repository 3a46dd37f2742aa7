"""`lbproxy cluster`: new-key (mode 0600, never overwrites), migrate against a real Redis (counts
per kind, refusal without --force, a config without [cluster], an unreachable Redis, the
password never printed), status over the admin API (a canned view, a real cluster node, a node
not in a cluster), the CLUSTER section of `lbproxy status`, and the cluster metrics."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import io
import json
import os
import stat
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
import trustme
from aiohttp import web
from prometheus_client import generate_latest

from lbproxy import __main__ as lbproxy_main
from lbproxy.admin.cli import main, print_status
from lbproxy.admin.cluster_cli import print_cluster, print_cluster_brief
from lbproxy.admin.le_api import add_routes
from lbproxy.certs import CertStore
from lbproxy.config import load_file
from lbproxy.letsencrypt import LEManager
from lbproxy.letsencrypt.model import MANAGED_BY, Issued
from lbproxy.letsencrypt.sealing import Sealer
from lbproxy.metrics import MetricsCollector, make_registry, metrics_routes
from lbproxy.runtime import RuntimeStore
from tests.admin.conftest import Admin, running_admin
from tests.certs.helpers import issue
from tests.letsencrypt.test_le_manager import CONFIG as LE_CONFIG
from tests.support.pebble import free_port
from tests.support.redis import RedisInstance, redis_or_skip, start_redis

PASSWORD = "s3cret-pw"
WAIT = 10.0     # seconds any cluster state change may take to show
STEP = 0.05     # polling step where no event can be awaited (Redis heartbeats)

VIEW: dict[str, Any] = {
    "node": "web1", "redis": "redis://:***@10.0.0.5:6379/0", "connected": True,
    "since": "2026-03-01T10:00:00+00:00", "last_error": "", "outages": 1,
    "answering": ["tok1"],
    "nodes": [{"name": "web1", "pid": 1234, "seen_ago": 1.25},
              {"name": "web2-long-name", "pid": 5678, "seen_ago": 4.0}],
    "locks": [{"name": "cert-shop", "node": "web2-long-name", "pid": 5678,
               "since": 1772359200.0, "expires_in": 14.2}],
}
DOWN = {**VIEW, "connected": False, "last_error": "Connection refused", "nodes": [],
        "locks": [], "answering": []}


def run_cli(*argv: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    code = main(list(argv), out=out, err=err)
    return code, out.getvalue(), err.getvalue()


# -- new-key --------------------------------------------------------------------------------------

def test_new_key_is_0600_and_usable(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "cluster.key"
    old = os.umask(0o277)   # a umask that would leave the owner without write
    try:
        code = lbproxy_main.main(["cluster", "new-key", str(path)])
    finally:
        os.umask(old)
    assert code == 0, capsys.readouterr().err
    assert f"wrote a new encryption key to {path} (mode 0600)" in capsys.readouterr().out
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert len(base64.b64decode(path.read_text().strip(), validate=True)) == 32
    sealer = Sealer.from_file(path)
    assert sealer.open("k", sealer.seal("k", b"v")) == b"v"
    other = tmp_path / "other.key"
    assert lbproxy_main.main(["cluster", "new-key", str(other)]) == 0
    assert other.read_text() != path.read_text()   # a fresh key each time


def test_new_key_never_overwrites(tmp_path: Path) -> None:
    path = tmp_path / "cluster.key"
    path.write_text("the key every node has\n")
    code, out, err = run_cli("cluster", "new-key", str(path))
    assert (code, out) == (1, "")
    assert f"lbproxy cluster new-key: {path} exists; refusing to overwrite" in err
    assert path.read_text() == "the key every node has\n"
    link = tmp_path / "dangling.key"
    link.symlink_to(tmp_path / "nowhere")   # not followed: O_EXCL refuses a link too
    assert run_cli("cluster", "new-key", str(link))[0] == 1
    assert not (tmp_path / "nowhere").exists()
    code, out, _ = run_cli("cluster", "new-key", str(tmp_path / "no-dir" / "k"), "--json")
    assert code == 1 and "cannot create" in json.loads(out)["error"]
    assert run_cli("cluster", "new-key")[0] == 2


# -- migrate --------------------------------------------------------------------------------------

@pytest.fixture
def server(tmp_path: Path) -> Iterator[RedisInstance]:
    redis_or_skip()
    with start_redis(tmp_path / "redis", password=PASSWORD) as r:
        yield r


def write_config(root: Path, redis_url: str, *, state: str = "state", node: str = "n1",
                 extra: str = "") -> Path:
    root.mkdir(parents=True, exist_ok=True)
    key = root.parent / "cluster.key"
    if not key.exists():
        assert run_cli("cluster", "new-key", str(key))[0] == 0
    cfg = root / "lbproxy.toml"
    cfg.write_text(f'state_dir = "{state}"\n{extra}\n[cluster]\nredis_url = "{redis_url}"\n'
                   f'encryption_key_file = "{key}"\nkey_prefix = "cli"\nnode_name = "{node}"\n')
    return cfg


def fill_host(state: Path) -> dict[str, bytes]:
    """A single host's Let's Encrypt state: two files of its own, two entries, one issued
    certificate, one Let's Encrypt certificate served but never shared, one imported."""
    ca = trustme.CA()
    store = CertStore(state)
    shop, blog = issue(ca, "shop.example.com"), issue(ca, "blog.example.com")
    store.import_pem("shop", *shop, managed_by=MANAGED_BY)
    store.import_pem("blog", *blog, managed_by=MANAGED_BY)
    store.import_pem("own", *issue(ca, "own.example.com"))
    files = {"settings.json": b'{"directory_url": "https://acme.test/dir"}\n',
             "account.json": b'{"url": "https://acme.test/acct/7"}\n',
             "account.key": b"-----BEGIN PRIVATE KEY-----\nk\n-----END PRIVATE KEY-----\n",
             "certs/shop.json": b'{"id": "shop"}\n', "certs/blog.json": b'{"id": "blog"}\n',
             "issued/shop.json": Issued(*shop).to_bytes()}
    for key, data in {**files, "challenges.json": b"[]", "locks/cert-shop.lock": b""}.items():
        path = state / "letsencrypt" / key
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    served = store.material("blog")   # the key as the store keeps it (PKCS#8)
    assert served is not None
    return {**files, "issued/blog.json": Issued(served.chain_pem, served.key_pem).to_bytes()}


def tree(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes()
            for p in sorted(root.rglob("*")) if p.is_file()}


def test_migrate_to_redis_and_back(tmp_path: Path, server: RedisInstance) -> None:
    one = write_config(tmp_path / "one", server.url)
    expected = fill_host(tmp_path / "one" / "state")
    code, out, err = run_cli("cluster", "migrate", "-c", str(one), "--to-redis")
    assert code == 0, err
    lines = out.splitlines()
    assert lines[0] == (f"copied 7 key(s) from {tmp_path}/one/state/letsencrypt to "
                        f"redis://:***@127.0.0.1:{server.port}/0 (key prefix cli):")
    assert [ln.split() for ln in lines[1:7]] == [
        ["settings", "1"], ["account", "2"], ["certificates", "2"], ["issued", "1"],
        ["issued", "from", "the", "certificate", "store", "1"], ["other", "0"]]
    assert lines[7] == "left behind (they belong to this node): challenges.json, locks"
    assert PASSWORD not in out + err

    # Again: every key is there already.
    code, out, err = run_cli("cluster", "migrate", "-c", str(one), "--to-redis")
    assert (code, out) == (1, "")
    assert "already holds 7 of the 7 keys to copy" in err and "--force" in err
    code, out, err = run_cli("cluster", "migrate", "-c", str(one), "--to-redis", "--force",
                             "--json")
    assert code == 0, err
    data = json.loads(out)
    assert data["total"] == 7 and data["copied"]["issued from the certificate store"] == 1

    # A second host (its own state directory) takes the cluster's state back into files.
    two = write_config(tmp_path / "two", server.url, node="n2")
    code, out, err = run_cli("cluster", "migrate", "-c", str(two), "--to-dir")
    assert code == 0, err
    assert out.startswith(f"copied 7 key(s) from redis://:***@127.0.0.1:{server.port}/0 "
                          f"(key prefix cli) to {tmp_path}/two/state/letsencrypt:")
    assert tree(tmp_path / "two" / "state" / "letsencrypt") == expected
    code, _, err = run_cli("cluster", "migrate", "-c", str(two), "--to-dir")
    assert code == 1 and "already holds 7 of the 7 keys" in err


def test_migrate_with_the_password_in_a_file(tmp_path: Path, server: RedisInstance) -> None:
    (tmp_path / "redis.pass").write_text(PASSWORD + "\n")
    cfg = write_config(tmp_path / "one", server.bare_url)
    cfg.write_text(cfg.read_text() + f'password_file = "{tmp_path / "redis.pass"}"\n')
    fill_host(tmp_path / "one" / "state")
    code, out, err = run_cli("cluster", "migrate", "-c", str(cfg), "--to-redis")
    assert code == 0, err
    assert out.startswith("copied 7 key(s)")


def test_migrate_refusals(tmp_path: Path) -> None:
    plain = tmp_path / "plain.toml"
    plain.write_text('state_dir = "state"\n')
    code, out, err = run_cli("cluster", "migrate", "-c", str(plain), "--to-redis")
    assert (code, out) == (1, "")
    assert f"{plain} has no [cluster] table" in err

    port = free_port()   # nothing listens there
    cfg = write_config(tmp_path / "one", f"redis://127.0.0.1:{port}/0")
    code, _, err = run_cli("cluster", "migrate", "-c", str(cfg), "--to-redis")
    assert code == 1 and f"{tmp_path}/one/state/letsencrypt does not exist" in err
    fill_host(tmp_path / "one" / "state")
    started = time.monotonic()
    code, _, err = run_cli("cluster", "migrate", "-c", str(cfg), "--to-redis")
    assert code == 1 and f"cannot reach Redis redis://127.0.0.1:{port}/0" in err
    assert time.monotonic() - started < WAIT

    key = tmp_path / "cluster.key"
    key.write_text("not base64!\n")
    code, _, err = run_cli("cluster", "migrate", "-c", str(cfg), "--to-dir")
    assert code == 1 and f"encryption key file {key}: not base64" in err
    key.unlink()
    code, out, _ = run_cli("cluster", "migrate", "-c", str(cfg), "--to-dir", "--json")
    assert code == 1 and f"encryption key file {key}: cannot read it" in json.loads(out)["error"]

    assert run_cli("cluster", "migrate", "-c", str(cfg))[0] == 2   # which way?
    assert run_cli("cluster", "migrate", "-c", str(cfg), "--to-dir", "--to-redis")[0] == 2
    code, _, err = run_cli("cluster", "migrate", "-c", str(tmp_path / "missing.toml"),
                           "--to-dir")
    assert code == 1 and "missing.toml" in err and "cannot read" in err


# -- status ---------------------------------------------------------------------------------------

def test_cluster_status_text() -> None:
    out = io.StringIO()
    print_cluster(VIEW, out)
    lines = out.getvalue().splitlines()
    assert lines[:6] == [
        "node        web1",
        "redis       redis://:***@10.0.0.5:6379/0",
        "connected   yes, since 2026-03-01T10:00:00+00:00",
        "last error  -",
        "outages     1",
        "answering   1 challenge(s) of other nodes"]
    assert lines[7:10] == [
        "NODE            PID   SEEN AGO",
        "web1            1234  1.2 s",
        "web2-long-name  5678  4.0 s"]
    assert lines[11:] == [
        "LOCK       NODE            PID   EXPIRES IN",
        "cert-shop  web2-long-name  5678  14.2 s"]

    out = io.StringIO()
    print_cluster({**VIEW, "nodes": [], "locks": []}, out)
    assert out.getvalue().splitlines()[7:] == ["no node seen recently", "", "no lock held"]

    out = io.StringIO()
    print_cluster(DOWN, out)
    lines = out.getvalue().splitlines()
    assert lines[2] == "connected   NO, since 2026-03-01T10:00:00+00:00"
    assert lines[3] == "last error  Connection refused"
    assert lines[-1].startswith("nodes and locks: not known while Redis is unreachable")


def test_status_has_a_cluster_section() -> None:
    from tests.metrics.test_status_print import STATUS

    out = io.StringIO()
    print_status({**STATUS, "cluster": VIEW}, out)
    text = out.getvalue()
    assert text.endswith(
        "\nCLUSTER  node web1, Redis redis://:***@10.0.0.5:6379/0\n"
        "  connected since 2026-03-01T10:00:00+00:00\n"
        "  nodes seen: web1, web2-long-name; locks held: cert-shop (web2-long-name)\n")
    out = io.StringIO()
    print_cluster_brief(DOWN, out)
    assert out.getvalue().splitlines()[1] == (
        "  UNREACHABLE since 2026-03-01T10:00:00+00:00 (last error: Connection refused)")
    out = io.StringIO()
    print_status(STATUS, out)
    assert "CLUSTER" not in out.getvalue()
    out = io.StringIO()
    print_cluster_brief({"error": "Internal Server Error"}, out)
    assert out.getvalue() == "CLUSTER  cannot read the cluster state: Internal Server Error\n"


class FakeManager:
    """What /api/cluster asks of the manager."""

    def __init__(self, view: dict[str, Any] | None) -> None:
        self.view = view

    async def cluster_view(self) -> dict[str, Any] | None:
        return self.view


@contextlib.asynccontextmanager
async def admin_with(tmp_path: Path, manager: Any) -> AsyncIterator[Admin]:
    def routes(app: web.Application) -> None:
        add_routes(app, manager)
    async with running_admin(tmp_path, extra_routes=[routes]) as a:
        yield a


async def cli(admin: Admin, *argv: str) -> tuple[int, str, str]:
    """The CLI is synchronous (urllib): off the loop that serves the API."""
    flags = ["--admin", admin.url, "--token-file", str(admin.token_file)]
    return await asyncio.to_thread(run_cli, *argv, *flags)


async def test_status_commands_over_the_api(tmp_path: Path) -> None:
    async with admin_with(tmp_path, FakeManager(VIEW)) as admin:
        code, out, err = await cli(admin, "cluster", "status")
        assert code == 0, err
        assert out.startswith("node        web1\n") and "cert-shop  web2-long-name" in out
        code, out, _ = await cli(admin, "cluster", "status", "--json")
        assert code == 0 and json.loads(out) == VIEW
        code, out, _ = await cli(admin, "status")
        assert code == 0 and "\nCLUSTER  node web1, Redis redis://:***@10.0.0.5" in out
        code, out, _ = await cli(admin, "status", "--json")
        assert json.loads(out)["cluster"] == VIEW


async def test_a_node_not_in_a_cluster(tmp_path: Path) -> None:
    async with admin_with(tmp_path, FakeManager(None)) as admin:
        code, out, err = await cli(admin, "cluster", "status")
        assert (code, out) == (4, "")
        assert err == "lbproxy: this node is not in a cluster (no [cluster] in its config) (404)\n"
        code, out, err = await cli(admin, "status")
        assert code == 0 and "config generation" in out and "CLUSTER" not in out
        code, out, _ = await cli(admin, "status", "--json")
        assert "cluster" not in json.loads(out)


# -- a real node: status and metrics, Redis up and down --------------------------------------------

def scrape(collector: MetricsCollector) -> dict[str, float]:
    text = generate_latest(make_registry(collector)).decode()
    return {ln.split()[0]: float(ln.split()[1]) for ln in text.splitlines()
            if ln.startswith("lbproxy_cluster")}


async def until(check: Any, what: str) -> None:
    """Poll `check()` (an async predicate) for up to WAIT seconds: heartbeats and reconnects
    have no event to await from outside the node."""
    deadline = time.monotonic() + WAIT
    while not await check():
        assert time.monotonic() < deadline, f"not within {WAIT} s: {what}"
        await asyncio.sleep(STEP)


async def test_a_real_node(tmp_path: Path, server: RedisInstance) -> None:
    cfg = load_file(write_config(tmp_path / "node", server.url, node="n1"))
    assert cfg.cluster is not None
    state = tmp_path / "node" / "state"
    manager = LEManager(state, RuntimeStore(LE_CONFIG), CertStore(state), cluster=cfg.cluster,
                        hostname="n1")
    collector = MetricsCollector(lambda: {}, cluster=manager.cluster_view)
    await collector.refresh_cluster()
    await manager.start()
    try:
        async def seen() -> bool:
            view = await manager.cluster_view()
            return bool(view and view["connected"] and view["nodes"])
        await until(seen, "the node sees itself")
        async with admin_with(tmp_path, manager) as admin:
            code, out, err = await cli(admin, "cluster", "status")
            assert code == 0, err
            lines = out.splitlines()
            assert lines[0] == "node        n1"
            assert lines[1] == f"redis       redis://:***@127.0.0.1:{server.port}/0"
            assert lines[2].startswith("connected   yes, since ")
            assert lines[7].split() == ["NODE", "PID", "SEEN", "AGO"]
            assert lines[8].split()[:2] == ["n1", str(os.getpid())]
            assert lines[-1] == "no lock held"
            await collector.refresh_cluster()
            assert scrape(collector) == {"lbproxy_cluster_connected": 1.0,
                                         "lbproxy_cluster_nodes": 1.0}

            server.stop()
            async def down() -> bool:
                return not (await manager.cluster_view() or {}).get("connected")
            await until(down, "the node notices Redis is gone")
            code, out, _ = await cli(admin, "cluster", "status")
            assert code == 0 and "connected   NO, since" in out
            assert "nodes and locks: not known while Redis is unreachable" in out
            await collector.refresh_cluster()
            assert scrape(collector) == {"lbproxy_cluster_connected": 0.0}
    finally:
        await manager.stop()


# -- metrics --------------------------------------------------------------------------------------

def source(view: dict[str, Any] | None) -> Any:
    async def read() -> dict[str, Any] | None:
        return view
    return read


async def test_cluster_metrics() -> None:
    c = MetricsCollector(lambda: {}, cluster=source(VIEW))
    assert scrape(c) == {}   # nothing read yet
    await c.refresh_cluster()
    assert scrape(c) == {"lbproxy_cluster_connected": 1.0, "lbproxy_cluster_nodes": 2.0}
    c.cluster = source(DOWN)
    await c.refresh_cluster()
    assert scrape(c) == {"lbproxy_cluster_connected": 0.0}
    # Connected, but the nodes could not be read: their count is not known.
    c.cluster = source({**VIEW, "last_error": "Timeout reading from socket", "nodes": []})
    await c.refresh_cluster()
    assert scrape(c) == {"lbproxy_cluster_connected": 1.0}
    c = MetricsCollector(lambda: {}, cluster=source(None))   # not in a cluster
    await c.refresh_cluster()
    assert scrape(c) == {}
    c = MetricsCollector(lambda: {})
    await c.refresh_cluster()
    assert scrape(c) == {}


async def test_a_view_too_slow_to_read_counts_as_not_connected() -> None:
    never = asyncio.Event()

    async def hangs() -> dict[str, Any] | None:
        await never.wait()
        return VIEW
    c = MetricsCollector(lambda: {}, cluster=hangs, cluster_wait=0.05)
    started = time.monotonic()
    await c.refresh_cluster()
    assert time.monotonic() - started < WAIT
    assert scrape(c) == {"lbproxy_cluster_connected": 0.0}


async def test_the_metrics_route_reads_the_view(tmp_path: Path) -> None:
    c = MetricsCollector(lambda: {}, cluster=source(VIEW))
    async with running_admin(tmp_path, extra_routes=[metrics_routes(c)]) as admin:
        status, _, text = await admin.raw("GET", "/metrics")
    assert status == 200
    assert "\nlbproxy_cluster_connected 1.0\n" in text
    assert "\nlbproxy_cluster_nodes 2.0\n" in text
