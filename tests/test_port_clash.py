"""`lbproxy run` with a port it needs already taken: one line naming the address and its user, no
traceback, exit status 1, nothing left running (issue 18, point 7).

Each test holds the port itself (bound and listening, without SO_REUSEPORT), so the clash is
real and certain; the process under test is a real `lbproxy run`.
"""

from __future__ import annotations

import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

RUN_TIMEOUT = 60  # a failing start takes about a second; this only bounds a hang


@pytest.fixture
def held() -> Iterator[socket.socket]:
    """A loopback port in use: bound and listening for the whole test."""
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen()
    try:
        yield s
    finally:
        s.close()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def write_config(tmp_path: Path, *, vs: int, admin: int, backend: int, workers: int = 1) -> Path:
    cfg = tmp_path / "lbproxy.toml"
    cfg.write_text(f"""
state_dir = "state"
workers = {workers}
drain_timeout = 1
[admin]
listen = "127.0.0.1:{admin}"
[access_log]
enabled = false
[[vs]]
name = "web"
listen = "127.0.0.1:{vs}"
health_check = {{ type = "none" }}
real_servers = [{{ address = "127.0.0.1:{backend}" }}]
""")
    return cfg


def run(cfg: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "lbproxy", "run", "-c", str(cfg), *extra],
                          capture_output=True, text=True, timeout=RUN_TIMEOUT, check=False)


def assert_one_clear_line(out: subprocess.CompletedProcess[str], expected: str) -> None:
    text = out.stdout + out.stderr
    assert out.returncode == 1, text
    assert "Traceback" not in text, text
    said = [line for line in text.splitlines() if "cannot listen" in line]
    assert said == [expected], text


def test_a_busy_vs_port(tmp_path: Path, held: socket.socket) -> None:
    port = held.getsockname()[1]
    cfg = write_config(tmp_path, vs=port, admin=free_port(), backend=free_port())
    assert_one_clear_line(
        run(cfg), f'lbproxy: cannot listen on 127.0.0.1:{port} (vs "web"): address already in use')


def test_a_busy_admin_port(tmp_path: Path, held: socket.socket) -> None:
    port = held.getsockname()[1]
    vs = free_port()
    cfg = write_config(tmp_path, vs=vs, admin=port, backend=free_port())
    assert_one_clear_line(
        run(cfg), f"lbproxy: cannot listen on 127.0.0.1:{port} (admin API): address already in use")
    # what had started (the VS listener) was closed again: its port is free
    with socket.socket() as s:
        s.bind(("127.0.0.1", vs))


def test_a_busy_admin_port_with_worker_processes(tmp_path: Path, held: socket.socket) -> None:
    port = held.getsockname()[1]
    cfg = write_config(tmp_path, vs=free_port(), admin=port, backend=free_port(), workers=2)
    out = run(cfg)
    assert_one_clear_line(
        out, f"lbproxy: cannot listen on 127.0.0.1:{port} (admin API): address already in use")
    # the workers were stopped by the control process, not left to notice it gone
    assert out.stderr.count("exited (code 0)") == 2, out.stderr


def test_a_busy_demo_backend_port(tmp_path: Path, held: socket.socket) -> None:
    port = held.getsockname()[1]
    cfg = write_config(tmp_path, vs=free_port(), admin=free_port(), backend=port)
    assert_one_clear_line(
        run(cfg, "--demo-backends"),
        f"lbproxy: cannot listen on 127.0.0.1:{port} (demo real server): address already in use")
