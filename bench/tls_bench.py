"""HTTPS benchmark: lbproxy against nginx, same certificate, same run (issue 3).

Both servers terminate TLS and answer a fixed 3-byte body themselves (nginx `return 200`, lbproxy
a SubVS with no real servers whose "not available" answer is 200 "ok\\n"), so the figures are
TLS + HTTP/1.1 handling, no upstream. Both: TLS 1.2/1.3, the same cipher policy, the same trustme
ECDSA P-256 certificate, access log off, one worker (nginx `worker_processes 1`), pinned to core 0;
the load generators are pinned to core 1.

- Keep-alive requests/s: wrk over 64 connections (`-t1 -c64`), after a warm-up.
- New handshakes/s: `openssl s_time -new -www /` (a full handshake and one HTTP/1.0 request per
  connection, no session resumption), 2 processes in parallel, for a fixed time.
- Resumed handshakes/s: the same with `-reuse` (each connection resumes the session of the first:
  what a returning client costs); `resumes` says whether the server really resumed (an
  `openssl s_client -sess_in` check), since a server that never resumes would be measured doing
  full handshakes.
Beside each rate, the server's CPU time per request / per handshake from /proc, which stays
meaningful when the load generator, not the server, is the limit.

    .venv/bin/python bench/tls_bench.py [--duration S] [--quick] [--only nginx,lbproxy]
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import re
import shutil
import signal
import socket
import ssl
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
REPO = BENCH_DIR.parent
RESULTS = BENCH_DIR / "results"
LBPROXY = REPO / ".venv" / "bin" / "lbproxy"
sys.path.insert(0, str(BENCH_DIR))
sys.path.insert(0, str(REPO))

import http_bench as hb  # noqa: E402  (shared rig: Proc, /proc CPU, wrk parsing)

SERVER_CORE = hb.PROXY_CORE
RIG_CORE = hb.RIG_CORE
CIPHERS = "ECDHE+AESGCM:ECDHE+CHACHA20"  # lbproxy's default policy, given to nginx too
BODY = b"ok\n"
CONNECTIONS = 64
S_TIME_PROCS = 2  # parallel openssl s_time clients; one alone is latency-bound
READY_TIMEOUT = 20.0
S_TIME_GRACE = 30.0

NGINX_CONF = """
worker_processes 1;
daemon off;
pid {workdir}/nginx.pid;
error_log {workdir}/nginx.error.log warn;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    client_body_temp_path {workdir}/tmp;
    proxy_temp_path {workdir}/tmp;
    fastcgi_temp_path {workdir}/tmp;
    uwsgi_temp_path {workdir}/tmp;
    scgi_temp_path {workdir}/tmp;
    keepalive_requests 1000000;
    keepalive_timeout 60s;
    ssl_protocols TLSv1.2 TLSv1.3;
    ssl_ciphers {ciphers};
    ssl_prefer_server_ciphers on;
    server {{
        listen 127.0.0.1:{port} ssl;
        ssl_certificate {workdir}/fullchain.pem;
        ssl_certificate_key {workdir}/key.pem;
        default_type text/plain;
        location / {{ return 200 "ok\\n"; }}
    }}
}}
"""

LBPROXY_CONF = """
state_dir = "{workdir}/state"
[admin]
enabled = false
[access_log]
enabled = false

[[vs]]
name = "tls"
listen = "127.0.0.1:{port}"
protocol = "https"
content_switching = true
tls = {{ certificates = ["bench"], ciphers = "{ciphers}" }}
timeouts = {{ idle = 60.0 }}
limits = {{ max_connections = 100000 }}
[vs.health_check]
type = "none"
  [[vs.subvs]]
  name = "fixed"
  rules = ["default"]
  not_available = {{ status = 200, body = "ok\\n", content_type = "text/plain" }}
