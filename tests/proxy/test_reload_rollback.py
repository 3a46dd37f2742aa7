"""A reload that fails leaves every listener exactly as it was (the same socket, the same open
connections), a later good reload still applies, and `stats()` says "listening" only for a socket
that is really accepting."""

from __future__ import annotations

import asyncio
import dataclasses
import socket
import ssl
from collections.abc import AsyncIterator

import pytest
import trustme

from lbproxy.config.model import Address, Config, Protocol, TLSSettings, VirtualService
from lbproxy.errors import LBProxyError
from lbproxy.proxy import DataPlane
from lbproxy.proxy.errors import ListenError
from lbproxy.proxy.tls import TLSSetupError
from lbproxy.runtime import RuntimeStore

from .conftest import NO_CHECK, Client, Upstream, runtime
from .conftest import servers as rs

T = 10


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


class TLS:
    """A TLS factory whose certificate "fails to load" while `broken` is set."""

    def __init__(self) -> None:
        self.ca = trustme.CA()
        self.cert = self.ca.issue_cert("www.example")
        self.broken = False
        self.calls = 0

    def factory(self, vs: VirtualService) -> ssl.SSLContext:
        self.calls += 1
        if self.broken:
            raise TLSSetupError(f"certificate 'c' of VS {vs.name!r} cannot be used for TLS")
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        self.cert.configure_cert(ctx)
        return ctx

    async def connect(self, port: int) -> Client:
        ctx = ssl.create_default_context()
        self.ca.configure_trust(ctx)
        r, w = await asyncio.open_connection("127.0.0.1", port, ssl=ctx,
                                             server_hostname="www.example")
        return Client(r, w)


@pytest.fixture
async def tls_dp() -> AsyncIterator[tuple[TLS, DataPlane]]:
    tls = TLS()
    dp = DataPlane(tls_factory=tls.factory)
    yield tls, dp
    await dp.shutdown(0.5)


def plain_vs(port: int, upstream: Upstream, name: str = "web") -> VirtualService:
    return VirtualService(name=name, listen=Address("127.0.0.1", port),
                          real_servers=rs(upstream.port), health_check=NO_CHECK)


def https(vs: VirtualService) -> VirtualService:
    return dataclasses.replace(vs, protocol=Protocol.HTTPS, tls=TLSSettings(certificates=("c",)))


def listening(dp: DataPlane, name: str) -> bool:
    entry = dp.stats()["virtual_services"][name]
    flag = entry["listening"]
    assert isinstance(flag, bool)
    return flag


async def serves_plain(port: int) -> str:
    """The X-Forwarded-Proto a new plain connection to `port` is answered with."""
    c = await Client.connect(port)
    try:
        r = await c.request()
        assert r.status == 200
        seen = {k.lower(): str(v) for k, v in r.json()["headers"]}
        return seen["x-forwarded-proto"]
    finally:
        c.close()


async def test_failed_http_to_https_keeps_the_http_listener(
        tls_dp: tuple[TLS, DataPlane], upstream: Upstream) -> None:
    """The certificate of the new https VS fails to load: the http listener was never touched
    (its open connection keeps working), and later good reloads apply on the same port."""
    tls, dp = tls_dp
    port = free_port()
    plain = plain_vs(port, upstream)
    await dp.apply(runtime(plain))
    async with asyncio.timeout(T):
        kept = await Client.connect(port)
        assert (await kept.request()).status == 200
        tls.broken = True
        with pytest.raises(TLSSetupError):
            await dp.apply(runtime(https(plain), generation=2))
        assert tls.calls == 1
        # Nothing changed: the open connection is served, new ones are too, as plain http.
        assert (await kept.request()).status == 200
        assert await serves_plain(port) == "http"
        assert listening(dp, "web")
        assert dp.listening_ports() == {"web": ("127.0.0.1", port)}
        # A later good reload of the http VS applies (and the listener still serves).
        await dp.apply(runtime(dataclasses.replace(plain, add_forwarded_headers=False),
                               generation=3))
        r = await kept.request()
        assert r.status == 200
        assert "x-forwarded-proto" not in {k.lower() for k, _ in r.json()["headers"]}
        # And once the certificate loads, the same change goes through on the same port.
        tls.broken = False
        await dp.apply(runtime(https(plain), generation=4))
        assert await kept.closed()  # an idle plain connection of the old listener: closed
        c = await tls.connect(port)
        seen = {k.lower(): v for k, v in (await c.request(host="www.example")).json()["headers"]}
        assert seen["x-forwarded-proto"] == "https"
        assert listening(dp, "web")
        c.close()


