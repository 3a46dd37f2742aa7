"""Backup and restore of the Let's Encrypt state: one passphrase-encrypted file (scrypt +
AES-256-GCM) holding the account and base settings, and optionally the VS configuration and the
certificates with their run-time assignments to VSs; what goes into one, and what a restore checks
(everything, before the first write) and then writes. scrypt runs on a worker thread, never on the
loop that serves traffic.

A refused restore changes nothing and leaves one line with code 101 in the System Message File;
a part that cannot be restored here (an assignment to a VS this machine lacks, a certificate that
is not in its store) is named in the answer's `not_restored` and logged with code 102: nothing is
dropped silently. Restored certificates are also written to `issued/`, as an order writes them,
for every other holder of the storage.

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
from ..certs.store import ADMIN_TARGET, CertStore, check_id
from ..config.loader import parse_config
from ..config.model import Protocol
from ..config.writer import ConfigFile, PendingEdit, replace_vs_config_edit, vs_config_text
from ..errors import ConfigError, LBProxyError, StoreError
from ..runtime import RuntimeStore
from .account import Accounts
from .blocking import on_thread
from .codes import AcmeCode, LeError
from .model import MANAGED_BY, Account, Clock, Entry, Issued, Settings
from .state import LeState
from .storage import issued_key

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
    # The certificate store's run-time assignments (`cert assign`), with `certificates`:
    # [{"certificate": id, "target": VS name or "admin", "default": bool}]. None in backups
    # made before they were carried.
    assignments: list[dict[str, Any]] | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "settings": self.settings,
            "account": self.account,
            "vs_config": self.vs_config,
            "certificates": self.certificates,
            "assignments": self.assignments,
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
        assignments = obj.get("assignments")
        if assignments is not None and not isinstance(assignments, list):
            raise BackupError("backup payload: assignments is not a list")
        extra = obj.get("extra") or {}
        if not isinstance(extra, dict):
            raise BackupError("backup payload: extra is not an object")
        return cls(obj["settings"], account, vs_config, certs, str(obj.get("created", "")),
                   extra, assignments)


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
    try:
        payload = json.loads(plain)
    except ValueError:  # authentic, so written with the passphrase: crafted, not damaged
        raise BackupError("the backup's payload is not JSON") from None
    return BackupContents.from_json(payload)


def backup_to_text(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def backup_from_text(text: str) -> bytes:
    try:
        return base64.b64decode(text, validate=True)
    except ValueError:
        raise BackupError("the backup is not base64") from None


RESTORED_CONFIG = "restored-config.toml"  # the backup's VS configuration, kept for the operator


async def _no_reload() -> None:
    raise BackupError("no reload path to apply a restored VS configuration", status=409)


@dataclass(frozen=True, slots=True)
class Assignment:
    """A run-time assignment of the certificate store: `target` (a VS, or "admin") serves
    `certificate`, as its default certificate if `default`."""

    certificate: str
    target: str
    default: bool = False

    def to_json(self) -> dict[str, Any]:
        return {"certificate": self.certificate, "target": self.target, "default": self.default}


def run_time_assignments(store: CertStore) -> list[Assignment]:
    """The store's run-time assignments (not those of the config file), in the order a restore
    assigns them again: each VS's certificates in their order, then the admin interface's."""
    doc = store.assignments()
    out = []
    for vs, a in doc["vs"].items():
        certs = list(a["certificates"])
        if a["default"] and a["default"] not in certs:
            certs.append(a["default"])
        out += [Assignment(c, vs, c == a["default"]) for c in certs]
    return out + [Assignment(c, ADMIN_TARGET) for c in doc[ADMIN_TARGET]]


@dataclass(frozen=True, slots=True)
class NotRestored:
    """A part of a backup that was not restored here, and why (what the operator must do)."""

    certificate: str
    target: str  # the VS (or "admin") of an assignment; "" for the certificate itself
    reason: str

    def to_json(self) -> dict[str, Any]:
        return {"certificate": self.certificate, "target": self.target, "reason": self.reason}

    def text(self) -> str:
        what = (f"certificate {self.certificate!r}" if not self.target else
                f"assignment of certificate {self.certificate!r} to {self.target!r}")
        return f"restore: {what} not restored: {self.reason}"


@dataclass(slots=True)
class _Progress:
    """How far a restore got: whether its checks passed and its writes began."""

    writing: bool = False


class Backups:
    """Makes and restores backups of the feature's state."""

    def __init__(self, state: LeState, accounts: Accounts, store: CertStore,
                 runtime: RuntimeStore, *, clock: Clock, config_path: Path | None,
                 wake: Callable[[], None], config_file: ConfigFile | None = None) -> None:
        self.state = state
        self.accounts = accounts
        self.store = store
        self.runtime = runtime
        self.clock = clock
        self.config_path = config_path
        self.wake = wake
        # Where `restore --vs` writes the backup's VS configuration (then applied by reload).
        self.config_file = config_file or ConfigFile(config_path, _no_reload)

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
        certs = assignments = None
        if include_certs:
            certs = []
            for e in s.entries.values():
                m = self.store.material(e.id)
                certs.append({"entry": e.to_json(),
                              "chain_pem": m.chain_pem.decode() if m else None,
                              "key_pem": m.key_pem.decode() if m else None})
            assignments = [a.to_json() for a in run_time_assignments(self.store)]
        contents = BackupContents(s.settings.to_json(), account, vs_config, certs,
                                  self.clock().isoformat(), assignments=assignments)
        # scrypt (~0.1 s) on the default executor, not behind queued key generations on the
        # low-priority CPU worker: a backup must answer within the CLI's timeout.
        data = await on_thread(lambda: seal(contents, passphrase))
        s.log.audit(f"backup made (vs={include_vs}, certificates={include_certs})")
        return data

    async def restore(self, data: bytes, passphrase: str, *, restore_vs: bool = False,
                      restore_certs: bool = False) -> dict[str, Any]:
        """Apply a backup (see `_restore`); a failure leaves a line in the System Message File
        with its code (9 or 10 for the account, 101 for anything else), then is raised."""
        progress = _Progress()
        try:
            return await self._restore(data, passphrase, restore_vs=restore_vs,
                                       restore_certs=restore_certs, progress=progress)
        except LeError:
            raise  # logged with its own code where it was raised
        except Exception as exc:
            what = ("backup restore stopped part way (what was written before stays)"
                    if progress.writing else "backup not restored")
            self.state.problem(LeError(AcmeCode.RESTORE_FAILED, f"{what}: {exc}"))
            raise

    async def _restore(self, data: bytes, passphrase: str, *, restore_vs: bool,
                       restore_certs: bool, progress: _Progress) -> dict[str, Any]:
        """Everything in the backup is checked before the first write (settings, account key,
        VS configuration, each certificate's id, paths and PEM, each assignment): a refused
        backup changes nothing, and the error names the entry at fault. Then settings, account,
        VS configuration, certificates (store, `issued/`, entry) and assignments are written;
        what cannot be restored here is answered in `not_restored` and logged (code 102)."""
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
        vs_edit: PendingEdit | None = None
        if restore_vs and contents.vs_config is not None:
            try:  # the backup's own text first: its problems named as the backup's
                parse_config(contents.vs_config, base=self.config_path.parent
                                   if self.config_path else None, source="backup")
            except ConfigError as exc:
                raise BackupError(f"the backup's VS configuration is invalid: {exc}") from None
            # Into the config file, or refused now: a restore never leaves the running VSs and
            # the file apart (the next reload would undo it).
            vs_edit = await self.config_file.prepare(
                replace_vs_config_edit(contents.vs_config), running=self.runtime.current.config,
                what="`restore --vs`", snippet="# replace the [[rule]], [[vs]] and "
                "[[certificate]] tables of the config file with the backup's:\n"
                + vs_config_text(contents.vs_config))
        certs, skipped = (self._certificates(contents.certificates or []) if restore_certs
                          else ([], set()))
        assignments = _assignments(contents.assignments or []) if restore_certs else []

        progress.writing = True
        s.settings = settings
        await s.save_settings()
        restored: dict[str, Any] = {"account": "", "certificates": [], "vs": False,
                                    "assignments": [], "not_restored": []}
        missed = [NotRestored(cid, "", "the id is held here by a certificate not managed by "
                              "Let's Encrypt; delete or rename it, then restore again")
                  for cid in sorted(skipped)]
        if account is not None:
            await self.accounts.save(account)
            restored["account"] = account.url
        for e, pem in certs:
            if pem is not None:
                chain_pem, key_pem = pem
                await on_thread(functools.partial(
                    self.store.import_pem, e.id, chain_pem, key_pem,
                    replace=self.store.get(e.id) is not None, managed_by=MANAGED_BY,
                    override=True))
                # Before the entry, as an order does: a holder that sees the entry finds it.
                await s.write(issued_key(e.id), Issued(chain_pem, key_pem).to_bytes(),
                              f"certificate {e.id} not shared")
            s.entries[e.id] = e
            await s.save_entry(e)
            restored["certificates"].append(e.id)
        if vs_edit is not None and contents.vs_config is not None:
            # After the certificates (a declared one is not ordered again, an HTTPS VS finds
            # its own), before the assignments (which may name a restored VS).
            await s.write(RESTORED_CONFIG, contents.vs_config.encode(),
                          "the backup's VS configuration not stored")
            await self.config_file.commit(vs_edit)
            restored["vs"] = True
        backed_up = {e.id for e, _ in certs} | skipped
        for a in assignments:
            why = self._why_not(a, backed_up, skipped)
            if why is None:
                try:
                    await on_thread(functools.partial(self.store.assign, a.certificate,
                                                      a.target, default=a.default))
                except StoreError as exc:
                    why = str(exc)
            if why is None:
                restored["assignments"].append(a.to_json())
            else:
                missed.append(NotRestored(a.certificate, a.target, why))
        for m in missed:
            s.problem(LeError(AcmeCode.NOT_RESTORED, m.text()))
        restored["not_restored"] = [m.to_json() for m in missed]
        s.log.audit(f"backup restored (account {restored['account'] or 'none'}, "
                    f"{len(restored['certificates'])} certificates, "
                    f"{len(restored['assignments'])} assignments, vs={restored['vs']}"
                    f"{f', {len(missed)} not restored' if missed else ''})")
        self.wake()
        return restored

    def _why_not(self, a: Assignment, backed_up: set[str], skipped: set[str]) -> str | None:
        """Why an assignment cannot be restored here (None: it can), saying what to do."""
        assign = f"`lbproxy cert assign {a.certificate} {a.target}`"
        if a.target == ADMIN_TARGET:
            return (f"the admin interface's certificate switches the admin API to HTTPS; "
                    f"run {assign} when it should")
        vs = self.runtime.current.config.vs_by_name(a.target)
        if vs is None:
            return f"VS {a.target!r} does not exist here; add it, then run {assign}"
        if vs.protocol is not Protocol.HTTPS:
            return f"VS {a.target!r} is not HTTPS here"
        if a.certificate in skipped:
            return "the id is held here by another certificate, not the backed-up one"
        if self.store.get(a.certificate) is None:
            carried = ("the backup holds no certificate for it" if a.certificate in backed_up
                       else "a backup carries only Let's Encrypt certificates")
            return (f"the certificate is not in the certificate store here ({carried}); "
                    f"import it, then run {assign}")
        return None

    def _certificates(self, items: list[Any]
                      ) -> tuple[list[tuple[Entry, tuple[bytes, bytes] | None]], set[str]]:
        """A backup's certificates to restore, each with its (chain, key) PEM if it has one,
        and the ids skipped; BackupError naming the entry for anything that cannot be restored
        whole: a malformed entry, an id that is not valid or would leave the state directory,
        an id listed twice, a PEM the store would refuse, an id whose state here is damaged.
        An id held here by a certificate not managed by Let's Encrypt is skipped (and reported
        by the caller as not restored)."""
        out: list[tuple[Entry, tuple[bytes, bytes] | None]] = []
        seen: set[str] = set()
        skipped: set[str] = set()
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
                skipped.add(e.id)
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
        return out, skipped


def _assignments(items: list[Any]) -> list[Assignment]:
    """A backup's assignments, checked before the first write; BackupError naming the item
    for a malformed one or a certificate id that is not valid. Repeats count once."""
    out: list[Assignment] = []
    for i, item in enumerate(items):
        where = f"the backup's assignments[{i}]"
        if not isinstance(item, dict):
            raise BackupError(f"{where} is not an object")
        cid, target, default = item.get("certificate"), item.get("target"), item.get("default")
        if not isinstance(target, str) or not target or not isinstance(default, bool):
            raise BackupError(f"{where}: target must be a VS name and default true or false")
        try:
            check_id(cid)
        except CertInputError as exc:
            raise BackupError(f"{where}: {exc}") from None
        a = Assignment(str(cid), target, default)
        if a not in out:
            out.append(a)
    return out
