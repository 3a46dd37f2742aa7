"""Let's Encrypt work against the serving loop: the data plane's p99 under wrk while 20 RSA-4096
certificates are requested and an encrypted backup is written, against the same wrk with no LE
work (issue 14: "blocking work off the serving loop"; bar: loaded p99 <= 1.5x the baseline's).

Rig (that of bench/http_bench.py, whose helpers it reuses), 2 cores, loopback only:
  core 0: `lbproxy run` (`taskset -c 0`, every thread of it: work moved off the event loop to a
          thread still shares this core with the loop);
  core 1: this script pins itself there before starting anything, so all its children stay
          there: wrk (1 thread, 64 connections, `--latency`, per-request timeout the window
          + 10 s so that no stalled request is dropped from the figures), one nginx backend
          serving a fixed 100-byte body, Pebble and pebble-challtestsrv (Debian `pebble`,
          started by tests/support/pebble.py: PEBBLE_VA_NOSLEEP=1, no nonce rejects, no authz
          reuse), and the admin API client threads below.
Everything lives in a temp dir on the repo's disk (ext4 here: fsync is real) and is stopped at
the end. lbproxy's config: one HTTP VS (health checks and access log off) whose SubVS `site`
(rule `default`) leads to the backend; the VS listens on Pebble's HTTP-01 port, so the same VS
serves wrk and answers the challenges (lbproxy injects its challenge SubVS); `[letsencrypt]` and
the state dir point at Pebble and the temp dir. Set-up through the CLI, not measured: `lbproxy
le set-directory URL --ca-bundle F`, `le register`, one warm-up `le request --key-size 4096`.

Each round runs two phases, their order alternating between rounds (drift hits both alike):
  baseline: a warm-up wrk (1 s), then wrk for D seconds;
  loaded:   a warm-up wrk, then 20 `lbproxy le request --id ID --cn NAME --vs web --key-size
            4096` submitted at once as admin API calls (POST /api/le/certs with the body the CLI
            sends, one thread each; `--via cli` runs the CLI itself: 20 Python processes on core
            1, which slow wrk for reasons of their own), wrk started right after them, and D/2
            into the window a backup with certificates (`lbproxy backup --certs` with a
            passphrase: POST /api/le/backup, scrypt). The LE work runs at its own pace: the
            script reports how many certificates were issued inside the window (their fsync'd
            writes with them), the LE work's total time and the share of the window it covered,
            and warns when the window saw only part of it. D defaults to 20 s because 20 RSA-4096
            keys take 15-17 s on one core of this machine: with 10 s windows no certificate was
            issued (nor written) inside the window. The round's certificates are deleted
            afterwards (outside any window), so each round starts from the same state.
Printed per phase: req/s, p50/p99/max latency, lbproxy's CPU share of core 0, the share of core 0
taken by anything else (noise0: the machine is shared with other engineers' runs), how busy core
1 was, the share of it taken by anything but the rig (noise1), and Pebble's CPU share; per round
the loaded/baseline ratios, then the median p99 ratio against the bar. wrk 4 corrects its
latency figures for coordinated omission (`stats_correct`: each slow response is back-filled
with the samples its connection would have sent meanwhile at its mean interval), so p50/p99
weigh a stall of the loop by how long it lasted, as a client sending at a steady rate would see
it: p99 above X means that a request sent during more than about 1% of the window would have
waited X or more. max is one real response. Each phase's wrk output is kept in the temp dir
(--keep).

    .venv/bin/python bench/le_blocking_bench.py [--rounds 3] [--duration 20] [--connections 64]
        [--certs 20] [--via api|cli] [--lbproxy-src DIR] [--keep]

Writes bench/results/le-blocking-<date>.json; exit status 0 PASS, 1 FAIL, 2 the rig failed.
"""

from __future__ import annotations

import argparse
import base64
import concurrent.futures as cf
import contextlib
import datetime as dt
import functools
import json
import os
import re
import resource
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
REPO = BENCH_DIR.parent
sys.path.insert(0, str(BENCH_DIR))
sys.path.insert(0, str(REPO))

import http_bench as hb  # noqa: E402  (shared rig: Proc, nginx backend, /proc CPU, wrk parsing)

from tests.support.pebble import start_pebble  # noqa: E402

