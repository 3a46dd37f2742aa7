"""The Let's Encrypt commands of `lbproxy` (and `vs convert`), over the admin API.

    lbproxy le set-directory URL [--ca-bundle F]     lbproxy le register [--email E]
    lbproxy le upload-key FILE [--passphrase-file F] [--replace]
    lbproxy le renew-period DAYS
    lbproxy le request --id ID --cn NAME --vs VS [--san NAME=VS]... [--country C] [--state S]
        [--city C] [--company O] [--unit U] [--email E] [--ec | --key-size N] [--no-wait]
        [--challenge http-01|tls-alpn-01|dns-01]
        (dns-01 needs no VS: --vs may be left out and --san given as NAME)
    lbproxy le list [--json] | account | eligible-vs | renew ID | delete ID
    lbproxy backup [-o FILE] [--passphrase-file F] [--vs] [--certs]
    lbproxy restore FILE [--passphrase-file F] [--vs] [--certs]
    lbproxy vs convert VS

Each takes the admin options (lbproxy.admin.client.add_admin_options); a refusal's message ends
in the LoadMaster code, `(code: N)`. Exit status as lbproxy.admin.client's EXIT_* say.
"""

from __future__ import annotations

import argparse
import base64
import dataclasses
import getpass
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TextIO
from urllib.parse import quote

from .client import (
    AdminClient,
    ClientError,
    Printer,
    UsageError,
    connect,
    dispatch,
    fields,
    group,
    root_parser,
    table,
)

# An order (validation, finalize, download) may take minutes; the CLI waits a bit longer than
# the manager's own order deadline.
ORDER_WAIT = 330.0
# The challenge types a certificate may be proved by (acmeclient.challenges.CHALLENGE_TYPES,
# repeated: the CLI imports nothing of the domain).
CHALLENGES = ("http-01", "tls-alpn-01", "dns-01")
# The one proved by DNS alone: its names need no VS (lbproxy.letsencrypt.solvers.needs_vs).
NO_VS_CHALLENGE = "dns-01"
PASSPHRASE_ENV = "LBPROXY_BACKUP_PASSPHRASE"

Command = Callable[[AdminClient, argparse.Namespace], Any]


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
        raise UsageError(f"give --passphrase-file or set {PASSPHRASE_ENV}")
    first = getpass.getpass("backup passphrase: ")
    if confirm and getpass.getpass("again: ") != first:
        raise ClientError("the passphrases differ")
    return first


# -- commands -------------------------------------------------------------------------------------

def set_directory(c: AdminClient, a: argparse.Namespace) -> Any:
    body: dict[str, Any] = {"directory_url": a.url}
    if a.ca_bundle is not None:
        body["ca_bundle"] = str(Path(a.ca_bundle).resolve()) if a.ca_bundle else ""
    return c.put("/api/le/settings", body)


def renew_period(c: AdminClient, a: argparse.Namespace) -> Any:
    return c.put("/api/le/settings", {"renew_period_days": a.days})


def register(c: AdminClient, a: argparse.Namespace) -> Any:
    return c.post("/api/le/account", {"email": a.email} if a.email is not None else {})


def upload_key(c: AdminClient, a: argparse.Namespace) -> Any:
    body: dict[str, Any] = {"key": _read(a.file, "account key").decode(errors="replace")}
    if a.passphrase_file:
        body["passphrase"] = _read(a.passphrase_file, "passphrase file").decode().rstrip("\r\n")
    if a.replace:
        body["replace"] = True
    return c.post("/api/le/account/key", body)


def account(c: AdminClient, a: argparse.Namespace) -> Any:
    return c.get("/api/le/account")


def _request_sans(a: argparse.Namespace) -> list[dict[str, str]]:
    """The --san values as the API takes them; UsageError for a bad one."""
    vs_free = a.challenge == NO_VS_CHALLENGE
    sans = []
    for s in a.san:
        name, sep, vs = s.partition("=")
        if not name or (not vs_free and (not sep or not vs)):
            raise UsageError(f"--san takes NAME=VS{' or NAME' if vs_free else ''}, got {s!r}")
        sans.append({"name": name, "vs": vs})
    return sans


def check_request(a: argparse.Namespace) -> None:
    """What `le request` refuses before asking the server (exit 2, like argparse)."""
    _request_sans(a)
    if a.vs is None and a.challenge != NO_VS_CHALLENGE:
        # (argparse's words, as when --vs was required of every request)
        raise UsageError(f"the following arguments are required: --vs (the VS answering "
                         f"{a.challenge}; only {NO_VS_CHALLENGE} needs none)")
    if a.ec and a.key_size:
        raise UsageError("give either --ec or --key-size")


