"""The PROXY protocol on HTTPS VSs (tlsserver.py): the header read before the TLS handshake, from
HAProxy's own `send-proxy` / `send-proxy-v2` in TCP mode and from a raw socket that sends the
header and the ClientHello in one write; the client it names seen by HTTP/1.1 and HTTP/2 requests
(X-Forwarded-For, a src-ip content rule, the access log); refusals, a late header, sources not
listed (straight to TLS), and a reload turning it on under a running HTTPS address."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import socket
import ssl
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import trustme

from lbproxy.config import parse_config
from lbproxy.config.model import (
    AccessLogFormat,
    AccessLogSettings,
    Address,
    ProxyProtocol,
    RealServer,
)
from lbproxy.proxy import DataPlane
from lbproxy.proxy.proxyproto import build
from lbproxy.runtime import RuntimeStore
from tests.proxy.conftest import Upstream
from tests.proxy.test_access_log_formats import access_file, read_lines  # noqa: F401 - fixture
from tests.proxy.test_http2 import H2Client
from tests.proxy.test_proxy_protocol import HAProxy, ProxyBackend, needs_haproxy
from tests.proxy.test_proxy_protocol import proxy_backend as proxy_backend  # the fixture
from tests.support.https_site import serve_https

NAME = "pp.example.com"
T = 20.0

CONFIG = """
[[rule]]
name = "from2"
match = "prefix"
on = "src-ip"
pattern = "127.0.0.2"

[[vs]]
name = "ppsite"
listen = "127.0.0.1:1"
protocol = "https"
tls = { certificates = ["site"] }
health_check = { type = "none" }
proxy_protocol_from = ["127.0.0.1"]
timeouts = { head = 2 }

  [[vs.subvs]]
  name = "proxied"
  rules = ["from2"]
  health_check = { type = "none" }

  [[vs.subvs]]
  name = "other"
  rules = ["default"]
  health_check = { type = "none" }
"""


@dataclasses.dataclass
class Site:
    ca: trustme.CA
    port: int
    dataplane: DataPlane
    runtime: RuntimeStore

    def ctx(self, alpn: tuple[str, ...] = ("h2", "http/1.1")) -> ssl.SSLContext:
        ctx = ssl.create_default_context()
        self.ca.configure_trust(ctx)
        ctx.set_alpn_protocols(list(alpn))
        return ctx

    def stats(self) -> dict[str, int]:
        out: dict[str, int] = self.dataplane.stats()["virtual_services"]["ppsite"][
            "limit_rejections"]
        return out

    async def reload(self, **changes: object) -> None:
        cfg = self.runtime.current.config
        vs = dataclasses.replace(cfg.virtual_services[0], **changes)  # type: ignore[arg-type]
        await self.runtime.set_config(dataclasses.replace(cfg, virtual_services=(vs,)))


async def make_site(tmp_path: Path, proxied: Upstream | RealServer, other: Upstream, *,
                    config: str = CONFIG, log: AccessLogSettings | None = None) -> Site:
    ca = trustme.CA()
    cfg = parse_config(config)
    vs = cfg.virtual_services[0]
    subvs = tuple(dataclasses.replace(s, real_servers=(
        up if isinstance(up, RealServer) else RealServer(Address("127.0.0.1", up.port)),))
        for s, up in zip(vs.subvs, (proxied, other), strict=True))
    cfg = dataclasses.replace(cfg, virtual_services=(dataclasses.replace(vs, subvs=subvs),))
    if log is not None:
        cfg = dataclasses.replace(cfg, access_log=log)
    runtime, dataplane, port = await serve_https(tmp_path, cfg, ca, NAME)
    return Site(ca, port, dataplane, runtime)


@pytest.fixture
async def site(tmp_path: Path, upstream: Upstream, upstream2: Upstream) -> AsyncIterator[Site]:
    s = await make_site(tmp_path, upstream, upstream2)
    yield s
    await s.dataplane.shutdown(1.0)


async def h2_over(site: Site, port: int, *, src: str = "127.0.0.1",
                  header: bytes = b"") -> H2Client:
    """An HTTP/2 client connected from `src` to `port`, sending `header` before its TLS."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port, local_addr=(src, 0))
    if header:
        writer.write(header)
    await writer.start_tls(site.ctx(), server_hostname=NAME)
    client = H2Client(reader, writer)
    client.conn.initiate_connection()
    client.flush()
    client.task = asyncio.create_task(client._read())
    return client


def _xff(resp_json: dict[str, object]) -> list[str]:
    hdrs = resp_json["headers"]
    assert isinstance(hdrs, list)
    return [v for k, v in hdrs if k.lower() == "x-forwarded-for"]


