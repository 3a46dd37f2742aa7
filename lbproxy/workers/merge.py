"""`merge_stats`: the `DataPlane.stats()` of N worker processes as one data plane's stats.

The result has the shape of `DataPlane.stats()` (so lbproxy.metrics, the admin API and `lbproxy
status` read it unchanged), as if one data plane had served everything:

- counters are summed: requests, bytes, responses by class (`responses`) and by exact status
  code (`codes`: {"200": n, ...}, code by code, in code order), connections (active, total,
  refused), rule hits, limit rejections, latency (`counts`, `sum`, `count` and the flat
  `latency_buckets`, `latency_sum`, `latency_count`), `not_available`, upstream pools (idle,
  connects), `draining_listeners` (listeners of every worker), and per real server `active`,
  `requests`, `failures`, bytes and responses;
- what describes config or state is taken from the first part that has it: `listen`,
  `protocol`, `kind`, the latency `buckets` bounds, and per real server `address`, `weight`,
  `enabled`, `healthy`, `down_reason`; except `listening` and `available`, true when true in
  any part (a VS listens if any worker accepts on it, a SubVS is available if any worker can
  send to it);
- a VS, SubVS, real server, rule, limit or upstream pool present in only some parts (a worker
  still on an older generation) is included; VSs and SubVSs keep the order of their first
  appearance, real servers (lists) are merged by `address` in the order of first appearance.

A key this module does not know is merged by what its values are: numbers summed, mappings key
by key, lists of numbers element by element, anything else taken from the first part. So a
counter added to `DataPlane.stats()` later is summed without a change here, but a new config or
state field that is a number must be added to the "first" keys of its level. Parts are not
modified; the result shares no mutable object with them. Put first the part whose config
should win (a worker on the current generation).
"""

from __future__ import annotations

import copy
import itertools
from collections.abc import Callable, Mapping, Sequence
from typing import Any

Merger = Callable[[list[Any]], Any]


# Counts are exactly int or float (bool, an int subclass, is a flag); scalars need no copy.
_NUMBERS = frozenset((int, float))
_SCALARS = frozenset((int, float, bool, str, type(None)))


def _is_number(v: Any) -> bool:
    return type(v) in _NUMBERS


def _first(values: list[Any]) -> Any:
    head = values[0]
    return head if type(head) in _SCALARS else copy.deepcopy(head)


def _any(values: list[Any]) -> bool:
    return any(bool(v) for v in values)


def _sum(values: list[Any]) -> Any:
    """The default: numbers summed, mappings merged key by key, lists of numbers summed element
    by element (a shorter list counts as zeros), anything else the first part's. Values of
    another kind than the first's (a shape mismatch) are ignored."""
    head = values[0]
    if type(head) in _NUMBERS:
        total = head
        for v in values[1:]:
            if type(v) in _NUMBERS:
                total += v
        return total
    if isinstance(head, Mapping):
        return _node({})([v for v in values if isinstance(v, Mapping)])
    if (isinstance(head, list) and all(_is_number(x) for x in head)
            and all(isinstance(v, list) and all(_is_number(x) for x in v) for v in values)):
        return [sum(col) for col in itertools.zip_longest(*values, fillvalue=0)]
    return _first(values)


def _node(rules: Mapping[str, Merger]) -> Merger:
    """Merges mappings key by key (keys in order of first appearance): a key's values, from the
    parts that have it, go to `rules[key]`, else to `_sum`."""
    def merge(values: list[Any]) -> dict[str, Any]:
        out: dict[str, Any] = {}
        keys: dict[Any, None] = {}
        for v in values:
            keys.update(dict.fromkeys(v))
        for k in keys:
            present = [v[k] for v in values if k in v]
            out[k] = rules.get(k, _sum)(present)
        return out
    return merge


def _keyed(item: Merger) -> Merger:
    """Merges mappings of name -> entry (VSs, SubVSs): every name of every part, each name's
    entries merged by `item`. An entry that is not a mapping is dropped."""
    def merge(values: list[Any]) -> dict[str, Any]:
        out: dict[str, Any] = {}
        groups: dict[Any, list[Mapping[str, Any]]] = {}
        for v in values:
            if not isinstance(v, Mapping):
                continue
            for name, entry in v.items():
                if isinstance(entry, Mapping):
                    groups.setdefault(name, []).append(entry)
        for name, entries in groups.items():
            out[name] = item(entries)
        return out
    return merge


def _by_address(item: Merger) -> Merger:
    """Merges lists of real servers by their "address", in the order of first appearance; an
    entry without an address cannot be matched and is kept as it is."""
    def merge(values: list[Any]) -> list[Any]:
        groups: dict[Any, list[Mapping[str, Any]]] = {}
        order: list[Any] = []  # an address, or the unmatched entry itself
        for v in values:
            if not isinstance(v, list):
                continue
            for entry in v:
                if isinstance(entry, Mapping) and "address" in entry:
                    addr = entry["address"]
                    if addr not in groups:
                        groups[addr] = []
                        order.append(("address", addr))
                    groups[addr].append(entry)
                else:
                    order.append(("as is", entry))
        return [item(groups[x]) if how == "address" else copy.deepcopy(x) for how, x in order]
    return merge


def _codes(values: list[Any]) -> dict[str, Any]:
    """Responses by status code ({"404": n}): summed code by code, in code order as stats()
    gives them (a code only one part saw comes where it belongs, not last)."""
    merged = _sum(values)
    if not isinstance(merged, dict):
        return {}
    return dict(sorted(merged.items(), key=lambda kv: (len(kv[0]), kv[0])))


# The latency histogram: the bounds are config (the same constant in every part), the rest sums.
_LATENCY = _node({"buckets": _first})
_REAL_SERVER = _node({"address": _first, "weight": _first, "enabled": _first,
                      "healthy": _first, "down_reason": _first, "latency": _LATENCY,
                      "codes": _codes})
_SERVERS = _by_address(_REAL_SERVER)
_SUBVS = _node({"available": _any, "real_servers": _SERVERS, "latency": _LATENCY,
                "codes": _codes})
_VS = _node({"listen": _first, "protocol": _first, "kind": _first, "listening": _any,
             "subvs": _keyed(_SUBVS), "real_servers": _SERVERS, "latency": _LATENCY,
             "codes": _codes})
_STATS = _node({"virtual_services": _keyed(_VS), "upstream_pools": _keyed(_node({}))})


def merge_stats(parts: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """The stats of all `parts` (each a `DataPlane.stats()`) as one data plane's; no parts:
    the stats of a data plane with nothing configured."""
    if not parts:
        return {"virtual_services": {}, "draining_listeners": 0, "upstream_pools": {}}
    out: dict[str, Any] = _STATS(list(parts))
    return out
