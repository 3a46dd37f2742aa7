"""TLS for HTTPS Virtual Services: one SSLContext per certificate, SNI selection per VS, live swap.

The data plane never imports the certificate store; it reads certificates through `CertLookup`
(the store implements it). `TLSContexts.factory(vs)` gives a listener its one SSLContext, whose
`sni_callback` picks the certificate context for each handshake from the *current* mapping. A
certificate change or a new assignment rebuilds the mappings and swaps one dict reference: new
handshakes see it at once, established connections keep the context they shook hands with, and no
listener restarts.

tls-alpn-01 (RFC 8737) is answered here too: while a validation runs on a VS (`Runtime.
validations`), its listener context reads each ClientHello's ALPN list through OpenSSL's message
callback (`SSLContext._msg_callback`, the one hook that sees the ClientHello before the servername
callback; `ssl` exposes the client's ALPN list nowhere else), and the servername callback gives a
handshake for the name that offers "acme-tls/1" alone the validation certificate. Every other
handshake is chosen as ever, and without a validation the callback is off: no cost.
"""

from __future__ import annotations

import logging
import os
import ssl
import tempfile
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from ..config.model import Protocol as VSProtocol
from ..config.model import VirtualService
from ..errors import LBProxyError
from ..runtime import AlpnValidation, Runtime
from .clienthello import ACME_TLS_ALPN, alpn_offered, remember_alpn
from .tickets import set_ticket_keys

_ONLY_ACME = (ACME_TLS_ALPN,)

logger = logging.getLogger(__name__)

# A context's key in the cache: certificate id, fingerprint, cipher policy, ALPN protocols.
_Key = tuple[str, str, str, tuple[str, ...]]

# The application protocols we speak on TLS (RFC 7301 ALPN identifiers): HTTP/1.1 always, and
# HTTP/2 first on a VS with `http2 = true` (h2conn.py).
ALPN_PROTOCOLS = ("http/1.1",)
ALPN_H2 = ("h2", "http/1.1")


class TLSSetupError(LBProxyError):
    """A TLS context could not be built (bad cipher string, unusable key or certificate)."""


@dataclass(frozen=True, slots=True)
class CertMaterial:
    """One certificate as a TLS server needs it. `fingerprint` (SHA-256 of the leaf, hex) names
    this exact version, so a context is rebuilt only when the certificate really changed."""

    cert_id: str
    chain_pem: bytes  # the leaf first, then the intermediates
    key_pem: bytes  # unencrypted PKCS#8
    names: tuple[str, ...]  # lower-case DNS names, wildcards as "*.example.com"
    serial: int
    fingerprint: str


@dataclass(frozen=True, slots=True)
class VSCertificates:
    """Run-time assignments for one VS: certificate ids (oldest first) and an optional default."""

    certificates: tuple[str, ...] = ()
    default: str | None = None


class CertLookup(Protocol):
    """Where TLS reads certificates from. `version` changes whenever a certificate or an
    assignment changes, so a reader can tell that its mapping is stale."""

    @property
    def version(self) -> int: ...

    def material(self, cert_id: str) -> CertMaterial | None: ...

    def assignment(self, vs_name: str) -> VSCertificates: ...


@dataclass(frozen=True, slots=True)
class CertSnapshot:
    """The certificates and assignments the HTTPS VSs of one generation serve, as a CertLookup:
    what a worker process reads, sent whole by its control process whenever one changes."""

    version: int = 0
    materials: Mapping[str, CertMaterial] = field(default_factory=dict)
    assignments: Mapping[str, VSCertificates] = field(default_factory=dict)

    def material(self, cert_id: str) -> CertMaterial | None:
        return self.materials.get(cert_id)

    def assignment(self, vs_name: str) -> VSCertificates:
        return self.assignments.get(vs_name) or VSCertificates()


def snapshot(lookup: CertLookup, services: Iterable[VirtualService], version: int) -> CertSnapshot:
    """What `services` (HTTPS ones) can serve from `lookup` now, numbered `version`."""
    materials: dict[str, CertMaterial] = {}
    assignments: dict[str, VSCertificates] = {}
    for vs in services:
        if vs.protocol is not VSProtocol.HTTPS:
            continue
        assigned = assignments[vs.name] = lookup.assignment(vs.name)
        default = default_certificate(vs, assigned)
        for cid in (*certificate_order(vs, assigned), *((default,) if default else ())):
            if cid not in materials:
                m = lookup.material(cid)
                if m is not None:
                    materials[cid] = m
    return CertSnapshot(version, materials, assignments)


class SwappedLookup:
    """A CertLookup whose snapshot is replaced whole (a worker's, fed by its control process)."""

    def __init__(self) -> None:
        self.current = CertSnapshot()

    @property
    def version(self) -> int:
        return self.current.version

    def material(self, cert_id: str) -> CertMaterial | None:
        return self.current.material(cert_id)

    def assignment(self, vs_name: str) -> VSCertificates:
        return self.current.assignment(vs_name)


