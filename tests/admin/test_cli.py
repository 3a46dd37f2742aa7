"""The `lbproxy` CLI against a live admin API: every subcommand, human tables and --json, the
admin address and token found from the config file, and errors with their exit status (4
refused, 3 unreachable, 2 usage)."""

from __future__ import annotations

import asyncio
import io
import json
from pathlib import Path

from lbproxy.admin.cli import main
from tests.admin.conftest import CONFIG, Admin
from tests.certs.helpers import issue, serial_of


async def run(admin: Admin, *argv: str, use_config: Path | None = None) -> tuple[int, str, str]:
    """The CLI is synchronous (urllib); run it off the loop that serves the API."""
    out, err = io.StringIO(), io.StringIO()
    flags = (["-c", str(use_config)] if use_config else
             ["--admin", admin.url, "--token-file", str(admin.token_file)])
    code = await asyncio.to_thread(main, [*argv, *flags], out=out, err=err)
    return code, out.getvalue(), err.getvalue()


async def test_cert_commands(admin: Admin, tmp_path: Path) -> None:
    chain, key = issue(admin.ca, "cli.example.com", "*.cli.example.com")
    (tmp_path / "c.pem").write_bytes(chain)
    (tmp_path / "k.pem").write_bytes(key)
    code, out, err = await run(admin, "cert", "import", "cli", "--cert", str(tmp_path / "c.pem"),
                               "--key", str(tmp_path / "k.pem"))
    assert code == 0, err
    assert out.startswith("imported cli: cli.example.com, *.cli.example.com")

    code, out, _ = await run(admin, "cert", "list")
    lines = out.splitlines()
    assert lines[0].split() == ["ID", "NAMES", "ISSUER", "NOT", "AFTER", "KEY", "USED", "BY",
                                "MANAGED", "BY"]
    assert lines[1].split()[0] == "base" and lines[1].split()[-2:] == ["shop", "-"]
    assert lines[2].split()[:2] == ["cli", "cli.example.com,*.cli.example.com"]
    # aligned: a column starts at the same offset on every line
    assert lines[0].index("NAMES") == lines[1].index("shop.") == lines[2].index("cli.")
    assert lines[0].index("ISSUER") == lines[1].index("trustme") == lines[2].index("trustme")

    code, out, _ = await run(admin, "cert", "show", "cli", "--json")
    assert code == 0 and json.loads(out)["serial"] == f"{serial_of(chain):x}"

    code, out, _ = await run(admin, "cert", "assign", "cli", "shop", "--default")
    assert (code, out) == (0, "cli assigned to shop as default\n")
    assert admin.tls.choose("shop", None) == "cli"

    code, out, err = await run(admin, "cert", "delete", "cli")
    assert code == 4 and "in use by shop; unassign it first (409)" in err and out == ""
    code, out, err = await run(admin, "cert", "delete", "cli", "--json")
    assert code == 4 and json.loads(out)["status"] == 409

    code, out, _ = await run(admin, "cert", "assign", "cli", "shop", "--remove")
    assert (code, out) == (0, "cli unassigned from shop\n")
    code, out, _ = await run(admin, "cert", "delete", "cli")
    assert (code, out) == (0, "deleted cli\n")


async def test_import_with_passphrase_and_bad_input(admin: Admin, tmp_path: Path) -> None:
    from cryptography.hazmat.primitives import serialization

    chain, key = issue(admin.ca, "enc.example.com")
    enc = serialization.load_pem_private_key(key, None).private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.BestAvailableEncryption(b"letmein"))
    (tmp_path / "c.pem").write_bytes(chain)
    (tmp_path / "k.pem").write_bytes(enc)
    (tmp_path / "pw").write_text("wrong\n")
    args = ["cert", "import", "enc", "--cert", str(tmp_path / "c.pem"),
            "--key", str(tmp_path / "k.pem"), "--passphrase-file", str(tmp_path / "pw")]
    code, _, err = await run(admin, *args)
    assert code == 4 and "wrong passphrase for the private key (400)" in err
    (tmp_path / "pw").write_text("letmein\n")
    code, out, err = await run(admin, *args, "--json")
    assert code == 0, err
    assert json.loads(out)["certificate"]["id"] == "enc"


async def test_vs_and_status(admin: Admin) -> None:
    code, out, _ = await run(admin, "vs", "list")
    lines = out.splitlines()
    assert lines[0].split() == ["NAME", "LISTEN", "PROTO", "KIND", "SUBVS", "RULES",
                                "CERTIFICATES"]
    assert lines[1].split() == ["shop", "127.0.0.1:18443", "https", "proxy", "2", "2", "base"]
    assert lines[2].split() == ["plain", "127.0.0.1:18080", "http", "proxy", "0", "0", "-"]
    code, out, _ = await run(admin, "vs", "show", "shop")
    assert code == 0
    assert "127.0.0.1:19002 up, 127.0.0.1:19003 down" in out
    assert "certificates: base (default base)" in out
    code, out, _ = await run(admin, "vs", "show", "shop", "--json")
    assert [r["rule"] for r in json.loads(out)["rules"]] == ["api", "default"]
    code, _, err = await run(admin, "vs", "show", "ghost")
    assert code == 4 and "no virtual service 'ghost' (404)" in err
    code, out, _ = await run(admin, "status")
    assert code == 0 and "config generation" in out and "certificates       1" in out


async def test_address_and_token_from_config_file(admin: Admin, tmp_path: Path) -> None:
    port = admin.url.rsplit(":", 1)[1]
    cfg = tmp_path / "lbproxy.toml"
    cfg.write_text(CONFIG.replace('state_dir = "state"',
                                  f'state_dir = "state"\n[admin]\nlisten = "127.0.0.1:{port}"'))
    code, out, err = await run(admin, "status", "--json", use_config=cfg)
    assert code == 0, err
    assert json.loads(out)["virtual_services"] == 2
    (admin.token_file).write_text("not-the-token-not-the-token\n")
    code, _, err = await run(admin, "status", use_config=cfg)
    assert code == 4 and "(401)" in err


async def test_unreachable_and_usage_errors(admin: Admin, tmp_path: Path) -> None:
    out, err = io.StringIO(), io.StringIO()
    code = await asyncio.to_thread(main, ["status", "--admin", "http://127.0.0.1:9",
                                          "--token-file", str(admin.token_file)],
                                   out=out, err=err)
    assert code == 3 and "cannot reach the admin API" in err.getvalue()
    code = await asyncio.to_thread(main, ["cert", "frobnicate"], out=out, err=err)
    assert code == 2
    code = await asyncio.to_thread(main, ["status", "-c", str(tmp_path / "missing.toml")],
                                   out=out, err=err)
    assert code == 3 and "give --admin and --token-file" in err.getvalue()


async def test_le_commands_are_handed_to_le_cli(admin: Admin) -> None:
    out, err = io.StringIO(), io.StringIO()
    code = await asyncio.to_thread(main, ["le", "list", "--admin", admin.url, "--token-file",
                                          str(admin.token_file)], out=out, err=err)
    # This admin app has no /api/le routes: le_cli got the command and reached the API.
    assert code == 4 and "(404)" in err.getvalue()
