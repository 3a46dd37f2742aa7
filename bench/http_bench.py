"""HTTP proxy throughput benchmark: lbproxy against nginx and HAProxy on one pinned core (issue 2).

Rig: the proxy under test on core 0 (`taskset -c 0`); wrk and one nginx backend serving fixed
100-byte and 4 KiB bodies on core 1; loopback only. Each proxy runs the same realistic config:
100 content rules (99 that do not match the benchmark URL, then the one that does) and an access
log written to a file. For every (body size x connection count) cell wrk measures requests/s and
p99 latency, and /proc gives the proxy's CPU time per request (user+sys). Prints a table with
lbproxy/nginx ratios and PASS/FAIL against the bars (>= 0.8x nginx req/s, p99 <= 1.5x nginx;
CPU per request <= 1.1x nginx's, issue 17), lbproxy's CPU per request against `nginx-bare` (the
same nginx without rules and access log) as a reading, and writes JSON to bench/results/.

    .venv/bin/python bench/http_bench.py [--duration S] [--quick] [--rounds N] [--only a,b]
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime as dt
import http.client
import json
import logging
import os
import re
import resource
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

logger = logging.getLogger(__name__)

BENCH_DIR = Path(__file__).resolve().parent
REPO = BENCH_DIR.parent
PEERS = BENCH_DIR / "peers"
RESULTS = BENCH_DIR / "results"
LBPROXY = REPO / ".venv" / "bin" / "lbproxy"

PROXY_CORE = 0
RIG_CORE = 1  # wrk and the backend share the other core

# The bar of issue 2.
MIN_RPS_RATIO = 0.8
MAX_P99_RATIO = 1.5
# Issue 17: lbproxy's CPU per request against nginx's, same config, same cell.
MAX_CPU_RATIO = 1.1

SIZES = {"100B": ("/bench/100", 100), "4KiB": ("/bench/4k", 4096)}
CONNECTIONS = (64, 256)
# "lean" is a calibration floor (bench/peers/lean_proxy.py: no rules, no log), not a peer.
# nginx-bare: the same nginx without the rules and the access log (a floor for nginx itself).
PROXIES = ("nginx", "nginx-bare", "haproxy", "lbproxy", "lean")

# Deadlines (seconds). A proxy that does not answer within READY_TIMEOUT is reported as failed.
READY_TIMEOUT = 20.0
STOP_TIMEOUT = 5.0
PROBE_TIMEOUT = 2.0
# wrk gets its duration plus this much before it is killed (connect storms, slow teardown).
WRK_GRACE = 30.0
# wrk's own per-request timeout; a response slower than this counts as a timeout error.
WRK_REQUEST_TIMEOUT = "4s"

CLK_TCK = os.sysconf("SC_CLK_TCK")
# Other work taking more than this share of the proxy's core marks a cell as disturbed.
NOISY = 0.10


# ---------------------------------------------------------------------------------------------
# Rules: one description rendered into each proxy's config language.


@dataclass(frozen=True, slots=True)
class Rule:
    name: str
    kind: str  # "prefix" | "postfix" | "regex"
    pattern: str  # prefix/suffix text, or a regex


def make_rules(count: int = 99) -> tuple[Rule, ...]:
    """`count` rules that never match /bench/...: 3/5 prefix, 1/5 postfix, 1/5 regex."""
    rules = []
    for i in range(count):
        if i % 5 == 3:
            rules.append(Rule(f"r{i:03d}", "postfix", f".ext{i}"))
        elif i % 5 == 4:
            rules.append(Rule(f"r{i:03d}", "regex", f"^/api/v[0-9]+/item{i}/"))
        else:
            rules.append(Rule(f"r{i:03d}", "prefix", f"/svc{i}/"))
    return tuple(rules)


def nginx_rules(rules: Sequence[Rule]) -> str:
    lines = []
    for r in rules:
        if r.kind == "prefix":
            loc = r.pattern
        elif r.kind == "postfix":
            loc = "~ " + re.escape(r.pattern) + "$"
        else:
            loc = "~ " + r.pattern
        lines.append(f"        location {loc} {{ proxy_pass http://unused; }}")
    return "\n".join(lines)


def haproxy_rules(rules: Sequence[Rule]) -> str:
    fetch = {"prefix": "path_beg", "postfix": "path_end", "regex": "path_reg"}
    acls = [f"    acl {r.name} {fetch[r.kind]} {r.pattern}" for r in rules]
    uses = [f"    use_backend be_unused if {r.name}" for r in rules]
    return "\n".join(acls + uses)


def _toml_str(s: str) -> str:
    return json.dumps(s)  # a JSON string literal is a valid TOML basic string


def lbproxy_config(rules: Sequence[Rule], port: int, backend_port: int, workdir: Path,
                   access_log: bool = True) -> str:
    """One VS with content switching: the 99 non-matching rules spread over 9 SubVSs pointing at
    a dead port, then the SubVS 'bench' (rule /bench/ prefix, last in precedence) -> backend."""
    out = [
        f"state_dir = {_toml_str(str(workdir / 'state'))}",
        "",
        "[admin]",
        "enabled = false",
        "",
        "[access_log]",
        f"enabled = {'true' if access_log else 'false'}",
        f"path = {_toml_str(str(workdir / 'access.log'))}",
        "",
    ]
    for r in rules:
        out += ["[[rule]]", f'name = "{r.name}"', f'match = "{r.kind}"',
                f"pattern = {_toml_str(r.pattern)}", 'on = "url"', ""]
    out += ["[[rule]]", 'name = "bench"', 'match = "prefix"', 'pattern = "/bench/"',
            'on = "url"', ""]
    out += ["[[vs]]", 'name = "bench"', f'listen = "127.0.0.1:{port}"', 'protocol = "http"',
            "content_switching = true", "",
            # nginx and HAProxy run no active checks in this bench either.
            "[vs.health_check]", 'type = "none"', ""]
    groups = 9
    for g in range(groups):
        names = ", ".join(f'"{r.name}"' for r in rules[g::groups])
        out += ["[[vs.subvs]]", f'name = "other{g}"', f"rules = [{names}]", "",
                "[[vs.subvs.real_servers]]", 'address = "127.0.0.1:9"', ""]
    out += ["[[vs.subvs]]", 'name = "bench"', 'rules = ["bench"]', "",
            "[[vs.subvs.real_servers]]", f'address = "127.0.0.1:{backend_port}"', ""]
    return "\n".join(out)


def render(template: str, **values: str) -> str:
    text = (PEERS / template).read_text()
    for key, value in values.items():
        text = text.replace(f"@{key}@", value)
    leftover = re.findall(r"@[A-Z_0-9]+@", text)
    if leftover:
        raise RuntimeError(f"{template}: unfilled placeholders {sorted(set(leftover))}")
    return text


# ---------------------------------------------------------------------------------------------
# Processes and /proc.


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


class Proc:
    """A child in its own process group, pinned to one core; stop() kills the whole group."""

    def __init__(self, name: str, argv: Sequence[str], core: int, workdir: Path,
                 stdout_path: Path | None = None, nice: int = 0,
                 env: dict[str, str] | None = None) -> None:
        self.name = name
        self.stdout_path = stdout_path or workdir / f"{name}.stdout"
        self.stderr_path = workdir / f"{name}.stderr"
        self._out = open(self.stdout_path, "wb")  # closed in stop()
        self._err = open(self.stderr_path, "wb")
        self.popen = subprocess.Popen(
            [*_nice(nice), "taskset", "-c", str(core), *argv], cwd=workdir,
            stdin=subprocess.DEVNULL, stdout=self._out, stderr=self._err,
            start_new_session=True, env=env)
        set_autogroup_nice(self.popen.pid, nice)

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def stderr_tail(self, n: int = 2000) -> str:
        try:
            return self.stderr_path.read_bytes()[-n:].decode(errors="replace")
        except OSError:
            return ""

    def stop(self) -> None:
        for sig, wait in ((signal.SIGTERM, STOP_TIMEOUT), (signal.SIGKILL, STOP_TIMEOUT)):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.popen.pid, sig)
            try:
                self.popen.wait(wait)
                break
            except subprocess.TimeoutExpired:
                continue
        # Stragglers in the group (nginx workers) after the leader exited.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.popen.pid, signal.SIGKILL)
        self._out.close()
        self._err.close()


def _nice(n: int) -> list[str]:
    return ["nice", "-n", str(n)] if n else []


def set_autogroup_nice(pid: int, nice: int) -> None:
    """With sched_autogroup (Debian's default) CPU is shared between sessions first, so a
    process's own nice value only ranks it inside its session; each child here runs in its own
    session, whose weight is set through /proc/<pid>/autogroup."""
    if nice:
        with contextlib.suppress(OSError):
            Path(f"/proc/{pid}/autogroup").write_text(str(nice))


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process (all its threads) from /proc/<pid>/stat."""
    raw = Path(f"/proc/{pid}/stat").read_text()
    fields = raw[raw.rindex(")") + 2:].split()
    # After "pid (comm) ": state ppid pgrp session tty tpgid flags minflt cminflt majflt
    # cmajflt utime stime ... -> utime is index 11, stime index 12.
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def children(pid: int) -> list[int]:
    out = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            raw = (entry / "stat").read_text()
        except OSError:
            continue
        if int(raw[raw.rindex(")") + 2:].split()[1]) == pid:
            out.append(int(entry.name))
    return out


def find_worker(proc: Proc, deadline: float) -> int:
    """nginx: the single worker process under the master."""
    while time.monotonic() < deadline:
        kids = children(proc.pid)
        if kids:
            return min(kids)
        if not proc.alive():
            break
        time.sleep(0.05)
    raise RuntimeError(f"{proc.name}: no worker process appeared\n{proc.stderr_tail()}")


@dataclass(frozen=True, slots=True)
class CoreTicks:
    """One CPU's counters from /proc/stat (clock ticks)."""

    task: int  # user + nice + system + steal: time spent running processes
    softirq: int  # irq + softirq: mostly the loopback network stack, not charged to a process
    total: int


def core_times() -> dict[int, CoreTicks]:
    out = {}
    for line in Path("/proc/stat").read_text().splitlines():
        m = re.match(r"cpu(\d+) (.*)", line)
        if m:
            user, nice, system, idle, iowait, irq, softirq, steal = (
                int(x) for x in m.group(2).split()[:8])
            out[int(m.group(1))] = CoreTicks(user + nice + system + steal, irq + softirq,
                                             user + nice + system + idle + iowait + irq + softirq
                                             + steal)
    return out


def core_share(before: dict[int, CoreTicks], after: dict[int, CoreTicks], core: int
               ) -> tuple[float, float]:
    """(process share, irq+softirq share) of one core between two readings."""
    b, a = before.get(core), after.get(core)
    if a is None or b is None or a.total <= b.total:
        return 0.0, 0.0
    span = a.total - b.total
    return (a.task - b.task) / span, (a.softirq - b.softirq) / span


def probe(port: int, path: str, timeout: float = PROBE_TIMEOUT) -> tuple[int, int]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request("GET", path)
        resp = conn.getresponse()
        return resp.status, len(resp.read())
    finally:
        conn.close()


def wait_ready(proc: Proc, port: int, path: str, size: int, timeout: float = READY_TIMEOUT) -> None:
    deadline = time.monotonic() + timeout
    last = "no answer"
    while time.monotonic() < deadline:
        if not proc.alive():
            raise RuntimeError(f"{proc.name} exited with {proc.popen.returncode}\n"
                               f"{proc.stderr_tail()}")
        try:
            status, n = probe(port, path)
            if status == 200 and n == size:
                return
            last = f"status {status}, {n} bytes"
        except OSError as e:
            last = str(e)
        time.sleep(0.1)
    raise RuntimeError(f"{proc.name} not ready on port {port} after {timeout}s ({last})\n"
                       f"{proc.stderr_tail()}")


# ---------------------------------------------------------------------------------------------
# wrk.

_UNIT_US = {"us": 1.0, "ms": 1e3, "s": 1e6, "m": 60e6, "h": 3600e6}


def _to_us(text: str) -> float:
    m = re.fullmatch(r"([\d.]+)(us|ms|s|m|h)", text)
    if not m:
        raise ValueError(f"unparsable wrk latency {text!r}")
    return float(m.group(1)) * _UNIT_US[m.group(2)]


@dataclass(frozen=True, slots=True)
class WrkResult:
    rps: float
    requests: int
    seconds: float
    p50_us: float
    p75_us: float
    p90_us: float
    p99_us: float
    socket_errors: int
    non_2xx: int
    cpu_seconds: float = 0.0  # wrk's own user+sys


def parse_wrk(text: str) -> WrkResult:
    m_req = re.search(r"(\d+) requests in ([\d.]+)(us|ms|s|m)", text)
    m_rps = re.search(r"Requests/sec:\s+([\d.]+)", text)
    if not m_req or not m_rps:
        raise ValueError(f"unparsable wrk output:\n{text}")
    pct = {int(p): _to_us(v) for p, v in
           re.findall(r"^\s+(50|75|90|99)(?:\.\d+)?%\s+(\S+)\s*$", text, re.M)}
    if set(pct) != {50, 75, 90, 99}:
        raise ValueError(f"no latency distribution in wrk output (ran without --latency?):\n{text}")
    errs = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", text)
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", text)
    return WrkResult(
        rps=float(m_rps.group(1)),
        requests=int(m_req.group(1)),
        seconds=_to_us(m_req.group(2) + m_req.group(3)) / 1e6,
        p50_us=pct[50], p75_us=pct[75], p90_us=pct[90], p99_us=pct[99],
        socket_errors=sum(int(x) for x in errs.groups()) if errs else 0,
        non_2xx=int(non2xx.group(1)) if non2xx else 0,
    )


def run_wrk(port: int, path: str, conns: int, threads: int, seconds: int,
            nice: int = 0, script: Sequence[str] = ()) -> WrkResult:
    """wrk against 127.0.0.1:port; `script`: a Lua script and its arguments (`-s S URL -- A`)."""
    lua = ["-s", script[0]] if script else []
    argv = [*_nice(nice), "taskset", "-c", str(RIG_CORE), "wrk", "--latency", f"-t{threads}",
            f"-c{conns}", f"-d{seconds}s", f"--timeout={WRK_REQUEST_TIMEOUT}", *lua,
            f"http://127.0.0.1:{port}{path}", *(["--", *script[1:]] if script else [])]
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    set_autogroup_nice(proc.pid, nice)
    try:
        out, err = proc.communicate(timeout=seconds + WRK_GRACE)
    finally:
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(STOP_TIMEOUT)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)  # only wrk was reaped in between
    if proc.returncode != 0:
        raise RuntimeError(f"wrk failed ({proc.returncode}): {err or out}")
    cpu = (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime)
    return dataclasses.replace(parse_wrk(out), cpu_seconds=cpu)