@dataclass(frozen=True, slots=True)
class Selection:
    """The SNI mapping of one VS: exact names, wildcard parents ("example.com" for
    "*.example.com"), and the default for a missing or unknown name."""

    exact: dict[str, tuple[str, ssl.SSLContext]] = field(default_factory=dict)
    wildcard: dict[str, tuple[str, ssl.SSLContext]] = field(default_factory=dict)
    default: tuple[str, ssl.SSLContext] | None = None

    def pick(self, server_name: str | None) -> tuple[str, ssl.SSLContext] | None:
        if server_name:
            name = server_name.lower().rstrip(".")
            hit = self.exact.get(name)
            if hit is not None:
                return hit
            # A wildcard covers exactly one left-most label (RFC 6125 section 6.4.3).
            _, dot, parent = name.partition(".")
            if dot:
                hit = self.wildcard.get(parent)
                if hit is not None:
                    return hit
        return self.default


def certificate_order(vs: VirtualService, assigned: VSCertificates) -> tuple[str, ...]:
    """The certificates a VS serves, in SNI priority order: run-time assignments (newest first,
    they are the operator's or the ACME manager's latest word), then the config's list."""
    out: list[str] = []
    for cid in (*reversed(assigned.certificates), *vs.tls.certificates):
        if cid not in out:
            out.append(cid)
    return tuple(out)


def default_certificate(vs: VirtualService, assigned: VSCertificates) -> str | None:
    """The certificate for a handshake without SNI or with an unknown name."""
    if assigned.default:
        return assigned.default
    if vs.tls.default_certificate:
        return vs.tls.default_certificate
    if vs.tls.certificates:
        return vs.tls.certificates[0]
    return assigned.certificates[0] if assigned.certificates else None


def _alpn(vs: VirtualService) -> tuple[str, ...]:
    return ALPN_H2 if vs.http2 else ALPN_PROTOCOLS


def _base_context(ciphers: str, alpn: tuple[str, ...] = ALPN_PROTOCOLS) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.maximum_version = ssl.TLSVersion.TLSv1_3
    ctx.options |= (ssl.OP_NO_COMPRESSION | ssl.OP_CIPHER_SERVER_PREFERENCE
                    | ssl.OP_NO_RENEGOTIATION)
    try:
        # Only TLS 1.2 suites are chosen here; OpenSSL always offers its TLS 1.3 AEAD suites.
        ctx.set_ciphers(ciphers)
    except ssl.SSLError:
        raise TLSSetupError(f"cipher policy {ciphers!r} selects no cipher") from None
    ctx.set_alpn_protocols(list(alpn))
    # One TLS 1.3 session ticket per full handshake, as Go's TLS (Caddy, Traefik) sends, not
    # OpenSSL's two: a client resumes one connection with one ticket, and each ticket costs the
    # server an encryption, a callback (tickets.py) and a record (~7 % of a handshake's CPU here,
    # bench/README.md "HTTPS").
    ctx.num_tickets = 1
    return ctx


def build_context(material: CertMaterial, ciphers: str,
                  alpn: tuple[str, ...] = ALPN_PROTOCOLS) -> ssl.SSLContext:
    """A server context holding one certificate chain and its key.

    `ssl` loads keys from files only, so the key passes through a private temporary directory
    (0700, file 0600) that is removed at once.
    """
    ctx = _base_context(ciphers, alpn)
    with tempfile.TemporaryDirectory(prefix="lbproxy-tls-") as tmp:
        chain = Path(tmp) / "chain.pem"
        key = Path(tmp) / "key.pem"
        for path, data in ((chain, material.chain_pem), (key, material.key_pem)):
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "wb") as f:
                f.write(data)
        try:
            ctx.load_cert_chain(chain, key)
        except ssl.SSLError as e:
            raise TLSSetupError(
                f"certificate {material.cert_id!r} cannot be used for TLS: {e.reason}") from None
    return ctx


