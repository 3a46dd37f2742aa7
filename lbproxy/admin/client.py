"""A small synchronous admin API client for the CLI (urllib), and how it finds the API and token.

The address and token come from the config file (`admin.listen`, `<state_dir>/admin.token`,
state_dir relative to the file) unless `--admin URL` / `--token-file F` say otherwise.
"""

from __future__ import annotations

import argparse
import json
import logging
import re
import ssl
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

from ..config import load_file
from ..errors import ConfigError, LBProxyError
from .api import TOKEN_FILE

logger = logging.getLogger(__name__)

# Seconds the CLI waits for one admin API answer (an import fsyncs a few files; generous).
REQUEST_TIMEOUT = 30.0


class ClientError(LBProxyError):
    """The admin API could not be reached, or answered with an error; `status` 0 = no answer."""

    def __init__(self, message: str, status: int = 0, reason: str | None = None) -> None:
        self.status = status
        self.reason = reason
        super().__init__(message)


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
            raise ClientError(f"cannot reach the admin API at {self.base_url}: {why}") from None

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
    except OSError as e:
        raise ClientError(f"cannot read the admin token {path}: {e.strerror}") from None
    if not token:
        raise ClientError(f"the admin token file {path} is empty")
    return token


def _admin_serves_https(state: Path) -> bool:
    """True when a certificate is assigned to the admin interface (it then speaks HTTPS)."""
    try:
        doc = json.loads((state / "certs" / ".assignments.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(doc, dict) and bool(doc.get("admin"))


def connect(config: str | None, admin_url: str | None = None,
            token_file: str | None = None, cacert: str | None = None) -> AdminClient:
    """An AdminClient for the running lbproxy described by `config` and/or the flags.

    The URL derived from the config is https:// when a certificate is assigned to the admin
    interface; `cacert` is the CA file that certificate is verified against (else the system
    store). Verification is never turned off.
    """
    url = admin_url
    token_path = Path(token_file) if token_file else None
    if url is None or token_path is None:
        cfg_path = Path(config or "lbproxy.toml")
        try:
            cfg = load_file(cfg_path)
        except ConfigError as e:
            raise ClientError(f"{cfg_path}: cannot find the admin API from this config "
                              f"({e.problems[0]}); give --admin and --token-file") from None
        state = cfg.state_path(cfg_path)
        if url is None:
            if not cfg.admin.enabled:
                raise ClientError(f"{cfg_path}: the admin API is disabled (admin.enabled)")
            url = _url_for(cfg.admin.listen.host, cfg.admin.listen.port)
            if _admin_serves_https(state):
                url = "https://" + url.removeprefix("http://")
        if token_path is None:
            token_path = state / TOKEN_FILE
    ctx = None
    if cacert:
        try:
            ctx = ssl.create_default_context(cafile=cacert)
        except (OSError, ssl.SSLError) as e:
            raise ClientError(f"--cacert {cacert}: cannot load it as a CA file: {e}") from None
    return AdminClient(url, read_token(token_path), ssl_context=ctx)


# -- what every admin command shares ---------------------------------------------------------------

# LoadMaster's shape: a coded message ends in `(code: N)`, nothing after it.
CODED = re.compile(r"\(code: \d+\)$")


def add_admin_options(p: argparse.ArgumentParser) -> None:
    """The options of every command that talks to the admin API."""
    p.add_argument("-c", "--config", default="lbproxy.toml",
                   help="config file naming the admin address and state_dir")
    p.add_argument("--admin", metavar="URL", help="admin API base URL (overrides config)")
    p.add_argument("--token-file", metavar="F", help="admin token file (overrides config)")
    p.add_argument("--cacert", metavar="F",
                   help="CA file to verify the admin API's certificate (when it is HTTPS)")
    p.add_argument("--json", action="store_true", help="print the API's JSON answer")


def print_result(args: argparse.Namespace, data: Any, out: TextIO) -> int:
    """A command's answer: JSON with --json, else its printer (`args.show`); exit status 0."""
    if args.json:
        print(json.dumps(data, indent=2), file=out)
    else:
        args.show(data, out)
    return 0


def print_failure(args: argparse.Namespace, message: str, out: TextIO, err: TextIO, *,
                  status: int = 0, reason: str | None = None, who: str = "lbproxy") -> int:
    """A refusal or failure: JSON on `out` with --json, else one line on `err` starting with
    `who`; exit status 1.
    The HTTP status follows the message unless it ends with a LoadMaster code (it is in the
    JSON)."""
    if args.json:
        body: dict[str, Any] = {"error": message, "status": status}
        if reason is not None:
            body["reason"] = reason
        print(json.dumps(body), file=out)
    else:
        tail = f" ({status})" if status and not CODED.search(message) else ""
        print(f"{who}: {message}{tail}", file=err)
    return 1
