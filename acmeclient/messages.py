"""ACME wire objects (RFC 8555 §7.1, RFC 9773, profiles draft): frozen values, from_json/to_json.

Parsing happens here, at the boundary: a from_json that meets a missing or mistyped field raises
MalformedResponseError naming it, so nothing past this module sees raw JSON. The problem document
(`Problem`, `Identifier`) and the field readers are in acmeclient.errors, which carries them.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from acmeclient.errors import (
    Identifier,
    MalformedResponseError,
    Problem,
    json_object,
    optional,
    required,
)

JSON = dict[str, Any]


class Status(enum.StrEnum):
    """Every status value of RFC 8555 §7.1.6."""

    PENDING = "pending"
    READY = "ready"
    PROCESSING = "processing"
    VALID = "valid"
    INVALID = "invalid"
    REVOKED = "revoked"
    DEACTIVATED = "deactivated"
    EXPIRED = "expired"


def _status(obj: Mapping[str, Any], what: str) -> Status:
    raw = required(obj, "status", str, what)
    try:
        return Status(raw)
    except ValueError:
        raise MalformedResponseError(f"{what}: unknown status {raw!r}") from None


def parse_time(value: str, what: str = "timestamp") -> datetime:
    """Parse an RFC 3339 timestamp (Go emits nanoseconds; Python takes microseconds)."""
    text = value.strip()
    if text.endswith(("Z", "z")):
        text = text[:-1] + "+00:00"
    if "." in text:
        head, _, rest = text.partition(".")
        digits = rest[: len(rest) - len(rest.lstrip("0123456789"))]
        tail = rest[len(digits) :]
        text = f"{head}.{digits[:6].ljust(6, '0')}{tail}"
    try:
        parsed = datetime.fromisoformat(text)
    except ValueError:
        raise MalformedResponseError(f"{what}: not an RFC 3339 time: {value!r}") from None
    if parsed.tzinfo is None:
        raise MalformedResponseError(f"{what}: RFC 3339 time without offset: {value!r}")
    return parsed


def format_time(value: datetime) -> str:
    """RFC 3339 in UTC with a Z suffix."""
    return value.isoformat().replace("+00:00", "Z")


@dataclass(frozen=True, slots=True)
class DirectoryMeta:
    """The directory's "meta" (RFC 8555 §7.1.1) plus "profiles" (profiles draft §3)."""

    terms_of_service: str | None = None
    website: str | None = None
    caa_identities: tuple[str, ...] = ()
    external_account_required: bool = False
    profiles: Mapping[str, str] = field(default_factory=dict)

    @classmethod
    def from_json(cls, obj: object) -> DirectoryMeta:
        o = json_object(obj, "directory meta")
        profiles = optional(o, "profiles", dict, "directory meta") or {}
        return cls(
            terms_of_service=optional(o, "termsOfService", str, "directory meta"),
            website=optional(o, "website", str, "directory meta"),
            caa_identities=tuple(optional(o, "caaIdentities", list, "directory meta") or ()),
            external_account_required=bool(o.get("externalAccountRequired", False)),
            profiles={str(k): str(v) for k, v in profiles.items()},
        )

    def to_json(self) -> JSON:
        out: JSON = {}
        if self.terms_of_service is not None:
            out["termsOfService"] = self.terms_of_service
        if self.website is not None:
            out["website"] = self.website
        if self.caa_identities:
            out["caaIdentities"] = list(self.caa_identities)
        if self.external_account_required:
            out["externalAccountRequired"] = True
        if self.profiles:
            out["profiles"] = dict(self.profiles)
        return out


@dataclass(frozen=True, slots=True)
class Directory:
    """RFC 8555 §7.1.1 (+ renewalInfo, RFC 9773 §3)."""

    new_nonce: str
    new_account: str
    new_order: str
    revoke_cert: str
    key_change: str
    new_authz: str | None = None
    renewal_info: str | None = None
    meta: DirectoryMeta = field(default_factory=DirectoryMeta)

    @classmethod
    def from_json(cls, obj: object) -> Directory:
        o = json_object(obj, "directory")
        w = "directory"
        meta = o.get("meta")
        return cls(
            new_nonce=required(o, "newNonce", str, w),
            new_account=required(o, "newAccount", str, w),
            new_order=required(o, "newOrder", str, w),
            revoke_cert=required(o, "revokeCert", str, w),
            key_change=required(o, "keyChange", str, w),
            new_authz=optional(o, "newAuthz", str, w),
            renewal_info=optional(o, "renewalInfo", str, w),
            meta=DirectoryMeta.from_json(meta) if meta is not None else DirectoryMeta(),
        )

    def to_json(self) -> JSON:
        out: JSON = {
            "newNonce": self.new_nonce,
            "newAccount": self.new_account,
            "newOrder": self.new_order,
            "revokeCert": self.revoke_cert,
            "keyChange": self.key_change,
        }
        if self.new_authz is not None:
            out["newAuthz"] = self.new_authz
        if self.renewal_info is not None:
            out["renewalInfo"] = self.renewal_info
        meta = self.meta.to_json()
        if meta:
            out["meta"] = meta
        return out


