"""Memory per idle keep-alive connection (issue 17): lbproxy against nginx, in one run.

Rig: the proxy under test on core 0, one nginx backend on core 1, loopback only (the helpers of
bench/http_bench.py, imported). For each proxy, in turn: warm it up, read its resident set size
(VmRSS of nginx's worker / lbproxy's process), open N client connections from this script, send
one request on each and read the answer (so each connection has served a request and is now an
idle keep-alive connection), confirm that the proxy holds them all (its open file descriptors)
and that a sample still answers a second request, read the RSS again. Bytes per connection =
(RSS with N idle connections - RSS before) / N. Each proxy runs with access logging off and a
keep-alive timeout far longer than the run.

File descriptors: this script holds one per connection and each proxy one per connection plus its
listeners, upstream pool and files, and the machine's hard limit (`ulimit -Hn`) caps each process;
N defaults to 90% of that limit (18,000 of 20,000 here): nginx starts closing idle keep-alive
connections once fewer than 1/16 of its `worker_connections` are free, and a process cannot
raise its hard limit here, so 20,000 cannot be held by one process of either. "held" is what
the proxy's descriptor count grew by (client connections, and the few upstream ones opened).

`--tls`: the same over HTTPS, with bench/tls_bench.py's servers (TLS terminated, each answering a
3-byte body itself, no backend): what an idle TLS connection costs. N defaults to 3,000 there
(tls_bench's nginx has `worker_connections 4096`; this script makes every handshake).

    .venv/bin/python bench/idle_bench.py [--conns N] [--rounds R] [--tls] [--keep]
                                         [--lbproxy-src DIR]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import gc
import json
import os
import resource
import shutil
import ssl
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import http_bench as hb  # a sibling script, not a package
import tls_bench as tb  # its servers, for --tls

PROXIES = ("nginx", "lbproxy")
# Descriptors each process keeps beside the client connections (listeners, pool, files, stdio,
# asyncio's self-pipe, this script's own): the margin under the hard limit.
FD_MARGIN = 150
DEFAULT_SHARE = 0.9
BATCH = 100                 # connections opened at once (bounds the upstream connections made)
REQUEST = b"GET /bench/100 HTTP/1.1\r\nHost: bench\r\n\r\n"
BODY = 100  # bytes of its answer
TLS_REQUEST = b"GET / HTTP/1.1\r\nHost: bench.example.com\r\n\r\n"
TLS_DEFAULT_CONNS = 3000
TLS_MAX_CONNS = 3800  # tls_bench's nginx: worker_connections 4096


@dataclass(frozen=True)
class Mode:
    """What the client connections speak: the request, its answer's body length, TLS or not."""

    request: bytes = REQUEST
    body: int = BODY
    tls: ssl.SSLContext | None = None


PLAIN = Mode()
ANSWER_TIMEOUT = 10.0
SETTLE = 3.0                # seconds after the last connection before RSS is read (an idle
                            # lbproxy connection gives back its parser after 1-2 s)
SAMPLE = 200                # connections asked a second request at the end


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmRSS for pid {pid}")


def open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def lbproxy_config(port: int, backend_port: int, workdir: Path, conns: int) -> str:
    return "\n".join([
        f"state_dir = {json.dumps(str(workdir / 'state'))}",
        "[admin]", "enabled = false",
        "[access_log]", "enabled = false",
        "[[vs]]", 'name = "bench"', f'listen = "127.0.0.1:{port}"', 'protocol = "http"',
        "timeouts = { idle = 900 }", f"limits = {{ max_connections = {conns + 1000} }}",
        "[vs.health_check]", 'type = "none"',
        "[[vs.real_servers]]", f'address = "127.0.0.1:{backend_port}"', ""])


