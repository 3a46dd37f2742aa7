"""RedisStorage (lbproxy.letsencrypt.redisstore) against a real redis-server: the Storage seam
with FileStorage's semantics, values sealed at rest, key prefixes kept apart, leased locks across
nodes and processes (a kill -9'd holder included), heartbeats and the change channel, failures
as OSError naming the key within a bounded time, reconnection, and passwords."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import signal
import sys
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from lbproxy.config import parse_config
from lbproxy.config.model import ClusterSettings
from lbproxy.letsencrypt import FileStorage
from lbproxy.letsencrypt.redisstore import NODE_TTL, SOCKET_TIMEOUT, RedisStorage, connect
from lbproxy.letsencrypt.sealing import Sealer, SealError, new_key
from tests.support.redis import RedisInstance, redis_or_skip, start_redis

ROOT = Path(__file__).resolve().parents[2]
SEALER = Sealer(bytes(range(32)))
POLL = 0.05        # a lock waiter looks this often in these tests
DOWN_BOUND = 10.0  # seconds a failed operation may take with Redis unreachable


@pytest.fixture
def server(tmp_path: Path) -> Iterator[RedisInstance]:
    redis_or_skip()
    with start_redis(tmp_path / "redis") as r:
        yield r


def storage(r: RedisInstance, node: str, *, prefix: str = "t", sealer: Sealer = SEALER,
            lease: float = 5.0) -> RedisStorage:
    return RedisStorage(connect(ClusterSettings(r.url, "unused")), sealer, prefix=prefix,
                        node=node, lease=lease, poll=POLL)


@pytest.fixture
async def two(server: RedisInstance) -> AsyncIterator[tuple[RedisStorage, RedisStorage]]:
    """Two nodes, each with its own client, on one Redis and prefix."""
    a, b = storage(server, "a"), storage(server, "b")
    yield a, b
    await a.close()
    await b.close()


KEYS = {
    "settings.json": b'{"directory_url": "https://acme.test/dir"}',
    "account.key": b"not really a key",
    "certs/a.json": b'{"id": "a"}',
    "certs/b.json": b'{"id": "b"}',
    "certs/deep/x.json": b"x",
    "certs2/y.json": b"y",      # "certs" is a prefix of its name, not its directory
    "certsa": b"z",
}


async def test_store_load_exists_stat(two: tuple[RedisStorage, RedisStorage]) -> None:
    a, b = two
    before = time.time()
    for k, v in KEYS.items():
        await a.store(k, v)
    for k, v in KEYS.items():
        assert await b.load(k) == v  # another node reads what one stored
    assert await b.exists("certs/a.json") and await b.exists("certs")
    assert await b.exists("certs/deep")
    assert not await b.exists("cert") and not await b.exists("certs/c.json")
    info = await b.stat("certs/a.json")
    assert info.key == "certs/a.json" and info.terminal and info.size == len(KEYS["certs/a.json"])
    assert before - 1 <= info.modified.timestamp() <= time.time() + 1
    directory = await b.stat("certs")
    assert not directory.terminal and directory.key == "certs"
    await b.store("certs/a.json", b"a longer value than before")
    assert await a.load("certs/a.json") == b"a longer value than before"
    assert (await a.stat("certs/a.json")).size == len(b"a longer value than before")
    with pytest.raises(FileNotFoundError) as e:
        await a.stat("certs/none.json")
    assert "certs/none.json" in str(e.value.filename)


async def test_load_of_an_absent_key(two: tuple[RedisStorage, RedisStorage]) -> None:
    a, _ = two
    with pytest.raises(FileNotFoundError) as e:
        await a.load("certs/none.json")
    assert e.value.errno == errno.ENOENT
    assert "certs/none.json" in str(e.value.filename)
    assert a.describe("certs/none.json") == e.value.filename


async def test_list_and_delete_as_the_state_directory(two: tuple[RedisStorage, RedisStorage],
                                                      tmp_path: Path) -> None:
    a, b = two
    fs = FileStorage(tmp_path / "state")
    for k, v in KEYS.items():
        await a.store(k, v)
        await fs.store(k, v)
    for prefix in ("", "certs", "certs/deep", "certs2", "issued"):
        assert await b.list(prefix) == await fs.list(prefix), prefix
    assert await b.list("certs") == ["certs/a.json", "certs/b.json", "certs/deep"]
    assert await b.list("certs/") == await b.list("certs")
    assert await b.list("") == ["account.key", "certs", "certs2", "certsa", "settings.json"]

    for store in (b, fs):
        await store.delete("certs")            # a prefix: everything below it goes
        await store.delete("settings.json")
        await store.delete("issued/none.json")  # absent: not an error
    for prefix in ("", "certs", "certs2"):
        assert await b.list(prefix) == await fs.list(prefix), prefix
    assert await b.list("") == ["account.key", "certs2", "certsa"]
    assert await b.list("certs") == []
    for k in ("certs/a.json", "certs/deep/x.json", "settings.json"):
        assert not await a.exists(k)
        with pytest.raises(FileNotFoundError):
            await a.load(k)
    assert await a.load("certs2/y.json") == b"y" and await a.load("certsa") == b"z"


def _all_bytes(r: RedisInstance) -> dict[bytes, bytes]:
    """Every key of the database (SCAN) with everything it holds, whatever its type."""
    c: Any = r.client()  # bytes in, bytes out (no decode_responses)
    out: dict[bytes, bytes] = {}
    for k in c.scan_iter(count=100):
        kind = c.type(k)
        if kind == b"hash":
            held = b"\0".join(f + b"=" + v for f, v in c.hgetall(k).items())
        elif kind == b"zset":
            held = b"\0".join(c.zrange(k, 0, -1))
        elif kind == b"string":
            held = c.get(k) or b""
        else:
            held = repr(kind).encode()
        out[k] = held
    c.close()
    return out


async def test_values_are_sealed_in_redis(server: RedisInstance,
                                          two: tuple[RedisStorage, RedisStorage]) -> None:
    a, _ = two
    pem = ec.generate_private_key(ec.SECP256R1()).private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption())
    body = [line for line in pem.splitlines() if line and not line.startswith(b"-----")]
    await a.store("account.key", pem)
    await a.store("issued/site.json", b'{"key": "' + pem.replace(b"\n", b"\\n") + b'"}')
    await a.store("settings.json", b'{"email": "plaintext-marker@example.test"}')
    assert await a.load("account.key") == pem
    held = _all_bytes(server)
    assert b"t:v:account.key" in held and b"t:v:issued/site.json" in held
    for key, value in held.items():
        everything = key + b"\0" + value
        assert b"-----BEGIN" not in everything, key
        assert b"PRIVATE KEY" not in everything, key
        assert b"plaintext-marker" not in everything, key
        for line in body:
            assert line[8:40] not in everything, key


async def test_a_value_copied_to_another_key_does_not_open(
        server: RedisInstance, two: tuple[RedisStorage, RedisStorage]) -> None:
    a, b = two
    await a.store("certs/a.json", b"the value of a")
    c: Any = server.client()
    raw = c.hgetall("t:v:certs/a.json")
    assert set(raw) == {b"d", b"m", b"s"}
    c.hset("t:v:certs/b.json", mapping=raw)  # a value moved by someone with Redis access
    c.zadd("t:keys", {"certs/b.json": 0})
    c.hset("u:v:certs/a.json", mapping=raw)  # the same key under another prefix
    c.close()
    with pytest.raises(SealError) as e:
        await b.load("certs/b.json")
    assert isinstance(e.value, ValueError)
    assert "t:v:certs/b.json" in str(e.value)
    other_prefix = storage(server, "c", prefix="u")
    try:
        with pytest.raises(SealError):
            await other_prefix.load("certs/a.json")
    finally:
        await other_prefix.close()
    assert await b.load("certs/a.json") == b"the value of a"  # the original still opens


async def test_another_clusters_key_cannot_open(server: RedisInstance,
                                                two: tuple[RedisStorage, RedisStorage]) -> None:
    a, _ = two
    await a.store("account.key", b"secret")
    stranger = storage(server, "x", sealer=Sealer(os.urandom(32), "the other key"))
    try:
        with pytest.raises(SealError, match="cannot be decrypted with the other key") as e:
            await stranger.load("account.key")
        assert "t:v:account.key" in str(e.value)
    finally:
        await stranger.close()


async def test_key_prefixes_are_isolated(server: RedisInstance) -> None:
    one, two = storage(server, "a", prefix="one"), storage(server, "b", prefix="two")
    try:
        await one.store("certs/a.json", b"one's")
        assert not await two.exists("certs/a.json") and not await two.exists("certs")
        assert await two.list("") == [] and await two.list("certs") == []
        with pytest.raises(FileNotFoundError):
            await two.load("certs/a.json")
        await two.store("certs/a.json", b"two's")
        await two.delete("certs")
        assert await one.load("certs/a.json") == b"one's"
        async with asyncio.timeout(2):  # the same lock name in another prefix is another lock
            await one.lock("cert-a")
            await two.lock("cert-a")
        assert [lk["node"] for lk in await one.locks()] == ["a"]
        assert [lk["node"] for lk in await two.locks()] == ["b"]
        await one.heartbeat({"pid": 1})
        assert await two.nodes() == []
    finally:
        await one.close()
        await two.close()


async def test_a_second_node_waits_for_the_lock(server: RedisInstance,
                                                two: tuple[RedisStorage, RedisStorage]) -> None:
    a, b = two
    await a.lock("cert-x")
    with pytest.raises(RuntimeError):
        await a.lock("cert-x")  # not re-entrant within one instance
    waiter = asyncio.create_task(b.lock("cert-x"))
    done, _ = await asyncio.wait({waiter}, timeout=10 * POLL)
    assert not done
    held = await b.locks()
    assert len(held) == 1
    assert held[0]["name"] == "cert-x" and held[0]["node"] == "a"
    assert held[0]["pid"] == os.getpid() and 0 < held[0]["expires_in"] <= a.lease
    assert abs(held[0]["since"] - time.time()) < 5
    await a.unlock("cert-x")
    async with asyncio.timeout(5):
        await waiter
    assert [lk["node"] for lk in await a.locks()] == ["b"]
    await b.unlock("cert-x")
    assert await a.locks() == []
    assert server.client().keys("t:lock:*") == []


async def test_unlock_after_a_takeover_leaves_the_new_holders_lock(
        server: RedisInstance, two: tuple[RedisStorage, RedisStorage]) -> None:
    a, b = two
    await a.lock("cert-x")
    server.client().delete("t:lock:cert-x")  # a's lease ran out (it paused too long)
    async with asyncio.timeout(5):
        await b.lock("cert-x")
    await a.unlock("cert-x")  # compare-and-delete: b's lock stays
    assert [lk["node"] for lk in await a.locks()] == ["b"]
    await b.unlock("cert-x")
    assert await a.locks() == []


CHILD = """
import asyncio, sys
from lbproxy.config.model import ClusterSettings
from lbproxy.letsencrypt.redisstore import RedisStorage, connect
from lbproxy.letsencrypt.sealing import Sealer

