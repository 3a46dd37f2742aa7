"""tls-alpn-01 in a cluster: two lbproxy nodes (two managers, each with its runtime, TLS contexts
and data plane) on one real redis-server. Node A orders against a real Pebble whose DNS
(challtestsrv) points the name at node B's address, so Pebble's tls-alpn-01 handshake reaches
B's HTTPS listener only: the order succeeds only if B serves the validation certificate, made
by B itself from the key authorization A shared (no private key goes through Redis). While it
runs, an `acme-tls/1` client of B gets it and every other client the normal certificate; B has
none after. Then the bound: an answer whose node died (never withdrawn) is taken away at its
expiry, or at MIRROR_MAX whatever its `expires` says, and one withdrawn goes at once.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes

from acmeclient.challenges import ACME_IDENTIFIER_OID, ACME_TLS_ALPN, HTTP01, TLS_ALPN01
from lbproxy.config.model import ClusterSettings
from lbproxy.letsencrypt import cluster as cluster_mod
from lbproxy.letsencrypt.cluster import Answer
from lbproxy.letsencrypt.redisstore import RedisStorage, connect
from lbproxy.letsencrypt.sealing import Sealer, new_key
from lbproxy.letsencrypt.storage import ANSWERS, answer_key
from lbproxy.runtime import Runtime
from tests.e2e.le_node import STEP, Node, add_a_record, cli
from tests.support.lbconfig import config_head, https_vs
from tests.support.pebble import (
    PebbleInstance,
    free_port,
    tls_alpn_pebble,
)
from tests.support.redis import RedisInstance, redis_or_skip, start_redis
from tests.support.tlsclient import bootstrap_certificate, handshake

NAME = "alpn.cluster.test"
A_IP, B_IP = "127.0.0.1", "127.0.0.2"   # one port (Pebble's tlsPort), two addresses
PREFIX = "lbproxy"


pebble = pytest.fixture(scope="module")(tls_alpn_pebble)   # the HTTPS VS on its tls_port


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisInstance]:
    redis_or_skip()
    with start_redis(tmp_path / "redis") as r:
        yield r


boot = pytest.fixture(scope="module")(bootstrap_certificate)


@pytest.fixture
def key_file(tmp_path: Path) -> Path:
    path = tmp_path / "cluster.key"
    path.write_text(new_key())
    return path


def node_config(ip: str, port: int, node: str, redis: RedisInstance, key_file: Path,
                pebble: PebbleInstance | None = None, more: str = "", poll: int = 5) -> str:
    return config_head(pebble=pebble) + f"""[cluster]
redis_url = "{redis.url}"
encryption_key_file = "{key_file}"
node_name = "{node}"
lock_lease = 4
poll_interval = {poll}
""" + https_vs("secure", f"{ip}:{port}", ["alpn", "boot"]) + more


def acme_identifier(cert: x509.Certificate) -> bytes | None:
    """The critical acmeIdentifier extension's value (DER), or None: not a validation cert."""
    try:
        ext = cert.extensions.get_extension_for_oid(ACME_IDENTIFIER_OID)
    except x509.ExtensionNotFound:
        return None
    assert ext.critical
    return bytes(getattr(ext.value, "value", b""))


def fingerprint(cert: x509.Certificate) -> bytes:
    return cert.fingerprint(hashes.SHA256())


@pytest.fixture
async def ghost(redis_server: RedisInstance, key_file: Path) -> AsyncIterator[RedisStorage]:
    """A third node ("ghost") on the same Redis, with the cluster's key: reads what the nodes
    share, and stores what an orderer that dies mid-order leaves behind."""
    settings = ClusterSettings(redis_server.url, str(key_file), node_name="ghost",
                               lock_lease=4.0)
    storage = RedisStorage(connect(settings), Sealer.from_file(key_file), prefix=PREFIX,
                           node="ghost", lease=4.0)
    yield storage
    await storage.close()


class Until:
    """A RuntimeStore listener: `wait(pred)` returns the first generation (current or later)
    for which `pred` holds, within a bound."""

    def __init__(self, node: Node) -> None:
        self.node = node
        self.changed = asyncio.Condition()
        node.runtime.subscribe(self)

    async def __call__(self, rt: Runtime) -> None:
        async with self.changed:
            self.changed.notify_all()

    async def wait(self, pred: Callable[[Runtime], bool], within: float = STEP) -> Runtime:
        async with asyncio.timeout(within), self.changed:
            await self.changed.wait_for(lambda: pred(self.node.runtime.current))
        return self.node.runtime.current


