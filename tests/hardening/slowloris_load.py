"""Shared by test_slowloris.py and bench/slowloris.py: slow-header connections held open against a
listener while a bounded loop of normal keep-alive clients measures its latency."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field

SLOW_HEAD = b"GET / HTTP/1.1\r\nHost: example.com\r\nX-Slow: "
NORMAL = b"GET /n HTTP/1.1\r\nHost: example.com\r\n\r\n"


@dataclass
class LoadResult:
    latencies: list[float] = field(default_factory=list)
    errors: int = 0

    def p(self, q: float) -> float:
        xs = sorted(self.latencies)
        return xs[min(len(xs) - 1, int(q * len(xs)))] if xs else float("inf")


async def load_loop(port: int, clients: int, requests: int, max_seconds: float) -> LoadResult:
    """`clients` keep-alive connections, each sending up to `requests` requests one after the
    other (stops early at `max_seconds`); every answer must be a 200."""
    res = LoadResult()
    stop = time.monotonic() + max_seconds

    async def one() -> None:
        try:
            r, w = await asyncio.open_connection("127.0.0.1", port)
        except OSError:
            res.errors += 1
            return
        try:
            for _ in range(requests):
                if time.monotonic() > stop:
                    break
                t0 = time.perf_counter()
                w.write(NORMAL)
                head = await r.readuntil(b"\r\n\r\n")
                if not head.startswith(b"HTTP/1.1 200"):
                    res.errors += 1
                    break
                i = head.lower().find(b"content-length:")
                n = int(head[i + 15:head.find(b"\r\n", i)]) if i >= 0 else 0
                await r.readexactly(n)
                res.latencies.append(time.perf_counter() - t0)
        except (OSError, asyncio.IncompleteReadError, ValueError):
            res.errors += 1
        finally:
            w.close()

    await asyncio.gather(*(one() for _ in range(clients)))
    return res


class SlowClients:
    """`n` connections that send an incomplete head, then one more byte every `every` seconds for
    `drip_for` seconds (stop before the server's head timeout: a byte that arrives after the
    server's 408 and close makes the client's kernel see a reset, which can discard the 408)."""

    def __init__(self, port: int, n: int, every: float, drip_for: float) -> None:
        self.port = port
        self.n = n
        self.every = every
        self.drip_for = drip_for
        self.conns: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []
        self.answers: list[bytes] = []
        self._trickle: asyncio.Task[None] | None = None

    async def open(self) -> None:
        for _ in range(self.n):
            r, w = await asyncio.open_connection("127.0.0.1", self.port)
            w.write(SLOW_HEAD)
            self.conns.append((r, w))
        self._trickle = asyncio.get_running_loop().create_task(self._drip())

    async def _drip(self) -> None:
        # One tenth of the connections per tenth of `every`: each gets a byte every `every`
        # seconds without a burst of `n` writes in one loop iteration.
        slices = 10
        i = 0
        end = time.monotonic() + self.drip_for
        while time.monotonic() < end:
            await asyncio.sleep(self.every / slices)  # the attack's own pace, not a sync
            for _, w in self.conns[i::slices]:
                if not w.is_closing():
                    try:
                        w.write(b"a")
                    except (OSError, RuntimeError):
                        pass
            i = (i + 1) % slices

    async def wait_closed(self) -> tuple[int, int]:
        """Wait until the server closed every connection; (closed, answered with 408)."""
        closed = answered = 0
        for r, w in self.conns:
            try:
                data = await r.read()
            except ConnectionError:
                data = b""
            closed += 1
            answered += data.startswith(b"HTTP/1.1 408")
            self.answers.append(data)
            w.close()
        self.stop()
        return closed, answered

    def stop(self) -> None:
        if self._trickle is not None:
            self._trickle.cancel()
        for _, w in self.conns:
            w.close()
