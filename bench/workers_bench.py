"""Worker-process benchmark: lbproxy `workers = 1, 2` against nginx `worker_processes 1, 2`.

For each server and worker count, wrk (`-t1 -c64`, keep-alive HTTP/1.1) sends requests through
the proxy to one nginx backend serving a fixed 100-byte file (the rig and the realistic config of
bench/http_bench.py: 99 non-matching content rules, access log on); a short HTTPS variant has
each server terminate TLS and answer itself (the configs of bench/tls_bench.py); a `pipelined`
variant has each server answer a 3-byte page itself over plain HTTP to a wrk that pipelines
PIPELINE_DEPTH requests per write (bench/peers/pipeline.lua): a load generator that light leaves
most of core 1 free, so it is the one rig here where a second worker has a core to scale onto
(browsers do not pipeline; this variant measures scaling, not a realistic client). The figures are
req/s and CPU per request, the latter summed over the server's whole process tree (nginx master
+ workers, lbproxy's control process + workers) from /proc/<pid>/stat.

The machine has 2 cores, so two rigs, each pinned with taskset:
- `pinned`: every server process on core 0, wrk + backend on core 1. At workers = 2 both workers
  share core 0: lbproxy/nginx at equal worker counts, and what a second process costs per request.
- `shared`: server processes free on cores 0-1, wrk + backend on core 1. The only rig where a
  second worker can find CPU; it competes with wrk and the backend for it.
nginx listens with `reuseport` at 2 workers (a socket per worker, like lbproxy's SO_REUSEPORT).
Bars: lbproxy/nginx >= 0.9x at equal worker counts, in req/s and in requests per CPU-second;
lbproxy workers 2/1 req/s >= 1.7x on the `shared` rig (nginx's own 2/1 ratio, printed beside it,
is what the rig allows; the CPU-per-request ratio w1/w2 is the per-core cost of a second worker).
Several runs, each a warm-up and a measured wrk run per configuration with the server started
and stopped around it, the order reversed every other run; medians. Results (every sample too)
in bench/results/workers_bench.json.

    .venv/bin/python bench/workers_bench.py [--runs 3] [--duration 5] [--quick] [--nice -10]
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import os
import resource
import shutil
import signal
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
REPO = BENCH_DIR.parent
RESULTS = BENCH_DIR / "results"
sys.path.insert(0, str(BENCH_DIR))
sys.path.insert(0, str(REPO))

import http_bench as hb  # noqa: E402  (the rig: Proc, backend, wrk, /proc readings, configs)
import tls_bench as tb  # noqa: E402  (TLS configs, certificate, wrk over HTTPS)

WORKERS = (1, 2)
PROXIES = ("nginx", "lbproxy")
RIGS = {"pinned": str(hb.PROXY_CORE), "shared": f"{hb.PROXY_CORE},{hb.RIG_CORE}"}
PATH, SIZE = hb.SIZES["100B"]
PIPELINE_DEPTH = 64  # requests per wrk write in the pipelined variant
PIPELINE_SCRIPT = BENCH_DIR / "peers" / "pipeline.lua"
PIPELINE_BODY = b"ok\n"  # tls_bench's answer
CONNECTIONS = 64  # tls_bench.run_wrk_https has the same fixed 64
THREADS = 1
MIN_PEER_RATIO = 0.9  # lbproxy/nginx req/s at equal worker counts
MIN_SCALING = 1.7  # lbproxy workers 2 / workers 1 req/s
# Access-log lines below this share of wrk's requests (warm-up + measured) are reported as lost;
# the readiness probes add a few lines, wrk's requests cut off at its end may be counted or not.
LOG_LINES_MIN = 0.99
READY_TIMEOUT = 20.0  # seconds for a server's whole process tree to appear


# -- process trees ------------------------------------------------------------------------------

def _stat_fields(pid: int) -> list[str]:
    raw = Path(f"/proc/{pid}/stat").read_text()
    return raw[raw.rindex(")") + 2:].split()  # from field 3 (state) on


def process_tree(root: int) -> tuple[int, ...]:
    """root and all its descendants (one scan of /proc)."""
    parent: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError, IndexError, ValueError):
                parent[int(entry.name)] = int(_stat_fields(int(entry.name))[1])
    tree, frontier = [root], {root}
    while frontier:  # bounded: each pid joins the tree once
        kids = {p for p, pp in parent.items() if pp in frontier and p not in tree}
        tree.extend(sorted(kids))
        frontier = kids
    return tuple(tree)


def start_time(pid: int) -> str:
    """Field 22 of /proc/<pid>/stat: tells a process from a later one with the same pid."""
    try:
        return _stat_fields(pid)[19]
    except (OSError, IndexError):
        return ""


def wait_tree(proc: hb.Proc, expected: int) -> tuple[int, ...]:
    """The server's process tree once it has `expected` processes; RuntimeError if it does not
    get there within READY_TIMEOUT (e.g. lbproxy ignoring `workers`)."""
    deadline = time.monotonic() + READY_TIMEOUT
    tree = process_tree(proc.pid)
    while len(tree) < expected and time.monotonic() < deadline and proc.alive():
        time.sleep(0.1)
        tree = process_tree(proc.pid)
    if len(tree) < expected:
        raise RuntimeError(f"{proc.name}: {len(tree)} process(es) after {READY_TIMEOUT:g}s, "
                           f"expected {expected}\n{proc.stderr_tail()}")
    return tree


@dataclass(frozen=True, slots=True)
class Server:
    proc: hb.Proc
    port: int
    pids: tuple[int, ...]  # root (nginx master / lbproxy control process) first, then workers
    starts: tuple[str, ...]  # start_time() of each pid
    access_log: Path | None

    def stop(self) -> None:
        self.proc.stop()  # SIGTERM, then SIGKILL, to the process group
        for pid, started in zip(self.pids, self.starts, strict=True):
            if started and start_time(pid) == started:  # left its group (setsid) and lived on
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.kill(pid, signal.SIGKILL)


# -- the servers ---------------------------------------------------------------------------------

def _replace_once(text: str, old: str, new: str) -> str:
    if text.count(old) != 1:
        raise RuntimeError(f"config template changed: {old!r} not found exactly once")
    return text.replace(old, new)


def _launch(name: str, argv: list[str], cores: str, d: Path, args: argparse.Namespace,
            expected: int, ready: Callable[[hb.Proc], None], log: Path | None) -> Server:
    env = {**os.environ, "PYTHONPATH": str(args.lbproxy_src)}  # see http_bench.start_proxy
    # hb.Proc pins to one core; the inner taskset widens that to `cores`.
    proc = hb.Proc(name, ["taskset", "-c", cores, *argv], hb.PROXY_CORE, d, nice=args.nice,
                   env=env)
    try:
        ready(proc)
        tree = wait_tree(proc, expected)
        return Server(proc, 0, tree, tuple(start_time(p) for p in tree), log)
    except BaseException:
        proc.stop()
        raise


def _expected(proxy: str, workers: int) -> int:
    # nginx: master + workers; lbproxy: one process at workers = 1, else control + workers.
    return 1 + workers if proxy == "nginx" or workers > 1 else 1


def start_http(proxy: str, workers: int, cores: str, d: Path, backend_port: int,
               args: argparse.Namespace) -> Server:
    d.mkdir()
    port = hb.free_port()
    rules = hb.make_rules(args.rules)
    log = d / "access.log"
    if proxy == "nginx":
        text = hb.render("nginx_proxy.conf", DIR=str(d), PORT=str(port),
                         BACKEND_PORT=str(backend_port), USER=hb._nginx_user(),
                         RULES=hb.nginx_rules(rules),
                         ACCESS_LOG="access_log off;" if args.no_access_log
                         else f"access_log {log} combined buffer=64k flush=1s;")
        text = _replace_once(text, "worker_processes 1;", f"worker_processes {workers};")
        if workers > 1 and not args.nginx_shared_socket:  # lbproxy's accept model
            text = _replace_once(text, "backlog=4096;", "backlog=4096 reuseport;")
        conf = d / "nginx.conf"
        argv = ["nginx", "-p", str(d), "-e", str(d / "error.log"), "-c", str(conf)]
    else:
        text = hb.lbproxy_config(rules, port, backend_port, d, not args.no_access_log)
        text = f"workers = {workers}\n" + text  # explicit: lbproxy's default is a worker per core
        conf = d / "lbproxy.toml"
        argv = [str(hb.LBPROXY), "run", "-c", str(conf), "--log-level", "warning"]
    conf.write_text(text)
    server = _launch(proxy, argv, cores, d, args, _expected(proxy, workers),
                     lambda p: hb.wait_ready(p, port, PATH, SIZE), log)
    return replace(server, port=port)


def start_answering(proxy: str, workers: int, cores: str, d: Path, args: argparse.Namespace,
                    *, tls: bool = True) -> Server:
    """tls_bench's servers (a 3-byte answer of their own), given `workers`; with `tls` False the
    same servers over plain HTTP (the pipelined variant: tls_bench's configs less their TLS).
    `d` holds tls_bench's certificate files and state directory."""
    port = hb.free_port()
    listen = f"{port} ssl;" if tls else f"{port};"
    if proxy == "nginx":
        text = tb.NGINX_CONF.format(workdir=d, port=port, ciphers=tb.CIPHERS)
        text = _replace_once(text, "worker_processes 1;", f"worker_processes {workers};")
        if not tls:
            text = _replace_once(text, f"{port} ssl;", listen)
            text = "\n".join(line for line in text.split("\n") if "ssl_" not in line)
        if workers > 1 and not args.nginx_shared_socket:
            text = _replace_once(text, listen, listen[:-1] + " reuseport;")
        conf = d / "nginx.conf"
        argv = ["nginx", "-c", str(conf), "-p", str(d)]
    else:
        text = tb.LBPROXY_CONF.format(workdir=d, port=port, ciphers=tb.CIPHERS)
        if not tls:
            text = _replace_once(text, 'protocol = "https"\n', "")
            text = _replace_once(
                text, f'tls = {{ certificates = ["bench"], ciphers = "{tb.CIPHERS}" }}\n', "")
        text = f"workers = {workers}\n" + text  # explicit: lbproxy's default is a worker per core
        conf = d / "lbproxy.toml"
        argv = [str(tb.LBPROXY), "run", "-c", str(conf), "--log-level", "warning"]
    conf.write_text(text)
    ready: Callable[[hb.Proc], None] = (
        (lambda p: tb.wait_ready(p, port)) if tls
        else (lambda p: hb.wait_ready(p, port, "/", len(PIPELINE_BODY))))
    server = _launch(proxy, argv, cores, d, args, _expected(proxy, workers), ready, None)
    return replace(server, port=port)


# -- measurement ---------------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class Sample:
    # "http" (through the proxy to the backend) | "https" (TLS, own answer) | "pipelined"
    # (plain HTTP, own answer, PIPELINE_DEPTH requests per wrk write)
    variant: str
    rig: str
    proxy: str
    workers: int
    run: int
    rps: float = 0.0
    requests: int = 0
    p99_us: float = 0.0
    cpu_us_per_req: float = 0.0  # the server's process tree, user+sys
    server_cores: float = 0.0  # the tree's CPU seconds per wall second (1.0 = one core)
    per_process: tuple[float, ...] = ()  # the same per process, root first
    backend_cores: float = 0.0
    wrk_cores: float = 0.0
    softirq_cores: float = 0.0  # both cores in irq/softirq (loopback stack, charged to nobody)
    noise_cores: float = 0.0  # both cores running anything but server, backend and wrk
    errors: int = 0  # socket errors + non-2xx
    warmup_requests: int = 0
    log_lines: int = 0  # access-log lines written, warm-up included (proves logging was on)
    error: str = ""


def measure(server: Server, key: Sample, seconds: int, warmup: int, backend: hb.Running | None,
            nice: int) -> Sample:
    def load(s: int) -> hb.WrkResult:
        if key.variant == "https":
            return tb.run_wrk_https(server.port, s, nice)
        if key.variant == "pipelined":
            return hb.run_wrk(server.port, "/", CONNECTIONS, THREADS, s, nice,
                              (str(PIPELINE_SCRIPT), str(PIPELINE_DEPTH)))
        return hb.run_wrk(server.port, PATH, CONNECTIONS, THREADS, s, nice)

    warm = load(warmup)
    c0 = hb.core_times()
    r0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    p0 = [hb.cpu_seconds(p) for p in server.pids]
    b0 = hb.cpu_seconds(backend.measured_pid) if backend else 0.0
    t0 = time.monotonic()
    w = load(seconds)
    try:
        p1 = [hb.cpu_seconds(p) for p in server.pids]
    except OSError:
        return replace(key, error=f"a {key.proxy} process exited during the run\n"
                                  f"{server.proc.stderr_tail()}")
    b1 = hb.cpu_seconds(backend.measured_pid) if backend else 0.0
    wall = time.monotonic() - t0
    r1 = resource.getrusage(resource.RUSAGE_CHILDREN)  # only wrk was reaped in between
    c1 = hb.core_times()
    shares = [hb.core_share(c0, c1, core) for core in sorted(c1)]
    server_cpu = sum(p1) - sum(p0)
    wrk_cpu = (r1.ru_utime + r1.ru_stime) - (r0.ru_utime + r0.ru_stime)
    known = server_cpu + (b1 - b0) + wrk_cpu
    return replace(
        key, rps=w.rps, requests=w.requests, warmup_requests=warm.requests, p99_us=w.p99_us,
        cpu_us_per_req=server_cpu / max(1, w.requests) * 1e6, server_cores=server_cpu / wall,
        per_process=tuple((b - a) / wall for a, b in zip(p0, p1, strict=True)),
        backend_cores=(b1 - b0) / wall, wrk_cores=wrk_cpu / wall,
        softirq_cores=sum(si for _, si in shares),
        noise_cores=max(0.0, sum(t for t, _ in shares) - known / wall),
        errors=w.socket_errors + w.non_2xx)


def fmt(s: Sample) -> str:
    if s.error:
        return "ERROR " + s.error.splitlines()[0][:90]
    split = "/".join(f"{c:.2f}" for c in s.per_process)
    err = f"  errors {s.errors}" if s.errors else ""
    return (f"{s.rps:8.0f} req/s  p99 {s.p99_us / 1e3:6.2f} ms  {s.cpu_us_per_req:5.1f} us CPU/req"
            f"  server {s.server_cores:.2f} cores ({split})  backend {s.backend_cores:.2f}"
            f"  wrk {s.wrk_cores:.2f}  softirq {s.softirq_cores:.2f}  noise {s.noise_cores:.2f}"
            f"{err}")


Key = tuple[str, str, str, int]  # variant, rig, proxy, workers


def plan(args: argparse.Namespace) -> list[Key]:
    keys: list[Key] = [("http", rig, p, w) for rig in args.rigs for w in WORKERS for p in PROXIES]
    if not args.no_https:
        keys += [("https", rig, p, w) for rig in args.rigs for w in WORKERS for p in PROXIES]
    if not args.no_pipelined:
        keys += [("pipelined", rig, p, w) for rig in args.rigs for w in WORKERS for p in PROXIES]
    return keys


def run_all(args: argparse.Namespace, workdir: Path) -> list[Sample]:
    """Every configuration of plan() once per run, each server started and stopped around its
    own measurement; a worker count lbproxy does not provide is tried once, then skipped."""
    samples: list[Sample] = []
    skip: dict[Key, str] = {}
    backend_port = hb.free_port()
    backend = hb.start_backend(workdir, backend_port, args.nice)
    try:
        tls_dir = workdir / "tls"
        (tls_dir / "tmp").mkdir(parents=True)
        if not args.no_https:
            try:
                tb.make_certificate(tls_dir)
            except Exception as e:  # e.g. an lbproxy package that does not import
                raise RuntimeError(f"making the HTTPS certificate: {e!r}") from e
        keys = plan(args)
        for run in range(args.runs):
            for key in keys if run % 2 == 0 else keys[::-1]:
                variant, rig, proxy, workers = key
                base = Sample(variant, rig, proxy, workers, run)
                label = f"  {variant:9} {rig:6} {proxy:7} w{workers}"
                if key in skip:
                    samples.append(replace(base, error=skip[key]))
                    continue
                d = workdir / f"{variant}-{rig}-{proxy}-w{workers}-r{run}"
                try:
                    if variant == "http":
                        server = start_http(proxy, workers, RIGS[rig], d, backend_port, args)
                    else:  # the servers answer themselves, over TLS or (pipelined) not
                        server = start_answering(proxy, workers, RIGS[rig], tls_dir, args,
                                                 tls=variant == "https")
                except RuntimeError as e:
                    why = str(e)[:2000]
                    if proxy == "lbproxy" and workers > 1:  # not landed or rejected: once
                        skip.update({k: f"lbproxy workers = {workers} unavailable: {why}"
                                     for k in keys if k[2:] == (proxy, workers)})
                    samples.append(replace(base, error=why))
                    print(f"{label}  FAILED to start: {why.splitlines()[0][:100]}", flush=True)
                    continue
                try:
                    seconds = args.https_duration if variant == "https" else args.duration
                    s = measure(server, base, seconds, args.warmup,
                                backend if variant == "http" else None, args.nice)
                except (RuntimeError, ValueError, OSError) as e:
                    s = replace(base, error=str(e)[:2000])
                finally:
                    server.stop()
                if server.access_log is not None:
                    s = replace(s, log_lines=hb.count_lines(server.access_log))
                    if not args.keep:  # ~100 bytes per request: do not fill /tmp
                        with contextlib.suppress(OSError):
                            server.access_log.unlink()
                samples.append(s)
                print(f"{label}  {fmt(s)}", flush=True)
    finally:
        backend.proc.stop()
    return samples


# -- summary -------------------------------------------------------------------------------------

def median(samples: Sequence[Sample]) -> Sample | None:
    """Each figure's median over the runs that measured (figures may come from different runs)."""
    ok = [s for s in samples if not s.error]
    if not ok:
        return None

    def med(field: str) -> float:
        return float(statistics.median(getattr(s, field) for s in ok))

    per_process = tuple(statistics.median(col) for col in zip(*(s.per_process for s in ok),
                                                               strict=False))
    return replace(ok[0], run=-1, rps=med("rps"), requests=int(med("requests")),
                   p99_us=med("p99_us"), cpu_us_per_req=med("cpu_us_per_req"),
                   server_cores=med("server_cores"), per_process=per_process,
                   backend_cores=med("backend_cores"), wrk_cores=med("wrk_cores"),
                   softirq_cores=med("softirq_cores"), noise_cores=med("noise_cores"),
                   errors=sum(s.errors for s in ok), log_lines=int(med("log_lines")))


@dataclass(frozen=True, slots=True)
class Verdict:
    variant: str
    rig: str
    what: str
    value: float | None
    bar: float | None  # None: a figure printed for reading, not a bar
    verdict: str  # PASS | FAIL | n/a | info
    detail: str = ""


def _check(variant: str, rig: str, what: str, value: float | None, bar: float | None,
           detail: str = "") -> Verdict:
    if bar is None:
        return Verdict(variant, rig, what, value, None, "info", detail)
    if value is None:
        return Verdict(variant, rig, what, None, bar, "n/a", detail)
    return Verdict(variant, rig, what, value, bar, "PASS" if value >= bar else "FAIL", detail)


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a and b else None


def verdicts(med: dict[Key, Sample | None], samples: Sequence[Sample], args: argparse.Namespace
             ) -> list[Verdict]:
    out: list[Verdict] = []
    groups = dict.fromkeys((v, r) for v, r, _, _ in plan(args))
    for variant, rig in groups:
        def get(proxy: str, w: int, field: str) -> float | None:
            s = med.get((variant, rig, proxy, w))  # noqa: B023  (used within this iteration)
            return float(getattr(s, field)) if s else None

        for w in WORKERS:
            pairs = [_ratio(lb.rps, ng.rps) for lb in samples for ng in samples
                     if (lb.variant, lb.rig, lb.proxy, lb.workers) == (variant, rig, "lbproxy", w)
                     and (ng.variant, ng.rig, ng.proxy, ng.workers) == (variant, rig, "nginx", w)
                     and lb.run == ng.run and not lb.error and not ng.error]
            out.append(_check(variant, rig, f"lbproxy/nginx req/s, workers {w}",
                              _ratio(get("lbproxy", w, "rps"), get("nginx", w, "rps")),
                              MIN_PEER_RATIO,
                              "runs " + " ".join(f"x{p:.2f}" for p in pairs if p) if pairs else ""))
            out.append(_check(variant, rig, f"lbproxy/nginx requests per CPU-second, workers {w}",
                              _ratio(get("nginx", w, "cpu_us_per_req"),
                                     get("lbproxy", w, "cpu_us_per_req")), MIN_PEER_RATIO))
        lo, hi = WORKERS[0], WORKERS[-1]
        for proxy in ("lbproxy", "nginx"):
            scaling = _ratio(get(proxy, hi, "rps"), get(proxy, lo, "rps"))
            bar = MIN_SCALING if proxy == "lbproxy" and rig == "shared" else None
            out.append(_check(variant, rig, f"{proxy} workers {hi}/{lo} req/s", scaling, bar))
            per_core = _ratio(get(proxy, lo, "cpu_us_per_req"), get(proxy, hi, "cpu_us_per_req"))
            out.append(_check(variant, rig, f"{proxy} per-core throughput workers {hi}/{lo} "
                              "(CPU/req w1 / w2)", per_core, None))
            out.append(_check(variant, rig, f"{proxy} projected scaling with a core per worker "
                              f"({hi} x per-core ratio; not measured)",
                              hi * per_core if per_core else None, None))
    return out


def print_summary(med: dict[Key, Sample | None], vs: Sequence[Verdict]) -> None:
    print(f"\nmedians ({'variant':7} rig, server, workers):")
    for (variant, rig, proxy, w), s in med.items():
        print(f"  {variant:9} {rig:6} {proxy:7} w{w}  " + (fmt(s) if s else "no measurement"))
    print()
    for v in vs:
        value = f"x{v.value:.2f}" if v.value is not None else "n/a"
        bar = f" (bar >= {v.bar})" if v.bar is not None else ""
        tag = "" if v.verdict == "info" else f" -> {v.verdict}"
        detail = f"  ({v.detail})" if v.detail else ""
        print(f"  {v.variant:9} {v.rig:6} {v.what}: {value}{bar}{tag}{detail}")


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument("--runs", type=int, default=3, help="repetitions; figures are medians")
    ap.add_argument("--duration", type=int, default=5, help="seconds per HTTP measurement")
    ap.add_argument("--https-duration", type=int, default=3, help="seconds per HTTPS measurement")
    ap.add_argument("--quick", action="store_true", help="1 run, 2 s measurements (smoke run)")
    ap.add_argument("--rigs", default="pinned,shared", help="subset of " + ",".join(RIGS))
    ap.add_argument("--no-https", action="store_true", help="skip the HTTPS variant")
    ap.add_argument("--no-pipelined", action="store_true", help="skip the pipelined variant")
    ap.add_argument("--rules", type=int, default=99, help="non-matching content rules "
                    "(http_bench's realistic config has 99)")
    ap.add_argument("--no-access-log", action="store_true", help="servers log nothing")
    ap.add_argument("--nice", type=int, default=0, help="autogroup nice of every process started "
                    "(e.g. -10 as root) to shield the figures from other work on the machine")
    ap.add_argument("--nginx-shared-socket", action="store_true",
                    help="nginx workers share one listening socket (its default) instead of "
                         "`reuseport`, a socket per worker like lbproxy's")
    ap.add_argument("--lbproxy-src", type=Path, default=REPO,
                    help="directory holding the lbproxy/ and acmeclient/ packages to run, e.g. "
                         "`git archive HEAD lbproxy acmeclient | tar -x -C DIR`, so that edits "
                         "to the checkout during a run do not change the code measured")
    ap.add_argument("--keep", action="store_true", help="keep the temp dir (configs, logs)")
    args = ap.parse_args(argv)
    if args.quick:
        args.runs, args.duration, args.https_duration = 1, 2, 2
    args.warmup = max(1, args.duration // 5)
    args.rigs = [r.strip() for r in args.rigs.split(",") if r.strip()]
    if not set(args.rigs) <= set(RIGS) or not args.rigs:
        ap.error(f"--rigs: choose from {', '.join(RIGS)}")
    if not 1 <= args.runs <= 20 or not 1 <= args.duration <= 120 \
            or not 1 <= args.https_duration <= 120:
        ap.error("--runs must be 1..20, durations 1..120 s")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if (os.cpu_count() or 0) < 2:
        print("needs at least 2 CPUs")
        return 2
    for tool in ("wrk", "taskset", "nginx"):
        if shutil.which(tool) is None:
            print(f"{tool} not found (dev.sh test installs the rig)")
            return 2
    why = hb.peer_available("lbproxy")
    if why:
        print(why)
        return 2
    started = dt.datetime.now(dt.UTC)
    load_before = os.getloadavg()
    command = "bench/workers_bench.py " + " ".join(sys.argv[1:] if argv is None else argv)
    print(f"{started:%Y-%m-%d %H:%M} UTC  {hb.git_head()}"
          + ("" if args.lbproxy_src == REPO else f"  (lbproxy from {args.lbproxy_src})"))
    print(f"wrk -t{THREADS} -c{CONNECTIONS}, {args.duration} s (HTTPS {args.https_duration} s) "
          f"after {args.warmup} s warm-up; {args.runs} run(s); rigs {', '.join(args.rigs)} "
          f"(server cores {', '.join(RIGS[r] for r in args.rigs)}; wrk + backend on core "
          f"{hb.RIG_CORE}); nice {args.nice}; load average {load_before[0]:.2f}")
    print("per line: server cores = the process tree's CPU (root/workers...); noise = cores "
          "busy with anything but server, backend and wrk")
    workdir = Path(tempfile.mkdtemp(prefix="lbproxy-workers-bench-"))
    try:
        with hb.sigterm_as_interrupt():
            samples = run_all(args, workdir)
    except KeyboardInterrupt:
        print("interrupted; servers stopped")
        return 130
    except RuntimeError as e:
        print(f"rig failed: {e}")
        return 2
    finally:
        if args.keep:
            print(f"kept {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    med: dict[Key, Sample | None] = {
        k: median([s for s in samples if (s.variant, s.rig, s.proxy, s.workers) == k])
        for k in plan(args)}
    vs = verdicts(med, samples, args)
    print_summary(med, vs)
    load_after = os.getloadavg()
    lost = [s for s in samples if s.variant == "http" and not s.error
            and s.log_lines < LOG_LINES_MIN * (s.requests + s.warmup_requests)]
    for s in lost:
        print(f"WARNING: {s.rig} {s.proxy} w{s.workers} run {s.run}: {s.log_lines} access-log "
              f"lines for {s.requests + s.warmup_requests} requests (warm-up included)")
    print(f"\nload average before/after: {load_before[0]:.2f} / {load_after[0]:.2f}")
    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / "workers_bench.json"
    out.write_text(json.dumps({
        "date": started.isoformat(), "command": command, "git": hb.git_head(),
        "versions": hb.versions(), "args": vars(args), "cpu_count": os.cpu_count(),
        "loadavg": {"before": load_before, "after": load_after},
        "median": [{"key": list(k), **asdict(s)} for k, s in med.items() if s],
        "verdicts": [asdict(v) for v in vs], "samples": [asdict(s) for s in samples],
    }, indent=2, default=str))
    print(f"results: {out.relative_to(REPO)}")
    return 0 if all(v.verdict == "PASS" for v in vs if v.bar is not None) else 1


if __name__ == "__main__":
    sys.exit(main())
