"""One node of a cluster sharing a Let's Encrypt account through Redis: keeps this node's view of
the shared state current (settings, account, certificates' entries, issued certificates) from
the change channel with polling as the bounded fallback, answers challenges other nodes placed
(http-01: the same SubVS + first-precedence rule; tls-alpn-01: a validation certificate this node
makes from the shared key authorization, so no private key goes through Redis), each until its
node withdraws it or it expires, and says whether Redis is reachable.

The data plane never waits on Redis: a node that loses it keeps serving what it has, places no
order (the lock cannot be taken), and catches up once Redis is back. What an order stores and
when it locks is obtain.py's; this module only follows what the other nodes did.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import datetime as dt
import json
import logging
import os
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from acmeclient.challenges import HTTP01, TLS_ALPN01, tls_alpn01_certificate

from ..config.model import Config, Protocol, VirtualService
from ..runtime import AlpnValidation, Injection, RuntimeStore
from .challenge import ANSWER_TTL, build_injection, eligible_services
from .codes import AcmeLog, LeError
from .redisstore import HEARTBEAT, RedisStorage
from .sealing import UnsealableValue
from .storage import ACCOUNT, ACCOUNT_KEY, ANSWERS, ENTRIES, ISSUED, SETTINGS, answer_key

logger = logging.getLogger(__name__)

# How long the node that placed an order waits for every node seen recently to say it
# answers the challenge too, before telling the CA to validate.
ACK_WAIT = 5.0
RETRY_MIN, RETRY_MAX = 0.5, 5.0   # reconnecting to Redis
# The challenge types whose answers are mirrored (dns-01 needs none: the DNS answers for all).
MIRRORED = (HTTP01, TLS_ALPN01)
# The longest a mirrored answer stays, from when this node took it, whatever its `expires` says
# (another host's clock may be ahead): no order runs longer (challenge.ANSWER_TTL).
MIRROR_MAX = ANSWER_TTL


@dataclass(slots=True)
class Answer:
    """A challenge answer in the shared store: any node may receive the CA's request for it."""

    cert: str
    vs: str
    host: str
    token: str
    key_authorization: str
    node: str
    expires: float   # wall time; a dead node's answers are dropped after it
    # http-01 or tls-alpn-01 (absent in what older nodes stored: http-01)
    challenge: str = HTTP01

    def to_bytes(self) -> bytes:
        return json.dumps(dataclasses.asdict(self)).encode()

    @classmethod
    def from_bytes(cls, data: bytes) -> Answer:
        d = json.loads(data)
        challenge = str(d.get("challenge", HTTP01))
        if challenge not in MIRRORED:
            raise ValueError(f"challenge type {challenge!r} is not one a node mirrors")
        return cls(str(d["cert"]), str(d["vs"]), str(d["host"]), str(d["token"]),
                   str(d["key_authorization"]), str(d["node"]), float(d["expires"]),
                   challenge)


@dataclass(slots=True)
class _Mirror:
    """What answers another node's challenge here, and the timer that takes it away."""

    injections: list[Injection] = field(default_factory=list)       # http-01
    validations: list[AlpnValidation] = field(default_factory=list)  # tls-alpn-01
    timer: asyncio.TimerHandle | None = None


@dataclass(slots=True)
class Hooks:
    """What the node calls into the rest of the feature (the manager wires them)."""

    load: Callable[[], Awaitable[None]]                 # first contact: load state, schedule
    reload_settings: Callable[[], Awaitable[None]]
    reload_account: Callable[[], Awaitable[None]]
    entry_changed: Callable[[str], Awaitable[None]]     # certs/<id>.json stored elsewhere
    entry_deleted: Callable[[str], Awaitable[None]]
    issued_changed: Callable[[str], Awaitable[None]]    # issued/<id>.json: pick it up
    known_ids: Callable[[], list[str]]


@dataclass(slots=True)
class _Link:
    connected: bool = False
    since: float = field(default_factory=time.time)
    last_error: str = ""
    outages: int = 0


