"""The SSL certificate store: certificates with their chains and keys in the state directory.

Layout (directories 0700, every file 0600):

    <state_dir>/certs/<id>/meta.json            metadata; names the current generation
    <state_dir>/certs/<id>/fullchain-<gen>.pem  leaf + intermediates
    <state_dir>/certs/<id>/key-<gen>.pem        unencrypted PKCS#8 key
    <state_dir>/certs/.assignments.json         run-time assignments (VS -> ids, admin -> ids)

Every write is temp file, fsync, rename, fsync of the directory. A new certificate is built in a
temporary directory renamed into place; a replacement writes generation N+1 beside N and commits
by replacing meta.json, so a crash at any point leaves either the old or the new certificate
whole; what such a crash leaves (`.tmp-*`, `.trash-*`) is removed at the next start. Input is
checked completely before the first byte is written: a refused import leaves the store unchanged.
Every path built from an id goes through `files.safe_path`. The store implements
`lbproxy.proxy.tls.CertLookup`.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import errno
import json
import logging
import os
import re
import secrets
import shutil
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..config.model import Config
from ..errors import StoreError
from ..proxy.tls import CertMaterial, VSCertificates
from .errors import CertInputError, InputProblem
from .files import TMP_PREFIX, fsync_dir, mkdir_private, remove_debris, safe_path, write_atomic
from .parse import ParsedCertificate, parse_pem, parse_pkcs12

logger = logging.getLogger(__name__)

# Certificate ids name directories and files: a letter or digit first (never a dot name), 64
# at most; always used with fullmatch (a `$` would let a trailing newline through).
ID_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
# The admin interface's own TLS is an assignment target beside the VS names.
ADMIN_TARGET = "admin"
_META = "meta.json"
_ASSIGNMENTS = ".assignments.json"
_TRASH_PREFIX = ".trash-"

Usage = Callable[[str], Iterable[str]]
Clock = Callable[[], dt.datetime]


def _utcnow() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def valid_id(cert_id: object) -> bool:
    return isinstance(cert_id, str) and ID_RE.fullmatch(cert_id) is not None


def check_id(cert_id: object) -> None:
    """CertInputError (bad-id) unless `cert_id` is a certificate id the store can hold."""
    if not valid_id(cert_id):
        raise CertInputError(InputProblem.BAD_ID,
                             f"certificate id {cert_id!r} must be 1-64 letters, digits, "
                             "'.', '_' or '-', starting with a letter or digit")


def config_usage(config: Callable[[], Config]) -> Usage:
    """A `usage` callback: the VSs whose config lists a certificate id."""
    def usage(cert_id: str) -> list[str]:
        return [vs.name for vs in config().virtual_services if cert_id in vs.tls.certificates]
    return usage


@dataclass(frozen=True, slots=True)
class CertInfo:
    """What the store knows about one certificate (never the key)."""

    id: str
    names: tuple[str, ...]
    subject: str
    issuer: str
    serial: int
    not_before: dt.datetime
    not_after: dt.datetime
    key_type: str
    key_size: int
    fingerprint: str
    generation: int
    created: dt.datetime
    updated: dt.datetime
    managed_by: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id, "names": list(self.names), "subject": self.subject,
            "issuer": self.issuer, "serial": f"{self.serial:x}",
            "not_before": self.not_before.isoformat(), "not_after": self.not_after.isoformat(),
            "key_type": self.key_type, "key_size": self.key_size,
            "fingerprint_sha256": self.fingerprint, "generation": self.generation,
            "created": self.created.isoformat(), "updated": self.updated.isoformat(),
            "managed_by": self.managed_by,
        }

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> CertInfo:
        return cls(
            id=str(d["id"]), names=tuple(d["names"]), subject=str(d["subject"]),
            issuer=str(d["issuer"]), serial=int(d["serial"], 16),
            not_before=dt.datetime.fromisoformat(d["not_before"]),
            not_after=dt.datetime.fromisoformat(d["not_after"]),
            key_type=str(d["key_type"]), key_size=int(d["key_size"]),
            fingerprint=str(d["fingerprint_sha256"]), generation=int(d["generation"]),
            created=dt.datetime.fromisoformat(d["created"]),
            updated=dt.datetime.fromisoformat(d["updated"]),
            managed_by=d.get("managed_by"),
        )


@dataclass(frozen=True, slots=True)
class ImportResult:
    info: CertInfo
    warnings: tuple[str, ...]
    replaced: bool


def storage_error(what: str, exc: OSError, where: Path | str) -> StoreError:
    """A failed state write as an error naming the file and the cause (507 when the disk is
    full, 500 otherwise); whatever was stored before is untouched."""
    path = exc.filename or where
    cause = exc.strerror or type(exc).__name__
    status = 507 if exc.errno in (errno.ENOSPC, errno.EDQUOT) else 500
    return StoreError(f"{what}: cannot write {path}: {cause}", status=status)


class CertStore:
    """Certificates by id, cached in memory, persisted under `<state_dir>/certs`.

    `usage(id)` names the VSs whose *config* lists the certificate; run-time assignments are kept
    here. Methods are thread-safe (the admin API runs disk writes in a worker thread).
    """

    def __init__(self, state_dir: Path, *, usage: Usage = lambda _id: (),
                 clock: Clock = _utcnow) -> None:
        self.root = Path(state_dir) / "certs"
        self._usage = usage
        self._clock = clock
        self._lock = threading.RLock()
        self._infos: dict[str, CertInfo] = {}
        self._material: dict[str, CertMaterial] = {}
        self._vs_assign: dict[str, VSCertificates] = {}
        self._admin_assign: tuple[str, ...] = ()
        self._version = 0
        # Told after every change (from the thread that made it): cheap, non-blocking calls.
        self._watchers: list[Callable[[], None]] = []
        # Damaged state found at load: id (or file name) -> what is wrong, naming the path.
        # Such a certificate is not served and not overwritten until the operator moves it.
        self.problems: dict[str, str] = {}
        mkdir_private(Path(state_dir))
        mkdir_private(self.root)
        # The store opens the state directory first at start, before anything writes there
        # (the admin token is written into it later): debris of a crash is dropped here.
        remove_debris(Path(state_dir))
        self._load()

    # -- CertLookup -----------------------------------------------------------------------------

    @property
    def version(self) -> int:
        return self._version

    def material(self, cert_id: str) -> CertMaterial | None:
        return self._material.get(cert_id)

    def assignment(self, vs_name: str) -> VSCertificates:
        return self._vs_assign.get(vs_name, VSCertificates())

    def watch(self, callback: Callable[[], None]) -> None:
        """Call `callback()` after each change of a certificate or an assignment, from the thread
        that made it (a worker thread of the admin API too): it must only schedule work."""
        self._watchers.append(callback)

    def _changed(self) -> None:
        self._version += 1
        for callback in self._watchers:
            callback()

    # -- reading --------------------------------------------------------------------------------

    def set_usage(self, usage: Usage) -> None:
        self._usage = usage

    def get(self, cert_id: str) -> CertInfo | None:
        return self._infos.get(cert_id)

    def require(self, cert_id: str) -> CertInfo:
        info = self._infos.get(cert_id)
        if info is None:
            raise StoreError(f"no certificate {cert_id!r} in the store", status=404)
        return info

    def list(self) -> tuple[CertInfo, ...]:
        return tuple(sorted(self._infos.values(), key=lambda i: i.id))

    def users(self, cert_id: str) -> tuple[str, ...]:
        """Every VS (config or run-time assignment) and "admin" that uses a certificate."""
        out = set(self._usage(cert_id))
        out.update(vs for vs, a in self._vs_assign.items()
                   if cert_id in a.certificates or a.default == cert_id)
        if cert_id in self._admin_assign:
            out.add(ADMIN_TARGET)
        return tuple(sorted(out))

    def assignments(self) -> dict[str, Any]:
        return {
            "vs": {vs: {"certificates": list(a.certificates), "default": a.default}
                   for vs, a in sorted(self._vs_assign.items())},
            ADMIN_TARGET: list(self._admin_assign),
        }

    @property
    def admin_certificates(self) -> tuple[str, ...]:
        return self._admin_assign

    # -- writing --------------------------------------------------------------------------------

    def import_pem(self, cert_id: str, cert_pem: bytes, key_pem: bytes = b"",
                   chain_pem: bytes = b"", *, passphrase: bytes | None = None,
                   strict: bool = False, replace: bool = False, managed_by: str | None = None,
                   override: bool = False, trusted_key: bool = False) -> ImportResult:
        """Add (or with `replace`, replace) a certificate from PEM.

        `override` lets the Let's Encrypt manager replace a certificate it manages; the generic
        path refuses to touch managed certificates. `trusted_key`: a key lbproxy generated
        itself (parse.parse_pem).
        """
        check_id(cert_id)
        parsed = parse_pem(cert_pem, key_pem, chain_pem, passphrase=passphrase,
                           now=self._clock(), strict=strict, trusted_key=trusted_key)
        return self._put(cert_id, parsed, replace=replace, managed_by=managed_by,
                         override=override)

    def import_pkcs12(self, cert_id: str, data: bytes, *, passphrase: bytes | None = None,
                      strict: bool = False, replace: bool = False,
                      managed_by: str | None = None, override: bool = False) -> ImportResult:
        check_id(cert_id)
        parsed = parse_pkcs12(data, passphrase=passphrase, now=self._clock(), strict=strict)
        return self._put(cert_id, parsed, replace=replace, managed_by=managed_by,
                         override=override)

    def delete(self, cert_id: str, *, override: bool = False) -> None:
        """Remove a certificate; refused (409) while anything uses it or if it is managed."""
        with self._lock:
            info = self.require(cert_id)
            self._refuse_managed(info, "delete", override)
            users = self.users(cert_id)
            if users:
                raise StoreError(f"certificate {cert_id!r} is in use by {', '.join(users)}; "
                                 "unassign it first", status=409)
            where = safe_path(self.root, cert_id)
            trash = safe_path(self.root, f"{_TRASH_PREFIX}{cert_id}.{secrets.token_hex(4)}")
            try:
                os.replace(where, trash)
                fsync_dir(self.root)
            except OSError as exc:
                raise storage_error(f"certificate {cert_id!r} not deleted", exc,
                                    where) from None
            shutil.rmtree(trash, ignore_errors=True)
            del self._infos[cert_id]
            del self._material[cert_id]
            self._changed()
        logger.info("certificate %r deleted", cert_id)

    def assign(self, cert_id: str, target: str, *, default: bool = False) -> None:
        """Make a VS (or "admin") serve a certificate; `default` makes it the VS's default."""
        with self._lock:
            self.require(cert_id)
            admin = self._admin_assign
            vs_assign = dict(self._vs_assign)
            if target == ADMIN_TARGET:
                admin = (*(c for c in admin if c != cert_id), cert_id)
            else:
                cur = vs_assign.get(target, VSCertificates())
                certs = (*(c for c in cur.certificates if c != cert_id), cert_id)
                vs_assign[target] = VSCertificates(certs, cert_id if default else cur.default)
            self._save_assignments(vs_assign, admin)
        logger.info("certificate %r assigned to %r%s", cert_id, target,
                    " as default" if default else "")

    def unassign(self, cert_id: str, target: str) -> bool:
        """Undo a run-time assignment; False if there was none (config assignments stay)."""
        with self._lock:
            admin = self._admin_assign
            vs_assign = dict(self._vs_assign)
            if target == ADMIN_TARGET:
                if cert_id not in admin:
                    return False
                admin = tuple(c for c in admin if c != cert_id)
            else:
                cur = vs_assign.get(target)
                if cur is None or (cert_id not in cur.certificates and cur.default != cert_id):
                    return False
                new = VSCertificates(tuple(c for c in cur.certificates if c != cert_id),
                                     None if cur.default == cert_id else cur.default)
                if new.certificates or new.default:
                    vs_assign[target] = new
                else:
                    del vs_assign[target]
            self._save_assignments(vs_assign, admin)
        logger.info("certificate %r unassigned from %r", cert_id, target)
        return True

    # -- internals ------------------------------------------------------------------------------

    @staticmethod
    def _refuse_managed(info: CertInfo, what: str, override: bool) -> None:
        if info.managed_by and not override:
            raise StoreError(f"certificate {info.id!r} is managed by {info.managed_by}; "
                             f"{what} it through {info.managed_by}", status=409)

    def _put(self, cert_id: str, parsed: ParsedCertificate, *, replace: bool,
             managed_by: str | None, override: bool) -> ImportResult:
        now = self._clock()
        with self._lock:
            old = self._infos.get(cert_id)
            if old is not None and not replace:
                raise StoreError(f"certificate {cert_id!r} already exists; replace it instead",
                                 status=409)
            if old is None and replace:
                raise StoreError(f"no certificate {cert_id!r} to replace", status=404)
            if old is not None:
                self._refuse_managed(old, "replace", override)
            if cert_id in self.problems:
                raise StoreError(f"certificate {cert_id!r} is damaged on disk "
                                 f"({self.problems[cert_id]}); move {self.root / cert_id} "
                                 "away before importing it again", status=409)
            info = CertInfo(
                id=cert_id, names=parsed.names, subject=parsed.subject, issuer=parsed.issuer,
                serial=parsed.serial, not_before=parsed.not_before, not_after=parsed.not_after,
                key_type=parsed.key_type, key_size=parsed.key_size,
                fingerprint=parsed.fingerprint,
                generation=old.generation + 1 if old else 1,
                created=old.created if old else now, updated=now,
                managed_by=managed_by if managed_by is not None or old is None
                else old.managed_by,
            )
            try:
                if old is None:
                    self._write_new(info, parsed)
                else:
                    self._write_generation(info, parsed, old.generation)
            except OSError as exc:
                raise storage_error(f"certificate {cert_id!r} not stored", exc,
                                    self.root / cert_id) from None
            self._infos[cert_id] = info
            self._material[cert_id] = CertMaterial(
                cert_id, parsed.chain_pem, parsed.key_pem, parsed.names, parsed.serial,
                parsed.fingerprint)
            self._changed()
        for w in parsed.warnings:
            logger.warning("certificate %r: %s", cert_id, w)
        logger.info("certificate %r %s: serial %x, names %s, not after %s", cert_id,
                    "replaced" if old else "imported", info.serial, ",".join(info.names),
                    info.not_after.isoformat())
        return ImportResult(info, parsed.warnings, old is not None)

    @staticmethod
    def _write_files(directory: Path, info: CertInfo, parsed: ParsedCertificate) -> None:
        g = info.generation
        # The two PEM files durable (one directory fsync for both) before meta.json, the commit
        # point of a generation, is renamed in. Compact JSON: the C encoder (indent is not).
        write_atomic(directory / f"fullchain-{g}.pem", parsed.chain_pem, sync_dir=False)
        write_atomic(directory / f"key-{g}.pem", parsed.key_pem)
        write_atomic(directory / _META,
                     json.dumps(info.to_json(), separators=(", ", ": ")).encode() + b"\n")

    def _write_new(self, info: CertInfo, parsed: ParsedCertificate) -> None:
        final = safe_path(self.root, info.id)
        tmp = safe_path(self.root, f"{TMP_PREFIX}{info.id}.{secrets.token_hex(4)}")
        os.mkdir(tmp, 0o700)
        try:
            os.chmod(tmp, 0o700)
            self._write_files(tmp, info, parsed)
            os.rename(tmp, final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        fsync_dir(self.root)

    def _write_generation(self, info: CertInfo, parsed: ParsedCertificate, old_gen: int) -> None:
        d = safe_path(self.root, info.id)
        try:
            self._write_files(d, info, parsed)
        except BaseException:
            for name in (f"fullchain-{info.generation}.pem", f"key-{info.generation}.pem"):
                with contextlib.suppress(OSError):
                    (d / name).unlink()
            raise
        for name in (f"fullchain-{old_gen}.pem", f"key-{old_gen}.pem"):
            with contextlib.suppress(OSError):
                (d / name).unlink()

    def _save_assignments(self, vs_assign: dict[str, VSCertificates],
                          admin: tuple[str, ...]) -> None:
        doc = {"vs": {vs: {"certificates": list(a.certificates), "default": a.default}
                      for vs, a in sorted(vs_assign.items())},
               ADMIN_TARGET: list(admin)}
        try:
            write_atomic(self.root / _ASSIGNMENTS, json.dumps(doc, indent=2).encode())
        except OSError as exc:
            raise storage_error("assignment not stored", exc, self.root / _ASSIGNMENTS) from None
        self._vs_assign = vs_assign
        self._admin_assign = admin
        self._changed()

    def _load(self) -> None:
        # Debris of an interrupted write or delete: never committed, safe to drop.
        remove_debris(self.root, (TMP_PREFIX, _TRASH_PREFIX))
        for entry in sorted(self.root.iterdir()):
            name = entry.name
            if name == _ASSIGNMENTS or not entry.is_dir():
                continue
            try:
                if not valid_id(name):
                    raise ValueError(f"{name!r} is not a valid certificate id")
                self._load_one(entry)
            except (OSError, ValueError, KeyError, TypeError, StoreError) as e:
                self.problems[name] = f"{entry}: {e}"
                logger.error("certificate directory %s is damaged (%s); not served, left as "
                             "it is", entry, e)
        path = self.root / _ASSIGNMENTS
        if path.exists():
            try:
                doc = json.loads(path.read_bytes())
                self._vs_assign = {
                    vs: VSCertificates(tuple(a["certificates"]), a.get("default"))
                    for vs, a in doc.get("vs", {}).items()}
                self._admin_assign = tuple(doc.get(ADMIN_TARGET, ()))
            except (OSError, ValueError, KeyError, TypeError) as e:
                self.problems[_ASSIGNMENTS] = f"{path}: {e}"
                logger.error("%s is damaged (%s); no run-time assignments loaded", path, e)
        self._changed()
        logger.info("certificate store %s: %d certificates", self.root, len(self._infos))

    def _load_one(self, d: Path) -> None:
        info = CertInfo.from_json(json.loads((d / _META).read_bytes()))
        if info.id != d.name:
            raise ValueError(f"meta.json names {info.id!r}")
        g = info.generation
        chain_path, key_path = d / f"fullchain-{g}.pem", d / f"key-{g}.pem"
        chain, key = chain_path.read_bytes(), key_path.read_bytes()
        # What is served must be what meta.json describes: a garbled PEM or a key of another
        # certificate is refused here rather than failing (or worse) at a TLS handshake.
        try:
            # Keys in the store were checked when they came in (import or issue).
            parsed = parse_pem(chain, key, now=self._clock(), trusted_key=True)
        except CertInputError as exc:
            raise ValueError(f"{chain_path.name}/{key_path.name}: {exc}") from None
        if parsed.fingerprint != info.fingerprint or parsed.serial != info.serial:
            raise ValueError(f"{chain_path.name} is not the certificate meta.json describes "
                             f"(serial {parsed.serial:x}, expected {info.serial:x})")
        for stale in d.iterdir():  # generations other than the committed one never served
            if stale.name not in (_META, f"fullchain-{g}.pem", f"key-{g}.pem"):
                stale.unlink(missing_ok=True)
        self._infos[info.id] = info
        self._material[info.id] = CertMaterial(info.id, chain, key, info.names, info.serial,
                                               info.fingerprint)


def with_users(info: CertInfo, users: Iterable[str]) -> dict[str, Any]:
    """The JSON the admin API shows for a certificate: its metadata plus who uses it."""
    return {**info.to_json(), "used_by": sorted(users)}


__all__ = ["ADMIN_TARGET", "CertInfo", "CertStore", "ImportResult", "check_id", "config_usage",
           "mkdir_private", "storage_error", "valid_id", "with_users", "write_atomic"]
