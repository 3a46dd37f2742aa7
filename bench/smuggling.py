"""The malformed-request table (tests/hardening/smuggling_cases.py, issue 6) and the desync table
(tests/hardening/desync_cases.py, issue 13) against lbproxy, nginx and HAProxy side by side.

Each proxy (nginx and HAProxy from Debian, when installed) listens on loopback in front of its own
real server; every case goes on a fresh connection. lbproxy runs in this process (DataPlane on
asyncio). Malformed table, per case: each proxy's answer (status, "-" for none, "+close" when it
closed the connection) and FWD when its real server received any bytes during the case. Desync
table, per case: each proxy's verdict (rejected, forwarded, ambiguous, desync; see
tests/hardening/desync_rig.py) with the statuses its client got, then why for every ambiguous or
desync verdict. Exit status 1 if lbproxy is off its documented answer or verdict anywhere.

    .venv/bin/python bench/smuggling.py [--markdown] [--table all|malformed|desync]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import logging
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from lbproxy.config.model import (  # noqa: E402
    Address,
    Config,
    HealthCheck,
    HealthCheckType,
    Limits,
    RealServer,
    VirtualService,
)
from lbproxy.proxy import DataPlane  # noqa: E402
from lbproxy.runtime import Runtime  # noqa: E402
from tests.hardening.desync_cases import AMBIGUOUS, DESYNC, FORWARDED, REJECTED  # noqa: E402
from tests.hardening.desync_cases import CASES as DESYNC_CASES  # noqa: E402
from tests.hardening.desync_cases import SCRIPTS as DESYNC_SCRIPTS  # noqa: E402
from tests.hardening.desync_rig import Outcome, Upstream, run_case  # noqa: E402
from tests.hardening.smuggling_cases import CASES, GOOD, MAX_BODY, send_case  # noqa: E402

logger = logging.getLogger(__name__)

READY_TIMEOUT = 10.0  # seconds for a peer to listen
CASE_TIMEOUT = 3.0  # seconds to wait for one answer (a proxy that waits for more body times out)
# Seconds for a real server's connections to show they read all a desync case sent (closed, or a
# probe read behind it); only a peer that keeps several pooled connections waits it out.
SETTLE = 0.5
PEERS = ("lbproxy", "nginx", "haproxy")
OK = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"

NGINX_CONF = """
daemon off;
worker_processes 1;
pid {tmp}/nginx.pid;
error_log {tmp}/nginx-error.log warn;
events {{ worker_connections 1024; }}
http {{
    access_log off;
    client_body_temp_path {tmp}/body;
    proxy_temp_path {tmp}/proxy;
    fastcgi_temp_path {tmp}/fcgi;
    uwsgi_temp_path {tmp}/uwsgi;
    scgi_temp_path {tmp}/scgi;
    client_max_body_size {max_body};
    upstream be {{ server 127.0.0.1:{up}; keepalive 16; }}
    server {{
        listen 127.0.0.1:{port};
        location / {{
            proxy_pass http://be;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
        }}
    }}
}}
"""

HAPROXY_CONF = """
global
    maxconn 1000
defaults
    mode http
    timeout connect 2s
    timeout client 5s
    timeout server 5s
    timeout http-request 3s
frontend fe
    bind 127.0.0.1:{port}
    http-request deny deny_status 413 if {{ req.hdr_val(content-length) gt {max_body} }}
    default_backend be
backend be
    http-reuse always
    server s1 127.0.0.1:{up}
