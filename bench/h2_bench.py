"""HTTP/2 benchmark: lbproxy against nginx with HTTP/2 on, same certificate, same rig (issue 20).

The rig is tls_bench.py's (its helpers are imported): both servers terminate TLS and answer a
fixed 3-byte body themselves (nginx `return 200`, lbproxy a SubVS whose "not available" answer is
200 "ok\\n"), one worker pinned to core 0, the load generator pinned to core 1, the same trustme
ECDSA P-256 certificate and cipher policy. The load is h2load (Debian's nghttp2-client) over
`CONNECTIONS` connections with `STREAMS` concurrent streams each, after a warm-up. nginx 1.22
(Debian 12) enables HTTP/2 with `listen ... ssl http2` (`http2 on` is 1.25.1+). Beside each rate,
the server's CPU time per request from /proc, which stays meaningful when the load generator,
not the server, is the limit.

    .venv/bin/python bench/h2_bench.py [--duration S] [--quick] [--only nginx,lbproxy]
"""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH_DIR))

import http_bench as hb  # noqa: E402  (shared rig: Proc, /proc CPU)
import tls_bench as tb  # noqa: E402  (the HTTPS rig: certificate, both servers)

CONNECTIONS = 16
STREAMS = 10  # concurrent streams per connection (h2load -m)


@dataclass(frozen=True, slots=True)
class Cell:
    server: str
    how: str
    rps: float
    cpu_us_per_request: float
    requests: int
    failed: int
    protocol: str


def run_h2load(port: int, seconds: float) -> tuple[float, int, int, str]:
    """req/s, requests done, requests failed, and the protocol h2load says it used."""
    argv = ["taskset", "-c", str(tb.RIG_CORE), "h2load", "-c", str(CONNECTIONS), "-m",
            str(STREAMS), "-D", f"{seconds:g}", "--warm-up-time=1", f"https://127.0.0.1:{port}/"]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=seconds + 60,
                          check=False)
    out = done.stdout
    rate = re.search(r"finished in [\d.]+\w+, ([\d.]+) req/s", out)
    reqs = re.search(r"requests: \d+ total, \d+ started, (\d+) done, (\d+) succeeded, "
                     r"(\d+) failed", out)
    proto = re.search(r"Application protocol: (\S+)", out)
    if done.returncode != 0 or rate is None or reqs is None:
        raise RuntimeError(f"h2load failed ({done.returncode}): {out[-800:]} {done.stderr}")
    return (float(rate.group(1)), int(reqs.group(1)), int(reqs.group(3)),
            proto.group(1) if proto else "?")


def measure(r: tb.Running, name: str, seconds: float) -> Cell:
    run_h2load(r.port, max(1.0, seconds / 5))  # warm-up (and the JIT-free Python's caches)
    cpu0 = hb.cpu_seconds(r.measured_pid)
    t0 = time.monotonic()
    rps, n, failed, proto = run_h2load(r.port, seconds)
    cpu1 = hb.cpu_seconds(r.measured_pid)
    del t0
    return Cell(name, r.how, rps, (cpu1 - cpu0) / max(1, n) * 1e6, n, failed, proto)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    p.add_argument("--duration", type=float, default=10.0, help="seconds per measurement")
    p.add_argument("--quick", action="store_true", help="3-second measurements")
    p.add_argument("--only", default="nginx,lbproxy")
    p.add_argument("--keep", action="store_true", help="keep the work directory")
    args = p.parse_args(argv)
    seconds = 3.0 if args.quick else args.duration
    for tool in ("h2load", "taskset", "nginx"):
        if shutil.which(tool) is None and not Path(f"/usr/sbin/{tool}").exists():
            print(f"h2_bench: {tool} is not installed (apt-get install nghttp2-client)",
                  file=sys.stderr)
            return 2
    # nginx with HTTP/2 on the same listener; lbproxy's HTTPS VS offers h2 by default.
    tb.NGINX_CONF = tb.NGINX_CONF.replace("listen 127.0.0.1:{port} ssl;",
                                          "listen 127.0.0.1:{port} ssl http2;")
    workdir = Path(tempfile.mkdtemp(prefix="lbproxy-h2-bench-"))
    tb.make_certificate(workdir)
    starters = {"nginx": tb.start_nginx, "lbproxy": tb.start_lbproxy}
    cells: dict[str, Cell] = {}
    try:
        for name in args.only.split(","):
            running = starters[name](workdir)
            try:
                c = measure(running, name, seconds)
            finally:
                running.proc.stop()
            cells[name] = c
            print(f"{name:8} {c.rps:10.0f} req/s  {c.cpu_us_per_request:7.1f} us CPU/req  "
                  f"requests {c.requests} failed {c.failed}  protocol {c.protocol}  ({c.how})",
                  flush=True)
    finally:
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)
    if "nginx" in cells and "lbproxy" in cells:
        n, lb = cells["nginx"], cells["lbproxy"]
        print(f"lbproxy/nginx: req/s {lb.rps / max(n.rps, 1e-9):.2f}x, CPU per request "
              f"{lb.cpu_us_per_request / max(n.cpu_us_per_request, 1e-9):.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