async def main() -> None:
    s = RedisStorage(connect(ClusterSettings(sys.argv[1], "unused")), Sealer(bytes(32)),
                     prefix="t", node="child", lease=float(sys.argv[2]))
    await s.lock("cert-x")
    print("locked", flush=True)
    await asyncio.sleep(3600)

asyncio.run(main())
"""


async def test_a_live_holders_lease_is_extended_and_a_killed_ones_taken_over(
        server: RedisInstance, two: tuple[RedisStorage, RedisStorage]) -> None:
    """The holder is another process: it keeps the lock for 2.5 leases (extending it), then
    dies by SIGKILL, and the waiter has it within a lease and a little."""
    a, _ = two
    lease = 1.2
    child = await asyncio.create_subprocess_exec(
        sys.executable, "-c", CHILD, server.url, str(lease), cwd=ROOT,
        stdout=asyncio.subprocess.PIPE, stdin=asyncio.subprocess.DEVNULL)
    try:
        assert child.stdout is not None
        async with asyncio.timeout(15):
            assert await child.stdout.readline() == b"locked\n"
        held = await a.locks()
        assert [(lk["node"], lk["pid"]) for lk in held] == [("child", child.pid)]
        waiter = asyncio.create_task(a.lock("cert-x"))
        done, _ = await asyncio.wait({waiter}, timeout=2.5 * lease)
        assert not done, "the lock was taken while its holder lived"
        ttl = server.client().pttl("t:lock:cert-x")
        assert ttl > 0
        child.send_signal(signal.SIGKILL)
        killed = time.monotonic()
        async with asyncio.timeout(lease + 5):
            await waiter
        took = time.monotonic() - killed
        assert took <= lease + 1.0, took
        assert took >= ttl / 1000 - 0.3, (took, ttl)  # by the lease's expiry, not before
        assert [(lk["node"], lk["pid"]) for lk in await a.locks()] == [("a", os.getpid())]
        await a.unlock("cert-x")
    finally:
        with contextlib.suppress(ProcessLookupError):
            child.kill()
        await child.wait()


async def test_heartbeats_list_the_nodes(two: tuple[RedisStorage, RedisStorage],
                                         server: RedisInstance) -> None:
    a, b = two
    assert await a.nodes() == []
    await a.heartbeat({"pid": 11, "version": "1.0"})
    await b.heartbeat({"pid": 22, "version": "1.0"})
    await b.heartbeat({"pid": 22, "version": "1.1"})  # the last beat counts
    assert await a.nodes() == [{"name": "a", "pid": 11, "version": "1.0"},
                               {"name": "b", "pid": 22, "version": "1.1"}]
    assert 0 < server.client().pttl("t:node:a") <= NODE_TTL * 1000


async def _next(node: RedisStorage, sub: object, want: str) -> tuple[str, str, str]:
    """The next event whose verb is `want` (others skipped), within 5 s."""
    async with asyncio.timeout(5):
        while True:
            event = await node.next_event(sub, 0.5)
            if event is not None and event[1] == want:
                return event


async def test_changes_are_announced_to_other_nodes(
        two: tuple[RedisStorage, RedisStorage]) -> None:
    a, b = two
    async with a.subscription() as sub:
        # the subscription is in place once an announcement comes through it
        async with asyncio.timeout(5):
            while True:
                await b.announce("ack", "ready")
                event = await a.next_event(sub, 0.2)
                if event is not None:
                    break
        assert event == ("b", "ack", "ready")
        await b.store("certs/x.json", b"x")
        assert await _next(a, sub, "stored") == ("b", "stored", "certs/x.json")
        await b.delete("certs")
        assert await _next(a, sub, "deleted") == ("b", "deleted", "certs")
        assert await a.next_event(sub, 0.05) is None  # nothing else is pending


async def _fails_naming(op: object, name: str) -> None:
    assert callable(op)
    started = time.monotonic()
    async with asyncio.timeout(DOWN_BOUND):
        with pytest.raises(OSError) as e:
            await op()
    assert not isinstance(e.value, FileNotFoundError)  # never "absent" when Redis is gone
    assert name in str(e.value.filename), (name, e.value)
    assert time.monotonic() - started < DOWN_BOUND


async def test_redis_down_fails_naming_the_key_then_reconnects(
        server: RedisInstance, two: tuple[RedisStorage, RedisStorage]) -> None:
    a, b = two
    await a.store("certs/a.json", b"kept")
    await a.load("certs/a.json")  # the client's connection is open when Redis goes
    server.stop()  # SHUTDOWN SAVE
    await _fails_naming(lambda: a.load("certs/a.json"), "certs/a.json")
    await _fails_naming(lambda: a.store("certs/b.json", b"b"), "certs/b.json")
    await _fails_naming(lambda: a.exists("certs/c.json"), "certs/c.json")
    await _fails_naming(lambda: a.list("certs"), "certs")
    await _fails_naming(lambda: a.delete("certs/a.json"), "certs/a.json")
    await _fails_naming(lambda: b.lock("cert-x"), "cert-x")
    await _fails_naming(lambda: b.heartbeat({}), "b")
    server.start()
    assert await a.load("certs/a.json") == b"kept"
    await b.store("certs/b.json", b"b")
    assert await a.load("certs/b.json") == b"b"
    async with asyncio.timeout(5):
        await b.lock("cert-x")
    await b.unlock("cert-x")


async def test_a_frozen_redis_fails_within_the_socket_timeout(
        server: RedisInstance, two: tuple[RedisStorage, RedisStorage]) -> None:
    a, _ = two
    await a.store("certs/a.json", b"kept")
    assert server.proc is not None
    os.kill(server.proc.pid, signal.SIGSTOP)  # accepts nothing, answers nothing
    try:
        started = time.monotonic()
        await _fails_naming(lambda: a.load("certs/a.json"), "certs/a.json")
        assert time.monotonic() - started <= SOCKET_TIMEOUT + 2
    finally:
        os.kill(server.proc.pid, signal.SIGCONT)
    assert await a.load("certs/a.json") == b"kept"


# -- passwords ------------------------------------------------------------------------------------

PASSWORD = "s3cret-pw"


@pytest.fixture
def locked_server(tmp_path: Path) -> Iterator[RedisInstance]:
    redis_or_skip()
    with start_redis(tmp_path / "redis", PASSWORD, user=("alice", "alice-pw")) as r:
        yield r


async def _round_trip(settings: ClusterSettings) -> RedisStorage:
    s = RedisStorage.from_settings(settings, SEALER)
    try:
        await s.store("account.key", b"k")
        assert await s.load("account.key") == b"k"
    finally:
        await s.close()
    return s


async def test_a_password_in_the_url_or_in_a_file(locked_server: RedisInstance,
                                                  tmp_path: Path) -> None:
    r = locked_server
    s = await _round_trip(ClusterSettings(r.url, "unused", node_name="n1"))
    assert PASSWORD not in s.where and str(r.port) in s.where
    pw = tmp_path / "redis.pw"
    pw.write_text(PASSWORD + "\n")
    await _round_trip(ClusterSettings(r.bare_url, "unused", password_file=str(pw)))
    # an ACL user, its password in the URL or in the file
    await _round_trip(ClusterSettings(f"redis://alice:alice-pw@127.0.0.1:{r.port}/0", "unused"))
    (tmp_path / "alice.pw").write_text("alice-pw")
    await _round_trip(ClusterSettings(f"redis://alice@127.0.0.1:{r.port}/0", "unused",
                                      password_file=str(tmp_path / "alice.pw")))


async def test_no_or_a_wrong_password_fails_without_showing_it(locked_server: RedisInstance,
                                                               tmp_path: Path) -> None:
    r = locked_server
    for settings in (ClusterSettings(r.bare_url, "unused"),
                     ClusterSettings(r.bare_url.replace("//", "//:wrong-pw@"), "unused")):
        s = RedisStorage.from_settings(settings, SEALER)
        try:
            with pytest.raises(OSError) as e:
                await s.load("account.key")
            assert not isinstance(e.value, FileNotFoundError)
            assert "account.key" in str(e.value.filename)
            assert "wrong-pw" not in str(e.value) and "wrong-pw" not in s.where
        finally:
            await s.close()
    with pytest.raises(OSError) as missing:
        connect(ClusterSettings(r.bare_url, "unused", password_file=str(tmp_path / "none.pw")))
    assert "none.pw" in str(missing.value.filename)


async def test_from_a_parsed_cluster_table(locked_server: RedisInstance, tmp_path: Path) -> None:
    """[cluster] as an operator writes it, relative files next to the config."""
    (tmp_path / "cluster.key").write_text(new_key())
    (tmp_path / "redis.pw").write_text(PASSWORD)
    cfg = parse_config(f"""
[cluster]
redis_url = "{locked_server.bare_url}"
encryption_key_file = "cluster.key"
password_file = "redis.pw"
key_prefix = "prod.lb"
node_name = "edge-1"
lock_lease = 4
""", base=tmp_path)
    settings = cfg.cluster
    assert settings is not None
    node = RedisStorage.from_settings(settings, Sealer.from_file(settings.encryption_key_file))
    try:
        assert (node.node, node.prefix, node.lease) == ("edge-1", "prod.lb", 4.0)
        await node.store("settings.json", b"{}")
        await node.lock("cert-a")
        assert [(lk["node"], lk["name"]) for lk in await node.locks()] == [("edge-1", "cert-a")]
        await node.unlock("cert-a")
        assert locked_server.client().exists("prod.lb:v:settings.json") == 1
    finally:
        await node.close()