# ---------------------------------------------------------------------------------------------
# The proxies.


@dataclass(frozen=True, slots=True)
class Running:
    proc: Proc
    measured_pid: int  # the process whose CPU time is the proxy's (nginx: the worker)
    access_log: Path


def start_backend(workdir: Path, port: int, nice: int = 0) -> Running:
    d = workdir / "backend"
    d.mkdir()
    conf = d / "nginx.conf"
    www = d / "www" / "bench"
    www.mkdir(parents=True)
    for path, size in SIZES.values():
        (www / path.rsplit("/", 1)[1]).write_bytes(b"x" * size)
    conf.write_text(render("nginx_backend.conf", DIR=str(d), PORT=str(port), USER=_nginx_user()))
    proc = Proc("backend", ["nginx", "-p", str(d), "-e", str(d / "error.log"), "-c", str(conf)],
                RIG_CORE, d, nice=nice)
    try:
        wait_ready(proc, port, "/bench/100", 100)
        return Running(proc, find_worker(proc, time.monotonic() + READY_TIMEOUT),
                       d / "no-access.log")
    except BaseException:
        proc.stop()
        raise


def _nginx_user() -> str:
    # As root, nginx would drop its worker to 'nobody', which cannot enter our 0700 temp dir.
    return "user root;" if os.geteuid() == 0 else ""


