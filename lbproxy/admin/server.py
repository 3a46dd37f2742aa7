"""Serving the admin application on its address (aiohttp AppRunner + TCPSite), over plain HTTP
or over HTTPS with the certificate assigned to "admin" in the certificate store, and refusing
plain HTTP where the config does not allow it (off loopback without `insecure`, or `tls`)."""

from __future__ import annotations

import asyncio
import logging
import ssl

from aiohttp import web

from ..certs.store import ADMIN_TARGET, CertStore
from ..config.loader import is_loopback
from ..config.model import Address, AdminSettings, Protocol, TLSSettings, VirtualService
from ..errors import CannotListen, ConfigError, ConfigProblem
from ..proxy.tls import CertMaterial, TLSContexts, VSCertificates
from .api import ADMIN_LISTENER_KEY, ADMIN_TLS_REQUIRED_KEY, RUNTIME_KEY

logger = logging.getLogger(__name__)

# Seconds an admin request in flight may take to finish when the process shuts down.
SHUTDOWN_TIMEOUT = 5.0


class _AdminLookup:
    """The store seen through `CertLookup` with the admin assignments as the pseudo VS "admin"
    (the newest assignment is the default, so a new assignment takes over at once)."""

    def __init__(self, store: CertStore) -> None:
        self._store = store

    @property
    def version(self) -> int:
        return self._store.version

    def material(self, cert_id: str) -> CertMaterial | None:
        return self._store.material(cert_id)

    def assignment(self, vs_name: str) -> VSCertificates:
        if vs_name != ADMIN_TARGET:
            return VSCertificates()
        certs = self._store.admin_certificates
        return VSCertificates(certs, certs[-1] if certs else None)


class AdminTLS:
    """The admin listener's TLS: `TLSContexts` over one pseudo HTTPS VS named "admin", so the
    admin API gets the data plane's context (TLS 1.2+, modern AEAD suites, ALPN http/1.1) and its
    live certificate swap: a replaced or renewed certificate is used by the next handshake."""

    def __init__(self, store: CertStore, settings: TLSSettings | None = None) -> None:
        self._store = store
        settings = settings if settings is not None else TLSSettings()
        # Only name, protocol and tls are read by TLSContexts; the address is never bound.
        self._vs = VirtualService(name=ADMIN_TARGET, listen=Address("127.0.0.1", 0),
                                  protocol=Protocol.HTTPS, tls=settings)
        self._contexts = TLSContexts(_AdminLookup(store), (self._vs,))

    @property
    def wanted(self) -> bool:
        """True while a certificate is assigned to "admin" (then the API speaks only HTTPS; an
        unusable certificate fails handshakes instead of falling back to plain HTTP)."""
        return bool(self._store.admin_certificates)

    def context(self) -> ssl.SSLContext:
        """The listener context (the same object every time; its SNI callback picks the cert)."""
        return self._contexts.factory(self._vs)

    def serving(self) -> str | None:
        """The certificate id the next handshake gets, None if none is usable."""
        return self._contexts.choose(ADMIN_TARGET, None)


