"""A cluster for real: three `lbproxy run` processes on 127.0.0.1, .2 and .3 sharing one Redis
(a real redis-server) and one account at a real Pebble, whose DNS (pebble-challtestsrv) points
each name at a different node, so validations land on nodes that did not place the order.

Pebble's own log counts the orders (`POST /order-plz`), not lbproxy's counters.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import socket
import ssl
import subprocess
import sys
import time
import urllib.request
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from cryptography import x509

from lbproxy.letsencrypt.sealing import new_key
from tests.e2e.le_node import add_a_record, start_upstream
from tests.support.pebble import PebbleInstance, free_port, pebble_or_skip, start_pebble
from tests.support.redis import RedisInstance, redis_or_skip, start_redis

STEP = 20.0         # any single step on a loaded 2-core machine
SERVE_WITHIN = 5.0  # the bar: every node serves a stored certificate within 5 s
LEASE = 4.0         # the lock lease of these nodes (seconds)
NAMES = ("a.test", "b.test", "c.test")
PREFIX = "lbproxy"


@dataclass
class NodeProc:
    index: int
    root: Path
    web: int
    secure: int
    admin: int
    proc: subprocess.Popen[bytes] | None = None
    token: str = ""

    @property
    def ip(self) -> str:
        return f"127.0.0.{self.index}"

    @property
    def name(self) -> str:
        return f"node{self.index}"

    def start(self) -> None:
        log = (self.root / "lbproxy.log").open("ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "lbproxy", "run", "-c", str(self.root / "lbproxy.toml")],
            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, cwd=self.root)
        log.close()

    def log(self) -> str:
        return (self.root / "lbproxy.log").read_text(errors="replace")[-3000:]

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(timeout=STEP)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=STEP)
            except subprocess.TimeoutExpired:
                self.kill()


def _config(n: NodeProc, pebble: PebbleInstance, redis: RedisInstance, key_file: Path,
            backend: int) -> str:
    return f"""
state_dir = "state"
workers = 1
drain_timeout = 1
[admin]
listen = "{n.ip}:{n.admin}"
[access_log]
enabled = false
[letsencrypt]
directory_url = "{pebble.directory_url}"
ca_bundle = "{pebble.ca_bundle}"
[cluster]
redis_url = "{redis.url}"
encryption_key_file = "{key_file}"
node_name = "{n.name}"
lock_lease = {LEASE}
poll_interval = 5
[[vs]]
name = "web"
listen = "{n.ip}:{n.web}"
  [[vs.subvs]]
  name = "app"
  rules = ["default"]
  health_check = {{ type = "none" }}
  real_servers = [ {{ address = "127.0.0.1:{backend}" }} ]
[[vs]]
name = "secure"
listen = "{n.ip}:{n.secure}"
protocol = "https"
tls = {{ certificates = ["multi"], default_certificate = "multi" }}
real_servers = [ {{ address = "127.0.0.1:{backend}" }} ]
health_check = {{ type = "none" }}
"""


def _orders(pebble: PebbleInstance) -> int:
    """Orders Pebble received, from its own log."""
    text = (pebble.workdir / "pebble.log").read_text(errors="replace")
    return sum(1 for line in text.splitlines() if "POST /order-plz" in line)


@dataclass
class Rig:
    nodes: list[NodeProc]
    pebble: PebbleInstance
    redis: RedisInstance
    session: aiohttp.ClientSession
    roots: list[str] = field(default_factory=list)

    async def api(self, n: NodeProc, method: str, path: str, body: Any = None,
                  within: float = STEP) -> tuple[int, Any]:
        async with self.session.request(
                method, f"http://{n.ip}:{n.admin}{path}", json=body,
                headers={"Authorization": f"Bearer {n.token}"},
                timeout=aiohttp.ClientTimeout(total=within)) as r:
            return r.status, await r.json(content_type=None)

    async def until(self, what: str, check: Any, within: float = STEP) -> None:
        """Poll another process's state (bounded): it has no event to await."""
        deadline = time.monotonic() + within
        while not await check():
            if time.monotonic() > deadline:
                raise AssertionError(f"not within {within} s: {what}")
            await asyncio.sleep(0.1)

    def serial(self, n: NodeProc, name: str = "a.test") -> int | None:
        """The serial of the certificate node `n` serves for `name` (None: no handshake)."""
        ctx = ssl.create_default_context()
        for pem in self.roots:
            ctx.load_verify_locations(cadata=pem)
        try:
            with socket.create_connection((n.ip, n.secure), timeout=5) as raw, \
                    ctx.wrap_socket(raw, server_hostname=name) as tls:
                der = tls.getpeercert(binary_form=True)
        except (OSError, ssl.SSLError):
            return None
        return x509.load_der_x509_certificate(der).serial_number if der else None


@contextlib.contextmanager
def _services(tmp: Path) -> Iterator[tuple[PebbleInstance, RedisInstance]]:
    http_port = free_port()
    with start_pebble(tmp / "pebble", http_port=http_port) as pebble, \
            start_redis(tmp / "redis") as redis:
        yield pebble, redis


