"""The `lbproxy` commands about certificates, virtual services and status, and the one parser of
every command (`build_parser`) with its entry point for the admin commands (`main`).

    lbproxy cert import ID --cert F [--key F] [--chain F] | --pkcs12 F  [--passphrase-file F]
    lbproxy cert list | show ID | delete ID | assign ID TARGET [--default] [--remove]
    lbproxy vs list | show NAME           (`vs convert` is lbproxy.admin.le_cli's)
    lbproxy status          VSs (listeners, SubVSs, real servers up/down, connections,
                            requests/s), every certificate (days left, next renewal, error)
                            and, on a node of a cluster, a CLUSTER section

Each takes the admin options (lbproxy.admin.client.add_admin_options); exit status as
lbproxy.admin.client's EXIT_* say (docs/cli.md).
"""

from __future__ import annotations

import argparse
import base64
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TextIO
from urllib.parse import quote

from . import cluster_cli, le_cli, ops_cli
from .client import (
    AddCommands,
    AdminClient,
    ClientError,
    UsageError,
    dispatch,
    fields,
    group,
    root_parser,
    table,
)

Command = Callable[[AdminClient, argparse.Namespace], Any]


def _short_name(rfc4514: str) -> str:
    """The CN of a distinguished name, else its O, else the whole name."""
    attrs: dict[str, str] = {}
    for part in rfc4514.split(","):
        k, _, v = part.partition("=")
        attrs.setdefault(k.strip().upper(), v)
    return attrs.get("CN") or attrs.get("O") or rfc4514


def _day(iso: str) -> str:
    return iso[:10]