def start_proxy(name: str, workdir: Path, port: int, backend_port: int,
                rules: Sequence[Rule], access_log: bool = True, nice: int = 0,
                lbproxy_src: Path = REPO) -> Running:
    d = workdir / name
    d.mkdir()
    log = d / "access.log"
    if name in ("nginx", "nginx-bare"):
        if name == "nginx-bare":
            rules, access_log = (), False
        conf = d / "nginx.conf"
        conf.write_text(render("nginx_proxy.conf", DIR=str(d), PORT=str(port),
                               BACKEND_PORT=str(backend_port), USER=_nginx_user(),
                               RULES=nginx_rules(rules),
                               ACCESS_LOG=f"access_log {log} combined buffer=64k flush=1s;"
                               if access_log
                               else "access_log off;"))
        proc = Proc(name, ["nginx", "-p", str(d), "-e", str(d / "error.log"), "-c", str(conf)],
                    PROXY_CORE, d, nice=nice)
    elif name == "haproxy":
        conf = d / "haproxy.cfg"
        conf.write_text(render("haproxy.cfg", PORT=str(port), BACKEND_PORT=str(backend_port),
                               RULES=haproxy_rules(rules),
                               LOG="    log global\n    option httplog" if access_log
                               else "    no log"))
        # `log stdout` + stdout redirected to the access log file.
        proc = Proc(name, ["haproxy", "-db", "-f", str(conf)], PROXY_CORE, d, stdout_path=log,
                    nice=nice)
    elif name == "lbproxy":
        conf = d / "lbproxy.toml"
        conf.write_text(lbproxy_config(rules, port, backend_port, d, access_log))
        # PYTHONPATH: import this checkout's packages even if the venv's editable-install finder
        # is stale (it was generated when the packages had no __init__.py, and then resolves
        # `acmeclient` as a namespace package from any directory but the repo root).
        env = {**os.environ, "PYTHONPATH": str(lbproxy_src)}
        # One process on one core, as this bench compares (bench/workers_bench.py: workers);
        # a checkout from before worker processes has no --workers and runs one anyway.
        one = (["--workers", "1"] if "--workers" in
               (lbproxy_src / "lbproxy" / "__main__.py").read_text() else [])
        proc = Proc(name, [str(LBPROXY), "run", "-c", str(conf), "--log-level", "warning",
                           *one], PROXY_CORE, d, nice=nice, env=env)
    elif name == "lean":
        proc = Proc(name, [sys.executable, str(PEERS / "lean_proxy.py"), str(port),
                           str(backend_port)], PROXY_CORE, d, nice=nice)
    else:
        raise ValueError(name)
    try:
        wait_ready(proc, port, "/bench/100", 100)
        wait_ready(proc, port, "/bench/4k", 4096)
        pid = (find_worker(proc, time.monotonic() + READY_TIMEOUT) if name.startswith("nginx")
               else proc.pid)
        return Running(proc, pid, log)
    except BaseException:
        proc.stop()
        raise


