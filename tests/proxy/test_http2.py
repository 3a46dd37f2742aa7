"""HTTP/2 to clients on an HTTPS VS, relayed to HTTP/1.1 real servers: an h2-library client and
curl --http2 over loopback through the real DataPlane and TLSContexts (GET, POST with a body,
100 parallel streams on one connection, a stream reset mid-body, content switching per stream,
the HTTP/1.1 checks applied to what goes upstream, HTTP/1.1 fallback by ALPN).

`H2Client` and the `site` fixture are used by test_http2_attacks.py too."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import shutil
import ssl
import subprocess
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import h2.config
import h2.connection
import h2.events
import h2.exceptions
import h2.settings
import pytest
import trustme

from lbproxy.config import parse_config
from lbproxy.config.model import AccessLogFormat, AccessLogSettings, Address, RealServer
from lbproxy.proxy import DataPlane
from lbproxy.runtime import RuntimeStore
from tests.proxy.conftest import Upstream
from tests.proxy.test_access_log_formats import access_file, read_lines  # noqa: F401 - fixture
from tests.support.https_site import serve_https

NAME = "h2.example.com"
DEADLINE = 20.0

CONFIG = """
[[rule]]
name = "api"
match = "prefix"
pattern = "/api/"

[[vs]]
name = "h2site"
listen = "127.0.0.1:1"
protocol = "https"
tls = { certificates = ["site"] }
health_check = { type = "none" }

  [[vs.subvs]]
  name = "api"
  rules = ["api"]
  health_check = { type = "none" }

  [[vs.subvs]]
  name = "web"
  rules = ["default"]
  health_check = { type = "none" }
