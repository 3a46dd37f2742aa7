"""JWS glue over josepy: flattened JWS signed with jwk or kid (RFC 8555 §6.2), thumbprints, EAB."""

from __future__ import annotations

import base64
import json
from dataclasses import dataclass
from typing import Any

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from josepy.jwa import ES256, ES384, HS256, RS256, JWASignature
from josepy.jwk import JWK, JWKEC, JWKRSA

from acmeclient.crypto import PrivateKey
from acmeclient.errors import CryptoError


def b64url(data: bytes) -> str:
    """base64url without padding (RFC 7515 §2)."""
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def b64url_decode(text: str) -> bytes:
    try:
        return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    except ValueError:
        raise CryptoError("invalid base64url") from None


def _compact_json(obj: Any) -> bytes:
    return json.dumps(obj, separators=(",", ":"), sort_keys=True).encode()


@dataclass(frozen=True, slots=True)
class JwsKey:
    """A private key ready to sign ACME requests: its JWK, JWS algorithm and thumbprint."""

    key: PrivateKey
    jwk: JWK
    alg: JWASignature

    @classmethod
    def from_key(cls, key: PrivateKey) -> JwsKey:
        if isinstance(key, ec.EllipticCurvePrivateKey):
            alg = {"secp256r1": ES256, "secp384r1": ES384}.get(key.curve.name)
            if alg is None:
                raise CryptoError(f"unsupported account key curve {key.curve.name}")
            return cls(key, JWKEC(key=key), alg)
        if isinstance(key, rsa.RSAPrivateKey):
            return cls(key, JWKRSA(key=key), RS256)
        raise CryptoError(f"unsupported account key type {type(key).__name__}")

    def public_jwk(self) -> dict[str, Any]:
        result: dict[str, Any] = self.jwk.public_key().to_partial_json()
        return dict(result)

    def thumbprint(self) -> str:
        """RFC 7638 SHA-256 thumbprint, base64url."""
        return b64url(self.jwk.thumbprint(hash_function=hashes.SHA256))

    def sign(
        self,
        payload: dict[str, Any] | None,
        *,
        url: str,
        nonce: str | None,
        kid: str | None,
    ) -> dict[str, Any]:
        """Flattened JWS; payload None is POST-as-GET (empty payload, RFC 8555 §6.3)."""
        protected: dict[str, Any] = {"alg": self.alg.name, "url": url}
        if nonce is not None:
            protected["nonce"] = nonce
        if kid is not None:
            protected["kid"] = kid
        else:
            protected["jwk"] = self.public_jwk()
        protected_b64 = b64url(_compact_json(protected))
        payload_b64 = "" if payload is None else b64url(_compact_json(payload))
        signing_input = f"{protected_b64}.{payload_b64}".encode("ascii")
        signature = self.alg.sign(self.key, signing_input)
        return {"protected": protected_b64, "payload": payload_b64, "signature": b64url(signature)}


def key_authorization(token: str, thumbprint: str) -> str:
    """RFC 8555 §8.1."""
    return f"{token}.{thumbprint}"


def external_account_binding(
    account_key: JwsKey, *, kid: str, hmac_key_b64: str, url: str
) -> dict[str, Any]:
    """The externalAccountBinding JWS of RFC 8555 §7.3.4, signed HS256 with the CA's MAC key."""
    hmac_key = b64url_decode(hmac_key_b64)
    if not hmac_key:
        raise CryptoError("empty EAB HMAC key")
    protected_b64 = b64url(_compact_json({"alg": "HS256", "kid": kid, "url": url}))
    payload_b64 = b64url(_compact_json(account_key.public_jwk()))
    signing_input = f"{protected_b64}.{payload_b64}".encode("ascii")
    signature = HS256.sign(hmac_key, signing_input)
    return {"protected": protected_b64, "payload": payload_b64, "signature": b64url(signature)}