def peer_available(name: str) -> str | None:
    """None if the proxy can run, else why not."""
    if name in ("nginx", "nginx-bare", "haproxy"):
        binary = name.split("-")[0]
        return None if shutil.which(binary) else f"{name} binary not found (apt-get install)"
    if name == "lean":
        return None
    if not LBPROXY.exists():
        return f"{LBPROXY} not found"
    try:
        done = subprocess.run([str(LBPROXY), "run", "--help"], capture_output=True, timeout=30,
                              check=False)
    except subprocess.TimeoutExpired:
        return "`lbproxy run --help` timed out"
    if done.returncode != 0:
        return "`lbproxy run` not available: " + done.stderr.decode(errors="replace")[-300:]
    return None


# ---------------------------------------------------------------------------------------------
# Measurement.


@dataclass(frozen=True, slots=True)
class Cell:
    proxy: str
    size: str
    conns: int
    round: int
    rps: float
    requests: int
    p50_us: float
    p99_us: float
    cpu_us_per_req: float  # proxy user+sys per request
    proxy_cpu: float  # proxy CPU seconds / wall seconds (1.0 = its core saturated)
    backend_cpu: float
    core0_tasks: float  # share of core 0 running processes (the proxy and anything else)
    core0_softirq: float  # share of core 0 in irq/softirq (network stack, not in proxy_cpu)
    core1_busy: float  # share of core 1 busy (wrk + backend + softirq + anything else)
    core1_tasks: float  # share of core 1 running processes
    rig_cpu: float  # share of core 1 used by wrk + backend (user+sys)
    errors: int  # socket errors + non-2xx
    error: str = ""  # set when the cell could not be measured

    @property
    def noise(self) -> float:
        """Share of core 0 used by something other than the proxy (other engineers' work)."""
        return max(0.0, self.core0_tasks - self.proxy_cpu)

    @property
    def noise1(self) -> float:
        """Share of core 1 used by something other than wrk, the backend and softirq."""
        return max(0.0, self.core1_tasks - self.rig_cpu)