class TLSContexts:
    """Builds and swaps the TLS contexts of every HTTPS VS.

    Call `factory(vs)` once per listener; feed run-time changes through `on_runtime` (subscribe
    it to the RuntimeStore) and `refresh()` after a store change. A handshake also notices a
    changed `lookup.version` by itself, so a writer that forgets `refresh()` is still served on
    the next handshake.
    """

    def __init__(self, lookup: CertLookup, services: Iterable[VirtualService] = ()) -> None:
        self._lookup = lookup
        self._services: dict[str, VirtualService] = {
            vs.name: vs for vs in services if vs.protocol is VSProtocol.HTTPS}
        self._listeners: dict[str, ssl.SSLContext] = {}
        # (cert id, fingerprint, ciphers, ALPN) -> context; contexts are shared between VSs (the
        # one SNI picks answers ALPN too: a VS's own protocols are in its key).
        self._cache: dict[_Key, ssl.SSLContext] = {}
        self._selections: dict[str, Selection] = {}
        self._built_version = -1
        self.rebuilds = 0
        # Session ticket keys shared with other processes (workers); () = OpenSSL's own.
        self._ticket_keys: tuple[bytes, ...] = ()
        # tls-alpn-01: VS name -> host -> the validation context; empty when none runs (the
        # servername callback then costs one truth test more).
        self._validations: dict[str, dict[str, ssl.SSLContext]] = {}
        self._validation_cache: dict[tuple[str, str, str, bytes], ssl.SSLContext] = {}
        self.refresh(force=True)

    # -- inputs ---------------------------------------------------------------------------------

    async def on_runtime(self, rt: Runtime) -> None:
        """RuntimeStore listener: a reload may change a VS's certificates or cipher policy."""
        self.use(rt)

    def use(self, rt: Runtime) -> None:
        """What a generation says about TLS: its HTTPS VSs and its tls-alpn-01 validations."""
        self.set_services(rt.effective_services())
        self.set_validations(rt.validations)

    def set_validations(self, validations: Iterable[AlpnValidation]) -> None:
        """The tls-alpn-01 validations to answer now (RFC 8737). A validation certificate that
        cannot be loaded is logged and skipped (the CA's validation of that name fails)."""
        found: dict[str, dict[str, ssl.SSLContext]] = {}
        cache: dict[tuple[str, str, str, bytes], ssl.SSLContext] = {}
        for v in validations:
            vs = self._services.get(v.vs)
            if vs is None:
                logger.warning("tls-alpn-01 for %s: VS %r is not an HTTPS VS here; not served",
                               v.host, v.vs)
                continue
            key = (v.vs, v.host, v.token, v.cert_pem)
            ctx = self._validation_cache.get(key)
            if ctx is None:
                material = CertMaterial(f"tls-alpn-01 {v.host}", v.cert_pem, v.key_pem,
                                        (v.host,), 0, "")
                try:
                    ctx = build_context(material, vs.tls.ciphers, _ONLY_ACME)
                except TLSSetupError as e:
                    logger.error("%s", e)
                    continue
                ctx.options |= ssl.OP_NO_TICKET
            cache[key] = ctx
            found.setdefault(v.vs, {})[v.host] = ctx
        self._validation_cache = cache
        self._validations = found
        for name, listener in self._listeners.items():
            self._watch_hellos(name, listener)

    def _watch_hellos(self, name: str, listener: ssl.SSLContext) -> None:
        # A new connection takes the callback its listener context has when it is accepted.
        want = remember_alpn if name in self._validations else None
        if getattr(listener, "_msg_callback", None) is not want:
            listener._msg_callback = want  # type: ignore[attr-defined]

    def validating(self, vs_name: str) -> tuple[str, ...]:
        """The names a VS answers tls-alpn-01 for right now."""
        return tuple(sorted(self._validations.get(vs_name, ())))

    def set_services(self, services: Iterable[VirtualService]) -> None:
        new = {vs.name: vs for vs in services if vs.protocol is VSProtocol.HTTPS}
        # Validate every cipher policy before changing anything (a bad reload is refused whole).
        for vs in new.values():
            old = self._services.get(vs.name)
            if old is None or old.tls.ciphers != vs.tls.ciphers:
                _base_context(vs.tls.ciphers)
        for name, vs in new.items():
            listener = self._listeners.get(name)
            old = self._services.get(name)
            if listener is not None and old is not None and old.tls.ciphers != vs.tls.ciphers:
                # Applies to new handshakes on the running listener; no restart needed.
                listener.set_ciphers(vs.tls.ciphers)
            if listener is not None and old is not None and old.http2 != vs.http2:
                listener.set_alpn_protocols(list(_alpn(vs)))
        self._services = new
        self.refresh(force=True)

    def set_ticket_keys(self, keys: Sequence[bytes]) -> None:
        """Encrypt session tickets with keys[0] and accept tickets under any of `keys`, in every
        context now and later: the workers of one host share them, so a session one worker
        issued resumes on another (see tickets.py)."""
        self._ticket_keys = tuple(keys)
        for ctx in (*self._listeners.values(), *self._cache.values()):
            set_ticket_keys(ctx, self._ticket_keys)

    def refresh(self, *, force: bool = False) -> None:
        """Rebuild the SNI mappings if the lookup changed (or always with `force`).

        A certificate that fails to load is logged and skipped; the others keep working.
        """
        version = self._lookup.version
        if not force and version == self._built_version:
            return
        used: set[_Key] = set()
        selections: dict[str, Selection] = {}
        for vs in self._services.values():
            selections[vs.name] = self._select(vs, used)
        self._selections = selections
        self._cache = {k: v for k, v in self._cache.items() if k in used}
        self._built_version = version
        self.rebuilds += 1

    def _context(self, material: CertMaterial, ciphers: str, used: set[_Key],
                 alpn: tuple[str, ...] = ALPN_PROTOCOLS) -> ssl.SSLContext | None:
        key = (material.cert_id, material.fingerprint, ciphers, alpn)
        ctx = self._cache.get(key)
        if ctx is None:
            try:
                ctx = build_context(material, ciphers, alpn)
            except TLSSetupError as e:
                logger.error("%s", e)
                return None
            if self._ticket_keys:
                set_ticket_keys(ctx, self._ticket_keys)
            self._cache[key] = ctx
        used.add(key)
        return ctx

    def _select(self, vs: VirtualService, used: set[_Key]) -> Selection:
        assigned = self._lookup.assignment(vs.name)
        sel = Selection()
        for cid in certificate_order(vs, assigned):
            material = self._lookup.material(cid)
            if material is None:
                logger.warning("VS %r: certificate %r is not in the store; skipped", vs.name, cid)
                continue
            ctx = self._context(material, vs.tls.ciphers, used, _alpn(vs))
            if ctx is None:
                continue
            for name in material.names:
                if name.startswith("*."):
                    sel.wildcard.setdefault(name[2:], (cid, ctx))
                else:
                    sel.exact.setdefault(name, (cid, ctx))
        default_id = default_certificate(vs, assigned)
        if default_id is not None:
            material = self._lookup.material(default_id)
            if material is not None:
                ctx = self._context(material, vs.tls.ciphers, used, _alpn(vs))
                if ctx is not None:
                    return Selection(sel.exact, sel.wildcard, (default_id, ctx))
        # The named default is missing: fall back to any certificate rather than fail every
        # handshake without SNI.
        first = next(iter(sel.exact.values()), None) or next(iter(sel.wildcard.values()), None)
        return Selection(sel.exact, sel.wildcard, first)

    # -- outputs --------------------------------------------------------------------------------

    def choose(self, vs_name: str, server_name: str | None) -> str | None:
        """The certificate id a handshake with this SNI would get (for the admin API, tests)."""
        self.refresh()
        sel = self._selections.get(vs_name)
        hit = sel.pick(server_name) if sel is not None else None
        return hit[0] if hit is not None else None

    def serving(self, vs_name: str) -> tuple[str, ...]:
        """The certificate ids a VS serves right now, in SNI priority order (default first)."""
        self.refresh()
        sel = self._selections.get(vs_name)
        if sel is None:
            return ()
        out: list[str] = [sel.default[0]] if sel.default else []
        for cid, _ in (*sel.exact.values(), *sel.wildcard.values()):
            if cid not in out:
                out.append(cid)
        return tuple(out)

    def factory(self, vs: VirtualService) -> ssl.SSLContext:
        """The listener context of an HTTPS VS; call once when its listener opens.

        The same object is returned for the same VS name, so a listener that is re-created keeps
        its mapping. Raises TLSSetupError if the VS's cipher policy is unusable.
        """
        listener = self._listeners.get(vs.name)
        if listener is not None:
            return listener
        known = self._services.get(vs.name)
        if known is None or known.tls != vs.tls:
            self._services = {**self._services, vs.name: vs}
            self.refresh(force=True)
        listener = _base_context(vs.tls.ciphers, _alpn(vs))
        if self._ticket_keys:
            set_ticket_keys(listener, self._ticket_keys)
        name = vs.name

        def sni_callback(ssl_obj: ssl.SSLObject | ssl.SSLSocket, server_name: str | None,
                         _ctx: ssl.SSLContext) -> int | None:
            try:
                if self._validations and server_name:
                    ctx = self._validations.get(name, {}).get(server_name.lower().rstrip("."))
                    if ctx is not None and alpn_offered(ssl_obj) == _ONLY_ACME:
                        ssl_obj.context = ctx   # RFC 8737: the validator, and only it
                        return None
                if self._lookup.version != self._built_version:
                    self.refresh()
                sel = self._selections.get(name)
                hit = sel.pick(server_name) if sel is not None else None
            except Exception:  # a bug here must fail one handshake, not the listener
                logger.exception("VS %r: certificate selection failed", name)
                return ssl.ALERT_DESCRIPTION_INTERNAL_ERROR
            if hit is None:
                logger.warning("VS %r: no certificate to offer for %r", name, server_name)
                return ssl.ALERT_DESCRIPTION_HANDSHAKE_FAILURE
            ssl_obj.context = hit[1]
            return None

        listener.sni_callback = sni_callback
        self._listeners[name] = listener
        self._watch_hellos(name, listener)
        return listener
