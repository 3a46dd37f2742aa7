"""ACME issuance benchmark: `lbproxy le request` through a running lbproxy, acmeclient alone and
certbot, all against one Pebble in the same run.

    .venv/bin/python bench/acme_bench.py [--runs 5] [--concurrent 20] [--certbot-runs 3]

Starts its own Pebble (PEBBLE_VA_NOSLEEP=1, no nonce rejects, no authz reuse) on free loopback
ports and stops it at the end. Registers one account per client (not timed), issues one
certificate per client as a warm-up (not timed), then times, each certificate a new EC P-256 key
and a single-name order with a real HTTP-01 validation:
  * acmeclient alone: one certificate at a time (median of --runs), and --concurrent
    certificates at once (wall time of asyncio.gather);
  * lbproxy: `lbproxy run` as a subprocess (an HTTP VS on Pebble's validation port answers the
    challenges, an HTTPS VS lists the certificates to be issued); each run starts the command
    `lbproxy le request --id ID --cn NAME --vs http` and stops the clock when the HTTPS VS
    presents the new certificate in a TLS handshake (SNI NAME, verified against Pebble's root):
    command start to certificate served, median of --runs. For the breakdown it also times the
    same request as one admin API call (POST /api/le/certs, no CLI process) and the CLI's
    fixed cost (`lbproxy le account`, which only reads the account);
  * certbot (Debian `certbot`, if installed and --certbot-runs > 0): `certbot certonly
    --standalone` per certificate with an existing account (median of --certbot-runs).
Prints the figures side by side and writes bench/results/acme_bench.json.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import shutil
import signal
import socket
import ssl
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from acmeclient import AcmeClient, StandaloneHttp01Responder, generate_key  # noqa: E402
from tests.support.pebble import PebbleInstance, free_port, start_pebble  # noqa: E402

# lbproxy's own deadlines in this bench. One `le request` against Pebble takes well under a
# second; 60 s only bounds a run that went wrong (the CLI itself would wait 330 s).
COMMAND_TIMEOUT = 60.0
# After the command returned, the HTTPS VS must present the certificate within this (the SNI
# lookup reads the store at the next handshake, so the first try normally succeeds).
SERVE_DEADLINE = 10.0
# Between two handshakes while waiting for the certificate (bounded by SERVE_DEADLINE).
SERVE_POLL = 0.002
# `lbproxy run` has its admin API up within ~1 s here; 15 s bounds a start that failed.
START_DEADLINE = 15.0
START_POLL = 0.05
# Drain time of the benchmark's lbproxy at stop (nothing is in flight by then).
DRAIN = 1.0


# -- acmeclient alone -----------------------------------------------------------------------------

async def bench_acmeclient(
    peb: PebbleInstance, runs: int, concurrent: int
) -> dict[str, float | list[float]]:
    async with (
        StandaloneHttp01Responder("127.0.0.1", peb.http_port) as responder,
        AcmeClient(peb.directory_url, generate_key(), ca_bundle=peb.ca_bundle) as client,
    ):
        await client.new_account(terms_of_service_agreed=True)
        # warm-up (TLS session, nonce pool), not timed
        await client.obtain_certificate(["warmup.bench.example"], generate_key(), responder)
        times = []
        for i in range(runs):
            key = generate_key()
            t0 = time.perf_counter()
            await client.obtain_certificate([f"single{i}.bench.example"], key, responder)
            times.append(time.perf_counter() - t0)
        keys = [generate_key() for _ in range(concurrent)]
        t0 = time.perf_counter()
        await asyncio.gather(
            *(
                client.obtain_certificate([f"conc{i}.bench.example"], keys[i], responder)
                for i in range(concurrent)
            )
        )
        wall = time.perf_counter() - t0
    return {"single_s": statistics.median(times), "singles": times, "concurrent_wall_s": wall}


# -- lbproxy: `lbproxy le request` through the running manager ------------------------------------

@dataclass(frozen=True, slots=True)
class LbProxy:
    """A running `lbproxy run` subprocess and what the benchmark needs to talk to it."""

    workdir: Path
    config: Path
    admin_url: str
    token: str
    https_port: int
    root_pem: str


def _config(peb: PebbleInstance, admin_port: int, https_port: int, ids: list[str]) -> str:
    certificates = ", ".join(json.dumps(i) for i in ids)
    return f"""state_dir = "state"