def failed_cell(proxy: str, size: str, conns: int, rnd: int, why: str) -> Cell:
    return Cell(proxy, size, conns, rnd, rps=0, requests=0, p50_us=0, p99_us=0, cpu_us_per_req=0,
                proxy_cpu=0, backend_cpu=0, core0_tasks=0, core0_softirq=0, core1_busy=0,
                core1_tasks=0, rig_cpu=0, errors=0, error=why[:500] or "failed")


def measure(proxy: str, run: Running, backend: Running, port: int, size: str, conns: int,
            rnd: int, args: argparse.Namespace) -> Cell:
    path, _ = SIZES[size]
    run_wrk(port, path, conns, args.threads, args.warmup, args.nice)
    c0 = core_times()
    p0, b0, t0 = cpu_seconds(run.measured_pid), cpu_seconds(backend.measured_pid), time.monotonic()
    w = run_wrk(port, path, conns, args.threads, args.duration, args.nice)
    p1, b1, t1 = cpu_seconds(run.measured_pid), cpu_seconds(backend.measured_pid), time.monotonic()
    c1 = core_times()
    wall = t1 - t0
    tasks0, si0 = core_share(c0, c1, PROXY_CORE)
    tasks1, si1 = core_share(c0, c1, RIG_CORE)
    return Cell(proxy=proxy, size=size, conns=conns, round=rnd, rps=w.rps, requests=w.requests,
                p50_us=w.p50_us, p99_us=w.p99_us,
                cpu_us_per_req=(p1 - p0) / max(w.requests, 1) * 1e6,
                proxy_cpu=(p1 - p0) / wall, backend_cpu=(b1 - b0) / wall,
                core0_tasks=tasks0, core0_softirq=si0, core1_busy=tasks1 + si1,
                core1_tasks=tasks1, rig_cpu=(b1 - b0 + w.cpu_seconds) / wall,
                errors=w.socket_errors + w.non_2xx)


def count_lines(path: Path) -> int:
    n = 0
    with contextlib.suppress(OSError), open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            n += chunk.count(b"\n")
    return n


@dataclass
class Started:
    """One proxy of a round: running on its own port, or failed to start (`error`)."""

    proxy: str
    port: int
    run: Running | None
    error: str = ""


def start_round(proxies: Sequence[str], workdir: Path, backend_port: int,
                rules: Sequence[Rule], rnd: int, args: argparse.Namespace) -> list[Started]:
    """Start every proxy of a round; each waits, idle, while the others are measured."""
    started = []
    for proxy in proxies:
        port = free_port()
        d = workdir / f"{proxy}-r{rnd}"
        d.mkdir()
        try:
            run = start_proxy(proxy, d, port, backend_port, rules, not args.no_access_log,
                              args.nice, args.lbproxy_src)
        except RuntimeError as e:
            print(f"  {proxy}: FAILED to start: {e}")
            started.append(Started(proxy, port, None, str(e)))
            continue
        started.append(Started(proxy, port, run))
    return started


def stop_round(started: Sequence[Started], args: argparse.Namespace
               ) -> dict[str, dict[str, object]]:
    """Stop a round's proxies; per proxy, how many access-log lines it wrote."""
    infos: dict[str, dict[str, object]] = {}
    for st in started:
        if st.run is None:
            infos[st.proxy] = {"error": st.error[:2000]}
            continue
        st.run.proc.stop()
        # Sanity: the access log really was written (one line per request incl. warm-ups).
        infos[st.proxy] = {"access_log_lines": count_lines(st.run.access_log),
                           "access_log_bytes": _size(st.run.access_log)}
        if not args.keep:
            with contextlib.suppress(OSError):
                st.run.access_log.unlink()  # ~100 bytes per request: do not fill /tmp
    return infos


def measure_round(started: Sequence[Started], backend: Running,
                  cells: Sequence[tuple[str, int]], rnd: int, args: argparse.Namespace
                  ) -> list[Cell]:
    """Every cell, each measured for the proxies one after the other (so that the machine's
    drift, which on a shared VM moves req/s by 20% within minutes, hits the proxies of a cell
    alike); a proxy that died is marked failed for the cells left."""
    results: list[Cell] = []
    for size, conns in cells:
        for st in started:
            if st.run is None or st.error:
                results.append(failed_cell(st.proxy, size, conns, rnd, st.error))
                continue
            try:
                cell = measure(st.proxy, st.run, backend, st.port, size, conns, rnd, args)
            except (RuntimeError, ValueError, subprocess.TimeoutExpired, OSError) as e:
                cell = failed_cell(st.proxy, size, conns, rnd, str(e))
            results.append(cell)
            print(f"  {st.proxy:10} {size:5} c={conns:<4} {fmt_cell(cell)}", flush=True)
            if not st.run.proc.alive():
                st.error = f"{st.proxy} died during the run\n{st.run.proc.stderr_tail()}"
                print(f"  {st.proxy}: FAILED: {st.error}")
    return results


def _size(p: Path) -> int:
    try:
        return p.stat().st_size
    except OSError:
        return 0