@pytest.fixture
async def nodes(tmp_path: Path, pebble: PebbleInstance, redis_server: RedisInstance,
                key_file: Path, boot: tuple[bytes, bytes]) -> AsyncIterator[tuple[Node, Node]]:
    port = pebble.tls_port
    a = Node(tmp_path / "a", node_config(A_IP, port, "nodeA", redis_server, key_file, pebble),
             bootstrap=boot)
    b = Node(tmp_path / "b", node_config(B_IP, port, "nodeB", redis_server, key_file, pebble),
             bootstrap=boot)
    await a.start()
    try:
        await b.start()
        try:
            for n in (a, b):
                assert n.manager.cluster is not None and n.manager.cluster.loaded.is_set()
            yield a, b
        finally:
            await b.stop()
    finally:
        await a.stop()


async def test_the_other_node_answers_the_tls_alpn01_validation(
        nodes: tuple[Node, Node], pebble: PebbleInstance, ghost: RedisStorage,
        caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="lbproxy.letsencrypt.cluster")
    a, b = nodes
    port = pebble.tls_port
    add_a_record(pebble, NAME, B_IP)   # Pebble's handshake goes to node B only
    assert a.manager.cluster is not None and b.manager.cluster is not None
    # B is seen by A (B's heartbeat, sent now rather than awaited): A waits for B's
    # confirmation before telling the CA.
    await b.manager.cluster.storage.heartbeat(b.manager.cluster._beat())
    assert "nodeB" in {n["name"] for n in await a.manager.cluster.storage.nodes()}
    seen: list[dict[str, Any]] = []

    async def on_b(rt: Runtime) -> None:
        """At B's generation with the mirrored validation (after its TLS contexts took it,
        before B confirms to A, so before the CA is told): what B serves to whom."""
        if not rt.validations:
            return
        v = rt.validations[-1]
        acme, acme_proto = await handshake(port, v.host, [ACME_TLS_ALPN], host=B_IP)
        normal = [await handshake(port, v.host, alpn, host=B_IP)
                  for alpn in (["h2", "http/1.1"], ["http/1.1"], None)]
        other, _ = await handshake(port, "other.cluster.test", [ACME_TLS_ALPN], host=B_IP)
        ours = [w for w in a.runtime.current.validations if w.host == v.host]
        keys = await ghost.list(ANSWERS)
        shared = [json.loads(await ghost.load(k)) for k in keys]
        seen.append({
            "vs": v.vs, "host": v.host, "token": v.token,
            "acme": (fingerprint(acme) == fingerprint(x509.load_pem_x509_certificate(
                v.cert_pem)), acme_proto, acme_identifier(acme)),
            "normal": [(acme_identifier(c), p, c.serial_number) for c, p in normal],
            "other": acme_identifier(other),
            "a_cert": [x509.load_pem_x509_certificate(w.cert_pem) for w in ours],
            "b_cert": acme, "shared": shared})

    b.runtime.subscribe(on_b)
    loop = asyncio.get_running_loop()
    b_certs = asyncio.Event()

    def certs_changed() -> None:   # from whichever thread changed B's store
        loop.call_soon_threadsafe(b_certs.set)
    b.store.watch(certs_changed)
    boot_serial = b.store.require("boot").serial
    code, out = await cli(a, "le", "register", "--email", "ops@cluster.test")
    assert code == 0, out
    code, out = await cli(a, "le", "request", "--id", "alpn", "--cn", NAME, "--vs", "secure",
                          "--challenge", "tls-alpn-01")
    assert code == 0, out   # Pebble validated through B: B served it
    assert "Challenge:     tls-alpn-01" in out

    assert len(seen) == 1, seen
    s = seen[0]
    assert (s["vs"], s["host"]) == ("secure", NAME)
    served_right, proto, digest = s["acme"]
    assert served_right and proto == ACME_TLS_ALPN and digest is not None and len(digest) == 34
    # every other client of the name: the normal certificate; another name: never
    assert s["normal"] == [(None, "h2", boot_serial), (None, "http/1.1", boot_serial),
                           (None, None, boot_serial)]
    assert s["other"] is None
    # B made its own validation certificate: the same acmeIdentifier as A's, another key
    (a_cert,) = s["a_cert"]
    assert acme_identifier(a_cert) == digest
    assert a_cert.public_key() != s["b_cert"].public_key()
    # what went through Redis: the key authorization (sealed), no certificate, no key
    (shared,) = s["shared"]
    assert shared["challenge"] == TLS_ALPN01 and shared["node"] == "nodeA"
    assert shared["token"] == s["token"] and shared["key_authorization"].startswith(
        s["token"] + ".")
    assert set(shared) == {"cert", "vs", "host", "token", "key_authorization", "node",
                           "expires", "challenge"}
    assert "PRIVATE KEY" not in json.dumps(shared) and "CERTIFICATE" not in json.dumps(shared)

    # after: withdrawn everywhere, nothing left in Redis; the issued certificate on B too
    assert a.runtime.current.validations == ()
    await Until(b).wait(lambda rt: rt.validations == ())
    assert await ghost.list(ANSWERS) == []
    assert b.manager.cluster._mirrored == {}
    issued = a.store.require("alpn").serial
    async with asyncio.timeout(STEP):   # the issued certificate, picked up from Redis
        while (b.store.get("alpn") is None) or b.store.require("alpn").serial != issued:
            await b_certs.wait()
            b_certs.clear()
    for alpn in ([ACME_TLS_ALPN], ["h2", "http/1.1"], None):
        cert, _ = await handshake(port, NAME, alpn, host=B_IP)
        assert cert.serial_number == issued and acme_identifier(cert) is None
    assert f"cluster: answering nodeA's tls-alpn-01 challenge for {NAME} in secure" in \
        caplog.text
    assert "did not confirm" not in caplog.text and "this node only" not in caplog.text