"""


@dataclass
class Site:
    ca: trustme.CA
    port: int
    dataplane: DataPlane
    cafile: Path
    runtime: RuntimeStore | None = None


async def make_site(tmp_path: Path, web: Upstream, api: Upstream, extra: str = "") -> Site:
    ca = trustme.CA()
    cfg = parse_config(CONFIG.replace('protocol = "https"\n', 'protocol = "https"\n' + extra))
    vs = cfg.virtual_services[0]
    web_sub, api_sub = vs.subvs_by_name("web"), vs.subvs_by_name("api")
    assert web_sub is not None and api_sub is not None
    subvs = (dataclasses.replace(api_sub, real_servers=(RealServer(Address("127.0.0.1",
                                                                           api.port)),)),
             dataclasses.replace(web_sub, real_servers=(RealServer(Address("127.0.0.1",
                                                                           web.port)),)))
    vs = dataclasses.replace(vs, subvs=subvs)
    runtime, dataplane, port = await serve_https(
        tmp_path, dataclasses.replace(cfg, virtual_services=(vs,)), ca, NAME)
    cafile = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(cafile))
    return Site(ca, port, dataplane, cafile, runtime)


@pytest.fixture
async def site(tmp_path: Path, upstream: Upstream, upstream2: Upstream) -> AsyncIterator[Site]:
    s = await make_site(tmp_path, upstream, upstream2)
    yield s
    await s.dataplane.shutdown(1.0)


def limits(site: Site) -> dict[str, int]:
    out: dict[str, int] = site.dataplane.stats()["virtual_services"]["h2site"][
        "limit_rejections"]
    return out


@dataclass
class Response:
    status: int = 0
    headers: list[tuple[bytes, bytes]] = field(default_factory=list)
    body: bytearray = field(default_factory=bytearray)
    reset: int | None = None
    done: asyncio.Event = field(default_factory=asyncio.Event)

    def header(self, name: bytes) -> bytes | None:
        return next((v for k, v in self.headers if k == name), None)

    def json(self) -> Any:
        return json.loads(bytes(self.body))


class H2Client:
    """A small HTTP/2 client over asyncio streams (h2, the same library the proxy uses, but on
    the client side): streams started at will, frames sent raw when a test needs to misbehave."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.conn = h2.connection.H2Connection(h2.config.H2Configuration(
            client_side=True, header_encoding=None, validate_outbound_headers=False))
        self.responses: dict[int, Response] = {}
        self.goaway: int | None = None
        self.closed = asyncio.Event()
        self.settings_acked = asyncio.Event()
        self.window = asyncio.Event()  # set at every WINDOW_UPDATE
        self.task: asyncio.Task[None] | None = None

    @classmethod
    async def connect(cls, site: Site, alpn: tuple[str, ...] = ("h2", "http/1.1")) -> H2Client:
        ctx = ssl.create_default_context()
        site.ca.configure_trust(ctx)
        ctx.set_alpn_protocols(list(alpn))
        reader, writer = await asyncio.open_connection("127.0.0.1", site.port, ssl=ctx,
                                                       server_hostname=NAME)
        client = cls(reader, writer)
        client.conn.initiate_connection()
        client.conn.increment_flow_control_window(1 << 24)
        client.flush()
        client.task = asyncio.create_task(client._read())
        return client

    @property
    def alpn(self) -> str | None:
        obj = self.writer.get_extra_info("ssl_object")
        return obj.selected_alpn_protocol() if obj is not None else None

    def flush(self) -> None:
        data = self.conn.data_to_send()
        if data and not self.writer.is_closing():
            self.writer.write(data)

    def raw(self, data: bytes) -> None:
        if not self.writer.is_closing():
            self.writer.write(data)

    async def _read(self) -> None:
        try:
            while True:
                data = await self.reader.read(65536)
                if not data:
                    break
                for ev in self.conn.receive_data(data):
                    self._event(ev)
                self.flush()
        except (ConnectionError, ssl.SSLError, h2.exceptions.ProtocolError):
            pass
        finally:
            self.closed.set()
            for r in self.responses.values():
                r.done.set()

    def _event(self, ev: Any) -> None:
        if isinstance(ev, h2.events.ResponseReceived):
            r = self.responses[ev.stream_id]
            r.headers = list(ev.headers)
            r.status = int(dict(r.headers)[b":status"])
        elif isinstance(ev, h2.events.DataReceived):
            r = self.responses[ev.stream_id]
            r.body += ev.data
            self.conn.acknowledge_received_data(ev.flow_controlled_length, ev.stream_id)
        elif isinstance(ev, h2.events.StreamEnded):
            self.responses[ev.stream_id].done.set()
        elif isinstance(ev, h2.events.StreamReset):
            r = self.responses[ev.stream_id]
            r.reset = int(ev.error_code)
            r.done.set()
        elif isinstance(ev, h2.events.ConnectionTerminated):
            self.goaway = int(ev.error_code)
        elif isinstance(ev, (h2.events.WindowUpdated, h2.events.RemoteSettingsChanged)):
            self.window.set()
        elif isinstance(ev, h2.events.SettingsAcknowledged):
            self.settings_acked.set()

    def start(self, method: str, path: str, headers: tuple[tuple[str, str], ...] = (),
              end: bool = True, authority: str = NAME) -> int:
        sid = self.conn.get_next_available_stream_id()
        hdrs = [(b":method", method.encode()), (b":path", path.encode()),
                (b":scheme", b"https"), (b":authority", authority.encode())]
        hdrs += [(k.encode(), v.encode()) for k, v in headers]
        self.responses[sid] = Response()
        self.conn.send_headers(sid, hdrs, end_stream=end)
        self.flush()
        return sid

    async def send(self, sid: int, data: bytes, end: bool = False) -> None:
        """DATA within the frame size and the proxy's windows (waiting for WINDOW_UPDATEs)."""
        pos = 0
        while True:
            window = self.conn.local_flow_control_window(sid)
            n = min(window, self.conn.max_outbound_frame_size, len(data) - pos)
            if n > 0 or pos == len(data):
                last = pos + n == len(data)
                self.conn.send_data(sid, data[pos:pos + n], end_stream=end and last)
                self.flush()
                pos += n
                if last:
                    return
                continue
            self.window.clear()
            await asyncio.wait_for(self.window.wait(), DEADLINE)

    async def response(self, sid: int) -> Response:
        r = self.responses[sid]
        await asyncio.wait_for(r.done.wait(), DEADLINE)
        return r

    async def request(self, method: str, path: str, body: bytes | None = None,
                      headers: tuple[tuple[str, str], ...] = ()) -> Response:
        sid = self.start(method, path, headers, end=body is None)
        if body is not None:
            await self.send(sid, body, end=True)
        return await self.response(sid)

    async def close(self) -> None:
        self.writer.close()
        if self.task is not None:
            try:
                await asyncio.wait_for(self.task, DEADLINE)
            except TimeoutError:
                self.task.cancel()