class ClusterNode:
    """Follows the cluster for this node. `start()` returns at once; the first contact with
    Redis loads the state (`Hooks.load`), so a node started while Redis is down serves."""

    def __init__(self, storage: RedisStorage, runtime: RuntimeStore, log: AcmeLog, hooks: Hooks,
                 *, poll_interval: float) -> None:
        self.storage = storage
        self.runtime = runtime
        self.log = log
        self.hooks = hooks
        self.poll_interval = poll_interval
        self.node = storage.node
        self.link = _Link()
        self.loaded = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._mirrored: dict[str, _Mirror] = {}   # token -> what answers it here
        self._expired: set[str] = set()   # tokens dropped at their bound, while still in Redis
        self._tasks: set[asyncio.Task[None]] = set()   # expiries under way
        self._acks: dict[str, set[str]] = {}             # token (ours) -> nodes that answer it
        self._acked = asyncio.Condition()
        self._modified: dict[str, dt.datetime | None] = {}   # key -> last modified seen
        self._started = time.time()

    # -- lifecycle --------------------------------------------------------------------------------

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="cluster")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task
        for token in list(self._mirrored):
            await self._unmirror(token)
        for task in list(self._tasks):   # expiries under way: what they remove is gone now
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        await self.storage.close()

    async def _run(self) -> None:
        retry = RETRY_MIN
        while True:
            try:
                async with self.storage.subscription() as pubsub:
                    # Subscribed first, then read: a change made meanwhile is seen either way.
                    if not self.loaded.is_set():
                        await self.hooks.load()
                        await self._drop_own_answers()
                        self.loaded.set()
                    await self.catch_up()
                    self._up()
                    retry = RETRY_MIN
                    await self._follow(pubsub)
            except OSError as exc:
                self._down(exc)
            except LeError as exc:   # the state could not be loaded: same as unreachable
                self._down(OSError(0, str(exc)))
            except Exception as exc:   # never dies: it is how this node follows the others
                logger.exception("cluster: following the other nodes failed")
                self._down(OSError(0, f"internal error: {exc!r}"))
            await asyncio.sleep(retry)
            retry = min(retry * 2, RETRY_MAX)

    async def _follow(self, pubsub: Any) -> None:
        loop = asyncio.get_running_loop()
        next_beat = next_poll = loop.time()
        while True:
            now = loop.time()
            if now >= next_beat:
                await self.storage.heartbeat(self._beat())
                next_beat = now + HEARTBEAT
            if now >= next_poll + self.poll_interval:
                await self.catch_up()
                next_poll = now
            event = await self.storage.next_event(pubsub, min(1.0, HEARTBEAT))
            if event is None:
                continue
            node, verb, arg = event
            if node == self.node:
                continue
            try:
                await self._on_event(node, verb, arg)
            except OSError:
                raise
            except Exception:   # one bad announcement must not stop the node following
                logger.exception("cluster: cannot apply %s %s from %s", verb, arg, node)

    def _beat(self) -> dict[str, Any]:
        return {"pid": os.getpid(), "started": self._started, "seen": time.time(),
                "mirrored": len(self._mirrored)}

    def _up(self) -> None:
        if not self.link.connected:
            if self.link.outages:
                self.log.info(f"cluster: Redis {self.storage.where} is reachable again; "
                              "caught up with the other nodes")
            self.link = _Link(True, time.time(), "", self.link.outages)

    def _down(self, exc: OSError) -> None:
        why = exc.strerror or str(exc)
        if self.link.connected or not self.link.last_error:
            self.log.error(f"cluster: Redis {self.storage.where} is unreachable ({why}); "
                           "serving the certificates this node has, no order is placed "
                           "until it is back")
            self.link = _Link(False, time.time(), why, self.link.outages + 1)
        else:
            self.link.last_error = why

    # -- what the other nodes did -----------------------------------------------------------------

    async def _on_event(self, node: str, verb: str, arg: str) -> None:
        if verb == "ack":
            async with self._acked:
                if arg in self._acks:
                    self._acks[arg].add(node)
                    self._acked.notify_all()
            return
        key = arg
        if verb == "stored":
            if key == SETTINGS:
                await self._changed(key)   # seen: the next catch-up does not read it again
                await self.hooks.reload_settings()
            elif key in (ACCOUNT, ACCOUNT_KEY):
                await self._changed(key)
                await self.hooks.reload_account()
            elif key.startswith(f"{ENTRIES}/") and key.endswith(".json"):
                await self.hooks.entry_changed(_stem(key))
            elif key.startswith(f"{ISSUED}/") and key.endswith(".json"):
                await self._changed(key, first=True)   # seen: the next catch-up skips it
                await self.hooks.issued_changed(_stem(key))
            elif key.startswith(f"{ANSWERS}/"):
                await self._mirror_key(key)
        elif verb == "deleted":
            if key.startswith(f"{ENTRIES}/") and key.endswith(".json"):
                await self.hooks.entry_deleted(_stem(key))
            elif key.startswith(f"{ANSWERS}/"):
                self._expired.discard(_stem(key))
                await self._unmirror(_stem(key))

    async def catch_up(self) -> None:
        """Read the shared state whole: what the change channel may have missed."""
        if await self._changed(SETTINGS):
            await self.hooks.reload_settings()
        if await self._changed(ACCOUNT) | await self._changed(ACCOUNT_KEY):
            await self.hooks.reload_account()
        known = set(self.hooks.known_ids())
        for key in await self.storage.list(ENTRIES):
            if key.endswith(".json") and _stem(key) not in known:
                await self.hooks.entry_changed(_stem(key))
        for key in await self.storage.list(ISSUED):
            if key.endswith(".json") and await self._changed(key, first=True):
                await self.hooks.issued_changed(_stem(key))
        present = set()
        for key in await self.storage.list(ANSWERS):
            present.add(_stem(key))
            await self._mirror_key(key)
        for token in set(self._mirrored) - present:
            await self._unmirror(token)
        self._expired &= present

    async def _changed(self, key: str, *, first: bool = False) -> bool:
        """Whether `key` changed since the last look; the first look says `first` (settings and
        account: no, they were just loaded; an issued certificate: yes, it may be newer than
        the one served here). Reading only what changed keeps a Redis hiccup from looking like
        a damaged file."""
        try:
            modified: dt.datetime | None = (await self.storage.stat(key)).modified
        except FileNotFoundError:
            modified = None
        unseen = key not in self._modified
        before = self._modified.get(key)
        self._modified[key] = modified
        return first if unseen else modified != before

    # -- challenges: ours, shared; theirs, mirrored -----------------------------------------------

    async def share(self, cert_id: str, vs: str, host: str, token: str,
                    key_authorization: str, ttl: float, *,
                    challenge: str = HTTP01) -> list[str]:
        """Put an answer of this node's order into the shared store (sealed, as every value)
        and wait (ACK_WAIT at most) until every node seen recently answers it too; the nodes
        that did not. For tls-alpn-01 the key authorization is shared, not the validation
        certificate: each node makes its own, so no private key goes through Redis."""
        if challenge not in MIRRORED:
            raise ValueError(f"cannot share a {challenge} answer: only "
                             f"{' and '.join(MIRRORED)} are mirrored")
        answer = Answer(cert_id, vs, host, token, key_authorization, self.node,
                        time.time() + ttl, challenge)
        async with self._acked:
            self._acks.setdefault(token, set())
        await self.storage.store(answer_key(token), answer.to_bytes())
        others = {n["name"] for n in await self.storage.nodes()} - {self.node}
        try:
            async with asyncio.timeout(ACK_WAIT), self._acked:
                await self._acked.wait_for(lambda: others <= self._acks.get(token, set()))
        except TimeoutError:
            pass
        missing = sorted(others - self._acks.get(token, set()))
        if missing:
            self.log.error(f"cluster: node(s) {', '.join(missing)} did not confirm the answer "
                           f"for {host} within {ACK_WAIT:.0f} s; a validation reaching them "
                           "fails")
        return missing

    async def withdraw(self, token: str) -> None:
        self._acks.pop(token, None)
        try:
            await self.storage.delete(answer_key(token))
        except OSError as exc:   # expires on every node anyway
            logger.warning("cluster: cannot remove the answer %s: %s", token, exc)

    async def _drop_own_answers(self) -> None:
        """A restart's leftovers: answers this node shared for orders that died with it."""
        for key in await self.storage.list(ANSWERS):
            with contextlib.suppress(FileNotFoundError, ValueError, KeyError):
                if Answer.from_bytes(await self.storage.load(key)).node == self.node:
                    await self.storage.delete(key)

    async def _mirror_key(self, key: str) -> None:
        token = _stem(key)
        try:
            answer = Answer.from_bytes(await self.storage.load(key))
        except FileNotFoundError:
            await self._unmirror(token)
            return
        except (UnsealableValue, ValueError, KeyError, TypeError) as exc:
            logger.warning("cluster: unusable answer %s: %s", key, exc)
            return
        if answer.node == self.node:
            return
        if answer.expires < time.time() or token in self._expired:   # its node died mid-order
            await self._unmirror(token)
            with contextlib.suppress(OSError):
                await self.storage.delete(key)
            return
        if token not in self._mirrored:
            if answer.challenge == TLS_ALPN01:
                mirror = await self._mirror_alpn(answer)
                where = ", ".join(v.vs for v in mirror.validations)
            else:
                mirror = await self._mirror_http(answer)
                where = ", ".join(i.vs for i in mirror.injections)
            if not where:
                kind = "HTTPS VS" if answer.challenge == TLS_ALPN01 else "VS"
                self.log.error(f"cluster: no {kind} here can answer {answer.node}'s "
                               f"{answer.challenge} challenge for {answer.host} (VS "
                               f"{answer.vs!r} is not here or not eligible)")
                return
            delay = max(0.0, min(answer.expires - time.time(), MIRROR_MAX))
            mirror.timer = asyncio.get_running_loop().call_later(delay, self._expire, token)
            self._mirrored[token] = mirror
            logger.info("cluster: answering %s's %s challenge for %s in %s", answer.node,
                        answer.challenge, answer.host, where)
        await self.storage.announce("ack", token)

    async def _mirror_http(self, answer: Answer) -> _Mirror:
        mirror = _Mirror()
        for vs in self._answering(self.runtime.current.config, answer.vs):
            try:
                injection = build_injection(self.runtime.current, vs.name, answer.host,
                                            answer.token, answer.key_authorization)
                await self.runtime.inject(injection)
            except Exception as exc:
                logger.warning("cluster: cannot answer %s's challenge for %s in VS %s: %s",
                               answer.node, answer.host, vs.name, exc)
                continue
            mirror.injections.append(injection)
        return mirror

    async def _mirror_alpn(self, answer: Answer) -> _Mirror:
        """The validation certificate made here from the key authorization (a fresh key that
        never leaves this node), served by each answering HTTPS VS."""
        mirror = _Mirror()
        try:
            cert_pem, key_pem = tls_alpn01_certificate(answer.host, answer.key_authorization)
        except ValueError as exc:
            logger.warning("cluster: cannot make the tls-alpn-01 certificate of %s's challenge "
                           "for %s: %s", answer.node, answer.host, exc)
            return mirror
        host = answer.host.lower().rstrip(".")
        for vs in self._answering_alpn(self.runtime.current.config, answer.vs, answer.cert):
            validation = AlpnValidation(vs.name, host, answer.token, cert_pem, key_pem)
            try:
                await self.runtime.add_validation(validation)
            except Exception as exc:
                logger.warning("cluster: cannot answer %s's tls-alpn-01 challenge for %s in "
                               "VS %s: %s", answer.node, answer.host, vs.name, exc)
                continue
            mirror.validations.append(validation)
        return mirror

    @staticmethod
    def _answering(config: Config, vs_name: str) -> list[VirtualService]:
        """http-01: the VS of the same name if it is eligible here, else every eligible HTTP
        VS."""
        eligible = eligible_services(config)
        same = [vs for vs in eligible if vs.name == vs_name]
        return same or [vs for vs in eligible if vs.protocol is Protocol.HTTP]

    @staticmethod
    def _answering_alpn(config: Config, vs_name: str, cert_id: str) -> list[VirtualService]:
        """tls-alpn-01: the HTTPS VS of the same name if there is one here, else every HTTPS
        VS that serves the certificate (lists it among its certificates), else every HTTPS VS.
        Only a handshake for the name offering acme-tls/1 alone ever gets the validation
        certificate, so answering on more VSs than needed costs no client anything."""
        https = [vs for vs in config.virtual_services if vs.protocol is Protocol.HTTPS]
        same = [vs for vs in https if vs.name == vs_name]
        serving = [vs for vs in https if cert_id in vs.tls.certificates]
        return same or serving or https

    def _expire(self, token: str) -> None:
        """The bound of a mirrored answer: its node did not withdraw it in time (it died, or
        lost Redis). Taken away here, and from Redis (the others then take it away too)."""
        if token not in self._mirrored:
            return
        task = asyncio.create_task(self._expire_now(token), name=f"cluster-expire-{token[:12]}")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _expire_now(self, token: str) -> None:
        self._expired.add(token)
        await self._unmirror(token)
        logger.warning("cluster: the challenge answer %s expired before its node withdrew it; "
                       "no longer answered here", token[:12])
        try:
            await self.storage.delete(answer_key(token))
        except OSError as exc:   # Redis away: the next catch-up deletes it (self._expired)
            logger.info("cluster: cannot remove the expired answer %s: %s", token[:12], exc)

    async def _unmirror(self, token: str) -> None:
        mirror = self._mirrored.pop(token, None)
        if mirror is None:
            return
        if mirror.timer is not None:
            mirror.timer.cancel()
        for injection in mirror.injections:
            with contextlib.suppress(Exception):
                await self.runtime.remove(injection.vs, injection.subvs.name)
        for v in mirror.validations:
            with contextlib.suppress(Exception):
                await self.runtime.remove_validation(v.vs, v.host, v.token)

    # -- what status shows ------------------------------------------------------------------------

    async def view(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "node": self.node, "redis": self.storage.where, "connected": self.link.connected,
            "since": _iso(self.link.since), "last_error": self.link.last_error,
            "outages": self.link.outages, "answering": sorted(self._mirrored),
            "nodes": [], "locks": []}
        if self.link.connected:
            try:
                now = time.time()
                out["nodes"] = [{"name": n["name"], "pid": n.get("pid"),
                                 "seen_ago": round(now - float(n.get("seen", now)), 1)}
                                for n in await self.storage.nodes()]
                out["locks"] = await self.storage.locks()
            except OSError as exc:
                out["last_error"] = exc.strerror or str(exc)
        return out


def _stem(key: str) -> str:
    return key.rsplit("/", 1)[-1].removesuffix(".json")


def _iso(t: float) -> str:
    return dt.datetime.fromtimestamp(t, dt.UTC).isoformat(timespec="seconds")
