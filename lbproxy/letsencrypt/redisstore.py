"""Redis as `Storage` and `Locker` for a cluster of hosts, and the rest of the Redis side of a
cluster (the change channel, node heartbeats, the lock list): every Redis key and command of
lbproxy is in this module.

Layout under the configured prefix P (certmagic's Redis storages have the same shape):

    P:v:<key>     hash: d = the value sealed with AES-256-GCM (sealing.py), m = modified (ms),
                  s = size in clear. Nothing reaches Redis unsealed, private keys included.
    P:keys        sorted set of every key (score 0), for `list` and prefix deletes
    P:lock:<name> the holder (JSON: node, pid, token, since), set NX with a lease in ms; the
                  holder extends it every third of the lease; compare-and-delete releases it
    P:node:<name> a node's heartbeat (JSON), expiring after three missed beats
    P:events      pub/sub: "<node> stored|deleted <key>" after every write, "<node> ack <token>"

A store, its index entry and its announcement are one MULTI transaction. Every Redis failure is
raised as an `OSError` whose `filename` names the key, as the Storage seam promises.
"""

from __future__ import annotations

import asyncio
import builtins
import contextlib
import datetime as dt
import errno
import json
import logging
import os
import secrets
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from ..config.model import ClusterSettings
from .sealing import Sealer, SealError, UnsealableValue
from .storage import LOCK_POLL, KeyInfo

logger = logging.getLogger(__name__)

# Redis operations are bounded: a node that cannot reach Redis must notice, not hang.
SOCKET_TIMEOUT = 5.0
CONNECT_TIMEOUT = 3.0
HEARTBEAT = 5.0          # a node announces itself this often
NODE_TTL = 3 * HEARTBEAT  # and is "seen recently" until three beats are missed

_EXTEND = """if redis.call('get', KEYS[1]) == ARGV[1] then
  return redis.call('pexpire', KEYS[1], ARGV[2]) else return 0 end"""
_RELEASE = """if redis.call('get', KEYS[1]) == ARGV[1] then
  return redis.call('del', KEYS[1]) else return 0 end"""