drain_timeout = {DRAIN}

[admin]
listen = "127.0.0.1:{admin_port}"

[letsencrypt]
directory_url = "{peb.directory_url}"
ca_bundle = "{peb.ca_bundle}"

# Pebble validates http-01 on 127.0.0.1:{peb.http_port}: this VS answers the challenges.
[[vs]]
name = "http"
listen = "127.0.0.1:{peb.http_port}"
  [[vs.subvs]]
  name = "site"
  rules = ["default"]
  not_available = {{ status = 200, body = "bench\\n" }}

# Serves each certificate as soon as it is in the store (missing ones are skipped until then).
[[vs]]
name = "https"
listen = "127.0.0.1:{https_port}"
protocol = "https"
tls = {{ certificates = [{certificates}] }}
  [[vs.subvs]]
  name = "site"
  rules = ["default"]
  not_available = {{ status = 200, body = "bench\\n" }}
"""


def _cli(lb: LbProxy, *args: str) -> list[str]:
    return [sys.executable, "-m", "lbproxy", *args, "-c", str(lb.config)]


def _env() -> dict[str, str]:
    path = os.environ.get("PYTHONPATH")
    return dict(os.environ, PYTHONPATH=str(ROOT) + (os.pathsep + path if path else ""))


def _admin(lb_url: str, token: str, method: str, path: str, body: object = None) -> object:
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(lb_url + path, data=data, method=method)
    req.add_header("Authorization", f"Bearer {token}")
    if data is not None:
        req.add_header("Content-Type", "application/json")
    with urllib.request.urlopen(req, timeout=COMMAND_TIMEOUT) as r:
        return json.loads(r.read())


@contextlib.contextmanager
def running_lbproxy(peb: PebbleInstance, workdir: Path, ids: list[str]) -> Iterator[LbProxy]:
    """`lbproxy run` on a fresh state directory until the block exits (SIGTERM, then wait)."""
    workdir.mkdir(parents=True)
    admin_port, https_port = free_port(), free_port()
    config = workdir / "lbproxy.toml"
    config.write_text(_config(peb, admin_port, https_port, ids))
    log = workdir / "lbproxy.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "lbproxy", "run", "-c", str(config), "--log-level", "warning",
             "--workers", "1"],
            stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, cwd=workdir,
            env=_env(),
        )  # fmt: skip
    try:
        admin_url = f"http://127.0.0.1:{admin_port}"
        token_file = workdir / "state" / "admin.token"
        deadline = time.monotonic() + START_DEADLINE
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"lbproxy exited at start-up:\n{log.read_text()[-2000:]}")
            try:
                token = token_file.read_text().strip()
                _admin(admin_url, token, "GET", "/api/le/account")
                break
            except (OSError, urllib.error.URLError):
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"lbproxy's admin API not up within {START_DEADLINE} s:\n"
                                   f"{log.read_text()[-2000:]}")
            time.sleep(START_POLL)
        yield LbProxy(workdir, config, admin_url, token, https_port, peb.root_pem())
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=DRAIN + 10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=5)


def _served(lb: LbProxy, name: str, ctx: ssl.SSLContext) -> bool:
    """One TLS handshake with SNI `name`: does the HTTPS VS present a certificate for it that
    chains to Pebble's root?"""
    try:
        with (
            socket.create_connection(("127.0.0.1", lb.https_port), timeout=2) as sock,
            ctx.wrap_socket(sock, server_hostname=name),
        ):
            return True
    except (OSError, ssl.SSLError):
        return False


