"""DataPlane lifecycle: hot reload under load, draining, injections, shutdown, bind errors, TLS."""

from __future__ import annotations

import asyncio
import dataclasses
import ssl

import aiohttp
import pytest
import trustme

from lbproxy.config.model import Address, Config, Protocol, SubVS, TLSSettings, VirtualService
from lbproxy.errors import LBProxyError
from lbproxy.proxy import DataPlane
from lbproxy.runtime import Injection, RuntimeStore

from .conftest import NO_CHECK, Client, Upstream, build, make_vs, runtime, serve
from .conftest import servers as rs
from .test_answers import _acme_subvs

T = 10


async def _load(port: int, stop: asyncio.Event, results: list[int], limit: int = 5000) -> None:
    """Requests on keep-alive connections until `stop` (at most `limit`); statuses in results."""
    async with aiohttp.ClientSession() as s:
        for _ in range(limit):
            if stop.is_set():
                return
            async with s.get(f"http://127.0.0.1:{port}/load") as r:
                await r.read()
                results.append(r.status)


async def test_reload_under_load_loses_nothing(dataplane: DataPlane, upstream: Upstream,
                                               upstream2: Upstream) -> None:
    vs = make_vs(ports=(upstream.port,))
    ports = await serve(dataplane, vs)
    stop = asyncio.Event()
    results: list[int] = []
    async with asyncio.timeout(30):
        loaders = [asyncio.create_task(_load(ports["web"], stop, results)) for _ in range(4)]
        pools = [(upstream.port,), (upstream.port, upstream2.port), (upstream2.port,)]
        for i in range(9):
            await asyncio.sleep(0.05)  # let some requests run on this generation
            new = dataclasses.replace(vs, real_servers=rs(*pools[i % 3]))
            await dataplane.apply(runtime(new, generation=i + 2))
            assert dataplane.listening_ports()["web"][1] == ports["web"]
        stop.set()
        await asyncio.gather(*loaders)
    assert len(results) > 50
    assert set(results) == {200}
    assert upstream2.requests > 0


async def test_removed_listener_drains_in_flight(dataplane: DataPlane,
                                                 upstream: Upstream) -> None:
    a = make_vs("a", ports=(upstream.port,))
    b = make_vs("b", ports=(upstream.port,))
    ports = await serve(dataplane, a, b)
    async with asyncio.timeout(T):
        slow = await Client.connect(ports["b"])
        await slow.send(build(path="/slow?d=0.5"))
        idle = await Client.connect(ports["b"])
        assert (await idle.request()).status == 200
        await asyncio.sleep(0.05)  # the slow request is in flight at the upstream
        await dataplane.apply(runtime(a, generation=2))
        assert set(dataplane.listening_ports()) == {"a"}
        # The in-flight request completes, then its connection closes; the idle one closes now.
        r = await slow.response()
        assert r.status == 200 and r.body == b"slow" and r.header("Connection") == "close"
        assert await slow.closed()
        assert await idle.closed()
        with pytest.raises(OSError):
            await Client.connect(ports["b"])
        # The kept VS is untouched.
        c = await Client.connect(ports["a"])
        assert (await c.request()).status == 200
        c.close()


async def test_injection_survives_reload(dataplane: DataPlane, upstream: Upstream) -> None:
    vs = make_vs(subvs=(SubVS("app", real_servers=rs(upstream.port), rules=("default",),
                              health_check=NO_CHECK),), content_switching=True)
    store = RuntimeStore(Config(virtual_services=(vs,)))
    store.subscribe(dataplane.apply)
    await dataplane.apply(store.current)
    port = dataplane.listening_ports()["web"][1]
    acme, rule = _acme_subvs("tk")
    await store.inject(Injection("web", acme, rule))
    async with asyncio.timeout(T):
        c = await Client.connect(port)
        r = await c.request(path="/.well-known/acme-challenge/tk")
        assert r.status == 200 and r.body == b"tk.thumb"
        assert (await c.request(path="/x")).json()["path"] == "/x"
        # A config reload keeps the injection (and this connection).
        await store.set_config(Config(virtual_services=(dataclasses.replace(
            vs, not_available=dataclasses.replace(vs.not_available, status=502)),)))
        r = await c.request(path="/.well-known/acme-challenge/tk")
        assert r.status == 200 and r.body == b"tk.thumb"
        await store.remove("web", acme.name)
        assert (await c.request(path="/.well-known/acme-challenge/tk")).json()["port"] \
            == upstream.port
        c.close()


async def test_shutdown_drains(upstream: Upstream) -> None:
    dp = DataPlane()
    ports = await serve(dp, make_vs(ports=(upstream.port,)))
    async with asyncio.timeout(T):
        busy = await Client.connect(ports["web"])
        await busy.send(build(path="/slow?d=0.3"))
        idle = await Client.connect(ports["web"])
        assert (await idle.request()).status == 200
        await asyncio.sleep(0.05)
        down = asyncio.create_task(dp.shutdown(5))
        assert await idle.closed()
        r = await busy.response()
        assert r.status == 200 and r.body == b"slow"
        await down
        assert await busy.closed()
    assert dp.listening_ports() == {}


async def test_shutdown_deadline_closes_the_rest(upstream: Upstream) -> None:
    dp = DataPlane()
    ports = await serve(dp, make_vs(ports=(upstream.port,)))
    async with asyncio.timeout(T):
        busy = await Client.connect(ports["web"])
        await busy.send(build(path="/slow?d=5"))
        await asyncio.sleep(0.05)
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        await dp.shutdown(0.2)
        assert loop.time() - t0 < 2
        assert await busy.closed()


