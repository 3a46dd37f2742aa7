"""The JSON views of the admin API: pure builders that turn the configuration, the data plane's
stats, the certificate store and the TLS contexts into the dicts its routes answer with.

Nothing here knows of aiohttp or of a request: lbproxy.admin.api reads what a view needs from the
application and passes it in.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

from ..certs.store import CertStore, with_users
from ..config.model import Protocol, VirtualService, rule_order
from ..events import CertStatus
from ..proxy.tls import TLSContexts


def cert_view(store: CertStore, cert_id: str) -> dict[str, Any]:
    return with_users(store.require(cert_id), store.users(cert_id))


def _health_of(stats: Mapping[str, Any], vs: str, subvs: str | None) -> dict[str, Any]:
    """Real server entries by "host:port" from the data plane's stats (`DataPlane.stats()`:
    {vs: {"real_servers": [...], "subvs": {name: {"real_servers": [...]}}}}, each server a dict
    with "address" and "healthy"). Missing pieces give an empty mapping."""
    node: Any = _vs_stats(stats).get(vs)
    if subvs is not None:
        node = node.get("subvs", {}).get(subvs) if isinstance(node, dict) else None
    servers = node.get("real_servers") if isinstance(node, dict) else None
    if isinstance(servers, dict):
        return servers
    if isinstance(servers, list):
        return {str(s["address"]): s for s in servers
                if isinstance(s, dict) and "address" in s}
    return {}


def _vs_stats(stats: Mapping[str, Any]) -> Mapping[str, Any]:
    """The per-VS part of `DataPlane.stats()` ({"virtual_services": {...}}, or the per-VS
    mapping itself)."""
    vss = stats.get("virtual_services")
    return vss if isinstance(vss, Mapping) else stats


def vs_view(vs: VirtualService, *, injected_rules: set[str], tls: TLSContexts,
            stats: dict[str, Any]) -> dict[str, Any]:
    def servers(rs: Any, subvs: str | None) -> list[dict[str, Any]]:
        health = _health_of(stats, vs.name, subvs)
        return [{"address": str(r.address), "weight": r.weight, "enabled": r.enabled,
                 "health": health.get(str(r.address))} for r in rs]

    out: dict[str, Any] = {
        "name": vs.name, "listen": str(vs.listen), "protocol": vs.protocol.value,
        "kind": vs.kind.value, "content_switching": vs.content_switching,
        "scheduler": vs.scheduler.value, "real_servers": servers(vs.real_servers, None),
        "subvs": [{"name": s.name, "scheduler": s.scheduler.value, "rules": list(s.rules),
                   "real_servers": servers(s.real_servers, s.name),
                   "not_available_status": s.not_available.status}
                  for s in vs.subvs],
        "rules": [{"precedence": i + 1, "rule": rn, "subvs": sn, "injected": rn in injected_rules}
                  for i, (rn, sn) in enumerate(rule_order(vs))],
    }
    if vs.protocol is Protocol.HTTPS:
        out["tls"] = {"certificates": list(tls.serving(vs.name)),
                      "default_certificate": tls.choose(vs.name, None),
                      "ciphers": vs.tls.ciphers}
    return out


def _rs_status(r: Mapping[str, Any], key: str, rates: Mapping[str, float]) -> dict[str, Any]:
    enabled = r.get("enabled")
    # state: enabled | disabled | drain (run-time overrides, lbproxy.servercontrol); weight:
    # the effective one.
    state = r.get("state") or (None if enabled is None else
                               "enabled" if enabled else "disabled")
    return {"address": str(r.get("address", "")), "up": r.get("healthy"),
            "enabled": enabled, "state": state, "weight": r.get("weight"),
            "connections": r.get("active"),
            "requests": r.get("requests"), "requests_per_s": _rate(rates, key)}


def _rate(rates: Mapping[str, float], key: str) -> float | None:
    v = rates.get(key)
    return None if v is None else round(v, 3)


def _servers_status(stats: Mapping[str, Any], vs: str, subvs: str, configured: Sequence[Any],
                    rates: Mapping[str, float]) -> list[dict[str, Any]]:
    live = _health_of(stats, vs, subvs or None)
    rows = []
    for rs in configured:
        addr = str(rs.address)
        r = live.get(addr) or {"address": addr, "enabled": rs.enabled, "weight": rs.weight}
        rows.append(_rs_status(r, f"{vs}/{subvs}/{addr}", rates))
    return rows


def services_status(services: Sequence[VirtualService], stats: Mapping[str, Any],
                    rates: Mapping[str, float]) -> list[dict[str, Any]]:
    """Every VS as configured, with what the data plane says of it (missing stats: None)."""
    per_vs = _vs_stats(stats)
    out = []
    for vs in services:
        node = per_vs.get(vs.name)
        node = node if isinstance(node, Mapping) else {}
        conns = node.get("connections")
        conns = conns if isinstance(conns, Mapping) else {}
        subs = node.get("subvs")
        subs = subs if isinstance(subs, Mapping) else {}

        subvs_rows = []
        for s in vs.subvs:
            sn = subs.get(s.name)
            sn = sn if isinstance(sn, Mapping) else {}
            subvs_rows.append({
                "name": s.name, "available": sn.get("available"),
                "requests": sn.get("requests"), "not_available": sn.get("not_available"),
                "requests_per_s": _rate(rates, f"{vs.name}/{s.name}"),
                "real_servers": _servers_status(stats, vs.name, s.name, s.real_servers, rates)})
        out.append({
            "name": vs.name, "listen": node.get("listen") or str(vs.listen),
            "protocol": vs.protocol.value, "kind": vs.kind.value,
            "listening": bool(node.get("listening")), "connections": conns.get("active"),
            "requests": node.get("requests"), "requests_per_s": _rate(rates, vs.name),
            "subvs": subvs_rows,
            "real_servers": _servers_status(stats, vs.name, "", vs.real_servers, rates)})
    return out


def certificates_status(source: Callable[[], Iterable[CertStatus]] | None, store: CertStore,
                        now: dt.datetime) -> list[dict[str, Any]]:
    """Every certificate with its renewal schedule: from `source` (the Let's Encrypt manager's, see
    lbproxy.admin.api.CERT_STATUS_KEY) when there is one, else every certificate of `store` as
    imported."""
    if source is not None:
        return [c.to_json(now) for c in source()]
    return [CertStatus(id=i.id, names=tuple(i.names), managed_by=i.managed_by or "",
                       serial=f"{i.serial:x}", not_before=i.not_before, not_after=i.not_after,
                       state="imported", used_by=tuple(store.users(i.id))).to_json(now)
            for i in store.list()]