"""


def make_certificate(workdir: Path) -> None:
    """One trustme ECDSA P-256 certificate for both servers; lbproxy gets it via its store."""
    import trustme

    from lbproxy.certs import CertStore

    ca = trustme.CA()
    leaf = ca.issue_cert("bench.example.com")
    chain = b"".join(b.bytes() for b in leaf.cert_chain_pems)
    key = leaf.private_key_pem.bytes()
    (workdir / "fullchain.pem").write_bytes(chain)
    (workdir / "key.pem").write_bytes(key)
    (workdir / "key.pem").chmod(0o600)
    CertStore(workdir / "state").import_pem("bench", chain, key)


def tls_probe(port: int) -> bytes:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    with socket.create_connection(("127.0.0.1", port), timeout=hb.PROBE_TIMEOUT) as raw, \
            ctx.wrap_socket(raw, server_hostname="bench.example.com") as s:
        s.sendall(b"GET / HTTP/1.0\r\nHost: bench.example.com\r\n\r\n")
        data = b""
        while chunk := s.recv(4096):
            data += chunk
        return data


def wait_ready(proc: hb.Proc, port: int) -> None:
    deadline = time.monotonic() + READY_TIMEOUT
    last = "no answer"
    while time.monotonic() < deadline:
        if not proc.alive():
            raise RuntimeError(f"{proc.name} exited with {proc.popen.returncode}\n"
                               f"{proc.stderr_tail()}")
        try:
            answer = tls_probe(port)
            if answer.startswith(b"HTTP/1.") and b" 200 " in answer.split(b"\r\n")[0] \
                    and answer.endswith(BODY):
                return
            last = repr(answer[:80])
        except (OSError, ssl.SSLError) as e:
            last = str(e)
        time.sleep(0.1)
    raise RuntimeError(f"{proc.name} not ready on {port} after {READY_TIMEOUT}s ({last})\n"
                       f"{proc.stderr_tail()}")


# -- the two servers ------------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class Running:
    proc: hb.Proc
    measured_pid: int
    port: int
    how: str


def start_nginx(workdir: Path, nice: int = 0) -> Running:
    port = hb.free_port()
    (workdir / "tmp").mkdir(exist_ok=True)
    conf = workdir / "nginx.conf"
    conf.write_text(NGINX_CONF.format(workdir=workdir, port=port, ciphers=CIPHERS))
    proc = hb.Proc("nginx", [shutil.which("nginx") or "/usr/sbin/nginx", "-c", str(conf),
                             "-p", str(workdir)], SERVER_CORE, workdir, nice=nice)
    try:
        wait_ready(proc, port)
        worker = hb.find_worker(proc, time.monotonic() + READY_TIMEOUT)
    except BaseException:
        proc.stop()
        raise
    return Running(proc, worker, port, "nginx -c (worker_processes 1)")


def start_lbproxy(workdir: Path, nice: int = 0) -> Running:
    """`lbproxy run` if the composition root serves HTTPS; else this file's `--serve` mode, which
    wires store -> TLSContexts -> DataPlane exactly as the composition root is meant to."""
    port = hb.free_port()
    conf = workdir / "lbproxy.toml"
    conf.write_text(LBPROXY_CONF.format(workdir=workdir, port=port, ciphers=CIPHERS))
    attempts = [
        ("lbproxy run", [str(LBPROXY), "run", "-c", str(conf), "--log-level", "warning",
                         "--workers", "1"]),
        ("tls_bench --serve (DataPlane + TLSContexts on uvloop)",
         [sys.executable, str(Path(__file__).resolve()), "--serve", str(conf)]),
    ]
    errors = []
    for how, argv in attempts:
        proc = hb.Proc("lbproxy", argv, SERVER_CORE, workdir, nice=nice)
        try:
            wait_ready(proc, port)
            return Running(proc, proc.pid, port, how)
        except RuntimeError as e:
            proc.stop()
            errors.append(f"{how}: {str(e)[:300]}")
    raise RuntimeError("lbproxy did not start:\n" + "\n".join(errors))


async def _serve(config_path: Path) -> None:
    from lbproxy.certs import CertStore, config_usage
    from lbproxy.config import load_file
    from lbproxy.proxy import DataPlane
    from lbproxy.proxy.tls import TLSContexts
    from lbproxy.runtime import RuntimeStore

    cfg = load_file(config_path)
    runtime = RuntimeStore(cfg)
    store = CertStore(Path(cfg.state_dir), usage=config_usage(lambda: runtime.current.config))
    tls = TLSContexts(store, runtime.current.effective_services())
    dataplane = DataPlane(tls_factory=tls.factory)
    runtime.subscribe(tls.on_runtime)
    runtime.subscribe(dataplane.apply)
    await dataplane.apply(runtime.current)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_signal_handler(signal.SIGINT, stop.set)
    await stop.wait()
    await dataplane.shutdown(1.0)


# -- load -----------------------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class Cell:
    server: str
    how: str
    rps: float
    p99_us: float
    cpu_us_per_request: float
    errors: int
    handshakes_per_s: float
    cpu_us_per_handshake: float
    handshake_connections: int
    noise0: float
    resumed_per_s: float = 0.0
    cpu_us_per_resumed: float = 0.0
    resumes: str = ""   # the TLS versions whose sessions the server resumed ("tls1_2,tls1_3")


def run_wrk_https(port: int, seconds: float, nice: int = 0) -> hb.WrkResult:
    argv = [*hb._nice(nice), "taskset", "-c", str(RIG_CORE), "wrk", "--latency", "-t1",
            f"-c{CONNECTIONS}", f"-d{seconds:g}s", f"--timeout={hb.WRK_REQUEST_TIMEOUT}",
            f"https://127.0.0.1:{port}/"]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=seconds + hb.WRK_GRACE,
                          check=False)
    if done.returncode != 0:
        raise RuntimeError(f"wrk failed ({done.returncode}): {done.stderr or done.stdout}")
    return hb.parse_wrk(done.stdout)


def run_s_time(port: int, seconds: int, nice: int = 0, *, reuse: bool = False
               ) -> tuple[int, float]:
    """(connections, wall seconds) summed over S_TIME_PROCS parallel `openssl s_time -new`
    (or `-reuse`: every connection after the first resumes its session)."""
    argv = [*hb._nice(nice), "taskset", "-c", str(RIG_CORE), "openssl", "s_time", "-connect",
            f"127.0.0.1:{port}", "-reuse" if reuse else "-new", "-www", "/", "-time",
            str(seconds)]
    t0 = time.monotonic()
    procs = [subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              stdin=subprocess.DEVNULL, text=True)
             for _ in range(S_TIME_PROCS)]
    total = 0
    for p in procs:
        try:
            out, _ = p.communicate(timeout=seconds + S_TIME_GRACE)
        except subprocess.TimeoutExpired:
            p.kill()
            raise RuntimeError("openssl s_time did not finish") from None
        # "1234 connections in 10 real seconds, 3 bytes read per connection"
        m = re.search(r"(\d+) connections in (\d+(?:\.\d+)?) real seconds", out)
        if not m:
            raise RuntimeError(f"unparsable openssl s_time output:\n{out}")
        total += int(m.group(1))
    return total, time.monotonic() - t0


def resumes(port: int, workdir: Path, tls: str) -> bool:
    """Whether a second `openssl s_client` connection resumes the first one's session."""
    sess = workdir / f"session-{tls}.pem"
    request = b"GET / HTTP/1.0\r\n\r\n"   # read the answer: TLS 1.3 tickets come after
    base = ["openssl", "s_client", "-connect", f"127.0.0.1:{port}", f"-{tls}", "-ign_eof"]
    subprocess.run([*base, "-sess_out", str(sess)], input=request, capture_output=True,
                   timeout=10, check=False)
    done = subprocess.run([*base, "-sess_in", str(sess)], input=request, capture_output=True,
                          timeout=10, check=False)
    return b"Reused, TLS" in done.stdout