class AdminServer:
    """A running admin API; `port` is the bound port (useful with port 0), `scheme` is "http"
    or "https". With an `AdminTLS`, `sync()` (called by the assign/unassign routes) switches the
    listener between HTTP and HTTPS when the "admin" assignment appears or disappears."""

    def __init__(self, runner: web.AppRunner, host: str, port: int,
                 tls: AdminTLS | None, *, require_tls: bool = False) -> None:
        self._runner = runner
        # Never fall back to plain HTTP (the unassign route refuses the last admin certificate
        # first; this is the listener's own guard).
        self._require_tls = require_tls
        self._site: web.TCPSite | None = None
        self._host = host
        self.port = port
        self._tls = tls
        self._ssl: ssl.SSLContext | None = None
        # Two (un)assignments at once must not both reopen the socket.
        self._switching = asyncio.Lock()

    @property
    def scheme(self) -> str:
        return "https" if self._ssl is not None else "http"

    async def _open(self, ssl_context: ssl.SSLContext | None) -> None:
        site = web.TCPSite(self._runner, self._host, self.port, ssl_context=ssl_context,
                           reuse_address=True)
        await site.start()
        self._site = site
        self._ssl = ssl_context
        if self.port == 0:  # the real port when 0 was asked for; kept across switches
            bound = self._runner.addresses
            self.port = int(bound[0][1]) if bound else 0
        logger.info("admin API listening on %s://%s:%d", self.scheme, self._host, self.port)

    async def sync(self) -> None:
        """Reopen the listener if HTTP/HTTPS no longer matches the "admin" assignment.

        Only the listening socket is replaced: connections already open (the one that asked for
        the change included) finish on the old protocol.
        """
        if self._tls is None or self._site is None:
            return
        async with self._switching:
            if self._tls.wanted == (self._ssl is not None):
                return
            if not self._tls.wanted and self._require_tls:
                logger.error("admin API: no certificate is assigned to %r any more; staying on "
                             "HTTPS (handshakes fail until one is assigned)", ADMIN_TARGET)
                return
            new = self._tls.context() if self._tls.wanted else None
            await self._site.stop()
            try:
                await self._open(new)
            except OSError:
                logger.exception("admin API: cannot reopen %s:%d as %s; reopening as before",
                                 self._host, self.port, "https" if new else "http")
                await self._open(self._ssl)
                raise

    async def close(self) -> None:
        await self._runner.cleanup()
        logger.info("admin API stopped")


def _refuse_plain_http(address: Address, settings: AdminSettings) -> None:
    """Raise ConfigError when the API is about to serve plain HTTP where the config forbids it.

    The loader already refuses a non-loopback `listen` without `tls` or `insecure`; `tls`
    itself can only be checked here, against the certificate store.
    """
    if settings.tls:
        raise ConfigError([ConfigProblem("admin.tls", (
            f"is true but no certificate is assigned to {ADMIN_TARGET!r}: the admin API will "
            "not serve plain HTTP; assign one while it listens on loopback (lbproxy cert assign "
            f"ID {ADMIN_TARGET}), or set tls = false"))])
    if not (settings.insecure or is_loopback(address.host)):
        raise ConfigError([ConfigProblem("admin.listen", (
            f"{address} is not a loopback address and the admin API would serve plain HTTP: "
            "set admin.tls = true or admin.insecure = true"))])
    if settings.insecure and not is_loopback(address.host):
        logger.warning("admin API serves plain HTTP on %s (admin.insecure = true): the bearer "
                       "token and uploaded keys cross the network in clear", address)


async def start_admin(app: web.Application, address: Address,
                      ssl_context: ssl.SSLContext | None = None, *,
                      tls: AdminTLS | None = None) -> AdminServer:
    """Start serving `app` on `address` (127.0.0.1:8444 by default in the config).

    With `tls`, the API serves HTTPS while a certificate is assigned to "admin" and follows
    assignment changes made through the API; `ssl_context` is a fixed context instead. The
    `[admin]` settings come from the app's runtime config (the defaults without one): plain
    HTTP is refused with ConfigError when `tls = true`, or off loopback without `insecure`.
    """
    if tls is not None and ssl_context is not None:
        raise ValueError("give either ssl_context or tls, not both")
    runtime = app.get(RUNTIME_KEY)
    settings = runtime.current.config.admin if runtime is not None else AdminSettings()
    if tls is not None and tls.wanted:
        ssl_context = tls.context()
    if ssl_context is None:
        _refuse_plain_http(address, settings)
    # No access log: admin requests are few, and bodies (keys) are never logged anyway.
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=SHUTDOWN_TIMEOUT)
    server = AdminServer(runner, address.host, address.port, tls, require_tls=settings.tls)
    app[ADMIN_LISTENER_KEY] = server.sync
    app[ADMIN_TLS_REQUIRED_KEY] = settings.tls
    await runner.setup()
    try:
        await server._open(ssl_context)
    except OSError as e:  # the port is taken, or the address is not this host's
        await runner.cleanup()
        raise CannotListen.from_os_error(str(address), "admin API", e) from e
    except BaseException:
        await runner.cleanup()
        raise
    return server