def tls_exchange(port: int, ctx: ssl.SSLContext, header: bytes, request: bytes) -> bytes:
    """Blocking (run in a thread): connect, send `header` and the whole ClientHello in ONE write,
    finish the handshake, send `request`, read the answer until the server closes."""
    inc, out = ssl.MemoryBIO(), ssl.MemoryBIO()
    obj = ctx.wrap_bio(inc, out, server_hostname=NAME)
    with socket.create_connection(("127.0.0.1", port), timeout=T) as sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        try:
            obj.do_handshake()
        except ssl.SSLWantReadError:
            pass
        hello = out.read()
        assert hello[:1] == b"\x16"  # a TLS handshake record
        sock.sendall(header + hello)
        for _ in range(100):
            try:
                obj.do_handshake()
                break
            except ssl.SSLWantReadError:
                if out.pending:
                    sock.sendall(out.read())
                data = sock.recv(65536)
                if not data:
                    raise ConnectionError("closed during the handshake") from None
                inc.write(data)
        if out.pending:
            sock.sendall(out.read())
        obj.write(request)
        sock.sendall(out.read())
        got = b""
        for _ in range(1000):
            try:
                got += obj.read(65536)
                continue
            except ssl.SSLWantReadError:
                pass
            except (ssl.SSLZeroReturnError, ssl.SSLEOFError):
                break
            data = sock.recv(65536)
            if not data:
                break
            inc.write(data)
        return got


def _get(path: str) -> bytes:
    return f"GET {path} HTTP/1.1\r\nHost: {NAME}\r\nConnection: close\r\n\r\n".encode()


# -- accepted ---------------------------------------------------------------------------------


@pytest.mark.parametrize("header", [
    build(1, ("192.0.2.9", 40000, "127.0.0.1", 443)),
    build(2, ("2001:db8::5", 40000, "127.0.0.1", 443)),
    b"PROXY UNKNOWN\r\n",  # keeps the connection's own address
], ids=["v1", "v2", "v1-unknown"])
async def test_header_and_clienthello_in_one_write(header: bytes, site: Site,
                                                   upstream2: Upstream) -> None:
    """Not one byte of the ClientHello behind the header may be taken with it."""
    want = "127.0.0.1" if b"UNKNOWN" in header else \
        "192.0.2.9" if header.startswith(b"PROXY") else "2001:db8::5"
    async with asyncio.timeout(T):
        got = await asyncio.to_thread(tls_exchange, site.port, site.ctx(("http/1.1",)), header,
                                      _get("/echo"))
    assert got.startswith(b"HTTP/1.1 200 "), got[:200]
    assert f'"X-Forwarded-For", "{want}"'.encode() in got, got
    assert upstream2.requests == 1  # "other": not 127.0.0.2
    assert site.stats()["proxy_protocol"] == 0


@needs_haproxy
@pytest.mark.parametrize("version", [1, 2])
async def test_haproxy_send_proxy_to_an_https_vs(
        version: int, tmp_path: Path, upstream: Upstream, upstream2: Upstream,
        access_file: Path) -> None:  # noqa: F811 - the fixture
    """HAProxy (TCP mode, from 127.0.0.1) in front of the HTTPS VS; the client connects to
    HAProxy from 127.0.0.2. Over HTTP/2 and HTTP/1.1, lbproxy sees 127.0.0.2: X-Forwarded-For,
    the src-ip rule (-> "proxied"), the access log."""
    site = await make_site(tmp_path, upstream, upstream2, log=AccessLogSettings(
        enabled=True, path=str(access_file), format=AccessLogFormat.COMBINED))
    ha = HAProxy(tmp_path, site.port)
    try:
        async with asyncio.timeout(T):
            await ha.ready()
            c = await h2_over(site, ha.ports[version], src="127.0.0.2")
            try:
                assert c.alpn == "h2"
                for path in ("/a", "/b"):  # two streams: the header was read once
                    r = await c.request("GET", path)
                    assert r.status == 200 and _xff(r.json()) == ["127.0.0.2"]
            finally:
                await c.close()
            reader, writer = await asyncio.open_connection(
                "127.0.0.1", ha.ports[version], local_addr=("127.0.0.2", 0),
                ssl=site.ctx(("http/1.1",)), server_hostname=NAME)
            writer.write(_get("/c"))
            data = await reader.read()
            writer.close()
            assert data.startswith(b"HTTP/1.1 200 ") and b'"127.0.0.2"' in data
    finally:
        ha.stop()
        await site.dataplane.shutdown(1.0)
    assert upstream.requests == 3 and upstream2.requests == 0
    lines = [ln for ln in read_lines(access_file) if '"GET /' in ln]
    assert len(lines) == 3, lines
    assert all(ln.startswith("127.0.0.2 ") for ln in lines), lines
    assert sum('"GET /a HTTP/2.0"' in ln or '"GET /b HTTP/2.0"' in ln for ln in lines) == 2
    assert sum('"GET /c HTTP/1.1"' in ln for ln in lines) == 1


