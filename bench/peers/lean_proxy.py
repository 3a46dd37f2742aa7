"""A calibration floor for the HTTP bench: the leanest asyncio.Protocol + httptools + uvloop relay.

Not a product and not lbproxy: no routing, no access log, no timeouts, no flow control, no
header rewriting, GET-style requests only (a body is relayed only if it arrives with its head).
It measures what any Python relay of this design costs on the machine at hand, so the gap between
it and lbproxy is lbproxy's own overhead (the issue quotes such a prototype at 1.24x nginx's CPU).

    python bench/peers/lean_proxy.py LISTEN_PORT BACKEND_PORT
"""

from __future__ import annotations

import asyncio
import signal
import sys

import httptools
import uvloop

# A pooled upstream connection is kept for the next request; more idle ones than this are closed.
MAX_IDLE = 1024


class Upstream(asyncio.Protocol):
    def __init__(self, pool: list[Upstream]) -> None:
        self.pool = pool
        self.parser = httptools.HttpResponseParser(self)
        self.transport: asyncio.Transport | None = None
        self.client: Client | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        client = self.client
        if client is not None and client.transport is not None:
            client.transport.write(data)
        self.parser.feed_data(data)

    def on_message_complete(self) -> None:
        client, self.client = self.client, None
        if len(self.pool) < MAX_IDLE:
            self.pool.append(self)
        elif self.transport is not None:
            self.transport.close()
        if client is not None:
            client.busy = False

    def connection_lost(self, exc: Exception | None) -> None:
        if self in self.pool:
            self.pool.remove(self)
        if self.client is not None and self.client.transport is not None:
            self.client.transport.close()


class Client(asyncio.Protocol):
    def __init__(self, loop: asyncio.AbstractEventLoop, backend: tuple[str, int],
                 pool: list[Upstream]) -> None:
        self.loop = loop
        self.backend = backend
        self.pool = pool
        self.parser = httptools.HttpRequestParser(self)
        self.transport: asyncio.Transport | None = None
        self.buf: list[bytes] = []
        self.busy = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.buf.append(data)
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError:
            if self.transport is not None:
                self.transport.close()

    def on_message_complete(self) -> None:
        raw = b"".join(self.buf)
        self.buf = []
        self.busy = True
        if self.pool:
            up = self.pool.pop()
            up.client = self
            if up.transport is not None:
                up.transport.write(raw)
        else:
            self.loop.create_task(self._connect(raw))

    async def _connect(self, raw: bytes) -> None:
        try:
            _, up = await self.loop.create_connection(lambda: Upstream(self.pool), *self.backend)
        except OSError:
            if self.transport is not None:
                self.transport.close()
            return
        up.client = self
        if up.transport is not None:
            up.transport.write(raw)


async def serve(port: int, backend_port: int) -> None:
    loop = asyncio.get_running_loop()
    pool: list[Upstream] = []
    server = await loop.create_server(lambda: Client(loop, ("127.0.0.1", backend_port), pool),
                                      "127.0.0.1", port, backlog=4096)
    stop = asyncio.Event()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_signal_handler(signal.SIGINT, stop.set)
    await stop.wait()
    server.close()


def main() -> None:
    uvloop.run(serve(int(sys.argv[1]), int(sys.argv[2])))


if __name__ == "__main__":
    main()
