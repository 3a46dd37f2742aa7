"""One `lbproxy` CLI: every command in `--help` and every group's subcommands in its own,
`--version`, quiet on a closed pipe (the real console script), the exit statuses 0/1/2/3/4 as
docs/cli.md documents them, admin commands that work while the config file has problems
(`--admin`/`--token-file`, or its [admin] table read leniently), human output for `backup`,
`le delete` and `restore`, `run --watch`, `check --json` lines, and docs/cli.md in step with the
parser."""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import json
import os
import re
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from lbproxy import __main__ as lbproxy_main
from lbproxy.admin import client as client_mod
from lbproxy.admin.client import (
    EXIT_CODES,
    EXIT_FAILED,
    EXIT_OK,
    EXIT_PIPE,
    EXIT_REFUSED,
    EXIT_UNREACHABLE,
    EXIT_USAGE,
)
from tests.admin.conftest import CONFIG, Admin, running_admin
from tests.support.pebble import free_port

ROOT = Path(__file__).resolve().parents[2]
CONSOLE_SCRIPT = Path(sys.executable).parent / "lbproxy"
# What issue 18 asks `lbproxy --help` to list, at least.
COMMANDS = {"run", "check", "reload", "status", "server", "cert", "vs", "le", "backup",
            "restore", "cluster"}
WAIT = 60.0  # bound of a subprocess on a loaded 2-core machine


def _subparsers(p: argparse.ArgumentParser) -> argparse._SubParsersAction[Any] | None:
    return next((a for a in p._actions if isinstance(a, argparse._SubParsersAction)), None)


def _leaves(p: argparse.ArgumentParser, prefix: tuple[str, ...] = ()
            ) -> Iterator[tuple[str, ...]]:
    sub = _subparsers(p)
    if sub is None:
        yield prefix
        return
    for name, child in sub.choices.items():
        yield from _leaves(child, (*prefix, name))


PARSER = lbproxy_main._parser()
TOP = _subparsers(PARSER)
assert TOP is not None
GROUPS = {name: p for name, p in TOP.choices.items() if _subparsers(p) is not None}


