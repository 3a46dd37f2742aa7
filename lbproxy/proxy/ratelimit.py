"""Rate limits per client address: a bounded table per configured limit (GCRA), and the gate a pool
checks before it takes a request (its limits, then the VS's compression offer).

The algorithm is GCRA (the generic cell rate algorithm, a token bucket written as one number per
address): each address has a theoretical arrival time `tat`; a request at `now` is let through when
`max(tat, now) + interval - now <= burst * interval`, and then `tat` moves to that sum. An address
that has been quiet for `burst * interval` is back where a new one starts, so its entry can be
forgotten at no cost.

Memory is bounded whatever the clients do: the table holds at most `table_size` entries, kept in
least-recently-seen order. A new address in a full table first drops quiet entries from the old end,
then, if none, the least recently seen entry (counted in `evictions`): a flood of spoofed or rotated
addresses can make the table forget a client it was limiting (that client gets a fresh burst), but
never grows the table and never refuses a client it has no entry for; an address that keeps
sending stays at the recent end and keeps its state. IPv6 addresses count by their /64 (by
default), so one host cannot rotate through its own subnet.

The clock is the data plane's (clock.py: monotonic), read once per request by the caller.
Each worker process keeps its own tables: with N workers a client whose connections land on
several of them can get up to N times the rate (documented in docs/config.md).
"""

from __future__ import annotations

import math
import socket
from collections import OrderedDict
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any, Protocol

from ..config.model import RateLimit
from .http import LocalResponse, error_response

if TYPE_CHECKING:
    from .compress import Offer, Policy

# How many quiet entries one insertion may drop from the old end of a table (amortised cleanup).
_SWEEP = 2


class RateTable:
    """One limit's state: `tat` by client key, least recently seen first, at most `size` entries."""

    __slots__ = ("evictions", "interval", "limited", "prefix", "size", "spec", "tat", "window")

    def __init__(self, spec: RateLimit) -> None:
        self.spec = spec
        self.interval = 1.0 / spec.rate
        # The burst's span, plus a hair so that float rounding never refuses its last request.
        burst = spec.burst or max(1, math.ceil(spec.rate))
        self.window = burst * self.interval * (1 + 1e-9)
        self.size = spec.table_size
        self.prefix = spec.ipv6_prefix
        self.tat: OrderedDict[str | int, float] = OrderedDict()
        self.limited = 0  # requests refused
        self.evictions = 0  # entries forgotten before they were quiet (table full)

    def key(self, addr: str) -> str | int:
        """The entry an address counts under: IPv4 as is, IPv6 by its prefix (as a number)."""
        if ":" not in addr:
            return addr
        if addr.startswith("::ffff:") and "." in addr:
            return addr[7:]  # IPv4-mapped
        try:
            packed = socket.inet_pton(socket.AF_INET6, addr.partition("%")[0])
        except OSError:
            return addr
        return int.from_bytes(packed, "big") >> (128 - self.prefix)

    def check(self, addr: str, now: float) -> float:
        """0.0 when a request from `addr` at `now` is within the limit (and is counted), else the
        seconds until it would be (the request is refused and not counted)."""
        key = self.key(addr)
        table = self.tat
        tat = table.get(key)
        if tat is None:
            # A new address: within its burst (burst >= 1) whatever the table holds.
            self._insert(key, now + self.interval, now)
            return 0.0
        if tat < now:
            tat = now
        new = tat + self.interval
        table.move_to_end(key)
        if new - now > self.window:
            self.limited += 1
            return new - now - self.window
        table[key] = new
        return 0.0

    def _insert(self, key: str | int, tat: float, now: float) -> None:
        table = self.tat
        if len(table) >= self.size:
            for _ in range(_SWEEP):
                oldest = next(iter(table.values()))
                if oldest > now:
                    break
                table.popitem(last=False)  # quiet: forgetting it changes nothing
            if len(table) >= self.size:
                table.popitem(last=False)
                self.evictions += 1
        table[key] = tat

    def stats(self) -> dict[str, int]:
        return {"limited": self.limited, "entries": len(self.tat), "evictions": self.evictions}


