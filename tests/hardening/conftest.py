"""Fixtures for the hardening tests: a real server that records every byte it receives."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

from lbproxy.proxy import DataPlane

# The data plane fixtures and helpers of tests/proxy are reused as they are.
from ..proxy.conftest import Upstream, start_upstream

__all__ = ["DataPlane", "Upstream"]

OK = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"


class RecordingUpstream:
    """Accepts connections, records all bytes; answers 200 "ok" per request head it sees."""

    def __init__(self) -> None:
        self.received = bytearray()
        self.connections = 0
        self.heads = 0
        self.port = 0
        self.server: asyncio.Server | None = None

    async def start(self) -> None:
        async def run(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
            self.connections += 1
            buf = b""
            try:
                while True:
                    data = await r.read(65536)
                    if not data:
                        break
                    self.received += data
                    buf += data
                    while b"\r\n\r\n" in buf:
                        _, _, buf = buf.partition(b"\r\n\r\n")
                        self.heads += 1
                        w.write(OK)
            except ConnectionError:
                pass
            finally:
                w.close()

        self.server = await asyncio.start_server(run, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]

    def close(self) -> None:
        if self.server is not None:
            self.server.close()


@pytest.fixture
async def recorder() -> AsyncIterator[RecordingUpstream]:
    rec = RecordingUpstream()
    await rec.start()
    yield rec
    rec.close()


@pytest.fixture
async def dataplane() -> AsyncIterator[DataPlane]:
    dp = DataPlane()
    yield dp
    await dp.shutdown(0.5)


@pytest.fixture
async def upstream() -> AsyncIterator[Upstream]:
    up = await start_upstream()
    yield up
    assert up.runner is not None
    await up.runner.cleanup()
