"""Transport failures get their own types; the standalone responder answers only what it should."""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import pytest
import trustme
from aiohttp import web

from acmeclient import AcmeClient, StandaloneHttp01Responder, generate_key
from acmeclient.errors import (
    AcmeTimeoutError,
    BadNonceError,
    ClientStateError,
    MalformedResponseError,
    NetworkError,
    RateLimitedError,
)
from tests.support.pebble import free_port

PROBLEM = "application/problem+json"


@dataclass
class Server:
    base: str
    bundle: str
    posts: int = 0
    never: asyncio.Event = field(default_factory=asyncio.Event)
    new_order: Callable[[], web.Response] = lambda: web.Response(status=500)


@pytest.fixture
async def server(tmp_path: Path) -> AsyncIterator[Server]:
    tls = trustme.CA()
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    tls.issue_cert("127.0.0.1").configure_cert(ctx)
    bundle = str(tmp_path / "ca.pem")
    tls.cert_pem.write_to_path(bundle)
    port = free_port()
    srv = Server(f"https://127.0.0.1:{port}", bundle)

    async def directory(_: web.Request) -> web.Response:
        b = srv.base
        return web.json_response(
            {"newNonce": b + "/nonce", "newAccount": b + "/acct", "newOrder": b + "/order",
             "revokeCert": b + "/rev", "keyChange": b + "/kc"}
        )  # fmt: skip

    async def nonce(_: web.Request) -> web.Response:
        return web.Response(headers={"Replay-Nonce": f"n{srv.posts}"})

    async def acct(_: web.Request) -> web.Response:
        srv.posts += 1
        return web.json_response(
            {"type": "urn:ietf:params:acme:error:badNonce", "detail": "stale"},
            status=400,
            content_type=PROBLEM,
            headers={"Replay-Nonce": f"fresh{srv.posts}"},
        )

    async def order(_: web.Request) -> web.Response:
        srv.posts += 1
        return srv.new_order()

    async def hang(_: web.Request) -> web.Response:
        await srv.never.wait()  # never set: the client's deadline must end this
        return web.Response()

    app = web.Application()
    app.router.add_get("/dir", directory)
    app.router.add_get("/nonce", nonce)  # aiohttp adds HEAD too
    app.router.add_post("/acct", acct)
    app.router.add_post("/order", order)
    app.router.add_get("/hang", hang)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port, ssl_context=ctx).start()
    yield srv
    srv.never.set()
    await runner.cleanup()


async def test_bad_nonce_is_retried_then_surfaces(server: Server) -> None:
    async with AcmeClient(
        server.base + "/dir", generate_key(), ca_bundle=server.bundle, bad_nonce_retries=4
    ) as c:
        with pytest.raises(BadNonceError) as info:
            await c.new_account(terms_of_service_agreed=True)
        assert server.posts == 5 and c.bad_nonce_count == 5
        assert info.value.status == 400 and info.value.detail == "stale"


async def test_rate_limit_with_retry_after(server: Server) -> None:
    server.new_order = lambda: web.json_response(
        {"type": "urn:ietf:params:acme:error:rateLimited", "detail": "slow down"},
        status=429,
        content_type=PROBLEM,
        headers={"Retry-After": "3600", "Replay-Nonce": "x"},
    )
    async with AcmeClient(
        server.base + "/dir", generate_key(), account_url="https://acct/1", ca_bundle=server.bundle
    ) as c:
        with pytest.raises(RateLimitedError) as info:
            await c.new_order(["a.example"])
    assert info.value.retry_after == 3600.0 and info.value.status == 429
    assert server.posts == 1  # not retried


async def test_html_error_page_is_a_malformed_response(server: Server) -> None:
    server.new_order = lambda: web.Response(status=502, text="<html>bad gateway</html>",
                                            content_type="text/html")  # fmt: skip
    async with AcmeClient(
        server.base + "/dir", generate_key(), account_url="https://acct/1", ca_bundle=server.bundle
    ) as c:
        with pytest.raises(MalformedResponseError, match="502"):
            await c.new_order(["a.example"])


async def test_non_json_success_is_a_malformed_response(server: Server) -> None:
    server.new_order = lambda: web.Response(text="ok", headers={"Location": "x"})
    async with AcmeClient(
        server.base + "/dir", generate_key(), account_url="https://acct/1", ca_bundle=server.bundle
    ) as c:
        with pytest.raises(MalformedResponseError, match="JSON"):
            await c.new_order(["a.example"])


async def test_every_request_has_a_deadline(server: Server) -> None:
    async with AcmeClient(
        server.base + "/hang", generate_key(), ca_bundle=server.bundle, timeout=0.2
    ) as c:
        with pytest.raises(AcmeTimeoutError, match=r"0\.2"):
            await c.directory()


async def test_connection_refused_is_a_network_error() -> None:
    async with AcmeClient(f"https://127.0.0.1:{free_port()}/dir", generate_key()) as c:
        with pytest.raises(NetworkError):
            await c.directory()


def test_plain_http_directory_is_refused() -> None:
    with pytest.raises(ClientStateError, match="HTTPS"):
        AcmeClient("http://127.0.0.1/dir", generate_key())


async def test_standalone_responder_checks_host_and_token() -> None:
    async with (
        StandaloneHttp01Responder("127.0.0.1", 0) as r,
        aiohttp.ClientSession() as s,
    ):
        await r.present("Example.COM", "tok_en-1", "tok_en-1.THUMB")
        url = f"http://127.0.0.1:{r.port}/.well-known/acme-challenge/"
        async with s.get(url + "tok_en-1", headers={"Host": "example.com:5002"}) as resp:
            assert resp.status == 200 and await resp.text() == "tok_en-1.THUMB"
            assert resp.content_type == "text/plain"
        async with s.get(url + "tok_en-1", headers={"Host": "other.example"}) as resp:
            assert resp.status == 404
        async with s.get(url + "nope", headers={"Host": "example.com"}) as resp:
            assert resp.status == 404
        await r.cleanup("example.com", "tok_en-1")
        async with s.get(url + "tok_en-1", headers={"Host": "example.com"}) as resp:
            assert resp.status == 404
        with pytest.raises(ValueError, match="base64url"):
            await r.present("example.com", "../etc", "x")
