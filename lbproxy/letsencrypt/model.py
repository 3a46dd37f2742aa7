"""The values of the Let's Encrypt feature and their JSON codecs: settings, a certificate's order
template, a managed certificate (template + renewal status), the account, an issued certificate."""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from acmeclient import CsrSubject, KeyType
from acmeclient.crypto import PrivateKey

from ..config.model import CertificateRequest, Config, LetsEncryptSettings
from . import policy

MANAGED_BY = "letsencrypt"

Clock = Callable[[], dt.datetime]
Jitter = Callable[[], float]   # a value in [0, 1): where in an ARI window a renewal starts


def utcnow() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def dump(obj: Any) -> bytes:
    """The JSON of a state file: stable (sorted keys), one line and a trailing newline. Not
    indented: `indent` switches json to its pure-Python encoder, 5x slower, and an entry is
    written at every order (`jq . FILE` shows it indented)."""
    return json.dumps(obj, sort_keys=True, separators=(", ", ": ")).encode() + b"\n"


@dataclass(frozen=True, slots=True)
class Settings:
    directory_url: str
    ca_bundle: str
    email: str
    renew_period_days: int

    @classmethod
    def from_config(cls, le: LetsEncryptSettings) -> Settings:
        return cls(le.directory_url, le.ca_bundle, le.email,
                   policy.clamp_period(le.renew_period_days))

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> Settings:
        return cls(str(d["directory_url"]), str(d.get("ca_bundle", "")), str(d.get("email", "")),
                   policy.clamp_period(int(d.get("renew_period_days", 30))))


@dataclass(frozen=True, slots=True)
class Template:
    """A certificate's order template: reused by every renewal, the challenge type included
    (http-01, tls-alpn-01 or dns-01: solvers.py). A name's VS is "" when none is named, which
    only dns-01 allows (solvers.needs_vs); the JSON keeps it as "vs": ""."""

    common_name: str
    vs: str = ""
    sans: tuple[tuple[str, str], ...] = ()
    key_type: str = "ec"
    key_size: int = 2048
    country: str = ""
    state: str = ""
    city: str = ""
    company: str = ""
    unit: str = ""
    email: str = ""
    challenge: str = "http-01"

    @property
    def routes(self) -> tuple[tuple[str, str], ...]:
        """(name, VS) for the common name and every SAN, in order (VS "": none, dns-01)."""
        return ((self.common_name, self.vs), *self.sans)

    @property
    def names(self) -> list[str]:
        return [n for n, _ in self.routes]

    @property
    def acme_key_type(self) -> KeyType:
        if self.key_type == "ec":
            return KeyType.EC_P256
        return KeyType(f"rsa-{self.key_size}")

    def subject(self) -> CsrSubject:
        return CsrSubject(
            common_name=self.common_name, country=self.country or None,
            state=self.state or None, locality=self.city or None,
            organization=self.company or None, organizational_unit=self.unit or None,
            email=self.email or None)

    def normalized(self) -> Template:
        """Names in lower case, the country code in upper case (as requests are stored)."""
        return dataclasses.replace(
            self, common_name=self.common_name.lower(),
            sans=tuple((n.lower(), v) for n, v in self.sans), country=self.country.upper(),
            challenge=self.challenge.lower())

    @classmethod
    def from_request(cls, r: CertificateRequest) -> Template:
        return cls(r.common_name, r.vs, r.sans, r.key_type, r.key_size, r.country, r.state,
                   r.city, r.company, r.unit, r.email,
                   str(getattr(r, "challenge", "") or "http-01"))

    def to_json(self) -> dict[str, Any]:
        # (field by field: dataclasses.asdict deep-copies, 4x slower; written at every order)
        out: dict[str, Any] = {"common_name": self.common_name, "vs": self.vs,
                               "sans": [{"name": n, "vs": v} for n, v in self.sans],
                               "key_type": self.key_type, "key_size": self.key_size,
                               "country": self.country, "state": self.state,
                               "city": self.city, "company": self.company,
                               "unit": self.unit, "email": self.email,
                               "challenge": self.challenge}
        return out

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> Template:
        sans = tuple((str(s["name"]), str(s["vs"])) for s in d.get("sans", []))
        subject = {k: str(d.get(k, "")) for k in (
            "country", "state", "city", "company", "unit", "email")}
        return cls(str(d["common_name"]), str(d["vs"]), sans, str(d.get("key_type", "ec")),
                   int(d.get("key_size", 2048)), **subject,
                   # absent in entries stored before the field: http-01
                   challenge=str(d.get("challenge") or "http-01"))