@pytest.fixture
async def client(site: Site) -> AsyncIterator[H2Client]:
    c = await H2Client.connect(site)
    yield c
    await c.close()


# -- the h2 client ---------------------------------------------------------------------------


async def test_get_over_h2_reaches_the_http11_real_server(client: H2Client,
                                                          upstream: Upstream) -> None:
    assert client.alpn == "h2"
    r = await client.request("GET", "/hello?x=1", headers=(("x-test", "a"),))
    assert r.status == 200 and r.reset is None
    seen = r.json()
    assert seen["method"] == "GET" and seen["path"] == "/hello?x=1" and seen["port"] == \
        upstream.port
    hdrs = {k.lower(): v for k, v in seen["headers"]}
    assert hdrs["host"] == NAME and hdrs["x-test"] == "a"
    assert hdrs["x-forwarded-for"] == "127.0.0.1" and hdrs["x-forwarded-proto"] == "https"
    # Nothing connection-specific comes back over HTTP/2.
    assert not any(k in (b"connection", b"keep-alive", b"transfer-encoding")
                   for k, _ in r.headers)


async def test_post_with_body_and_content_length(client: H2Client) -> None:
    body = bytes(range(256)) * 1000  # 256 000 bytes: several windows' worth of DATA frames
    r = await client.request("POST", "/sink", body, headers=(("content-length", str(len(body))),))
    assert r.status == 200 and bytes(r.body) == str(len(body)).encode()
    # Without Content-Length the body goes upstream chunked; the server reads all of it.
    r = await client.request("POST", "/sink", body)
    assert r.status == 200 and bytes(r.body) == str(len(body)).encode()
    r = await client.request("POST", "/echo", b"hello")
    assert r.json()["body"] == "hello"


async def test_big_response_respects_flow_control(client: H2Client) -> None:
    n = 3 * 1024 * 1024
    r = await client.request("GET", f"/big?n={n}")
    assert r.status == 200 and len(r.body) == n and r.reset is None
    r = await client.request("GET", f"/big?n={n}&cl=1")
    assert r.status == 200 and len(r.body) == n and r.header(b"content-length") == str(n).encode()


async def test_head_204_304_and_local_answers(client: H2Client) -> None:
    r = await client.request("HEAD", "/big?n=100&cl=1")
    assert r.status == 200 and r.body == b"" and r.header(b"content-length") == b"100"
    r = await client.request("GET", "/status/204")
    assert r.status == 204 and r.body == b""
    r = await client.request("GET", "/status/404")
    assert r.status == 404 and bytes(r.body) == b"status 404"


async def test_100_parallel_streams_on_one_connection(client: H2Client,
                                                      upstream: Upstream) -> None:
    sids = [client.start("GET", f"/n/{i}") for i in range(100)]
    results = [await client.response(s) for s in sids]
    assert all(r.status == 200 and r.reset is None for r in results)
    assert [r.json()["path"] for r in results] == [f"/n/{i}" for i in range(100)]
    # More than max_concurrent_streams (100) at once is refused by the SETTINGS we sent.
    assert client.conn.remote_settings.max_concurrent_streams == 100


async def test_content_switching_per_stream(client: H2Client, upstream: Upstream,
                                            upstream2: Upstream) -> None:
    a = client.start("GET", "/api/x")
    b = client.start("GET", "/page")
    c = client.start("GET", "/api/y")
    ra, rb, rc = [await client.response(s) for s in (a, b, c)]
    assert ra.json()["port"] == upstream2.port and rc.json()["port"] == upstream2.port
    assert rb.json()["port"] == upstream.port


