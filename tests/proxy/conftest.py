"""Fixtures for the data plane tests: upstream servers, a running DataPlane, a raw HTTP client."""

from __future__ import annotations

import asyncio
import json
import os
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import pytest
from aiohttp import WSMsgType, web

from lbproxy.config.model import (
    Address,
    Config,
    HealthCheck,
    HealthCheckType,
    RealServer,
    VirtualService,
)
from lbproxy.proxy import DataPlane
from lbproxy.runtime import Runtime

NO_CHECK = HealthCheck(type=HealthCheckType.NONE)


if os.environ.get("LBPROXY_TEST_UVLOOP") == "1":
    # The data plane runs on uvloop in production; LBPROXY_TEST_UVLOOP=1 runs these tests on it.
    @pytest.fixture(scope="session")
    def event_loop_policy() -> asyncio.AbstractEventLoopPolicy:
        import uvloop

        policy: asyncio.AbstractEventLoopPolicy = uvloop.EventLoopPolicy()
        return policy


def servers(*ports: int) -> tuple[RealServer, ...]:
    return tuple(RealServer(Address("127.0.0.1", p)) for p in ports)


def make_vs(name: str = "web", ports: tuple[int, ...] = (), **kw: Any) -> VirtualService:
    kw.setdefault("health_check", NO_CHECK)
    kw.setdefault("real_servers", servers(*ports))
    return VirtualService(name=name, listen=Address("127.0.0.1", 0), **kw)


def runtime(*vss: VirtualService, generation: int = 1, **kw: Any) -> Runtime:
    return Runtime(generation, Config(virtual_services=vss, **kw))


@dataclass
class Upstream:
    """An aiohttp real server that records what it saw."""

    port: int
    peers: set[int] = field(default_factory=set)
    requests: int = 0
    runner: web.AppRunner | None = None
    health: int = 200  # what GET /hc answers
    probes: list[int] = field(default_factory=list)  # the statuses /hc answered, in order
    probed: asyncio.Event = field(default_factory=asyncio.Event)  # set at every /hc answer
    arrived: asyncio.Event = field(default_factory=asyncio.Event)  # set at every request

    async def wait_requests(self, n: int) -> None:
        """Until this real server has received `n` requests in all (each one sets `arrived`)."""
        while self.requests < n:
            self.arrived.clear()
            await self.arrived.wait()


async def _upstream_app(up: Upstream) -> web.Application:
    async def echo(req: web.Request) -> web.StreamResponse:
        body = await req.read()
        data = {"method": req.method, "path": req.path_qs,
                "headers": [[k, v] for k, v in req.headers.items()],
                "body_len": len(body), "body": body[:200].decode("latin-1"),
                "port": up.port}
        return web.json_response(data)

    async def sink(req: web.Request) -> web.StreamResponse:
        n = 0
        while True:
            chunk = await req.content.readany()
            if not chunk:
                break
            n += len(chunk)
        return web.Response(text=str(n))

    async def big(req: web.Request) -> web.StreamResponse:
        n = int(req.query["n"])
        chunk = b"x" * (64 * 1024)
        resp = web.StreamResponse()
        if req.query.get("cl"):
            resp.content_length = n
        await resp.prepare(req)
        while n > 0:
            piece = chunk if n >= len(chunk) else chunk[:n]
            await resp.write(piece)
            n -= len(piece)
        await resp.write_eof()
        return resp

    async def status(req: web.Request) -> web.StreamResponse:
        code = int(req.match_info["code"])
        if code in (204, 304):
            return web.Response(status=code, headers={"ETag": '"x"'})
        return web.Response(status=code, text=f"status {code}")

    async def slow(req: web.Request) -> web.StreamResponse:
        await asyncio.sleep(float(req.query.get("d", "0.2")))
        return web.Response(text="slow", headers={"X-Upstream": str(up.port)})

    async def ws(req: web.Request) -> web.StreamResponse:
        sock = web.WebSocketResponse()
        await sock.prepare(req)
        async for msg in sock:
            if msg.type == WSMsgType.TEXT:
                await sock.send_str("echo:" + msg.data)
            elif msg.type == WSMsgType.BINARY:
                await sock.send_bytes(msg.data)
        return sock

    async def hc(req: web.Request) -> web.StreamResponse:
        up.probes.append(up.health)
        up.probed.set()
        return web.Response(status=up.health, text="hc")

    async def hop(req: web.Request) -> web.StreamResponse:
        return web.Response(text="hop", headers={"Keep-Alive": "timeout=5", "X-Kept": "1",
                                                 "Proxy-Connection": "keep-alive"})

    @web.middleware
    async def record(req: web.Request, handler: Any) -> web.StreamResponse:
        up.requests += 1
        up.arrived.set()
        peer = req.transport.get_extra_info("peername") if req.transport else None
        if peer:
            up.peers.add(peer[1])
        resp: web.StreamResponse = await handler(req)
        return resp

    app = web.Application(middlewares=[record])
    app.router.add_route("*", "/sink", sink)
    app.router.add_get("/big", big)
    app.router.add_route("*", "/status/{code}", status)
    app.router.add_get("/slow", slow)
    app.router.add_get("/ws", ws)
    app.router.add_get("/hop", hop)
    app.router.add_get("/hc", hc)
    app.router.add_route("*", "/{tail:.*}", echo)
    return app


