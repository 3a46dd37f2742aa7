"""The admin API's Let's Encrypt routes (/api/le/...), thin JSON glue over LEManager.

    GET  /api/le/account                 account ID (URL), email, settings
    POST /api/le/account                 register {email?}
    POST /api/le/account/key             link by key {key: PEM or JWK text, passphrase?,
                                         replace?: false} (code 6 if an account is linked
                                         and replace is not true)
    PUT  /api/le/settings                {directory_url?, ca_bundle?, email?, renew_period_days?}
                                         (a new directory is fetched and checked first)
    GET  /api/le/eligible-vs             VSs that can answer HTTP-01 challenges
    GET  /api/le/certs                   every managed certificate with its status
    POST /api/le/certs                   request {id, common_name, vs, sans: [{name, vs}], ...,
                                         challenge?: "http-01" | "tls-alpn-01" | "dns-01",
                                         wait?: true}; each name's vs is required (code 16
                                         without) except with dns-01, which uses none
    GET  /api/le/certs/{id}              one certificate
    POST /api/le/certs/{id}/renew        renew now {wait?: true}
    DELETE /api/le/certs/{id}            refused (409) while in use
    POST /api/le/backup                  {passphrase, vs?, certs?} -> {backup: base64}
    POST /api/le/restore                 {backup: base64, passphrase, vs?, certs?}
    POST /api/le/vs/{name}/convert       run-time `vs convert`; answers the TOML to keep it

Failures answer {"error", "code", "sub_code"?} with the LoadMaster code; malformed input answers
{"error", "field"} with a 4xx (lbproxy.admin.validate): each body is a JSON object with only the
fields listed above. Bodies may hold keys and passphrases: they are never logged.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from aiohttp import web

from acmeclient.challenges import CHALLENGE_TYPES

from ..config.model import MAX_SANS
from ..errors import StoreError
from ..letsencrypt import BackupError, LeError, Template, backup_from_text, backup_to_text
from ..letsencrypt.policy import MAX_RENEW_PERIOD_DAYS, MIN_RENEW_PERIOD_DAYS
from .api import CERT_STATUS_KEY, RouteRegistrar
from .validate import Flag, Handler, Integer, Objects, Schema, Text, read_body

if TYPE_CHECKING:
    from ..letsencrypt import LEManager

logger = logging.getLogger(__name__)


# Request bodies; PEM, base64 and passphrase fields are bounded by the body limit alone.
REGISTER_SCHEMA: Schema = {"email": Text()}
KEY_SCHEMA: Schema = {"key": Text(required=True, max_len=None),
                      "passphrase": Text(max_len=None), "replace": Flag()}
SETTINGS_SCHEMA: Schema = {
    "directory_url": Text(), "ca_bundle": Text(), "email": Text(),
    "renew_period_days": Integer(MIN_RENEW_PERIOD_DAYS, MAX_RENEW_PERIOD_DAYS)}
_SUBJECT = ("country", "state", "city", "company", "unit", "email")
# The VSs are optional here: whether a name needs one depends on the challenge type (dns-01
# uses none), and a missing one is the manager's code 16 (letsencrypt/checks.py).
REQUEST_SCHEMA: Schema = {
    "id": Text(required=True), "common_name": Text(), "vs": Text(),
    "sans": Objects({"name": Text(required=True), "vs": Text()}, max_items=MAX_SANS),
    "key_type": Text(choices=("ec", "rsa")),
    # The RSA sizes the manager accepts are 2048, 3072 and 4096; it names the exact ones.
    "key_size": Integer(2048, 4096),
    # How the names are proved (kept for renewals); a wildcard name needs dns-01.
    "challenge": Text(choices=CHALLENGE_TYPES),
    "wait": Flag(), **{k: Text() for k in _SUBJECT}}
RENEW_SCHEMA: Schema = {"wait": Flag()}
BACKUP_SCHEMA: Schema = {"passphrase": Text(required=True, max_len=None), "vs": Flag(),
                         "certs": Flag()}
RESTORE_SCHEMA: Schema = {"backup": Text(required=True, max_len=None), **BACKUP_SCHEMA}


def _le_errors(handler: Handler) -> Handler:
    async def wrapped(request: web.Request) -> web.StreamResponse:
        try:
            return await handler(request)
        except LeError as e:
            body: dict[str, Any] = {"error": str(e), "code": e.code}
            if e.subcode is not None:
                body["sub_code"] = e.subcode
            return web.json_response(body, status=e.status)
        except BackupError as e:
            return web.json_response({"error": str(e)}, status=e.status)
    return wrapped


def le_routes(manager: LEManager) -> RouteRegistrar:
    """A registrar for `create_app(extra_routes=...)`: the /api/le/... routes and the
    certificate status source (CERT_STATUS_KEY) of `manager`."""
    def register(app: web.Application) -> None:
        add_routes(app, manager)
        app[CERT_STATUS_KEY] = manager.cert_statuses
    return register


def add_routes(app: web.Application, manager: LEManager) -> None:
    """Register /api/le/... on the admin application."""
    m = manager

    async def account(_r: web.Request) -> web.Response:
        return web.json_response(m.account_view())

    async def register(r: web.Request) -> web.Response:
        data = await read_body(r, REGISTER_SCHEMA, optional=True)
        return web.json_response(await m.register(data.optional_text("email")), status=201)

    async def upload_key(r: web.Request) -> web.Response:
        data = await read_body(r, KEY_SCHEMA)
        passphrase = data.text("passphrase")
        return web.json_response(await m.upload_key(
            data.text("key").encode(), passphrase.encode() if passphrase else None,
            replace=data.flag("replace")))

    async def settings(r: web.Request) -> web.Response:
        data = await read_body(r, SETTINGS_SCHEMA)
        if data.has("directory_url") or data.has("ca_bundle"):
            url = data.text("directory_url", m.settings.directory_url)
            await m.set_directory(url, data.optional_text("ca_bundle"))
        if data.has("renew_period_days"):
            await m.set_renew_period(data.integer("renew_period_days", 0))
        if data.has("email"):
            await m.set_email(data.text("email"))
        return web.json_response(m.account_view())

    async def eligible(_r: web.Request) -> web.Response:
        return web.json_response(m.eligible_vs())

    async def list_certs(_r: web.Request) -> web.Response:
        return web.json_response(m.list_view())

    async def request_cert(r: web.Request) -> web.Response:
        data = await read_body(r, REQUEST_SCHEMA)
        t = Template(
            common_name=data.text("common_name"), vs=data.text("vs"),
            sans=tuple((s.text("name"), s.text("vs")) for s in data.objects("sans")),
            key_type=data.text("key_type", "ec"), key_size=data.integer("key_size", 2048),
            challenge=data.text("challenge", "http-01"),
            **{k: data.text(k) for k in _SUBJECT})
        view = await m.request(data.text("id"), t, wait=data.flag("wait", True))
        return web.json_response(view, status=201)

    async def show(r: web.Request) -> web.Response:
        return web.json_response(m.view(r.match_info["id"]))

    async def renew(r: web.Request) -> web.Response:
        data = await read_body(r, RENEW_SCHEMA, optional=True)
        return web.json_response(await m.renew(r.match_info["id"],
                                                wait=data.flag("wait", True)))

    async def delete(r: web.Request) -> web.Response:
        await m.delete(r.match_info["id"])
        return web.json_response({"deleted": r.match_info["id"]})

    async def backup(r: web.Request) -> web.Response:
        data = await read_body(r, BACKUP_SCHEMA)
        blob = await m.backup(data.text("passphrase"), include_vs=data.flag("vs"),
                              include_certs=data.flag("certs"))
        return web.json_response({"backup": backup_to_text(blob)})

    async def restore(r: web.Request) -> web.Response:
        data = await read_body(r, RESTORE_SCHEMA)
        blob = backup_from_text(data.text("backup"))
        return web.json_response(await m.restore(
            blob, data.text("passphrase"), restore_vs=data.flag("vs"),
            restore_certs=data.flag("certs")))

    async def convert(r: web.Request) -> web.Response:
        return web.json_response(await m.convert_vs(r.match_info["name"]))

    async def cluster(_r: web.Request) -> web.Response:
        view = await m.cluster_view()
        if view is None:
            raise StoreError("this node is not in a cluster (no [cluster] in its config)",
                             status=404)
        return web.json_response(view)

    routes: list[tuple[str, str, Handler]] = [
        ("GET", "/api/cluster", cluster),
        ("GET", "/api/le/account", account),
        ("POST", "/api/le/account", register),
        ("POST", "/api/le/account/key", upload_key),
        ("PUT", "/api/le/settings", settings),
        ("GET", "/api/le/eligible-vs", eligible),
        ("GET", "/api/le/certs", list_certs),
        ("POST", "/api/le/certs", request_cert),
        ("GET", "/api/le/certs/{id}", show),
        ("POST", "/api/le/certs/{id}/renew", renew),
        ("DELETE", "/api/le/certs/{id}", delete),
        ("POST", "/api/le/backup", backup),
        ("POST", "/api/le/restore", restore),
        ("POST", "/api/le/vs/{name}/convert", convert),
    ]
    for method, path, handler in routes:
        app.router.add_route(method, path, _le_errors(handler))
