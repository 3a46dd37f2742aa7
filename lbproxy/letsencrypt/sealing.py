"""Encryption at rest for values kept in a shared store (Redis): AES-256-GCM under a key every
node reads from the same file, each value bound to its key name so a value cannot be moved to
another key unnoticed. Private keys never reach the shared store in clear."""

from __future__ import annotations

import base64
import binascii
import os
from pathlib import Path

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

KEY_BYTES = 32
_NONCE = 12
_VERSION = b"\x01"


class SealError(ValueError):
    """A key file or a sealed value that cannot be used; the message names which."""


class UnsealableValue(OSError, SealError):
    """A stored value this node's key cannot open: for the Storage seam a failed read (an
    OSError naming the key, as a damaged file is), and still a SealError."""


def new_key() -> str:
    """A fresh key, as the text a key file holds."""
    return base64.b64encode(os.urandom(KEY_BYTES)).decode() + "\n"


class Sealer:
    """Seals and opens values with the key in `path` (base64 of 32 bytes)."""

    def __init__(self, key: bytes, where: str = "the key") -> None:
        if len(key) != KEY_BYTES:
            raise SealError(f"{where}: the key must be {KEY_BYTES} bytes, it has {len(key)}")
        self._aead = AESGCM(key)
        self.where = where

    @classmethod
    def from_file(cls, path: str | Path) -> Sealer:
        try:
            text = Path(path).read_text(encoding="ascii").strip()
        except (OSError, UnicodeDecodeError) as exc:
            raise SealError(f"encryption key file {path}: cannot read it: {exc}") from None
        try:
            key = base64.b64decode(text, validate=True)
        except (binascii.Error, ValueError):
            raise SealError(f"encryption key file {path}: not base64 (make one with "
                            "`lbproxy cluster new-key FILE`)") from None
        return cls(key, f"encryption key file {path}")

    def seal(self, name: str, value: bytes) -> bytes:
        nonce = os.urandom(_NONCE)
        return _VERSION + nonce + self._aead.encrypt(nonce, value, name.encode())

    def open(self, name: str, sealed: bytes) -> bytes:
        if len(sealed) < 1 + _NONCE + 16 or sealed[:1] != _VERSION:
            raise SealError(f"{name}: not a value sealed by lbproxy")
        try:
            return self._aead.decrypt(sealed[1:1 + _NONCE], sealed[1 + _NONCE:], name.encode())
        except InvalidTag:
            raise SealError(f"{name}: cannot be decrypted with {self.where} (another cluster's "
                            "key, or a damaged value)") from None