def measure(r: Running, name: str, seconds: float, nice: int = 0, *,
            workdir: Path) -> Cell:
    run_wrk_https(r.port, max(1.0, seconds / 5), nice)  # warm-up
    cores0 = hb.core_times()
    t0 = time.monotonic()
    cpu0 = hb.cpu_seconds(r.measured_pid)
    wrk = run_wrk_https(r.port, seconds, nice)
    cpu1 = hb.cpu_seconds(r.measured_pid)
    hs, _wall = run_s_time(r.port, max(1, round(seconds)), nice)
    cpu2 = hb.cpu_seconds(r.measured_pid)
    resumed, _wall = run_s_time(r.port, max(1, round(seconds)), nice, reuse=True)
    cpu3 = hb.cpu_seconds(r.measured_pid)
    busy, _softirq = hb.core_share(cores0, hb.core_times(), SERVER_CORE)
    # Everything else on the server's core: its busy share minus the server's own share.
    noise = max(0.0, busy - (cpu2 - cpu0) / (time.monotonic() - t0))
    # Rate over the s_time window itself (each process reports its own; they ran in parallel).
    hs_rate = hs / max(1.0, round(seconds))
    return Cell(
        server=name, how=r.how, rps=wrk.rps, p99_us=wrk.p99_us,
        cpu_us_per_request=(cpu1 - cpu0) / max(1, wrk.requests) * 1e6,
        errors=wrk.socket_errors + wrk.non_2xx,
        handshakes_per_s=hs_rate,
        cpu_us_per_handshake=(cpu2 - cpu1) / max(1, hs) * 1e6,
        handshake_connections=hs,
        noise0=noise,
        resumed_per_s=resumed / max(1.0, round(seconds)),
        cpu_us_per_resumed=(cpu3 - cpu2) / max(1, resumed) * 1e6,
        resumes=",".join(v for v in ("tls1_2", "tls1_3") if resumes(r.port, workdir, v)),
    )