def start(name: str, workdir: Path, port: int, backend_port: int, conns: int,
          src: Path) -> hb.Running:
    d = workdir / name
    d.mkdir()
    if name == "nginx":
        conf = d / "nginx.conf"
        nofile = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
        conf.write_text(hb.render("nginx_idle.conf", DIR=str(d), PORT=str(port),
                                  BACKEND_PORT=str(backend_port), USER=hb._nginx_user(),
                                  NOFILE=str(nofile)))
        proc = hb.Proc(name, ["nginx", "-p", str(d), "-e", str(d / "error.log"), "-c",
                              str(conf)], hb.PROXY_CORE, d)
    else:
        conf = d / "lbproxy.toml"
        conf.write_text(lbproxy_config(port, backend_port, d, conns))
        env = {**os.environ, "PYTHONPATH": str(src)}
        proc = hb.Proc(name, [str(hb.LBPROXY), "run", "-c", str(conf), "--log-level", "warning",
                              "--workers", "1"], hb.PROXY_CORE, d, env=env)
    try:
        hb.wait_ready(proc, port, "/bench/100", 100)
        pid = (hb.find_worker(proc, time.monotonic() + hb.READY_TIMEOUT) if name == "nginx"
               else proc.pid)
        return hb.Running(proc, pid, d / "no-access.log")
    except BaseException:
        proc.stop()
        raise


def start_tls_server(name: str, workdir: Path, src: Path) -> tuple[hb.Running, int]:
    """tls_bench's nginx or lbproxy (its certificate made in `workdir`), the lbproxy packages
    from `src`."""
    workdir.mkdir(parents=True, exist_ok=True)
    tb.make_certificate(workdir)
    if name == "nginx":
        r = tb.start_nginx(workdir)
    else:
        os.environ["PYTHONPATH"] = str(src)
        r = tb.start_lbproxy(workdir)
    return hb.Running(r.proc, r.measured_pid, workdir / "no-access.log"), r.port


def tls_client() -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE  # tls_bench's throwaway certificate
    return ctx


async def _ask(reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
               mode: Mode = PLAIN) -> None:
    """One request on a kept-alive connection, its answer read whole."""
    writer.write(mode.request)
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), ANSWER_TIMEOUT)
    if not head.startswith(b"HTTP/1.1 200"):
        raise RuntimeError(f"unexpected answer {head[:40]!r}")
    await asyncio.wait_for(reader.readexactly(mode.body), ANSWER_TIMEOUT)


