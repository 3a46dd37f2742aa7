"""lbproxy under systemd: the sd_notify protocol spoken by a real `lbproxy run` (READY=1 only once
its listeners accept, RELOADING=1/READY=1 around a reload, STOPPING=1 at SIGTERM, all from the
main process), the default state directory following $STATE_DIRECTORY, the example unit's
sandbox (systemd-analyze security) and what MemoryDenyWriteExecute= needs of the interpreter."""

from __future__ import annotations

import ctypes
import os
import re
import shutil
import signal
import socket
import struct
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from lbproxy import sdnotify
from lbproxy.config import parse_config

ROOT = Path(__file__).resolve().parents[1]
UNIT = ROOT / "conf" / "lbproxy.service"
STEP = 30.0  # seconds: bound on each wait for the process
MAX_EXPOSURE = 2.5


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


# -- the protocol, in-process ------------------------------------------------------------------

def test_notify_is_a_no_op_without_notify_socket(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    assert sdnotify.notify_ready() is False
    monkeypatch.setenv("NOTIFY_SOCKET", "")
    assert sdnotify.notify_stopping() is False


def test_notify_to_a_path_and_to_an_abstract_socket(monkeypatch: pytest.MonkeyPatch,
                                                    tmp_path: Path) -> None:
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
        s.bind(str(tmp_path / "n"))
        s.settimeout(5)
        monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "n"))
        assert sdnotify.notify_ready()
        assert s.recv(4096) == b"READY=1"
    name = f"lbproxy-test-{os.getpid()}-{time.monotonic_ns()}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
        s.bind(b"\0" + name.encode())
        s.settimeout(5)
        monkeypatch.setenv("NOTIFY_SOCKET", "@" + name)
        before = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        assert sdnotify.notify_reloading()
        after = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        lines = s.recv(4096).decode().split("\n")
        assert lines[0] == "RELOADING=1"
        usec = int(lines[1].removeprefix("MONOTONIC_USEC="))
        assert before <= usec <= after


def test_a_notify_socket_nobody_listens_on_is_not_an_error(monkeypatch: pytest.MonkeyPatch,
                                                           tmp_path: Path) -> None:
    monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "absent"))
    assert sdnotify.notify_stopping() is False
    monkeypatch.setenv("NOTIFY_SOCKET", "vsock:2:1234")  # a form lbproxy does not speak
    assert sdnotify.notify_ready() is False


def test_state_dir_follows_state_directory_when_unset(monkeypatch: pytest.MonkeyPatch) -> None:
    unset = parse_config("allow_empty = true\n")
    explicit = parse_config('allow_empty = true\nstate_dir = "/srv/lbproxy"\n')
    monkeypatch.delenv("STATE_DIRECTORY", raising=False)
    assert unset.state_path("/etc/lbproxy/lbproxy.toml") == Path("/etc/lbproxy/state")
    monkeypatch.setenv("STATE_DIRECTORY", "/var/lib/lbproxy:/var/lib/other")
    assert unset.state_path("/etc/lbproxy/lbproxy.toml") == Path("/var/lib/lbproxy")
    assert explicit.state_path("/etc/lbproxy/lbproxy.toml") == Path("/srv/lbproxy")


# -- a real `lbproxy run` ------------------------------------------------------------------------

CONFIG = """
workers = {workers}
[admin]
listen = "127.0.0.1:{admin_port}"
[access_log]
enabled = false

[[vs]]
name = "web"
listen = "127.0.0.1:{vs_port}"
  [[vs.subvs]]
  name = "rest"
  rules = ["default"]
  not_available = {{ status = 404, body = "{body}" }}
"""


class Notifications:
    """The unix datagram socket given to lbproxy as $NOTIFY_SOCKET; each message comes with the
    pid of its sender (SCM_CREDENTIALS)."""

    def __init__(self, address: str | bytes) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
        self.sock.bind(address)
        self.sock.settimeout(STEP)

    def next(self) -> tuple[list[str], int]:
        """The next message's lines and its sender's pid (waits at most STEP seconds)."""
        data, ancdata, _, _ = self.sock.recvmsg(4096, socket.CMSG_SPACE(12))
        pid = -1
        for level, kind, value in ancdata:
            if level == socket.SOL_SOCKET and kind == socket.SCM_CREDENTIALS:
                pid = struct.unpack("iII", value[:12])[0]
        return data.decode().split("\n"), pid

    def close(self) -> None:
        self.sock.close()


