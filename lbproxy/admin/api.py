"""The admin API (aiohttp): the single path for run-time changes, behind a bearer token.

Routes (JSON in, JSON out; errors are {"error": message, "field"?: name, "reason"?: code} with
a fitting status; malformed input is a 4xx naming its field, see lbproxy.admin.validate):

    GET    /api/status                      process, config generation, counts, expiring certs;
                                            every VS with listener, SubVSs, real servers (up,
                                            connections, requests, requests/s); every
                                            certificate (days left, next renewal, last error)
    GET    /api/certs                       every certificate with the VSs that use it
    POST   /api/certs                       import {id, cert, key?, chain?, passphrase?, strict?}
                                            or {id, pkcs12 (base64), passphrase?, strict?}
    GET    /api/certs/{id}                  one certificate (plus its public chain PEM)
    PUT    /api/certs/{id}                  replace; same body as import, without id
    DELETE /api/certs/{id}                  refused (409) while in use
    POST   /api/certs/{id}/assign           {target: VS name | "admin", default?: bool}
    POST   /api/certs/{id}/unassign         {target}
                                            (an "admin" assignment makes the API serve HTTPS
                                            with that certificate; see start_admin)
    GET    /api/vs                          every VS as the data plane runs it
    GET    /api/vs/{name}                   one VS: SubVSs, rules in precedence order, servers

Real-server entries of /api/status carry "state" (enabled | disabled | drain) and the effective
"weight". Reload and run-time real-server control (/api/reload, /api/servers) are
lbproxy.admin.ops_api's routes.

Later features add routes through `extra_routes` registrars (le_api.le_routes(manager) adds
/api/le/... and the certificate status source under CERT_STATUS_KEY; lbproxy.metrics adds
/metrics); they find the shared objects under the AppKeys below. Every route needs the bearer
token except the paths given in `open_paths` (e.g. ("/metrics",) for a Prometheus without the
token). The web page (lbproxy.admin.web: /ui/...) is served to anyone; behind its login, a
request without the bearer token is admitted by a live session cookie, plus the session's CSRF
header for every method but GET/HEAD/OPTIONS (else 403); a wrong bearer token is never helped
by a cookie. Request bodies may carry keys and passphrases: they are never logged. Bodies are JSON
objects of at most MAX_BODY bytes with only the fields listed (an unknown field is refused).
The JSON the reading routes answer with is built by lbproxy.admin.views.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import datetime as dt
import hmac
import logging
import os
import secrets
import time
from collections.abc import Awaitable, Callable, Collection, Iterable, Sequence
from pathlib import Path
from typing import Any

from aiohttp import web

from ..certs.store import (
    ADMIN_TARGET,
    CertStore,
    ImportResult,
    mkdir_private,
    with_users,
    write_atomic,
)
from ..config.model import Protocol, VirtualService
from ..errors import AdminError
from ..events import CertStatus
from ..metrics import RateMeter, request_counters
from ..proxy.tls import TLSContexts
from ..runtime import RuntimeStore
from .validate import (
    Body,
    FieldError,
    Flag,
    Handler,
    Schema,
    Text,
    json_errors,
    path_params,
    read_body,
    shown,
)
from .views import cert_view, certificates_status, services_status, vs_view
from .web import admit, has_session_cookie, is_public, web_routes

logger = logging.getLogger(__name__)

TOKEN_FILE = "admin.token"
# A certificate expiring sooner than this is flagged in /api/status.
EXPIRY_WARNING = dt.timedelta(days=14)
# Certificates, chains and base64 PKCS#12 files are small; 1 MiB is aiohttp's default and plenty.
MAX_BODY = 1024 * 1024

DataplaneStats = Callable[[], dict[str, Any]]
# With worker processes: collects every worker's stats, which DataplaneStats then reads.
StatsRefresh = Callable[[], Awaitable[None]]
WorkersView = Callable[[], list[dict[str, Any]]]
RouteRegistrar = Callable[[web.Application], None]

RUNTIME_KEY = web.AppKey("runtime", RuntimeStore)
STORE_KEY = web.AppKey("store", CertStore)
TLS_KEY = web.AppKey("tls", TLSContexts)
STATS_KEY: web.AppKey[DataplaneStats] = web.AppKey("dataplane_stats")
REFRESH_KEY: web.AppKey[StatsRefresh | None] = web.AppKey("stats_refresh")
WORKERS_KEY: web.AppKey[WorkersView | None] = web.AppKey("workers")
STARTED_KEY = web.AppKey("started", float)
CertStatusSource = Callable[[], Iterable[CertStatus]]
# Set by the Let's Encrypt manager's registrar: every certificate with its renewal schedule.
CERT_STATUS_KEY: web.AppKey[CertStatusSource] = web.AppKey("cert_status")
RATES_KEY = web.AppKey("rates", RateMeter)
AdminListenerSync = Callable[[], Awaitable[None]]
# Set by `start_admin`: reopens the admin listener as HTTP or HTTPS after an "admin" assignment
# change (absent when the app is served some other way).
ADMIN_LISTENER_KEY: web.AppKey[AdminListenerSync] = web.AppKey("admin_listener_sync")
# Set by `start_admin`: true when the config says `[admin] tls = true` (never plain HTTP).
ADMIN_TLS_REQUIRED_KEY = web.AppKey("admin_tls_required", bool)
# Requests/s in `status` are averaged over this window, sampled this often (seconds).
RATE_WINDOW = 60.0
RATE_SAMPLE_INTERVAL = 10.0


def load_or_create_token(state_dir: Path) -> str:
    """The admin bearer token, generated at first start into <state_dir>/admin.token (0600)."""
    path = Path(state_dir) / TOKEN_FILE
    try:
        token = path.read_text(encoding="ascii").strip()
    except FileNotFoundError:
        token = ""
    if token:
        if path.stat().st_mode & 0o077:
            os.chmod(path, 0o600)
            logger.warning("%s was readable by others; mode set to 0600", path)
        return token
    mkdir_private(Path(state_dir))
    token = secrets.token_urlsafe(32)  # 256 bits
    write_atomic(path, token.encode() + b"\n", 0o600)
    logger.info("admin token generated in %s", path)
    return token


def _auth_middleware(token: str, open_paths: Collection[str] = ()) -> Any:
    expected = token.encode()

    @web.middleware
    async def auth(request: web.Request, handler: Handler) -> web.StreamResponse:
        header = request.headers.get("Authorization", "")
        scheme, _, given = header.partition(" ")
        # aiohttp decodes header bytes that are not UTF-8 as lone surrogates: keep them bytes.
        given_raw = given.strip().encode("utf-8", "surrogateescape")
        ok = scheme.lower() == "bearer" and hmac.compare_digest(given_raw, expected)
        if not ok and request.method == "GET" and request.path in open_paths:
            ok = True
        if not ok and is_public(request):
            ok = True  # the web page and its login form (lbproxy.admin.web)
        if not ok and not header and has_session_cookie(request):
            refused = admit(request)  # the page's session cookie, and CSRF header if it changes
            return refused if refused is not None else await handler(request)
        if not ok:
            resp = web.json_response({"error": "missing or wrong bearer token" if header
                                      else "missing bearer token"}, status=401)
            resp.headers["WWW-Authenticate"] = 'Bearer realm="lbproxy"'
            return resp
        return await handler(request)

    return auth


# Request bodies: PEM, base64 and passphrase fields are bounded by MAX_BODY alone.
_IMPORT_FIELDS: Schema = {
    "cert": Text(max_len=None), "key": Text(max_len=None), "chain": Text(max_len=None),
    "pkcs12": Text(max_len=None), "passphrase": Text(max_len=None), "strict": Flag(),
}
IMPORT_SCHEMA: Schema = {"id": Text(required=True), "replace": Flag(), **_IMPORT_FIELDS}
# PUT /api/certs/{id}: an "id" in the body, if any, must be the one in the path.
REPLACE_SCHEMA: Schema = {"id": Text(), **_IMPORT_FIELDS}
ASSIGN_SCHEMA: Schema = {"target": Text(required=True), "default": Flag()}
UNASSIGN_SCHEMA: Schema = {"target": Text(required=True)}


# -- handlers -------------------------------------------------------------------------------------

def _services(request: web.Request) -> tuple[tuple[VirtualService, ...], set[str]]:
    rt = request.app[RUNTIME_KEY].current
    return rt.effective_services(), {i.rule.name for i in rt.injections}


async def status(request: web.Request) -> web.Response:
    app = request.app
    rt = app[RUNTIME_KEY].current
    store = app[STORE_KEY]
    now = dt.datetime.now(dt.UTC)
    expiring = [{"id": i.id, "not_after": i.not_after.isoformat(),
                 "expired": i.not_after < now}
                for i in store.list() if i.not_after - now < EXPIRY_WARNING]
    stats = await dataplane_stats(app)
    counters = request_counters(stats)
    meter = app[RATES_KEY]
    mono = time.monotonic()
    rates = meter.rates(mono, counters)
    meter.observe(mono, counters)
    return web.json_response({
        "ok": True,
        "pid": os.getpid(),
        "uptime_s": round(time.monotonic() - app[STARTED_KEY], 3),
        "generation": rt.generation,
        "virtual_services": len(rt.config.virtual_services),
        "injections": len(rt.injections),
        "certificates": len(store.list()),
        "certificates_expiring": expiring,
        "services": services_status(rt.effective_services(), stats, rates),
        "certificate_status": certificates_status(app.get(CERT_STATUS_KEY), store, now),
        "dataplane": stats,
        "workers": workers() if (workers := app[WORKERS_KEY]) is not None else [],
    })


async def list_certs(request: web.Request) -> web.Response:
    store = request.app[STORE_KEY]
    return web.json_response({"certificates": [with_users(i, store.users(i.id))
                                               for i in store.list()]})


async def show_cert(request: web.Request) -> web.Response:
    store = request.app[STORE_KEY]
    cid = request.match_info["id"]
    view = cert_view(store, cid)
    material = store.material(cid)
    view["chain_pem"] = material.chain_pem.decode() if material else ""
    return web.json_response(view)


def _decode_import(data: Body) -> dict[str, Any]:
    passphrase = data.text("passphrase")
    args: dict[str, Any] = {
        "passphrase": passphrase.encode() if passphrase else None,
        "strict": data.flag("strict"),
    }
    if data.has("pkcs12"):
        for other in ("cert", "key", "chain"):
            if data.has(other):
                raise FieldError(other, "cannot be given with 'pkcs12'")
        try:
            args["pkcs12"] = base64.b64decode(data.text("pkcs12"), validate=True)
        except (binascii.Error, ValueError):
            raise FieldError("pkcs12", "is not valid base64") from None
        return args
    cert = data.text("cert")
    if not cert:
        raise FieldError("cert", "is required: give 'cert' (PEM) or 'pkcs12' (base64)")
    args["cert_pem"] = cert.encode()
    args["key_pem"] = data.text("key").encode()
    args["chain_pem"] = data.text("chain").encode()
    return args


async def _import(request: web.Request, cert_id: str, data: Body,
                  replace: bool) -> ImportResult:
    store = request.app[STORE_KEY]
    args = _decode_import(data)
    p12 = args.pop("pkcs12", None)

    def work() -> ImportResult:
        if p12 is not None:
            return store.import_pkcs12(cert_id, p12, replace=replace, **args)
        return store.import_pem(cert_id, replace=replace, **args)

    # fsync can take a while on a busy disk; keep the event loop (and the data plane) running.
    result = await asyncio.to_thread(work)
    request.app[TLS_KEY].refresh()
    return result


def _import_answer(store: CertStore, result: ImportResult) -> dict[str, Any]:
    return {"certificate": with_users(result.info, store.users(result.info.id)),
            "warnings": list(result.warnings), "replaced": result.replaced}


async def import_cert(request: web.Request) -> web.Response:
    data = await read_body(request, IMPORT_SCHEMA)
    result = await _import(request, data.text("id"), data, data.flag("replace"))
    return web.json_response(_import_answer(request.app[STORE_KEY], result),
                             status=200 if result.replaced else 201)


async def replace_cert(request: web.Request) -> web.Response:
    data = await read_body(request, REPLACE_SCHEMA)
    cid = request.match_info["id"]
    if data.has("id") and data.text("id") != cid:
        raise FieldError("id", f"is {shown(data.text('id'))!r} but the path names {shown(cid)!r}")
    result = await _import(request, cid, data, True)
    return web.json_response(_import_answer(request.app[STORE_KEY], result))


async def delete_cert(request: web.Request) -> web.Response:
    cid = request.match_info["id"]
    await asyncio.to_thread(request.app[STORE_KEY].delete, cid)
    request.app[TLS_KEY].refresh()
    return web.json_response({"deleted": cid})


def _target(request: web.Request, data: Body) -> str:
    target = data.text("target")
    if target == ADMIN_TARGET:
        return target
    vs = request.app[RUNTIME_KEY].current.config.vs_by_name(target)
    if vs is None:
        raise AdminError(f"no virtual service {target!r}", status=404)
    if vs.protocol is not Protocol.HTTPS:
        raise AdminError(f"virtual service {target!r} is not HTTPS", status=409)
    return target


async def _sync_admin_listener(request: web.Request, target: str) -> None:
    """After an "admin" assignment change, switch the admin listener between HTTP and HTTPS.

    Only the listening socket changes: this request is answered on its own connection.
    """
    sync = request.app.get(ADMIN_LISTENER_KEY)
    if target == ADMIN_TARGET and sync is not None:
        try:
            await sync()
        except OSError as e:
            raise AdminError(f"the assignment is recorded, but the admin listener could not be "
                             f"reopened: {e}", status=500) from None


async def assign_cert(request: web.Request) -> web.Response:
    cid = request.match_info["id"]
    data = await read_body(request, ASSIGN_SCHEMA)
    target = _target(request, data)
    default = data.flag("default")
    store = request.app[STORE_KEY]
    store.require(cid)
    await asyncio.to_thread(store.assign, cid, target, default=default)
    request.app[TLS_KEY].refresh()
    await _sync_admin_listener(request, target)
    return web.json_response({"assigned": cid, "target": target, "default": default,
                              "certificate": cert_view(store, cid)})


async def unassign_cert(request: web.Request) -> web.Response:
    cid = request.match_info["id"]
    data = await read_body(request, UNASSIGN_SCHEMA)
    target = data.text("target")
    store = request.app[STORE_KEY]
    store.require(cid)
    if (target == ADMIN_TARGET and request.app.get(ADMIN_TLS_REQUIRED_KEY)
            and store.admin_certificates == (cid,)):
        raise AdminError(f"certificate {cid!r} is the last one assigned to {ADMIN_TARGET!r} and "
                         "admin.tls = true: the API would be left without HTTPS; assign another "
                         "first", status=409)
    changed = await asyncio.to_thread(store.unassign, cid, target)
    if not changed:
        raise AdminError(f"certificate {cid!r} has no run-time assignment to {target!r} "
                         "(assignments in the config file change with the file)", status=404)
    request.app[TLS_KEY].refresh()
    await _sync_admin_listener(request, target)
    return web.json_response({"unassigned": cid, "target": target,
                              "certificate": cert_view(store, cid)})


async def list_vs(request: web.Request) -> web.Response:
    services, injected = _services(request)
    tls, stats = request.app[TLS_KEY], await dataplane_stats(request.app)
    return web.json_response({"virtual_services": [
        vs_view(vs, injected_rules=injected, tls=tls, stats=stats) for vs in services]})


async def show_vs(request: web.Request) -> web.Response:
    name = request.match_info["name"]
    services, injected = _services(request)
    for vs in services:
        if vs.name == name:
            return web.json_response(vs_view(vs, injected_rules=injected,
                                             tls=request.app[TLS_KEY],
                                             stats=await dataplane_stats(request.app)))
    raise AdminError(f"no virtual service {name!r}", status=404)


async def _sample_rates(app: web.Application) -> None:
    """Feeds the requests/s meter every RATE_SAMPLE_INTERVAL so `status` has a recent base."""
    meter = app[RATES_KEY]
    while True:
        try:
            meter.observe(time.monotonic(), request_counters(await dataplane_stats(app)))
        except Exception:
            logger.exception("requests/s sample failed")
        await asyncio.sleep(RATE_SAMPLE_INTERVAL)


async def dataplane_stats(app: web.Application) -> dict[str, Any]:
    """The data plane's stats now (every worker asked first, when there are workers)."""
    refresh = app[REFRESH_KEY]
    if refresh is not None:
        await refresh()
    return app[STATS_KEY]()


