"""Certificate and key input checked and normalised before anything is stored (pure, takes `now`).

Accepts PEM (certificate, optional chain, key optionally encrypted with a passphrase; a single
PEM holding everything also works) and PKCS#12. Produces one `ParsedCertificate` holding the
chain as PEM (leaf first) and the key as unencrypted PKCS#8, or raises CertInputError naming the
problem. Validity outside [not_before, not_after] is a warning unless `strict`.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import ipaddress
import re
from dataclasses import dataclass

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.serialization import pkcs12
from cryptography.x509.oid import ExtensionOID, NameOID

from .errors import CertInputError, InputProblem

# OpenSSL's default security level (2) refuses RSA keys under 2048 bits in TLS.
MIN_RSA_BITS = 2048
_CERT_BLOCK = re.compile(rb"-----BEGIN CERTIFICATE-----.+?-----END CERTIFICATE-----", re.S)
_KEY_BLOCK = re.compile(
    rb"-----BEGIN ((?:RSA |EC |ENCRYPTED )?PRIVATE KEY)-----.+?-----END \1-----", re.S)
_ENCRYPTED_MARKERS = (b"-----BEGIN ENCRYPTED PRIVATE KEY-----", b"Proc-Type: 4,ENCRYPTED")

PrivateKey = rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey


@dataclass(frozen=True, slots=True)
class ParsedCertificate:
    chain_pem: bytes  # leaf first, then intermediates, PEM
    key_pem: bytes  # unencrypted PKCS#8 PEM
    names: tuple[str, ...]  # lower-case DNS names / IP addresses the leaf covers
    subject: str
    issuer: str
    serial: int
    not_before: dt.datetime
    not_after: dt.datetime
    key_type: str  # "RSA" or "EC"
    key_size: int  # bits (RSA modulus, EC curve order)
    fingerprint: str  # SHA-256 of the leaf DER, hex
    warnings: tuple[str, ...] = ()


def _load_certs(data: bytes, where: str) -> list[x509.Certificate]:
    blocks = _CERT_BLOCK.findall(data)
    if not blocks:
        raise CertInputError(InputProblem.NOT_A_CERTIFICATE,
                             f"{where} is not a certificate: no PEM CERTIFICATE block found")
    try:
        return [x509.load_pem_x509_certificate(b) for b in blocks]
    except ValueError as e:
        raise CertInputError(InputProblem.NOT_A_CERTIFICATE,
                             f"{where} holds a damaged certificate: {e}") from None


def _load_key(data: bytes, passphrase: bytes | None, trusted: bool = False) -> PrivateKey:
    m = _KEY_BLOCK.search(data)
    if m is None:
        raise CertInputError(InputProblem.NOT_A_KEY,
                             "the key is not a PEM private key: no PRIVATE KEY block found")
    block = m.group(0)
    encrypted = any(marker in block for marker in _ENCRYPTED_MARKERS)
    if encrypted and not passphrase:
        raise CertInputError(InputProblem.PASSPHRASE_NEEDED,
                             "the private key is encrypted; give its passphrase")
    try:
        # A key lbproxy generated (or stored after checking it) skips OpenSSL's RSA consistency
        # check: for RSA-4096 it takes about 0.5 s holding the GIL, which stops the serving loop
        # even when the parse runs on a worker thread (bench/README.md, "Let's Encrypt work and
        # the serving loop"). Keys from outside (import, upload, restore) are always checked.
        key = serialization.load_pem_private_key(block, passphrase if encrypted else None,
                                                 unsafe_skip_rsa_key_validation=trusted)
    except ValueError as e:
        if encrypted:
            raise CertInputError(InputProblem.BAD_PASSPHRASE,
                                 "wrong passphrase for the private key") from None
        raise CertInputError(InputProblem.NOT_A_KEY,
                             f"the private key cannot be read: {e}") from None
    except TypeError as e:  # pragma: no cover - guarded by the marker check above
        raise CertInputError(InputProblem.BAD_PASSPHRASE, str(e)) from None
    return _check_key(key)


def _check_key(key: object) -> PrivateKey:
    if isinstance(key, rsa.RSAPrivateKey):
        if key.key_size < MIN_RSA_BITS:
            raise CertInputError(InputProblem.UNSUPPORTED_KEY,
                                 f"RSA key of {key.key_size} bits; at least {MIN_RSA_BITS} needed")
        return key
    if isinstance(key, ec.EllipticCurvePrivateKey):
        return key
    raise CertInputError(InputProblem.UNSUPPORTED_KEY,
                         f"unsupported key type {type(key).__name__}; use RSA or ECDSA")


def _names(cert: x509.Certificate) -> tuple[str, ...]:
    try:
        san = cert.extensions.get_extension_for_oid(ExtensionOID.SUBJECT_ALTERNATIVE_NAME).value
    except x509.ExtensionNotFound:
        san = None
    out: list[str] = []
    if isinstance(san, x509.SubjectAlternativeName):
        out += [n.lower().rstrip(".") for n in san.get_values_for_type(x509.DNSName)]
        out += [str(ip) for ip in san.get_values_for_type(x509.IPAddress)]
    if not out:  # legacy certificates name their host in the subject CN only
        for attr in cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME):
            value = attr.value if isinstance(attr.value, str) else attr.value.decode()
            out.append(value.lower().rstrip("."))
    return tuple(dict.fromkeys(out))


def _same_public_key(cert: x509.Certificate, key: PrivateKey) -> bool:
    fmt = serialization.PublicFormat.SubjectPublicKeyInfo
    enc = serialization.Encoding.DER
    return cert.public_key().public_bytes(enc, fmt) == key.public_key().public_bytes(enc, fmt)


def _finish(certs: list[x509.Certificate], key: PrivateKey, *, now: dt.datetime,
            strict: bool) -> ParsedCertificate:
    leaf, chain = certs[0], certs[1:]
    if not _same_public_key(leaf, key):
        raise CertInputError(InputProblem.KEY_MISMATCH,
                             f"the private key does not match the certificate "
                             f"(subject {leaf.subject.rfc4514_string()!r})")
    warnings: list[str] = []
    nb, na = leaf.not_valid_before_utc, leaf.not_valid_after_utc
    if now > na:
        msg = f"the certificate expired on {na.isoformat()}"
        if strict:
            raise CertInputError(InputProblem.EXPIRED, msg)
        warnings.append(msg)
    if now < nb:
        msg = f"the certificate is not valid before {nb.isoformat()}"
        if strict:
            raise CertInputError(InputProblem.NOT_YET_VALID, msg)
        warnings.append(msg)
    if chain and chain[0].subject != leaf.issuer:
        warnings.append("the first chain certificate is not the leaf's issuer; clients may "
                        "fail to build a path")
    names = _names(leaf)
    if not names:
        warnings.append("the certificate names no host (no SAN, no CN); it can only be a default")
    for n in names:
        try:
            ipaddress.ip_address(n)
        except ValueError:
            continue
        warnings.append(f"{n} is an IP address; SNI never carries one, so only the default "
                        "certificate can serve it")
    pem = serialization.Encoding.PEM
    key_pem = key.private_bytes(pem, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
    if isinstance(key, rsa.RSAPrivateKey):
        key_type, key_size = "RSA", key.key_size
    else:
        key_type, key_size = "EC", key.curve.key_size
    return ParsedCertificate(
        chain_pem=b"".join(c.public_bytes(pem) for c in certs),
        key_pem=key_pem,
        names=names,
        subject=leaf.subject.rfc4514_string(),
        issuer=leaf.issuer.rfc4514_string(),
        serial=leaf.serial_number,
        not_before=nb,
        not_after=na,
        key_type=key_type,
        key_size=key_size,
        fingerprint=hashlib.sha256(leaf.public_bytes(serialization.Encoding.DER)).hexdigest(),
        warnings=tuple(warnings),
    )


def parse_pem(cert_pem: bytes, key_pem: bytes = b"", chain_pem: bytes = b"", *,
              passphrase: bytes | None = None, now: dt.datetime,
              strict: bool = False, trusted_key: bool = False) -> ParsedCertificate:
    """The leaf is the first certificate of `cert_pem`; its other certificates and `chain_pem`
    form the chain. An empty `key_pem` means the key is inside `cert_pem`. `trusted_key`: the
    key is lbproxy's own (generated here, or read back from its own store), see _load_key."""
    certs = _load_certs(cert_pem, "the certificate")
    if chain_pem.strip():
        certs += _load_certs(chain_pem, "the chain")
    key = _load_key(key_pem if key_pem.strip() else cert_pem, passphrase, trusted_key)
    return _finish(certs, key, now=now, strict=strict)


def parse_pkcs12(data: bytes, *, passphrase: bytes | None = None, now: dt.datetime,
                 strict: bool = False) -> ParsedCertificate:
    # A PKCS#12 file is a DER SEQUENCE (first byte 0x30, X.690 section 8.9).
    if not data or data[0] != 0x30:
        raise CertInputError(InputProblem.NOT_PKCS12, "the file is not PKCS#12 (not DER)")
    try:
        key, cert, extra = pkcs12.load_key_and_certificates(data, passphrase or None)
    except ValueError:
        raise CertInputError(InputProblem.BAD_PASSPHRASE,
                             "cannot open the PKCS#12 file: wrong passphrase "
                             "(or not a PKCS#12 file)") from None
    if cert is None:
        raise CertInputError(InputProblem.NOT_A_CERTIFICATE,
                             "the PKCS#12 file holds no certificate")
    if key is None:
        raise CertInputError(InputProblem.NOT_A_KEY, "the PKCS#12 file holds no private key")
    return _finish([cert, *extra], _check_key(key), now=now, strict=strict)