def request(c: AdminClient, a: argparse.Namespace) -> Any:
    """(Its usage was checked before any connection: check_request, the command's `check`.)"""
    sans = _request_sans(a)
    body: dict[str, Any] = {
        "id": a.id, "common_name": a.cn, "vs": a.vs or "", "sans": sans,
        "key_type": "rsa" if a.key_size else "ec", "key_size": a.key_size or 2048,
        "challenge": a.challenge, "wait": not a.no_wait,
    }
    for k in ("country", "state", "city", "company", "unit", "email"):
        if getattr(a, k):
            body[k] = getattr(a, k)
    return dataclasses.replace(c, timeout=ORDER_WAIT).post("/api/le/certs", body)


def list_certs(c: AdminClient, a: argparse.Namespace) -> Any:
    return c.get("/api/le/certs")


def eligible(c: AdminClient, a: argparse.Namespace) -> Any:
    return c.get("/api/le/eligible-vs")


def renew(c: AdminClient, a: argparse.Namespace) -> Any:
    return dataclasses.replace(c, timeout=ORDER_WAIT).post(
        f"/api/le/certs/{quote(a.id, safe='')}/renew", {"wait": True})


def delete(c: AdminClient, a: argparse.Namespace) -> Any:
    return c.delete(f"/api/le/certs/{quote(a.id, safe='')}")


def backup(c: AdminClient, a: argparse.Namespace) -> Any:
    answer = c.post("/api/le/backup", {"passphrase": _passphrase(a, confirm=True),
                                        "vs": a.vs, "certs": a.certs})
    data = base64.b64decode(answer["backup"])
    fd = os.open(a.output, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    return {"backup": a.output, "bytes": len(data), "vs": a.vs, "certs": a.certs}


def restore(c: AdminClient, a: argparse.Namespace) -> Any:
    data = _read(a.file, "backup")
    return c.post("/api/le/restore", {"backup": base64.b64encode(data).decode(),
                                      "passphrase": _passphrase(a, confirm=False),
                                      "vs": a.vs, "certs": a.certs})


def convert(c: AdminClient, a: argparse.Namespace) -> Any:
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
    if d.get("challenge", "http-01") != "http-01":   # LoadMaster's output stays as it was
        print(f"{'Challenge:':15}{d['challenge']}", file=out)
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
            _challenge_column(r)] for r in rows], out)
    for r in rows:
        if r.get("last_error"):
            print(f"{r['id']}: last error: {r['last_error']}", file=out)


def _challenge_column(r: Any) -> str:
    """The names' VSs, after the challenge type when it is not LoadMaster's http-01."""
    vss = "; ".join(r["http_challenge_vs"])
    kind = r.get("challenge") or "http-01"
    return vss if kind == "http-01" else f"{kind}: {vss}"


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


def show_deleted(d: Any, out: TextIO) -> None:
    print(f"deleted Let's Encrypt certificate {d['deleted']}", file=out)


def show_backup(d: Any, out: TextIO) -> None:
    parts = ["the account and settings"] + (["the VS configuration"] if d.get("vs") else []) + (
        ["the certificates and their assignments"] if d.get("certs") else [])
    what = ", ".join(parts[:-1]) + " and " + parts[-1] if len(parts) > 1 else parts[0]
    print(f"wrote {d['backup']} ({d['bytes']} bytes, encrypted, mode 0600): {what}", file=out)


def show_restore(d: Any, out: TextIO) -> None:
    certs = d.get("certificates") or []
    fields([("account", d.get("account") or "none in the backup"),
            ("certificates", ", ".join(certs) if certs else "none"),
            ("VS configuration", "applied" if d.get("vs") else "not restored"),
            ("assignments", str(len(d.get("assignments") or [])))], out)
    for a in d.get("assignments") or []:
        print(f"  {a['certificate']} -> {a['target']}{' (default)' if a.get('default') else ''}",
              file=out)
    missed = d.get("not_restored") or []
    if missed:
        print(f"not restored ({len(missed)}, code 102):", file=out)
        for m in missed:
            target = f" on {m['target']}" if m.get("target") else ""
            print(f"  {m['certificate']}{target}: {m['reason']}", file=out)


# -- parser -------------------------------------------------------------------------------------

