"""Real-server pools and their schedulers: which backend takes the next request (sans-I/O).

A `Balancer` is built once per pool (a VS without SubVSs, or a SubVS) per config generation. The
data plane calls `pick()` once per request (exchange.py, `Exchange._serve`) and `release()` exactly
once when that request is done (`ClientState._release`); the health monitor (health.py) flips
`Backend.healthy`. Nothing here awaits, sleeps or reads a clock.

Hot reload: `Balancer(servers, scheduler, previous=old)` *adopts* the `Backend` objects of `old`
whose address is still configured. The very same objects continue, so health state, the in-flight
count (`active`, decremented later by requests picked under the old generation) and the counters
carry over without a copy that could go stale; only `weight` and `enabled` are updated in place from
the new config. Run-time overrides (lbproxy.servercontrol: enable, disable, drain, weight) are laid
over the config by `administer()` after every build. Hence: build a fresh Balancer (with
`previous=`) for every generation you switch to, rollbacks included, and don't keep picking from
a balancer that has been superseded for long.
"""

from __future__ import annotations

import array
import hashlib
import logging
import math
import zlib
from collections.abc import Callable, Mapping, Sequence
from typing import Final

from ..config.model import Address, RealServer, Scheduler

logger = logging.getLogger(__name__)

_MASK64: Final = (1 << 64) - 1
# 2**53: the top 53 bits of a 64-bit hash map exactly onto the mantissa of a float in (0, 1).
_FLOAT_SCALE: Final = float(1 << 53)
# Hash slots per pool: slot counts are binomial, so with 2**13 slots a server of a 16-server pool
# gets its weight's share with a standard deviation of 4% (2% with 4 servers), for a 64 KiB table
# per hash-scheduled pool.
_SLOT_BITS: Final = 13
_SLOTS: Final = 1 << _SLOT_BITS
_SLOT_SHIFT: Final = 32 - _SLOT_BITS
# Knuth's multiplicative (Fibonacci) hashing: 2**32 / golden ratio spreads crc32's top bits.
_FIBONACCI32: Final = 0x9E3779B1
_SLOT_SALT: Final = 0x5EED_5107


def _hash64(data: str) -> int:
    """A 64-bit hash that is the same in every process and host (unlike `hash()`, which is salted
    per process), so that N workers and N hosts rank servers alike (crc32 for keys, likewise)."""
    return int.from_bytes(hashlib.blake2b(data.encode(), digest_size=8).digest(), "little")


def _mix64(x: int) -> int:
    """splitmix64's finaliser: a cheap bijective scrambler, so key ^ seed scores independently."""
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


class Backend:
    """One real server of one pool, with the run-time state the data plane and health checks share.

    `healthy` starts True. A pool with a health check keeps sending traffic to a new server until
    its first probe answers; that first answer alone decides (one failure marks it down, see
    `health.HealthState`), after which the rise/fall counts apply. This avoids 503s at start-up
    and on reload while a dead server is found within one probe timeout.
    """

    __slots__ = ("_cw", "_seed", "active", "address", "checked", "down_reason", "enabled",
                 "failures", "healthy", "requests", "state", "weight")

    def __init__(self, address: Address, weight: int = 1, enabled: bool = True) -> None:
        self.address = address
        self.weight = weight
        self.enabled = enabled
        # "enabled", "disabled" or "drain" (a run-time override; see administer()): `enabled`
        # is True exactly when it is "enabled".
        self.state = "enabled" if enabled else "disabled"
        self.healthy = True
        # True once a health check has reported on this server (see HealthState.provisional).
        self.checked = False
        # Why the last health check failed; "" while healthy.
        self.down_reason = ""
        self.active = 0
        self.requests = 0
        self.failures = 0
        self._cw = 0  # smooth weighted round robin's current weight
        self._seed = _hash64(str(address))

    def available(self) -> bool:
        """May take a new request: enabled, healthy and with a weight above zero."""
        return self.enabled and self.healthy and self.weight > 0

    def __repr__(self) -> str:
        state = "up" if self.healthy else "down"
        return (f"<Backend {self.address} w={self.weight} {state}"
                f"{'' if self.enabled else ' ' + self.state} active={self.active}>")


_Chooser = Callable[[str, str, Backend | None], Backend | None]


