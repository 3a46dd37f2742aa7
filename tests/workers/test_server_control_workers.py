"""Run-time real-server control with worker processes: the control process (this test's App)
forwards every override to both workers (and to a worker restarted later); which worker served a
request is read from the X-Lbproxy-Worker header (`worker_id_header`), recorded by the real
servers. Fresh connections come from fresh source ports, which the kernel hashes over the two
workers."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from pathlib import Path

from tests.support.opsapp import STEP, Backends, Running, backends, free_port, head, running

TRIES = 80  # fresh connections tried to reach both workers (each misses one with p = 1/2)


def _config(web: int, admin: int, bk: Backends) -> str:
    return head(admin, workers=2, extra="worker_id_header = true") + f"""
[[vs]]
name = "web"
listen = "127.0.0.1:{web}"
health_check = {{ type = "none" }}
real_servers = [ {{ address = "{bk.address(0)}" }}, {{ address = "{bk.address(1)}" }} ]
"""


async def _spread(r: Running, bk: Backends) -> dict[str, set[str]]:
    """Fresh connections until both workers have served at least 4 requests: which real server
    names each worker sent requests to."""
    bk.by_worker.clear()
    for _ in range(TRIES):
        status, _ = await r.get("web", fresh=True)
        assert status == 200
        per_worker: dict[str, int] = {}
        for (_, w), n in bk.by_worker.items():
            per_worker[w] = per_worker.get(w, 0) + n
        if len(per_worker) == 2 and min(per_worker.values()) >= 4:
            break
    out: dict[str, set[str]] = {}
    for name, w in bk.by_worker:
        out.setdefault(w, set()).add(name)
    return out


async def test_drain_and_disable_reach_every_worker(tmp_path: Path) -> None:
    async with backends(2) as bk:
        admin = free_port()
        async with running(tmp_path, _config(free_port(), admin, bk), admin_port=admin,
                           workers=2) as r:
            assert await _spread(r, bk) == {"0": {"b0", "b1"}, "1": {"b0", "b1"}}
            # A slow request in flight on one real server; drain that one.
            slow = asyncio.create_task(r.get("web", "/slow", fresh=True))
            busy = await bk.slow_one()
            other = f"b{1 - busy}"
            status, answer = await r.api("POST", "/api/servers",
                                         {"address": bk.address(busy), "state": "drain"})
            assert status == 200, answer
            # The stats of the workers (merged) say so, the slow request still in flight.
            (row,) = answer["servers"]
            assert (row["state"], row["active"]) == ("drain", 1)
            hits_before = bk.hits[f"b{busy}"]
            assert await _spread(r, bk) == {"0": {other}, "1": {other}}
            assert bk.hits[f"b{busy}"] == hits_before
            bk.release.set()
            assert await asyncio.wait_for(slow, STEP) == (200, f"b{busy}")
            _, status_doc = await r.api("GET", "/api/status")
            states = {s["address"]: s["state"]
                      for s in status_doc["services"][0]["real_servers"]}
            assert states == {bk.address(busy): "drain", bk.address(1 - busy): "enabled"}

            # A worker killed and restarted gets the overrides before it serves.
            sup = r.app.supervisor
            assert sup is not None
            victim = sup.workers()[0]
            os.kill(victim["pid"], signal.SIGKILL)
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline:
                w = sup.workers()[0]
                if w["state"] == "running" and w["pid"] != victim["pid"]:
                    break
                await asyncio.sleep(0.05)
            w = sup.workers()[0]
            assert w["state"] == "running" and w["pid"] != victim["pid"]
            assert await _spread(r, bk) == {"0": {other}, "1": {other}}

            # Enable the drained one, disable the other: every worker follows.
            await r.api("POST", "/api/servers", {"address": bk.address(busy),
                                                 "state": "enabled"})
            status, _ = await r.api("POST", "/api/servers", {"address": bk.address(1 - busy),
                                                             "state": "disabled"})
            assert status == 200
            assert await _spread(r, bk) == {"0": {f"b{busy}"}, "1": {f"b{busy}"}}