def add_commands(top: argparse._SubParsersAction[argparse.ArgumentParser],
                 common: argparse.ArgumentParser) -> None:
    """`le ...`, `backup`, `restore` and `vs convert`."""
    def cmd(sub: argparse._SubParsersAction[argparse.ArgumentParser], name: str, run: Command,
            show: Printer, help: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, parents=[common], help=help, description=help)
        p.set_defaults(run=run, show=show)
        return p

    le = group(top, "le", "Let's Encrypt certificates")
    p = cmd(le, "set-directory", set_directory, show_account, "set the ACME directory URL")
    p.add_argument("url")
    p.add_argument("--ca-bundle", default=None, metavar="F",
                   help="PEM trusted for the CA's own TLS (\"\": the system store)")
    p = cmd(le, "register", register, show_account, "register an account (key generated)")
    p.add_argument("--email", default=None)
    p = cmd(le, "upload-key", upload_key, show_account, "link an account by its key")
    p.add_argument("file")
    p.add_argument("--passphrase-file", default=None, metavar="F",
                   help="file holding the key's passphrase")
    p.add_argument("--replace", action="store_true",
                   help="replace the account already linked (refused with code 6 without it)")
    p = cmd(le, "renew-period", renew_period, show_account, "days before expiry (1-60)")
    p.add_argument("days", type=int)
    cmd(le, "account", account, show_account, "show the account")
    p = cmd(le, "request", request, show_cert, "request a certificate")
    p.set_defaults(check=check_request)
    p.add_argument("--id", required=True)
    p.add_argument("--cn", required=True)
    p.add_argument("--vs", default=None,
                   help="the VS answering the common name's challenge (required, except with "
                        "dns-01, which uses no VS)")
    p.add_argument("--san", action="append", default=[], metavar="NAME=VS",
                   help="a SAN and the VS answering its challenge, repeated (up to 10); with "
                        "dns-01 NAME alone")
    for k in ("country", "state", "city", "company", "unit", "email"):
        p.add_argument(f"--{k}", default="")
    p.add_argument("--ec", action="store_true", help="EC P-256 key (the default)")
    p.add_argument("--key-size", type=int, choices=[2048, 3072, 4096], default=None,
                   help="RSA key of this size")
    p.add_argument("--no-wait", action="store_true", help="return once the order is placed")
    p.add_argument("--challenge", choices=CHALLENGES, default="http-01",
                   help="how the names are proved, kept for renewals (default http-01; "
                        "tls-alpn-01: on the HTTPS VS named by --vs/--san, port 443; dns-01: "
                        "TXT records through [letsencrypt.dns], no VS needed, the only one "
                        "for a wildcard name)")
    cmd(le, "list", list_certs, show_list, "list Let's Encrypt certificates")
    cmd(le, "eligible-vs", eligible, show_eligible, "VSs that can answer challenges")
    p = cmd(le, "renew", renew, show_cert, "renew a certificate now")
    p.add_argument("id")
    p = cmd(le, "delete", delete, show_deleted, "delete a certificate (refused while in use)")
    p.add_argument("id")

    p = cmd(top, "backup", backup, show_backup, "encrypted backup of the Let's Encrypt account")
    p.add_argument("-o", "--output", default="lbproxy-le-backup.json", metavar="FILE")
    p.add_argument("--passphrase-file", default=None, metavar="F",
                   help=f"file holding the backup's passphrase (else ${PASSPHRASE_ENV}, else "
                        "a prompt)")
    p.add_argument("--vs", action="store_true", help="include the VS configuration")
    p.add_argument("--certs", action="store_true", help="include the certificates")
    p = cmd(top, "restore", restore, show_restore, "restore a backup")
    p.add_argument("file")
    p.add_argument("--passphrase-file", default=None, metavar="F",
                   help=f"file holding the backup's passphrase (else ${PASSPHRASE_ENV}, else "
                        "a prompt)")
    p.add_argument("--vs", action="store_true", help="restore the VS configuration (run time)")
    p.add_argument("--certs", action="store_true", help="restore the certificates")

    p = cmd(group(top, "vs", "virtual services as they run"), "convert", convert, show_convert,
            "move a VS's Real Servers into a SubVS (run time) so it can answer challenges")
    p.add_argument("vs")


def main(argv: Sequence[str], *, out: TextIO | None = None, err: TextIO | None = None) -> int:
    """These commands alone, for callers of this module (`lbproxy` runs lbproxy.admin.cli's one
    parser). The client comes from this module's `connect`, looked up at each call."""
    root, top, common = root_parser()
    add_commands(top, common)
    return dispatch(root, argv, out or sys.stdout, err or sys.stderr,
                    lambda *a: connect(*a))
