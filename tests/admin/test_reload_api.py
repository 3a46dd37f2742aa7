"""Applying changes: POST /api/reload against a running App (diff, bad file refused while the old
config serves), file watching off unless asked for, and the `reload` / `server` commands of
lbproxy.admin.ops_cli over a real admin API."""

from __future__ import annotations

import argparse
import asyncio
import io
import os
import signal
import socket
import sys
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from lbproxy.admin.client import AdminClient, add_admin_options
from lbproxy.admin.ops_api import problem_view
from lbproxy.admin.ops_cli import add_commands
from lbproxy.errors import ConfigProblem
from tests.support.opsapp import STEP, Running, backends, free_port, head, running


def _config(web: int, admin: int, b0: str, b1: str, *, extra_head: str = "",
            extra: str = "") -> str:
    return head(admin, extra=extra_head) + f"""
[[rule]]
name = "api"
match = "prefix"
pattern = "/api/"
[[vs]]
name = "web"
listen = "127.0.0.1:{web}"
content_switching = true
  [[vs.subvs]]
  name = "api"
  rules = ["api"]
  health_check = {{ type = "none" }}
  real_servers = [ {{ address = "{b0}" }} ]
  [[vs.subvs]]
  name = "rest"
  rules = ["default"]
  health_check = {{ type = "none" }}
  real_servers = [ {{ address = "{b1}" }} ]
{extra}"""


async def test_reload_applies_the_file_and_answers_the_diff(tmp_path: Path) -> None:
    async with backends(2) as bk:
        admin, web = free_port(), free_port()
        b0, b1 = bk.address(0), bk.address(1)
        text = _config(web, admin, b0, b1)
        async with running(tmp_path, text, admin_port=admin) as r:
            assert await r.get("web", "/api/x") == (200, "b0")
            # Nothing changed on disk: a new generation, no change.
            status, rep = await r.api("POST", "/api/reload")
            assert status == 200
            assert rep == {"generation": 2, "changed": False, "diff": {
                p: {"added": [], "removed": [], "changed": []}
                for p in ("virtual_services", "rules", "real_servers")}}
            other = free_port()
            r.path.write_text(
                _config(web, admin, b0, b1, extra=f"""
[[vs]]
name = "other"
listen = "127.0.0.1:{other}"
health_check = {{ type = "none" }}
real_servers = [ {{ address = "{b0}" }} ]
""").replace('pattern = "/api/"', 'pattern = "/v2/"').replace(
                    f'real_servers = [ {{ address = "{b1}" }} ]',
                    f'real_servers = [ {{ address = "{b1}", weight = 4 }} ]'))
            status, rep = await r.api("POST", "/api/reload")
            assert status == 200, rep
            assert rep["generation"] == 3 and rep["changed"] is True
            assert rep["diff"] == {
                "virtual_services": {"added": ["other"], "removed": [], "changed": ["web"]},
                "rules": {"added": [], "removed": [], "changed": ["api"]},
                "real_servers": {"added": [f"other {b0}"], "removed": [],
                                 "changed": [f"web/rest {b1}"]}}
            assert await r.get("web", "/api/x") == (200, "b1")  # the rule moved to /v2/
            assert await r.get("web", "/v2/x") == (200, "b0")
            assert await r.get("other") == (200, "b0")
            assert (r.app.reloads_ok, r.app.reloads_failed) == (2, 0)