def _read(path: str, what: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as e:
        raise ClientError(f"cannot read the {what} {path}: {e.strerror}") from None


def _passphrase(args: argparse.Namespace) -> str | None:
    if args.passphrase_file:
        return _read(args.passphrase_file, "passphrase file").decode().rstrip("\r\n")
    if args.passphrase_env:
        value = os.environ.get(args.passphrase_env)
        if value is None:
            raise ClientError(f"environment variable {args.passphrase_env} is not set")
        return value
    return None


# -- commands -------------------------------------------------------------------------------------

def cert_import(client: AdminClient, args: argparse.Namespace) -> Any:
    body: dict[str, Any] = {"strict": args.strict}
    if args.pkcs12:
        if args.cert or args.key or args.chain:
            raise UsageError("give either --pkcs12 or --cert/--key/--chain")
        body["pkcs12"] = base64.b64encode(_read(args.pkcs12, "PKCS#12 file")).decode()
    elif args.cert:
        body["cert"] = _read(args.cert, "certificate").decode(errors="replace")
        if args.key:
            body["key"] = _read(args.key, "key").decode(errors="replace")
        if args.chain:
            body["chain"] = _read(args.chain, "chain").decode(errors="replace")
    else:
        raise UsageError("give --cert (and --key) or --pkcs12")
    passphrase = _passphrase(args)
    if passphrase is not None:
        body["passphrase"] = passphrase
    if args.replace:
        return client.put(f"/api/certs/{quote(args.id, safe='')}", body)
    return client.post("/api/certs", {"id": args.id, **body})


def cert_list(client: AdminClient, args: argparse.Namespace) -> Any:
    return client.get("/api/certs")


def cert_show(client: AdminClient, args: argparse.Namespace) -> Any:
    return client.get(f"/api/certs/{quote(args.id, safe='')}")


def cert_delete(client: AdminClient, args: argparse.Namespace) -> Any:
    return client.delete(f"/api/certs/{quote(args.id, safe='')}")


def cert_assign(client: AdminClient, args: argparse.Namespace) -> Any:
    path = f"/api/certs/{quote(args.id, safe='')}"
    if args.remove:
        return client.post(path + "/unassign", {"target": args.target})
    return client.post(path + "/assign", {"target": args.target, "default": args.default})


def vs_list(client: AdminClient, args: argparse.Namespace) -> Any:
    return client.get("/api/vs")


def vs_show(client: AdminClient, args: argparse.Namespace) -> Any:
    return client.get(f"/api/vs/{quote(args.name, safe='')}")


def status(client: AdminClient, args: argparse.Namespace) -> Any:
    data = client.get("/api/status")
    cluster = cluster_cli.cluster_for_status(client)   # None: not in a cluster
    if cluster is not None and isinstance(data, dict):
        data["cluster"] = cluster
    return data


# -- human output ---------------------------------------------------------------------------------

def _cert_rows(certs: list[dict[str, Any]]) -> list[list[str]]:
    return [[c["id"], ",".join(c["names"]) or "-", _short_name(c["issuer"]), _day(c["not_after"]),
             f"{c['key_type']} {c['key_size']}", ",".join(c["used_by"]) or "-",
             c.get("managed_by") or "-"] for c in certs]


_CERT_HEADERS = ("ID", "NAMES", "ISSUER", "NOT AFTER", "KEY", "USED BY", "MANAGED BY")


def print_cert_list(data: Any, out: TextIO) -> None:
    if not data["certificates"]:
        print("no certificates", file=out)
        return
    table(_CERT_HEADERS, _cert_rows(data["certificates"]), out)


def print_cert(c: dict[str, Any], out: TextIO) -> None:
    rows = [("id", c["id"]), ("names", ", ".join(c["names"]) or "-"),
            ("subject", c["subject"]), ("issuer", c["issuer"]), ("serial", c["serial"]),
            ("not before", c["not_before"]), ("not after", c["not_after"]),
            ("key", f"{c['key_type']} {c['key_size']} bits"),
            ("sha256", c["fingerprint_sha256"]), ("generation", str(c["generation"])),
            ("managed by", c.get("managed_by") or "-"),
            ("used by", ", ".join(c["used_by"]) or "-")]
    fields(rows, out)


def print_import(data: Any, out: TextIO) -> None:
    c = data["certificate"]
    print(f"{'replaced' if data['replaced'] else 'imported'} {c['id']}: "
          f"{', '.join(c['names'])} (serial {c['serial']}, not after {c['not_after']})", file=out)
    for w in data["warnings"]:
        print(f"warning: {w}", file=out)


def print_assign(data: Any, out: TextIO) -> None:
    if "assigned" in data:
        extra = " as default" if data["default"] else ""
        print(f"{data['assigned']} assigned to {data['target']}{extra}", file=out)
    else:
        print(f"{data['unassigned']} unassigned from {data['target']}", file=out)


def _servers(rs: list[dict[str, Any]]) -> str:
    out = []
    for r in rs:
        h = r.get("health")
        mark = "" if not isinstance(h, dict) else (" up" if h.get("healthy") else " down")
        out.append(f"{r['address']}{mark}{'' if r['enabled'] else ' disabled'}")
    return ", ".join(out) or "-"


def print_vs_list(data: Any, out: TextIO) -> None:
    rows = []
    for v in data["virtual_services"]:
        certs = ",".join(v["tls"]["certificates"]) if "tls" in v else "-"
        rows.append([v["name"], v["listen"], v["protocol"], v["kind"], str(len(v["subvs"])),
                     str(len(v["rules"])), certs or "-"])
    if not rows:
        print("no virtual services", file=out)
        return
    table(("NAME", "LISTEN", "PROTO", "KIND", "SUBVS", "RULES", "CERTIFICATES"), rows, out)


def print_vs(v: dict[str, Any], out: TextIO) -> None:
    print(f"{v['name']}  {v['protocol']}://{v['listen']}  kind {v['kind']}  "
          f"scheduler {v['scheduler']}", file=out)
    if "tls" in v:
        t = v["tls"]
        print(f"certificates: {', '.join(t['certificates']) or '-'} "
              f"(default {t['default_certificate'] or '-'})", file=out)
    if v["real_servers"]:
        print(f"real servers: {_servers(v['real_servers'])}", file=out)
    if v["rules"]:
        print("rules (first match wins):", file=out)
        table(("#", "RULE", "SUBVS", "INJECTED"),
              [[str(r["precedence"]), r["rule"], r["subvs"], "yes" if r["injected"] else ""]
               for r in v["rules"]], out)
    if v["subvs"]:
        print("SubVSs:", file=out)
        table(("NAME", "SCHEDULER", "REAL SERVERS"),
              [[s["name"], s["scheduler"],
                _servers(s["real_servers"]) if s["real_servers"]
                else f"none (answers {s['not_available_status']})"] for s in v["subvs"]], out)


def _cell(v: Any, fmt: str = "{}") -> str:
    return "-" if v is None else fmt.format(v)


def _up(r: dict[str, Any]) -> str:
    if r.get("state") in ("disabled", "drain"):
        return str(r["state"])
    if r.get("enabled") is False:
        return "disabled"
    up = r.get("up")
    return "-" if up is None else ("up" if up else "DOWN")


def print_services(services: list[dict[str, Any]], out: TextIO) -> None:
    """One row per VS, then its SubVSs and real servers indented under it."""
    rows: list[list[str]] = []

    def servers(rs: list[dict[str, Any]], indent: str) -> None:
        for r in rs:
            rows.append([f"{indent}{r['address']}", "", _up(r), _cell(r.get("connections")),
                         _cell(r.get("requests")), _cell(r.get("requests_per_s"), "{:.1f}")])

    for v in services:
        rows.append([v["name"], f"{v['protocol']}://{v['listen']}",
                     "listening" if v.get("listening") else "NOT LISTENING",
                     _cell(v.get("connections")), _cell(v.get("requests")),
                     _cell(v.get("requests_per_s"), "{:.1f}")])
        servers(v.get("real_servers", []), "  ")
        for sub in v.get("subvs", []):
            avail = sub.get("available")
            state = "-" if avail is None else ("available" if avail else "NOT AVAILABLE")
            rows.append([f"  {sub['name']}", "SubVS", state, "", _cell(sub.get("requests")),
                         _cell(sub.get("requests_per_s"), "{:.1f}")])
            servers(sub.get("real_servers", []), "    ")
    if rows:
        table(("VIRTUAL SERVICE / SUBVS / REAL SERVER", "LISTENER", "STATE", "CONNS",
               "REQUESTS", "REQ/S"), rows, out)


def print_cert_status(certs: list[dict[str, Any]], out: TextIO) -> None:
    rows = []
    for c in certs:
        left = c.get("days_left")
        rows.append([c["id"], ",".join(c.get("names", [])) or "-",
                     "-" if left is None else f"{left:.1f}", c.get("state") or "-",
                     (c.get("next_renewal") or "-")[:16],
                     (c.get("last_error") or "-").replace("\n", " ")])
    if rows:
        table(("CERTIFICATE", "NAMES", "DAYS LEFT", "STATE", "NEXT RENEWAL", "LAST ERROR"),
              rows, out)


def print_status(s: dict[str, Any], out: TextIO) -> None:
    rows = [("pid", str(s["pid"])), ("uptime", f"{s['uptime_s']:.0f} s"),
            ("config generation", str(s["generation"])),
            ("virtual services", str(s["virtual_services"])),
            ("injections", str(s["injections"])),
            ("certificates", str(s["certificates"]))]
    fields(rows, out)
    if s.get("services"):
        print(file=out)
        print_services(s["services"], out)
    if s.get("certificate_status"):
        print(file=out)
        print_cert_status(s["certificate_status"], out)
    for c in s["certificates_expiring"]:
        state = "EXPIRED" if c["expired"] else "expires"
        print(f"warning: certificate {c['id']} {state} {c['not_after']}", file=out)
    if s.get("workers"):  # with worker processes only: one row each
        print(file=out)
        table(("WORKER", "PID", "GENERATION", "CONNS", "RESTARTS", "STATE"),
              [[_cell(w.get(k)) for k in ("id", "pid", "generation", "connections", "restarts",
                                          "state")] for w in s["workers"]], out)
    if s.get("cluster"):  # a node of a cluster only
        print(file=out)
        cluster_cli.print_cluster_brief(s["cluster"], out)


def _print_deleted(data: Any, out: TextIO) -> None:
    print(f"deleted {data['deleted']}", file=out)


# -- parser ---------------------------------------------------------------------------------------

def add_commands(top: argparse._SubParsersAction[argparse.ArgumentParser],
                 common: argparse.ArgumentParser) -> None:
    """`status`, `cert ...`, `vs list` and `vs show`."""
    top.add_parser("status", parents=[common], help="is it running, and how",
                   description="Process, VSs, SubVSs and real servers, certificates, workers "
                               "and (in a cluster) the CLUSTER section."
                   ).set_defaults(run=status, show=print_status)

    cs = group(top, "cert", "the SSL certificate store")
    imp = cs.add_parser("import", parents=[common], help="import or replace a certificate")
    imp.add_argument("id")
    imp.add_argument("--cert", metavar="F", help="PEM certificate (leaf first; may hold the chain"
                     " and the key)")
    imp.add_argument("--key", metavar="F", help="PEM private key (optionally encrypted)")
    imp.add_argument("--chain", metavar="F", help="PEM intermediates")
    imp.add_argument("--pkcs12", metavar="F", help="PKCS#12 file instead of PEM")
    pw = imp.add_mutually_exclusive_group()
    pw.add_argument("--passphrase-file", metavar="F", help="file holding the key's passphrase")
    pw.add_argument("--passphrase-env", metavar="VAR", help="environment variable holding it")
    imp.add_argument("--strict", action="store_true",
                     help="refuse an expired or not yet valid certificate")
    imp.add_argument("--replace", action="store_true", help="replace the certificate with this id")
    imp.set_defaults(run=cert_import, show=print_import)
    cs.add_parser("list", parents=[common], help="list certificates").set_defaults(
        run=cert_list, show=print_cert_list)
    show = cs.add_parser("show", parents=[common], help="show one certificate")
    show.add_argument("id")
    show.set_defaults(run=cert_show, show=print_cert)
    delete = cs.add_parser("delete", parents=[common], help="delete an unused certificate")
    delete.add_argument("id")
    delete.set_defaults(run=cert_delete, show=_print_deleted)
    assign = cs.add_parser("assign", parents=[common],
                           help="serve a certificate on an HTTPS VS (or 'admin')")
    assign.add_argument("id")
    assign.add_argument("target", help="VS name, or 'admin' for the admin interface")
    assign.add_argument("--default", action="store_true",
                        help="make it the VS's certificate for clients without SNI")
    assign.add_argument("--remove", action="store_true", help="undo a run-time assignment")
    assign.set_defaults(run=cert_assign, show=print_assign)

    vss = group(top, "vs", "virtual services as they run")
    vss.add_parser("list", parents=[common], help="list virtual services").set_defaults(
        run=vs_list, show=print_vs_list)
    vshow = vss.add_parser("show", parents=[common], help="one VS: rules, SubVSs, servers")
    vshow.add_argument("name")
    vshow.set_defaults(run=vs_show, show=print_vs)


DESCRIPTION = """\
lbproxy: a Layer 7 load balancer. `run` and `check` work on the config file; `cluster new-key`
and `cluster migrate` on files and Redis; every other command asks the running lbproxy through
its admin API. `lbproxy COMMAND --help` tells more; docs/cli.md has everything."""


def build_parser(*local: AddCommands) -> argparse.ArgumentParser:
    """The parser of every `lbproxy` command, in the order `lbproxy --help` lists them: `local`
    first (`run` and `check`, from lbproxy.__main__), then the admin commands."""
    root, top, common = root_parser(DESCRIPTION)
    for add in (*local, ops_cli.add_commands, add_commands, le_cli.add_commands,
                cluster_cli.add_commands):
        add(top, common)
    return root


def main(argv: Sequence[str], *, out: TextIO | None = None, err: TextIO | None = None,
         local: Sequence[AddCommands] = ()) -> int:
    """Run one `lbproxy` command (the admin commands, and `local` ones when given); its exit
    status. Output goes to `out` and `err` (argparse's own usage and help to sys.stdout/stderr)."""
    return dispatch(build_parser(*local), argv, out or sys.stdout, err or sys.stderr)
