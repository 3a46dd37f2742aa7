"""Migrating a host's Let's Encrypt state (lbproxy.letsencrypt.migrate): the state directory into
a real Redis and back into a new state directory gives the same files, per-node keys left
behind, issued/ keys built from the certificate store for certificates never shared, values
sealed in Redis; a destination holding any key refuses without --force; every failure names the
key and where it lives."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
import trustme

from lbproxy.certs import CertStore
from lbproxy.config.model import ClusterSettings
from lbproxy.letsencrypt import FileStorage, MemoryStorage
from lbproxy.letsencrypt.migrate import (
    FROM_STORE,
    KINDS,
    MAX_DEPTH,
    MigrateError,
    migrate,
    per_node,
    shared_keys,
)
from lbproxy.letsencrypt.model import MANAGED_BY, Issued
from lbproxy.letsencrypt.redisstore import RedisStorage, connect
from lbproxy.letsencrypt.sealing import Sealer
from tests.certs.helpers import issue
from tests.support.redis import RedisInstance, redis_or_skip, start_redis

SEALER = Sealer(bytes(range(32)))
PREFIX = "mig"

# A single host's <state_dir>/letsencrypt as lbproxy leaves it.
SHARED = {
    "settings.json": b'{"directory_url": "https://acme.test/dir", "renew_period_days": 30}\n',
    "account.json": b'{"url": "https://acme.test/acct/1", "email": "ops@example.com"}\n',
    "account.key": b"-----BEGIN PRIVATE KEY-----\nnot really a key\n-----END PRIVATE KEY-----\n",
    "certs/shop.json": b'{"id": "shop"}\n',
    "certs/blog.json": b'{"id": "blog"}\n',
    "restored-config.toml": b"# a backup's VS configuration\n",
}
PER_NODE = {
    "challenges.json": b"[]",
    "challenges.json.damaged": b"[",
    "locks/cert-shop.lock": b'{"owner": "host:1"}',
    "nodes/old/challenges.json": b"[]",
    "answers/tok.json": b"{}",
}


@pytest.fixture
def server(tmp_path: Path) -> Iterator[RedisInstance]:
    redis_or_skip()
    with start_redis(tmp_path / "redis") as r:
        yield r


@pytest.fixture
async def redis(server: RedisInstance) -> AsyncIterator[RedisStorage]:
    s = RedisStorage(connect(ClusterSettings(server.url, "unused")), SEALER, prefix=PREFIX,
                     node="migrator", lease=5.0)
    yield s
    await s.close()


def host_state(root: Path) -> tuple[FileStorage, CertStore, dict[str, bytes]]:
    """A host's state: the files above, issued/shop.json, and a certificate store with shop
    and blog (Let's Encrypt) and an imported one."""
    ca = trustme.CA()
    store = CertStore(root)
    shop, blog, imported = (issue(ca, f"{n}.example.com") for n in ("shop", "blog", "own"))
    store.import_pem("shop", *shop, managed_by=MANAGED_BY)
    store.import_pem("blog", *blog, managed_by=MANAGED_BY)
    store.import_pem("own", *imported)
    files = {**SHARED, "issued/shop.json": Issued(*shop).to_bytes()}
    le = root / "letsencrypt"
    for key, data in {**files, **PER_NODE}.items():
        (le / key).parent.mkdir(parents=True, exist_ok=True)
        (le / key).write_bytes(data)
    return FileStorage(le), store, files


def tree(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes()
            for p in sorted(root.rglob("*")) if p.is_file()}


async def test_round_trip_through_redis(tmp_path: Path, redis: RedisStorage,
                                        server: RedisInstance) -> None:
    source, store, files = host_state(tmp_path / "host")
    report = await migrate(source, redis, store=store)
    assert report.counts == {"settings": 1, "account": 2, "certificates": 2, "issued": 1,
                             FROM_STORE: 1, "other": 1}
    assert report.total == len(files) + 1
    assert set(report.left_behind) == {"answers", "challenges.json", "challenges.json.damaged",
                                       "locks", "nodes"}

    # In Redis: every shared key, no per-node one, and nothing in clear.
    for key, data in files.items():
        assert await redis.load(key) == data
    for key in PER_NODE:
        assert not await redis.exists(key)
    blog = Issued.from_bytes(await redis.load("issued/blog.json"))
    material = store.material("blog")
    assert material is not None
    assert (blog.chain_pem, blog.key_pem) == (material.chain_pem, material.key_pem)
    assert not await redis.exists("issued/own.json")   # imported: not Let's Encrypt's
    raw = server.client()
    try:
        values = [raw.hget(k, "d") for k in raw.scan_iter(match=f"{PREFIX}:v:*")]
    finally:
        raw.close()
    assert len(values) == len(files) + 1
    assert all(v and b"PRIVATE KEY" not in v and b"acme.test" not in v for v in values)

    # Back into a new state directory: the same files, plus the issued/ key the store gave.
    back = tmp_path / "new" / "letsencrypt"
    report = await migrate(redis, FileStorage(back))
    assert report.counts["issued"] == 2 and report.counts[FROM_STORE] == 0
    assert report.left_behind == ()
    assert tree(back) == {**files, "issued/blog.json": blog.to_bytes()}


async def test_a_destination_holding_a_key_refuses_without_force(
        tmp_path: Path, redis: RedisStorage) -> None:
    source, store, _ = host_state(tmp_path / "host")
    await redis.store("certs/shop.json", b"another cluster's entry")
    with pytest.raises(MigrateError) as e:
        await migrate(source, redis, store=store)
    assert "already holds 1 of the 8 keys to copy (certs/shop.json)" in str(e.value)
    assert "nothing was copied (--force overwrites them)" in str(e.value)
    assert not await redis.exists("settings.json")
    assert await redis.load("certs/shop.json") == b"another cluster's entry"

    report = await migrate(source, redis, store=store, force=True)
    assert report.total == 8
    assert await redis.load("certs/shop.json") == SHARED["certs/shop.json"]
    # Once copied, a second run refuses on every key (the one from the store included).
    with pytest.raises(MigrateError, match="already holds 8 of the 8 keys"):
        await migrate(source, redis, store=store)


async def test_keys_only_the_destination_holds_are_kept(tmp_path: Path) -> None:
    source, dest = MemoryStorage(), MemoryStorage()
    await source.store("settings.json", b"s")
    await dest.store("certs/other.json", b"o")
    await dest.store("settings.json", b"old")
    report = await migrate(source, dest, force=True)
    assert report.counts == {**dict.fromkeys(KINDS, 0), "settings": 1}
    assert await dest.load("settings.json") == b"s"
    assert await dest.load("certs/other.json") == b"o"


async def test_an_empty_source_is_refused(tmp_path: Path) -> None:
    source = FileStorage(tmp_path / "letsencrypt")
    await source.store("challenges.json", b"[]")   # per node: nothing to share
    with pytest.raises(MigrateError, match=r"nothing to copy: .*letsencrypt holds no"):
        await migrate(source, MemoryStorage())


class Recording(MemoryStorage):
    """Remembers the order of stores; refuses to store `fail_on`."""

    def __init__(self, fail_on: str = "") -> None:
        super().__init__()
        self.order: list[str] = []
        self.fail_on = fail_on

    async def store(self, key: str, value: bytes) -> None:
        if key == self.fail_on:
            raise OSError(28, "No space left on device", self.describe(key))
        self.order.append(key)
        await super().store(key, value)


async def test_order_settings_and_account_first_issued_before_entries() -> None:
    source = MemoryStorage()
    for key in ("certs/a.json", "issued/a.json", "zz-other", "account.json", "account.key",
                "settings.json", "issued/b.json", "certs/b.json"):
        await source.store(key, key.encode())
    dest = Recording()
    await migrate(source, dest)
    assert dest.order == ["settings.json", "account.key", "account.json", "issued/a.json",
                          "issued/b.json", "certs/a.json", "certs/b.json", "zz-other"]


async def test_a_failed_write_names_the_key_and_how_far_it_got() -> None:
    source = MemoryStorage()
    for key in ("settings.json", "account.json", "certs/a.json"):
        await source.store(key, b"x")
    with pytest.raises(MigrateError) as e:
        await migrate(source, Recording(fail_on="certs/a.json"))
    assert str(e.value) == ("cannot write memory:certs/a.json: No space left on device (2 "
                            "key(s) were copied before it; --force copies them all again)")


async def test_a_value_sealed_with_another_key_names_the_key(
        tmp_path: Path, redis: RedisStorage, server: RedisInstance) -> None:
    other = RedisStorage(connect(ClusterSettings(server.url, "unused")), Sealer(bytes(32)),
                         prefix=PREFIX, node="other", lease=5.0)
    try:
        await other.store("settings.json", b"{}")
    finally:
        await other.close()
    with pytest.raises(MigrateError) as e:
        await migrate(redis, FileStorage(tmp_path / "letsencrypt"))
    assert f"cannot read redis key {PREFIX}:v:settings.json" in str(e.value)
    assert "cannot be decrypted" in str(e.value)
    assert not (tmp_path / "letsencrypt" / "settings.json").exists()


async def test_a_managed_certificate_without_material_is_named(tmp_path: Path) -> None:
    source, store, _ = host_state(tmp_path / "host")
    store._material.pop("blog")   # as if its files had vanished after the load
    with pytest.raises(MigrateError, match=r"certificate blog: no chain and key in .*certs/blog"):
        await migrate(source, MemoryStorage(), store=store)


async def test_the_walk_is_bounded_in_depth() -> None:
    source = MemoryStorage()
    await source.store("/".join(["d"] * (MAX_DEPTH + 1)), b"x")
    with pytest.raises(MigrateError, match=f"deeper than {MAX_DEPTH} levels"):
        await shared_keys(source)


def test_per_node_keys() -> None:
    assert all(per_node(k) for k in PER_NODE)
    assert not any(per_node(k) for k in (*SHARED, "issued/x.json", "challenges", "locksmith"))
