"""Backup and restore of the Let's Encrypt state: one passphrase-encrypted file (scrypt +
AES-256-GCM) holding the account and base settings, and optionally the VS configuration and the
certificates; what goes into one, and what a restore checks (everything, before the first write)
and then writes. scrypt runs on a worker thread, never on the loop that serves traffic.

`seal(contents, passphrase) -> bytes` and `unseal(data, passphrase) -> contents` are pure.
"""

from __future__ import annotations

import base64
import functools
import json
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.scrypt import Scrypt

from acmeclient.crypto import load_account_key, private_key_to_pem
from acmeclient.errors import CryptoError

from ..certs.errors import CertInputError
from ..certs.files import safe_path
from ..certs.parse import parse_pem
from ..certs.store import CertStore, check_id
from ..config.loader import parse_config
from ..config.model import Config
from ..errors import ConfigError, LBProxyError
from ..runtime import RuntimeStore
from .account import Accounts
from .blocking import on_thread
from .codes import AcmeCode, LeError
from .model import MANAGED_BY, Account, Clock, Entry, Settings
from .state import LeState

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


def backup_to_text(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def backup_from_text(text: str) -> bytes:
    try:
        return base64.b64decode(text, validate=True)
    except ValueError:
        raise BackupError("the backup is not base64") from None


RESTORED_CONFIG = "restored-config.toml"  # the backup's VS configuration, kept for the operator


class Backups:
    """Makes and restores backups of the feature's state."""

    def __init__(self, state: LeState, accounts: Accounts, store: CertStore,
                 runtime: RuntimeStore, *, clock: Clock, config_path: Path | None,
                 wake: Callable[[], None]) -> None:
        self.state = state
        self.accounts = accounts
        self.store = store
        self.runtime = runtime
        self.clock = clock
        self.config_path = config_path
        self.wake = wake

    async def make(self, passphrase: str, *, include_vs: bool = False,
                   include_certs: bool = False) -> bytes:
        s = self.state
        account = None
        if s.account is not None:
            account = {"url": s.account.url, "email": s.account.email,
                       "key_pem": private_key_to_pem(s.account.key).decode()}
        vs_config = None
        if include_vs:
            if self.config_path is None or not self.config_path.is_file():
                raise BackupError("the config file is not known to the manager; no VS "
                                  "configuration to back up", status=409)
            vs_config = await on_thread(self.config_path.read_text)
        certs = None
        if include_certs:
            certs = []
            for e in s.entries.values():
                m = self.store.material(e.id)
                certs.append({"entry": e.to_json(),
                              "chain_pem": m.chain_pem.decode() if m else None,
                              "key_pem": m.key_pem.decode() if m else None})
        contents = BackupContents(s.settings.to_json(), account, vs_config, certs,
                                  self.clock().isoformat())
        data = await on_thread(lambda: seal(contents, passphrase))
        s.log.audit(f"backup made (vs={include_vs}, certificates={include_certs})")
        return data

    async def restore(self, data: bytes, passphrase: str, *, restore_vs: bool = False,
                      restore_certs: bool = False) -> dict[str, Any]:
        """Apply a backup. Everything in it is checked before the first write (settings,
        account key, VS configuration, each certificate's id, paths and PEM): a refused backup
        changes nothing, and the error names the entry at fault."""
        s = self.state
        contents = await on_thread(lambda: unseal(data, passphrase))
        try:
            settings = Settings.from_json(contents.settings)
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise BackupError(f"the backup's settings are invalid: {exc!r}") from None
        account = None
        if contents.account is not None:
            try:
                key = load_account_key(str(contents.account["key_pem"]).encode())
            except (CryptoError, KeyError) as exc:
                raise s.problem(LeError(AcmeCode.INVALID_STORED_KEY,
                                        f"the backup's account key is invalid: {exc}")
                                ) from None
            url = str(contents.account.get("url") or "")
            if not url:
                raise s.problem(LeError(AcmeCode.ACCOUNT_WITHOUT_URL,
                                        "the backup's account has no URL"))
            account = Account(url, str(contents.account.get("email", "")), key)
        cfg: Config | None = None
        if restore_vs and contents.vs_config is not None:
            try:
                cfg = parse_config(contents.vs_config, base=self.config_path.parent
                                   if self.config_path else None, source="backup")
            except ConfigError as exc:
                raise BackupError(f"the backup's VS configuration is invalid: {exc}") from None
        certs = self._certificates(contents.certificates or []) if restore_certs else []

        s.settings = settings
        await s.save_settings()
        restored: dict[str, Any] = {"account": "", "certificates": [], "vs": False}
        if account is not None:
            await self.accounts.save(account)
            restored["account"] = account.url
        if cfg is not None and contents.vs_config is not None:
            await s.write(RESTORED_CONFIG, contents.vs_config.encode(),
                          "the backup's VS configuration not stored")
            await self.runtime.set_config(cfg)
            restored["vs"] = True
        for e, pem in certs:
            if pem is not None:
                chain_pem, key_pem = pem
                await on_thread(functools.partial(
                    self.store.import_pem, e.id, chain_pem, key_pem,
                    replace=self.store.get(e.id) is not None, managed_by=MANAGED_BY,
                    override=True))
            s.entries[e.id] = e
            await s.save_entry(e)
            restored["certificates"].append(e.id)
        s.log.audit(f"backup restored (account {restored['account'] or 'none'}, "
                    f"{len(restored['certificates'])} certificates, vs={restored['vs']})")
        self.wake()
        return restored

    def _certificates(self, items: list[Any]) -> list[tuple[Entry, tuple[bytes, bytes] | None]]:
        """A backup's certificates to restore, each with its (chain, key) PEM if it has one;
        BackupError naming the entry for anything that cannot be restored whole: a malformed
        entry, an id that is not valid or would leave the state directory, an id listed twice,
        a PEM the store would refuse, an id whose state here is damaged. An id held here by a
        certificate not managed by Let's Encrypt is skipped (with a warning), as it was."""
        out: list[tuple[Entry, tuple[bytes, bytes] | None]] = []
        seen: set[str] = set()
        for i, c in enumerate(items):
            where = f"the backup's certificates[{i}]"
            try:
                e = Entry.from_json(c["entry"])
            except (KeyError, TypeError, ValueError, AttributeError) as exc:
                raise BackupError(f"{where} is not a certificate entry: {exc!r}") from None
            where = f"{where} (id {e.id!r})"
            try:
                check_id(e.id)
                safe_path(self.store.root, e.id)
            except CertInputError as exc:
                raise BackupError(f"{where}: {exc}") from None
            if e.id in seen:
                raise BackupError(f"{where}: the id is listed twice")
            seen.add(e.id)
            if e.id in self.store.problems:
                raise BackupError(f"{where}: the certificate stored here is damaged "
                                  f"({self.store.problems[e.id]}); move it away first",
                                  status=409)
            info = self.store.get(e.id)
            if info is not None and info.managed_by != MANAGED_BY:
                logger.warning("restore: %s is a non-managed certificate here; skipped", e.id)
                continue
            chain, key = c.get("chain_pem"), c.get("key_pem")
            pem = None
            if chain and key:
                if not isinstance(chain, str) or not isinstance(key, str):
                    raise BackupError(f"{where}: chain_pem and key_pem must be PEM text")
                pem = (chain.encode(), key.encode())
                try:
                    parse_pem(*pem, now=self.clock())
                except CertInputError as exc:
                    raise BackupError(f"{where}: {exc}") from None
            out.append((e, pem))
        return out
