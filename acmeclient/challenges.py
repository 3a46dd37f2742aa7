"""What each ACME challenge type (RFC 8555 §8.3-8.4, RFC 8737) asks a responder to publish,
computed from the key authorization: the names of the types, dns-01's TXT value and record name.
The tls-alpn-01 validation certificate is built here too (see `tls_alpn01_certificate`), and the
responder seam every type shares (`ChallengeResponder`, `responder_type`)."""

from __future__ import annotations

import base64
import datetime
import hashlib
from typing import Protocol

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

HTTP01 = "http-01"
DNS01 = "dns-01"
TLS_ALPN01 = "tls-alpn-01"
CHALLENGE_TYPES = (HTTP01, DNS01, TLS_ALPN01)

# RFC 8737 §6.2: the ALPN protocol the validator offers, alone.
ACME_TLS_ALPN = "acme-tls/1"
# RFC 8737 §3: id-pe-acmeIdentifier, the critical extension holding SHA-256(key authorization).
ACME_IDENTIFIER_OID = x509.ObjectIdentifier("1.3.6.1.5.5.7.1.31")
# How long a validation certificate is valid either side of now: the validator checks none of it,
# but a sane window keeps strict TLS stacks from refusing the handshake first.
_VALIDATION_CERT_SLACK = datetime.timedelta(days=7)


class ChallengeResponder(Protocol):
    """What answers one challenge type for the order machine's shell (shell.py). A responder
    may carry a `challenge_type` attribute (one of CHALLENGE_TYPES); without one it answers
    http-01 (every responder written before the attribute existed). `domain` is the
    authorization's identifier: a wildcard's "*." is already gone (the command says `wildcard`)."""

    async def present(self, domain: str, token: str, key_authorization: str) -> None:
        """Start answering; must be answering when this returns (the CA is told next)."""

    async def cleanup(self, domain: str, token: str) -> None:
        """Stop answering for this token. Idempotent: it is also called for a token whose
        present() failed or was cancelled."""


def responder_type(responder: object) -> str:
    """The challenge type a responder answers: its `challenge_type`, http-01 without one."""
    kind = getattr(responder, "challenge_type", HTTP01)
    if not isinstance(kind, str) or not kind:
        raise ValueError(f"a responder's challenge_type must be a non-empty string, got "
                         f"{kind!r}")
    return kind


def dns01_txt_value(key_authorization: str) -> str:
    """RFC 8555 §8.4: base64url (no padding) of SHA-256 of the key authorization."""
    digest = hashlib.sha256(key_authorization.encode("ascii")).digest()
    return base64.urlsafe_b64encode(digest).rstrip(b"=").decode("ascii")


def dns01_record_name(domain: str) -> str:
    """The TXT record's owner name for `domain` (an authorization's identifier: a wildcard's
    "*." is already gone there, and is stripped here too), absolute, lower case."""
    name = domain.lower().rstrip(".")
    if name.startswith("*."):
        name = name[2:]
    return f"_acme-challenge.{name}."


def tls_alpn01_certificate(domain: str, key_authorization: str) -> tuple[bytes, bytes]:
    """RFC 8737 §3: the validation certificate for `domain` and its key, both PEM: self-signed,
    one DNS SAN (the domain), and the critical acmeIdentifier extension holding the DER OCTET
    STRING of SHA-256(key authorization). A fresh P-256 key each time (never the account's or a
    served certificate's)."""
    name = domain.lower().rstrip(".")
    if not name or name.startswith("*."):
        raise ValueError(f"tls-alpn-01 validates one plain DNS name, not {domain!r}")
    try:
        digest = hashlib.sha256(key_authorization.encode("ascii")).digest()
    except UnicodeEncodeError:
        raise ValueError("the key authorization is not ASCII") from None
    # DER OCTET STRING: tag 0x04, length 32 (short form), the digest.
    ext_value = b"\x04\x20" + digest
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - _VALIDATION_CERT_SLACK)
        .not_valid_after(now + _VALIDATION_CERT_SLACK)
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(name)]), critical=False)
        .add_extension(x509.UnrecognizedExtension(ACME_IDENTIFIER_OID, ext_value),
                       critical=True)
        .sign(key, hashes.SHA256())
    )
    key_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
    return cert.public_bytes(serialization.Encoding.PEM), key_pem


__all__ = ["ACME_IDENTIFIER_OID", "ACME_TLS_ALPN", "CHALLENGE_TYPES", "DNS01", "HTTP01",
           "TLS_ALPN01", "ChallengeResponder", "dns01_record_name", "dns01_txt_value",
           "responder_type", "tls_alpn01_certificate"]
