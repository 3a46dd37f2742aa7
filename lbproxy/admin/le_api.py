"""The admin API's Let's Encrypt routes (/api/le/...), thin JSON glue over LEManager.

    GET  /api/le/account                 account ID (URL), email, settings
    POST /api/le/account                 register {email?}
    POST /api/le/account/key             link by key {key: PEM or JWK text, passphrase?}
    PUT  /api/le/settings                {directory_url?, ca_bundle?, email?, renew_period_days?}
                                         (a new directory is fetched and checked first)
    GET  /api/le/eligible-vs             VSs that can answer HTTP-01 challenges
    GET  /api/le/certs                   every managed certificate with its status
    POST /api/le/certs                   request {id, common_name, vs, sans: [{name, vs}], ...,
                                         wait?: true}
    GET  /api/le/certs/{id}              one certificate
    POST /api/le/certs/{id}/renew        renew now {wait?: true}
    DELETE /api/le/certs/{id}            refused (409) while in use
    POST /api/le/backup                  {passphrase, vs?, certs?} -> {backup: base64}
    POST /api/le/restore                 {backup: base64, passphrase, vs?, certs?}
    POST /api/le/vs/{name}/convert       run-time `vs convert`; answers the TOML to keep it

Failures answer {"error", "code", "sub_code"?} with the LoadMaster code. Bodies may hold keys and
passphrases: they are never logged.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

from aiohttp import web

from ..certs.acme_backup import BackupError
from ..certs.acme_log import LeError
from ..errors import AdminError

if TYPE_CHECKING:
    from ..certs.manager import LEManager

logger = logging.getLogger(__name__)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


async def _body(request: web.Request) -> dict[str, Any]:
    if not request.can_read_body:
        return {}
    try:
        data = await request.json()
    except ValueError:
        raise AdminError("the request body is not JSON") from None
    if not isinstance(data, dict):
        raise AdminError("the request body must be a JSON object")
    return data


def _get(data: dict[str, Any], key: str, kind: type | tuple[type, ...], default: Any = None,
         *, required: bool = False) -> Any:
    if required and key not in data:
        raise AdminError(f"{key!r} is required")
    value = data.get(key, default)
    if value is not None and not isinstance(value, kind):
        raise AdminError(f"{key!r} has the wrong type")
    return value


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


def add_routes(app: web.Application, manager: LEManager) -> None:
    """Register /api/le/... on the admin application."""
    from ..certs.manager import Template, backup_from_text, backup_to_text

    m = manager

    async def account(_r: web.Request) -> web.Response:
        return web.json_response(m.account_view())

    async def register(r: web.Request) -> web.Response:
        data = await _body(r)
        return web.json_response(await m.register(_get(data, "email", str)), status=201)

    async def upload_key(r: web.Request) -> web.Response:
        data = await _body(r)
        key = _get(data, "key", str, required=True)
        passphrase = _get(data, "passphrase", str)
        return web.json_response(await m.upload_key(
            key.encode(), passphrase.encode() if passphrase else None))

    async def settings(r: web.Request) -> web.Response:
        data = await _body(r)
        if "directory_url" in data or "ca_bundle" in data:
            url = _get(data, "directory_url", str, m.settings.directory_url)
            await m.set_directory(url, _get(data, "ca_bundle", str))
        if "renew_period_days" in data:
            await m.set_renew_period(_get(data, "renew_period_days", int))
        if "email" in data:
            await m.set_email(_get(data, "email", str, ""))
        return web.json_response(m.account_view())

    async def eligible(_r: web.Request) -> web.Response:
        return web.json_response(m.eligible_vs())

    async def list_certs(_r: web.Request) -> web.Response:
        return web.json_response(m.list_view())

    async def request_cert(r: web.Request) -> web.Response:
        data = await _body(r)
        sans = _get(data, "sans", list, [])
        pairs = []
        for s in sans:
            if not isinstance(s, dict) or not isinstance(s.get("name"), str):
                raise AdminError("each SAN is {name, vs}")
            pairs.append((s["name"], str(s.get("vs") or "")))
        t = Template(
            common_name=_get(data, "common_name", str, ""), vs=_get(data, "vs", str, ""),
            sans=tuple(pairs), key_type=_get(data, "key_type", str, "ec"),
            key_size=_get(data, "key_size", int, 2048),
            **{k: _get(data, k, str, "") for k in ("country", "state", "city", "company",
                                                   "unit", "email")})
        cert_id = _get(data, "id", str, required=True)
        view = await m.request(cert_id, t, wait=bool(_get(data, "wait", bool, True)))
        return web.json_response(view, status=201)

    async def show(r: web.Request) -> web.Response:
        return web.json_response(m.view(r.match_info["id"]))

    async def renew(r: web.Request) -> web.Response:
        data = await _body(r)
        return web.json_response(await m.renew(r.match_info["id"],
                                                wait=bool(_get(data, "wait", bool, True))))

    async def delete(r: web.Request) -> web.Response:
        await m.delete(r.match_info["id"])
        return web.json_response({"deleted": r.match_info["id"]})

    async def backup(r: web.Request) -> web.Response:
        data = await _body(r)
        blob = m.backup(_get(data, "passphrase", str, required=True),
                        include_vs=bool(_get(data, "vs", bool, False)),
                        include_certs=bool(_get(data, "certs", bool, False)))
        return web.json_response({"backup": backup_to_text(blob)})

    async def restore(r: web.Request) -> web.Response:
        data = await _body(r)
        blob = backup_from_text(_get(data, "backup", str, required=True))
        return web.json_response(await m.restore(
            blob, _get(data, "passphrase", str, required=True),
            restore_vs=bool(_get(data, "vs", bool, False)),
            restore_certs=bool(_get(data, "certs", bool, False))))

    async def convert(r: web.Request) -> web.Response:
        return web.json_response(await m.convert_vs(r.match_info["name"]))

    routes: list[tuple[str, str, Handler]] = [
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
