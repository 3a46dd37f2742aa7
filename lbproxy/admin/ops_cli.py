"""The operations commands: apply the config file, and control real servers at run time.

    lbproxy reload                              validate the config file and apply it; prints the
                                                generation and what changed
    lbproxy server list [--vs V] [--address A]  every real server: state, weight, config's, health
    lbproxy server enable|disable ADDRESS [--vs V [--subvs S]]
    lbproxy server drain ADDRESS [--vs V [--subvs S]] [--wait SECONDS]
    lbproxy server weight ADDRESS N [--vs V [--subvs S]]

ADDRESS alone acts in every pool that has it (every VS and SubVS); --vs/--subvs narrow it. An
override lasts until the config file changes that server (see lbproxy.servercontrol). Each leaf
takes the admin options of the parent parser given to `add_commands` (--json, -c, --admin,
--token-file, --cacert) and sets `run(client, args) -> JSON` and `show(data, out)`.
"""

from __future__ import annotations

import argparse
import time
from typing import Any, TextIO
from urllib.parse import urlencode

from .client import EXIT_FAILED, AdminClient, ClientError

# How often `server drain --wait` looks at the requests still in flight (seconds).
DRAIN_POLL = 0.5

_DIFF_PARTS = (("virtual_services", "virtual services"), ("rules", "rules"),
               ("real_servers", "real servers"))


# -- reload -----------------------------------------------------------------------------------

def reload(client: AdminClient, args: argparse.Namespace) -> Any:
    return client.post("/api/reload", {})


def print_reload(data: Any, out: TextIO) -> None:
    gen = data.get("generation")
    if not data.get("changed"):
        print(f"reloaded: generation {gen}, no change", file=out)
        return
    print(f"reloaded: generation {gen}", file=out)
    diff = data.get("diff") or {}
    shown = False
    for part, label in _DIFF_PARTS:
        got = diff.get(part) or {}
        for how in ("added", "removed", "changed"):
            names = got.get(how) or []
            if names:
                shown = True
                print(f"  {label} {how}: {', '.join(names)}", file=out)
    if not shown:
        print("  (settings outside virtual services, rules and real servers)", file=out)


# -- servers ----------------------------------------------------------------------------------

def server_list(client: AdminClient, args: argparse.Namespace) -> Any:
    query = []
    if args.vs:
        query.append(("vs", args.vs))
    if args.address:
        query.append(("address", args.address))
    return client.get("/api/servers" + (f"?{urlencode(query)}" if query else ""))


def _set(args: argparse.Namespace, **fields: Any) -> dict[str, Any]:
    body: dict[str, Any] = {"address": args.address, **fields}
    if args.vs:
        body["vs"] = args.vs
    if args.subvs:
        body["subvs"] = args.subvs
    return body


def server_state(state: str) -> Any:
    def run(client: AdminClient, args: argparse.Namespace) -> Any:
        data = client.post("/api/servers", _set(args, state=state))
        wait = getattr(args, "wait", None)
        if wait is not None:
            data = _wait_drained(client, data, wait)
        return data
    return run


def _wait_drained(client: AdminClient, data: Any, wait: float) -> Any:
    """`data` (a POST /api/servers answer) as it stands once none of its servers has a request
    in flight ("drained": true); ClientError (exit status 1) if some still have after `wait`
    seconds."""
    names = {r["name"] for r in data.get("servers", [])}
    deadline = time.monotonic() + wait
    while True:
        rows = [r for r in client.get("/api/servers").get("servers", []) if r["name"] in names]
        busy = [f"{r['name']} ({r['active']})" for r in rows if r.get("active")]
        if not busy:
            return {"servers": rows, "drained": True}
        if time.monotonic() >= deadline:
            raise ClientError(f"not drained after {wait:g} s; requests still in flight: "
                              f"{', '.join(busy)}", exit_code=EXIT_FAILED)
        time.sleep(min(DRAIN_POLL, max(0.0, deadline - time.monotonic())))


def server_weight(client: AdminClient, args: argparse.Namespace) -> Any:
    return client.post("/api/servers", _set(args, weight=args.weight))


