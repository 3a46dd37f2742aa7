"""The PROXY protocol: headers parsed and built (sans-I/O), accepted from HAProxy's own
`send-proxy` / `send-proxy-v2` in front of a real DataPlane (the client HAProxy saw is the one the
access log, X-Forwarded-For and a src-ip content rule see), refused from untrusted sources and when
malformed, and sent to a real server that parses it itself and echoes the client it saw."""

from __future__ import annotations

import asyncio
import ipaddress
import json
import logging
import random
import shutil
import socket
import struct
import subprocess
from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path

import pytest

from lbproxy.config import parse_config
from lbproxy.config.model import (
    AccessLogSettings,
    Address,
    ContentRule,
    MatchOn,
    MatchType,
    ProxyProtocol,
    RealServer,
    SubVS,
    Timeouts,
)
from lbproxy.errors import ConfigError
from lbproxy.proxy import DataPlane
from lbproxy.proxy.proxyproto import (
    MAX_V2,
    V2_SIG,
    ProxyHeaderError,
    build,
    parse,
    starts_with_signature,
)

from .conftest import (
    NO_CHECK,
    Client,
    RawUpstream,
    Upstream,
    make_vs,
    read_head,
    runtime,
    serve,
    servers,
)
from .conftest import build as build_request
from .test_access_log_formats import access_file, read_lines  # noqa: F401 - a fixture

T = 10.0

# -- sans-I/O: parse and build --------------------------------------------------------------------


def _v2(cmd: int, fam: int, body: bytes) -> bytes:
    return V2_SIG + bytes((0x20 | cmd, fam)) + struct.pack("!H", len(body)) + body


V4_BODY = bytes([192, 0, 2, 7]) + bytes([198, 51, 100, 1]) + struct.pack("!HH", 40000, 443)


@pytest.mark.parametrize(("data", "want"), [
    (b"PROXY TCP4 192.0.2.7 198.51.100.1 40000 443\r\n",
     ("192.0.2.7", 40000, "198.51.100.1", 443)),
    (b"PROXY TCP6 2001:db8::7 2001:db8::1 40000 443\r\n",
     ("2001:db8::7", 40000, "2001:db8::1", 443)),
    (b"PROXY UNKNOWN\r\n", None),
    (b"PROXY UNKNOWN ffff:f...f:ffff ffff:f...f:ffff 65535 65535\r\n", None),
    (_v2(1, 0x11, V4_BODY), ("192.0.2.7", 40000, "198.51.100.1", 443)),
    # TLVs after the addresses are skipped.
    (_v2(1, 0x11, V4_BODY + b"\x05\x00\x03abc" + b"\x04\x00\x00"),
     ("192.0.2.7", 40000, "198.51.100.1", 443)),
    (_v2(1, 0x21, ipaddress.IPv6Address("2001:db8::7").packed
         + ipaddress.IPv6Address("2001:db8::1").packed + struct.pack("!HH", 1, 2)),
     ("2001:db8::7", 1, "2001:db8::1", 2)),
    (_v2(0, 0x00, b""), None),  # LOCAL (a balancer's health check)
    (_v2(1, 0x00, b""), None),  # UNSPEC
    (_v2(1, 0x31, b"\x00" * 216), None),  # AF_UNIX
])
def test_parse_whole_and_byte_by_byte(data: bytes, want: object) -> None:
    rest = b"GET / HTTP/1.1\r\n"
    assert parse(data + rest) == (len(data), want)
    for i in range(1, len(data)):  # every shorter prefix asks for more
        assert parse(data[:i]) is None, i