MAX_P99_RATIO = 1.5  # the bar of issue 14
PATH, SIZE = hb.SIZES["100B"]  # the small fixed body
KEY_SIZE = 4096
PASSPHRASE = "le-blocking-bench passphrase"  # any text: the backup's scrypt cost does not vary
# One order against Pebble ends within a second here; this only bounds a run that went wrong.
LE_TIMEOUT = 120.0
# `lbproxy run` answers within ~1 s here; a start that takes longer failed.
START_DEADLINE = 20.0
# Quiet time after a phase's clean-up before the next warm-up (lets the scheduler's wake-ups after
# issuance and deletion run outside every window); a bench pause, not synchronisation.
SETTLE = 1.0
WARMUP = 1  # seconds of wrk before each measured window (connections and caches warm)
# wrk's per-request timeout is the window plus this: a request stalled behind the loop is then
# counted in the latency distribution with its real latency, never dropped as a timeout.
WRK_TIMEOUT_MARGIN = 10


@dataclass(frozen=True, slots=True)
class Wrk:
    rps: float
    requests: int
    p50_ms: float
    p99_ms: float
    max_ms: float
    errors: int


@dataclass(frozen=True, slots=True)
class LeCall:
    """One request (or the backup): when it ran relative to the wrk window's start."""

    what: str
    start: float
    end: float
    ok: bool
    detail: str = ""


@dataclass(frozen=True, slots=True)
class Phase:
    round: int
    kind: str  # "baseline" | "loaded"
    wrk: Wrk
    proxy_cpu: float  # lbproxy CPU seconds / wall seconds over the window
    noise0: float  # share of core 0 running anything but lbproxy
    core1_busy: float  # share of core 1 busy (wrk, backend, Pebble, this script, anything else)
    noise1: float  # share of core 1 running anything but wrk, the backend, Pebble and this script
    pebble_cpu: float  # Pebble + challtestsrv CPU seconds / wall seconds
    calls: tuple[LeCall, ...] = ()


def run_wrk(port: int, conns: int, seconds: int, save: Path | None = None) -> Wrk:
    """wrk pinned to the rig core; hb.parse_wrk for the figures, plus the max latency; its
    output is kept in `save` (seen with --keep)."""
    argv = ["taskset", "-c", str(hb.RIG_CORE), "wrk", "--latency", "-t1", f"-c{conns}",
            f"-d{seconds}s", f"--timeout={seconds + WRK_TIMEOUT_MARGIN}s",
            f"http://127.0.0.1:{port}{PATH}"]
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        out, err = proc.communicate(timeout=seconds + hb.WRK_GRACE)
    finally:
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(hb.STOP_TIMEOUT)
    if proc.returncode != 0:
        raise RuntimeError(f"wrk failed ({proc.returncode}): {err or out}")
    if save is not None:
        save.write_text(out)
    w = hb.parse_wrk(out)
    m = re.search(r"^\s+Latency\s+\S+\s+\S+\s+(\S+)", out, re.M)
    return Wrk(w.rps, w.requests, w.p50_us / 1e3, w.p99_us / 1e3,
               hb._to_us(m.group(1)) / 1e3 if m else 0.0, w.socket_errors + w.non_2xx)


def pebble_pids() -> list[int]:
    """Pebble and challtestsrv: this script's children (comm is cut at 15 characters)."""
    out = []
    for pid in hb.children(os.getpid()):
        with contextlib.suppress(OSError):
            if Path(f"/proc/{pid}/comm").read_text().strip().startswith("pebble"):
                out.append(pid)
    return out


