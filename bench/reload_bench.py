"""Reload benchmark (issue 17): lbproxy swapping a 10,000-rule config while wrk keeps it busy.

Rig (that of bench/http_bench.py, whose helpers it reuses), 2 cores, loopback only:
  core 0: lbproxy (`workers = 1`; its threads and each reload's parser process inherit the
          pinning), started by this script as `reload_bench.py --serve CONFIG`:
          `lbproxy run`'s own code (`lbproxy.app._main`, SIGHUP reloads, gc.freeze after start)
          on uvloop, with two additions for the bench: lbproxy's limit of 1,024 content rules
          (LoadMaster's, `config.model.MAX_RULES`) is lifted to `--rules`, and a loop-lag probe
          task wakes every 1 ms and, on SIGUSR1, prints the longest gap between two of its
          wake-ups since the last SIGUSR1 (the stall: that gap minus the 1 ms it asked for);
  core 1: wrk (1 thread, `--connections`, `--latency`, a per-request timeout far above any
          stall so that none is dropped) and one nginx backend serving a fixed 100-byte body.
The config: `--rules` content rules in the mix of bench/rules_bench.py (URL prefixes, postfixes
and regexes, host rules, a header rule; none matches the bench's URL) spread over 16 SubVSs that
point at a dead port, then the rule `/bench/` whose SubVS leads to the backend, last in
precedence, on one content-switching HTTP VS; access log and health checks off.

A reload rewrites the file with rule r0's pattern changed (so the VS's whole router is compiled
again, not reused), sends SIGHUP, and waits for lbproxy's "reloaded ...: generation N" log line.
Each round has two windows on the same running lbproxy, their order alternating between rounds:
  reloads:  wrk starts; after 0.5 s, `--reloads` reloads one after the other; 0.5 s after the
            last one wrk is stopped (SIGINT: it prints its figures for the time it ran);
  baseline: wrk alone for as long as the reload window lasted (the previous round's length when
            the baseline comes first).
Printed per window: requests, req/s, failed requests (socket errors, timeouts, non-2xx), p50,
p99 and max latency (wrk), the probe's stall, and noise0 (the share of core 0 busy with anything
but lbproxy: the machine is shared); per round the added latency (max latency with reloads minus
max latency without, same round) and the added stall. Bar (issue 17): 0 failed requests and max
added latency <= 10 ms, in every round.

    .venv/bin/python bench/reload_bench.py [--rules 10000] [--reloads 2] [--rounds 2]
        [--connections 64] [--nice N] [--lbproxy-src DIR] [--keep]

Writes bench/results/reload-<date>.json; exit status 0 PASS, 1 FAIL, 2 the rig failed.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import json
import logging
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

BENCH_DIR = Path(__file__).resolve().parent
REPO = BENCH_DIR.parent
sys.path.insert(0, str(BENCH_DIR))

import http_bench as hb  # noqa: E402  (the rig: Proc, nginx backend, wrk, /proc readings)

if TYPE_CHECKING:
    from lbproxy.config.model import ContentRule

MAX_ADDED_MS = 10.0  # the bar of issue 17: max latency added by reloads
PATH, SIZE = hb.SIZES["100B"]
PROBE_INTERVAL = 0.001  # the loop-lag probe's sleep
START_DEADLINE = 90.0  # lbproxy parses and compiles 10,000 rules before it answers
RELOAD_TIMEOUT = 60.0  # one reload under load; far above what it takes
LEAD = 0.5  # wrk runs this long before the first reload, and after the last one
WINDOW_LIMIT = 600  # wrk's -d for a reload window (stopped by SIGINT long before)
WRK_TIMEOUT = "30s"  # per request: a stalled request is counted with its latency, not dropped
SUBVS = 16
SEED = 17


# -- lbproxy, as this bench runs it (--serve) ---------------------------------------------------

class LagProbe:
    """Wakes every PROBE_INTERVAL on the serving loop; `report()` prints the longest gap between
    two wake-ups since the last report, and starts over."""

    def __init__(self) -> None:
        self.worst = 0.0
        self.wakeups = 0

    async def run(self) -> None:
        clock = time.perf_counter
        last = clock()
        while True:
            await asyncio.sleep(PROBE_INTERVAL)
            now = clock()
            self.worst = max(self.worst, now - last)
            self.wakeups += 1
            last = now

    def report(self) -> None:
        print(f"lag-probe max_gap_ms={self.worst * 1e3:.3f} wakeups={self.wakeups}",
              file=sys.stderr, flush=True)
        self.worst = 0.0
        self.wakeups = 0


def serve(config: Path, max_rules: int, src: Path) -> int:
    """`lbproxy run -c CONFIG --workers 1 --log-level info`, rule limit lifted, probe added; the
    lbproxy package of checkout `src` (the venv's editable install would import this one's)."""
    sys.meta_path[:] = [f for f in sys.meta_path if "editable" not in repr(f).lower()]
    sys.path[:0] = [str(src), str(REPO)]  # acmeclient from this checkout
    import uvloop

    import lbproxy.config.loader as loader
    from lbproxy import app

    loader.MAX_RULES = max(loader.MAX_RULES, max_rules)
    print(f"lbproxy package: {Path(app.__file__).parent}", file=sys.stderr, flush=True)
    logging.basicConfig(level=logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    async def main() -> int:
        probe = LagProbe()
        task = asyncio.create_task(probe.run(), name="lag-probe")
        asyncio.get_running_loop().add_signal_handler(signal.SIGUSR1, probe.report)
        try:
            return await app._main(config, False, 1)
        finally:
            task.cancel()

    return uvloop.run(main())


# -- the config ---------------------------------------------------------------------------------

def config_text(rules: list[ContentRule], port: int, backend_port: int, workdir: Path,
                variant: int) -> str:
    """The bench's config; `variant` changes rule r0's pattern (every variant compiles anew)."""
    s = hb._toml_str
    out = [f"state_dir = {s(str(workdir / 'state'))}", "", "[admin]", "enabled = false", "",
           "[access_log]", "enabled = false", ""]
    for r in rules:
        pattern = r.pattern + (f"-v{variant}" if r.name == "r0" else "")
        out += ["[[rule]]", f"name = {s(r.name)}", f"match = {s(r.match_type.value)}",
                f"pattern = {s(pattern)}", f"on = {s(r.on.value)}"]
        if r.header:
            out.append(f"header = {s(r.header)}")
        if r.ignore_case:
            out.append("ignore_case = true")
        if r.include_query:
            out.append("include_query = true")
        out.append("")
    out += ["[[rule]]", 'name = "bench"', 'match = "prefix"', 'pattern = "/bench/"', ""]
    out += ["[[vs]]", 'name = "bench"', f'listen = "127.0.0.1:{port}"', 'protocol = "http"',
            "content_switching = true", "", "[vs.health_check]", 'type = "none"', ""]
    for g in range(SUBVS):
        names = ", ".join(s(r.name) for r in rules[g::SUBVS])
        out += ["[[vs.subvs]]", f'name = "other{g}"', f"rules = [{names}]", "",
                "[[vs.subvs.real_servers]]", 'address = "127.0.0.1:9"', ""]
    out += ["[[vs.subvs]]", 'name = "bench"', 'rules = ["bench"]', "",
            "[[vs.subvs.real_servers]]", f'address = "127.0.0.1:{backend_port}"', ""]
    return "\n".join(out)


def write_atomic(path: Path, text: str) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


# -- measuring ----------------------------------------------------------------------------------

class Tail:
    """New lines of a growing log file."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.pos = 0
        self.buf = b""

    def lines(self) -> list[str]:
        with open(self.path, "rb") as f:
            f.seek(self.pos)
            data = f.read()
        self.pos += len(data)
        self.buf += data
        *done, self.buf = self.buf.split(b"\n")
        return [line.decode(errors="replace") for line in done]

    def wait_for(self, pattern: re.Pattern[str], proc: hb.Proc, timeout: float
                 ) -> re.Match[str]:
        deadline = time.monotonic() + timeout
        while True:
            for line in self.lines():
                m = pattern.search(line)
                if m is not None:
                    return m
            if not proc.alive():
                raise RuntimeError(f"lbproxy exited\n{proc.stderr_tail()}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"no {pattern.pattern!r} from lbproxy within {timeout} s")
            time.sleep(0.005)


_PROBE = re.compile(r"lag-probe max_gap_ms=([\d.]+) wakeups=(\d+)")
_RELOADED = re.compile(r"reloaded .*: generation (\d+)")
_REJECTED = re.compile(r"reload of .* (rejected|failed)")


class Server:
    """The lbproxy under test: its process, its log and the probe in it."""

    def __init__(self, proc: hb.Proc, config: Path, texts: list[str]) -> None:
        self.proc = proc
        self.config = config
        self.texts = texts  # the variants of the config; texts[0] is the file at the start
        self.variant = 0
        self.log = Tail(proc.stderr_path)
        self.generation = 1

    def probe(self) -> tuple[float, int]:
        """(longest gap in ms, wake-ups) since the previous call."""
        os.kill(self.proc.pid, signal.SIGUSR1)
        m = self.log.wait_for(_PROBE, self.proc, 10.0)
        return float(m.group(1)), int(m.group(2))

    def reload(self) -> float:
        """Rewrite the config as the next variant (never the one running), SIGHUP, wait for the
        new generation; seconds it took."""
        self.variant = (self.variant + 1) % len(self.texts)
        write_atomic(self.config, self.texts[self.variant])
        t0 = time.monotonic()
        os.kill(self.proc.pid, signal.SIGHUP)
        deadline = t0 + RELOAD_TIMEOUT
        while True:
            for line in self.log.lines():
                if _REJECTED.search(line):
                    raise RuntimeError(f"lbproxy refused the reload: {line}")
                m = _RELOADED.search(line)
                if m is not None and int(m.group(1)) > self.generation:
                    self.generation = int(m.group(1))
                    return time.monotonic() - t0
            if not self.proc.alive():
                raise RuntimeError(f"lbproxy exited\n{self.proc.stderr_tail()}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"reload not done within {RELOAD_TIMEOUT} s")
            time.sleep(0.002)


@dataclass(frozen=True, slots=True)
class Window:
    kind: str  # "reloads" | "baseline"
    seconds: float
    requests: int
    rps: float
    failed: int  # socket errors (connect, read, write, timeout) + non-2xx responses
    p50_ms: float
    p99_ms: float
    max_ms: float
    stall_ms: float  # the probe's longest gap minus its interval
    noise0: float  # share of core 0 busy with anything but lbproxy (other people's work)
    reload_s: tuple[float, ...] = ()


def start_wrk(port: int, conns: int, seconds: float, nice: int) -> subprocess.Popen[str]:
    argv = [*hb._nice(nice), "taskset", "-c", str(hb.RIG_CORE), "wrk", "--latency", "-t1",
            f"-c{conns}", f"-d{max(1, round(seconds))}s", f"--timeout={WRK_TIMEOUT}",
            f"http://127.0.0.1:{port}{PATH}"]
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    hb.set_autogroup_nice(proc.pid, nice)
    return proc


def finish_wrk(proc: subprocess.Popen[str], interrupt: bool, timeout: float
               ) -> tuple[hb.WrkResult, float]:
    """wrk's figures and its max latency (ms); `interrupt` stops it first (SIGINT)."""
    if interrupt:
        proc.send_signal(signal.SIGINT)
    try:
        out, err = proc.communicate(timeout=timeout)
    finally:
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(hb.STOP_TIMEOUT)
    if proc.returncode != 0:
        raise RuntimeError(f"wrk failed ({proc.returncode}): {err or out}")
    m = re.search(r"Latency\s+\S+\s+\S+\s+(\S+)", out)
    if m is None:
        raise ValueError(f"no max latency in wrk output:\n{out}")
    return hb.parse_wrk(out), hb._to_us(m.group(1)) / 1e3


def lbproxy_cpu(pid: int) -> float:
    """CPU seconds of lbproxy and of its reaped children (the parser process of each reload)."""
    raw = Path(f"/proc/{pid}/stat").read_text()
    fields = raw[raw.rindex(")") + 2:].split()
    # utime stime cutime cstime: fields 11-14 after "pid (comm) " (see http_bench.cpu_seconds)
    return sum(int(x) for x in fields[11:15]) / hb.CLK_TCK


class Noise:
    """How busy core 0 was with anything but lbproxy (and its parser processes) from now until
    share()."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.cores = hb.core_times()
        self.cpu = lbproxy_cpu(pid)
        self.t0 = time.monotonic()

    def share(self) -> float:
        tasks, _ = hb.core_share(self.cores, hb.core_times(), hb.PROXY_CORE)
        mine = (lbproxy_cpu(self.pid) - self.cpu) / max(time.monotonic() - self.t0, 1e-3)
        return max(0.0, tasks - mine)


def window(kind: str, res: hb.WrkResult, max_ms: float, gap_ms: float, noise: float,
           reloads: tuple[float, ...] = ()) -> Window:
    return Window(kind, res.seconds, res.requests, res.rps, res.socket_errors + res.non_2xx,
                  res.p50_us / 1e3, res.p99_us / 1e3, max_ms,
                  max(0.0, gap_ms - PROBE_INTERVAL * 1e3), noise, reloads)


def reload_window(server: Server, args: argparse.Namespace, port: int) -> Window:
    wrk = start_wrk(port, args.connections, WINDOW_LIMIT, args.nice)
    noise = Noise(server.proc.pid)
    try:
        time.sleep(LEAD)
        server.probe()  # starts the probe's count over
        took = tuple(server.reload() for _ in range(args.reloads))
        time.sleep(LEAD)
        gap, _ = server.probe()
    except BaseException:
        finish_wrk(wrk, True, hb.WRK_GRACE)
        raise
    res, max_ms = finish_wrk(wrk, True, hb.WRK_GRACE)
    return window("reloads", res, max_ms, gap, noise.share(), took)


def baseline_window(server: Server, seconds: float, args: argparse.Namespace,
                    port: int) -> Window:
    wrk = start_wrk(port, args.connections, seconds, args.nice)
    noise = Noise(server.proc.pid)
    time.sleep(min(LEAD, seconds / 4))
    server.probe()
    res, max_ms = finish_wrk(wrk, False, seconds + hb.WRK_GRACE)
    gap, _ = server.probe()
    return window("baseline", res, max_ms, gap, noise.share())


def fmt(w: Window) -> str:
    extra = (f"; reloads took {', '.join(f'{s:.2f}' for s in w.reload_s)} s"
             if w.reload_s else "")
    return (f"{w.kind:>8}: {w.seconds:5.1f} s, {w.requests:>7} requests, {w.rps:>7.0f} req/s, "
            f"{w.failed} failed, p50 {w.p50_ms:.2f} ms, p99 {w.p99_ms:.2f} ms, "
            f"max {w.max_ms:.2f} ms, loop stall {w.stall_ms:.2f} ms, noise0 {w.noise0:.0%}{extra}")


# -- main ---------------------------------------------------------------------------------------

def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rules", type=int, default=10_000, help="content rules (default 10000)")
    p.add_argument("--reloads", type=int, default=2, help="reloads per round (default 2)")
    p.add_argument("--rounds", type=int, default=2, help="rounds (default 2)")
    p.add_argument("--connections", type=int, default=64, help="wrk connections (default 64)")
    p.add_argument("--nice", type=int, default=0,
                   help="autogroup nice of every process started (as root; see http_bench)")
    p.add_argument("--lbproxy-src", type=Path, default=REPO,
                   help="the checkout whose lbproxy runs (default: this one)")
    p.add_argument("--keep", action="store_true", help="keep the temp dir (configs, logs)")
    p.add_argument("--serve", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--max-rules", type=int, default=10_000, help=argparse.SUPPRESS)
    p.add_argument("--src", type=Path, default=REPO, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.serve is not None:
        return serve(args.serve, args.max_rules, args.src)
    if (os.cpu_count() or 0) < 2:
        print("needs at least 2 CPUs (lbproxy on core 0, wrk + backend on core 1)")
        return 2
    for tool in ("wrk", "taskset", "nginx"):
        if not shutil.which(tool):
            print(f"{tool} not found: it is needed for the rig")
            return 2
    started = dt.datetime.now(dt.UTC)
    load_before = os.getloadavg()
    cmd = "bench/reload_bench.py " + " ".join(sys.argv[1:] if argv is None else argv)
    print(f"{started:%Y-%m-%d %H:%M} UTC  {hb.git_head()}"
          + ("" if args.lbproxy_src == REPO else f"; lbproxy from {args.lbproxy_src}"))
    print(f"rig: lbproxy (workers = 1) on core {hb.PROXY_CORE}; wrk -t1 -c{args.connections} + "
          f"nginx backend on core {hb.RIG_CORE}; {args.rules} rules; {args.reloads} reloads x "
          f"{args.rounds} rounds; nice {args.nice}; load average {load_before[0]:.2f}")
    import rules_bench as rb  # the realistic rule mix (imports lbproxy: not in --serve)

    rules = [r for r, _ in rb.realistic_rules(args.rules, random.Random(SEED))]
    workdir = Path(tempfile.mkdtemp(prefix="lbproxy-reload-"))
    backend: hb.Running | None = None
    server: Server | None = None
    rounds: list[tuple[Window, Window]] = []
    try:
        with hb.sigterm_as_interrupt():
            backend_port, port = hb.free_port(), hb.free_port()
            backend = hb.start_backend(workdir, backend_port, args.nice)
            d = workdir / "lbproxy"
            d.mkdir()
            texts = [config_text(rules, port, backend_port, d, v) for v in range(2)]
            conf = d / "lbproxy.toml"
            conf.write_text(texts[0])
            t0 = time.monotonic()
            proc = hb.Proc("lbproxy", [sys.executable, str(Path(__file__).resolve()), "--serve",
                                       str(conf), "--max-rules", str(args.rules + 1), "--src",
                                       str(args.lbproxy_src.resolve())],
                           hb.PROXY_CORE, d, nice=args.nice)
            server = Server(proc, conf, texts)
            hb.wait_ready(proc, port, PATH, SIZE, START_DEADLINE)
            package = server.log.wait_for(re.compile(r"lbproxy package: (\S+)"), proc, 5.0)
            print(f"lbproxy ({package.group(1)}) answering {time.monotonic() - t0:.1f} s after "
                  "its start")
            hb.run_wrk(port, PATH, args.connections, 1, 1, args.nice)  # warm-up
            length = 0.0
            for rnd in range(args.rounds):
                if rnd % 2 == 0 or not length:
                    rel = reload_window(server, args, port)
                    length = rel.seconds
                    base = baseline_window(server, length, args, port)
                else:
                    base = baseline_window(server, length, args, port)
                    rel = reload_window(server, args, port)
                    length = rel.seconds
                rounds.append((rel, base))
                print(f"round {rnd + 1}:")
                for w in (rel, base) if rnd % 2 == 0 else (base, rel):
                    print("  " + fmt(w))
                print(f"  added: max latency {rel.max_ms - base.max_ms:+.2f} ms, loop stall "
                      f"{rel.stall_ms - base.stall_ms:+.2f} ms")
    except KeyboardInterrupt:
        print("interrupted; cleaning up")
        return 130
    except (RuntimeError, ValueError) as e:
        print(f"rig failed: {e}")
        return 2
    finally:
        if server is not None:
            server.proc.stop()
        if backend is not None:
            backend.proc.stop()
        if args.keep:
            print(f"kept {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)

    failed = sum(rel.failed + base.failed for rel, base in rounds)
    added = max(rel.max_ms - base.max_ms for rel, base in rounds)
    stall = max(rel.stall_ms for rel, _ in rounds)
    ok = failed == 0 and added <= MAX_ADDED_MS
    load_after = os.getloadavg()
    print(f"load average before/after: {load_before[0]:.2f} / {load_after[0]:.2f}")
    print(f"failed requests: {failed}; max added latency (worst round): {added:.2f} ms; "
          f"longest loop stall during reloads: {stall:.2f} ms")
    print(f"bar: 0 failed requests and max added latency <= {MAX_ADDED_MS:g} ms: "
          f"{'PASS' if ok else 'FAIL'}")
    noisy = [w for pair in rounds for w in pair if w.noise0 > hb.NOISY]
    if noisy:
        print(f"WARNING: {len(noisy)} window(s) had more than {hb.NOISY:.0%} of core 0 taken by "
              "other work (noise0): their latency figures include it")
    hb.RESULTS.mkdir(exist_ok=True)
    out = hb.RESULTS / f"reload-{started:%Y%m%dT%H%M%SZ}.json"
    out.write_text(json.dumps({
        "date": started.isoformat(), "command": cmd, "git": hb.git_head(),
        "args": {k: str(v) for k, v in vars(args).items()},
        "rounds": [{"reloads": asdict(rel), "baseline": asdict(base)} for rel, base in rounds],
        "failed": failed, "added_ms": added, "stall_ms": stall, "pass": ok,
        "loadavg": {"before": load_before, "after": load_after}}, indent=2))
    print(f"results: {out.relative_to(REPO)}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