def run_main(*argv: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    code = lbproxy_main.main(list(argv), out=out, err=err)
    return code, out.getvalue(), err.getvalue()


async def run_async(*argv: str) -> tuple[int, str, str]:
    """The CLI is synchronous (urllib): off the loop that serves the admin API."""
    return await asyncio.to_thread(run_main, *argv)


def flags(admin: Admin) -> list[str]:
    return ["--admin", admin.url, "--token-file", str(admin.token_file)]


# -- help and version -------------------------------------------------------------------------

def test_help_lists_every_command(capsys: pytest.CaptureFixture[str]) -> None:
    assert run_main("--help")[0] == EXIT_OK
    text = capsys.readouterr().out
    assert TOP is not None and COMMANDS <= set(TOP.choices)
    listed = set(re.findall(r"^    (\S+)", text, re.M))
    assert listed == set(TOP.choices), text
    assert "exit status: 0 done, 1 failed, 2 bad usage, 3 cannot reach" in " ".join(text.split())


@pytest.mark.parametrize("group", sorted(GROUPS))
def test_each_group_help_lists_all_its_subcommands(group: str,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    assert run_main(group, "--help")[0] == EXIT_OK
    text = capsys.readouterr().out
    sub = _subparsers(GROUPS[group])
    assert sub is not None and sub.choices
    listed = set(re.findall(r"^    (\S+)", text, re.M))
    assert listed == set(sub.choices), text


def test_vs_help_shows_convert_and_server_help_shows_drain(
        capsys: pytest.CaptureFixture[str]) -> None:
    run_main("vs", "--help")
    assert {"list", "show", "convert"} <= set(re.findall(r"^    (\S+)", capsys.readouterr().out,
                                                       re.M))
    run_main("server", "--help")
    assert {"list", "enable", "disable", "drain", "weight"} <= set(
        re.findall(r"^    (\S+)", capsys.readouterr().out, re.M))


def test_every_leaf_has_something_to_run() -> None:
    leaves = list(_leaves(PARSER))
    assert len(leaves) >= 30
    for leaf in leaves:
        p: argparse.ArgumentParser = PARSER
        for name in leaf:
            sub = _subparsers(p)
            assert sub is not None
            p = sub.choices[name]
        defaults = {k: p.get_default(k) for k in ("run", "local", "main", "show")}
        runs = defaults["main"] or (
            (defaults["run"] or defaults["local"]) and defaults["show"])
        assert runs, f"`lbproxy {' '.join(leaf)}` sets neither main nor run/local with show"


def test_version_is_the_installed_distributions(capsys: pytest.CaptureFixture[str],
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    from importlib.metadata import PackageNotFoundError, version

    assert run_main("--version")[0] == EXIT_OK
    assert capsys.readouterr().out == f"lbproxy {version('lbproxy')}\n"

    def missing(name: str) -> str:
        raise PackageNotFoundError(name)

    monkeypatch.setattr("importlib.metadata.version", missing)
    monkeypatch.setattr("lbproxy.__version__", "9.8.7-src", raising=False)
    assert client_mod.version() == "9.8.7-src"


def test_the_console_script_prints_its_version() -> None:
    done = subprocess.run([str(CONSOLE_SCRIPT), "--version"], capture_output=True, text=True,
                          timeout=WAIT)
    assert done.returncode == 0 and done.stdout.startswith("lbproxy "), done.stderr


# -- a closed pipe ----------------------------------------------------------------------------

def many_vs_config(n: int) -> str:
    """`n` plain VSs (never bound: the admin API only describes them), so that `status` prints
    far more than a pipe holds (64 KiB)."""
    base = CONFIG.split("[[vs]]")[0]
    vss = "".join(f'\n[[vs]]\nname = "vs{i:04d}"\nlisten = "127.0.0.1:{20000 + i}"\n'
                  f'real_servers = [ {{ address = "127.0.0.1:{30000 + i}" }} ]\n'
                  for i in range(n))
    return base + vss


async def test_status_into_a_reader_that_reads_one_line_and_closes(tmp_path: Path) -> None:
    """`lbproxy status | head -1`: the real console script writes into a pipe whose reader takes
    one line and closes it while the script still has most of its table to write."""
    def head_1(argv: list[str]) -> tuple[bytes, bytes, int]:
        with subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE) as proc:
            assert proc.stdout is not None and proc.stderr is not None
            try:
                first = proc.stdout.readline()
                proc.stdout.close()
                err = proc.stderr.read()
                return first, err, proc.wait(timeout=WAIT)
            finally:
                proc.kill()

    async with running_admin(tmp_path, config=many_vs_config(1500)) as admin:
        first, err, code = await asyncio.to_thread(
            head_1, [str(CONSOLE_SCRIPT), "status", *flags(admin)])
        # the table is far bigger than the pipe: the script was still writing when it closed
        code_full, out_full, _ = await run_async("status", *flags(admin))
    assert code_full == EXIT_OK and len(out_full) > 4 * 65536
    assert first.startswith(b"pid ")
    assert b"Traceback" not in err and b"BrokenPipe" not in err, err.decode()
    assert err == b"" and code == EXIT_PIPE


# --help: argparse ignores a failed write of the help and exits 0 (docs/cli.md says so)
@pytest.mark.parametrize(("argv", "status"), [(["--help"], EXIT_OK), (["vs", "--help"], EXIT_OK),
                                              (["check", "-c", "{cfg}"], EXIT_PIPE),
                                              (["cluster", "new-key", "{key}"], EXIT_PIPE)])
def test_a_pipe_closed_before_anything_is_written(argv: list[str], status: int,
                                                  tmp_path: Path) -> None:
    cfg = tmp_path / "lbproxy.toml"
    cfg.write_text(CONFIG)
    read, write = os.pipe()
    os.close(read)  # no reader at all: the first write fails
    try:
        done = subprocess.run([str(CONSOLE_SCRIPT),
                               *(a.format(cfg=cfg, key=tmp_path / "k") for a in argv)],
                              stdout=write, stderr=subprocess.PIPE, timeout=WAIT)
    finally:
        os.close(write)
    assert b"Traceback" not in done.stderr, done.stderr.decode()
    assert done.stderr == b"" and done.returncode == status


# -- exit status ------------------------------------------------------------------------------

def test_bad_usage_is_2(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    assert run_main("stats")[0] == EXIT_USAGE
    assert "invalid choice: 'stats'" in capsys.readouterr().err
    assert run_main("cert", "show")[0] == EXIT_USAGE          # missing ID
    assert run_main("status", "--frobnicate")[0] == EXIT_USAGE
    assert run_main("run", "--workers", "9999", "-c", str(tmp_path / "x.toml"))[0] == EXIT_USAGE
    done = subprocess.run([str(CONSOLE_SCRIPT), "vs"], capture_output=True, text=True,
                          timeout=WAIT)
    assert done.returncode == EXIT_USAGE and "required: COMMAND" in done.stderr


async def test_options_that_do_not_go_together_are_2(admin: Admin, tmp_path: Path) -> None:
    (tmp_path / "c.pem").write_text("x")
    code, _, err = await run_async("cert", "import", "x", "--cert", str(tmp_path / "c.pem"),
                                   "--pkcs12", str(tmp_path / "c.pem"), *flags(admin))
    assert code == EXIT_USAGE and "give either --pkcs12 or --cert" in err


async def test_cannot_reach_the_admin_api_is_3(admin: Admin, tmp_path: Path) -> None:
    port = free_port()
    code, _, err = await run_async("status", "--admin", f"http://127.0.0.1:{port}",
                                   "--token-file", str(admin.token_file))
    assert code == EXIT_UNREACHABLE and "cannot reach the admin API" in err
    code, out, _ = await run_async("status", "--admin", f"http://127.0.0.1:{port}",
                                   "--token-file", str(admin.token_file), "--json")
    assert code == EXIT_UNREACHABLE and "cannot reach" in json.loads(out)["error"]
    # TLS: HTTPS spoken to a plain-HTTP admin API fails the handshake
    code, _, err = await run_async("status", "--admin", admin.url.replace("http:", "https:"),
                                   "--token-file", str(admin.token_file))
    assert code == EXIT_UNREACHABLE and "cannot reach the admin API" in err
    code, _, err = await run_async("status", "--admin", admin.url,
                                   "--token-file", str(tmp_path / "no-token"))
    assert code == EXIT_UNREACHABLE and "cannot read the admin token" in err
    code, _, err = await run_async("status", "--admin", admin.url, "--token-file",
                                   str(admin.token_file), "--cacert", str(tmp_path / "none.pem"))
    assert code == EXIT_UNREACHABLE and "--cacert" in err
    code, _, err = await run_async("status", "-c", str(tmp_path / "missing.toml"))
    assert code == EXIT_UNREACHABLE and "give --admin and --token-file" in err
    disabled = tmp_path / "off.toml"
    disabled.write_text(CONFIG + "\n[admin]\nenabled = false\n")
    code, _, err = await run_async("status", "-c", str(disabled))
    assert code == EXIT_UNREACHABLE and "the admin API is disabled" in err


def test_an_api_that_never_answers_is_3() -> None:
    """A listening socket that never answers (the kernel completes the handshake from the
    backlog): the request times out, and that is "cannot reach"."""
    with socket.create_server(("127.0.0.1", 0)) as silent:
        port = silent.getsockname()[1]
        client = client_mod.AdminClient(f"http://127.0.0.1:{port}", "tok", timeout=0.5)
        with pytest.raises(client_mod.ClientError) as e:
            client.get("/api/status")
    assert e.value.exit_code == EXIT_UNREACHABLE and "timed out" in str(e.value)


async def test_refused_or_not_found_is_4(admin: Admin, tmp_path: Path) -> None:
    code, _, err = await run_async("vs", "show", "ghost", *flags(admin))
    assert code == EXIT_REFUSED and "no virtual service 'ghost' (404)" in err
    code, out, _ = await run_async("cert", "delete", "base", *flags(admin), "--json")
    assert code == EXIT_REFUSED and json.loads(out)["status"] == 409
    wrong = tmp_path / "wrong.token"
    wrong.write_text("not-the-token-not-the-token\n")
    code, _, err = await run_async("status", "--admin", admin.url, "--token-file", str(wrong))
    assert code == EXIT_REFUSED and "(401)" in err


def _failing_le_routes(app: web.Application) -> None:
    async def fail(_r: web.Request) -> web.Response:
        return web.json_response({"error": "bad directory at https://x.test/dir: expected JSON "
                                           "(code: 5)"}, status=502)
    app.router.add_get("/api/le/certs", fail)


async def test_a_failure_on_the_server_side_is_1(tmp_path: Path) -> None:
    async with running_admin(tmp_path, extra_routes=[_failing_le_routes]) as admin:
        code, out, err = await run_async("le", "list", *flags(admin))
    assert (code, out) == (EXIT_FAILED, "")
    assert err == "lbproxy: bad directory at https://x.test/dir: expected JSON (code: 5)\n"


def test_check_with_problems_and_a_local_failure_are_1(tmp_path: Path) -> None:
    cfg = tmp_path / "lbproxy.toml"
    cfg.write_text(CONFIG.replace('name = "plain"', 'name = "plain"\nhealth_chek = 1'))
    code, out, _ = run_main("check", "-c", str(cfg), "--json")
    assert code == EXIT_FAILED
    [problem] = json.loads(out)["problems"]
    line = CONFIG.replace('name = "plain"', 'name = "plain"\nhealth_chek = 1').splitlines(
        ).index("health_chek = 1") + 1
    assert problem["where"].endswith("health_chek") and problem["line"] == line
    key = tmp_path / "k"
    key.write_text("x")
    code, _, err = run_main("cluster", "new-key", str(key))
    assert code == EXIT_FAILED and err.startswith(f"lbproxy cluster new-key: {key} exists")


def test_exit_codes_are_the_documented_ones() -> None:
    text = (ROOT / "docs" / "cli.md").read_text()
    section = text[text.index("## Exit status"):]
    section = section[:section.index("\n## ", 4)]
    documented = {int(n): meaning for n, meaning in
                  re.findall(r"^\| `(\d+)` \| (.+) \|$", section, re.M)}
    assert set(documented) == set(EXIT_CODES)
    for code, meaning in EXIT_CODES.items():
        assert documented[code].startswith(meaning), (code, documented[code])
    assert (EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_UNREACHABLE, EXIT_REFUSED) == (0, 1, 2, 3, 4)


# -- a config file with problems --------------------------------------------------------------

BROKEN = 'state_dir = "{state}"\nfrobnicate = true\n[admin]\nlisten = "{listen}"\n' \
         '[[vs]]\nname = "x"\n'


async def test_status_works_while_check_fails(admin: Admin, tmp_path: Path) -> None:
    cfg = tmp_path / "broken.toml"
    cfg.write_text(BROKEN.format(state=admin.state, listen=admin.url.removeprefix("http://")))
    code, _, err = await run_async("check", "-c", str(cfg))
    assert code == EXIT_FAILED and "problem" in err
    # the fallback: [admin] and state_dir read leniently, one line on stderr
    code, out, err = await run_async("status", "-c", str(cfg))
    assert code == EXIT_OK, err
    assert "config generation" in out
    [line] = err.splitlines()
    assert line.startswith(f"lbproxy: warning: {cfg} has ") and "lbproxy check" in line
    code, out, err = await run_async("status", "-c", str(cfg), "--json")
    assert code == EXIT_OK and json.loads(out)["virtual_services"] == 2
    # with --admin and --token-file the config is never read (this one is not even TOML)
    cfg.write_text("[[[ not toml")
    code, out, err = await run_async("status", "-c", str(cfg), *flags(admin))
    assert (code, err) == (EXIT_OK, "") and "config generation" in out
    code, _, err = await run_async("status", "-c", str(cfg))
    assert code == EXIT_UNREACHABLE and "not TOML" in err and "--admin and --token-file" in err


def test_lenient_read_uses_the_defaults_and_names_a_bad_listen(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("STATE_DIRECTORY", raising=False)
    cfg = tmp_path / "c.toml"
    cfg.write_text("bogus = 1\n")
    admin, state = client_mod.lenient_admin(cfg)
    assert (str(admin.listen), admin.enabled, state) == ("127.0.0.1:8444", True,
                                                         tmp_path / "state")
    cfg.write_text('state_dir = "st"\nbogus = 1\n[admin]\nlisten = "[::1]:9000"\n'
                   'enabled = false\n')
    admin, state = client_mod.lenient_admin(cfg)
    assert (str(admin.listen), admin.enabled, state) == ("[::1]:9000", False, tmp_path / "st")
    cfg.write_text('[admin]\nlisten = "nowhere"\n')
    with pytest.raises(client_mod.Unreachable, match=r"admin\.listen: 'nowhere' has no port"):
        client_mod.lenient_admin(cfg)


# -- human output where there was raw JSON ----------------------------------------------------

RESTORED = {"account": "https://acme.test/acct/1", "certificates": ["blog"], "vs": False,
            "assignments": [{"certificate": "blog", "target": "shop", "default": True}],
            "not_restored": [{"certificate": "imp", "target": "shop",
                              "reason": "the certificate is not in the certificate store here"}]}
BLOB = b"sealed backup bytes"


def _le_routes(app: web.Application) -> None:
    async def backup(r: web.Request) -> web.Response:
        body = await r.json()
        assert body["passphrase"] == "pw" and body["certs"] is True
        return web.json_response({"backup": base64.b64encode(BLOB).decode()})

    async def restore(r: web.Request) -> web.Response:
        body = await r.json()
        assert base64.b64decode(body["backup"]) == BLOB and body["certs"] is True
        return web.json_response(RESTORED)

    async def delete(r: web.Request) -> web.Response:
        return web.json_response({"deleted": r.match_info["id"]})

    app.router.add_post("/api/le/backup", backup)
    app.router.add_post("/api/le/restore", restore)
    app.router.add_delete("/api/le/certs/{id}", delete)


async def test_backup_restore_and_le_delete_print_lines(tmp_path: Path) -> None:
    pw = tmp_path / "pw"
    pw.write_text("pw\n")
    backup = tmp_path / "le.backup"
    async with running_admin(tmp_path, extra_routes=[_le_routes]) as admin:
        code, out, err = await run_async("backup", "-o", str(backup), "--certs",
                                         "--passphrase-file", str(pw), *flags(admin))
        assert code == EXIT_OK, err
        assert out == (f"wrote {backup} ({len(BLOB)} bytes, encrypted, mode 0600): the account "
                       "and settings and the certificates and their assignments\n")
        assert backup.read_bytes() == BLOB
        code, out, _ = await run_async("backup", "-o", str(backup), "--certs",
                                       "--passphrase-file", str(pw), *flags(admin), "--json")
        assert json.loads(out) == {"backup": str(backup), "bytes": len(BLOB), "vs": False,
                                   "certs": True}

        code, out, err = await run_async("restore", str(backup), "--certs",
                                         "--passphrase-file", str(pw), *flags(admin))
        assert code == EXIT_OK, err
        lines = out.splitlines()
        assert lines[0].split() == ["account", "https://acme.test/acct/1"]
        assert lines[1].split() == ["certificates", "blog"]
        assert lines[2].split() == ["VS", "configuration", "not", "restored"]
        assert lines[3].split() == ["assignments", "1"]
        assert lines[4] == "  blog -> shop (default)"
        assert lines[5] == "not restored (1, code 102):"
        assert lines[6] == "  imp on shop: the certificate is not in the certificate store here"
        assert not out.lstrip().startswith("{")
        code, out, _ = await run_async("restore", str(backup), "--certs",
                                       "--passphrase-file", str(pw), *flags(admin), "--json")
        assert json.loads(out) == RESTORED

        code, out, _ = await run_async("le", "delete", "shop", *flags(admin))
        assert (code, out) == (EXIT_OK, "deleted Let's Encrypt certificate shop\n")
        code, out, _ = await run_async("le", "delete", "shop", *flags(admin), "--json")
        assert json.loads(out) == {"deleted": "shop"}


def test_backup_without_a_passphrase_source_is_usage(monkeypatch: pytest.MonkeyPatch,
                                                      tmp_path: Path) -> None:
    monkeypatch.delenv("LBPROXY_BACKUP_PASSPHRASE", raising=False)
    monkeypatch.setattr("sys.stdin", io.StringIO(""))
    token = tmp_path / "t"
    token.write_text("tok")
    code, _, err = run_main("backup", "--admin", f"http://127.0.0.1:{free_port()}",
                            "--token-file", str(token))
    assert code == EXIT_USAGE and "give --passphrase-file" in err


# -- run --watch --------------------------------------------------------------------------------

def test_run_passes_watch_to_run_forever(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    seen: list[dict[str, Any]] = []

    def fake(config: str, **kw: Any) -> int:
        seen.append({"config": config, **kw})
        return 0

    monkeypatch.setattr("lbproxy.app.run_forever", fake)
    cfg = str(tmp_path / "l.toml")
    assert run_main("run", "-c", cfg, "--watch")[0] == EXIT_OK
    assert run_main("run", "-c", cfg, "--workers", "2")[0] == EXIT_OK
    assert seen == [{"config": cfg, "demo_backends": False, "workers": None, "watch": True},
                    {"config": cfg, "demo_backends": False, "workers": 2, "watch": False}]


# -- docs/cli.md and the parser -----------------------------------------------------------------

def test_every_command_of_the_parser_is_in_the_docs_and_back() -> None:
    text = (ROOT / "docs" / "cli.md").read_text()
    documented = {m for h in re.findall(r"^#+ .*$", text, re.M)
                  for m in re.findall(r"`lbproxy ([a-z][a-z -]*)`", h)}
    parser = {" ".join(leaf) for leaf in _leaves(PARSER)}
    assert parser - documented == set(), "commands missing from docs/cli.md"
    assert documented - parser == set(), "documented commands that do not exist"
