"""Header rules ([vs.headers], [vs.subvs.headers]): request and response fields added, set and
removed over a real DataPlane (both response paths: one read and the parser's), variables filled
in, a SubVS's rules after its VS's, HSTS on an HTTPS VS, Forwarded (RFC 7239) and
X-Forwarded-Proto; and every bad input refused by `lbproxy check` with its key named."""

from __future__ import annotations

import asyncio
import json
import ssl
from pathlib import Path

import pytest
import trustme

from lbproxy.__main__ import main as lbproxy_main
from lbproxy.config import parse_config
from lbproxy.config.model import (
    HeaderRules,
    Hsts,
    Protocol,
    SubVS,
    TLSSettings,
    VirtualService,
    VSKind,
)
from lbproxy.errors import ConfigError
from lbproxy.proxy import DataPlane
from lbproxy.proxy.headerrules import compile_headers, edit_response, forwarded_line, hsts_value
from lbproxy.proxy.proxyproto import build as build_pp

from .conftest import (
    NO_CHECK,
    Client,
    RawUpstream,
    Upstream,
    answering,
    make_vs,
    read_head,
    serve,
    servers,
)

T = 10.0


def _seen(resp_body: bytes) -> dict[str, list[str]]:
    """The request fields the echoing real server saw (lower-case name -> values in order)."""
    out: dict[str, list[str]] = {}
    for k, v in json.loads(resp_body)["headers"]:
        out.setdefault(k.lower(), []).append(v)
    return out


def _all(resp_headers: list[tuple[str, str]], name: str) -> list[str]:
    return [v for k, v in resp_headers if k.lower() == name.lower()]


# -- sans-I/O ------------------------------------------------------------------------------------

def test_no_rules_compile_to_nothing() -> None:
    assert compile_headers(make_vs(), None) is None
    assert compile_headers(make_vs(), SubVS("s")) is None


def test_forwarded_syntax() -> None:
    assert forwarded_line(b"192.0.2.7", b"https", b"example.com") == (
        b"Forwarded: for=192.0.2.7;proto=https;host=example.com\r\n")
    # IPv6: bracketed and quoted; a host with a port (":" is not a token char): quoted.
    assert forwarded_line(b"2001:db8::7", b"http", b"example.com:8080") == (
        b'Forwarded: for="[2001:db8::7]";proto=http;host="example.com:8080"\r\n')
    assert forwarded_line(b"192.0.2.7", b"http", b"") == b"Forwarded: for=192.0.2.7;proto=http\r\n"


def test_hsts_values() -> None:
    assert hsts_value(Hsts(max_age=300)) == "max-age=300"
    assert hsts_value(Hsts(include_subdomains=True, preload=True)) == (
        "max-age=31536000; includeSubDomains; preload")


def test_vs_then_subvs_order_and_response_edit() -> None:
    vs = make_vs(headers=HeaderRules(request_add=(("X-A", "1"), ("X-B", "$scheme")),
                                     response_set=(("X-Frame-Options", "DENY"),)))
    sub = SubVS("s", headers=HeaderRules(request_remove=("x-a",),
                                         response_remove=("Server",)))
    edit = compile_headers(vs, sub)
    assert edit is not None
    fwd = [b"GET", b" ", b"/", b" HTTP/1.1\r\n", b"X-A", b": ", b"client", b"\r\n",
           b"Host", b": ", b"h", b"\r\n"]
    out = edit.request(fwd, b"192.0.2.7", b"h", 80)
    assert b"".join(out) == b"GET / HTTP/1.1\r\nHost: h\r\nX-B: http\r\n"
    resp = edit.response(b"192.0.2.7", b"h", 80)
    assert resp is not None
    head = b"HTTP/1.1 200 OK\r\nserver: x\r\nX-Frame-Options: SAMEORIGIN\r\nServer-Timing: a\r\n"
    assert edit_response(head, resp) == (
        b"HTTP/1.1 200 OK\r\nServer-Timing: a\r\nX-Frame-Options: DENY\r\n")


# -- over a real data plane -----------------------------------------------------------------------