async def test_source_not_listed_is_served_and_refused_if_it_sends_a_header(
        site: Site, upstream2: Upstream, caplog: pytest.LogCaptureFixture) -> None:
    """127.0.0.2 is not in proxy_protocol_from: its TLS is served as on any HTTPS VS (the
    client it is); a PROXY header from it is refused, logged and counted, as on an HTTP VS."""
    with caplog.at_level(logging.INFO, "lbproxy.proxy.client"):
        async with asyncio.timeout(T):
            c = await h2_over(site, site.port, src="127.0.0.2")
            try:
                r = await c.request("GET", "/direct")
                assert r.status == 200 and _xff(r.json()) == ["127.0.0.2"]
            finally:
                await c.close()
            for header in (build(1, ("192.0.2.1", 1, "127.0.0.1", 2)),
                           build(2, ("192.0.2.1", 1, "127.0.0.1", 2))):
                with pytest.raises((ssl.SSLError, ConnectionError)):
                    await h2_over(site, site.port, src="127.0.0.2", header=header)
    refusals = [r.getMessage() for r in caplog.records if "PROXY" in r.getMessage()]
    assert refusals == ["VS ppsite: a PROXY protocol header from 127.0.0.2, which is not in "
                        "proxy_protocol_from; connection closed"] * 2
    assert site.stats()["proxy_protocol"] == 2
    assert upstream2.requests == 0  # "/direct" went to "proxied": 127.0.0.2 was seen


async def test_the_client_named_before_tls_is_sent_on_to_a_proxy_protocol_server(
        tmp_path: Path, upstream: Upstream,
        proxy_backend: tuple[ProxyBackend, int]) -> None:
    """Header (from 127.0.0.2's balancer at 127.0.0.1) -> TLS -> HTTP/2 streams -> a real server
    sent PROXY v2: it sees the client the first header named, for every stream."""
    backend, port = proxy_backend
    rs = RealServer(Address("127.0.0.1", port), send_proxy_protocol=ProxyProtocol.V2)
    site = await make_site(tmp_path, rs, upstream, config=CONFIG.replace(
        'pattern = "127.0.0.2"', 'pattern = "192.0.2."'))
    try:
        async with asyncio.timeout(T):
            c = await h2_over(site, site.port, header=build(1, ("192.0.2.77", 4321, "127.0.0.1",
                                                                 443)))
            for path in ("/a", "/b"):
                r = await c.request("GET", path)
                assert r.status == 200
                got = r.json()
                assert (got["src"], got["sport"], got["version"]) == ("192.0.2.77", 4321, 2)
            await c.close()
    finally:
        await site.dataplane.shutdown(1.0)
    assert len(backend.seen) == 1  # both streams: one connection, one header, the same client


# -- refused --------------------------------------------------------------------------------------


async def _closed_without_answer(port: int, data: bytes) -> bytes:
    """What the server sent before it closed (unread bytes left in its socket make that close a
    reset: also a close)."""
    r, w = await asyncio.open_connection("127.0.0.1", port)
    w.write(data)
    try:
        got = await r.read()
    except ConnectionResetError:
        got = b""
    w.close()
    return got


@pytest.mark.parametrize(("data", "logged"), [
    (b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + b"\x00" * 40,
     "bad PROXY protocol header from 127.0.0.1: no PROXY protocol signature"),
    (b"PROXY TCP4 1.2.3.4 5.6.7.8 1\r\n\x16\x03\x01", "PROXY TCP4|TCP6"),
    (b"PROXY TCP4 " + b"9" * 150, "longer than 107 bytes"),
    (b"PROXY TCP4 1.2.3", "closed before its PROXY protocol header ended"),
], ids=["tls-without-header", "malformed-v1", "oversized-v1", "truncated"])
async def test_listed_source_without_a_good_header_is_closed_and_logged(
        data: bytes, logged: str, site: Site, upstream: Upstream, upstream2: Upstream,
        caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, "lbproxy.proxy.client"):
        async with asyncio.timeout(T):
            if logged.startswith("closed"):  # half-close after the partial header
                r, w = await asyncio.open_connection("127.0.0.1", site.port)
                w.write(data)
                w.write_eof()
                got = await r.read()
                w.close()
            else:
                got = await _closed_without_answer(site.port, data)
    assert got == b""
    assert any(logged in r.getMessage() for r in caplog.records), caplog.text
    assert site.stats()["proxy_protocol"] == 1
    assert upstream.requests == upstream2.requests == 0