class Lb:
    """The running `lbproxy run`, its admin API and its CLI."""

    def __init__(self, work: Path, port: int, backend_port: int, directory_url: str,
                 ca_bundle: str, src: Path, workers: int = 1) -> None:
        self.work, self.port = work, port
        admin_port = hb.free_port()
        self.admin_url = f"http://127.0.0.1:{admin_port}"
        self.config = work / "lbproxy.toml"
        self.config.write_text(f"""state_dir = "state"
drain_timeout = 1.0

[admin]
listen = "127.0.0.1:{admin_port}"

[access_log]
enabled = false

[letsencrypt]
directory_url = {json.dumps(directory_url)}
ca_bundle = {json.dumps(ca_bundle)}

# wrk's target, and Pebble validates http-01 here (lbproxy injects the challenge SubVS).
[[vs]]
name = "web"
listen = "127.0.0.1:{port}"
protocol = "http"

[vs.health_check]
type = "none"

[[vs.subvs]]
name = "site"
rules = ["default"]

[[vs.subvs.real_servers]]
address = "127.0.0.1:{backend_port}"
""")
        self.env = {**os.environ, "PYTHONPATH": str(src)}
        self.proc = hb.Proc("lbproxy", [str(hb.LBPROXY), "run", "-c", str(self.config),
                                        "--log-level", "warning", "--workers",
                                        str(workers)],
                            hb.PROXY_CORE, work,
                            env=self.env)
        try:
            hb.wait_ready(self.proc, port, PATH, SIZE, START_DEADLINE)
            self.token = self._token()
        except BaseException:
            self.proc.stop()
            raise

    def _token(self) -> str:
        deadline = time.monotonic() + START_DEADLINE
        path = self.work / "state" / "admin.token"
        while True:
            with contextlib.suppress(OSError, urllib.error.URLError):
                token = path.read_text().strip()
                self.token = token
                self.api("GET", "/api/le/account")
                return token
            if time.monotonic() > deadline or not self.proc.alive():
                raise RuntimeError(f"lbproxy's admin API not up within {START_DEADLINE} s\n"
                                   f"{self.proc.stderr_tail()}")
            time.sleep(0.05)

    def api(self, method: str, path: str, body: object = None) -> object:
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(self.admin_url + path, data=data, method=method)
        req.add_header("Authorization", f"Bearer {self.token}")
        if data is not None:
            req.add_header("Content-Type", "application/json")
        try:
            with urllib.request.urlopen(req, timeout=LE_TIMEOUT) as r:
                return json.loads(r.read() or b"null")
        except urllib.error.HTTPError as e:
            raise RuntimeError(f"{method} {path}: {e.code} {e.read()[:300]!r}") from None

    def cli(self, *args: str) -> str:
        argv = [str(hb.LBPROXY), *args, "-c", str(self.config)]
        done = subprocess.run(argv, capture_output=True, text=True, cwd=self.work, env=self.env,
                              timeout=LE_TIMEOUT, check=False)
        if done.returncode != 0:
            raise RuntimeError(f"lbproxy {' '.join(args)} failed ({done.returncode}): "
                               f"{(done.stderr or done.stdout).strip()[-500:]}")
        return done.stdout

    def request(self, cert_id: str, name: str, via: str) -> None:
        """`lbproxy le request --id ID --cn NAME --vs web --key-size 4096`, waiting for it."""
        if via == "cli":
            self.cli("le", "request", "--id", cert_id, "--cn", name, "--vs", "web",
                     "--key-size", str(KEY_SIZE))
            return
        self.api("POST", "/api/le/certs", {"id": cert_id, "common_name": name, "vs": "web",
                                           "sans": [], "key_type": "rsa", "key_size": KEY_SIZE,
                                           "wait": True})

    def backup(self, out: Path, via: str) -> int:
        """`lbproxy backup --certs -o OUT` with a passphrase; returns the file's size."""
        if via == "cli":
            pf = self.work / "passphrase"
            pf.write_text(PASSPHRASE)
            self.cli("backup", "--certs", "--passphrase-file", str(pf), "-o", str(out))
        else:
            answer = self.api("POST", "/api/le/backup",
                              {"passphrase": PASSPHRASE, "vs": False, "certs": True})
            assert isinstance(answer, dict)
            fd = os.open(out, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "wb") as f:
                f.write(base64.b64decode(answer["backup"]))
        return out.stat().st_size


def timed(what: str, t0: float, fn: Callable[[], object]) -> LeCall:
    start = time.monotonic() - t0
    try:
        result = fn()
        return LeCall(what, start, time.monotonic() - t0, True,
                      f"{result} bytes" if isinstance(result, int) else "")
    except (RuntimeError, OSError, subprocess.SubprocessError) as e:
        return LeCall(what, start, time.monotonic() - t0, False, str(e)[:300])


def rig_seconds(backend_pid: int, peb: list[int]) -> float:
    """CPU seconds of what belongs on core 1: this script, its reaped children (wrk), the
    backend's worker and Pebble."""
    me = resource.getrusage(resource.RUSAGE_SELF)
    kids = resource.getrusage(resource.RUSAGE_CHILDREN)
    return (me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime
            + hb.cpu_seconds(backend_pid) + sum(hb.cpu_seconds(p) for p in peb))


