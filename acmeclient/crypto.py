"""Key types, key generation, key loading (PEM, encrypted PEM, JWK json), CSRs and PEM chains."""

from __future__ import annotations

import enum
import json
import logging
import re
from dataclasses import dataclass

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID
from josepy.errors import Error as JoseError
from josepy.jwk import JWK

from acmeclient.errors import CryptoError

logger = logging.getLogger(__name__)

PrivateKey = ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey

RSA_PUBLIC_EXPONENT = 65537  # the only exponent CAs are expected to accept (CA/B BR 6.1.6)


class KeyType(enum.StrEnum):
    """The key types accepted for both account keys and certificate keys."""

    EC_P256 = "ec-p256"
    EC_P384 = "ec-p384"
    RSA_2048 = "rsa-2048"
    RSA_3072 = "rsa-3072"
    RSA_4096 = "rsa-4096"


_CURVES: dict[KeyType, ec.EllipticCurve] = {
    KeyType.EC_P256: ec.SECP256R1(),
    KeyType.EC_P384: ec.SECP384R1(),
}
_RSA_BITS = {KeyType.RSA_2048: 2048, KeyType.RSA_3072: 3072, KeyType.RSA_4096: 4096}


def generate_key(key_type: KeyType = KeyType.EC_P256) -> PrivateKey:
    """A fresh private key of the given type."""
    if key_type in _CURVES:
        return ec.generate_private_key(_CURVES[key_type])
    return rsa.generate_private_key(RSA_PUBLIC_EXPONENT, _RSA_BITS[key_type])


def key_type_of(key: PrivateKey) -> KeyType:
    """The KeyType of a key, or CryptoError if it is not one we support."""
    if isinstance(key, ec.EllipticCurvePrivateKey):
        for kt, curve in _CURVES.items():
            if key.curve.name == curve.name:
                return kt
        raise CryptoError(f"unsupported EC curve {key.curve.name}")
    if isinstance(key, rsa.RSAPrivateKey):
        for kt, bits in _RSA_BITS.items():
            if key.key_size == bits:
                return kt
        raise CryptoError(f"unsupported RSA key size {key.key_size}")
    raise CryptoError(f"unsupported key type {type(key).__name__}")


def private_key_to_pem(key: PrivateKey, passphrase: bytes | None = None) -> bytes:
    """PKCS#8 PEM, encrypted with the passphrase when one is given."""
    enc: serialization.KeySerializationEncryption = (
        serialization.BestAvailableEncryption(passphrase)
        if passphrase
        else serialization.NoEncryption()
    )
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, enc)


def load_private_key(data: bytes, passphrase: bytes | None = None) -> PrivateKey:
    """Load a PEM private key (PKCS#1, SEC1 or PKCS#8, optionally encrypted)."""
    try:
        key = serialization.load_pem_private_key(data, password=passphrase)
    except TypeError as exc:  # encrypted without passphrase, or passphrase for a clear key
        raise CryptoError(f"private key passphrase problem: {exc}") from None
    except ValueError:
        raise CryptoError("not a readable PEM private key (or wrong passphrase)") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey):
        raise CryptoError(f"unsupported key type {type(key).__name__}")
    key_type_of(key)
    return key


def load_account_key(data: bytes, passphrase: bytes | None = None) -> PrivateKey:
    """Load an account key: PEM (optionally encrypted) or JWK json (certbot private_key.json)."""
    stripped = data.strip()
    if stripped.startswith(b"{"):
        try:
            obj = json.loads(stripped)
            jwk = JWK.from_json(obj)
        except (ValueError, JoseError, KeyError, TypeError) as exc:
            raise CryptoError(f"not a readable JWK private key: {type(exc).__name__}") from None
        key = getattr(getattr(jwk, "key", None), "_wrapped", None)
        if not isinstance(key, ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey):
            raise CryptoError("the JWK holds no private key")
        key_type_of(key)
        return key
    if b"-----BEGIN" not in stripped:
        raise CryptoError("account key is neither PEM nor JWK json")
    return load_private_key(stripped, passphrase)


_COUNTRY = re.compile(r"[A-Z]{2}")


@dataclass(frozen=True, slots=True)
class CsrSubject:
    """Optional subject fields of a CSR; the CA may ignore any of them (Let's Encrypt does)."""

    common_name: str | None = None
    country: str | None = None
    state: str | None = None
    locality: str | None = None
    organization: str | None = None
    organizational_unit: str | None = None
    email: str | None = None

    def __post_init__(self) -> None:
        if self.country is not None and not _COUNTRY.fullmatch(self.country):
            raise CryptoError(f"country must be two capital letters (ISO 3166): {self.country!r}")
        if self.common_name is not None and len(self.common_name) > 64:  # RFC 5280 ub-common-name
            raise CryptoError("common name longer than 64 characters")
        if self.email is not None and "@" not in self.email:
            raise CryptoError(f"email {self.email!r} has no @")


def make_csr(
    key: PrivateKey, names: list[str] | tuple[str, ...], subject: CsrSubject | None = None
) -> bytes:
    """A DER CSR for the names (all as SANs); the common name defaults to the first name."""
    if not names:
        raise CryptoError("a CSR needs at least one name")
    subject = subject or CsrSubject()
    cn = subject.common_name if subject.common_name is not None else names[0]
    attrs: list[x509.NameAttribute[str]] = []
    for oid, value in (
        (NameOID.COUNTRY_NAME, subject.country),
        (NameOID.STATE_OR_PROVINCE_NAME, subject.state),
        (NameOID.LOCALITY_NAME, subject.locality),
        (NameOID.ORGANIZATION_NAME, subject.organization),
        (NameOID.ORGANIZATIONAL_UNIT_NAME, subject.organizational_unit),
        (NameOID.EMAIL_ADDRESS, subject.email),
    ):
        if value:
            attrs.append(x509.NameAttribute(oid, value))
    if len(cn) <= 64:
        attrs.append(x509.NameAttribute(NameOID.COMMON_NAME, cn))
    try:
        builder = (
            x509.CertificateSigningRequestBuilder()
            .subject_name(x509.Name(attrs))
            .add_extension(
                x509.SubjectAlternativeName([x509.DNSName(n) for n in dict.fromkeys(names)]),
                critical=False,
            )
        )
        csr = builder.sign(key, hashes.SHA256())
    except ValueError as exc:
        raise CryptoError(f"cannot build CSR: {exc}") from None
    return csr.public_bytes(serialization.Encoding.DER)


def split_pem_chain(pem: str) -> list[x509.Certificate]:
    """Parse a PEM bundle into certificates, leaf first."""
    try:
        certs = x509.load_pem_x509_certificates(pem.encode())
    except ValueError:
        raise CryptoError("not a PEM certificate chain") from None
    return certs


def issuer_common_name(cert: x509.Certificate) -> str:
    attrs = cert.issuer.get_attributes_for_oid(NameOID.COMMON_NAME)
    return str(attrs[0].value) if attrs else ""