async def test_a_late_header_meets_the_head_timeout(tmp_path: Path, upstream: Upstream,
                                                    upstream2: Upstream) -> None:
    site = await make_site(tmp_path, upstream, upstream2,
                           config=CONFIG.replace("head = 2", "head = 0.3"))
    try:
        async with asyncio.timeout(T):
            r, w = await asyncio.open_connection("127.0.0.1", site.port)
            w.write(b"PROXY TCP4 1.2.3.4")  # and then nothing
            assert await r.read() == b""
            w.close()
            # A connection that sends nothing at all is closed as well (not logged as refused).
            r, w = await asyncio.open_connection("127.0.0.1", site.port)
            assert await r.read() == b""
            w.close()
        assert site.stats()["head_timeout"] == 2
        assert site.stats()["proxy_protocol"] == 0
    finally:
        await site.dataplane.shutdown(1.0)


# -- reloads ----------------------------------------------------------------------------------


async def test_a_reload_turns_it_on_and_off_under_the_same_address(
        tmp_path: Path, upstream: Upstream, upstream2: Upstream) -> None:
    site = await make_site(tmp_path, upstream, upstream2,
                           config=CONFIG.replace('proxy_protocol_from = ["127.0.0.1"]\n', ""))
    header = build(2, ("192.0.2.44", 5, "127.0.0.1", 443))
    try:
        async with asyncio.timeout(T):
            old = await h2_over(site, site.port)  # no header: the plain HTTPS path
            r = await old.request("GET", "/before")
            assert _xff(r.json()) == ["127.0.0.1"]
            listener = next(iter(site.dataplane._listeners.values()))
            await site.reload(proxy_protocol_from=("127.0.0.1/32",))
            assert site.dataplane.listening_ports()["ppsite"][1] == site.port
            c = await h2_over(site, site.port, header=header)
            r = await c.request("GET", "/with-header")
            assert r.status == 200 and _xff(r.json()) == ["192.0.2.44"]
            await c.close()
            # The listener is kept (the header is looked for per connection): the connection
            # made before the reload goes on as it began, without a header.
            assert next(iter(site.dataplane._listeners.values())) is listener
            r = await old.request("GET", "/still")
            assert r.status == 200 and _xff(r.json()) == ["127.0.0.1"]
            assert not old.closed.is_set()
            await old.close()
            await site.reload(proxy_protocol_from=())
            assert site.dataplane.listening_ports()["ppsite"][1] == site.port
            c = await h2_over(site, site.port)
            r = await c.request("GET", "/after")
            assert r.status == 200 and _xff(r.json()) == ["127.0.0.1"]
            await c.close()
    finally:
        await site.dataplane.shutdown(1.0)


async def test_refused_and_failed_connections_leave_no_descriptor_behind(site: Site) -> None:
    """A refused header, a header from a source not listed (its handshake fails), a handshake
    that fails after a good header: each socket is closed, by us or by its transport."""
    def fds() -> int:
        return len(os.listdir("/proc/self/fd"))

    async def exchange(data: bytes) -> None:
        r, w = await asyncio.open_connection("127.0.0.1", site.port)
        w.write(data)
        try:
            await r.read()
        except ConnectionError:
            pass
        w.close()
        try:
            await w.wait_closed()
        except ConnectionError:
            pass

    cases = [b"\x16\x03\x01" + b"\x00" * 60,  # no header from a listed source
             build(1, ("192.0.2.1", 1, "127.0.0.1", 2)) + b"\x16\x03\x01\x00\x05hello"]
    async with asyncio.timeout(T):
        for data in cases:
            await exchange(data)  # the first of each kind may allocate what stays
        before = fds()
        for _ in range(30):
            for data in cases:
                await exchange(data)
            with pytest.raises((ssl.SSLError, ConnectionError)):
                await h2_over(site, site.port, src="127.0.0.2",
                              header=build(1, ("192.0.2.1", 1, "127.0.0.1", 2)))
        for _ in range(100):  # the transports close in the loop's next turns
            if fds() <= before:
                break
            await asyncio.sleep(0.02)
    assert fds() <= before
    assert site.stats()["proxy_protocol"] == 61