# 429 answers by their Retry-After (whole seconds): built on first use, a few per site.
_ANSWERS: dict[int, LocalResponse] = {}


def too_many(retry_after: float) -> LocalResponse:
    """The 429 answer (RFC 6585) telling the client to wait `retry_after` seconds (rounded up)."""
    secs = max(1, math.ceil(retry_after))
    resp = _ANSWERS.get(secs)
    if resp is None:
        base = error_response(429)
        resp = LocalResponse(429, base.body, "text/plain; charset=utf-8",
                             (("Retry-After", str(secs)),))
        if len(_ANSWERS) >= 256:
            _ANSWERS.clear()
        _ANSWERS[secs] = resp
    return resp


class PoolGate:
    """What a pool (VS or SubVS) checks before it takes a request, when its VS has a rate limit or
    compression or the SubVS a rate limit: the one attribute (`Target.gate`) the request path
    tests; None on a pool that has neither, which then does nothing more."""

    __slots__ = ("compress", "limits", "refusals")

    def __init__(self, limits: tuple[RateTable, ...], compress: Policy | None,
                 refusals: dict[str, int]) -> None:
        self.limits = limits
        self.compress = compress
        self.refusals = refusals  # the VS's limit_rejections (Counters.limits)

    def admit(self, src_ip: str, now: float) -> LocalResponse | None:
        """None if a request from `src_ip` at `now` passes every limit, else its 429 answer."""
        for table in self.limits:
            wait = table.check(src_ip, now)
            if wait:
                self.refusals["rate_limited"] += 1
                return too_many(wait)
        return None

    def offer(self, fwd: list[bytes]) -> Offer | None:
        """The response coding the request's head (`fwd`) allows, if the VS compresses."""
        c = self.compress
        return c.offer(fwd) if c is not None else None


class GatedTarget(Protocol):
    """A pool as `attach_gates` sees it (service.py's Target)."""

    name: str  # its SubVS's name, or "-" for the VS's own real servers
    gate: PoolGate | None


def table_for(old: RateTable | None, spec: RateLimit | None) -> RateTable | None:
    """The table of a limit for a new config generation: the old one while the spec holds (its
    state and counters survive a reload), else a new one (None: no limit)."""
    if spec is None:
        return None
    if old is not None and old.spec == spec:
        return old
    return RateTable(spec)


def attach_gates(targets: Iterable[GatedTarget], vs_limit: RateLimit | None,
                 sub_limits: dict[str, RateLimit | None], compress: Policy | None,
                 tables: dict[str, RateTable], refusals: dict[str, int]) -> None:
    """Give each of a VS's pools its gate: the VS's limit (scope "-"), the SubVS's own (scope: its
    name) and the VS's compression. `tables` (the VS's Counters.rate_tables, kept across reloads)
    is updated to the limits of this generation."""
    new: dict[str, RateTable] = {}
    vs_table = table_for(tables.get("-"), vs_limit)
    if vs_table is not None:
        new["-"] = vs_table
    for t in targets:
        limits: list[RateTable] = []
        if vs_table is not None:
            limits.append(vs_table)
        sub = table_for(tables.get(t.name), sub_limits.get(t.name)) if t.name != "-" else None
        if sub is not None:
            new[t.name] = sub
            limits.append(sub)
        if limits or compress is not None:
            t.gate = PoolGate(tuple(limits), compress, refusals)
    tables.clear()
    tables.update(new)


def rate_stats(tables: dict[str, RateTable]) -> dict[str, Any]:
    """Per scope ("-" = the VS's limit, else a SubVS's): requests refused, entries, evictions."""
    return {scope: t.stats() for scope, t in tables.items()}