async def test_failed_reload_through_the_store_rolls_back_and_reopens_nothing(
        tls_dp: tuple[TLS, DataPlane], upstream: Upstream) -> None:
    """The RuntimeStore path (what `App.reload` uses): "web" turns https while a new VS cannot
    bind its port (taken). The store rolls back; "web" still serves http on its port, with its
    open connection, and the next good reload works."""
    tls, dp = tls_dp
    port = free_port()
    plain = plain_vs(port, upstream)
    store = RuntimeStore(Config(virtual_services=(plain,)))
    store.subscribe(dp.apply)
    await dp.apply(store.current)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        busy = taken.getsockname()[1]
        async with asyncio.timeout(T):
            kept = await Client.connect(port)
            assert (await kept.request()).status == 200
            bad = Config(virtual_services=(https(plain), plain_vs(busy, upstream, "clash")))
            with pytest.raises(ListenError, match="clash"):
                await store.set_config(bad)
            assert store.current.generation == 1
            assert (await kept.request()).status == 200
            assert await serves_plain(port) == "http"
            assert set(dp.stats()["virtual_services"]) == {"web"}
            assert listening(dp, "web")
            # The next good reload (web turns https alone) applies on the same port.
            await store.set_config(Config(virtual_services=(https(plain),)))
            assert await kept.closed()
            c = await tls.connect(port)
            assert (await c.request(host="www.example")).status == 200
            c.close()
            # And back to http, on the same port again.
            await store.set_config(Config(virtual_services=(plain,)))
            assert await serves_plain(port) == "http"
            assert listening(dp, "web")


async def test_failed_address_change_keeps_the_old_address(
        dataplane: DataPlane, upstream: Upstream) -> None:
    """The VS moves to a port that is taken: it keeps serving on its old port (same socket, same
    connection) and a later move to a free port works."""
    port = free_port()
    plain = plain_vs(port, upstream)
    await dataplane.apply(runtime(plain))
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        busy = taken.getsockname()[1]
        async with asyncio.timeout(T):
            kept = await Client.connect(port)
            assert (await kept.request()).status == 200
            moved = dataclasses.replace(plain, listen=Address("127.0.0.1", busy))
            with pytest.raises(ListenError, match=f"web.*{busy}"):
                await dataplane.apply(runtime(moved, generation=2))
            assert (await kept.request()).status == 200
            assert await serves_plain(port) == "http"
            assert dataplane.listening_ports() == {"web": ("127.0.0.1", port)}
            assert dataplane.stats()["virtual_services"]["web"]["listen"] == f"127.0.0.1:{port}"
            assert listening(dataplane, "web")
            other = free_port()
            await dataplane.apply(runtime(
                dataclasses.replace(plain, listen=Address("127.0.0.1", other)), generation=3))
            assert await serves_plain(other) == "http"
            assert await kept.closed()  # the old address drains (idle: closed at once)
            with pytest.raises(OSError):
                await Client.connect(port)


async def test_a_failure_after_a_bind_closes_what_it_opened(
        tls_dp: tuple[TLS, DataPlane], upstream: Upstream) -> None:
    """A new VS binds its port, then another VS of the same reload fails: the new port is closed
    again (nothing half-applied stays open) and the running VS is untouched."""
    tls, dp = tls_dp
    port, fresh = free_port(), free_port()
    plain = plain_vs(port, upstream)
    await dp.apply(runtime(plain))
    tls.broken = True
    async with asyncio.timeout(T):
        with pytest.raises(LBProxyError):
            await dp.apply(runtime(plain, plain_vs(fresh, upstream, "new"),
                                   https(plain_vs(free_port(), upstream, "tls")), generation=2))
        with pytest.raises(OSError):
            await Client.connect(fresh)
        assert set(dp.listening_ports()) == {"web"}
        assert await serves_plain(port) == "http"


async def test_listening_follows_the_socket(dataplane: DataPlane, upstream: Upstream) -> None:
    """`stats()` reads "listening" from the socket itself: a listener whose socket stopped
    accepting is reported as not listening (still listed, with its counters), and the next
    reload opens it again instead of keeping the dead one."""
    port = free_port()
    plain = plain_vs(port, upstream)
    await dataplane.apply(runtime(plain))
    assert listening(dataplane, "web")
    # Close the socket behind the data plane's back (nothing public closes one by itself).
    (lst,) = dataplane._listeners.values()
    lst.stop_accepting()
    assert not listening(dataplane, "web")
    assert dataplane.stats()["virtual_services"]["web"]["listen"] == f"127.0.0.1:{port}"
    assert dataplane.listening_ports() == {}
    async with asyncio.timeout(T):
        with pytest.raises(OSError):
            await Client.connect(port)
        await dataplane.apply(runtime(plain, generation=2))
        assert listening(dataplane, "web")
        assert await serves_plain(port) == "http"