async def test_bind_failure_leaves_state_untouched(dataplane: DataPlane,
                                                   upstream: Upstream) -> None:
    a = make_vs("a", ports=(upstream.port,))
    ports = await serve(dataplane, a)
    taken = VirtualService(name="clash", listen=Address("127.0.0.1", ports["a"]),
                           real_servers=rs(upstream.port), health_check=NO_CHECK)
    other = make_vs("new", ports=(upstream.port,))
    with pytest.raises(LBProxyError, match="clash"):
        await dataplane.apply(runtime(a, other, taken, generation=2))
    assert set(dataplane.listening_ports()) == {"a"}
    async with asyncio.timeout(T):
        c = await Client.connect(ports["a"])
        assert (await c.request()).status == 200
        c.close()


async def test_https_vs(dataplane: DataPlane, upstream: Upstream) -> None:
    ca = trustme.CA()
    cert = ca.issue_cert("www.example")

    def factory(vs: VirtualService) -> ssl.SSLContext:
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        cert.configure_cert(ctx)
        return ctx

    dp = DataPlane(tls_factory=factory)
    vs = make_vs(ports=(upstream.port,), protocol=Protocol.HTTPS,
                 tls=TLSSettings(certificates=("c",)))
    try:
        ports = await serve(dp, vs)
        client_ctx = ssl.create_default_context()
        ca.configure_trust(client_ctx)
        async with asyncio.timeout(T):
            r, w = await asyncio.open_connection("127.0.0.1", ports["web"], ssl=client_ctx,
                                                 server_hostname="www.example")
            c = Client(r, w)
            for _ in range(2):
                resp = await c.request(host="www.example")
                seen = {k.lower(): v for k, v in resp.json()["headers"]}
                assert seen["x-forwarded-proto"] == "https"
            c.close()
    finally:
        await dp.shutdown(0.5)


async def test_protocol_change_reopens_the_listener(upstream: Upstream) -> None:
    import socket

    ca = trustme.CA()
    cert = ca.issue_cert("www.example")

    def factory(vs: VirtualService) -> ssl.SSLContext:
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        cert.configure_cert(ctx)
        return ctx

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    plain = VirtualService(name="web", listen=Address("127.0.0.1", port),
                           real_servers=rs(upstream.port), health_check=NO_CHECK)
    tls = dataclasses.replace(plain, protocol=Protocol.HTTPS, tls=TLSSettings(certificates=("c",)))
    dp = DataPlane(tls_factory=factory)
    try:
        await dp.apply(runtime(plain))
        async with asyncio.timeout(T):
            c = await Client.connect(port)
            assert (await c.request()).status == 200
            await dp.apply(runtime(tls, generation=2))
            # The open plain connection was on the old listener: it drains (idle: closed now).
            assert await c.closed()
            client_ctx = ssl.create_default_context()
            ca.configure_trust(client_ctx)
            r, w = await asyncio.open_connection("127.0.0.1", port, ssl=client_ctx,
                                                 server_hostname="www.example")
            resp = await Client(r, w).request(host="www.example")
            seen = {k.lower(): v for k, v in resp.json()["headers"]}
            assert seen["x-forwarded-proto"] == "https"
            w.close()
    finally:
        await dp.shutdown(0.5)


async def test_rules_compile_off_the_loop_and_unchanged_ones_are_reused(
        dataplane: DataPlane, upstream: Upstream, monkeypatch: pytest.MonkeyPatch) -> None:
    """A reload compiles content rules in a worker thread, once per changed VS: an injected
    challenge or a change to another VS reuses the router, a changed rule recompiles it."""
    import threading

    import lbproxy.proxy.dataplane as dp_module
    from lbproxy.config.model import ContentRule, MatchType

    compiled_in: list[tuple[str, bool]] = []
    real = dp_module.compile_router

    def spy(vs: VirtualService, rules: object) -> object:
        compiled_in.append((vs.name, threading.current_thread() is threading.main_thread()))
        return real(vs, rules)  # type: ignore[arg-type]

    monkeypatch.setattr(dp_module, "compile_router", spy)
    rule = ContentRule("api", MatchType.PREFIX, "/api/")
    switch = make_vs("switch", subvs=(
        SubVS("api", real_servers=rs(upstream.port), rules=("api",), health_check=NO_CHECK),),
        content_switching=True)
    other = make_vs("other", ports=(upstream.port,))
    await dataplane.apply(runtime(switch, other, rules=(rule,)))
    assert compiled_in == [("switch", False)]  # compiled, not on the loop's thread
    port = dataplane.listening_ports()["switch"][1]

    acme, acme_rule = _acme_subvs("reuse")
    injected = dataclasses.replace(runtime(switch, other, rules=(rule,), generation=2),
                                   injections=(Injection("switch", acme, acme_rule),))
    await dataplane.apply(injected)
    other2 = dataclasses.replace(other, add_forwarded_headers=False)
    await dataplane.apply(runtime(switch, other2, rules=(rule,), generation=3))
    assert compiled_in == [("switch", False)]  # neither recompiled the VS's own rules

    rule2 = dataclasses.replace(rule, pattern="/v2/")
    await dataplane.apply(runtime(switch, other2, rules=(rule2,), generation=4))
    assert compiled_in == [("switch", False), ("switch", False)]
    async with asyncio.timeout(T):
        c = await Client.connect(port)
        assert (await c.request(path="/v2/x")).status == 200  # the new rule serves
        assert (await c.request(path="/api/x")).status == 503  # the old one is gone
        c.close()
