"""The Let's Encrypt commands of `lbproxy` (and `vs convert`), over the admin API.

    lbproxy le set-directory URL [--ca-bundle F]     lbproxy le register [--email E]
    lbproxy le upload-key FILE [--passphrase-file F] [--replace]
    lbproxy le renew-period DAYS
    lbproxy le request --id ID --cn NAME --vs VS [--san NAME=VS]... [--country C] [--state S]
        [--city C] [--company O] [--unit U] [--email E] [--ec | --key-size N] [--no-wait]
    lbproxy le list [--json] | account | eligible-vs | renew ID | delete ID
    lbproxy backup [-o FILE] [--passphrase-file F] [--vs] [--certs]
    lbproxy restore FILE [--passphrase-file F] [--vs] [--certs]
    lbproxy vs convert VS

Each takes --json, -c CONFIG (default lbproxy.toml), --admin URL and --token-file F. Exit status:
0 done, 1 refused or unreachable (the message ends in the LoadMaster code, `(code: N)`), 2 bad
usage.
"""

from __future__ import annotations

import argparse
import base64
import dataclasses
import getpass
import json
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TextIO
from urllib.parse import quote

from .client import (
    AdminClient,
    ClientError,
    add_admin_options,
    connect,
    print_failure,
    print_result,
)

# An order (validation, finalize, download) may take minutes; the CLI waits a bit longer than
# the manager's own order deadline.
ORDER_WAIT = 330.0
PASSPHRASE_ENV = "LBPROXY_BACKUP_PASSPHRASE"

Command = Callable[[AdminClient, argparse.Namespace, TextIO], Any]


