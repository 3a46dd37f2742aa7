"""The Let's Encrypt backup file: one passphrase-encrypted file (scrypt + AES-256-GCM) holding the
account and base settings, and optionally the VS configuration and the certificates.

Pure functions: `seal(contents, passphrase) -> bytes` and `unseal(data, passphrase) -> contents`;
the manager decides what goes in and what a restore does with it.
"""

from __future__ import annotations

import base64
import json
import logging
import os
from dataclasses import dataclass, field
from typing import Any

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.scrypt import Scrypt

from ..errors import LBProxyError

logger = logging.getLogger(__name__)

FORMAT = "lbproxy-le-backup"
VERSION = 1
# scrypt cost: n = 2**15, r = 8 (RFC 7914 §2's interactive-use recommendation, ~32 MiB, ~0.1 s).
SCRYPT_N = 1 << 15
SCRYPT_R = 8
SCRYPT_P = 1
SALT_BYTES = 16
NONCE_BYTES = 12  # AES-GCM's 96-bit nonce (NIST SP 800-38D §8.2)
MIN_PASSPHRASE = 8  # characters; a backup holds the account key


class BackupError(LBProxyError):
    """A backup cannot be made or read (wrong passphrase, not a backup, bad version)."""

    def __init__(self, message: str, status: int = 400) -> None:
        self.status = status
        super().__init__(message)


@dataclass(frozen=True, slots=True)
class BackupContents:
    """What a backup holds; every value is plain JSON data (PEM text, not key objects)."""

    settings: dict[str, Any]
    account: dict[str, Any] | None
    vs_config: str | None = None  # the config file's text (its VSs, rules, certificates)
    certificates: list[dict[str, Any]] | None = None
    created: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {
            "settings": self.settings,
            "account": self.account,
            "vs_config": self.vs_config,
            "certificates": self.certificates,
            "created": self.created,
            "extra": self.extra,
        }

    @classmethod
    def from_json(cls, obj: Any) -> BackupContents:
        if not isinstance(obj, dict) or not isinstance(obj.get("settings"), dict):
            raise BackupError("backup payload has no settings")
        account = obj.get("account")
        certs = obj.get("certificates")
        vs_config = obj.get("vs_config")
        if account is not None and not isinstance(account, dict):
            raise BackupError("backup payload: account is not an object")
        if certs is not None and not isinstance(certs, list):
            raise BackupError("backup payload: certificates is not a list")
        if vs_config is not None and not isinstance(vs_config, str):
            raise BackupError("backup payload: vs_config is not text")
        return cls(obj["settings"], account, vs_config, certs, str(obj.get("created", "")),
                   dict(obj.get("extra") or {}))


def _kdf(passphrase: str, salt: bytes, n: int, r: int, p: int) -> bytes:
    return Scrypt(salt=salt, length=32, n=n, r=r, p=p).derive(passphrase.encode("utf-8"))


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def seal(contents: BackupContents, passphrase: str, *, scrypt_n: int = SCRYPT_N) -> bytes:
    """The encrypted backup file. The header (format, KDF parameters) is authenticated too."""
    if len(passphrase) < MIN_PASSPHRASE:
        raise BackupError(f"the backup passphrase needs at least {MIN_PASSPHRASE} characters")
    salt, nonce = os.urandom(SALT_BYTES), os.urandom(NONCE_BYTES)
    header = {"format": FORMAT, "version": VERSION, "kdf": "scrypt", "n": scrypt_n,
              "r": SCRYPT_R, "p": SCRYPT_P, "salt": _b64(salt), "nonce": _b64(nonce)}
    aad = json.dumps(header, sort_keys=True).encode()
    key = _kdf(passphrase, salt, scrypt_n, SCRYPT_R, SCRYPT_P)
    plain = json.dumps(contents.to_json(), sort_keys=True).encode()
    ct = AESGCM(key).encrypt(nonce, plain, aad)
    return json.dumps({**header, "ciphertext": _b64(ct)}, indent=1).encode() + b"\n"


def unseal(data: bytes, passphrase: str) -> BackupContents:
    """The contents of a backup file; BackupError for anything but a good file and passphrase."""
    try:
        outer = json.loads(data)
    except ValueError:
        raise BackupError("not an lbproxy Let's Encrypt backup (not JSON)") from None
    if not isinstance(outer, dict) or outer.get("format") != FORMAT:
        raise BackupError("not an lbproxy Let's Encrypt backup")
    if outer.get("version") != VERSION or outer.get("kdf") != "scrypt":
        raise BackupError(f"unsupported backup version {outer.get('version')!r}")
    try:
        header = {k: outer[k] for k in ("format", "version", "kdf", "n", "r", "p", "salt", "nonce")}
        salt = base64.b64decode(header["salt"], validate=True)
        nonce = base64.b64decode(header["nonce"], validate=True)
        ct = base64.b64decode(outer["ciphertext"], validate=True)
        n, r, p = int(header["n"]), int(header["r"]), int(header["p"])
    except (KeyError, ValueError, TypeError):
        raise BackupError("damaged backup header") from None
    # Refuse absurd KDF costs from a hostile file (memory = 128 * n * r bytes).
    if not (2 <= n <= 1 << 20 and 1 <= r <= 32 and 1 <= p <= 16):
        raise BackupError("backup KDF parameters out of range")
    key = _kdf(passphrase, salt, n, r, p)
    try:
        plain = AESGCM(key).decrypt(nonce, ct, json.dumps(header, sort_keys=True).encode())
    except InvalidTag:
        raise BackupError("wrong passphrase or damaged backup") from None
    return BackupContents.from_json(json.loads(plain))