async def _rate_sampler(app: web.Application) -> Any:
    task = asyncio.create_task(_sample_rates(app), name="admin-rate-sampler")
    yield
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task


def create_app(*, runtime: RuntimeStore, dataplane_stats: DataplaneStats, store: CertStore,
               tls: TLSContexts, token: str,
               extra_routes: Sequence[RouteRegistrar] = (),
               open_paths: Collection[str] = (), refresh_stats: StatsRefresh | None = None,
               workers: WorkersView | None = None) -> web.Application:
    """The admin application; serve it with `lbproxy.admin.server.start_admin`.

    `open_paths`: GET paths served without the token (e.g. ("/metrics",)); none by default.
    `refresh_stats` and `workers`: with worker processes, collect their stats before
    `dataplane_stats` is read, and list them in the status.
    """
    if len(token) < 16:
        raise ValueError("the admin token is too short to be a secret")
    # Outermost first: every failure answered as JSON, then the token, then path parameters.
    app = web.Application(middlewares=[json_errors(max_body=MAX_BODY),
                                       _auth_middleware(token, frozenset(open_paths)),
                                       path_params()],
                          client_max_size=MAX_BODY)
    app[RATES_KEY] = RateMeter(window=RATE_WINDOW)
    app.cleanup_ctx.append(_rate_sampler)
    app[RUNTIME_KEY] = runtime
    app[STORE_KEY] = store
    app[TLS_KEY] = tls
    app[STATS_KEY] = dataplane_stats
    app[REFRESH_KEY] = refresh_stats
    app[WORKERS_KEY] = workers
    app[STARTED_KEY] = time.monotonic()
    app.router.add_get("/api/status", status)
    app.router.add_get("/api/certs", list_certs)
    app.router.add_post("/api/certs", import_cert)
    app.router.add_get("/api/certs/{id}", show_cert)
    app.router.add_put("/api/certs/{id}", replace_cert)
    app.router.add_delete("/api/certs/{id}", delete_cert)
    app.router.add_post("/api/certs/{id}/assign", assign_cert)
    app.router.add_post("/api/certs/{id}/unassign", unassign_cert)
    app.router.add_get("/api/vs", list_vs)
    app.router.add_get("/api/vs/{name}", show_vs)
    web_routes(token)(app)
    for register in extra_routes:
        register(app)
    return app