def lb_cpu(pid: int) -> float:
    """CPU seconds of lbproxy: the process `lbproxy run` and its worker processes (whose times
    reach the parent's only once they exit)."""
    return hb.cpu_seconds(pid) + sum(hb.cpu_seconds(c) for c in hb.children(pid))


def measure(lb: Lb, backend_pid: int, rnd: int, kind: str, args: argparse.Namespace,
            pool: cf.ThreadPoolExecutor) -> Phase:
    run_wrk(lb.port, args.connections, WARMUP)
    peb = pebble_pids()
    c0, p0 = hb.core_times(), lb_cpu(lb.proc.pid)
    q0, r0 = sum(hb.cpu_seconds(p) for p in peb), rig_seconds(backend_pid, peb)
    futures: list[cf.Future[LeCall]] = []
    t0 = time.monotonic()
    if kind == "loaded":
        for i in range(args.certs):
            cid = f"r{rnd}c{i:02d}"
            futures.append(pool.submit(timed, cid, t0, functools.partial(
                lb.request, cid, f"{cid}.le-bench.test", args.via)))
        backup_at = t0 + args.duration / 2

        def backup() -> LeCall:
            time.sleep(max(0.0, backup_at - time.monotonic()))  # a point in the window
            return timed("backup", t0, functools.partial(
                lb.backup, lb.work / f"backup-r{rnd}.json", args.via))

        futures.append(pool.submit(backup))
    w0 = time.monotonic() - t0
    w = run_wrk(lb.port, args.connections, args.duration, lb.work / f"wrk-r{rnd}-{kind}.txt")
    wall = time.monotonic() - t0 - w0
    c1, p1 = hb.core_times(), lb_cpu(lb.proc.pid)
    q1, r1 = sum(hb.cpu_seconds(p) for p in peb), rig_seconds(backend_pid, peb)
    done = cf.wait(futures, timeout=LE_TIMEOUT * 2)
    if done.not_done:
        raise RuntimeError(f"{len(done.not_done)} LE calls still running after "
                           f"{LE_TIMEOUT * 2:.0f} s")
    # Times relative to the wrk window's start (wrk's own start-up is a few ms).
    calls = tuple(LeCall(c.what, c.start - w0, c.end - w0, c.ok, c.detail)
                  for c in (f.result() for f in futures))
    tasks0, _ = hb.core_share(c0, c1, hb.PROXY_CORE)
    tasks1, si1 = hb.core_share(c0, c1, hb.RIG_CORE)
    proxy = (p1 - p0) / wall
    phase = Phase(rnd, kind, w, proxy, max(0.0, tasks0 - proxy), tasks1 + si1,
                  max(0.0, tasks1 - (r1 - r0) / wall), (q1 - q0) / wall, calls)
    if not lb.proc.alive():
        raise RuntimeError(f"lbproxy died during round {rnd + 1}\n{lb.proc.stderr_tail()}")
    for c in calls:  # the round's certificates go: each round starts from the same state
        if c.what != "backup" and c.ok:
            lb.api("DELETE", f"/api/le/certs/{c.what}")
    time.sleep(SETTLE)
    return phase


def coverage(p: Phase, duration: int) -> float:
    """Share of the wrk window during which LE work (a request or the backup) was under way."""
    if not p.calls:
        return 0.0
    first = max(0.0, min(c.start for c in p.calls))
    last = min(float(duration), max(c.end for c in p.calls))
    return max(0.0, last - first) / duration


def fmt_phase(p: Phase, duration: int) -> str:
    w = p.wrk
    line = (f"round {p.round + 1} {p.kind:8} {w.rps:8.0f} req/s  p50 {w.p50_ms:6.2f} ms  "
            f"p99 {w.p99_ms:7.2f} ms  max {w.max_ms:7.1f} ms  lbproxy {p.proxy_cpu:4.0%}  "
            f"noise0 {p.noise0:4.0%}  core1 {p.core1_busy:4.0%} noise1 {p.noise1:4.0%}  "
            f"pebble {p.pebble_cpu:4.0%}"
            + (f"  errors={w.errors}" if w.errors else ""))
    certs = [c for c in p.calls if c.what != "backup"]
    if certs:
        ok = [c for c in certs if c.ok]
        inside = sum(1 for c in ok if c.end <= duration)
        end = max(c.end for c in p.calls) - min(c.start for c in p.calls)
        line += (f"\n{'':19}LE: {len(ok)}/{len(certs)} issued, {inside} inside the {duration} s "
                 f"window; first {min((c.end for c in ok), default=0):.2f} s, last "
                 f"{max((c.end for c in ok), default=0):.2f} s after wrk started; LE work "
                 f"{end:.2f} s in all, under way during {coverage(p, duration):.0%} of the "
                 "window")
        for c in p.calls:
            if c.what == "backup":
                line += (f"\n{'':19}backup: {'written' if c.ok else 'FAILED'} at {c.start:.2f} "
                         f"s, took {c.end - c.start:.2f} s ({c.detail})")
        for c in certs:
            if not c.ok:
                line += f"\n{'':19}{c.what} FAILED: {c.detail}"
    return line