@pytest.fixture
async def rig(tmp_path: Path) -> AsyncIterator[Rig]:
    pebble_or_skip()
    redis_or_skip()
    runner, backend = await start_upstream("hello")
    key_file = tmp_path / "cluster.key"
    key_file.write_text(new_key())
    with _services(tmp_path) as (pebble, redis):
        nodes = []
        for i in (1, 2, 3):
            n = NodeProc(i, tmp_path / f"node{i}", pebble.http_port, free_port(), free_port())
            n.root.mkdir()
            (n.root / "lbproxy.toml").write_text(_config(n, pebble, redis, key_file, backend))
            nodes.append(n)
        session = aiohttp.ClientSession()
        rig = Rig(nodes, pebble, redis, session)
        try:
            for n in nodes:
                n.start()
            for n in nodes:
                token_file = n.root / "state" / "admin.token"

                def token(token_file: Path = token_file) -> str:
                    return token_file.read_text().strip() if token_file.exists() else ""

                async def ready(n: NodeProc = n, token: Any = token) -> bool:
                    assert n.proc is not None and n.proc.poll() is None, n.log()
                    n.token = token()
                    if not n.token:
                        return False
                    with contextlib.suppress(aiohttp.ClientError, OSError):
                        status, view = await rig.api(n, "GET", "/api/cluster")
                        return status == 200 and bool(view["connected"])
                    return False
                await rig.until(f"{n.name} up and in the cluster", ready)
            yield rig
        finally:
            for n in nodes:
                n.stop()
            await session.close()
            await runner.cleanup()


def _clear_a(pebble: PebbleInstance, host: str) -> None:
    req = urllib.request.Request(pebble.challtestsrv_url + "/clear-a",
                                 data=json.dumps({"host": host + "."}).encode(), method="POST")
    urllib.request.urlopen(req, timeout=STEP).close()


def _point(pebble: PebbleInstance, shift: int, nodes: tuple[int, ...] = (1, 2, 3)
           ) -> dict[str, str]:
    """Each name at a different node of `nodes` (as far as they go); `shift` rotates which."""
    where = {name: f"127.0.0.{nodes[(i + shift) % len(nodes)]}"
             for i, name in enumerate(NAMES)}
    for name, ip in where.items():
        _clear_a(pebble, name)   # /add-a adds to what the name had
        add_a_record(pebble, name, ip)
    return where