async def test_a_bad_file_answers_422_with_its_problems_and_the_old_config_serves(
        tmp_path: Path) -> None:
    async with backends(2) as bk:
        admin, web = free_port(), free_port()
        text = _config(web, admin, bk.address(0), bk.address(1))
        async with running(tmp_path, text, admin_port=admin) as r:
            r.path.write_text(text.replace('match = "prefix"', 'match = "prefixx"')
                              .replace('name = "rest"', 'name = "rest"\n  weight = 3'))
            status, err = await r.api("POST", "/api/reload")
            assert status == 422
            assert err["generation"] == 1
            wheres = {p["where"] for p in err["problems"]}
            assert len(err["problems"]) == 2 and all(p["message"] for p in err["problems"])
            assert any("rule" in w for w in wheres) and any("subvs" in w for w in wheres)
            assert "not applied (2 problem(s)); still serving generation 1" in err["error"]
            assert (r.app.reloads_ok, r.app.reloads_failed) == (0, 1)
            assert await r.get("web", "/api/x") == (200, "b0")
            # A file with no VS is refused too (allow_empty applies at start only).
            r.path.write_text(head(admin))
            status, err = await r.api("POST", "/api/reload")
            assert status == 422 and "defines no virtual service" in err["error"]
            # A file the runtime refuses (its new listener's port is taken): 409.
            with socket.socket() as taken:
                taken.bind(("127.0.0.1", 0))
                taken.listen()
                port = taken.getsockname()[1]
                r.path.write_text(text.replace(f"127.0.0.1:{web}", f"127.0.0.1:{port}"))
                status, err = await r.api("POST", "/api/reload")
            assert status == 409 and "still serving generation 1" in err["error"], err
            assert await r.get("web", "/api/x") == (200, "b0")
            assert r.app.runtime.current.generation == 1


def test_a_problem_shows_its_line_when_it_has_one() -> None:
    assert problem_view(ConfigProblem("vs[0].listen", "bad")) == {"where": "vs[0].listen",
                                                                  "message": "bad"}

    class WithLine:
        where, message, line = "vs[0].listen", "bad", 12

    assert problem_view(WithLine()) == {"where": "vs[0].listen", "message": "bad", "line": 12}


class Ticks:
    """A watch_tick that the test releases one at a time, and that records being called."""

    def __init__(self) -> None:
        self.calls = 0
        self.go = asyncio.Semaphore(0)
        self.waiting = asyncio.Event()

    async def __call__(self) -> None:
        self.calls += 1
        self.waiting.set()
        await self.go.acquire()

    async def step(self) -> None:
        """Let one tick pass and wait until the watcher is back waiting for the next."""
        async with asyncio.timeout(STEP):
            await self.waiting.wait()
            self.waiting.clear()
            self.go.release()
            await self.waiting.wait()