def code_description() -> dict[str, object]:
    def git(*a: str) -> str:
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            return subprocess.run(["git", "-C", str(REPO), *a], capture_output=True, text=True,
                                  timeout=10, check=False).stdout.strip()
        return ""
    dirty = [ln[3:] for ln in git("status", "--porcelain", "--", "lbproxy", "acmeclient")
             .splitlines()]
    return {"head": git("log", "-1", "--format=%h %s")[:100],
            "letsencrypt_package": (REPO / "lbproxy" / "letsencrypt").is_dir(),
            # The commit that last touched it ("" while it is absent from git log).
            "letsencrypt_committed": git("log", "-1", "--format=%h", "--",
                                         "lbproxy/letsencrypt"),
            "uncommitted_under_lbproxy": dirty}


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--duration", type=int, default=20,
                    help="seconds of each wrk window (long enough for the LE work to end in it)")
    ap.add_argument("--connections", type=int, default=64)
    ap.add_argument("--certs", type=int, default=20, help="RSA-4096 certificates per loaded phase")
    ap.add_argument("--via", choices=("api", "cli"), default="api",
                    help="requests and backup as admin API calls (default) or CLI processes")
    ap.add_argument("--lbproxy-src", type=Path, default=REPO,
                    help="directory holding the lbproxy/ and acmeclient/ packages to run")
    ap.add_argument("--keep", action="store_true", help="keep the temp dir (configs, logs)")
    ap.add_argument("--workers", type=int, default=1,
                    help="lbproxy's worker processes (1: one process, as issue 14 measured; 2: "
                         "a control process doing the LE work and two serving workers, all on "
                         "core 0)")
    args = ap.parse_args()
    if not (1 <= args.rounds <= 10 and 2 <= args.duration <= 120 and 1 <= args.certs <= 100
            and 1 <= args.connections <= 1000):
        ap.error("--rounds 1..10, --duration 2..120, --certs 1..100, --connections 1..1000")
    return args