@pytest.mark.parametrize(("data", "why"), [
    (b"GET / HTTP/1.1\r\n\r\n", "signature"),
    (b"PROXY TCP4 192.0.2.7 198.51.100.1 40000\r\n", "PROXY TCP4|TCP6"),
    (b"PROXY TCP4 2001:db8::1 198.51.100.1 1 2\r\n", "IPv4"),
    (b"PROXY TCP4 192.0.2.300 198.51.100.1 1 2\r\n", "not an IP"),
    (b"PROXY TCP4 192.0.2.7 198.51.100.1 65536 2\r\n", "not a port"),
    (b"PROXY TCP4 192.0.2.7 198.51.100.1 01 2\r\n", "not a port"),
    (b"PROXY TCP4 192.0.2.7\n", "bare CR or LF"),
    (b"PROXY " + b"1" * 200, "longer than 107"),
    (b"PROXY TCP4 \xff\r\n", "non-ASCII"),
    (V2_SIG + b"\x11\x11\x00\x0c", "version 1"),
    (V2_SIG + b"\x2f\x11\x00\x0c", "unknown command"),
    (V2_SIG + b"\x21\x11" + struct.pack("!H", 65535), f"the limit is {MAX_V2}"),
    (_v2(1, 0x11, b"\x00" * 8), "12 needed"),
    (b"\r\n\r\nX", "signature"),
])
def test_parse_refuses(data: bytes, why: str) -> None:
    with pytest.raises(ProxyHeaderError, match=why):
        parse(data)


def test_mutated_headers_never_escape_the_parser() -> None:
    """Seeded mutations of valid headers: parse() answers None, a result within the buffer, or
    ProxyHeaderError; nothing else, and never a result longer than its bound."""
    rng = random.Random(20)
    seeds = [b"PROXY TCP4 192.0.2.7 198.51.100.1 40000 443\r\n",
             b"PROXY TCP6 2001:db8::7 2001:db8::1 40000 443\r\n", b"PROXY UNKNOWN\r\n",
             _v2(1, 0x11, V4_BODY + b"\x05\x00\x03abc"), _v2(0, 0, b""),
             _v2(1, 0x21, b"\x01" * 36)]
    for _ in range(20_000):
        data = bytearray(rng.choice(seeds))
        for _ in range(rng.randint(1, 4)):
            op = rng.randrange(3)
            i = rng.randrange(len(data) + 1)
            if op == 0 and data:
                data[min(i, len(data) - 1)] = rng.randrange(256)
            elif op == 1:
                data[i:i] = bytes(rng.randrange(256) for _ in range(rng.randint(1, 3)))
            else:
                del data[i:i + rng.randint(1, 3)]
        try:
            got = parse(bytes(data))
        except ProxyHeaderError:
            continue
        if got is not None:
            n, addrs = got
            assert 0 < n <= len(data) and n <= MAX_V2
            assert addrs is None or (0 <= addrs[1] <= 65535 and 0 <= addrs[3] <= 65535)


def test_signature_sniffing() -> None:
    assert starts_with_signature(b"PRO") is None
    assert starts_with_signature(b"PROPFIND / HTTP/1.1") is False
    assert starts_with_signature(b"PROXY ") is True
    assert starts_with_signature(V2_SIG[:5]) is None
    assert starts_with_signature(V2_SIG) is True
    assert starts_with_signature(b"GET / HTTP/1.1\r\n") is False


@pytest.mark.parametrize("addrs", [
    ("192.0.2.7", 40000, "198.51.100.1", 443),
    ("2001:db8::7", 1, "2001:db8::1", 65535),
])
@pytest.mark.parametrize("version", [1, 2])
def test_build_parses_back(version: int, addrs: tuple[str, int, str, int]) -> None:
    data = build(version, addrs)
    assert parse(data) == (len(data), addrs)


def test_build_mixes_families_as_ipv6() -> None:
    data = build(1, ("::ffff:192.0.2.7", 5, "192.0.2.1", 80))  # a v4 client on a v6 socket
    assert data == b"PROXY TCP4 192.0.2.7 192.0.2.1 5 80\r\n"
    data = build(1, ("192.0.2.7", 5, "2001:db8::1", 80))
    assert data == b"PROXY TCP6 ::ffff:c000:207 2001:db8::1 5 80\r\n"