async def test_three_nodes_one_account_one_order_kill_and_outage(rig: Rig) -> None:
    n1, n2, n3 = rig.nodes
    pebble = rig.pebble
    rig.roots = [pebble.root_pem()]

    # One account for the cluster: registered on node 1, every node has it.
    status, body = await rig.api(n1, "POST", "/api/le/account", {"email": "ops@a.test"})
    assert status == 201, body
    for n in (n2, n3):
        async def has_account(n: NodeProc = n) -> bool:
            _s, v = await rig.api(n, "GET", "/api/le/account")
            return bool(v["registered"])
        await rig.until(f"{n.name} sees the account", has_account)

    # 1. The same certificate asked of all three nodes at once: exactly one order at Pebble;
    # validations land on every node (each name points at a different one).
    where = _point(pebble, 0)
    assert len(set(where.values())) == 3
    before = _orders(pebble)
    request = {"id": "multi", "common_name": "a.test", "vs": "web",
               "sans": [{"name": "b.test", "vs": "web"}, {"name": "c.test", "vs": "web"}]}
    answers = await asyncio.gather(*(rig.api(n, "POST", "/api/le/certs", request, within=90)
                                     for n in rig.nodes))
    first_done = time.monotonic()
    assert all(s == 201 for s, _ in answers), answers
    assert _orders(pebble) - before == 1, "one order for the whole cluster"

    async def all_serve_one() -> bool:
        serials = {rig.serial(n) for n in rig.nodes}
        return len(serials) == 1 and None not in serials
    await rig.until("all three nodes serve the certificate", all_serve_one, SERVE_WITHIN)
    assert time.monotonic() - first_done <= SERVE_WITHIN + 1
    print(f"\n[cluster] request on 3 nodes: {_orders(pebble) - before} order, all serve "
          f"{time.monotonic() - first_done:.2f} s after the first answer")
    issued = rig.serial(n1)
    # Validations came to the nodes that did not place the order: they answered them.
    assert sum("cluster: answering node" in n.log() for n in rig.nodes) == 2

    # Keys in Redis are sealed: no private key in clear, in any value.
    raw = rig.redis.client()
    for key in raw.scan_iter(match="*", count=500):
        kind = raw.type(key)
        values = (raw.hvals(key) if kind == b"hash" else [raw.get(key)] if kind == b"string"
                  else [])
        for v in values:
            assert b"PRIVATE KEY" not in (v or b""), key
            assert b"BEGIN CERTIFICATE" not in (v or b""), key

    # 2. Renewal with the lock holder killed mid-order: another node completes it after the
    # lease, with one extra order at most. A node seen recently that has not confirmed the
    # answer (a heartbeat with no process) keeps node 1 waiting in mid-order: deterministic.
    _point(pebble, 1)  # the answers change between validations
    raw.set(f"{PREFIX}:node:ghost", json.dumps({"pid": 0, "seen": time.time()}), px=60_000)
    pubsub = raw.pubsub()
    pubsub.subscribe(f"{PREFIX}:events")
    before = _orders(pebble)
    renew1 = asyncio.create_task(rig.api(n1, "POST", "/api/le/certs/multi/renew", {},
                                         within=90))
    deadline = time.monotonic() + STEP
    while True:   # node 1 shared a challenge answer: it holds the lock, its order is placed
        msg = await asyncio.to_thread(pubsub.get_message, True, 1.0)
        if msg and msg["data"].startswith(b"node1 stored answers/"):
            break
        assert time.monotonic() < deadline, "node 1 never presented a challenge"
    locks = (await rig.api(n2, "GET", "/api/cluster"))[1]["locks"]
    assert [(lk["name"], lk["node"]) for lk in locks] == [("cert-multi", "node1")]
    renewals = [asyncio.create_task(rig.api(n, "POST", "/api/le/certs/multi/renew", {},
                                            within=120)) for n in (n2, n3)]
    n1.kill()
    killed = time.monotonic()
    _point(pebble, 0, (2, 3))   # the names no longer lead to the dead node
    raw.delete(f"{PREFIX}:node:ghost")
    with contextlib.suppress(aiohttp.ClientError, OSError, TimeoutError):
        await renew1
    done = await asyncio.gather(*renewals)
    assert all(s == 200 for s, _ in done), done
    assert time.monotonic() - killed >= LEASE - 0.5, "the lock was taken before its lease ran out"
    assert _orders(pebble) - before <= 2, "node 1's order and one more at most"
    print(f"[cluster] holder killed: renewed by another node {time.monotonic() - killed:.1f} s "
          f"later (lease {LEASE} s), {_orders(pebble) - before} orders incl. the dead one's")
    renewed = rig.serial(n2)
    assert renewed is not None and renewed != issued and rig.serial(n3) == renewed
    pubsub.close()

    # 3. Redis stopped for 30 s under load: no failed request, no order, catch-up afterwards.
    failures: list[str] = []
    served = 0
    stop_load = asyncio.Event()

    async def load(n: NodeProc) -> None:
        nonlocal served
        url = f"http://{n.ip}:{n.web}/"
        while not stop_load.is_set():
            try:
                async with rig.session.get(url, timeout=aiohttp.ClientTimeout(total=5)) as r:
                    if r.status != 200 or await r.text() != "hello":
                        failures.append(f"{n.name}: {r.status}")
                served += 1
            except (aiohttp.ClientError, TimeoutError) as exc:
                failures.append(f"{n.name}: {exc!r}")
            if rig.serial(n) != renewed:
                failures.append(f"{n.name}: TLS handshake")
    loaders = [asyncio.create_task(load(n)) for n in (n2, n3)]
    before = _orders(pebble)
    rig.redis.stop()
    stopped = time.monotonic()
    for n in (n2, n3):
        async def down(n: NodeProc = n) -> bool:
            return not (await rig.api(n, "GET", "/api/cluster"))[1]["connected"]
        await rig.until(f"{n.name} reports Redis unreachable", down)
    status, body = await rig.api(n2, "POST", "/api/le/certs/multi/renew", {}, within=60)
    assert status != 200 and body["code"] == 3 and "lock" in body["error"], body
    await asyncio.sleep(max(0.0, 30.0 - (time.monotonic() - stopped)))  # the outage itself
    rig.redis.start()
    for n in (n2, n3):
        async def up(n: NodeProc = n) -> bool:
            return bool((await rig.api(n, "GET", "/api/cluster"))[1]["connected"])
        await rig.until(f"{n.name} back in the cluster", up)
    stop_load.set()
    await asyncio.gather(*loaders)
    assert failures == [] and served > 50, (failures[:5], served)
    print(f"[cluster] Redis down {time.monotonic() - stopped:.0f} s: {served} requests + "
          f"handshakes, {len(failures)} failed, {_orders(pebble) - before} orders")
    assert _orders(pebble) == before, "no order while Redis was down"
    # Caught up: a renewal made now on node 3 reaches node 2.
    status, body = await rig.api(n3, "POST", "/api/le/certs/multi/renew", {}, within=90)
    assert status == 200, body
    latest = rig.serial(n3)
    assert latest not in (None, renewed)

    async def n2_follows() -> bool:
        return rig.serial(n2) == latest
    await rig.until("node 2 serves node 3's renewal", n2_follows, SERVE_WITHIN)
    messages = (n2.root / "state" / "system-messages.log").read_text()
    assert "is unreachable" in messages and "reachable again" in messages