async def test_request_rules_and_variables(dataplane: DataPlane, upstream: Upstream) -> None:
    rules = HeaderRules(
        request_set=(("X-Real-IP", "$client_ip"), ("X-Env", "prod")),
        request_add=(("X-Via", "lb $scheme://${host}:$server_port $$5"),),
        request_remove=("X-Debug", "Cookie"))
    ports = await serve(dataplane, make_vs(ports=(upstream.port,), headers=rules))
    port = ports["web"]
    async with asyncio.timeout(T):
        c = await Client.connect(port)
        r = await c.request(path="/echo", host="shop.test", headers=(
            ("X-Real-IP", "6.6.6.6"), ("x-env", "dev"), ("X-Env", "dev2"), ("X-Via", "client"),
            ("X-Debug", "1"), ("cookie", "a=b"), ("X-Kept", "yes")))
        c.close()
    seen = _seen(r.body)
    assert seen["x-real-ip"] == ["127.0.0.1"]  # set: the client's value replaced
    assert seen["x-env"] == ["prod"]  # both of the client's fields replaced by one
    assert seen["x-via"] == ["client", f"lb http://shop.test:{port} $5"]  # add: appended
    assert "x-debug" not in seen and "cookie" not in seen
    assert seen["x-kept"] == ["yes"]
    assert seen["x-forwarded-for"] == ["127.0.0.1"]  # add_forwarded_headers untouched


@pytest.mark.parametrize("chunked", [False, True])
async def test_response_rules_on_both_paths(chunked: bool, dataplane: DataPlane) -> None:
    """A response in one read with a Content-Length (the unparsed path otherwise) and a chunked
    one (the parser's path) get the same edits."""
    body = b"hello"
    if chunked:
        resp = (b"HTTP/1.1 200 OK\r\nServer: nginx/1.0\r\nX-Powered-By: php\r\n"
                b"Transfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n")
    else:
        resp = (b"HTTP/1.1 200 OK\r\nServer: nginx/1.0\r\nX-Powered-By: php\r\n"
                b"Content-Length: 5\r\n\r\nhello")
    rules = HeaderRules(response_remove=("server", "X-Powered-By"),
                        response_set=(("Cache-Control", "no-store"),),
                        response_add=(("X-Client", "$client_ip"),))
    async with RawUpstream(answering([resp, resp])) as raw:
        ports = await serve(dataplane, make_vs(ports=(raw.port,), headers=rules))
        async with asyncio.timeout(T):
            c = await Client.connect(ports["web"])
            for _ in range(2):  # the second: a head byte-identical to the first
                r = await c.request()
                assert r.status == 200 and r.body == body
                assert _all(r.headers, "Server") == [] and _all(r.headers, "X-Powered-By") == []
                assert _all(r.headers, "Cache-Control") == ["no-store"]
                assert _all(r.headers, "X-Client") == ["127.0.0.1"]
            c.close()


async def test_subvs_rules_apply_after_the_vs_rules(dataplane: DataPlane,
                                                    upstream: Upstream) -> None:
    vs = make_vs(real_servers=(), content_switching=True,
                 headers=HeaderRules(request_add=(("X-From-VS", "1"), ("X-Both", "vs"))),
                 subvs=(SubVS("api", real_servers=servers(upstream.port), rules=("default",),
                              health_check=NO_CHECK,
                              headers=HeaderRules(request_remove=("X-From-VS",),
                                                  request_set=(("X-Both", "subvs"),))),))
    ports = await serve(dataplane, vs)
    async with asyncio.timeout(T):
        c = await Client.connect(ports["web"])
        r = await c.request(path="/echo")
        c.close()
    seen = _seen(r.body)
    assert "x-from-vs" not in seen
    assert seen["x-both"] == ["subvs"]


async def test_forwarded_and_x_forwarded_proto(dataplane: DataPlane, upstream: Upstream) -> None:
    """Forwarded for an IPv6 client (named by a PROXY header: loopback is IPv4 here), and
    X-Forwarded-Proto on a VS that adds no X-Forwarded-* (the client's own one replaced)."""
    ports = await serve(dataplane, make_vs(
        ports=(upstream.port,), add_forwarded_headers=False, proxy_protocol_from=("127.0.0.1",),
        headers=HeaderRules(forwarded=True, x_forwarded_proto=True)))
    async with asyncio.timeout(T):
        c = await Client.connect(ports["web"])
        await c.send(build_pp(2, ("2001:db8::5", 4000, "127.0.0.1", ports["web"])))
        r = await c.request(path="/echo", host="shop.test:8080", headers=(
            ("X-Forwarded-Proto", "https"), ("Forwarded", "for=192.0.2.1")))
        c.close()
    seen = _seen(r.body)
    assert seen["forwarded"] == ["for=192.0.2.1",
                                 'for="[2001:db8::5]";proto=http;host="shop.test:8080"']
    assert seen["x-forwarded-proto"] == ["http"]
    assert "x-forwarded-for" not in seen