def _get(port: int) -> tuple[int, bytes]:
    """One HTTP request to the VS: (status, body)."""
    with socket.create_connection(("127.0.0.1", port), timeout=STEP) as c:
        c.sendall(b"GET / HTTP/1.1\r\nHost: example.com\r\nConnection: close\r\n\r\n")
        data = b""
        while chunk := c.recv(65536):
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head.split(b" ")[1]), body


def _accepts(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=2).close()
    except OSError:
        return False
    return True


@pytest.fixture(params=[1, 2], ids=["one-process", "two-workers"])
def served(request: pytest.FixtureRequest, tmp_path: Path
           ) -> Iterator[tuple[subprocess.Popen[bytes], Notifications, dict[str, object]]]:
    workers: int = request.param
    # One process gets a path, the other an abstract name ("@...").
    address: str | bytes
    if workers == 1:
        address = env_name = str(tmp_path / "notify")
    else:
        name = f"lbproxy-test-{os.getpid()}-{time.monotonic_ns()}"
        address, env_name = b"\0" + name.encode(), "@" + name
    notes = Notifications(address)
    vs_port, admin_port = _free_port(), _free_port()
    conf = tmp_path / "lbproxy.toml"
    info: dict[str, object] = {"conf": conf, "vs_port": vs_port, "admin_port": admin_port,
                               "workers": workers, "state": tmp_path / "var-lib-lbproxy"}
    conf.write_text(CONFIG.format(workers=workers, admin_port=admin_port, vs_port=vs_port,
                                  body="first"))
    info["write"] = lambda body: conf.write_text(CONFIG.format(
        workers=workers, admin_port=admin_port, vs_port=vs_port, body=body))
    env = {**os.environ, "NOTIFY_SOCKET": env_name, "STATE_DIRECTORY": str(info["state"])}
    log = (tmp_path / "lbproxy.log").open("wb")
    proc = subprocess.Popen([sys.executable, "-m", "lbproxy", "run", "-c", str(conf)],
                            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                            cwd=tmp_path, env=env)
    info["log"] = tmp_path / "lbproxy.log"
    try:
        yield proc, notes, info
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGCONT)
            proc.kill()
        proc.wait(STEP)
        log.close()
        notes.close()


def test_lbproxy_speaks_sd_notify(
        served: tuple[subprocess.Popen[bytes], Notifications, dict[str, object]]) -> None:
    proc, notes, info = served
    vs_port, admin_port = info["vs_port"], info["admin_port"]
    assert isinstance(vs_port, int) and isinstance(admin_port, int)
    log = info["log"]
    assert isinstance(log, Path)

    def expect(first: str) -> list[str]:
        try:
            lines, pid = notes.next()
        except TimeoutError:
            pytest.fail(f"no {first} within {STEP} s:\n{log.read_text()[-3000:]}")
        assert lines[0] == first, f"{lines} instead of {first}"
        assert pid == proc.pid, "sent by another process than the main one (NotifyAccess=main)"
        return lines

    expect("READY=1")
    # Freeze lbproxy as soon as it says it is ready: the kernel still completes a connection to
    # a socket that listens, so these succeed only if READY=1 came after listen().
    os.kill(proc.pid, signal.SIGSTOP)
    try:
        assert _accepts(vs_port), "READY=1 before the VS listens"
        assert _accepts(admin_port), "READY=1 before the admin API listens"
        if info["workers"] == 2:
            # The workers serve on their own while the control process is stopped.
            assert _get(vs_port) == (404, b"first"), "READY=1 before the workers serve"
    finally:
        os.kill(proc.pid, signal.SIGCONT)
    assert _get(vs_port) == (404, b"first")
    # The state directory is $STATE_DIRECTORY (the config has no state_dir).
    state = info["state"]
    assert isinstance(state, Path) and (state / "admin.token").is_file()

    # A reload: RELOADING=1 with the monotonic time, then READY=1 once the new file serves.
    write = info["write"]
    assert callable(write)
    write("second")
    before = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    proc.send_signal(signal.SIGHUP)
    lines = expect("RELOADING=1")
    usec = int(lines[1].removeprefix("MONOTONIC_USEC="))
    assert before <= usec <= time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    expect("READY=1")
    assert _get(vs_port) == (404, b"second")

    # A refused reload: back to READY=1 as well, the old config serving.
    conf = info["conf"]
    assert isinstance(conf, Path)
    conf.write_text("[[vs]\nbroken")
    proc.send_signal(signal.SIGHUP)
    expect("RELOADING=1")
    expect("READY=1")
    assert _get(vs_port) == (404, b"second")

    # Both reloads are counted in /metrics.
    token = (state / "admin.token").read_text().strip()
    req = urllib.request.Request(f"http://127.0.0.1:{admin_port}/metrics",
                                 headers={"Authorization": f"Bearer {token}"})
    with urllib.request.urlopen(req, timeout=STEP) as resp:
        text = resp.read().decode()
    reloads = {s.labels["result"]: s.value for f in text_string_to_metric_families(text)
               if f.name == "lbproxy_reloads" for s in f.samples}
    assert reloads == {"success": 1.0, "failure": 1.0}

    proc.send_signal(signal.SIGTERM)
    expect("STOPPING=1")
    assert proc.wait(STEP) == 0


