"""What a reload changes: the difference between two configs by name, as `lbproxy reload` and
`POST /api/reload` report it (pure; nothing here reads a file or the clock).

Virtual services and content rules are compared by name (added, removed, changed: the same name
with any setting different). Real servers are named "VS address" or "VS/SubVS address", one
entry per pool they are in, so the same address in two pools is two entries; "changed" is a
different weight or enabled flag (any other change shows on the VS or SubVS that holds it).
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping
from typing import Any

from .model import Config, RealServer, VirtualService


def server_name(vs: str, subvs: str, address: str) -> str:
    """How a real server of one pool is named in a diff and in log lines: "VS[/SubVS] address"."""
    return f"{vs}/{subvs} {address}" if subvs else f"{vs} {address}"


def _servers(vs: VirtualService) -> dict[str, RealServer]:
    out = {server_name(vs.name, "", str(rs.address)): rs for rs in vs.real_servers}
    for s in vs.subvs:
        out.update((server_name(vs.name, s.name, str(rs.address)), rs) for rs in s.real_servers)
    return out


def _by_name(old: Mapping[str, Hashable], new: Mapping[str, Hashable]) -> dict[str, list[str]]:
    return {
        "added": [n for n in new if n not in old],
        "removed": [n for n in old if n not in new],
        "changed": [n for n, v in new.items() if n in old and old[n] != v],
    }


def config_diff(old: Config, new: Config) -> dict[str, Any]:
    """{"virtual_services"|"rules"|"real_servers": {"added", "removed", "changed": [names]}},
    each list in the order of the config that has the names (`new`, or `old` for removals)."""
    old_servers: dict[str, tuple[int, bool]] = {}
    for vs in old.virtual_services:
        old_servers.update((k, (rs.weight, rs.enabled)) for k, rs in _servers(vs).items())
    new_servers: dict[str, tuple[int, bool]] = {}
    for vs in new.virtual_services:
        new_servers.update((k, (rs.weight, rs.enabled)) for k, rs in _servers(vs).items())
    return {
        "virtual_services": _by_name({v.name: v for v in old.virtual_services},
                                     {v.name: v for v in new.virtual_services}),
        "rules": _by_name({r.name: r for r in old.rules}, {r.name: r for r in new.rules}),
        "real_servers": _by_name(old_servers, new_servers),
    }


def diff_is_empty(diff: Mapping[str, Mapping[str, list[str]]]) -> bool:
    return not any(names for part in diff.values() for names in part.values())


def diff_summary(diff: Mapping[str, Mapping[str, list[str]]]) -> list[str]:
    """One line per part that changed, e.g. "virtual services: added shop; changed web"."""
    lines = []
    for part, label in (("virtual_services", "virtual services"), ("rules", "rules"),
                        ("real_servers", "real servers")):
        got = diff.get(part, {})
        bits = [f"{how} {', '.join(got[how])}" for how in ("added", "removed", "changed")
                if got.get(how)]
        if bits:
            lines.append(f"{label}: {'; '.join(bits)}")
    return lines