async def test_hsts_on_an_https_vs(upstream: Upstream) -> None:
    """On relayed responses, on a "not available" answer and on a redirect of an HTTPS VS; never
    on an HTTP VS (the config refuses it there, see below)."""
    ca = trustme.CA()
    cert = ca.issue_cert("www.example")

    def factory(vs: VirtualService) -> ssl.SSLContext:
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        cert.configure_cert(ctx)
        return ctx

    hsts = HeaderRules(hsts=Hsts(max_age=600, include_subdomains=True))
    tls = TLSSettings(certificates=("c",))
    dp = DataPlane(tls_factory=factory)
    relay = make_vs(ports=(upstream.port,), protocol=Protocol.HTTPS, tls=tls, headers=hsts)
    empty = make_vs("empty", real_servers=(), protocol=Protocol.HTTPS, tls=tls, headers=hsts)
    redirect = make_vs("redir", real_servers=(), protocol=Protocol.HTTPS, tls=tls, headers=hsts,
                       kind=VSKind.REDIRECT, redirect_to="https://www.example{path}")
    plain = make_vs("plain", ports=(upstream.port,))
    got = {}
    try:
        ports = await serve(dp, relay, empty, redirect, plain)
        client_ctx = ssl.create_default_context()
        ca.configure_trust(client_ctx)
        async with asyncio.timeout(T):
            for name in ("web", "empty", "redir", "plain"):
                if name == "plain":
                    c = await Client.connect(ports[name])
                else:
                    r, w = await asyncio.open_connection(
                        "127.0.0.1", ports[name], ssl=client_ctx, server_hostname="www.example")
                    c = Client(r, w)
                got[name] = await c.request(host="www.example", path="/echo", headers=(
                    ("X-Ignored", "1"),))
                c.close()
    finally:
        await dp.shutdown(0.5)
    want = ["max-age=600; includeSubDomains"]
    assert got["web"].status == 200
    assert _all(got["web"].headers, "Strict-Transport-Security") == want
    assert got["empty"].status == 503
    assert _all(got["empty"].headers, "Strict-Transport-Security") == want
    assert got["redir"].status == 301
    assert _all(got["redir"].headers, "Location") == ["https://www.example/echo"]
    assert _all(got["redir"].headers, "Strict-Transport-Security") == want
    assert _all(got["plain"].headers, "Strict-Transport-Security") == []