def _wait_served(lb: LbProxy, name: str, ctx: ssl.SSLContext) -> None:
    deadline = time.monotonic() + SERVE_DEADLINE
    while not _served(lb, name, ctx):
        if time.monotonic() > deadline:
            raise RuntimeError(f"the HTTPS VS did not serve {name} within {SERVE_DEADLINE} s")
        time.sleep(SERVE_POLL)


def _le_request(lb: LbProxy, cert_id: str, name: str, ctx: ssl.SSLContext) -> tuple[float, float]:
    """(command returned, certificate served), seconds from the command's start."""
    cmd = _cli(lb, "le", "request", "--id", cert_id, "--cn", name, "--vs", "http")
    t0 = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=lb.workdir, env=_env(),
                          timeout=COMMAND_TIMEOUT, check=False)
    t_cmd = time.perf_counter() - t0
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({done.returncode}): {done.stderr.strip()}")
    _wait_served(lb, name, ctx)
    return t_cmd, time.perf_counter() - t0


def _api_request(lb: LbProxy, cert_id: str, name: str, ctx: ssl.SSLContext) -> float:
    """The same request as one admin API call (no CLI process): seconds to certificate served."""
    t0 = time.perf_counter()
    _admin(lb.admin_url, lb.token, "POST", "/api/le/certs",
           {"id": cert_id, "common_name": name, "vs": "http", "wait": True})
    _wait_served(lb, name, ctx)
    return time.perf_counter() - t0


def bench_lbproxy(peb: PebbleInstance, runs: int, workdir: Path) -> dict[str, object]:
    cli_ids = [f"lb{i}" for i in range(runs)]
    api_ids = [f"api{i}" for i in range(runs)]
    with running_lbproxy(peb, workdir, ["warmup", *cli_ids, *api_ids]) as lb:
        ctx = ssl.create_default_context(cadata=lb.root_pem)
        reg = subprocess.run(_cli(lb, "le", "register"), capture_output=True, text=True,
                             cwd=lb.workdir, env=_env(), timeout=COMMAND_TIMEOUT, check=False)
        if reg.returncode != 0:
            raise RuntimeError(f"lbproxy le register failed: {reg.stderr.strip()}")
        _le_request(lb, "warmup", "warmup.lb.bench.example", ctx)  # not timed
        cmd_times, served_times = [], []
        for cert_id in cli_ids:
            t_cmd, t_served = _le_request(lb, cert_id, f"{cert_id}.lb.bench.example", ctx)
            cmd_times.append(t_cmd)
            served_times.append(t_served)
        api_times = [_api_request(lb, i, f"{i}.lb.bench.example", ctx) for i in api_ids]
        fixed = []
        for _ in range(runs):
            t0 = time.perf_counter()
            subprocess.run(_cli(lb, "le", "account"), capture_output=True, cwd=lb.workdir,
                           env=_env(), timeout=COMMAND_TIMEOUT, check=True)
            fixed.append(time.perf_counter() - t0)
    return {
        "served_s": statistics.median(served_times),
        "served": served_times,
        "command_s": statistics.median(cmd_times),
        "commands": cmd_times,
        "api_served_s": statistics.median(api_times),
        "api_served": api_times,
        "cli_fixed_s": statistics.median(fixed),
        "cli_fixed": fixed,
    }


# -- certbot --------------------------------------------------------------------------------------