def fmt_cell(c: Cell) -> str:
    if c.error:
        return "ERROR " + c.error.splitlines()[0]
    err = f"  errors={c.errors}" if c.errors else ""
    return (f"{c.rps:9.0f} req/s  p50 {c.p50_us / 1e3:6.2f} ms  p99 {c.p99_us / 1e3:6.2f} ms  "
            f"{c.cpu_us_per_req:5.1f} us CPU/req  proxy {c.proxy_cpu:4.0%}  "
            f"noise0 {c.noise:4.0%} si0 {c.core0_softirq:4.0%}  core1 {c.core1_busy:4.0%} "
            f"noise1 {c.noise1:4.0%}{err}")


def median_cell(cells: list[Cell]) -> Cell:
    """Each figure's median over the rounds that ran (the lower median: a value that was
    actually observed), so one disturbed round moves neither req/s nor p99."""
    ok = [c for c in cells if not c.error]
    if not ok:
        return cells[0]
    if len(ok) == 1:
        return ok[0]

    def med(name: str) -> float:
        return float(statistics.median_low(getattr(c, name) for c in ok))

    return Cell(ok[0].proxy, ok[0].size, ok[0].conns, round=-1, rps=med("rps"),
                requests=int(med("requests")), p50_us=med("p50_us"), p99_us=med("p99_us"),
                cpu_us_per_req=med("cpu_us_per_req"), proxy_cpu=med("proxy_cpu"),
                backend_cpu=med("backend_cpu"), core0_tasks=med("core0_tasks"),
                core0_softirq=med("core0_softirq"), core1_busy=med("core1_busy"),
                core1_tasks=med("core1_tasks"), rig_cpu=med("rig_cpu"),
                errors=int(med("errors")))


def verdict(table: dict[tuple[str, str, int], Cell], size: str, conns: int
            ) -> tuple[float | None, float | None, str]:
    lb, ng = table.get(("lbproxy", size, conns)), table.get(("nginx", size, conns))
    if not lb or not ng or lb.error or ng.error or not ng.rps or not ng.p99_us:
        return None, None, "n/a"
    rps_ratio, p99_ratio = lb.rps / ng.rps, lb.p99_us / ng.p99_us
    ok = rps_ratio >= MIN_RPS_RATIO and p99_ratio <= MAX_P99_RATIO and lb.errors == 0
    return rps_ratio, p99_ratio, "PASS" if ok else "FAIL"


def cpu_verdict(table: dict[tuple[str, str, int], Cell], size: str, conns: int, peer: str
                ) -> float | None:
    """lbproxy's CPU per request over `peer`'s in one cell (None if either is missing)."""
    lb, ng = table.get(("lbproxy", size, conns)), table.get((peer, size, conns))
    if not lb or not ng or lb.error or ng.error or not ng.cpu_us_per_req:
        return None
    return lb.cpu_us_per_req / ng.cpu_us_per_req


def round_pairs(all_cells: Sequence[Cell], size: str, conns: int, peer: str = "nginx"
                ) -> list[tuple[Cell, Cell]]:
    """(lbproxy, `peer`) of each round in one cell: the two measurements made next to each other
    (the verdicts use the ratio of the medians; these show how much it moved)."""
    by_round: dict[int, dict[str, Cell]] = {}
    for c in all_cells:
        if (c.size, c.conns) == (size, conns) and not c.error:
            by_round.setdefault(c.round, {})[c.proxy] = c
    pairs = [(r.get("lbproxy"), r.get(peer)) for _, r in sorted(by_round.items())]
    return [(lb, ng) for lb, ng in pairs if lb is not None and ng is not None]


def round_cpu_ratios(all_cells: Sequence[Cell], size: str, conns: int, peer: str
                     ) -> list[float]:
    """lbproxy/`peer` CPU per request of each round."""
    return [lb.cpu_us_per_req / ng.cpu_us_per_req
            for lb, ng in round_pairs(all_cells, size, conns, peer) if ng.cpu_us_per_req]


def round_ratios(all_cells: Sequence[Cell], size: str, conns: int) -> list[tuple[float, float]]:
    """lbproxy/nginx (req/s, p99) of each round."""
    return [(lb.rps / ng.rps, lb.p99_us / ng.p99_us)
            for lb, ng in round_pairs(all_cells, size, conns) if ng.rps and ng.p99_us]