# -- HAProxy in front of a real DataPlane ---------------------------------------------------------

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class HAProxy:
    """HAProxy in TCP mode on loopback: one frontend per PROXY version, each sending it to
    `target_port` (`send-proxy` / `send-proxy-v2`) from 127.0.0.1."""

    def __init__(self, tmp: Path, target_port: int) -> None:
        self.ports = {1: _free_port(), 2: _free_port()}
        conf = tmp / "haproxy.cfg"
        conf.write_text(f"""
global
    maxconn 100
defaults
    mode tcp
    timeout connect 3s
    timeout client 30s
    timeout server 30s
frontend fe1
    bind 127.0.0.1:{self.ports[1]}
    default_backend be1
frontend fe2
    bind 127.0.0.1:{self.ports[2]}
    default_backend be2
backend be1
    server s1 127.0.0.1:{target_port} send-proxy source 127.0.0.1
backend be2
    server s2 127.0.0.1:{target_port} send-proxy-v2 source 127.0.0.1
""")
        self.proc = subprocess.Popen(["haproxy", "-db", "-f", str(conf)],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)

    async def ready(self) -> None:
        """Until both frontends accept (bounded)."""
        for port in self.ports.values():
            for _ in range(200):
                if self.proc.poll() is not None:
                    err = self.proc.stderr.read() if self.proc.stderr else b""
                    raise RuntimeError(f"haproxy exited: {err!r}")
                try:
                    _, w = await asyncio.open_connection("127.0.0.1", port)
                except OSError:
                    await asyncio.sleep(0.02)
                    continue
                w.close()
                break
            else:
                raise RuntimeError("haproxy did not listen")

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(5)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


async def _connect_from(src: str, port: int) -> Client:
    """A client whose connection comes from loopback address `src` (not 127.0.0.1)."""
    r, w = await asyncio.open_connection("127.0.0.1", port, local_addr=(src, 0))
    return Client(r, w)


def _headers(resp_body: bytes) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for k, v in json.loads(resp_body)["headers"]:
        out.setdefault(k.lower(), []).append(v)
    return out


needs_haproxy = pytest.mark.skipif(shutil.which("haproxy") is None, reason="haproxy missing")


@needs_haproxy
@pytest.mark.parametrize("version", [1, 2])
async def test_haproxy_send_proxy_gives_the_real_client(
        version: int, dataplane: DataPlane, upstream: Upstream, upstream2: Upstream,
        access_file: Path, tmp_path: Path) -> None:  # noqa: F811 - the fixture
    """HAProxy connects from 127.0.0.1; the client from 127.0.0.2. lbproxy must see 127.0.0.2:
    in X-Forwarded-For, in the access log and in a src-ip content rule (which sends it to the
    "proxied" SubVS; anything else would go to "other")."""
    vs = make_vs(
        real_servers=(), proxy_protocol_from=("127.0.0.1/32",), content_switching=True,
        subvs=(SubVS("proxied", real_servers=servers(upstream.port), rules=("from2",),
                     health_check=NO_CHECK),
               SubVS("other", real_servers=servers(upstream2.port), rules=("default",),
                     health_check=NO_CHECK)))
    rule = ContentRule("from2", MatchType.PREFIX, "127.0.0.2", on=MatchOn.SRC_IP)
    ports = await serve(dataplane, vs, rules=(rule,),
                        access_log=AccessLogSettings(enabled=True, path=str(access_file)))
    ha = HAProxy(tmp_path, ports["web"])
    try:
        async with asyncio.timeout(T):
            await ha.ready()
            c = await _connect_from("127.0.0.2", ha.ports[version])
            for _ in range(2):  # keep-alive: the header was read once, the address holds
                r = await c.request(path="/echo", host="shop.test")
                assert r.status == 200
                assert _headers(r.body)["x-forwarded-for"] == ["127.0.0.2"]
            c.close()
    finally:
        ha.stop()
    assert upstream.requests == 2 and upstream2.requests == 0
    await asyncio.sleep(0)  # the access log's batch is written at the end of a loop pass
    lines = [line for line in read_lines(access_file) if "/echo" in line]
    assert len(lines) == 2 and all("127.0.0.2" in line for line in lines), lines
    # HAProxy's own connection checks (none here) or a LOCAL header would not count as refusals.
    assert dataplane.stats()["virtual_services"]["web"]["limit_rejections"]["proxy_protocol"] == 0


