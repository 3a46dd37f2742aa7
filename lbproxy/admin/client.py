"""What every `lbproxy` command shares: the exit codes, the admin API client (urllib) and how it
finds the API and token, the admin options, the root parser and the one dispatcher, printing.

The address and token come from the config file (`admin.listen`, `<state_dir>/admin.token`,
state_dir relative to the file) unless `--admin URL` / `--token-file F` say otherwise; with both
flags the config file is never read. A config file with problems is read leniently (its `[admin]`
table and `state_dir` only) so that `lbproxy status` works while `lbproxy check` fails.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import re
import ssl
import sys
import tomllib
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

from ..config import load_file
from ..config.loader import parse_address
from ..config.model import AdminSettings, Config
from ..errors import ConfigError, LBProxyError
from .api import TOKEN_FILE

logger = logging.getLogger(__name__)

# Seconds the CLI waits for one admin API answer (an import fsyncs a few files; generous).
REQUEST_TIMEOUT = 30.0

# -- exit status, the same for every command (docs/cli.md, "Exit status") ------------------------

EXIT_OK = 0           # done
EXIT_FAILED = 1       # failed: `check` found problems, the server failed (5xx), a local step failed
EXIT_USAGE = 2        # bad usage: unknown command or option, missing argument (argparse)
EXIT_UNREACHABLE = 3  # cannot reach the admin API: refused, timeout, TLS, no token, no address
EXIT_REFUSED = 4      # the admin API refused it or did not find it (a 4xx answer)
EXIT_PIPE = 141       # the reader of stdout went away (`lbproxy status | head -1`): 128 + SIGPIPE
EXIT_CODES = {EXIT_OK: "done", EXIT_FAILED: "failed", EXIT_USAGE: "bad usage",
              EXIT_UNREACHABLE: "cannot reach the admin API",
              EXIT_REFUSED: "refused or not found", EXIT_PIPE: "stdout closed early"}


class ClientError(LBProxyError):
    """The admin API could not be reached, or answered with an error; `status` 0 = no answer.
    `exit_code` is the command's exit status: 4 for a 4xx answer, 1 for any other answer,
    else what the raiser says (default 1)."""

    def __init__(self, message: str, status: int = 0, reason: str | None = None, *,
                 exit_code: int | None = None) -> None:
        self.status = status
        self.reason = reason
        if exit_code is None:
            exit_code = EXIT_REFUSED if 400 <= status < 500 else EXIT_FAILED
        self.exit_code = exit_code
        super().__init__(message)


class Unreachable(ClientError):
    """No answer from the admin API, or nothing to ask it with (address, token, CA): exit 3."""

    def __init__(self, message: str) -> None:
        super().__init__(message, exit_code=EXIT_UNREACHABLE)


class UsageError(ClientError):
    """Options that do not go together, found after argparse: exit 2."""

    def __init__(self, message: str) -> None:
        super().__init__(message, exit_code=EXIT_USAGE)


class CommandError(Exception):
    """A refusal or failure of a command that needs no admin API; printed as it is, exit 1."""


@dataclass(frozen=True, slots=True)
class AdminClient:
    base_url: str
    token: str
    timeout: float = REQUEST_TIMEOUT
    ssl_context: ssl.SSLContext | None = None

    def call(self, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
        """One request; returns the decoded JSON answer or raises ClientError."""
        data = json.dumps(body).encode() if body is not None else None
        req = urllib.request.Request(self.base_url.rstrip("/") + path, data=data, method=method)
        req.add_header("Authorization", f"Bearer {self.token}")
        req.add_header("Accept", "application/json")
        if data is not None:
            req.add_header("Content-Type", "application/json")
        try:
            with urllib.request.urlopen(req, timeout=self.timeout,
                                        context=self.ssl_context) as resp:
                return json.loads(resp.read() or b"null")
        except urllib.error.HTTPError as e:
            raw = e.read()
            try:
                err = json.loads(raw)
                message, reason = str(err.get("error", raw[:200])), err.get("reason")
            except (ValueError, AttributeError):
                message, reason = raw[:200].decode(errors="replace") or str(e), None
            raise ClientError(message, e.code, reason) from None
        except (urllib.error.URLError, OSError) as e:
            why = e.reason if isinstance(e, urllib.error.URLError) else e
            raise Unreachable(f"cannot reach the admin API at {self.base_url}: {why}") from None

    def get(self, path: str) -> Any:
        return self.call("GET", path)

    def post(self, path: str, body: dict[str, Any]) -> Any:
        return self.call("POST", path, body)

    def put(self, path: str, body: dict[str, Any]) -> Any:
        return self.call("PUT", path, body)

    def delete(self, path: str) -> Any:
        return self.call("DELETE", path)


def _url_for(host: str, port: int) -> str:
    # An admin API bound to every address is reached over loopback.
    if host in ("0.0.0.0", ""):
        host = "127.0.0.1"
    elif host == "::":
        host = "::1"
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


def read_token(path: Path) -> str:
    try:
        token = path.read_text(encoding="ascii").strip()
    except (OSError, UnicodeDecodeError) as e:
        why = e.strerror if isinstance(e, OSError) else "not ASCII text"
        raise Unreachable(f"cannot read the admin token {path}: {why}") from None
    if not token:
        raise Unreachable(f"the admin token file {path} is empty")
    return token


def _admin_serves_https(state: Path) -> bool:
    """True when a certificate is assigned to the admin interface (it then speaks HTTPS)."""
    try:
        doc = json.loads((state / "certs" / ".assignments.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(doc, dict) and bool(doc.get("admin"))


def lenient_admin(path: Path) -> tuple[AdminSettings, Path]:
    """The `[admin]` table's `listen`/`enabled` and the state directory of a config file that does
    not validate as a whole: only those keys are read (defaults where absent). Raises Unreachable
    when the file cannot be read, is not TOML, or those keys themselves are wrong."""
    def bad(why: str) -> Unreachable:
        return Unreachable(f"{path}: cannot find the admin API from this config ({why}); "
                           "give --admin and --token-file")

    try:
        doc = tomllib.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as e:
        raise bad(f"cannot read: {getattr(e, 'strerror', None) or e}") from None
    except tomllib.TOMLDecodeError as e:
        raise bad(f"not TOML: {e}") from None
    admin = doc.get("admin", {})
    if not isinstance(admin, dict):
        raise bad("admin: not a table")
    settings = AdminSettings()
    listen, enabled = admin.get("listen"), admin.get("enabled", True)
    if listen is not None:
        try:
            settings = dataclasses.replace(settings, listen=parse_address(str(listen)))
        except (ValueError, LBProxyError) as e:
            raise bad(f"admin.listen: {e}") from None
    if not isinstance(enabled, bool):
        raise bad("admin.enabled: not true or false")
    state_dir = doc.get("state_dir", Config().state_dir)
    if not isinstance(state_dir, str):
        raise bad("state_dir: not a string")
    state = dataclasses.replace(Config(), state_dir=state_dir).state_path(path)
    return dataclasses.replace(settings, enabled=enabled), state


def connect(config: str | None, admin_url: str | None = None,
            token_file: str | None = None, cacert: str | None = None,
            warn: Callable[[str], None] | None = None) -> AdminClient:
    """An AdminClient for the running lbproxy described by `config` and/or the flags.

    With both `admin_url` and `token_file` the config is not read. Else a config with problems is
    read leniently (lenient_admin) and `warn` is told so in one line. The URL derived from the
    config is https:// when a certificate is assigned to the admin interface; `cacert` is the CA
    file that certificate is verified against (else the system store). Verification is never
    turned off.
    """
    url = admin_url
    token_path = Path(token_file) if token_file else None
    if url is None or token_path is None:
        cfg_path = Path(config or "lbproxy.toml")
        try:
            cfg = load_file(cfg_path)
            admin, state = cfg.admin, cfg.state_path(cfg_path)
        except ConfigError as e:
            if not cfg_path.is_file():
                raise Unreachable(f"{cfg_path}: cannot find the admin API from this config "
                                  f"({e.problems[0]}); give --admin and --token-file") from None
            admin, state = lenient_admin(cfg_path)
            if warn is not None:
                n = len(e.problems)
                warn(f"warning: {cfg_path} has {n} problem{'s' if n != 1 else ''} (see `lbproxy "
                     f"check -c {cfg_path}`); using its [admin] and state_dir as written")
        if url is None:
            if not admin.enabled:
                raise Unreachable(f"{cfg_path}: the admin API is disabled (admin.enabled)")
            url = _url_for(admin.listen.host, admin.listen.port)
            if _admin_serves_https(state):
                url = "https://" + url.removeprefix("http://")
        if token_path is None:
            token_path = state / TOKEN_FILE
    ctx = None
    if cacert:
        try:
            ctx = ssl.create_default_context(cafile=cacert)
        except (OSError, ssl.SSLError) as e:
            raise Unreachable(f"--cacert {cacert}: cannot load it as a CA file: {e}") from None
    return AdminClient(url, read_token(token_path), ssl_context=ctx)


# -- the shape of every command --------------------------------------------------------------------
#
# A command module has `add_commands(top, common)`: `top` is the root's subparsers action, `common`
# a parent parser holding the admin options. Each leaf parser sets one of
#   run=fn(client: AdminClient, args) -> Any     asks the admin API; answers its JSON
#   local=fn(args) -> Any                        needs no admin API (raises CommandError)
#   main=fn(args, out, err) -> int               prints by itself, returns the exit status
# and, with run or local, show=printer(data, out) for the human output (--json prints the data).

Printer = Callable[[Any, TextIO], None]
AddCommands = Callable[["argparse._SubParsersAction[argparse.ArgumentParser]",
                        argparse.ArgumentParser], None]

# LoadMaster's shape: a coded message ends in `(code: N)`, nothing after it.
CODED = re.compile(r"\(code: \d+\)$")


def version() -> str:
    """The installed distribution's version, else the package's."""
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as dist_version

    try:
        return dist_version("lbproxy")
    except PackageNotFoundError:
        import lbproxy

        return str(getattr(lbproxy, "__version__", "unknown"))


def add_admin_options(p: argparse.ArgumentParser) -> None:
    """The options of every command that talks to the admin API."""
    p.add_argument("-c", "--config", default="lbproxy.toml",
                   help="config file naming the admin address and state_dir (default "
                        "lbproxy.toml; read leniently when it has problems)")
    p.add_argument("--admin", metavar="URL",
                   help="admin API base URL (overrides the config)")
    p.add_argument("--token-file", metavar="F",
                   help="admin token file (overrides the config's <state_dir>/admin.token)")
    p.add_argument("--cacert", metavar="F",
                   help="CA file to verify the admin API's certificate (when it is HTTPS)")
    add_json_option(p)


def add_json_option(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", action="store_true", help="print the answer as JSON")


def group(top: argparse._SubParsersAction[argparse.ArgumentParser], name: str,
          help: str) -> argparse._SubParsersAction[argparse.ArgumentParser]:
    """The subcommands of the group `name` (`lbproxy vs ...`), made on first use: several
    modules may add to one group."""
    if name in top.choices:
        for action in top.choices[name]._actions:
            if isinstance(action, argparse._SubParsersAction):
                return action
        raise ValueError(f"`lbproxy {name}` is a command, not a group")
    p = top.add_parser(name, help=help, description=help)
    return p.add_subparsers(dest="action", required=True, metavar="COMMAND")


def root_parser(description: str | None = None) -> tuple[
        argparse.ArgumentParser, argparse._SubParsersAction[argparse.ArgumentParser],
        argparse.ArgumentParser]:
    """The root parser (with --version), its subparsers action and the admin options' parent;
    command modules add to the last two (lbproxy.admin.cli.build_parser names them)."""
    root = argparse.ArgumentParser(
        prog="lbproxy", description=description,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="exit status: " + ", ".join(f"{k} {v}" for k, v in EXIT_CODES.items()))
    root.add_argument("--version", action="version", version=f"lbproxy {version()}")
    top = root.add_subparsers(dest="command", required=True, metavar="COMMAND")
    common = argparse.ArgumentParser(add_help=False)
    add_admin_options(common)
    return root, top, common


def print_result(args: argparse.Namespace, data: Any, out: TextIO) -> int:
    """A command's answer: JSON with --json, else its printer (`args.show`); exit status 0."""
    if getattr(args, "json", False):
        print(json.dumps(data, indent=2), file=out)
    else:
        args.show(data, out)
    return EXIT_OK