def _cell(v: Any) -> str:
    return "-" if v is None else str(v)


def _health(r: dict[str, Any]) -> str:
    h = r.get("healthy")
    return "-" if h is None else ("up" if h else "DOWN")


def print_servers(data: Any, out: TextIO) -> None:
    rows = []
    for r in data.get("servers", []):
        cfg = r.get("config") or {}
        conf = f"{'enabled' if cfg.get('enabled') else 'disabled'}/{_cell(cfg.get('weight'))}"
        rows.append([r["vs"] + (f"/{r['subvs']}" if r.get("subvs") else ""), r["address"],
                     r["state"] + ("*" if r.get("override") else ""), _cell(r.get("weight")),
                     conf, _health(r), _cell(r.get("active")), _cell(r.get("requests"))])
    if not rows:
        print("no real servers", file=out)
        return
    headers = ("VS[/SUBVS]", "ADDRESS", "STATE", "WEIGHT", "CONFIG", "HEALTH", "ACTIVE",
               "REQUESTS")
    widths = [max([len(h), *(len(r[i]) for r in rows)]) for i, h in enumerate(headers)]
    for row in (headers, *rows):
        print("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip(),
              file=out)
    if any(r.get("override") for r in data.get("servers", [])):
        print("* run-time override (kept until the config file changes that server)", file=out)


def print_server_change(data: Any, out: TextIO) -> None:
    for r in data.get("servers", []):
        active = r.get("active")
        tail = "" if active is None else f", {active} in flight"
        print(f"{r['name']}: {r['state']}, weight {r['weight']}{tail}", file=out)
    if data.get("drained"):
        print("drained: no request in flight", file=out)


# -- the parsers ------------------------------------------------------------------------------

def _where(p: argparse.ArgumentParser) -> None:
    p.add_argument("address", metavar="ADDRESS", help="the real server, host:port")
    p.add_argument("--vs", metavar="V", help="only in virtual service V (default: every one)")
    p.add_argument("--subvs", metavar="S", help="only in SubVS S of --vs")


def add_commands(top: Any, common: argparse.ArgumentParser) -> None:
    """Adds `reload` and `server ...` to `top` (the root parser's subparsers action); every
    leaf takes `common`'s options (the admin ones)."""
    r = top.add_parser("reload", parents=[common],
                       help="validate the config file and apply it; print what changed",
                       description="Validate the config file and apply it through the admin "
                                   "API (as SIGHUP does); print the new generation and the "
                                   "virtual services, rules and real servers added, removed "
                                   "or changed. A file with problems is not applied.")
    r.set_defaults(run=reload, show=print_reload)
    s = top.add_parser("server", help="run-time real-server control: list, enable, disable, "
                                      "drain, weight")
    sub = s.add_subparsers(dest="server_command", metavar="COMMAND", required=True)
    ls = sub.add_parser("list", parents=[common], help="every real server with its state")
    ls.add_argument("--vs", metavar="V", help="only virtual service V")
    ls.add_argument("--address", metavar="A", help="only real server A (host:port)")
    ls.set_defaults(run=server_list, show=print_servers)
    for state, text in (("enable", "take new requests again"),
                        ("disable", "take no new requests (requests in flight finish)"),
                        ("drain", "take no new requests; requests in flight finish, idle "
                                  "upstream connections close")):
        p = sub.add_parser(state, parents=[common], help=text)
        _where(p)
        if state == "drain":
            p.add_argument("--wait", type=float, metavar="SECONDS",
                           help="then wait up to SECONDS until no request is in flight (exit "
                                "status 1 if some still are)")
        p.set_defaults(run=server_state({"enable": "enabled", "disable": "disabled",
                                         "drain": "drain"}[state]), show=print_server_change)
    w = sub.add_parser("weight", parents=[common], help="set a real server's weight")
    _where(w)
    w.add_argument("weight", type=int, metavar="N", help="the weight, 0..65535")
    w.set_defaults(run=server_weight, show=print_server_change)
