"""Response-queue poisoning (issue 13): an attacker and a victim take turns on a VS with a single
real server, so that they share its pooled upstream connection. The attacker sends every vector of
the desync table that hides a whole request in its body (Connection naming Content-Length or
Transfer-Encoding, h2c and WebSocket upgrades with a body, obs-fold, pipelining after an error,
...), the victim a plain request with its own id on its keep-alive connection. The real server
answers a smuggled request only when the next request reaches its connection (desync_rig.py), so
one that got through always lands in the victim's response. Over 300 rounds the victim must always
get its own response."""

from __future__ import annotations

import asyncio

from lbproxy.config.model import Limits
from lbproxy.proxy import DataPlane

from ..proxy.conftest import make_vs, serve
from .desync_cases import CASES, HIDDEN
from .desync_http import Reader, close, send
from .desync_rig import Upstream, probe_request
from .smuggling_cases import MAX_BODY

ROUNDS = 300
ATTACK_WAIT = 1.0  # seconds for the attacker's own answer (lbproxy answers at once)
VICTIM_WAIT = 3.0  # seconds for the victim's answer
BUDGET = 90.0  # seconds for the whole test: bounds it even when every attack hangs
VECTORS = tuple(c for c in CASES if HIDDEN in c.raw)


async def test_the_victim_always_gets_its_own_response(dataplane: DataPlane) -> None:
    assert len(VECTORS) >= 20
    up = Upstream()
    await up.start()
    try:
        port = (await serve(dataplane, make_vs(ports=(up.port,),
                                               limits=Limits(max_body=MAX_BODY))))["web"]
        loop = asyncio.get_running_loop()
        wrong: list[tuple[int, str, int, bytes | None]] = []
        shared = reached = reconnects = 0
        async with asyncio.timeout(BUDGET):
            vr, vw = await asyncio.open_connection("127.0.0.1", port)
            victim = Reader(vr, 0.0)
            for i in range(ROUNDS):
                vector = VECTORS[i % len(VECTORS)]
                up.case = f"round {i}"
                ar, aw = await asyncio.open_connection("127.0.0.1", port)
                await send(aw, vector.raw)
                await Reader(ar, loop.time() + ATTACK_WAIT).response(
                    head_only=vector.raw.startswith(b"HEAD "))
                await close(aw)
                own = b"/victim-%d" % i
                if victim.eof or not await send(vw, probe_request(own)):
                    # lbproxy closed the victim's keep-alive connection: counted, then a new one.
                    reconnects += 1
                    await close(vw)
                    vr, vw = await asyncio.open_connection("127.0.0.1", port)
                    victim = Reader(vr, 0.0)
                    await send(vw, probe_request(own))
                victim.deadline = loop.time() + VICTIM_WAIT
                got = await victim.response(head_only=False)
                if (got.status, got.target) != (200, own):
                    wrong.append((i, vector.name, got.status, got.target))
                # Did the attack reach the real server, and on the connection the victim got?
                conns = {t: n for c, n, r in up.received if c == up.case
                         for t in (r.seen.target,)}
                attack = [n for t, n in conns.items() if t != own]
                if attack:
                    reached += 1
                    shared += conns.get(own) in attack
            await close(vw)
    finally:
        await up.stop()
    assert not wrong, wrong[:10]
    assert reconnects == 0
    # The test means something only if the two really shared the pooled connection.
    assert reached >= ROUNDS // 4 and shared >= 0.9 * reached, (reached, shared)
