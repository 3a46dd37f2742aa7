"""Fixtures of the browser tests: Debian's chromium driven by Playwright (never `playwright
install`), a real Pebble whose validations take a moment (so the challenge SubVS can be seen),
a real server, and `lbproxy run` as its own process on free loopback ports."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from tests.e2e.le_node import add_a_record
from tests.support.lbconfig import app_vs, config_head, rest_vs
from tests.support.pebble import PebbleInstance, free_port, pebble_or_skip, start_pebble

CHROMIUM = os.environ.get("LBPROXY_CHROMIUM", "/usr/bin/chromium")
READY_TIMEOUT = 20.0  # seconds for lbproxy to answer on its admin port
STEP = 10.0  # bound of one HTTP call to the admin API
# Pebble validates each name 3 times, each after a random sleep of 0..SLEEPTIME-1 s: the challenge
# SubVS lives about a second, long enough for the page's polling (every 250 ms) to show it.
PEBBLE_ENV = {"PEBBLE_VA_NOSLEEP": "0", "PEBBLE_VA_SLEEPTIME": "3"}


def chromium_or_skip() -> None:
    if not os.access(CHROMIUM, os.X_OK):
        pytest.skip(f"{CHROMIUM} not installed (apt-get install -y chromium; dev.sh test does)")
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        pytest.skip("playwright is not installed (pip install -e '.[test]')")


class _Hello(BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        body = b"hello from the real server"
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture(scope="module")
def upstream() -> Iterator[int]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Hello)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield int(server.server_address[1])
    server.shutdown()
    server.server_close()


@pytest.fixture(scope="module")
def slow_pebble(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PebbleInstance]:
    pebble_or_skip()
    with start_pebble(tmp_path_factory.mktemp("pebble"), env=PEBBLE_ENV) as p:
        add_a_record(p, "api.le.test", "127.0.0.2")  # validated through web2 (127.0.0.2)
        add_a_record(p, "dead.le.test", "127.0.0.5")  # nothing listens there: code 13
        yield p


def config_text(p: PebbleInstance, admin_port: int, https_port: int, upstream: int, *,
                web2_parent_servers: bool = False) -> str:
    """web and web2: challenge VSs on Pebble's HTTP port (127.0.0.1 and 127.0.0.2; every name
    resolves to 127.0.0.1); secure: an HTTPS VS. With `web2_parent_servers`, web2 has its real
    server on the parent, which makes it ineligible for challenges."""
    web2 = (f"""
[[vs]]
name = "web2"
listen = "127.0.0.2:{p.http_port}"
real_servers = [ {{ address = "127.0.0.1:{upstream}" }} ]
health_check = {{ type = "none" }}
""" if web2_parent_servers else rest_vs("web2", f"127.0.0.2:{p.http_port}"))
    return (config_head(admin_port=admin_port)
            + app_vs("web", f"127.0.0.1:{p.http_port}", upstream) + web2
            + app_vs("secure", f"127.0.0.1:{https_port}", upstream,
                     more='protocol = "https"\ntls = { certificates = ["boot"] }\n'))


@dataclass
class Lbproxy:
    """`lbproxy run` in its own process; `api()` calls the admin API with the bearer token."""

    root: Path
    url: str
    proc: subprocess.Popen[bytes]
    config_path: Path

    @property
    def token(self) -> str:
        return (self.root / "state" / "admin.token").read_text().strip()

    def api(self, method: str, path: str, body: Any = None,
            headers: dict[str, str] | None = None) -> tuple[int, Any]:
        req = urllib.request.Request(
            self.url + path, method=method,
            data=None if body is None else json.dumps(body).encode(),
            headers={"Authorization": f"Bearer {self.token}",
                     "Content-Type": "application/json", **(headers or {})})
        try:
            with urllib.request.urlopen(req, timeout=STEP) as r:
                return r.status, json.loads(r.read() or b"null")
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read() or b"null")


def start_lbproxy(root: Path, text: str) -> Lbproxy:
    root.mkdir(parents=True, exist_ok=True)
    cfg = root / "lbproxy.toml"
    cfg.write_text(text)
    port = int(text.split('[admin]\nlisten = "127.0.0.1:')[1].split('"')[0])
    log = (root / "lbproxy.log").open("wb")
    proc = subprocess.Popen([sys.executable, "-m", "lbproxy", "run", "-c", str(cfg)],
                            cwd=root, stdout=log, stderr=subprocess.STDOUT,
                            stdin=subprocess.DEVNULL)
    log.close()
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + READY_TIMEOUT
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"lbproxy exited: {(root / 'lbproxy.log').read_text()[-3000:]}")
        try:
            urllib.request.urlopen(url + "/ui/session", timeout=1).close()
            break
        except OSError:
            if time.monotonic() > deadline:
                stop_process(proc)
                raise RuntimeError("lbproxy did not answer within "
                                   f"{READY_TIMEOUT} s: {(root / 'lbproxy.log').read_text()}"
                                   ) from None
            time.sleep(0.05)
    return Lbproxy(root, url, proc, cfg)


def stop_process(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=5)


@pytest.fixture(scope="module")
def lbproxy(slow_pebble: PebbleInstance, upstream: int,
            tmp_path_factory: pytest.TempPathFactory) -> Iterator[Lbproxy]:
    root = tmp_path_factory.mktemp("lbproxy")
    node = start_lbproxy(root, config_text(slow_pebble, free_port(), free_port(), upstream))
    try:
        yield node
    finally:
        stop_process(node.proc)


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    chromium_or_skip()
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        b = pw.chromium.launch(executable_path=CHROMIUM, headless=True,
                               args=["--no-sandbox"] if os.geteuid() == 0 else [])
        try:
            yield b
        finally:
            b.close()


def record_progress(page: Any) -> None:
    """From now on, keep every text the order progress shows (`progress_texts`): a phase may
    last less than a poll of the test, never less than one of the page's."""
    page.evaluate("""() => { window.progressTexts = [];
        new MutationObserver(() => window.progressTexts.push(
            document.querySelector('#progress-text').textContent))
          .observe(document.querySelector('#progress-text'),
                   { childList: true, characterData: true, subtree: true }); }""")


def progress_texts(page: Any) -> list[str]:
    return [str(t) for t in page.evaluate("() => window.progressTexts")]


@pytest.fixture
def shots(tmp_path: Path) -> Path:
    """Where a test's screenshots go (kept with pytest's tmp dirs as artefacts)."""
    d = tmp_path / "screenshots"
    d.mkdir()
    return d