def print_failure(args: argparse.Namespace, message: str, out: TextIO, err: TextIO, *,
                  status: int = 0, reason: str | None = None, who: str = "lbproxy",
                  exit_code: int = EXIT_FAILED) -> int:
    """A refusal or failure: JSON on `out` with --json, else one line on `err` starting with
    `who`; returns `exit_code`.
    The HTTP status follows the message unless it ends with a LoadMaster code (it is in the
    JSON)."""
    if getattr(args, "json", False):
        body: dict[str, Any] = {"error": message, "status": status}
        if reason is not None:
            body["reason"] = reason
        print(json.dumps(body), file=out)
    else:
        tail = f" ({status})" if status and not CODED.search(message) else ""
        print(f"{who}: {message}{tail}", file=err)
    return exit_code


def dispatch(parser: argparse.ArgumentParser, argv: Sequence[str], out: TextIO, err: TextIO,
             connector: Callable[..., AdminClient] | None = None) -> int:
    """Parse `argv` and run the command it names; the exit status (EXIT_*). `connector`
    (default: connect) makes the AdminClient of `run` commands."""
    try:
        args = parser.parse_args(list(argv))
    except SystemExit as e:  # argparse: --help/--version (0) or bad usage (2)
        return e.code if isinstance(e.code, int) else EXIT_USAGE
    main: Callable[[argparse.Namespace, TextIO, TextIO], int] | None = getattr(args, "main", None)
    if main is not None:
        return main(args, out, err)
    try:
        check: Callable[[argparse.Namespace], None] | None = getattr(args, "check", None)
        if check is not None:  # usage a server need not see: refused before any connection
            check(args)
        if getattr(args, "local", None) is not None:
            data = args.local(args)
        else:
            make = connector or connect
            client = make(args.config, args.admin, args.token_file, args.cacert,
                          lambda line: print(f"lbproxy: {line}", file=err))
            data = args.run(client, args)
    except ClientError as e:
        return print_failure(args, str(e), out, err, status=e.status, reason=e.reason,
                             exit_code=e.exit_code)
    except CommandError as e:
        return print_failure(args, str(e), out, err, who=getattr(args, "who", "lbproxy"))
    return print_result(args, data, out)