"""


class Recorder:
    """A real server that records every byte and answers 200 "ok" to each head it sees."""

    def __init__(self) -> None:
        self.received = 0
        self.port = 0
        self.server: asyncio.Server | None = None
        self.tasks: set[asyncio.Task[None]] = set()

    async def stop(self) -> None:
        if self.server is not None:
            self.server.close()
        for t in self.tasks:
            t.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)

    async def start(self) -> None:
        async def run(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
            task = asyncio.current_task()
            assert task is not None
            self.tasks.add(task)
            buf = b""
            try:
                while data := await r.read(65536):
                    self.received += len(data)
                    buf += data
                    while b"\r\n\r\n" in buf:
                        _, _, buf = buf.partition(b"\r\n\r\n")
                        w.write(OK)
            except (ConnectionError, asyncio.CancelledError):
                pass
            finally:
                w.close()
                self.tasks.discard(task)

        self.server = await asyncio.start_server(run, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def wait_listening(port: int) -> bool:
    deadline = time.monotonic() + READY_TIMEOUT
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.5):
            return True
        time.sleep(0.05)
    return False


@contextlib.contextmanager
def peer(name: str, up: int, tmp: Path, tag: str = "") -> Iterator[int | None]:
    """Start nginx or HAProxy in front of port `up`; yields its port (None if not installed)."""
    exe = shutil.which(name) or (f"/usr/sbin/{name}" if Path(f"/usr/sbin/{name}").exists()
                                 else None)
    if exe is None:
        yield None
        return
    port = free_port()
    d = tmp / (name + tag)
    d.mkdir()
    if name == "nginx":
        conf = d / "nginx.conf"
        conf.write_text(NGINX_CONF.format(tmp=d, port=port, up=up, max_body=MAX_BODY))
        cmd = [exe, "-p", str(d), "-c", str(conf)]
    else:
        conf = d / "haproxy.cfg"
        conf.write_text(HAPROXY_CONF.format(port=port, up=up, max_body=MAX_BODY))
        cmd = [exe, "-f", str(conf), "-db"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        yield port if wait_listening(port) else None
    finally:
        proc.terminate()
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            proc.kill()


def version(name: str) -> str:
    exe = shutil.which(name) or f"/usr/sbin/{name}"
    try:
        out = subprocess.run([exe, "-v"], capture_output=True, text=True, timeout=5)
    except OSError:
        return "not installed"
    text = (out.stdout + out.stderr).strip().splitlines()
    return text[0] if text else "?"


def cell(status: int, closed: bool, forwarded: bool) -> str:
    s = str(status) if status else "-"
    if closed:
        s += "+close"
    if forwarded:
        s += " FWD"
    return s


def lbproxy_vs(up: int) -> VirtualService:
    return VirtualService(name="bench", listen=Address("127.0.0.1", 0),
                          real_servers=(RealServer(Address("127.0.0.1", up)),),
                          health_check=HealthCheck(type=HealthCheckType.NONE),
                          limits=Limits(max_body=MAX_BODY))


def print_table(head: list[str], rows: list[list[str]], markdown: bool) -> None:
    if markdown:
        print("| " + " | ".join(head) + " |")
        print("| " + " | ".join("---" for _ in head) + " |")
        for row in rows:
            print("| " + " | ".join(row) + " |")
    else:
        widths = [max(len(r[i]) for r in [head, *rows]) for i in range(len(head))]
        for row in [head, *rows]:
            print("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)))


async def run_malformed(markdown: bool) -> int:
    """The malformed table; the number of cases where lbproxy is off its documented answer."""
    recs = {n: Recorder() for n in PEERS}
    for r in recs.values():
        await r.start()
    dp = DataPlane()
    await dp.apply(Runtime(1, Config(virtual_services=(lbproxy_vs(recs["lbproxy"].port),))))
    ports: dict[str, int | None] = {"lbproxy": dp.listening_ports()["bench"][1]}
    rows: list[list[str]] = []
    lb_wrong = 0
    with tempfile.TemporaryDirectory() as t, \
            peer("nginx", recs["nginx"].port, Path(t)) as ng, \
            peer("haproxy", recs["haproxy"].port, Path(t)) as ha:
        ports["nginx"], ports["haproxy"] = ng, ha
        for case in (*CASES, None):
            raw = GOOD if case is None else case.raw
            row = ["(good request)" if case is None else case.name,
                   "200" if case is None else str(case.status)]
            for name in PEERS:
                port = ports[name]
                if port is None:
                    row.append("n/a")
                    continue
                before = recs[name].received
                status, closed = await asyncio.to_thread(send_case, "127.0.0.1", port, raw,
                                                         CASE_TIMEOUT)
                await asyncio.sleep(0.05)  # let the recorder read what may have been forwarded
                fwd = recs[name].received > before
                row.append(cell(status, closed, fwd and case is not None))
                if name == "lbproxy" and case is not None and (
                        status != case.status or not closed or fwd):
                    lb_wrong += 1
            rows.append(row)
    await dp.shutdown(1.0)
    for r in recs.values():
        await r.stop()
    print_table(["case", "documented", *PEERS], rows, markdown)
    forwarded = {n: sum("FWD" in r[2 + i] for r in rows) for i, n in enumerate(PEERS)}
    print(f"\n# malformed cases: {len(CASES)}; forwarded to the real server: {forwarded}; "
          f"lbproxy off its documented answer: {lb_wrong}")
    return lb_wrong


async def run_desync(markdown: bool) -> int:
    """The desync table; the number of cases where lbproxy is off its documented verdict."""
    ups = {n: Upstream(DESYNC_SCRIPTS) for n in PEERS}
    for up in ups.values():
        await up.start()
    dp = DataPlane()
    await dp.apply(Runtime(1, Config(virtual_services=(lbproxy_vs(ups["lbproxy"].port),))))
    ports: dict[str, int | None] = {"lbproxy": dp.listening_ports()["bench"][1]}
    results: dict[str, list[Outcome]] = {}
    with tempfile.TemporaryDirectory() as t, \
            peer("nginx", ups["nginx"].port, Path(t), "-desync") as ng, \
            peer("haproxy", ups["haproxy"].port, Path(t), "-desync") as ha:
        ports["nginx"], ports["haproxy"] = ng, ha
        for name in PEERS:  # one proxy after the other: their real servers' records stay apart
            port = ports[name]
            if port is not None:
                results[name] = [await run_case(port, case, ups[name], CASE_TIMEOUT, SETTLE)
                                 for case in DESYNC_CASES]
    await dp.shutdown(1.0)
    for up in ups.values():
        await up.stop()
    rows = []
    for i, case in enumerate(DESYNC_CASES):
        row = [case.name, case.kind, case.lbproxy]
        row += [results[n][i].cell() if n in results else "n/a" for n in PEERS]
        rows.append(row)
    print_table(["case", "class", "documented", *PEERS], rows, markdown)
    print()
    for name in PEERS:
        for o in results.get(name, []):
            if o.verdict in (AMBIGUOUS, DESYNC):
                print(f"- {name}, {o.case.name}: {o.verdict}: {'; '.join(o.notes)}")
    counts = "; ".join(
        f"{n} " + ", ".join(f"{sum(o.verdict == v for o in results[n])} {v}"
                            for v in (REJECTED, FORWARDED, AMBIGUOUS, DESYNC))
        for n in results)
    lb_wrong = sum(o.verdict != o.case.lbproxy for o in results["lbproxy"])
    print(f"\n# desync cases: {len(DESYNC_CASES)}; {counts}; "
          f"lbproxy off its documented verdict: {lb_wrong}")
    return lb_wrong


async def run(markdown: bool, table: str) -> int:
    stamp = dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC")
    print(f"# {stamp}; nginx: {version('nginx')}; haproxy: {version('haproxy')}")
    wrong = 0
    if table in ("all", "malformed"):
        print()
        wrong += await run_malformed(markdown)
    if table in ("all", "desync"):
        print()
        wrong += await run_desync(markdown)
    return 1 if wrong else 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--markdown", action="store_true", help="print Markdown tables")
    ap.add_argument("--table", choices=("all", "malformed", "desync"), default="all",
                    help="which table to run (default: both)")
    args = ap.parse_args()
    logging.basicConfig(level=logging.ERROR)
    return asyncio.run(run(args.markdown, args.table))


if __name__ == "__main__":
    sys.exit(main())