# -- refusals -------------------------------------------------------------------------------------

async def _refused(port: int, data: bytes) -> bool:
    c = await Client.connect(port)
    await c.send(data)
    closed = await c.closed()
    c.close()
    return closed


async def test_untrusted_source_sending_a_header_is_refused_and_plain_http_served(
        dataplane: DataPlane, upstream: Upstream, caplog: pytest.LogCaptureFixture) -> None:
    ports = await serve(dataplane, make_vs(ports=(upstream.port,),
                                           proxy_protocol_from=("10.9.9.0/24",)))
    port = ports["web"]
    with caplog.at_level(logging.INFO, "lbproxy.proxy.client"):
        async with asyncio.timeout(T):
            assert await _refused(port, b"PROXY TCP4 203.0.113.9 127.0.0.1 1 2\r\n"
                                  + build_request())
            assert await _refused(port, build(2, ("203.0.113.9", 1, "127.0.0.1", 2)))
            c = await Client.connect(port)  # no header: served as any client
            r = await c.request(path="/echo")
            assert r.status == 200 and _headers(r.body)["x-forwarded-for"] == ["127.0.0.1"]
            c.close()
    refusals = [r.getMessage() for r in caplog.records if "PROXY" in r.getMessage()]
    assert len(refusals) == 2, refusals
    assert all("from 127.0.0.1, which is not in proxy_protocol_from" in m for m in refusals)
    assert dataplane.stats()["virtual_services"]["web"]["limit_rejections"]["proxy_protocol"] == 2
    assert upstream.requests == 1


@pytest.mark.parametrize(("data", "logged"), [
    (build_request(), "bad PROXY protocol header from 127.0.0.1: no PROXY protocol signature"),
    (b"PROXY TCP4 " + b"9" * 150, "longer than 107 bytes"),
    (V2_SIG + b"\x21\x11" + struct.pack("!H", 60000) + b"\x00" * 100, "the limit is"),
    (b"PROXY TCP4 1.2.3.4 5.6.7.8 1\r\n" + build_request(), "PROXY TCP4|TCP6"),
])
async def test_trusted_source_sending_garbage_is_closed_and_logged(
        data: bytes, logged: str, dataplane: DataPlane, upstream: Upstream,
        caplog: pytest.LogCaptureFixture) -> None:
    ports = await serve(dataplane, make_vs(ports=(upstream.port,),
                                           proxy_protocol_from=("127.0.0.1",)))
    with caplog.at_level(logging.INFO, "lbproxy.proxy.client"):
        async with asyncio.timeout(T):
            assert await _refused(ports["web"], data)
    assert any(logged in r.getMessage() for r in caplog.records), caplog.text
    assert upstream.requests == 0


async def test_trusted_source_that_sends_nothing_meets_the_head_timeout(
        dataplane: DataPlane, upstream: Upstream) -> None:
    ports = await serve(dataplane, make_vs(ports=(upstream.port,),
                                           proxy_protocol_from=("127.0.0.1",),
                                           timeouts=Timeouts(head=0.3)))
    async with asyncio.timeout(T):
        c = await Client.connect(ports["web"])
        await c.send(b"PROXY TCP4 1.2.3.4")  # and then nothing
        head = await c.r.read()  # the 408 of a head that never came, then the close
    assert head.startswith(b"HTTP/1.1 408 ")
    assert dataplane.stats()["virtual_services"]["web"]["limit_rejections"]["head_timeout"] == 1


