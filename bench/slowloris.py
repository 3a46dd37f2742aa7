"""Slowloris against lbproxy (issue 6): slow-header connections held open while a bounded loop of
normal keep-alive clients measures p50/p99; then every slow connection must be closed by the head
timeout with a 408. lbproxy (DataPlane on uvloop) and its real server run in a child process; the
attack and the load run here.

    .venv/bin/python bench/slowloris.py [--slow 500] [--head-timeout 5] [--clients 8]
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import multiprocessing as mp
import sys
import time
from multiprocessing.connection import Connection
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from tests.hardening.slowloris_load import SlowClients, load_loop  # noqa: E402

READY_TIMEOUT = 10.0  # seconds for the child to listen
OK = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"


def serve(head_timeout: float, conn: Connection) -> None:
    """The child: a real server answering 200 "ok" and lbproxy in front of it."""
    import uvloop

    from lbproxy.config.model import (
        Address,
        Config,
        HealthCheck,
        HealthCheckType,
        RealServer,
        Timeouts,
        VirtualService,
    )
    from lbproxy.proxy import DataPlane
    from lbproxy.runtime import Runtime

    async def main() -> None:
        async def upstream(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
            buf = b""
            try:
                while data := await r.read(65536):
                    buf += data
                    while b"\r\n\r\n" in buf:
                        _, _, buf = buf.partition(b"\r\n\r\n")
                        w.write(OK)
            except ConnectionError:
                pass
            finally:
                w.close()

        srv = await asyncio.start_server(upstream, "127.0.0.1", 0)
        up = srv.sockets[0].getsockname()[1]
        dp = DataPlane()
        vs = VirtualService(name="bench", listen=Address("127.0.0.1", 0),
                            real_servers=(RealServer(Address("127.0.0.1", up)),),
                            health_check=HealthCheck(type=HealthCheckType.NONE),
                            timeouts=Timeouts(head=head_timeout))
        await dp.apply(Runtime(1, Config(virtual_services=(vs,))))
        conn.send(dp.listening_ports()["bench"][1])
        stop = asyncio.Event()
        asyncio.get_running_loop().add_reader(conn.fileno(), stop.set)  # the parent's "stop"
        await stop.wait()
        conn.recv()
        conn.send(dp.stats()["virtual_services"]["bench"]["limit_rejections"])
        await dp.shutdown(1.0)

    uvloop.run(main())


async def attack(port: int, args: argparse.Namespace) -> dict[str, float]:
    await load_loop(port, args.clients, 200, 2.0)  # warm-up
    base = await load_loop(port, args.clients, args.requests, args.seconds)
    slow = SlowClients(port, args.slow, every=1.0,
                       drip_for=args.head_timeout - 1.0)
    t0 = time.monotonic()
    await slow.open()
    opened = time.monotonic() - t0
    loaded = await load_loop(port, args.clients, args.requests,
                             min(args.seconds, args.head_timeout - opened - 0.5))
    closed, answered = await slow.wait_closed()
    took = time.monotonic() - t0
    return {"base_n": len(base.latencies), "base_p50": base.p(0.5), "base_p99": base.p(0.99),
            "base_errors": base.errors, "load_n": len(loaded.latencies),
            "load_p50": loaded.p(0.5), "load_p99": loaded.p(0.99), "load_errors": loaded.errors,
            "opened_s": opened, "closed": closed, "answered_408": answered, "all_closed_s": took}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--slow", type=int, default=500, help="slow-header connections")
    ap.add_argument("--head-timeout", type=float, default=5.0, help="lbproxy's head timeout (s)")
    ap.add_argument("--clients", type=int, default=8, help="normal keep-alive clients")
    ap.add_argument("--requests", type=int, default=2000, help="requests per normal client")
    ap.add_argument("--seconds", type=float, default=3.0, help="bound of each load phase (s)")
    args = ap.parse_args()
    parent, child = mp.Pipe()
    proc = mp.get_context("spawn").Process(target=serve, args=(args.head_timeout, child))
    proc.start()
    try:
        if not parent.poll(READY_TIMEOUT):
            print("lbproxy did not start", file=sys.stderr)
            return 2
        port = parent.recv()
        r = asyncio.run(attack(port, args))
        parent.send("stop")
        limits = parent.recv() if parent.poll(READY_TIMEOUT) else {}
    finally:
        proc.join(10)
        if proc.is_alive():
            proc.kill()
    ratio = r["load_p99"] / r["base_p99"]
    stamp = dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC")
    print(f"# {stamp}: {args.slow} slow-header connections, head timeout {args.head_timeout}s, "
          f"{args.clients} normal clients")
    print(f"unloaded: {r['base_n']:.0f} requests, p50 {r['base_p50'] * 1e3:.2f} ms, "
          f"p99 {r['base_p99'] * 1e3:.2f} ms, errors {r['base_errors']:.0f}")
    print(f"loaded:   {r['load_n']:.0f} requests, p50 {r['load_p50'] * 1e3:.2f} ms, "
          f"p99 {r['load_p99'] * 1e3:.2f} ms, errors {r['load_errors']:.0f} "
          f"(p99 ratio {ratio:.2f}x, bar < 3x)")
    print(f"slow connections: opened in {r['opened_s']:.2f}s; closed {r['closed']:.0f}, "
          f"answered 408 {r['answered_408']:.0f}, all closed {r['all_closed_s']:.2f}s after the "
          f"first opened; head_timeout counter {limits.get('head_timeout')}")
    ok = (ratio < 3 and r["load_errors"] == 0 and r["closed"] == args.slow
          and r["answered_408"] == args.slow)
    print("PASS" if ok else "FAIL")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