@dataclass(frozen=True, slots=True)
class Account:
    """RFC 8555 §7.1.2."""

    status: Status
    contact: tuple[str, ...] = ()
    terms_of_service_agreed: bool | None = None
    orders: str | None = None

    @classmethod
    def from_json(cls, obj: object) -> Account:
        o = json_object(obj, "account")
        return cls(
            status=_status(o, "account"),
            contact=tuple(optional(o, "contact", list, "account") or ()),
            terms_of_service_agreed=optional(o, "termsOfServiceAgreed", bool, "account"),
            orders=optional(o, "orders", str, "account"),
        )

    def to_json(self) -> JSON:
        out: JSON = {"status": str(self.status), "contact": list(self.contact)}
        if self.terms_of_service_agreed is not None:
            out["termsOfServiceAgreed"] = self.terms_of_service_agreed
        if self.orders is not None:
            out["orders"] = self.orders
        return out


@dataclass(frozen=True, slots=True)
class Challenge:
    """RFC 8555 §8 (only the fields http-01 needs, plus error/validated)."""

    type: str
    url: str
    status: Status
    token: str = ""
    validated: str | None = None
    error: Problem | None = None

    @classmethod
    def from_json(cls, obj: object) -> Challenge:
        o = json_object(obj, "challenge")
        err = o.get("error")
        return cls(
            type=required(o, "type", str, "challenge"),
            url=required(o, "url", str, "challenge"),
            status=_status(o, "challenge"),
            token=optional(o, "token", str, "challenge") or "",
            validated=optional(o, "validated", str, "challenge"),
            error=Problem.from_json(err) if err is not None else None,
        )

    def to_json(self) -> JSON:
        out: JSON = {"type": self.type, "url": self.url, "status": str(self.status)}
        if self.token:
            out["token"] = self.token
        if self.validated is not None:
            out["validated"] = self.validated
        if self.error is not None:
            out["error"] = self.error.to_json()
        return out


@dataclass(frozen=True, slots=True)
class Authorization:
    """RFC 8555 §7.1.4."""

    identifier: Identifier
    status: Status
    challenges: tuple[Challenge, ...] = ()
    expires: str | None = None
    wildcard: bool = False

    @classmethod
    def from_json(cls, obj: object) -> Authorization:
        o = json_object(obj, "authorization")
        return cls(
            identifier=Identifier.from_json(required(o, "identifier", dict, "authorization")),
            status=_status(o, "authorization"),
            challenges=tuple(
                Challenge.from_json(c) for c in required(o, "challenges", list, "authorization")
            ),
            expires=optional(o, "expires", str, "authorization"),
            wildcard=bool(o.get("wildcard", False)),
        )

    def to_json(self) -> JSON:
        out: JSON = {
            "identifier": self.identifier.to_json(),
            "status": str(self.status),
            "challenges": [c.to_json() for c in self.challenges],
        }
        if self.expires is not None:
            out["expires"] = self.expires
        if self.wildcard:
            out["wildcard"] = True
        return out

    def challenge(self, type_: str) -> Challenge | None:
        return next((c for c in self.challenges if c.type == type_), None)


@dataclass(frozen=True, slots=True)
class Order:
    """RFC 8555 §7.1.3 (+ "replaces", RFC 9773 §5; "profile", profiles draft §4)."""

    status: Status
    identifiers: tuple[Identifier, ...]
    authorizations: tuple[str, ...]
    finalize: str
    certificate: str | None = None
    expires: str | None = None
    not_before: str | None = None
    not_after: str | None = None
    error: Problem | None = None
    profile: str | None = None
    replaces: str | None = None

    @classmethod
    def from_json(cls, obj: object) -> Order:
        o = json_object(obj, "order")
        w = "order"
        err = o.get("error")
        return cls(
            status=_status(o, w),
            identifiers=tuple(Identifier.from_json(i) for i in required(o, "identifiers", list, w)),
            authorizations=tuple(str(a) for a in required(o, "authorizations", list, w)),
            finalize=required(o, "finalize", str, w),
            certificate=optional(o, "certificate", str, w),
            expires=optional(o, "expires", str, w),
            not_before=optional(o, "notBefore", str, w),
            not_after=optional(o, "notAfter", str, w),
            error=Problem.from_json(err) if err is not None else None,
            profile=optional(o, "profile", str, w),
            replaces=optional(o, "replaces", str, w),
        )

    def to_json(self) -> JSON:
        out: JSON = {
            "status": str(self.status),
            "identifiers": [i.to_json() for i in self.identifiers],
            "authorizations": list(self.authorizations),
            "finalize": self.finalize,
        }
        for key, value in (
            ("certificate", self.certificate),
            ("expires", self.expires),
            ("notBefore", self.not_before),
            ("notAfter", self.not_after),
            ("profile", self.profile),
            ("replaces", self.replaces),
        ):
            if value is not None:
                out[key] = value
        if self.error is not None:
            out["error"] = self.error.to_json()
        return out


@dataclass(frozen=True, slots=True)
class NewOrder:
    """The newOrder request payload (RFC 8555 §7.4)."""

    identifiers: tuple[Identifier, ...]
    not_before: datetime | None = None
    not_after: datetime | None = None
    profile: str | None = None
    replaces: str | None = None

    def to_json(self) -> JSON:
        out: JSON = {"identifiers": [i.to_json() for i in self.identifiers]}
        if self.not_before is not None:
            out["notBefore"] = format_time(self.not_before)
        if self.not_after is not None:
            out["notAfter"] = format_time(self.not_after)
        if self.profile is not None:
            out["profile"] = self.profile
        if self.replaces is not None:
            out["replaces"] = self.replaces
        return out