async def test_a_header_split_over_reads_and_the_request_behind_it(
        dataplane: DataPlane, upstream: Upstream) -> None:
    ports = await serve(dataplane, make_vs(ports=(upstream.port,),
                                           proxy_protocol_from=("127.0.0.1",)))
    data = build(2, ("2001:db8::5", 1234, "127.0.0.1", 80)) + build_request(path="/echo")
    async with asyncio.timeout(T):
        c = await Client.connect(ports["web"])
        for i in range(0, 20, 4):  # the header in pieces: each read waits for more
            await c.send(data[i:i + 4])
            await asyncio.sleep(0.01)
        await c.send(data[20:])
        r = await c.response()
        c.close()
    assert r.status == 200
    assert _headers(r.body)["x-forwarded-for"] == ["2001:db8::5"]


# -- sending to real servers -----------------------------------------------------------------------

def _parse_independently(data: bytes) -> tuple[str, int, str, int, int]:
    """A PROXY header parsed by this test's own reading of the spec: (src, sport, dst, dport,
    version)."""
    if data.startswith(b"PROXY "):
        line = data[:data.index(b"\r\n")].decode()
        _, _, src, dst, sport, dport = line.split(" ")
        return src, int(sport), dst, int(dport), 1
    assert data[:12] == V2_SIG and data[12] == 0x21
    fam = data[13]
    if fam == 0x11:
        src = socket.inet_ntop(socket.AF_INET, data[16:20])
        dst = socket.inet_ntop(socket.AF_INET, data[20:24])
        sport, dport = struct.unpack("!HH", data[24:28])
    else:
        assert fam == 0x21
        src = socket.inet_ntop(socket.AF_INET6, data[16:32])
        dst = socket.inet_ntop(socket.AF_INET6, data[32:48])
        sport, dport = struct.unpack("!HH", data[48:52])
    return src, sport, dst, dport, 2


class ProxyBackend:
    """A real server that wants the PROXY protocol: it reads the header, then answers each
    request with the client the header named, as JSON (and records every connection's)."""

    def __init__(self) -> None:
        self.seen: list[tuple[str, int, str, int, int]] = []

    async def handle(self, r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        first = await r.read(16)
        while len(first) < 16:
            more = await r.read(16 - len(first))
            if not more:
                return
            first += more
        if first.startswith(b"PROXY "):  # (a TCP4/TCP6 line is longer than 16 bytes)
            data = first + await r.readuntil(b"\r\n")
        else:
            (length,) = struct.unpack("!H", first[14:16])
            data = first + await r.readexactly(length)
        info = _parse_independently(data)
        self.seen.append(info)
        try:
            while True:
                await read_head(r)
                body = json.dumps({"src": info[0], "sport": info[1], "dst": info[2],
                                   "dport": info[3], "version": info[4]}).encode()
                w.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                        b"Content-Length: %d\r\n\r\n%b" % (len(body), body))
                await w.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            return


@pytest.fixture
async def proxy_backend() -> AsyncIterator[tuple[ProxyBackend, int]]:
    backend = ProxyBackend()
    async with RawUpstream(backend.handle) as raw:
        yield backend, raw.port


@pytest.mark.parametrize("version", [ProxyProtocol.V1, ProxyProtocol.V2])
async def test_send_proxy_to_a_real_server(
        version: ProxyProtocol, dataplane: DataPlane,
        proxy_backend: tuple[ProxyBackend, int]) -> None:
    """Each client's requests go over connections whose header names that client: reused for
    the same client, never for another."""
    backend, port = proxy_backend
    rs = RealServer(Address("127.0.0.1", port), send_proxy_protocol=version)
    ports = await serve(dataplane, make_vs(real_servers=(rs,)))
    v = 1 if version is ProxyProtocol.V1 else 2

    async def ask(c: Client) -> dict[str, object]:
        r = await c.request(path="/")
        assert r.status == 200
        got: dict[str, object] = json.loads(r.body)
        return got

    async with asyncio.timeout(T):
        a = await _connect_from("127.0.0.3", ports["web"])
        b = await _connect_from("127.0.0.4", ports["web"])
        a_port = a.w.get_extra_info("sockname")[1]
        b_port = b.w.get_extra_info("sockname")[1]
        want_a = {"src": "127.0.0.3", "sport": a_port, "dst": "127.0.0.1",
                  "dport": ports["web"], "version": v}
        want_b = {**want_a, "src": "127.0.0.4", "sport": b_port}
        assert await ask(a) == want_a
        assert await ask(a) == want_a
        assert len(backend.seen) == 1  # the same client: its connection again
        assert await ask(b) == want_b
        assert len(backend.seen) == 2  # another client: a connection of its own
        assert await ask(a) == want_a
        assert await ask(b) == want_b
        a.close()
        b.close()
    assert len(backend.seen) == 2
    assert sorted(s[1] for s in backend.seen) == sorted((a_port, b_port))