async def test_stream_reset_mid_body_leaves_the_connection_serving(
        client: H2Client, site: Site) -> None:
    sid = client.start("POST", "/sink", end=False)
    await client.send(sid, b"x" * 10_000)
    client.conn.reset_stream(sid, 8)  # CANCEL
    client.flush()
    # The same connection goes on serving, and the cut exchange left nothing behind.
    r = await client.request("GET", "/after")
    assert r.status == 200 and r.json()["path"] == "/after"
    for _ in range(200):
        if len(site.dataplane._listeners) and all(
                len(lst.conns) == 1 for lst in site.dataplane._listeners.values()):
            break
        await asyncio.sleep(0.01)
    assert all(len(lst.conns) == 1 for lst in site.dataplane._listeners.values())


@pytest.mark.parametrize(("headers", "why"), [
    ((("host", "other.example"),), ":authority and host differ"),
    ((("x-bad", "a\r\nx-injected: 1"),), "CR LF in a value"),
    ((("connection", "keep-alive"),), "a connection-specific field"),
])
async def test_malformed_requests_never_reach_the_real_server(
        client: H2Client, headers: Any, why: str, upstream: Upstream, site: Site) -> None:
    """Malformed (RFC 9113 §8.1.1): RST_STREAM PROTOCOL_ERROR on that stream, and the
    connection goes on serving."""
    client.conn.config.normalize_outbound_headers = False  # (h2 would drop "connection")
    r = await client.request("POST", "/echo", b"hello", headers=headers)
    assert r.status == 0 and r.reset == 1 and client.goaway is None, why
    assert upstream.requests == 0
    assert limits(site)["h2_protocol_error"] == 1
    r = await client.request("GET", "/after")
    assert r.status == 200 and upstream.requests == 1


async def test_conflicting_content_lengths_are_a_connection_error(
        client: H2Client, upstream: Upstream, site: Site) -> None:
    """h2 checks Content-Length in its stream state and makes it a connection error (RFC 9113
    allows it: §5.4.1); it never reaches the real server."""
    r = await client.request("POST", "/echo", b"hello",
                             headers=(("content-length", "5"), ("content-length", "6")))
    assert r.status == 0 and client.goaway == 1
    assert upstream.requests == 0
    assert limits(site)["h2_protocol_error"] == 1


async def test_content_length_must_match_data(site: Site) -> None:
    c = await H2Client.connect(site)
    try:
        sid = c.start("POST", "/sink", headers=(("content-length", "3"),), end=False)
        c.raw(_frame(0x1, 0x0, sid, b"toolong"))  # DATA, END_STREAM: more than announced
        r = await c.response(sid)
        assert r.status == 0 and (r.reset is not None or c.goaway is not None)
    finally:
        await c.close()


async def test_http11_fallback_when_only_http11_is_offered(site: Site) -> None:
    ctx = ssl.create_default_context()
    site.ca.configure_trust(ctx)
    ctx.set_alpn_protocols(["http/1.1"])
    reader, writer = await asyncio.open_connection("127.0.0.1", site.port, ssl=ctx,
                                                   server_hostname=NAME)
    try:
        assert writer.get_extra_info("ssl_object").selected_alpn_protocol() == "http/1.1"
        writer.write(f"GET /api/v HTTP/1.1\r\nHost: {NAME}\r\nConnection: close\r\n\r\n"
                     .encode())
        data = await asyncio.wait_for(reader.read(), DEADLINE)
        assert data.startswith(b"HTTP/1.1 200 OK") and b'"/api/v"' in data
    finally:
        writer.close()


async def test_http2_off_offers_only_http11(tmp_path: Path, upstream: Upstream,
                                            upstream2: Upstream) -> None:
    s = await make_site(tmp_path, upstream, upstream2, "http2 = false\n")
    try:
        c = await H2Client.connect(s)
        assert c.alpn == "http/1.1"
        await c.close()
    finally:
        await s.dataplane.shutdown(1.0)