def redact(url: str) -> str:
    """A Redis URL without its password, for messages and status."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    host = parts.hostname or ""
    netloc = f"{parts.username}:***@{host}" if parts.username else f":***@{host}"
    if parts.port:
        netloc += f":{parts.port}"
    return urlunsplit(parts._replace(netloc=netloc))


def connect(settings: ClusterSettings) -> aioredis.Redis:
    """A client for `settings` (no I/O yet); OSError if the password file cannot be read."""
    kw: dict[str, Any] = {"socket_timeout": SOCKET_TIMEOUT,
                          "socket_connect_timeout": CONNECT_TIMEOUT,
                          "health_check_interval": 10}
    if settings.password_file:
        with open(settings.password_file, encoding="utf-8") as f:
            kw["password"] = f.read().strip()
    if settings.tls_ca_file:
        kw["ssl_ca_certs"] = settings.tls_ca_file
    return aioredis.from_url(settings.redis_url, **kw)


@contextlib.contextmanager
def _failures(what: str) -> Iterator[None]:
    """Redis failures as OSError naming `what` (a key, a lock)."""
    try:
        yield
    except RedisError as exc:
        code = errno.ECONNREFUSED if "connect" in str(exc).lower() else errno.EIO
        raise OSError(code, f"Redis: {exc or type(exc).__name__}", what) from None


class RedisStorage:
    """`Storage` and `Locker` on one Redis database, shared by every node of a cluster."""

    def __init__(self, client: aioredis.Redis, sealer: Sealer, *, prefix: str, node: str,
                 lease: float, where: str = "redis", poll: float = LOCK_POLL) -> None:
        self.client = client
        self.sealer = sealer
        self.prefix = prefix
        self.node = node
        self.lease = lease
        self.poll = poll
        self.where = where
        self.channel = f"{prefix}:events"
        self._index = f"{prefix}:keys"
        self._token = f"{node}:{os.getpid()}:{secrets.token_hex(8)}"
        self._held: dict[str, tuple[str, asyncio.Task[None]]] = {}

    @classmethod
    def from_settings(cls, settings: ClusterSettings, sealer: Sealer) -> RedisStorage:
        return cls(connect(settings), sealer, prefix=settings.key_prefix, node=settings.node(),
                   lease=settings.lock_lease, where=redact(settings.redis_url))

    def _v(self, key: str) -> str:
        return f"{self.prefix}:v:{key}"

    def describe(self, key: str) -> str:
        return f"{self.where} key {self._v(key)}"

    async def close(self) -> None:
        for name in list(self._held):
            with contextlib.suppress(OSError):
                await self.unlock(name)
        with contextlib.suppress(RedisError, OSError):
            await self.client.aclose()

    async def ping(self) -> None:
        with _failures(self.where):
            await self.client.ping()

    # -- Storage ---------------------------------------------------------------------------------

    async def load(self, key: str) -> bytes:
        with _failures(self.describe(key)):
            sealed = await self.client.hget(self._v(key), "d")
        if sealed is None:
            raise FileNotFoundError(errno.ENOENT, "no such key", self.describe(key))
        try:
            return self.sealer.open(self._v(key), sealed if isinstance(sealed, bytes)
                                    else sealed.encode())
        except SealError as exc:
            raise UnsealableValue(errno.EBADMSG, str(exc), self.describe(key)) from None

    async def store(self, key: str, value: bytes) -> None:
        sealed = self.sealer.seal(self._v(key), value)
        with _failures(self.describe(key)):
            async with self.client.pipeline(transaction=True) as p:
                p.hset(self._v(key), mapping={"d": sealed, "m": str(int(time.time() * 1000)),
                                              "s": str(len(value))})
                p.zadd(self._index, {key: 0})
                p.publish(self.channel, f"{self.node} stored {key}")
                await p.execute()

    async def _below(self, key: str) -> list[str]:
        out = await self.client.zrangebylex(
            self._index, f"[{key}/".encode(), f"({key}/".encode() + b"\xff")
        return [_text(k) for k in out]

    async def delete(self, key: str) -> None:
        with _failures(self.describe(key)):
            keys = [key, *await self._below(key)]
            async with self.client.pipeline(transaction=True) as p:
                p.delete(*(self._v(k) for k in keys))
                p.zrem(self._index, *keys)
                p.publish(self.channel, f"{self.node} deleted {key}")
                await p.execute()

    async def exists(self, key: str) -> bool:
        with _failures(self.describe(key)):
            if await self.client.exists(self._v(key)):
                return True
            return bool(await self._below(key))

    async def list(self, prefix: str) -> builtins.list[str]:
        base = f"{prefix.rstrip('/')}/" if prefix else ""
        with _failures(self.describe(prefix)):
            if base:
                keys = await self._below(prefix.rstrip("/"))
            else:
                keys = [_text(k) for k in await self.client.zrange(self._index, 0, -1)]
        return sorted({base + k[len(base):].split("/", 1)[0] for k in keys})

    async def stat(self, key: str) -> KeyInfo:
        with _failures(self.describe(key)):
            modified, size = await self.client.hmget(self._v(key), ["m", "s"])
            if modified is None:
                if await self._below(key):
                    return KeyInfo(key, dt.datetime.now(dt.UTC), 0, terminal=False)
                raise FileNotFoundError(errno.ENOENT, "no such key", self.describe(key))
        return KeyInfo(key, dt.datetime.fromtimestamp(int(modified) / 1000, dt.UTC),
                       int(size or 0))

    # -- Locker ----------------------------------------------------------------------------------

    def _lock_key(self, name: str) -> str:
        return f"{self.prefix}:lock:{name}"

    async def lock(self, name: str) -> None:
        if name in self._held:
            raise RuntimeError(f"lock {name} is already held by this instance")
        token = f"{self._token}:{secrets.token_hex(4)}"
        holder = json.dumps({"node": self.node, "pid": os.getpid(), "token": token,
                             "since": time.time()})
        lease_ms = int(self.lease * 1000)
        while True:
            with _failures(f"{self.where} lock {self._lock_key(name)}"):
                if await self.client.set(self._lock_key(name), holder, nx=True, px=lease_ms):
                    break
            await asyncio.sleep(self.poll)
        self._held[name] = (holder, asyncio.create_task(self._keep(name, holder),
                                                        name=f"lease-{name}"))

    async def unlock(self, name: str) -> None:
        held = self._held.pop(name, None)
        if held is None:
            return
        holder, keeper = held
        keeper.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await keeper
        try:
            released = await self.client.eval(_RELEASE, 1, self._lock_key(name), holder)
        except RedisError as exc:  # the lease runs out by itself
            logger.warning("cannot release lock %s (%s); it expires within %.0f s",
                           self._lock_key(name), exc, self.lease)
            return
        if not released:
            logger.error("lock %s was taken over while held (its lease ran out)",
                         self._lock_key(name))

    async def _keep(self, name: str, holder: str) -> None:
        """Extend the lease every third of it while the lock is held."""
        while True:
            await asyncio.sleep(self.lease / 3)
            try:
                kept = await self.client.eval(_EXTEND, 1, self._lock_key(name), holder,
                                              int(self.lease * 1000))
            except RedisError as exc:
                logger.warning("cannot extend the lease of lock %s: %s", self._lock_key(name),
                               exc)
                continue
            if not kept:
                logger.error("lock %s is no longer ours (its lease ran out)",
                             self._lock_key(name))
                return

    # -- the rest of the cluster: announcements, heartbeats, who holds what ---------------------

    async def announce(self, verb: str, arg: str) -> None:
        with _failures(f"{self.where} channel {self.channel}"):
            await self.client.publish(self.channel, f"{self.node} {verb} {arg}")

    @contextlib.asynccontextmanager
    async def subscription(self) -> AsyncIterator[Any]:
        """A pub/sub connection on the change channel; `next_event` reads it."""
        pubsub = self.client.pubsub()
        try:
            with _failures(f"{self.where} channel {self.channel}"):
                await pubsub.subscribe(self.channel)
            yield pubsub
        finally:
            with contextlib.suppress(RedisError, OSError):
                await pubsub.aclose()

    async def next_event(self, pubsub: Any, wait: float) -> tuple[str, str, str] | None:
        """(node, verb, argument) of the next announcement within `wait` seconds, or None."""
        with _failures(f"{self.where} channel {self.channel}"):
            msg = await pubsub.get_message(ignore_subscribe_messages=True, timeout=wait)
        if not msg or msg.get("type") != "message":
            return None
        node, _, rest = bytes(msg["data"]).decode(errors="replace").partition(" ")
        verb, _, arg = rest.partition(" ")
        return node, verb, arg

    async def heartbeat(self, info: dict[str, Any]) -> None:
        with _failures(f"{self.where} node {self.node}"):
            await self.client.set(f"{self.prefix}:node:{self.node}", json.dumps(info),
                                  px=int(NODE_TTL * 1000))

    async def _scan(self, kind: str) -> builtins.list[tuple[str, bytes, int]]:
        """(name, value, ms to live) of every `P:<kind>:*` key."""
        pattern = f"{self.prefix}:{kind}:"
        keys = [k async for k in self.client.scan_iter(match=f"{pattern}*", count=200)]
        if not keys:
            return []
        async with self.client.pipeline(transaction=False) as p:
            for k in keys:
                p.get(k)
                p.pttl(k)
            answers = await p.execute()
        out = []
        for i, k in enumerate(keys):
            value, ttl = answers[2 * i], answers[2 * i + 1]
            if value is not None:
                out.append((bytes(k).decode()[len(pattern):], bytes(value), int(ttl)))
        return sorted(out)

    async def nodes(self) -> builtins.list[dict[str, Any]]:
        """The nodes seen within NODE_TTL, each as its last heartbeat said."""
        with _failures(f"{self.where} nodes"):
            found = await self._scan("node")
        return [dict(_json(v), name=name) for name, v, _ in found]

    async def locks(self) -> builtins.list[dict[str, Any]]:
        """Every lock held: name, holding node and pid, since, seconds left of the lease."""
        with _failures(f"{self.where} locks"):
            found = await self._scan("lock")
        return [{"name": name, "node": d.get("node", "?"), "pid": d.get("pid"),
                 "since": d.get("since"), "expires_in": round(ttl / 1000, 1)}
                for name, v, ttl in found for d in [_json(v)]]


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _json(value: bytes) -> dict[str, Any]:
    try:
        d = json.loads(value)
    except ValueError:
        return {}
    return d if isinstance(d, dict) else {}