async def test_send_proxy_pool_is_swept_and_bounded_by_its_idle_timeout(
        dataplane: DataPlane, proxy_backend: tuple[ProxyBackend, int]) -> None:
    """An idle connection past upstream_idle is not reused (a new one, with a header, is made)."""
    backend, port = proxy_backend
    rs = RealServer(Address("127.0.0.1", port), send_proxy_protocol=ProxyProtocol.V2)
    ports = await serve(dataplane, make_vs(real_servers=(rs,),
                                           timeouts=Timeouts(upstream_idle=0.2)))
    async with asyncio.timeout(T):
        c = await Client.connect(ports["web"])
        assert (await c.request()).status == 200
        await asyncio.sleep(0.5)  # past upstream_idle (the sweep or the lookup drops it)
        assert (await c.request()).status == 200
        c.close()
    assert len(backend.seen) == 2


async def test_send_proxy_pool_is_keyed_by_server_and_version_and_drained_with_the_server(
        dataplane: DataPlane, proxy_backend: tuple[ProxyBackend, int]) -> None:
    """Two VSs send v1 and v2 to the same real server: two pools (their connections never mix),
    one entry in the stats; disabling the server closes the idle connections of both."""
    backend, port = proxy_backend
    vss = [make_vs(name=f"v{v.value}", real_servers=(RealServer(
        Address("127.0.0.1", port), send_proxy_protocol=v),)) for v in (ProxyProtocol.V1,
                                                                       ProxyProtocol.V2)]
    ports = await serve(dataplane, *vss)
    async with asyncio.timeout(T):
        for name in ("vv1", "vv2"):
            c = await Client.connect(ports[name])
            r = await c.request(path="/")
            assert r.status == 200 and json.loads(r.body)["version"] == int(name[-1])
            c.close()
        address = f"127.0.0.1:{port}"
        assert dataplane.stats()["upstream_pools"][address] == {"idle": 2, "connects": 2}
        dataplane.set_servers({(vs.name, ""): {address: ("disabled", 1)} for vs in vss})
        assert dataplane.stats()["upstream_pools"][address]["idle"] == 0
    assert sorted(s[4] for s in backend.seen) == [1, 2]


@needs_haproxy
async def test_haproxy_to_lbproxy_to_a_proxy_protocol_server(
        dataplane: DataPlane, proxy_backend: tuple[ProxyBackend, int], tmp_path: Path) -> None:
    """The whole chain: the client (127.0.0.2) -> HAProxy (send-proxy-v2) -> lbproxy (accepts it,
    sends v1) -> a real server, which sees the client HAProxy saw."""
    backend, port = proxy_backend
    rs = RealServer(Address("127.0.0.1", port), send_proxy_protocol=ProxyProtocol.V1)
    ports = await serve(dataplane, make_vs(real_servers=(rs,),
                                           proxy_protocol_from=("127.0.0.1",)))
    ha = HAProxy(tmp_path, ports["web"])
    try:
        async with asyncio.timeout(T):
            await ha.ready()
            c = await _connect_from("127.0.0.2", ha.ports[2])
            client_port = c.w.get_extra_info("sockname")[1]
            r = await c.request(path="/")
            c.close()
    finally:
        ha.stop()
    assert r.status == 200
    got = json.loads(r.body)
    assert (got["src"], got["sport"], got["dst"], got["dport"]) == (
        "127.0.0.2", client_port, "127.0.0.1", ha.ports[2])
    assert backend.seen[0][4] == 1  # lbproxy sent v1 (HAProxy had sent it v2)