async def test_reload_turns_http2_on_under_the_running_listener(
        tmp_path: Path, upstream: Upstream, upstream2: Upstream) -> None:
    s = await make_site(tmp_path, upstream, upstream2, "http2 = false\n")
    try:
        assert s.runtime is not None
        cfg = s.runtime.current.config
        vs = dataclasses.replace(cfg.virtual_services[0], http2=True)
        await s.runtime.set_config(dataclasses.replace(cfg, virtual_services=(vs,)))
        assert s.dataplane.listening_ports()["h2site"][1] == s.port  # the same listener
        c = await H2Client.connect(s)
        try:
            assert c.alpn == "h2"
            r = await c.request("GET", "/api/after-reload")
            assert r.status == 200 and r.json()["port"] == upstream2.port
        finally:
            await c.close()
    finally:
        await s.dataplane.shutdown(1.0)


async def test_access_log_shows_the_client_protocol(
        tmp_path: Path, upstream: Upstream, upstream2: Upstream,
        access_file: Path) -> None:  # noqa: F811 - the fixture
    """A request that came over HTTP/2 is logged as HTTP/2.0 (it went upstream as HTTP/1.1);
    one over HTTP/1.1 on the same VS as HTTP/1.1."""
    s = await make_site(tmp_path, upstream, upstream2)
    try:
        assert s.runtime is not None
        cfg = s.runtime.current.config
        await s.runtime.set_config(dataclasses.replace(cfg, access_log=AccessLogSettings(
            enabled=True, path=str(access_file), format=AccessLogFormat.JSON)))
        c = await H2Client.connect(s)
        assert (await c.request("GET", "/logged-h2")).status == 200
        await c.close()
        ctx = ssl.create_default_context()
        s.ca.configure_trust(ctx)
        ctx.set_alpn_protocols(["http/1.1"])
        reader, writer = await asyncio.open_connection("127.0.0.1", s.port, ssl=ctx,
                                                       server_hostname=NAME)
        writer.write(f"GET /logged-h1 HTTP/1.1\r\nHost: {NAME}\r\nConnection: close\r\n\r\n"
                     .encode())
        assert (await asyncio.wait_for(reader.read(), DEADLINE)).startswith(b"HTTP/1.1 200 ")
        writer.close()
    finally:
        await s.dataplane.shutdown(1.0)
    lines = [json.loads(ln) for ln in read_lines(access_file)]
    assert {ln["uri"]: ln["protocol"] for ln in lines} == {"/logged-h2": "HTTP/2.0",
                                                           "/logged-h1": "HTTP/1.1"}


# -- curl --------------------------------------------------------------------------------------


def _curl_http2() -> str | None:
    curl = shutil.which("curl")
    if curl is None:
        return None
    out = subprocess.run([curl, "-V"], capture_output=True, text=True, check=False).stdout
    return curl if "HTTP2" in out else None


@pytest.mark.skipif(_curl_http2() is None, reason="curl with HTTP2 support is not installed")
async def test_curl_http2_get_and_post(site: Site, upstream2: Upstream) -> None:
    curl = _curl_http2()
    assert curl is not None
    base = [curl, "-sS", "--http2", "--cacert", str(site.cafile), "--resolve",
            f"{NAME}:{site.port}:127.0.0.1", "-o", "-", "-w", "\n%{http_version} %{http_code}"]
    url = f"https://{NAME}:{site.port}"
    proc = await asyncio.create_subprocess_exec(
        *base, f"{url}/api/one", f"{url}/two", stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    out, err = await asyncio.wait_for(proc.communicate(), DEADLINE)
    assert proc.returncode == 0, err
    text = out.decode()
    assert text.count("\n2 200") == 2, text
    assert f'"port": {upstream2.port}' in text and '"/two"' in text
    proc = await asyncio.create_subprocess_exec(
        *base, "--data-binary", "@-", f"{url}/sink", stdin=subprocess.PIPE,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    out, err = await asyncio.wait_for(proc.communicate(b"z" * 200_000), DEADLINE)
    assert proc.returncode == 0, err
    assert out.decode().split("\n") == ["200000", "2 200"]


def _frame(flags: int, kind: int, sid: int, payload: bytes) -> bytes:
    """A raw frame: length, type, flags, stream id, payload (END_STREAM = 1, END_HEADERS = 4)."""
    return (len(payload).to_bytes(3, "big") + bytes((kind, flags)) + sid.to_bytes(4, "big")
            + payload)
