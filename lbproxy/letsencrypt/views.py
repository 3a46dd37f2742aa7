"""What the admin API, the status page, the metrics and the expiry check show of the Let's Encrypt
certificates: read-only functions of the state, the certificate store and the schedule."""

from __future__ import annotations

import dataclasses
import datetime as dt
from collections.abc import Container
from typing import Any

from acmeclient.challenges import DNS01, TLS_ALPN01

from ..certs.store import CertStore
from ..events import CertStatus
from ..runtime import RuntimeStore
from . import policy
from .challenge import eligible_services, ineligibility
from .codes import LeError
from .model import MANAGED_BY, Entry
from .solvers import Solvers, verify_alpn_vs
from .state import LeState
from .storage import STATE_FILES


class Views:
    """Read-only views; `running` holds the ids whose order is in progress; `solvers` tells what
    a dns-01 order publishes."""

    def __init__(self, state: LeState, store: CertStore, runtime: RuntimeStore,
                 running: Container[str], solvers: Solvers) -> None:
        self.state = state
        self.store = store
        self.runtime = runtime
        self.running = running
        self.solvers = solvers

    def _vs_label(self, vs: str, challenge: str = "http-01") -> str:
        config = self.runtime.current.config
        if challenge == "tls-alpn-01":
            try:
                verify_alpn_vs(config, vs, known_before=False)
            except LeError:
                return "Unknown VS"
            return vs
        if challenge == "dns-01":
            return "(dns-01: none)"
        vs_obj = config.vs_by_name(vs)
        return vs if vs_obj is not None and ineligibility(vs_obj) is None else "Unknown VS"

    def _schedule(self, e: Entry, validity: policy.Validity | None,
                  now: dt.datetime) -> tuple[policy.RenewalState, dt.datetime | None]:
        period = self.state.settings.renew_period_days
        state = policy.state_at(now, validity, period, e.ari, e.failures, e.id in self.running)
        nxt = policy.next_attempt(now, validity, period, e.ari, e.failures,
                                  jitter=e.jitter) if e.auto_renew else None
        return state, nxt

    def validating(self, e: Entry) -> list[dict[str, str]]:
        """The challenges of `e` answered now, each {"challenge", "name", "where"}: http-01 a
        SubVS injected into the name's VS, tls-alpn-01 a validation certificate served by it,
        dns-01 a TXT record the provider publishes (each place once); [] between orders and
        before the CA's challenges are known."""
        t, rt = e.template, self.runtime.current
        out: list[dict[str, str]] = []
        if t.challenge == DNS01:
            out.extend({"challenge": DNS01, "name": host, "where": f"TXT record {record}"}
                       for host, record in self.solvers.dns01_answers(e.id))
        elif t.challenge == TLS_ALPN01:
            out.extend({"challenge": TLS_ALPN01, "name": name,
                        "where": f"tls-alpn-01 certificate on VS {vs}"}
                       for name, vs in t.routes
                       if any(v.vs == vs and v.host == name for v in rt.validations))
        else:
            out.extend({"challenge": t.challenge, "name": name,
                        "where": f"SubVS {i.subvs.name} on VS {vs}"}
                       for name, vs in t.routes for i in rt.injections
                       if i.vs == vs and i.host == name.lower().rstrip("."))
        return [dict(d) for d in dict.fromkeys(tuple(d.items()) for d in out)]

    def view(self, cert_id: str, now: dt.datetime) -> dict[str, Any]:
        e = self.state.entry(cert_id)
        info = self.store.get(cert_id)
        validity = policy.Validity(info.not_before, info.not_after) if info else None
        state, nxt = self._schedule(e, validity, now)
        return {
            "id": cert_id,
            "common_name": e.template.common_name,
            "names": e.template.names,
            "sans": [{"name": n, "vs": v} for n, v in e.template.sans],
            "challenge": e.template.challenge,
            "http_challenge_vs": [f"{n}: {self._vs_label(v, e.template.challenge)}"
                                  for n, v in e.template.routes],
            "key_type": e.template.key_type,
            "key_size": e.template.key_size if e.template.key_type == "rsa" else 256,
            "status": state.value,
            "source": e.source,
            "auto_renew": e.auto_renew,
            "serial": f"{info.serial:x}" if info else "",
            "not_before": info.not_before.isoformat() if info else "",
            "not_after": info.not_after.isoformat() if info else "",
            "in_use_by": list(self.store.users(cert_id)) if info else [],
            "last_error": e.last_error,
            "last_code": e.last_code,
            "last_subcode": e.last_subcode,
            "failures": e.failures.count,
            "next_attempt": nxt.isoformat() if nxt else "",
            "ari_window": None if e.ari is None else [e.ari.start.isoformat(),
                                                       e.ari.end.isoformat()],
            "renewals": e.renewals,
            "validating": self.validating(e),
        }

    def list_view(self, now: dt.datetime) -> list[dict[str, Any]]:
        return [self.view(i, now) for i in sorted(self.state.entries)]

    def cert_statuses(self, now: dt.datetime) -> list[CertStatus]:
        """Every certificate of the store and every managed one not yet issued, with its
        renewal schedule and last error (for status, metrics and the expiry check)."""
        entries, damaged = self.state.entries, self.state.damaged
        out: list[CertStatus] = []
        seen: set[str] = set()
        for info in self.store.list():
            seen.add(info.id)
            e = entries.get(info.id)
            base = CertStatus(id=info.id, names=tuple(info.names),
                              managed_by=info.managed_by or "", serial=f"{info.serial:x}",
                              not_before=info.not_before, not_after=info.not_after,
                              state="imported", used_by=tuple(self.store.users(info.id)))
            out.append(base if e is None else self._status(e, base, now))
        for cid in sorted(set(damaged) - set(entries) - seen):
            if cid in STATE_FILES:
                continue
            out.append(CertStatus(id=cid, names=(), managed_by=MANAGED_BY, state="damaged",
                                  auto_renew=False, last_error=damaged[cid]))
        for cid, what in sorted(self.store.problems.items()):
            if cid not in seen and cid not in entries and cid not in damaged:
                out.append(CertStatus(id=cid, names=(), state="damaged", last_error=what))
        for cid in sorted(entries):
            if cid not in seen:
                e = entries[cid]
                out.append(self._status(e, CertStatus(id=cid, names=tuple(e.template.names),
                                                      managed_by=MANAGED_BY), now))
        return out

    def _status(self, e: Entry, base: CertStatus, now: dt.datetime) -> CertStatus:
        validity = (policy.Validity(base.not_before, base.not_after)
                    if base.not_before and base.not_after else None)
        state, nxt = self._schedule(e, validity, now)
        return dataclasses.replace(
            base, managed_by=MANAGED_BY, state=state.value, auto_renew=e.auto_renew,
            next_attempt=nxt, last_success=e.issued, failures=e.failures.count,
            last_error=e.last_error, last_code=e.last_code,
            ari_start=e.ari.start if e.ari else None, ari_end=e.ari.end if e.ari else None,
            renewals=e.renewals)

    def eligible_vs(self) -> list[dict[str, Any]]:
        return [{"name": vs.name, "protocol": vs.protocol.value, "listen": str(vs.listen)}
                for vs in eligible_services(self.runtime.current.config)]