# -- config ---------------------------------------------------------------------------------------

PP_CONFIG = """
[[vs]]
name = "web"
listen = "127.0.0.1:18080"
proxy_protocol_from = ["127.0.0.1", "10.0.0.0/8", "2001:db8::/32"]
send_proxy_protocol = "v1"
[[vs.subvs]]
name = "a"
rules = ["default"]
[[vs.subvs.real_servers]]
address = "127.0.0.1:9001"
[[vs.subvs.real_servers]]
address = "127.0.0.1:9002"
send_proxy_protocol = "off"
[[vs.subvs]]
name = "b"
send_proxy_protocol = "v2"
[[vs.subvs.real_servers]]
address = "127.0.0.1:9003"
"""


def test_config_inherits_send_proxy_protocol_and_normalizes_sources() -> None:
    vs = parse_config(PP_CONFIG).virtual_services[0]
    assert vs.proxy_protocol_from == ("127.0.0.1/32", "10.0.0.0/8", "2001:db8::/32")
    a, b = vs.subvs
    assert [s.send_proxy_protocol for s in a.real_servers] == [ProxyProtocol.V1,
                                                                ProxyProtocol.OFF]
    assert [s.send_proxy_protocol for s in b.real_servers] == [ProxyProtocol.V2]


@pytest.mark.parametrize(("old", "new", "where", "fragment"), [
    ('"10.0.0.0/8"', '"10.0.0.1/8"', "vs[0].proxy_protocol_from[1]", "has host bits set"),
    ('"10.0.0.0/8"', '"lb.example"', "vs[0].proxy_protocol_from[1]", "not an IP address"),
    ('send_proxy_protocol = "v2"', 'send_proxy_protocol = "v3"',
     "vs[0].subvs[1].send_proxy_protocol", "expected one of 'off', 'v1', 'v2'"),
])
def test_config_refuses(old: str, new: str, where: str, fragment: str) -> None:
    with pytest.raises(ConfigError) as e:
        parse_config(PP_CONFIG.replace(old, new, 1))
    found = [(p.where, p.message) for p in e.value.problems]
    assert [1 for w, m in found if w == where and fragment in m], found


def test_config_accepts_it_on_an_https_vs() -> None:
    """Read before the TLS handshake (tlsserver.py; tests in test_proxyproto_tls.py)."""
    cfg = parse_config(PP_CONFIG.replace(
        'listen = "127.0.0.1:18080"', 'listen = "127.0.0.1:18080"\nprotocol = "https"\n'
        'tls = { certificates = ["c"] }', 1))
    assert cfg.virtual_services[0].proxy_protocol_from[0] == "127.0.0.1/32"


async def test_a_reload_turns_it_on_for_new_connections(dataplane: DataPlane,
                                                        upstream: Upstream) -> None:
    vs = make_vs(ports=(upstream.port,))
    ports = await serve(dataplane, vs)
    header = build(1, ("192.0.2.9", 1, "127.0.0.1", ports["web"]))
    async with asyncio.timeout(T):
        old = await Client.connect(ports["web"])  # opened before the reload
        assert (await old.request(path="/echo")).status == 200
        await dataplane.apply(runtime(replace(vs, proxy_protocol_from=("127.0.0.1",)),
                                      generation=2))
        c = await Client.connect(ports["web"])
        await c.send(header)
        r = await c.request(path="/echo")
        assert _headers(r.body)["x-forwarded-for"] == ["192.0.2.9"]
        # The connection of the old generation goes on as it began.
        r = await old.request(path="/echo")
        assert _headers(r.body)["x-forwarded-for"] == ["127.0.0.1"]
        c.close()
        old.close()