def median_cell(cells: list[Cell]) -> Cell:
    """Each figure's median over the rounds (figures from different rounds may mix)."""
    def med(field: str) -> float:
        return float(statistics.median(getattr(c, field) for c in cells))
    return Cell(server=cells[0].server, how=cells[0].how, rps=med("rps"), p99_us=med("p99_us"),
                cpu_us_per_request=med("cpu_us_per_request"),
                errors=sum(c.errors for c in cells), handshakes_per_s=med("handshakes_per_s"),
                cpu_us_per_handshake=med("cpu_us_per_handshake"),
                handshake_connections=sum(c.handshake_connections for c in cells),
                noise0=med("noise0"), resumed_per_s=med("resumed_per_s"),
                cpu_us_per_resumed=med("cpu_us_per_resumed"),
                resumes=cells[-1].resumes)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--duration", type=float, default=10.0, help="seconds per measurement")
    p.add_argument("--quick", action="store_true", help="3-second measurements")
    p.add_argument("--only", default="nginx,lbproxy")
    p.add_argument("--serve", metavar="CONFIG", help=argparse.SUPPRESS)
    p.add_argument("--rounds", type=int, default=1, help="alternate the servers N times; "
                   "report medians")
    p.add_argument("--nice", type=int, default=0, help="run servers and load at this nice "
                   "level (e.g. -10 as root) to shield them from other work on the machine")
    p.add_argument("--keep", action="store_true", help="keep the work directory")
    args = p.parse_args(argv)
    if args.serve:
        try:
            import uvloop
            uvloop.run(_serve(Path(args.serve)))
        except ImportError:  # pragma: no cover
            asyncio.run(_serve(Path(args.serve)))
        return 0
    seconds = 3.0 if args.quick else args.duration
    for tool in ("wrk", "openssl", "taskset"):
        if shutil.which(tool) is None:
            print(f"tls_bench: {tool} is not installed", file=sys.stderr)
            return 2
    workdir = Path(tempfile.mkdtemp(prefix="lbproxy-tls-bench-"))
    make_certificate(workdir)
    starters = {"nginx": start_nginx, "lbproxy": start_lbproxy}
    names = args.only.split(",")
    runs: dict[str, list[Cell]] = {n: [] for n in names}
    try:
        for rnd in range(args.rounds):
            # Alternate the order so a burst of outside load does not always hit the same server.
            for name in names if rnd % 2 == 0 else names[::-1]:
                running = starters[name](workdir, args.nice)
                try:
                    c = measure(running, name, seconds, args.nice, workdir=workdir)
                finally:
                    running.proc.stop()
                runs[name].append(c)
                print(f"{name:8} {c.rps:10.0f} req/s  p99 {c.p99_us / 1000:6.2f} ms  "
                      f"{c.cpu_us_per_request:6.1f} us CPU/req  errors {c.errors}  |  "
                      f"{c.handshakes_per_s:7.0f} handshakes/s  {c.cpu_us_per_handshake:7.1f} "
                      f"us CPU/handshake  |  {c.resumed_per_s:7.0f} resumed/s "
                      f"{c.cpu_us_per_resumed:7.1f} us CPU/resumed (resumes: {c.resumes or 'no'})"
                      f"  (noise core0 {c.noise0:.0%}; {c.how})", flush=True)
    finally:
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)
    cells = {name: median_cell(cs) for name, cs in runs.items() if cs}
    result: dict[str, object] = {
        "date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M"),
        "command": " ".join(["bench/tls_bench.py", *(argv or sys.argv[1:])]),
        "openssl": ssl.OPENSSL_VERSION, "seconds": seconds,
        "rounds": args.rounds, "nice": args.nice,
        "cells": {k: asdict(v) for k, v in cells.items()},
        "runs": {k: [asdict(c) for c in v] for k, v in runs.items()},
    }
    if "nginx" in cells and "lbproxy" in cells:
        n, lb = cells["nginx"], cells["lbproxy"]
        ratios = {
            "rps": lb.rps / n.rps,
            "handshakes": lb.handshakes_per_s / n.handshakes_per_s,
            "cpu_per_request": lb.cpu_us_per_request / n.cpu_us_per_request,
            "cpu_per_handshake": lb.cpu_us_per_handshake / n.cpu_us_per_handshake,
            "resumed": lb.resumed_per_s / max(1e-9, n.resumed_per_s),
            "cpu_per_resumed": lb.cpu_us_per_resumed / max(1e-9, n.cpu_us_per_resumed),
        }
        result["ratios"] = ratios
        print(f"medians of {args.rounds} round(s), lbproxy/nginx: keep-alive req/s "
              f"{ratios['rps']:.2f}x, new handshakes/s "
              f"{ratios['handshakes']:.2f}x; CPU per request {ratios['cpu_per_request']:.2f}x, "
              f"CPU per handshake {ratios['cpu_per_handshake']:.2f}x; resumed handshakes/s "
              f"{ratios['resumed']:.2f}x at {ratios['cpu_per_resumed']:.2f}x the CPU")
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / f"tls-{dt.datetime.now(dt.UTC):%Y%m%dT%H%M%SZ}.json"
    out.write_text(json.dumps(result, indent=2))
    print(f"results: {out.relative_to(REPO)}")
    return 0 if all(c.errors == 0 for c in cells.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