# -- the bound: answers of an orderer that died -----------------------------------------------

MORE_VS = """
[[vs]]
name = "other"
listen = "127.0.0.2:{other}"
protocol = "https"
tls = {{ certificates = ["boot"], default_certificate = "boot" }}
  [[vs.subvs]]
  name = "rest"
  rules = ["default"]

[[vs]]
name = "web"
listen = "127.0.0.2:{web}"
  [[vs.subvs]]
  name = "rest"
  rules = ["default"]
"""


@pytest.fixture
async def lone_b(tmp_path: Path, redis_server: RedisInstance, key_file: Path,
                 boot: tuple[bytes, bytes]) -> AsyncIterator[Node]:
    """Node B alone with the ghost: three VSs, none named as the ghost's ("gone"), so the
    placement falls back: tls-alpn-01 to the HTTPS VS listing the certificate ("secure", not
    "other"), http-01 to every eligible HTTP VS ("web"). It reads the shared state whole only
    hourly: what goes at an expiry here goes by the bound's timer, not by a poll."""
    more = MORE_VS.format(other=free_port(), web=free_port())
    b = Node(tmp_path / "b", node_config(B_IP, free_port(), "nodeB", redis_server, key_file,
                                         more=more, poll=3600), bootstrap=boot)
    await b.start()
    try:
        assert b.manager.cluster is not None and b.manager.cluster.loaded.is_set()
        yield b
    finally:
        await b.stop()


def ghost_answer(token: str, expires_in: float, challenge: str = TLS_ALPN01) -> Answer:
    return Answer("alpn", "gone", NAME, token, f"{token}.thumbprint", "ghost",
                  time.time() + expires_in, challenge)


async def deleted_by_b(ghost: RedisStorage, events: Any, keys: set[str]) -> None:
    """Read the change channel until node B announced the deletion of every key in `keys`."""
    left = set(keys)
    async with asyncio.timeout(STEP):
        while left:
            event = await ghost.next_event(events, STEP)
            if event is not None and event[:2] == ("nodeB", "deleted"):
                left.discard(event[2])


def listen_port(node: Node, vs_name: str) -> int:
    vs = node.config.vs_by_name(vs_name)
    assert vs is not None
    return vs.listen.port


def answered(rt: Runtime) -> tuple[set[tuple[str, str]], set[str]]:
    return ({(v.vs, v.token) for v in rt.validations}, {i.vs for i in rt.injections})


