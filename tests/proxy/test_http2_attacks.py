"""HTTP/2's known attacks, each bounded: rapid reset (CVE-2023-44487), CONTINUATION flood, HPACK
bomb, SETTINGS and PING floods end the attacker's connection with GOAWAY while another client on
the same VS keeps being served; and the HTTP/1.1 head made of a request (h2stream.request_head)."""

from __future__ import annotations

import pytest
from hpack import Encoder

from lbproxy.proxy.h2stream import BadRequest, request_head
from tests.proxy.conftest import Upstream
from tests.proxy.test_http2 import NAME, H2Client, Site, _frame, limits
from tests.proxy.test_http2 import site as site  # the fixture, re-exported

ENHANCE_YOUR_CALM = 11


async def _other_client_served(site: Site) -> None:
    c = await H2Client.connect(site)
    try:
        r = await c.request("GET", "/other")
        assert r.status == 200
    finally:
        await c.close()


def _headers_block(enc: Encoder, path: str = "/") -> bytes:
    data: bytes = enc.encode([(b":method", b"GET"), (b":path", path.encode()),
                              (b":scheme", b"https"), (b":authority", NAME.encode())])
    return data


async def test_rapid_reset_ends_with_enhance_your_calm(site: Site, upstream: Upstream) -> None:
    c = await H2Client.connect(site)
    try:
        enc = Encoder()
        sid = 1
        burst = []
        for _ in range(5000):  # HEADERS then RST_STREAM(CANCEL), as in the CVE
            burst.append(_frame(0x4, 0x1, sid, _headers_block(enc, "/slow?d=1")))
            burst.append(_frame(0, 0x3, sid, (8).to_bytes(4, "big")))
            sid += 2
        c.raw(b"".join(burst))
        await c.closed.wait()
        assert c.goaway == ENHANCE_YOUR_CALM
        assert limits(site)["h2_rapid_reset"] == 1
        # The limit stopped it long before the 5000th stream reached a real server.
        assert upstream.requests < 1000
    finally:
        await c.close()
    await _other_client_served(site)


async def test_continuation_flood_is_a_connection_error(site: Site) -> None:
    c = await H2Client.connect(site)
    try:
        block = _headers_block(Encoder())
        frames = [_frame(0, 0x1, 1, block)]  # HEADERS without END_HEADERS
        frames += [_frame(0, 0x9, 1, b"\x00" * 4000) for _ in range(20)]  # CONTINUATION
        c.raw(b"".join(frames))
        await c.closed.wait()
        assert c.goaway == ENHANCE_YOUR_CALM
        assert limits(site)["h2_flood"] == 1
    finally:
        await c.close()
    await _other_client_served(site)


async def test_hpack_bomb_is_bounded_by_the_header_list_size(site: Site,
                                                            upstream: Upstream) -> None:
    c = await H2Client.connect(site)
    try:
        enc = Encoder()
        # One 4000-byte field in the dynamic table, then referenced by index many times: a few
        # bytes on the wire per copy, 4 KB each decoded.
        first = enc.encode([(b":method", b"GET"), (b":path", b"/"), (b":scheme", b"https"),
                            (b":authority", NAME.encode()), (b"x-bomb", b"b" * 4000)])
        c.raw(_frame(0x5, 0x1, 1, first))
        again = enc.encode([(b":method", b"GET"), (b":path", b"/"), (b":scheme", b"https"),
                            (b":authority", NAME.encode())] + [(b"x-bomb", b"b" * 4000)] * 100)
        assert len(again) < 1000
        c.raw(_frame(0x5, 0x1, 3, again))
        await c.closed.wait()
        assert c.goaway is not None and c.goaway != 0
        assert limits(site)["h2_protocol_error"] == 1
        assert upstream.requests <= 1  # the first, small request only
    finally:
        await c.close()
    await _other_client_served(site)


@pytest.mark.parametrize(("kind", "payload"), [
    (0x6, b"12345678"),  # PING
    (0x4, b""),  # SETTINGS, empty
])
async def test_ping_and_settings_floods_end_with_goaway(site: Site, kind: int,
                                                        payload: bytes) -> None:
    c = await H2Client.connect(site)
    try:
        c.raw(_frame(0, kind, 0, payload) * 5000)
        await c.closed.wait()
        assert c.goaway == ENHANCE_YOUR_CALM
        assert limits(site)["h2_flood"] == 1
    finally:
        await c.close()
    await _other_client_served(site)


# -- the HTTP/1.1 head of an HTTP/2 request ---------------------------------------------------

BASE = [(b":method", b"POST"), (b":path", b"/p?q"), (b":scheme", b"https"),
        (b":authority", b"a.test")]


def test_request_head_shape() -> None:
    head, chunked, length = request_head(
        [*BASE, (b"cookie", b"a=1"), (b"x-y", b"z"), (b"cookie", b"b=2"), (b"te", b"trailers")],
        end_stream=False)
    assert chunked and length == -1
    assert head == (b"POST /p?q HTTP/1.1\r\nHost: a.test\r\nx-y: z\r\ncookie: a=1; b=2\r\n"
                    b"Transfer-Encoding: chunked\r\nConnection: close\r\n\r\n")
    head, chunked, length = request_head([*BASE, (b"content-length", b"5")], end_stream=False)
    assert not chunked and length == 5 and b"Content-Length: 5\r\n" in head
    head, chunked, _ = request_head(BASE, end_stream=True)
    assert not chunked and b"Transfer-Encoding" not in head and b"Content-Length" not in head


@pytest.mark.parametrize("extra", [
    [(b"host", b"b.test")],  # differs from :authority
    [(b"x", b"a\r\nInjected: 1")],  # CR LF would start a field of its own
    [(b"x", b"a\x00")],
    [(b"bad name", b"1")],
    [(b"connection", b"close")],
    [(b"transfer-encoding", b"chunked")],
    [(b"te", b"gzip")],
    [(b"content-length", b"5"), (b"content-length", b"6")],
    [(b"content-length", b"-1")],
])
def test_request_head_refuses(extra: list[tuple[bytes, bytes]]) -> None:
    with pytest.raises(BadRequest):
        request_head([*BASE, *extra], end_stream=False)


def test_request_head_refuses_bad_targets() -> None:
    for path in (b"", b"x", b"/a b", b"/a\x7f"):
        with pytest.raises(BadRequest):
            request_head([(b":method", b"GET"), (b":path", path), (b":authority", b"a")], True)
    with pytest.raises(BadRequest):  # Content-Length announced, END_STREAM on the HEADERS
        request_head([*BASE, (b"content-length", b"3")], end_stream=True)
    with pytest.raises(BadRequest):  # no authority at all
        request_head([(b":method", b"GET"), (b":path", b"/")], end_stream=True)