@dataclass(slots=True)
class Entry:
    """One managed certificate: template, where it came from, and its renewal status."""

    id: str
    template: Template
    source: str = "api"            # "api" | "config"; "config" ones stop when removed
    auto_renew: bool = True
    failures: policy.Failures = field(default_factory=policy.Failures)
    last_error: str = ""
    last_code: int | None = None
    last_subcode: int | None = None
    ari: policy.AriWindow | None = None
    ari_checked: dt.datetime | None = None
    issued: dt.datetime | None = None
    renewals: int = 0
    jitter: float = 0.5             # the manager draws it from its jitter source
    vs_seen: tuple[str, ...] = ()   # VSs that existed when they were stored (17.1 vs 17.2)

    def see_vs(self, config: Config) -> None:
        """Add to `vs_seen` the template's VSs that exist in `config`."""
        self.vs_seen = tuple(sorted(set(self.vs_seen) | {
            vs for _, vs in self.template.routes if config.vs_by_name(vs)}))

    def to_json(self) -> dict[str, Any]:
        def t(v: dt.datetime | None) -> str | None:
            return v.isoformat() if v else None
        return {
            "id": self.id, "template": self.template.to_json(), "source": self.source,
            "auto_renew": self.auto_renew,
            "failures": {"count": self.failures.count, "last_at": t(self.failures.last_at),
                         "retry_at": t(self.failures.retry_at)},
            "last_error": self.last_error, "last_code": self.last_code,
            "last_subcode": self.last_subcode,
            "ari": None if self.ari is None else {
                "start": self.ari.start.isoformat(), "end": self.ari.end.isoformat(),
                "retry_after": self.ari.retry_after},
            "ari_checked": t(self.ari_checked), "issued": t(self.issued),
            "renewals": self.renewals, "jitter": self.jitter, "vs_seen": list(self.vs_seen),
        }

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> Entry:
        def t(v: Any) -> dt.datetime | None:
            return dt.datetime.fromisoformat(v) if v else None
        f = d.get("failures") or {}
        a = d.get("ari")
        return cls(
            id=str(d["id"]), template=Template.from_json(d["template"]),
            source=str(d.get("source", "api")), auto_renew=bool(d.get("auto_renew", True)),
            failures=policy.Failures(int(f.get("count", 0)), t(f.get("last_at")),
                                     t(f.get("retry_at"))),
            last_error=str(d.get("last_error", "")), last_code=d.get("last_code"),
            last_subcode=d.get("last_subcode"),
            ari=None if not a else policy.AriWindow(
                dt.datetime.fromisoformat(a["start"]), dt.datetime.fromisoformat(a["end"]),
                a.get("retry_after")),
            ari_checked=t(d.get("ari_checked")), issued=t(d.get("issued")),
            renewals=int(d.get("renewals", 0)), jitter=float(d.get("jitter", 0.5)),
            vs_seen=tuple(d.get("vs_seen", ())),
        )


@dataclass(frozen=True, slots=True)
class Account:
    url: str
    email: str
    key: PrivateKey


@dataclass(frozen=True, slots=True)
class Issued:
    """A certificate as the holder that ordered it stored it for every other holder: the chain
    and its key, PEM (the storage keeps it private: 0600 files in the state directory)."""

    chain_pem: bytes
    key_pem: bytes

    def to_bytes(self) -> bytes:
        # Compact (json's C encoder; `dump`'s indented layout is 3x slower): escaped PEM is not
        # for reading, and this is written at every order.
        return json.dumps({"chain_pem": self.chain_pem.decode(),
                           "key_pem": self.key_pem.decode()}, sort_keys=True).encode() + b"\n"

    @classmethod
    def from_bytes(cls, data: bytes) -> Issued:
        d = json.loads(data)
        if not isinstance(d, dict):
            raise ValueError("not a JSON object")
        return cls(str(d["chain_pem"]).encode(), str(d["key_pem"]).encode())