async def _open(port: int, mode: Mode = PLAIN
                ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    reader, writer = await asyncio.wait_for(
        asyncio.open_connection("127.0.0.1", port, ssl=mode.tls,
                                server_hostname="bench.example.com" if mode.tls else None),
        ANSWER_TIMEOUT)
    await _ask(reader, writer, mode)
    return reader, writer


@dataclass
class Result:
    proxy: str
    round: int
    conns: int
    fds_held: int
    rss_before: int
    rss_after: int
    sample_ok: int

    @property
    def per_conn(self) -> float:
        """Per connection the proxy really holds (nginx may have closed some, see above)."""
        return (self.rss_after - self.rss_before) / min(self.conns, self.fds_held)


async def measure(name: str, run: hb.Running, port: int, conns: int, rnd: int,
                  mode: Mode = PLAIN) -> Result:
    for _ in range(200):  # warm-up on one connection: code paths, pools, caches
        _, w = await _open(port, mode)
        w.close()
    await asyncio.sleep(SETTLE)
    before = rss_bytes(run.measured_pid)
    fds_before = open_fds(run.measured_pid)
    held: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []
    try:
        for start_at in range(0, conns, BATCH):
            n = min(BATCH, conns - start_at)
            held += await asyncio.gather(*(_open(port, mode) for _ in range(n)))
        await asyncio.sleep(SETTLE)
        after = rss_bytes(run.measured_pid)
        fds = open_fds(run.measured_pid) - fds_before
        step = max(1, len(held) // SAMPLE)
        answers = await asyncio.gather(*(_ask(*held[i], mode) for i in range(0, len(held), step)
                                         [:SAMPLE]), return_exceptions=True)
        ok = sum(1 for a in answers if not isinstance(a, BaseException))
    finally:
        for _, w in held:
            w.close()
    return Result(name, rnd, conns, fds, before, after, ok)


def main(argv: Sequence[str] | None = None) -> int:
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    default = int(hard * DEFAULT_SHARE)
    p.add_argument("--conns", type=int, default=None,
                   help=f"idle connections to hold (default {default}: 90%% of the hard fd "
                        f"limit; {TLS_DEFAULT_CONNS} with --tls)")
    p.add_argument("--tls", action="store_true", help="HTTPS connections (tls_bench's servers)")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--keep", action="store_true", help="keep the temp dir")
    p.add_argument("--lbproxy-src", type=Path, default=hb.REPO, metavar="DIR",
                   help="run the lbproxy packages in DIR (e.g. a `git archive` of a commit)")
    args = p.parse_args(argv)
    if args.conns is None:
        args.conns = TLS_DEFAULT_CONNS if args.tls else default
    top = TLS_MAX_CONNS if args.tls else hard - FD_MARGIN
    if not 1 <= args.conns <= top:
        p.error(f"--conns must be 1..{top} (hard fd limit {hard}"
                + (", tls_bench's nginx worker_connections)" if args.tls else ")"))
    mode = Mode(TLS_REQUEST, len(tb.BODY), tls_client()) if args.tls else PLAIN
    for name in PROXIES:
        why = hb.peer_available(name)
        if why:
            print(f"idle_bench: {name}: {why}", file=sys.stderr)
            return 1
    results: list[Result] = []
    workdir = Path(tempfile.mkdtemp(prefix="lbproxy-idle-"))
    backend_port = hb.free_port()
    backend = None if args.tls else hb.start_backend(workdir, backend_port)  # TLS: none
    try:
        for rnd in range(1, args.rounds + 1):
            order = PROXIES if rnd % 2 else PROXIES[::-1]
            for name in order:
                (workdir / f"r{rnd}").mkdir(exist_ok=True)
                if args.tls:
                    run, port = start_tls_server(name, workdir / f"r{rnd}" / name,
                                                 args.lbproxy_src)
                else:
                    port = hb.free_port()
                    run = start(name, workdir / f"r{rnd}", port, backend_port, args.conns,
                                args.lbproxy_src)
                try:
                    res = asyncio.run(measure(name, run, port, args.conns, rnd, mode))
                finally:
                    run.proc.stop()
                gc.collect()
                results.append(res)
                print(f"round {rnd} {name:8} opened {res.conns:,}, held {res.fds_held:,} (sample "
                      f"{res.sample_ok}/{min(SAMPLE, res.conns)} answered): RSS "
                      f"{res.rss_before / 2**20:.1f} -> {res.rss_after / 2**20:.1f} MiB, "
                      f"{res.per_conn:,.0f} bytes/connection", flush=True)
    finally:
        if backend is not None:
            backend.proc.stop()
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)
    _report(results, args.conns, args.tls)
    return 0


def _report(results: list[Result], conns: int, tls: bool) -> None:
    per = {n: statistics.median(r.per_conn for r in results if r.proxy == n) for n in PROXIES}
    print(f"\nmedian bytes per idle keep-alive {'TLS ' if tls else ''}connection ({conns:,} held): "
          f"nginx {per['nginx']:,.0f}, lbproxy {per['lbproxy']:,.0f}, "
          f"ratio {per['lbproxy'] / per['nginx']:.2f}x")
    hb.RESULTS.mkdir(exist_ok=True)
    stamp = dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%SZ")
    out = hb.RESULTS / f"idle{'-tls' if tls else ''}-{stamp}.json"
    out.write_text(json.dumps({"conns": conns, "tls": tls, "git": hb.git_head(), "results": [
        {**asdict(r), "per_conn": r.per_conn} for r in results]}, indent=2))
    print(f"written {out}")


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        sys.exit(main())
