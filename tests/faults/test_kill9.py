"""kill -9 during an order: a real `python -m lbproxy run` is SIGKILLed while its challenge SubVS
is injected and Pebble's validation request is held open; after a restart there is no orphan
challenge SubVS or rule, the journal is cleared, the old token is not answered, and the order
resumes until the certificate is issued. No sleeps: every wait is on an event, a file or the
admin API, bounded in time."""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.e2e.le_node import http_get
from tests.support.pebble import PebbleInstance, free_port, pebble_or_skip, start_pebble

STEP = 30.0  # seconds one phase (start-up, an order) may take on a loaded 2-core machine
POLL = 0.1   # file/API polling step, bounded by STEP


@dataclass
class Gate:
    """Pebble's http-01 port: holds validation requests open, or forwards them to lbproxy."""

    target: int = 0
    forward: bool = False
    seen: list[str] = field(default_factory=list)   # request heads received while holding
    held: list[asyncio.StreamWriter] = field(default_factory=list)
    arrived: asyncio.Event = field(default_factory=asyncio.Event)

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if not self.forward:
            try:
                head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), STEP)
            except (asyncio.IncompleteReadError, TimeoutError, ConnectionError):
                writer.close()
                return
            self.seen.append(head.decode("latin-1"))
            self.held.append(writer)
            self.arrived.set()
            return  # never answered while the test kills lbproxy
        try:
            ur, uw = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", self.target),
                                            STEP)
        except (OSError, TimeoutError):
            writer.close()
            return

        async def pipe(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
            try:
                while data := await r.read(65536):
                    w.write(data)
                    await w.drain()
            except ConnectionError:
                pass
            finally:
                w.close()
        await asyncio.wait_for(asyncio.gather(pipe(reader, uw), pipe(ur, writer)), STEP)

    def release(self) -> None:
        self.forward = True
        for w in self.held:
            w.close()
        self.held.clear()


@pytest.fixture(scope="module")
def gate_port() -> int:
    return free_port()


@pytest.fixture(scope="module")
def gated_pebble(tmp_path_factory: pytest.TempPathFactory,
                 gate_port: int) -> Iterator[PebbleInstance]:
    pebble_or_skip()
    with start_pebble(tmp_path_factory.mktemp("pebble"), http_port=gate_port) as p:
        yield p


@pytest.fixture
async def gate(gate_port: int) -> AsyncIterator[Gate]:
    g = Gate()
    server = await asyncio.start_server(g.handle, "127.0.0.1", gate_port)
    yield g
    g.release()
    server.close()


def _config(p: PebbleInstance, vs_port: int, admin_port: int) -> str:
    return f"""
state_dir = "state"
[admin]
listen = "127.0.0.1:{admin_port}"
[access_log]
enabled = false
[letsencrypt]
directory_url = "{p.directory_url}"
ca_bundle = "{p.ca_bundle}"

[[vs]]
name = "web"
listen = "127.0.0.1:{vs_port}"
  [[vs.subvs]]
  name = "rest"
  rules = ["default"]
  not_available = {{ status = 404, body = "nothing here" }}

[[certificate]]
id = "site"
common_name = "www.le.test"
vs = "web"
"""


class Proc:
    def __init__(self, root: Path, n: int) -> None:
        self.root = root
        self.log = root / f"lbproxy-{n}.log"
        with self.log.open("wb") as out:
            self.p = subprocess.Popen(
                [sys.executable, "-m", "lbproxy", "run", "-c", str(root / "lbproxy.toml"),
                 "--log-level", "debug"],
                stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, cwd=root)

    def stop(self) -> None:
        if self.p.poll() is None:
            self.p.send_signal(signal.SIGTERM)
            try:
                self.p.wait(10)
            except subprocess.TimeoutExpired:
                self.p.kill()
                self.p.wait(10)


async def _lbproxy(root: Path, admin_port: int, *argv: str) -> tuple[int, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "lbproxy", *argv, "--admin", f"http://127.0.0.1:{admin_port}",
        "--token-file", str(root / "state" / "admin.token"),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT, cwd=root)
    out, _ = await asyncio.wait_for(proc.communicate(), STEP)
    return proc.returncode or 0, out.decode()


async def _until(what: str, check: object, proc: Proc) -> None:
    """Poll `check()` (sync or async) every POLL seconds until true, at most STEP seconds."""
    deadline = time.monotonic() + STEP
    while True:
        assert callable(check)
        r = check()
        if asyncio.iscoroutine(r):
            r = await r
        if r:
            return
        assert proc.p.poll() is None, f"lbproxy exited:\n{proc.log.read_text()[-3000:]}"
        assert time.monotonic() < deadline, f"{what}: not within {STEP} s\n" \
                                            f"{proc.log.read_text()[-3000:]}"
        await asyncio.sleep(POLL)


async def test_kill9_mid_order_leaves_no_orphan_and_the_order_resumes(
        gated_pebble: PebbleInstance, gate: Gate, tmp_path: Path) -> None:
    vs_port, admin_port = free_port(), free_port()
    gate.target = vs_port
    (tmp_path / "lbproxy.toml").write_text(_config(gated_pebble, vs_port, admin_port))
    journal = tmp_path / "state" / "letsencrypt" / "challenges.json"
    token_file = tmp_path / "state" / "admin.token"

    first = Proc(tmp_path, 1)
    try:
        await _until("admin token", token_file.exists, first)

        async def admin_up() -> bool:
            return (await _lbproxy(tmp_path, admin_port, "le", "account"))[0] in (0, 1)
        await _until("admin API", admin_up, first)
        rc, out = await _lbproxy(tmp_path, admin_port, "le", "register", "--email", "o@le.test")
        assert rc == 0, out
        # the declared certificate's order starts; Pebble's validation arrives and is held
        await asyncio.wait_for(gate.arrived.wait(), STEP)
        head = gate.seen[0]
        path = head.split()[1]
        assert path.startswith("/.well-known/acme-challenge/")
        token = path.rsplit("/", 1)[1]
        # the challenge SubVS is injected: visible in `lbproxy vs show` and in the journal
        rc, out = await _lbproxy(tmp_path, admin_port, "vs", "show", "web", "--json")
        assert rc == 0, out
        shown = json.loads(out)
        assert any(r["injected"] and r["rule"].startswith("acme-") for r in shown["rules"]), out
        entries = json.loads(journal.read_text())
        assert [e["cert"] for e in entries] == ["site"] and entries[0]["vs"] == "web"
        st, body, _ = await http_get("127.0.0.1", vs_port, "www.le.test", path)
        assert st == 200 and body.startswith(token.encode() + b".")
        key_authorization = body
        # kill -9 mid-order
        first.p.send_signal(signal.SIGKILL)
        assert first.p.wait(STEP) == -signal.SIGKILL
    finally:
        first.stop()
    assert json.loads(journal.read_text()) != []  # the crash left its journal behind

    gate.release()  # from now on Pebble's validations reach lbproxy
    second = Proc(tmp_path, 2)
    try:
        meta = tmp_path / "state" / "certs" / "site" / "meta.json"
        await _until("the certificate issued after restart", meta.exists, second)

        async def idle() -> bool:
            rc, out = await _lbproxy(tmp_path, admin_port, "vs", "show", "web", "--json")
            return rc == 0 and "acme-" not in out
        await _until("challenge SubVSs gone", idle, second)
        rc, out = await _lbproxy(tmp_path, admin_port, "le", "list", "--json")
        assert rc == 0 and '"site"' in out, out
        listed = json.loads(out)
        site = next(c for c in (listed if isinstance(listed, list) else
                                listed.get("certificates", [])) if c["id"] == "site")
        assert site["serial"] and site["failures"] == 0, site
        assert json.loads(journal.read_text()) == []
        # the old token is nobody's business any more: normal routing answers
        st, body, _ = await http_get("127.0.0.1", vs_port, "www.le.test", path)
        assert (st, body) == (404, b"nothing here")
        assert key_authorization not in body
        log = second.log.read_text()
        assert "removed challenge leftover web/acme-" in log
        # no secret in the debug logs of either run
        token_text = token_file.read_text().strip()
        for lg in (first.log, second.log):
            text = lg.read_text()
            assert "PRIVATE KEY" not in text and token_text not in text
    finally:
        second.stop()
    assert second.p.returncode == 0