async def start_upstream() -> Upstream:
    up = Upstream(0)
    runner = web.AppRunner(await _upstream_app(up), access_log=None, shutdown_timeout=0.1)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    server = site._server
    assert server is not None
    up.port = server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    up.runner = runner
    return up


@pytest.fixture
async def upstream() -> AsyncIterator[Upstream]:
    up = await start_upstream()
    yield up
    assert up.runner is not None
    await up.runner.cleanup()


@pytest.fixture
async def upstream2() -> AsyncIterator[Upstream]:
    up = await start_upstream()
    yield up
    assert up.runner is not None
    await up.runner.cleanup()


@pytest.fixture
async def dataplane() -> AsyncIterator[DataPlane]:
    dp = DataPlane()
    yield dp
    await dp.shutdown(0.5)


class RawUpstream:
    """A scripted real server: `handler(reader, writer)` per connection."""

    def __init__(self, handler: Callable[[asyncio.StreamReader, asyncio.StreamWriter],
                                         Awaitable[None]]) -> None:
        self.handler = handler
        self.connections = 0
        self.server: asyncio.Server | None = None
        self.port = 0

    async def __aenter__(self) -> RawUpstream:
        async def run(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
            self.connections += 1
            try:
                await self.handler(r, w)
            except (ConnectionError, asyncio.IncompleteReadError):
                pass
            finally:
                w.close()

        self.server = await asyncio.start_server(run, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self.server is not None
        self.server.close()


async def read_head(r: asyncio.StreamReader) -> bytes:
    return await r.readuntil(b"\r\n\r\n")


def answering(responses: Sequence[bytes]) -> Callable[[asyncio.StreamReader, asyncio.StreamWriter],
                                                      Awaitable[None]]:
    """A RawUpstream handler that answers each request head with the next of `responses`, as
    written (bounded by their number)."""
    async def handler(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        for resp in responses:
            await read_head(r)
            w.write(resp)
            await w.drain()
    return handler


@dataclass
class Response:
    status: int
    headers: list[tuple[str, str]]
    body: bytes
    raw_head: bytes = b""

    def header(self, name: str) -> str | None:
        for k, v in self.headers:
            if k.lower() == name.lower():
                return v
        return None

    def json(self) -> Any:
        return json.loads(self.body)


class Client:
    """A raw HTTP/1.1 client on one connection: exact bytes out, responses parsed strictly."""

    def __init__(self, r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        self.r = r
        self.w = w

    @classmethod
    async def connect(cls, port: int) -> Client:
        r, w = await asyncio.open_connection("127.0.0.1", port)
        return cls(r, w)

    async def send(self, data: bytes) -> None:
        self.w.write(data)
        await self.w.drain()

    async def request(self, method: str = "GET", path: str = "/", host: str = "example.com",
                      headers: tuple[tuple[str, str], ...] = (), body: bytes | None = None
                      ) -> Response:
        await self.send(build(method, path, host, headers, body))
        return await self.response(head=method == "HEAD")

    async def response(self, head: bool = False) -> Response:
        raw = await read_head(self.r)
        lines = raw.decode("latin-1").split("\r\n")
        status = int(lines[0].split(" ")[1])
        headers = []
        for line in lines[1:]:
            if line:
                k, _, v = line.partition(":")
                headers.append((k.strip(), v.strip()))
        resp = Response(status, headers, b"", raw)
        if head or status < 200 or status in (204, 304):
            return resp
        te = resp.header("Transfer-Encoding")
        cl = resp.header("Content-Length")
        if te and "chunked" in te.lower():
            parts = []
            while True:
                size = int((await self.r.readuntil(b"\r\n")).split(b";")[0], 16)
                if size == 0:
                    await self.r.readuntil(b"\r\n")
                    break
                parts.append(await self.r.readexactly(size))
                await self.r.readexactly(2)
            resp.body = b"".join(parts)
        elif cl is not None:
            resp.body = await self.r.readexactly(int(cl))
        else:
            resp.body = await self.r.read()
        return resp

    async def closed(self) -> bool:
        """True if the server closed the connection (EOF) without sending anything more."""
        try:
            return await self.r.read(1) == b""
        except ConnectionError:
            return True

    def close(self) -> None:
        self.w.close()


def build(method: str = "GET", path: str = "/", host: str = "example.com",
          headers: tuple[tuple[str, str], ...] = (), body: bytes | None = None) -> bytes:
    lines = [f"{method} {path} HTTP/1.1", f"Host: {host}"]
    lines += [f"{k}: {v}" for k, v in headers]
    if body is not None and not any(k.lower() in ("content-length", "transfer-encoding")
                                    for k, _ in headers):
        lines.append(f"Content-Length: {len(body)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + (body or b"")


async def serve(dp: DataPlane, *vss: VirtualService, **kw: Any) -> dict[str, int]:
    """Apply a config with these VSs and return VS name -> bound port."""
    await dp.apply(runtime(*vss, **kw))
    return {name: addr[1] for name, addr in dp.listening_ports().items()}