def quiet_on_closed_pipe(command: Callable[[], int]) -> int:
    """Run `command` and flush stdout; when the reader went away (`lbproxy status | head -1`),
    exit with EXIT_PIPE and no traceback (the recipe of the `signal` module's documentation:
    stdout goes to devnull so that the interpreter's own last flush fails no more)."""
    try:
        code = command()
        sys.stdout.flush()
        return code
    except BrokenPipeError:
        try:
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
        except (OSError, ValueError):  # stdout is not a file (a test's StringIO)
            pass
        return EXIT_PIPE


def table(headers: Sequence[str], rows: Sequence[Sequence[str]], out: TextIO) -> None:
    """Columns padded to their widest cell; the last column is not padded."""
    widths = [max([len(h), *(len(r[i]) for r in rows)]) for i, h in enumerate(headers)]
    for row in (headers, *rows):
        cells = [c.ljust(w) for c, w in zip(row[:-1], widths, strict=False)] + [row[-1]]
        print("  ".join(cells).rstrip(), file=out)


def fields(rows: Sequence[tuple[str, str]], out: TextIO) -> None:
    """`name  value` lines, the values aligned."""
    width = max((len(k) for k, _ in rows), default=0)
    for k, v in rows:
        print(f"{k.ljust(width)}  {v}", file=out)