async def test_watching_is_off_unless_asked_for(tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    ticks = Ticks()
    # Were the file watched, a change would be applied within a few milliseconds.
    monkeypatch.setattr("lbproxy.app.WATCH_INTERVAL", 0.001)
    async with backends(2) as bk:
        admin, web = free_port(), free_port()
        b0, b1 = bk.address(0), bk.address(1)
        text = _config(web, admin, b0, b1)
        async with running(tmp_path, text, admin_port=admin) as r:
            assert r.app._watch_task is None
            r.path.write_text(_config(web, admin, b1, b0))
            await asyncio.sleep(0.3)  # 300 watch intervals: a watcher would have applied it
            assert r.app.runtime.current.generation == 1
            assert await r.get("web", "/api/x") == (200, "b0")
            r.app.watch_tick = ticks
            # Applied by a reload, which also turns watching on (watch_config = true).
            r.path.write_text(_config(web, admin, b1, b0, extra_head="watch_config = true"))
            status, _ = await r.api("POST", "/api/reload")
            assert status == 200
            assert await r.get("web", "/api/x") == (200, "b1")
            # Now a saved file is applied once it has settled (two ticks).
            r.path.write_text(_config(web, admin, b0, b1, extra_head="watch_config = true"))
            await ticks.step()
            assert r.app.runtime.current.generation == 2
            await ticks.step()
            assert r.app.runtime.current.generation == 3
            assert await r.get("web", "/api/x") == (200, "b0")
            # Off again by a file that says so: the watcher applies it, then ends by itself.
            r.path.write_text(_config(web, admin, b1, b0))
            await ticks.step()
            task = r.app._watch_task
            assert task is not None
            async with asyncio.timeout(STEP):
                await ticks.waiting.wait()
                ticks.waiting.clear()
                ticks.go.release()
                await task
            assert r.app.runtime.current.generation == 4
            assert await r.get("web", "/api/x") == (200, "b1")
            calls = ticks.calls
            r.path.write_text(text)
            await asyncio.sleep(0.3)
            assert r.app.runtime.current.generation == 4 and ticks.calls == calls


async def test_start_watch_true_watches_whatever_the_config_says(tmp_path: Path) -> None:
    async with backends(2) as bk:
        admin, web = free_port(), free_port()
        b0, b1 = bk.address(0), bk.address(1)
        ticks = Ticks()
        path = tmp_path / "lbproxy.toml"
        path.write_text(_config(web, admin, b0, b1))
        from lbproxy.app import App
        from lbproxy.config import load_file

        app = App(path, load_file(path, to_run=True))
        app.watch_tick = ticks
        await app.start(watch=True)
        try:
            path.write_text(_config(web, admin, b1, b0))
            await ticks.step()
            await ticks.step()
            assert app.runtime.current.generation == 2
        finally:
            await app.stop()


# -- the commands ---------------------------------------------------------------------------

def _parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    add_admin_options(common)
    p = argparse.ArgumentParser(prog="lbproxy")
    add_commands(p.add_subparsers(dest="command", required=True), common)
    return p


async def _cli(r: Running, *argv: str) -> tuple[Any, str]:
    args = _parser().parse_args([*argv, "--admin", r.admin_url])
    client = AdminClient(r.admin_url, r.token)
    data = await asyncio.to_thread(args.run, client, args)
    out = io.StringIO()
    args.show(data, out)
    return data, out.getvalue()


async def test_the_reload_and_server_commands(tmp_path: Path) -> None:
    async with backends(2) as bk:
        admin, web = free_port(), free_port()
        b0, b1 = bk.address(0), bk.address(1)
        text = _config(web, admin, b0, b1)
        async with running(tmp_path, text, admin_port=admin) as r:
            _, out = await _cli(r, "reload")
            assert out == "reloaded: generation 2, no change\n"
            r.path.write_text(text.replace('pattern = "/api/"', 'pattern = "/v2/"'))
            data, out = await _cli(r, "reload")
            assert data["generation"] == 3
            assert out == "reloaded: generation 3\n  rules changed: api\n"
            _, out = await _cli(r, "server", "drain", b0)
            assert out == f"web/api {b0}: drain, weight 1, 0 in flight\n"
            _, out = await _cli(r, "server", "weight", b1, "5", "--vs", "web",
                                "--subvs", "rest")
            assert out == f"web/rest {b1}: enabled, weight 5, 0 in flight\n"
            data, out = await _cli(r, "server", "list")
            lines = out.splitlines()
            assert lines[0].split() == ["VS[/SUBVS]", "ADDRESS", "STATE", "WEIGHT", "CONFIG",
                                        "HEALTH", "ACTIVE", "REQUESTS"]
            assert lines[1].split()[:5] == ["web/api", b0, "drain*", "1", "enabled/1"]
            assert lines[2].split()[:5] == ["web/rest", b1, "enabled*", "5", "enabled/1"]
            assert lines[3].startswith("* run-time override")
            data, _ = await _cli(r, "server", "list", "--address", b1)
            assert [s["address"] for s in data["servers"]] == [b1]
            _, out = await _cli(r, "server", "enable", b0)
            assert out == f"web/api {b0}: enabled, weight 1, 0 in flight\n"
            _, out = await _cli(r, "server", "disable", b0)
            assert out.startswith(f"web/api {b0}: disabled")


async def test_lbproxy_reload_and_server_through_the_real_cli(tmp_path: Path) -> None:
    """`lbproxy reload` / `lbproxy server ...` as the installed command parses them: output,
    exit status 0, and a refused file's problems with exit status 4 (refused)."""
    from lbproxy.__main__ import main

    async with backends(2) as bk:
        admin, web = free_port(), free_port()
        b0, b1 = bk.address(0), bk.address(1)
        text = _config(web, admin, b0, b1)
        async with running(tmp_path, text, admin_port=admin) as r:
            async def cli(*argv: str) -> tuple[int, str, str]:
                out, err = io.StringIO(), io.StringIO()
                code = await asyncio.to_thread(main, [*argv, "-c", str(r.path)], out=out,
                                               err=err)
                return code, out.getvalue(), err.getvalue()

            r.path.write_text(text.replace(f'address = "{b1}"', f'address = "{b1}", weight = 2'))
            assert await cli("reload") == (0, "reloaded: generation 2\n  virtual services "
                                              f"changed: web\n  real servers changed: web/rest "
                                              f"{b1}\n", "")
            code, out, err = await cli("server", "drain", b0, "--vs", "web")
            assert (code, out, err) == (0, f"web/api {b0}: drain, weight 1, 0 in flight\n", "")
            code, out, _ = await cli("status")
            rows = {line.split()[0]: line.split() for line in out.splitlines() if line.strip()}
            assert code == 0 and rows[b0][1] == "drain" and rows[b1][1] == "up", out
            r.path.write_text(text.replace('match = "prefix"', 'match = "prefixx"'))
            code, out, err = await cli("reload")
            assert code == 4 and out == ""
            assert "not applied (1 problem(s)); still serving generation 2" in err
            assert "unknown value 'prefixx'" in err
            code, out, _ = await cli("server", "list", "--json")
            assert code == 0 and '"state": "drain"' in out
            code, _, err = await cli("server", "enable", "127.0.0.1:1")
            assert code == 4 and "no real server 127.0.0.1:1" in err
            # drain --wait: exit 1 while a request is in flight there, 0 once none is.
            slow = asyncio.create_task(r.get("web", "/slow"))
            await asyncio.wait_for(bk.slow_arrived["b1"].wait(), STEP)
            code, out, err = await cli("server", "drain", b1, "--wait", "0.3")
            assert code == 1 and out == ""
            assert f"not drained after 0.3 s; requests still in flight: web/rest {b1} (1)" in err
            bk.release.set()
            code, out, _ = await cli("server", "drain", b1, "--wait", str(STEP))
            assert (code, out) == (0, f"web/rest {b1}: drain, weight 2, 0 in flight\n"
                                      "drained: no request in flight\n")
            assert await asyncio.wait_for(slow, STEP) == (200, "b1")


@pytest.mark.parametrize("watch", [False, True])
async def test_lbproxy_run_watches_only_with_watch(tmp_path: Path, watch: bool) -> None:
    """`lbproxy run` (a real process): without --watch a saved file is not applied (its start
    line says so; three poll intervals later the old config still serves) until SIGHUP; with
    --watch it is applied by itself."""
    async with backends(2) as bk:
        admin, web = free_port(), free_port()
        b0, b1 = bk.address(0), bk.address(1)
        path = tmp_path / "lbproxy.toml"
        path.write_text(_config(web, admin, b0, b1))
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "lbproxy", "run", "-c", str(path), "--workers", "1",
            *(["--watch"] if watch else []), stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.PIPE, env={**os.environ, "PYTHONUNBUFFERED": "1"})
        lines: list[str] = []
        started = asyncio.Event()

        async def read() -> None:
            assert proc.stderr is not None
            async for raw in proc.stderr:
                lines.append(raw.decode(errors="replace"))
                if "lbproxy started" in lines[-1]:
                    started.set()

        reader = asyncio.create_task(read())
        try:
            async with aiohttp.ClientSession() as s:
                async def body() -> str:
                    async with s.get(f"http://127.0.0.1:{web}/api/x") as r:
                        return await r.text()

                await asyncio.wait_for(started.wait(), 30)
                assert await body() == "b0"
                said = "".join(lines)
                assert (f"lbproxy.app: watching {path}" in said) == watch
                assert (f"lbproxy.app: not watching {path}" in said) == (not watch)
                path.write_text(_config(web, admin, b1, b0))
                if not watch:
                    await asyncio.sleep(3.5)  # three watch intervals: a watcher would have
                    assert await body() == "b0"
                    proc.send_signal(signal.SIGHUP)
                async with asyncio.timeout(30):
                    while True:
                        if await body() == "b1":
                            break
                        await asyncio.sleep(0.05)
        finally:
            proc.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(proc.wait(), 30)
            finally:
                if proc.returncode is None:
                    proc.kill()
                    await proc.wait()
                await reader
