"""ACME Renewal Information (RFC 9773): the CertID of a certificate and the suggested window."""

from __future__ import annotations

import random
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from cryptography import x509

from acmeclient.errors import CryptoError, MalformedResponseError
from acmeclient.jws import b64url
from acmeclient.messages import format_time, parse_time

DEFAULT_RETRY_AFTER = 6 * 3600.0  # RFC 9773 §4.3.3: poll about every six hours when unspecified


def _serial_der_bytes(serial: int) -> bytes:
    """The DER INTEGER content octets of a positive serial (leading 0x00 if the high bit is set)."""
    return serial.to_bytes((serial.bit_length() + 8) // 8, "big")


def cert_id_from_parts(key_identifier: bytes, serial: int) -> str:
    """RFC 9773 §4.1: base64url(AKI keyIdentifier) "." base64url(serial DER content octets)."""
    return f"{b64url(key_identifier)}.{b64url(_serial_der_bytes(serial))}"


def cert_id(cert_pem: str | bytes) -> str:
    """The ARI CertID of the first (leaf) certificate of a PEM chain."""
    data = cert_pem.encode() if isinstance(cert_pem, str) else cert_pem
    try:
        cert = x509.load_pem_x509_certificates(data)[0]
    except (ValueError, IndexError):
        raise CryptoError("not a PEM certificate") from None
    try:
        aki = cert.extensions.get_extension_for_class(x509.AuthorityKeyIdentifier).value
    except x509.ExtensionNotFound:
        raise CryptoError("certificate has no Authority Key Identifier; no ARI CertID") from None
    if aki.key_identifier is None:
        raise CryptoError("Authority Key Identifier without keyIdentifier; no ARI CertID")
    return cert_id_from_parts(aki.key_identifier, cert.serial_number)


@dataclass(frozen=True, slots=True)
class RenewalInfo:
    """The CA's suggested renewal window (RFC 9773 §4.2) and when to ask again."""

    start: datetime
    end: datetime
    explanation_url: str | None = None
    retry_after: float | None = None  # seconds, from the Retry-After header

    def __post_init__(self) -> None:
        if self.end <= self.start:
            raise MalformedResponseError("renewalInfo: suggestedWindow end is not after start")

    @classmethod
    def from_json(cls, obj: Any, retry_after: float | None = None) -> RenewalInfo:
        if not isinstance(obj, dict) or not isinstance(obj.get("suggestedWindow"), dict):
            raise MalformedResponseError("renewalInfo: missing suggestedWindow object")
        window = obj["suggestedWindow"]
        start, end = window.get("start"), window.get("end")
        if not isinstance(start, str) or not isinstance(end, str):
            raise MalformedResponseError("renewalInfo: suggestedWindow needs start and end")
        url = obj.get("explanationURL")
        if url is not None and not isinstance(url, str):
            raise MalformedResponseError("renewalInfo: explanationURL is not a string")
        return cls(
            start=parse_time(start, "suggestedWindow.start"),
            end=parse_time(end, "suggestedWindow.end"),
            explanation_url=url,
            retry_after=retry_after,
        )

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "suggestedWindow": {"start": format_time(self.start), "end": format_time(self.end)}
        }
        if self.explanation_url is not None:
            out["explanationURL"] = self.explanation_url
        return out

    def choose_time(self, rng: random.Random) -> datetime:
        """A uniformly random instant in [start, end) (RFC 9773 §4.2); if it is already past,
        the caller should renew now."""
        span = (self.end - self.start).total_seconds()
        return self.start + timedelta(seconds=rng.random() * span)

    def next_check_after(self) -> float:
        """Seconds until the renewalInfo should be fetched again."""
        return self.retry_after if self.retry_after is not None else DEFAULT_RETRY_AFTER