def main() -> int:
    args = parse_args()
    if (os.cpu_count() or 0) < 2:
        print("needs 2 CPUs (lbproxy on core 0, the rest on core 1)")
        return 2
    for tool in ("wrk", "taskset", "nginx", "pebble", "pebble-challtestsrv"):
        if not shutil.which(tool):
            print(f"{tool} not found (apt-get install wrk nginx pebble util-linux)")
            return 2
    os.sched_setaffinity(0, {hb.RIG_CORE})  # children (Pebble, the CLI) inherit core 1
    started = dt.datetime.now(dt.UTC)
    code = code_description()
    dirty = code["uncommitted_under_lbproxy"]
    load_before = os.getloadavg()
    print(f"{started:%Y-%m-%d %H:%M} UTC  {code['head']}  lbproxy --workers {args.workers}")
    committed = code["letsencrypt_committed"]
    print(f"code: lbproxy/letsencrypt/ {'present' if code['letsencrypt_package'] else 'absent'}"
          f"{f', last commit {committed}' if committed else ', not in git log'}; "
          "uncommitted files under "
          f"lbproxy/ acmeclient/: {len(dirty) if isinstance(dirty, list) else '?'}"
          + ("" if args.lbproxy_src == REPO else f"; lbproxy run from {args.lbproxy_src}"))
    print(f"rig: lbproxy on core {hb.PROXY_CORE}; wrk (-t1 -c{args.connections}) + nginx + Pebble "
          f"on core {hb.RIG_CORE}; {args.duration} s windows after {WARMUP} s warm-up; "
          f"{args.rounds} round(s); {args.certs} RSA-{KEY_SIZE} certificates + a backup with "
          f"certificates per loaded window, via {args.via}; load average {load_before[0]:.2f} "
          "(shared machine)")
    work = Path(tempfile.mkdtemp(prefix="lbproxy-le-blocking-"))
    phases: list[Phase] = []
    backend: hb.Running | None = None
    lb: Lb | None = None
    try:
        with hb.sigterm_as_interrupt(), \
                start_pebble(work / "pebble", http_port=hb.free_port()) as peb, \
                cf.ThreadPoolExecutor(args.certs + 1) as pool:
            backend_port = hb.free_port()
            backend = hb.start_backend(work, backend_port)
            lb = Lb(work, peb.http_port, backend_port, peb.directory_url, peb.ca_bundle,
                    args.lbproxy_src, args.workers)
            lb.cli("le", "set-directory", peb.directory_url, "--ca-bundle", peb.ca_bundle)
            lb.cli("le", "register", "--email", "ops@le-bench.test")
            lb.cli("le", "request", "--id", "warmup", "--cn", "warmup.le-bench.test", "--vs",
                   "web", "--key-size", str(KEY_SIZE))
            for rnd in range(args.rounds):
                kinds = ("baseline", "loaded") if rnd % 2 == 0 else ("loaded", "baseline")
                for kind in kinds:
                    phases.append(measure(lb, backend.measured_pid, rnd, kind, args, pool))
                    print(fmt_phase(phases[-1], args.duration), flush=True)
    except KeyboardInterrupt:
        print("interrupted; cleaning up")
        return 130
    except (RuntimeError, OSError, ValueError, subprocess.SubprocessError) as e:
        print(f"rig failed: {e}")
        return 2
    finally:
        if lb is not None:
            lb.proc.stop()
        if backend is not None:
            backend.proc.stop()
        if args.keep:
            print(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)

    ratios = []
    print(f"\n{'round':6} {'p99 base':>9} {'p99 LE':>9} {'p99 x':>6} {'req/s x':>8} "
          f"{'max base':>9} {'max LE':>9} {'in window':>9} {'LE cover':>8}")
    for rnd in range(args.rounds):
        b, ld = (next(p for p in phases if (p.round, p.kind) == (rnd, k))
                 for k in ("baseline", "loaded"))
        r = ld.wrk.p99_ms / b.wrk.p99_ms
        ratios.append(r)
        inside = sum(1 for c in ld.calls if c.what != "backup" and c.ok
                     and c.end <= args.duration)
        print(f"{rnd + 1:<6} {b.wrk.p99_ms:7.2f}ms {ld.wrk.p99_ms:7.2f}ms {r:6.2f} "
              f"{ld.wrk.rps / b.wrk.rps:8.2f} {b.wrk.max_ms:7.1f}ms {ld.wrk.max_ms:7.1f}ms "
              f"{inside:>6}/{args.certs:<2} {coverage(ld, args.duration):8.0%}")
    partial = [p.round + 1 for p in phases if p.kind == "loaded" and any(
        c.end > args.duration or not c.ok for c in p.calls)]
    if partial:
        print(f"WARNING: in round(s) {partial} the LE work did not all end (successfully) inside "
              "the window, so the window saw only part of it; rerun with a longer --duration")
    med = statistics.median(ratios)
    verdict = "PASS" if med <= MAX_P99_RATIO else "FAIL"
    print(f"median p99 loaded/baseline x{med:.2f} (bar <= {MAX_P99_RATIO}) -> {verdict}")
    load_after = os.getloadavg()
    print(f"load average before/after: {load_before[0]:.2f} / {load_after[0]:.2f} (the loaded "
          "phases' threads count too); noise0/noise1 = share of core 0/1 running anything but "
          "lbproxy/the rig (other engineers' work on this shared machine); a round with high "
          "noise in one phase only is not a fair pair")
    hb.RESULTS.mkdir(exist_ok=True)
    out = hb.RESULTS / f"le-blocking-{started:%Y%m%dT%H%M%SZ}.json"
    out.write_text(json.dumps({
        "date": started.isoformat(), "command": "bench/le_blocking_bench.py "
        + " ".join(sys.argv[1:]), "code": code, "args": vars(args),
        "phases": [asdict(p) for p in phases], "p99_ratios": ratios, "median_p99_ratio": med,
        "verdict": verdict, "loadavg": {"before": load_before, "after": load_after},
    }, indent=2, default=str))
    print(f"results: {out.relative_to(REPO)}")
    return 0 if verdict == "PASS" else 1


if __name__ == "__main__":
    sys.exit(main())
