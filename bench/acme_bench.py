"""ACME issuance benchmark: acmeclient against Pebble, with certbot timed in the same run.

    .venv/bin/python bench/acme_bench.py [--singles 5] [--concurrent 20] [--certbot-runs 3]

Starts its own Pebble (PEBBLE_VA_NOSLEEP=1, no nonce rejects, no authz reuse) on free loopback
ports, registers one account per client (not timed), then times:
  * acmeclient: one certificate at a time (median of --singles), and --concurrent certificates
    at once (wall time of asyncio.gather);
  * certbot (Debian `certbot`, if installed): `certbot certonly --standalone` per certificate with
    an existing account (median of --certbot-runs), each with a fresh name.
Prints the figures and the per-certificate ratio, and writes bench/results/acme_bench.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from acmeclient import AcmeClient, StandaloneHttp01Responder, generate_key  # noqa: E402
from tests.support.pebble import PebbleInstance, start_pebble  # noqa: E402


async def bench_acmeclient(
    peb: PebbleInstance, singles: int, concurrent: int
) -> dict[str, float | list[float]]:
    async with (
        StandaloneHttp01Responder("127.0.0.1", peb.http_port) as responder,
        AcmeClient(peb.directory_url, generate_key(), ca_bundle=peb.ca_bundle) as client,
    ):
        await client.new_account(terms_of_service_agreed=True)
        # warm-up (TLS session, nonce pool), not timed
        await client.obtain_certificate(["warmup.bench.example"], generate_key(), responder)
        times = []
        for i in range(singles):
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


def bench_certbot(peb: PebbleInstance, runs: int, workdir: Path) -> dict[str, object] | None:
    certbot = shutil.which("certbot")
    if certbot is None:
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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--singles", type=int, default=5)
    ap.add_argument("--concurrent", type=int, default=20)
    ap.add_argument("--certbot-runs", type=int, default=3)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp, start_pebble(Path(tmp) / "pebble") as peb:
        ours = asyncio.run(bench_acmeclient(peb, args.singles, args.concurrent))
        theirs = bench_certbot(peb, args.certbot_runs, Path(tmp) / "certbot")
    result: dict[str, object] = {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "acmeclient": ours,
        "certbot": theirs,
    }
    single = float(ours["single_s"])  # type: ignore[arg-type]
    wall = float(ours["concurrent_wall_s"])  # type: ignore[arg-type]
    print(f"acmeclient: 1 certificate {single * 1000:.0f} ms (median of {args.singles})")
    print(
        f"acmeclient: {args.concurrent} concurrent certificates {wall:.2f} s wall "
        f"({wall / args.concurrent * 1000:.0f} ms per certificate)"
    )
    if theirs is not None:
        cb = float(theirs["single_s"])  # type: ignore[arg-type]
        result["ratio_single"] = cb / single
        print(
            f"certbot ({theirs['version']}): 1 certificate {cb:.2f} s (median of "
            f"{args.certbot_runs}, existing account)"
        )
        print(f"ratio: acmeclient is {cb / single:.1f}x faster per certificate than certbot")
    else:
        print("certbot: not installed, no ratio")
    out = ROOT / "bench" / "results"
    out.mkdir(parents=True, exist_ok=True)
    (out / "acme_bench.json").write_text(json.dumps(result, indent=2))
    bar_ok = wall < 2.0 and (theirs is None or float(result["ratio_single"]) >= 10)  # type: ignore[arg-type]
    print("bar (>=10x certbot, 20 concurrent < 2 s):", "met" if bar_ok else "NOT met")


if __name__ == "__main__":
    main()
