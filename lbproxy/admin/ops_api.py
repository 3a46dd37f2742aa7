"""The admin API's operations routes: apply the config file, and control real servers at run time.

    POST /api/reload     validate the config file and apply it (as SIGHUP does):
                         {"generation": N, "changed": bool, "diff": {"virtual_services" |
                         "rules" | "real_servers": {"added", "removed", "changed": [names]}}},
                         real servers named "VS[/SubVS] address" (lbproxy.config.diff). A file
                         with problems answers 422 {"error", "generation", "problems": [{"where",
                         "message", "line"?}]}; one the runtime refuses (a port taken) 409; the
                         running config keeps serving either way.
    GET  /api/servers    every real server of every pool: {"servers": [{"name", "vs", "subvs",
                         "address", "state" (enabled | disabled | drain), "weight" (effective),
                         "config": {"enabled", "weight"}, "override": {"state", "weight"} or
                         null, "healthy", "active", "requests"}]}; query ?vs=NAME&address=A
                         narrows it
    POST /api/servers    {"address": "host:port", "vs"?, "subvs"?, "state"?, "weight"?
                         (0..65535)}: set the state and/or weight of that server in every pool
                         that has it (only VS vs / SubVS subvs of it when given) until the config
                         changes that server (lbproxy.servercontrol); answers {"servers": [the
                         rows it covered]}; no such VS, SubVS or server there: 404
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

from aiohttp import web

from ..errors import ConfigError, LBProxyError
from ..servercontrol import MAX_WEIGHT, MIN_WEIGHT, STATES, ServerControl
from .api import RUNTIME_KEY, RouteRegistrar, dataplane_stats
from .validate import Integer, Schema, Text, read_body

logger = logging.getLogger(__name__)

Reload = Callable[[], Awaitable[dict[str, Any]]]

SERVER_SCHEMA: Schema = {"address": Text(required=True), "vs": Text(), "subvs": Text(),
                         "state": Text(choices=STATES), "weight": Integer(MIN_WEIGHT, MAX_WEIGHT)}


def problem_view(p: Any) -> dict[str, Any]:
    """A ConfigProblem as JSON: where, message, and line when the problem knows it."""
    out: dict[str, Any] = {"where": p.where, "message": p.message}
    line = getattr(p, "line", None)
    if line is not None:
        out["line"] = line
    return out


def _live(stats: Mapping[str, Any], vs: str, subvs: str) -> dict[str, Mapping[str, Any]]:
    """The data plane's entries of one pool's real servers, by address."""
    node: Any = stats.get("virtual_services", {}).get(vs)
    if subvs and isinstance(node, Mapping):
        node = node.get("subvs", {}).get(subvs)
    servers = node.get("real_servers") if isinstance(node, Mapping) else None
    if not isinstance(servers, list):
        return {}
    return {str(s["address"]): s for s in servers if isinstance(s, Mapping) and "address" in s}


def _with_live(rows: list[dict[str, Any]], stats: Mapping[str, Any]) -> list[dict[str, Any]]:
    pools: dict[tuple[str, str], dict[str, Mapping[str, Any]]] = {}
    for row in rows:
        key = (row["vs"], row["subvs"])
        if key not in pools:
            pools[key] = _live(stats, *key)
        live = pools[key].get(row["address"], {})
        row.update(healthy=live.get("healthy"), active=live.get("active"),
                   requests=live.get("requests"))
    return rows


def ops_routes(reload: Reload, servers: ServerControl) -> RouteRegistrar:
    """Registers the routes above: `reload` is the App's reload_report, `servers` its
    ServerControl."""

    async def reload_route(request: web.Request) -> web.Response:
        try:
            report = await reload()
        except ConfigError as e:
            gen = request.app[RUNTIME_KEY].current.generation
            lines = "\n".join(f"  {p}" for p in e.problems)
            return web.json_response({
                "error": f"the config file was not applied ({len(e.problems)} problem(s)); "
                         f"still serving generation {gen}:\n{lines}",
                "generation": gen, "problems": [problem_view(p) for p in e.problems]},
                status=422)
        except LBProxyError as e:
            gen = request.app[RUNTIME_KEY].current.generation
            return web.json_response({
                "error": f"the config file was not applied: {e}; still serving generation "
                         f"{gen}", "generation": gen, "problems": []}, status=409)
        return web.json_response(report)

    async def list_servers(request: web.Request) -> web.Response:
        rows = servers.view(request.app[RUNTIME_KEY].current.config)
        vs, address = request.query.get("vs"), request.query.get("address")
        rows = [r for r in rows if (vs is None or r["vs"] == vs)
                and (address is None or r["address"] == address)]
        return web.json_response({"servers": _with_live(rows, await dataplane_stats(request.app))})

    async def set_server(request: web.Request) -> web.Response:
        data = await read_body(request, SERVER_SCHEMA)
        weight = data.values.get("weight")
        # AdminError (no such server, nothing to set) answers its status with its message.
        rows = servers.set(request.app[RUNTIME_KEY].current.config, data.text("address"),
                           vs=data.optional_text("vs"), subvs=data.optional_text("subvs"),
                           state=data.optional_text("state"),
                           weight=weight if isinstance(weight, int) else None)
        return web.json_response({"servers": _with_live(rows, await dataplane_stats(request.app))})

    def register(app: web.Application) -> None:
        app.router.add_post("/api/reload", reload_route)
        app.router.add_get("/api/servers", list_servers)
        app.router.add_post("/api/servers", set_server)

    return register