def _read(path: str, what: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as e:
        raise ClientError(f"cannot read the {what} {path}: {e.strerror}") from None


def _passphrase(args: argparse.Namespace, *, confirm: bool) -> str:
    if args.passphrase_file:
        return _read(args.passphrase_file, "passphrase file").decode().rstrip("\r\n")
    if os.environ.get(PASSPHRASE_ENV):
        return os.environ[PASSPHRASE_ENV]
    if not sys.stdin.isatty():
        raise ClientError(f"give --passphrase-file or set {PASSPHRASE_ENV}")
    first = getpass.getpass("backup passphrase: ")
    if confirm and getpass.getpass("again: ") != first:
        raise ClientError("the passphrases differ")
    return first


def table(headers: Sequence[str], rows: Sequence[Sequence[str]], out: TextIO) -> None:
    widths = [max([len(h), *(len(r[i]) for r in rows)]) for i, h in enumerate(headers)]
    for row in (headers, *rows):
        cells = [c.ljust(w) for c, w in zip(row[:-1], widths, strict=False)] + [row[-1]]
        print("  ".join(cells).rstrip(), file=out)


# -- commands -------------------------------------------------------------------------------------

def set_directory(c: AdminClient, a: argparse.Namespace, out: TextIO) -> Any:
    body: dict[str, Any] = {"directory_url": a.url}
    if a.ca_bundle is not None:
        body["ca_bundle"] = str(Path(a.ca_bundle).resolve()) if a.ca_bundle else ""
    return c.put("/api/le/settings", body)


def renew_period(c: AdminClient, a: argparse.Namespace, out: TextIO) -> Any:
    return c.put("/api/le/settings", {"renew_period_days": a.days})


def register(c: AdminClient, a: argparse.Namespace, out: TextIO) -> Any:
    return c.post("/api/le/account", {"email": a.email} if a.email is not None else {})


def upload_key(c: AdminClient, a: argparse.Namespace, out: TextIO) -> Any:
    body: dict[str, Any] = {"key": _read(a.file, "account key").decode(errors="replace")}
    if a.passphrase_file:
        body["passphrase"] = _read(a.passphrase_file, "passphrase file").decode().rstrip("\r\n")
    if a.replace:
        body["replace"] = True
    return c.post("/api/le/account/key", body)


def account(c: AdminClient, a: argparse.Namespace, out: TextIO) -> Any:
    return c.get("/api/le/account")


def request(c: AdminClient, a: argparse.Namespace, out: TextIO) -> Any:
    sans = []
    for s in a.san:
        name, sep, vs = s.partition("=")
        if not sep or not name or not vs:
            raise ClientError(f"--san takes NAME=VS, got {s!r}")
        sans.append({"name": name, "vs": vs})
    if a.ec and a.key_size:
        raise ClientError("give either --ec or --key-size")
    body: dict[str, Any] = {
        "id": a.id, "common_name": a.cn, "vs": a.vs, "sans": sans,
        "key_type": "rsa" if a.key_size else "ec", "key_size": a.key_size or 2048,
        "wait": not a.no_wait,
    }
    for k in ("country", "state", "city", "company", "unit", "email"):
        if getattr(a, k):
            body[k] = getattr(a, k)
    return dataclasses.replace(c, timeout=ORDER_WAIT).post("/api/le/certs", body)


def list_certs(c: AdminClient, a: argparse.Namespace, out: TextIO) -> Any:
    return c.get("/api/le/certs")


def eligible(c: AdminClient, a: argparse.Namespace, out: TextIO) -> Any:
    return c.get("/api/le/eligible-vs")


def renew(c: AdminClient, a: argparse.Namespace, out: TextIO) -> Any:
    return dataclasses.replace(c, timeout=ORDER_WAIT).post(
        f"/api/le/certs/{quote(a.id, safe='')}/renew", {"wait": True})


def delete(c: AdminClient, a: argparse.Namespace, out: TextIO) -> Any:
    return c.delete(f"/api/le/certs/{quote(a.id, safe='')}")


def backup(c: AdminClient, a: argparse.Namespace, out: TextIO) -> Any:
    answer = c.post("/api/le/backup", {"passphrase": _passphrase(a, confirm=True),
                                        "vs": a.vs, "certs": a.certs})
    data = base64.b64decode(answer["backup"])
    fd = os.open(a.output, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    return {"backup": a.output, "bytes": len(data), "vs": a.vs, "certs": a.certs}


def restore(c: AdminClient, a: argparse.Namespace, out: TextIO) -> Any:
    data = _read(a.file, "backup")
    return c.post("/api/le/restore", {"backup": base64.b64encode(data).decode(),
                                      "passphrase": _passphrase(a, confirm=False),
                                      "vs": a.vs, "certs": a.certs})


def convert(c: AdminClient, a: argparse.Namespace, out: TextIO) -> Any:
    return c.post(f"/api/le/vs/{quote(a.vs, safe='')}/convert", {})


# -- output -------------------------------------------------------------------------------------

def show_account(d: Any, out: TextIO) -> None:
    s = d.get("settings", {})
    print(f"Account ID:    {d.get('account_id') or '(not registered)'}", file=out)
    if d.get("email"):
        print(f"Email:         {d['email']}", file=out)
    if d.get("problem"):
        print(f"Problem:       {d['problem']}", file=out)
    print(f"Directory:     {s.get('directory_url', '')}", file=out)
    if s.get("ca_bundle"):
        print(f"CA bundle:     {s['ca_bundle']}", file=out)
    days = s.get("renew_period_days", "")
    print(f"Renew period:  {days} day{'' if days == 1 else 's'}", file=out)


def show_cert(d: Any, out: TextIO) -> None:
    for k, label in (("id", "Certificate"), ("common_name", "Common name"),
                     ("status", "Status"), ("serial", "Serial"), ("not_after", "Expires"),
                     ("next_attempt", "Next attempt"), ("last_error", "Last error")):
        if d.get(k):
            print(f"{label + ':':15}{d[k]}", file=out)
    print(f"{'HTTP Challenge VS(s):':15} {', '.join(d.get('http_challenge_vs', []))}", file=out)


def show_list(rows: Any, out: TextIO) -> None:
    if not rows:
        print("no Let's Encrypt certificates", file=out)
        return
    table(["ID", "COMMON NAME", "STATUS", "EXPIRES", "NEXT ATTEMPT", "IN USE BY",
           "HTTP CHALLENGE VS(S)"],
          [[r["id"], r["common_name"], r["status"] + (f" (code {r['last_code']})"
                                                      if r.get("last_code") else ""),
            r["not_after"][:16], r["next_attempt"][:16], ",".join(r["in_use_by"]) or "-",
            "; ".join(r["http_challenge_vs"])] for r in rows], out)
    for r in rows:
        if r.get("last_error"):
            print(f"{r['id']}: last error: {r['last_error']}", file=out)


def show_eligible(rows: Any, out: TextIO) -> None:
    if not rows:
        print("no eligible VS (HTTP/HTTPS Layer 7 VSs without Real Servers on the parent; "
              "see `lbproxy vs convert`)", file=out)
    table(["VS", "PROTOCOL", "LISTEN"], [[r["name"], r["protocol"], r["listen"]] for r in rows],
          out)


def show_convert(d: Any, out: TextIO) -> None:
    print(f"VS {d['vs']}: Real Servers moved into SubVS {d['subvs']} (rule default).", file=out)
    print(f"Written to {d['config_file']} and applied (a reload keeps it):\n", file=out)
    print(d["toml"], file=out, end="")


def show_done(d: Any, out: TextIO) -> None:
    print(json.dumps(d, indent=2), file=out)


# -- parser -------------------------------------------------------------------------------------

def _parser() -> argparse.ArgumentParser:
    root = argparse.ArgumentParser(prog="lbproxy")
    top = root.add_subparsers(dest="group", required=True)

    def cmd(sub: Any, name: str, run: Command, show: Callable[[Any, TextIO], None],
            help: str) -> argparse.ArgumentParser:
        p: argparse.ArgumentParser = sub.add_parser(name, help=help)
        add_admin_options(p)
        p.set_defaults(run=run, show=show)
        return p

    le = top.add_parser("le", help="Let's Encrypt certificates").add_subparsers(
        dest="cmd", required=True)
    p = cmd(le, "set-directory", set_directory, show_account, "set the ACME directory URL")
    p.add_argument("url")
    p.add_argument("--ca-bundle", default=None, help="PEM trusted for the CA's own TLS")
    p = cmd(le, "register", register, show_account, "register an account (key generated)")
    p.add_argument("--email", default=None)
    p = cmd(le, "upload-key", upload_key, show_account, "link an account by its key")
    p.add_argument("file")
    p.add_argument("--passphrase-file", default=None)
    p.add_argument("--replace", action="store_true",
                   help="replace the account already linked (refused with code 6 without it)")
    p = cmd(le, "renew-period", renew_period, show_account, "days before expiry (1-60)")
    p.add_argument("days", type=int)
    cmd(le, "account", account, show_account, "show the account")
    p = cmd(le, "request", request, show_cert, "request a certificate")
    p.add_argument("--id", required=True)
    p.add_argument("--cn", required=True)
    p.add_argument("--vs", required=True)
    p.add_argument("--san", action="append", default=[], metavar="NAME=VS")
    for k in ("country", "state", "city", "company", "unit", "email"):
        p.add_argument(f"--{k}", default="")
    p.add_argument("--ec", action="store_true", help="EC P-256 key (the default)")
    p.add_argument("--key-size", type=int, choices=[2048, 3072, 4096], default=None,
                   help="RSA key of this size")
    p.add_argument("--no-wait", action="store_true", help="return once the order is placed")
    cmd(le, "list", list_certs, show_list, "list Let's Encrypt certificates")
    cmd(le, "eligible-vs", eligible, show_eligible, "VSs that can answer challenges")
    p = cmd(le, "renew", renew, show_cert, "renew a certificate now")
    p.add_argument("id")
    p = cmd(le, "delete", delete, show_done, "delete a certificate (refused while in use)")
    p.add_argument("id")

    p = cmd(top, "backup", backup, show_done, "encrypted backup of the Let's Encrypt account")
    p.add_argument("-o", "--output", default="lbproxy-le-backup.json")
    p.add_argument("--passphrase-file", default=None)
    p.add_argument("--vs", action="store_true", help="include the VS configuration")
    p.add_argument("--certs", action="store_true", help="include the certificates")
    p = cmd(top, "restore", restore, show_done, "restore a backup")
    p.add_argument("file")
    p.add_argument("--passphrase-file", default=None)
    p.add_argument("--vs", action="store_true", help="restore the VS configuration (run time)")
    p.add_argument("--certs", action="store_true", help="restore the certificates")

    vs = top.add_parser("vs", help="virtual services").add_subparsers(dest="cmd", required=True)
    p = cmd(vs, "convert", convert, show_convert,
            "move a VS's Real Servers into a SubVS (run time) so it can answer challenges")
    p.add_argument("vs")
    return root


def main(argv: list[str], *, out: TextIO | None = None, err: TextIO | None = None) -> int:
    out = out or sys.stdout
    err = err or sys.stderr
    try:
        args = _parser().parse_args(argv)
    except SystemExit as e:
        return int(e.code) if isinstance(e.code, int) else 2
    try:
        client = connect(args.config, args.admin, args.token_file, args.cacert)
        data = args.run(client, args, out)
    except ClientError as e:
        return print_failure(args, str(e), out, err, status=e.status, reason=e.reason)
    return print_result(args, data, out)