def print_table(table: dict[tuple[str, str, int], Cell], proxies: Sequence[str],
                cells: Sequence[tuple[str, int]], all_cells: Sequence[Cell] = ()
                ) -> list[dict[str, object]]:
    verdicts: list[dict[str, object]] = []
    hdr = (f"{'cell':12} {'proxy':10} {'req/s':>9} {'p50 ms':>7} {'p99 ms':>7} {'us CPU/req':>10} "
           f"{'proxy CPU':>9} {'noise0':>6} {'si0':>5} {'core1':>6} {'noise1':>6} {'errors':>6}")
    print("\n" + hdr)
    print("-" * len(hdr))
    for size, conns in cells:
        label = f"{size} c{conns}"
        for p in proxies:
            c = table.get((p, size, conns))
            if c is None:
                continue
            if c.error:
                print(f"{label:12} {p:10} ERROR {c.error.splitlines()[0][:70]}")
            else:
                print(f"{label:12} {p:10} {c.rps:9.0f} {c.p50_us / 1e3:7.2f} {c.p99_us / 1e3:7.2f} "
                      f"{c.cpu_us_per_req:10.1f} {c.proxy_cpu:9.0%} {c.noise:6.0%} "
                      f"{c.core0_softirq:5.0%} {c.core1_busy:6.0%} {c.noise1:6.0%} "
                      f"{c.errors:6d}")
            label = ""
        rr, pr, v = verdict(table, size, conns)
        if rr is not None and pr is not None:
            print(f"{'':12} lbproxy/nginx: req/s x{rr:.2f} (bar >= {MIN_RPS_RATIO}), "
                  f"p99 x{pr:.2f} (bar <= {MAX_P99_RATIO}) -> {v}")
            per_round = round_ratios(all_cells, size, conns)
            if len(per_round) > 1:
                print(f"{'':12} per round: req/s " + " ".join(f"x{a:.2f}" for a, _ in per_round)
                      + ", p99 " + " ".join(f"x{b:.2f}" for _, b in per_round))
        else:
            print(f"{'':12} lbproxy/nginx: {v}")
        cpu: dict[str, float | None] = {}
        for peer, what in (("nginx", f"(bar <= {MAX_CPU_RATIO})"),
                           ("nginx-bare", "(a reading: nginx without rules and log)")):
            cpu[peer] = r = cpu_verdict(table, size, conns, peer)
            if r is None:
                continue
            tag = f" -> {'PASS' if r <= MAX_CPU_RATIO else 'FAIL'}" if peer == "nginx" else ""
            rounds = round_cpu_ratios(all_cells, size, conns, peer)
            each = (" (rounds " + " ".join(f"x{a:.2f}" for a in rounds) + ")"
                    if len(rounds) > 1 else "")
            print(f"{'':12} lbproxy/{peer} CPU per request: x{r:.2f} {what}{tag}{each}")
        cr, crb = cpu["nginx"], cpu["nginx-bare"]
        cv = "n/a" if cr is None else "PASS" if cr <= MAX_CPU_RATIO else "FAIL"
        verdicts.append({"size": size, "conns": conns, "rps_ratio": rr, "p99_ratio": pr,
                         "verdict": v, "cpu_ratio": cr, "cpu_verdict": cv,
                         "cpu_ratio_bare": crb})
    return verdicts


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    ap.add_argument("--duration", type=int, default=10,
                    help="whole seconds per measured cell (wrk takes whole seconds)")
    ap.add_argument("--warmup", type=int, default=None,
                    help="seconds of warm-up wrk before each cell (default: duration/5, >= 1)")
    ap.add_argument("--quick", action="store_true", help="3 s cells, 1 s warm-up (smoke run)")
    ap.add_argument("--rounds", type=int, default=1,
                    help="repeat the whole sweep N times (proxies interleaved); report each "
                         "figure's median over the rounds")
    ap.add_argument("--threads", type=int, default=1, choices=(1, 2), help="wrk threads")
    ap.add_argument("--only", default=",".join(PROXIES),
                    help="comma-separated subset of " + ",".join(PROXIES))
    ap.add_argument("--cells", default="",
                    help="subset of cells, e.g. '100B:64,4KiB:256' (default: all four)")
    ap.add_argument("--rules", type=int, default=99,
                    help="non-matching content rules ahead of the matching one (diagnostics; "
                         "the bar is defined with 99)")
    ap.add_argument("--no-access-log", action="store_true",
                    help="turn every proxy's access log off (diagnostics only)")
    ap.add_argument("--nice", type=int, default=0,
                    help="run proxy, backend and wrk at this nice level, applied to their "
                         "scheduler autogroups (e.g. -5, as root) so that other work on the "
                         "machine disturbs the measurement less")
    ap.add_argument("--lbproxy-src", type=Path, default=REPO,
                    help="directory holding the lbproxy/ and acmeclient/ packages to run, e.g. "
                         "`git archive <commit> lbproxy acmeclient | tar -x -C DIR` for an A/B "
                         "of two commits (default: this checkout)")
    ap.add_argument("--keep", action="store_true", help="keep the temp dir (configs, logs)")
    args = ap.parse_args(argv)
    if args.quick:
        args.duration = 3
        args.warmup = 1
    if args.warmup is None:
        args.warmup = max(1, args.duration // 5)
    if not 1 <= args.rounds <= 10 or not 1 <= args.duration <= 600 or not 0 <= args.rules <= 1000:
        ap.error("--rounds must be 1..10, --duration 1..600, --rules 0..1000")
    return args


def select_cells(spec: str) -> list[tuple[str, int]]:
    all_cells = [(s, c) for s in SIZES for c in CONNECTIONS]
    if not spec:
        return all_cells
    out = []
    for item in spec.split(","):
        size, _, conns = item.partition(":")
        if size not in SIZES or not conns.isdigit():
            raise SystemExit(f"bad --cells item {item!r}; sizes {list(SIZES)}")
        out.append((size, int(conns)))
    return out


def _cell_json(c: Cell) -> dict[str, object]:
    return {**dataclasses.asdict(c), "noise0": round(c.noise, 3), "noise1": round(c.noise1, 3)}


def git_head() -> str:
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        done = subprocess.run(["git", "-C", str(REPO), "log", "-1", "--format=%h %s"],
                              capture_output=True, text=True, timeout=10, check=False)
        return done.stdout.strip()
    return ""


def versions() -> dict[str, str]:
    out = {}
    for name, argv in {"nginx": ["nginx", "-v"], "haproxy": ["haproxy", "-v"],
                       "wrk": ["wrk", "-v"]}.items():
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            done = subprocess.run(argv, capture_output=True, text=True, timeout=10, check=False)
            lines = (done.stdout + done.stderr).strip().splitlines()
            out[name] = lines[0] if lines else ""
    return out


@contextlib.contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    def handler(signum: int, frame: object) -> None:
        raise KeyboardInterrupt(f"signal {signum}")
    old = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, old)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    cells = select_cells(args.cells)
    if os.cpu_count() is None or (os.cpu_count() or 0) < 2:
        print("needs at least 2 CPUs (proxy on core 0, wrk+backend on core 1)")
        return 2
    for tool in ("wrk", "taskset", "nginx"):
        if not shutil.which(tool):
            print(f"{tool} not found: it is needed for the rig (wrk, taskset, nginx backend)")
            return 2
    wanted = [p.strip() for p in args.only.split(",") if p.strip()]
    proxies, skipped = [], {}
    for p in wanted:
        if p not in PROXIES:
            print(f"unknown proxy {p!r}; choose from {PROXIES}")
            return 2
        why = peer_available(p)
        if why:
            print(f"skipping {p}: {why}")
            skipped[p] = why
        else:
            proxies.append(p)
    if not proxies:
        return 2

    started = dt.datetime.now(dt.UTC)
    load_before = os.getloadavg()
    cmd = "bench/http_bench.py " + " ".join(sys.argv[1:] if argv is None else argv)
    print(f"{started:%Y-%m-%d %H:%M} UTC  {git_head()}")
    print(f"rig: proxy on core {PROXY_CORE}; wrk (-t{args.threads}) + nginx backend on core "
          f"{RIG_CORE}; {args.duration:g} s cells after {args.warmup:g} s warm-up; "
          f"{args.rounds} round(s); nice {args.nice}; {args.rules} non-matching rules; "
          f"access log {'off' if args.no_access_log else 'on'}; load average {load_before[0]:.2f}")
    rules = make_rules(args.rules)
    workdir = Path(tempfile.mkdtemp(prefix="lbproxy-bench-"))
    all_cells: list[Cell] = []
    logs: dict[str, list[dict[str, object]]] = {}
    backend: Running | None = None
    try:
        with sigterm_as_interrupt():
            backend_port = free_port()
            backend = start_backend(workdir, backend_port, args.nice)
            for rnd in range(args.rounds):
                # The order alternates between rounds: neither proxy always measures second.
                order = list(proxies) if rnd % 2 == 0 else list(reversed(proxies))
                running = start_round(order, workdir, backend_port, rules, rnd, args)
                try:
                    res = measure_round(running, backend, cells, rnd, args)
                finally:
                    infos = stop_round(running, args)
                all_cells.extend(res)
                for p, info in infos.items():
                    info["requests_measured"] = sum(c.requests for c in res if c.proxy == p)
                    logs.setdefault(p, []).append(info)
    except KeyboardInterrupt:
        print("interrupted; cleaning up")
        return 130
    except RuntimeError as e:
        print(f"rig failed: {e}")
        return 2
    finally:
        if backend is not None:
            backend.proc.stop()
        if args.keep:
            print(f"kept {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)

    table = {}
    for p in proxies:
        for size, conns in cells:
            table[(p, size, conns)] = median_cell(
                [c for c in all_cells if (c.proxy, c.size, c.conns) == (p, size, conns)])
    verdicts = print_table(table, proxies, cells, all_cells)
    print("\naccess log lines written (incl. warm-ups) per proxy and round: " + "; ".join(
        f"{p}: " + ", ".join(str(i.get("access_log_lines", "?")) for i in infos)
        for p, infos in logs.items()))
    load_after = os.getloadavg()
    print(f"load average before/after: {load_before[0]:.2f} / {load_after[0]:.2f}; noise0 = "
          "core 0 busy with other work than the proxy (other engineers' tests)")
    noisy = [c for c in table.values() if not c.error and c.noise > NOISY]
    if noisy:
        print(f"WARNING: {len(noisy)} cell(s) had more than {NOISY:.0%} of core 0 taken by other "
              "work; their req/s and p99 understate the proxy (CPU/request is the robust figure)")
    if any(c.rps > 45_000 for c in table.values()):
        print("note: above ~45k req/s core 1 (wrk + backend) is the limit, not the proxy; "
              "compare CPU/request there")

    RESULTS.mkdir(exist_ok=True)
    out = RESULTS / f"http-{started:%Y%m%dT%H%M%SZ}.json"
    out.write_text(json.dumps({
        "date": started.isoformat(), "command": cmd, "git": git_head(), "versions": versions(),
        "args": vars(args), "cells": [_cell_json(c) for c in all_cells],
        "median": [_cell_json(c) for c in table.values()], "verdicts": verdicts,
        "access_logs": logs, "skipped": skipped,
        "loadavg": {"before": load_before, "after": load_after},
    }, indent=2, default=str))
    print(f"results: {out.relative_to(REPO)}")
    all_pass = all(v["verdict"] == "PASS" and v["cpu_verdict"] != "FAIL" for v in verdicts)
    return 0 if all_pass else 1


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO)
    sys.exit(main())