def bench_certbot(peb: PebbleInstance, runs: int, workdir: Path) -> dict[str, object] | None:
    certbot = shutil.which("certbot")
    if certbot is None or runs <= 0:
        return None
    env = dict(os.environ, REQUESTS_CA_BUNDLE=peb.ca_bundle)
    base = [
        certbot, "certonly", "--standalone", "--http-01-port", str(peb.http_port),
        "--server", peb.directory_url, "--register-unsafely-without-email", "--agree-tos",
        "-n", "--config-dir", str(workdir / "config"), "--work-dir", str(workdir / "work"),
        "--logs-dir", str(workdir / "logs"),
    ]  # fmt: skip

    def run(name: str) -> float:
        t0 = time.perf_counter()
        subprocess.run([*base, "-d", name], env=env, check=True, capture_output=True)
        return time.perf_counter() - t0

    first = run("certbot-register.bench.example")  # includes account registration, not counted
    times = [run(f"certbot{i}.bench.example") for i in range(runs)]
    version = subprocess.run([certbot, "--version"], capture_output=True, text=True).stdout
    return {
        "single_s": statistics.median(times),
        "singles": times,
        "first_with_registration_s": first,
        "version": version.strip(),
    }


def _num(d: Mapping[str, object], key: str) -> float:
    v = d[key]
    assert isinstance(v, float), f"{key}: {v!r}"
    return v


def _ms(seconds: float) -> str:
    return f"{seconds * 1000:.0f} ms"


def main() -> None:
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument("--runs", type=int, default=5,
                    help="timed certificates per client (the median is reported)")
    ap.add_argument("--concurrent", type=int, default=20)
    ap.add_argument("--certbot-runs", type=int, default=3, help="0 skips certbot")
    args = ap.parse_args()
    started = datetime.now(UTC)
    with tempfile.TemporaryDirectory() as tmp, start_pebble(Path(tmp) / "pebble") as peb:
        # One after the other: each client binds Pebble's validation port in turn.
        ours = asyncio.run(bench_acmeclient(peb, args.runs, args.concurrent))
        lb = bench_lbproxy(peb, args.runs, Path(tmp) / "lbproxy")
        theirs = bench_certbot(peb, args.certbot_runs, Path(tmp) / "certbot")
    result: dict[str, object] = {
        "date": started.isoformat(timespec="seconds"),
        "runs": args.runs,
        "acmeclient": ours,
        "lbproxy": lb,
        "certbot": theirs,
    }
    single, wall = _num(ours, "single_s"), _num(ours, "concurrent_wall_s")
    served = _num(lb, "served_s")
    result["lbproxy_over_acmeclient"] = served / single
    n = args.runs
    print(f"acmeclient alone: 1 certificate {_ms(single)} (median of {n})")
    print(f"lbproxy le request, command start to certificate served: {_ms(served)} (median of "
          f"{n}; {served / single:.1f}x acmeclient's {_ms(single)})")
    print(f"  command returned: {_ms(_num(lb, 'command_s'))}; the same request as one admin "
          f"API call: {_ms(_num(lb, 'api_served_s'))}; CLI fixed cost (lbproxy le account): "
          f"{_ms(_num(lb, 'cli_fixed_s'))}")
    print(
        f"acmeclient: {args.concurrent} concurrent certificates {wall:.2f} s wall "
        f"({wall / args.concurrent * 1000:.0f} ms per certificate)"
    )
    ratio = None
    if theirs is not None:
        cb = _num(theirs, "single_s")
        ratio = result["ratio_single"] = cb / single
        print(
            f"certbot ({theirs['version']}): 1 certificate {cb:.2f} s (median of "
            f"{args.certbot_runs}, existing account)"
        )
        print(f"ratio: acmeclient is {cb / single:.1f}x faster per certificate than certbot")
    else:
        print("certbot: not installed or skipped, no ratio")
    out = ROOT / "bench" / "results"
    out.mkdir(parents=True, exist_ok=True)
    (out / "acme_bench.json").write_text(json.dumps(result, indent=2))
    bar_ok = wall < 2.0 and (ratio is None or ratio >= 10)
    print("bar of issue 4 (>=10x certbot, 20 concurrent < 2 s):", "met" if bar_ok else "NOT met")


if __name__ == "__main__":
    main()
