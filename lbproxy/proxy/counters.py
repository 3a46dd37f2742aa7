"""The data plane's counters, bumped on the hot path and added up only when read (stats.py):
per request `Traffic` (bytes, status codes, latency), per VS `Counters` (connections, limits, rule
hits, rate limits, compression), per real server `ServerStats` and per pool `TargetCounters`,
all kept across reloads by name or address.
"""

from __future__ import annotations

from collections import defaultdict
from typing import TYPE_CHECKING, Final

from .compress import CompressStats

if TYPE_CHECKING:
    from .connpool import ConnPool
    from .ratelimit import RateTable

# Latency histogram bounds (seconds), Prometheus' default buckets plus 100 us to 1 ms (a relayed
# request on a LAN takes a few hundred us; durations come from a ns clock): a request counts
# once, in the first bucket whose bound is at least its latency; the last slot is +Inf.
LATENCY_BUCKETS: Final = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1,
                          0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


def latency_slot(dt: float) -> int:
    """The histogram slot of a duration `dt` (seconds): the first bound >= dt (bisect_left's
    answer), len(LATENCY_BUCKETS) for +Inf. A loop, as most requests end in the first slots: in
    compiled code cheaper than a call to bisect with a boxed float."""
    i = 0
    for bound in LATENCY_BUCKETS:
        if dt <= bound:
            return i
        i += 1
    return i


RESPONSE_CLASSES: Final = ("1xx", "2xx", "3xx", "4xx", "5xx")
# The limits a request or connection can hit (see client.py for each one's answer).
LIMIT_KEYS: Final = ("bad_request", "head_timeout", "idle_timeout", "header_too_large",
              "too_many_headers", "body_too_large", "max_connections", "request_timeout",
              "upstream_timeout", "refused_by_rule", "body_timeout", "body_incomplete", "evicted",
              "rate_limited", "h2_protocol_error", "h2_rapid_reset", "h2_flood", "proxy_protocol")


class Traffic:
    """Plain counters bumped once per finished request: bytes, responses by exact status code
    (`codes`: stats() adds up the classes), latency.

    Each level holds only what no level below it counted, so the hot path bumps one object per
    figure; `stats.dataplane_stats()` adds them up at scrape time (VS = own + its SubVSs;
    SubVS = own + its real servers).
    """

    __slots__ = ("bytes_in", "bytes_out", "codes", "lat", "lat_sum")

    def __init__(self) -> None:
        self.bytes_in = 0
        self.bytes_out = 0
        self.codes: defaultdict[int, int] = defaultdict(int)  # as cheap as a list slot
        self.lat = [0] * (len(LATENCY_BUCKETS) + 1)
        self.lat_sum = 0.0


class Counters(Traffic):
    """Per-VS counters that live as long as the VS name (carried across reloads).

    Traffic here is what no SubVS took (bad requests, redirects, no rule matched, refused).
    """

    __slots__ = ("compressed", "connections", "limits", "rate_tables", "refused", "requests",
                 "rule_gens", "rule_hits")

    def __init__(self) -> None:
        super().__init__()
        self.connections = 0
        self.refused = 0
        self.requests = 0
        self.limits = dict.fromkeys(LIMIT_KEYS, 0)
        # Rule hits of older generations by rule name, and the live per-generation lists
        # (rule names, hits by rule index; the last slot counts "no rule matched").
        self.rule_hits: dict[str, int] = {}
        self.rule_gens: list[tuple[tuple[str, ...], list[int]]] = []
        # Rate limit tables by scope ("-": the VS's, else a SubVS's) and compression counters.
        self.rate_tables: dict[str, RateTable] = {}
        self.compressed = CompressStats()

    def new_rule_gen(self, names: tuple[str, ...]) -> list[int]:
        """A hit list for a new router; folds all but the two newest older lists into rule_hits
        (a generation being drained may still count for a while)."""
        hits = [0] * (len(names) + 1)
        gens = self.rule_gens
        while len(gens) > 2:
            old_names, old_hits = gens.pop(0)
            for name, n in zip(old_names, old_hits, strict=False):
                if n:
                    self.rule_hits[name] = self.rule_hits.get(name, 0) + n
        gens.append((names, hits))
        return hits

    def rule_totals(self) -> dict[str, int]:
        out = dict(self.rule_hits)
        for names, hits in self.rule_gens:
            for name, n in zip(names, hits, strict=False):
                out[name] = out.get(name, 0) + n
        return out


class ServerStats(Traffic):
    """One real server of one pool (VS, SubVS): its traffic, kept across reloads by address, and
    the connection pool of that address for the current generation.

    `bytes_in` counts the client bytes of the requests it served, `bytes_out` the response bytes
    relayed from it (head as sent + body, chunk framing excluded)."""

    __slots__ = ("address", "cp")

    def __init__(self, cp: ConnPool) -> None:
        super().__init__()
        self.cp = cp
        self.address = cp.address  # preformatted: names the real server in logs


class TargetCounters(Traffic):
    """Per-pool (VS, SubVS) counters across reloads: its "not available" answers and their
    traffic, and its real servers' `ServerStats` (what each real server took is counted there)."""

    __slots__ = ("not_available", "servers")

    def __init__(self) -> None:
        super().__init__()
        self.not_available = 0
        self.servers: dict[str, ServerStats] = {}