# -- the example unit --------------------------------------------------------------------------

def test_the_unit_is_type_notify_and_reloads_after_a_check() -> None:
    unit = UNIT.read_text()
    settings = dict(re.findall(r"^(\w+)=(.*)$", unit, re.M))
    assert settings["Type"] == "notify" and settings["NotifyAccess"] == "main"
    reloads = re.findall(r"^ExecReload=(.*)$", unit, re.M)
    assert len(reloads) == 2 and " check -c " in reloads[0] and reloads[1].endswith(
        "kill -HUP $MAINPID")
    assert settings["StateDirectory"] == "lbproxy"
    assert "pip install lbproxy\n" not in unit  # not on PyPI: installed from a clone


def test_systemd_analyze_security_exposure() -> None:
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze is not installed: cannot rate the unit's sandbox")
    out = subprocess.run([analyze, "security", "--offline=yes", "--no-pager", str(UNIT)],
                         capture_output=True, text=True, timeout=60)
    m = re.search(r"Overall exposure level for lbproxy\.service: (\d+\.\d+)", out.stdout)
    assert m, out.stdout[-2000:] + out.stderr
    assert float(m.group(1)) <= MAX_EXPOSURE, out.stdout
    failed = {line.split()[1] for line in out.stdout.splitlines() if line.startswith("✗")}
    for setting in ("SystemCallFilter=~@privileged", "ProtectClock=", "ProtectProc=",
                    "MemoryDenyWriteExecute=", "RestrictSUIDSGID=", "ProtectHostname="):
        assert setting not in failed, f"{setting} is not set"


PR_SET_MDWE, PR_GET_MDWE, PR_MDWE_REFUSE_EXEC_GAIN = 65, 66, 1

# The interpreter below refuses writable+executable memory (Linux 6.3+ PR_SET_MDWE, what
# MemoryDenyWriteExecute= enforces with seccomp), then runs the tests of the code that could
# need it: the TLS ticket callback (a ctypes thunk OpenSSL calls), cryptography, uvloop.
MDWE_RUN = f"""
import ctypes, mmap, sys
libc = ctypes.CDLL(None, use_errno=True)
assert libc.prctl({PR_SET_MDWE}, {PR_MDWE_REFUSE_EXEC_GAIN}, 0, 0, 0) == 0, ctypes.get_errno()
try:
    mmap.mmap(-1, 4096, prot=mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC)
except OSError:
    pass
else:
    sys.exit("W+X memory is still allowed")
import pytest
sys.exit(pytest.main(["-q", "-p", "no:cacheprovider", *sys.argv[1:]]))
"""


def test_memory_deny_write_execute_leaves_lbproxy_working() -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    probe = subprocess.run([sys.executable, "-c", "import ctypes; print(ctypes.CDLL(None)"
                            f".prctl({PR_GET_MDWE}, 0, 0, 0, 0))"], capture_output=True,
                           text=True, timeout=60)
    if not hasattr(libc, "prctl") or probe.stdout.strip() == "-1":
        pytest.skip("this kernel has no PR_SET_MDWE (Linux < 6.3): cannot test W^X here")
    out = subprocess.run(
        [sys.executable, "-c", MDWE_RUN, "tests/proxy/test_tickets.py",
         "tests/proxy/test_relay.py::test_websocket_tunnel", "tests/tls/test_sni.py"],
        capture_output=True, text=True, timeout=300, cwd=ROOT,
        env={**os.environ, "LBPROXY_TEST_UVLOOP": "1"})
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert re.search(r"\d+ passed", out.stdout), out.stdout[-2000:]