async def test_response_rules_on_head_and_304(dataplane: DataPlane) -> None:
    head = b"HTTP/1.1 200 OK\r\nServer: x\r\nContent-Length: 5\r\n\r\n"
    not_modified = b"HTTP/1.1 304 Not Modified\r\nServer: x\r\nETag: \"a\"\r\n\r\n"
    rules = HeaderRules(response_remove=("Server",), response_add=(("X-A", "1"),))

    async def handler(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        # (a connection that answered HEAD with a length is not reused: the GET comes on a new one)
        for _ in range(2):
            req = await read_head(r)
            w.write(head if req.startswith(b"HEAD ") else not_modified)
            await w.drain()

    async with RawUpstream(handler) as raw:
        ports = await serve(dataplane, make_vs(ports=(raw.port,), headers=rules))
        async with asyncio.timeout(T):
            c = await Client.connect(ports["web"])
            r = await c.request(method="HEAD")
            assert r.status == 200 and _all(r.headers, "Content-Length") == ["5"]
            assert _all(r.headers, "Server") == [] and _all(r.headers, "X-A") == ["1"]
            r = await c.request(headers=(("If-None-Match", '"a"'),))
            assert r.status == 304 and _all(r.headers, "ETag") == ['"a"']
            assert _all(r.headers, "Server") == [] and _all(r.headers, "X-A") == ["1"]
            c.close()


async def test_no_rules_no_change(dataplane: DataPlane) -> None:
    """Without rules a response goes as the real server wrote it (the one-read path)."""
    resp = b"HTTP/1.1 200 OK\r\nServer: x\r\nContent-Length: 2\r\n\r\nok"
    async with RawUpstream(answering([resp])) as raw:
        ports = await serve(dataplane, make_vs(ports=(raw.port,)))
        async with asyncio.timeout(T):
            c = await Client.connect(ports["web"])
            await c.send(b"GET / HTTP/1.1\r\nHost: h\r\n\r\n")
            got = await c.r.readexactly(len(resp))
            c.close()
    assert got == resp


# -- bad input: refused by the loader and by `lbproxy check`, the key named ---------------------

BASE = """
[[vs]]
name = "web"
listen = "127.0.0.1:18080"
protocol = "{protocol}"
{tls}
[[vs.real_servers]]
address = "127.0.0.1:9000"
[vs.headers]
{headers}
"""


def _config(headers: str, protocol: str = "http") -> str:
    tls = 'tls = { certificates = ["c"] }' if protocol == "https" else ""
    return BASE.format(protocol=protocol, tls=tls, headers=headers)


@pytest.mark.parametrize(("headers", "where", "fragment"), [
    ('request_set = { "X-A" = "' + "v" * 5000 + '" }', "vs[0].headers.request_set.X-A",
     "the limit is 4096"),
    ('request_add = { "Bad Name" = "v" }', "vs[0].headers.request_add.Bad Name",
     "not a valid header name"),
    ('response_set = { "X-A" = "ok\\r\\nSet-Cookie: evil=1" }', "vs[0].headers.response_set.X-A",
     "'\\r'"),
    ('request_add = { "X-A" = "a\\u0000b" }', "vs[0].headers.request_add.X-A", "'\\x00'"),
    ('request_set = { "Content-Length" = "0" }', "vs[0].headers.request_set.Content-Length",
     "frames the message"),
    ('request_remove = ["Host"]', "vs[0].headers.request_remove[0]", "routes the request"),
    ('response_remove = ["Transfer-Encoding"]', "vs[0].headers.response_remove[0]",
     "frames the message"),
    ('response_add = { "Connection" = "close" }', "vs[0].headers.response_add.Connection",
     "hop-by-hop"),
    ('request_set = { "X-Forwarded-For" = "1.2.3.4" }',
     "vs[0].headers.request_set.X-Forwarded-For", "add_forwarded_headers"),
    ('request_set = { "X-A" = "$nope" }', "vs[0].headers.request_set.X-A",
     "unknown variable $nope"),
    ('request_set = { "X-A" = "5$" }', "vs[0].headers.request_set.X-A", "starts no variable"),
    ('request_set = { "X-A" = "1" }\nrequest_remove = ["x-a"]', "vs[0].headers.request_set.X-A",
     "both set and removed"),
    ('request_set = { "X-A" = "1", "x-a" = "2" }', "vs[0].headers.request_set.x-a",
     "listed twice"),
    ("hsts = true", "vs[0].headers.hsts", "HTTPS VSs only"),
    ("hsts = { max_age = 60, preload = true }", "vs[0].headers.hsts.preload",
     "needs include_subdomains"),
    ('request_remove = ["X-' + "a" * 300 + '"]', "vs[0].headers.request_remove[0]",
     "the limit is 256"),
    ("forwarded = 1", "vs[0].headers.forwarded", "true or false"),
    ("colour = 1", "vs[0].headers.colour", "unknown key"),
])
def test_bad_rules_are_refused_with_their_key(headers: str, where: str, fragment: str,
                                              tmp_path: Path,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    text = _config(headers)
    with pytest.raises(ConfigError) as e:
        parse_config(text)
    found = [(p.where, p.message) for p in e.value.problems]
    assert [1 for w, m in found if w == where and fragment in m], found
    path = tmp_path / "lb.toml"
    path.write_text(text)
    assert lbproxy_main(["check", "-c", str(path)]) == 1
    err = capsys.readouterr().err
    # `check` names the VS too, and the line: "lb.toml:10: vs "web" (vs[0]).headers...".
    located = where.replace("vs[0]", 'vs "web" (vs[0])', 1)
    assert located in err and fragment in err and f"{path}:" in err, err


def test_too_many_rules_are_refused() -> None:
    many = ", ".join(f'"X-{i}" = "v"' for i in range(65))
    with pytest.raises(ConfigError, match="65 headers; the limit is 64"):
        parse_config(_config(f"response_add = {{ {many} }}"))


def test_hsts_and_a_good_table_load() -> None:
    cfg = parse_config(_config(
        'hsts = { max_age = 31536000, include_subdomains = true, preload = true }\n'
        'request_set = { "X-Real-IP" = "$remote_addr" }\nforwarded = true', "https"))
    h = cfg.virtual_services[0].headers
    assert h.hsts == Hsts(31536000, True, True)
    assert h.request_set == (("X-Real-IP", "$remote_addr"),) and h.forwarded


async def test_the_default_vs_compiles_to_no_work(dataplane: DataPlane,
                                                  upstream: Upstream) -> None:
    """What the per-request path tests is None for a VS without rules or PROXY protocol: the
    pool's header edit and the VS's PROXY sources (the request and response heads then go out
    exactly as before, the one-read response path included)."""
    vs = make_vs(real_servers=(), content_switching=True,
                 subvs=(SubVS("a", real_servers=servers(upstream.port), rules=("default",),
                              health_check=NO_CHECK),))
    await serve(dataplane, vs, make_vs("direct", ports=(upstream.port,)))
    for lst in dataplane._listeners.values():
        svc = lst.service
        assert svc.pp_sources is None
        targets = (*svc.targets, *((svc.direct,) if svc.direct is not None else ()))
        assert targets and all(t.headers is None for t in targets)
        assert all(st.cp.send_proxy == 0 for t in targets for st in t.pools.values())