class Balancer:
    """A pool of backends and the scheduler that picks among the available ones."""

    __slots__ = ("_choose", "_rr", "_top", "backends", "scheduler")

    def __init__(self, servers: Sequence[RealServer], scheduler: Scheduler,
                 previous: Balancer | None = None) -> None:
        self.scheduler = scheduler
        old: dict[Address, Backend] = {}
        if previous is not None:
            old = {b.address: b for b in previous.backends}
        backends = []
        for s in servers:
            b = old.pop(s.address, None)
            if b is None:
                b = Backend(s.address, s.weight, s.enabled)
            else:
                b.weight = s.weight
                b.enabled = s.enabled
                b.state = "enabled" if s.enabled else "disabled"
            backends.append(b)
        self.backends: tuple[Backend, ...] = tuple(backends)
        self._rr = 0  # rr's next index; where lc starts its scan, so that ties take turns
        # The hash schedulers' per-slot top two backend indices, filled on first use (-1: not yet).
        self._top: array.array[int] | None = None
        choosers: dict[Scheduler, _Chooser] = {
            Scheduler.ROUND_ROBIN: self._round_robin,
            Scheduler.WEIGHTED_ROUND_ROBIN: self._weighted_round_robin,
            Scheduler.LEAST_CONNECTIONS: self._least_connections,
            Scheduler.WEIGHTED_LEAST_CONNECTIONS: self._weighted_least_connections,
            Scheduler.SOURCE_IP_HASH: self._source_hash,
            Scheduler.URL_HASH: self._url_hash,
        }
        # _choose(src_ip, url, exclude): the scheduler's pick, which pick() counts. Every
        # scheduler picks the only server of a pool of one, if it is available.
        self._choose = self._only if len(backends) == 1 else choosers[scheduler]

    # -- the data plane's interface ---------------------------------------------------------

    def pick(self, src_ip: str, url: str, exclude: Backend | None = None) -> Backend | None:
        """The backend for a new request, or None when none is available (answer "not available").

        `exclude` (a backend that just failed, for a retry) is never returned: with it the only
        available backend, the answer is None. The chosen backend's `active` and `requests` grow
        by one; call `release()` exactly once when the request is over.
        """
        b = self._choose(src_ip, url, exclude)
        if b is not None:
            b.active += 1
            b.requests += 1
        return b

    def release(self, b: Backend, ok: bool = True) -> None:
        """A request picked from this pool is finished; `ok=False` counts it in `failures`."""
        if not ok:
            b.failures += 1
        if b.active > 0:
            b.active -= 1
        else:
            logger.error("release() without a matching pick() for real server %s", b.address)

    def any_available(self) -> bool:
        for b in self.backends:
            if b.enabled and b.healthy and b.weight > 0:
                return True
        return False

    def reweighed(self) -> None:
        """Call after changing a live Backend's `weight` (not needed for enabled/healthy, nor for
        weight 0, which always stops new requests): the hash schedulers rank by weight once per
        slot and keep that ranking. The other schedulers read weights on every pick."""
        self._top = None

    def administer(self, configured: Sequence[RealServer],
                   overrides: Mapping[str, tuple[str, int]]) -> None:
        """Give each backend its run-time (state, weight) from `overrides` (by address text), or
        the config's (`configured`: the servers this pool was built from) when it has none.
        A state other than "enabled" takes no new requests; requests in flight are untouched."""
        by_address = {str(s.address): s for s in configured}
        reweigh = False
        for b in self.backends:
            addr = str(b.address)
            setting = overrides.get(addr)
            if setting is None:
                s = by_address.get(addr)
                if s is None:
                    continue
                setting = ("enabled" if s.enabled else "disabled", s.weight)
            state, weight = setting
            b.state = state
            b.enabled = state == "enabled"
            if b.weight != weight:
                b.weight = weight
                reweigh = True
        if reweigh:
            self.reweighed()

    def find(self, address: Address) -> Backend | None:
        for b in self.backends:
            if b.address == address:
                return b
        return None

    # -- schedulers: each returns an available backend other than `exclude`, or None ----------

    def _only(self, src_ip: str, url: str, exclude: Backend | None) -> Backend | None:
        b = self.backends[0]
        if b.enabled and b.healthy and b.weight > 0 and b is not exclude:
            return b
        return None

    def _round_robin(self, src_ip: str, url: str, exclude: Backend | None) -> Backend | None:
        backends = self.backends
        n = len(backends)
        i = self._rr
        for _ in range(n):
            if i >= n:
                i = 0
            b = backends[i]
            i += 1
            if b.enabled and b.healthy and b.weight > 0 and b is not exclude:
                self._rr = i
                return b
        return None

    def _weighted_round_robin(self, src_ip: str, url: str,
                              exclude: Backend | None) -> Backend | None:
        # nginx's smooth weighted round robin: from a fresh start, every sum(weights) picks choose
        # each backend exactly `weight` times, interleaved (5,1,1: aabacaa, not aaaaabc).
        best = None
        total = 0
        for b in self.backends:
            if b.enabled and b.healthy and b.weight > 0 and b is not exclude:
                b._cw += b.weight
                total += b.weight
                if best is None or b._cw > best._cw:
                    best = b
        if best is not None:
            best._cw -= total
        return best

    def _least_connections(self, src_ip: str, url: str,
                           exclude: Backend | None) -> Backend | None:
        # Fewest in-flight requests; equal servers take turns (the rr cursor starts the scan).
        backends = self.backends
        n = len(backends)
        best = None
        i = self._rr
        for _ in range(n):
            if i >= n:
                i = 0
            b = backends[i]
            i += 1
            if (b.enabled and b.healthy and b.weight > 0 and b is not exclude
                    and (best is None or b.active < best.active)):
                best = b
        if best is not None:
            self._rr = backends.index(best) + 1
        return best

    def _weighted_least_connections(self, src_ip: str, url: str,
                                    exclude: Backend | None) -> Backend | None:
        # Least active/weight (compared as active_a * w_b < active_b * w_a, no division); among the
        # tied, smooth weighted round robin, so an idle pool still shares by weight (like nginx).
        best = None
        for b in self.backends:
            if (b.enabled and b.healthy and b.weight > 0 and b is not exclude
                    and (best is None or b.active * best.weight < best.active * b.weight)):
                best = b
        if best is None:
            return None
        ba, bw = best.active, best.weight
        total = 0
        chosen = best
        for b in self.backends:
            if (b.enabled and b.healthy and b.weight > 0 and b is not exclude
                    and b.active * bw == ba * b.weight):
                b._cw += b.weight
                total += b.weight
                if b._cw > chosen._cw:
                    chosen = b
        chosen._cw -= total
        return chosen

    # Hashes: a key (client IP or URL path) falls into one of _SLOTS slots; each slot ranks all
    # backends by weighted rendezvous (highest random weight) hashing and goes to the first
    # available one. A backend going down moves only the slots it held, spread over the others
    # by their second choice; coming back it takes exactly those back. The score
    # -weight / ln(u), u uniform in (0, 1), gives each backend a share proportional to its weight
    # (Schindelhauer & Schomaker, "Weighted distributed hash tables", 2005). Each slot's top two
    # are computed on first use and kept, so a pick costs one crc32 and one or two lookups; the
    # full ranking is only walked for a slot whose top two are both unavailable.

    def _slot_score(self, slot_key: int, b: Backend) -> float:
        u = ((_mix64(slot_key ^ b._seed) >> 11) + 0.5) / _FLOAT_SCALE
        return -b.weight / math.log(u)

    def _hashed(self, key: str, exclude: Backend | None) -> Backend | None:
        backends = self.backends
        if not backends:
            return None
        h = zlib.crc32(key.encode("utf-8", "surrogatepass"))
        slot = ((h * _FIBONACCI32) & 0xFFFFFFFF) >> _SLOT_SHIFT
        top = self._top
        if top is None:
            top = self._top = array.array("i", [-1]) * (2 * _SLOTS)
        i = top[2 * slot]
        if i < 0:
            self._rank_slot(slot, top)
            i = top[2 * slot]
        b = backends[i]
        if b.enabled and b.healthy and b.weight > 0 and b is not exclude:
            return b
        i = top[2 * slot + 1]
        if i >= 0:
            b = backends[i]
            if b.enabled and b.healthy and b.weight > 0 and b is not exclude:
                return b
        return self._walk_slot(slot, exclude)

    def _rank_slot(self, slot: int, top: array.array[int]) -> None:
        slot_key = _mix64(slot + _SLOT_SALT)
        first, second = -1, -1
        s1 = s2 = -1.0
        for i, b in enumerate(self.backends):
            score = self._slot_score(slot_key, b)
            if score > s1:
                first, second, s1, s2 = i, first, score, s1
            elif score > s2:
                second, s2 = i, score
        top[2 * slot] = first
        top[2 * slot + 1] = second

    def _walk_slot(self, slot: int, exclude: Backend | None) -> Backend | None:
        slot_key = _mix64(slot + _SLOT_SALT)
        best = None
        best_score = 0.0
        for b in self.backends:
            if b.enabled and b.healthy and b.weight > 0 and b is not exclude:
                score = self._slot_score(slot_key, b)
                if best is None or score > best_score:
                    best, best_score = b, score
        return best

    def _source_hash(self, src_ip: str, url: str, exclude: Backend | None) -> Backend | None:
        return self._hashed(src_ip, exclude)

    def _url_hash(self, src_ip: str, url: str, exclude: Backend | None) -> Backend | None:
        q = url.find("?")
        return self._hashed(url if q < 0 else url[:q], exclude)