async def test_an_answer_never_withdrawn_goes_at_its_expiry(
        lone_b: Node, ghost: RedisStorage) -> None:
    b = lone_b
    port = listen_port(b, "secure")
    until = Until(b)
    async with ghost.subscription() as events:
        # tls-alpn-01 and http-01 answers of an orderer that then dies (never withdraws them)
        stored = time.monotonic()
        await ghost.store(answer_key("tokA"), ghost_answer("tokA", 3.0).to_bytes())
        await ghost.store(answer_key("tokH"), ghost_answer("tokH", 3.0, HTTP01).to_bytes())
        rt = await until.wait(lambda rt: bool(rt.validations) and bool(rt.injections))
        assert answered(rt) == ({("secure", "tokA")}, {"web"})
        cert, proto = await handshake(port, NAME, [ACME_TLS_ALPN], host=B_IP)
        assert acme_identifier(cert) is not None and proto == ACME_TLS_ALPN
        cert, _ = await handshake(port, NAME, ["h2", "http/1.1"], host=B_IP)
        assert acme_identifier(cert) is None
        # nothing on the VS that neither has the ghost's VS name nor the certificate
        cert, _ = await handshake(listen_port(b, "other"), NAME, [ACME_TLS_ALPN], host=B_IP)
        assert acme_identifier(cert) is None

        rt = await until.wait(lambda rt: answered(rt) == (set(), set()), within=3.0 + STEP)
        assert 3.0 - 0.5 <= time.monotonic() - stored <= 3.0 + 2.0, "not at its expiry"
        cert, _ = await handshake(port, NAME, [ACME_TLS_ALPN], host=B_IP)
        assert acme_identifier(cert) is None
        # B removed them from Redis as well (announced: the other nodes drop them too)
        await deleted_by_b(ghost, events, {answer_key("tokA"), answer_key("tokH")})
        assert await ghost.list(ANSWERS) == []

        # withdrawn by its node: gone at once, long before its expiry
        await ghost.store(answer_key("tokW"), ghost_answer("tokW", 300.0).to_bytes())
        await until.wait(lambda rt: answered(rt)[0] == {("secure", "tokW")})
        withdrawn = time.monotonic()
        await ghost.delete(answer_key("tokW"))
        await until.wait(lambda rt: rt.validations == ())
        assert time.monotonic() - withdrawn < STEP
        assert b.manager.cluster is not None and b.manager.cluster._mirrored == {}


async def test_an_answer_claiming_a_far_expiry_goes_at_the_bound(
        lone_b: Node, ghost: RedisStorage, monkeypatch: pytest.MonkeyPatch) -> None:
    """Another host's clock (or a damaged value) says a day: kept MIRROR_MAX at most (330 s in
    production, 2 s here)."""
    monkeypatch.setattr(cluster_mod, "MIRROR_MAX", 2.0)
    b = lone_b
    until = Until(b)
    async with ghost.subscription() as events:
        stored = time.monotonic()
        await ghost.store(answer_key("tokD"), ghost_answer("tokD", 86400.0).to_bytes())
        await until.wait(lambda rt: answered(rt)[0] == {("secure", "tokD")})
        await until.wait(lambda rt: rt.validations == (), within=2.0 + STEP)
        assert 2.0 - 0.5 <= time.monotonic() - stored <= 2.0 + 2.0
        await deleted_by_b(ghost, events, {answer_key("tokD")})
        assert await ghost.list(ANSWERS) == []
    # it comes back (its node stores it again): taken away at once, never served again
    assert b.manager.cluster is not None
    await ghost.store(answer_key("tokD"), ghost_answer("tokD", 86400.0).to_bytes())
    await b.manager.cluster.catch_up()   # (the change channel may not have told B yet)
    assert b.runtime.current.validations == ()
    assert await ghost.list(ANSWERS) == []


async def test_an_answer_expires_while_redis_is_down(
        lone_b: Node, ghost: RedisStorage, redis_server: RedisInstance) -> None:
    """The bound needs no Redis: a node cut off from it drops a dead orderer's answer at its
    expiry all the same, and removes it from Redis once Redis is back."""
    b = lone_b
    until = Until(b)
    stored = time.monotonic()
    await ghost.store(answer_key("tokR"), ghost_answer("tokR", 3.0).to_bytes())
    await until.wait(lambda rt: answered(rt)[0] == {("secure", "tokR")})
    redis_server.stop()   # saved: the answer is still there when it comes back
    await until.wait(lambda rt: rt.validations == (), within=3.0 + STEP)
    assert time.monotonic() - stored <= 3.0 + 2.0
    redis_server.start()
    async with ghost.subscription() as events:
        if await ghost.exists(answer_key("tokR")):
            await deleted_by_b(ghost, events, {answer_key("tokR")})
    assert await ghost.list(ANSWERS) == []
    assert b.runtime.current.validations == ()
