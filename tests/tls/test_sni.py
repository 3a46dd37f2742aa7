"""SNI through a real TLS listener built by TLSContexts: exact names, a wildcard, the default
without SNI or for an unknown name, TLS versions, ALPN, and cipher policy."""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import trustme

from lbproxy.certs import CertStore
from lbproxy.proxy.tls import TLSContexts, TLSSetupError
from tests.certs.helpers import (
    client_context,
    handshake,
    https_vs,
    issue,
    request,
    serial_of,
    start_responder,
    unverified_context,
)

NAMES = {"a": "a.example.com", "b": "b.example.com", "c": "c.example.net",
         "wild": "*.example.com", "dflt": "default.example.org"}


@dataclass
class Site:
    ca: trustme.CA
    store: CertStore
    tls: TLSContexts
    port: int
    serials: dict[str, int]


@pytest.fixture
async def site(tmp_path: Path) -> AsyncIterator[Site]:
    ca = trustme.CA()
    store = CertStore(tmp_path / "state")
    serials = {}
    for cid, name in NAMES.items():
        chain, key = issue(ca, name)
        store.import_pem(cid, chain, key)
        serials[cid] = serial_of(chain)
    vs = https_vs("shop", 1, tuple(NAMES), default="dflt")
    tls = TLSContexts(store, [vs])
    server, port = await start_responder(tls.factory(vs))
    yield Site(ca, store, tls, port, serials)
    server.close()
    await server.wait_closed()


@pytest.mark.parametrize(("sni", "expected"), [
    ("a.example.com", "a"),
    ("B.Example.COM", "b"),          # names are case-insensitive
    ("c.example.net", "c"),
    ("shop.example.com", "wild"),    # no exact name: the wildcard
    ("a.b.example.com", "dflt"),     # a wildcard covers one label only
    ("example.com", "dflt"),         # ... and not the bare parent
    ("unknown.test", "dflt"),        # unknown name: the default
    (None, "dflt"),                  # no SNI at all: the default
])
async def test_sni_picks_the_certificate(site: Site, sni: str | None, expected: str) -> None:
    assert await handshake(site.port, sni) == site.serials[expected]
    assert site.tls.choose("shop", sni) == expected


async def test_verified_client_gets_a_valid_chain_and_alpn(site: Site) -> None:
    reader, writer = await asyncio.open_connection(
        "127.0.0.1", site.port, ssl=client_context(site.ca), server_hostname="x.example.com")
    try:
        obj = writer.get_extra_info("ssl_object")
        assert obj.selected_alpn_protocol() == "http/1.1"
        assert obj.version() in ("TLSv1.2", "TLSv1.3")
        assert await request(reader, writer, "x.example.com") == b"HTTP/1.1 200 OK\nok"
    finally:
        writer.close()


@pytest.mark.parametrize("version", [ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_3])
async def test_tls12_and_13_accepted(site: Site, version: ssl.TLSVersion) -> None:
    ctx = unverified_context()
    ctx.minimum_version = ctx.maximum_version = version
    _, writer = await asyncio.open_connection("127.0.0.1", site.port, ssl=ctx,
                                              server_hostname="a.example.com")
    try:
        assert writer.get_extra_info("ssl_object").version() == version.name.replace("v1_", "v1.")
    finally:
        writer.close()


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
async def test_tls11_refused(site: Site) -> None:
    ctx = unverified_context()
    try:
        ctx.minimum_version = ctx.maximum_version = ssl.TLSVersion.TLSv1_1
    except ValueError:
        pytest.skip("this OpenSSL cannot even offer TLS 1.1")
    ctx.set_ciphers("ALL:@SECLEVEL=0")
    with pytest.raises((ssl.SSLError, ConnectionError)):
        await asyncio.wait_for(asyncio.open_connection(
            "127.0.0.1", site.port, ssl=ctx, server_hostname="a.example.com"), 5)


async def test_cipher_policy_applies_to_tls12(tmp_path: Path) -> None:
    ca = trustme.CA()
    store = CertStore(tmp_path / "state")
    store.import_pem("a", *issue(ca, "a.example.com"))
    vs = https_vs("v", 1, ("a",), ciphers="ECDHE-ECDSA-CHACHA20-POLY1305")
    tls = TLSContexts(store, [vs])
    server, port = await start_responder(tls.factory(vs))
    try:
        ctx = unverified_context()
        ctx.maximum_version = ssl.TLSVersion.TLSv1_2
        _, writer = await asyncio.open_connection("127.0.0.1", port, ssl=ctx,
                                                  server_hostname="a.example.com")
        assert writer.get_extra_info("ssl_object").cipher()[0] == "ECDHE-ECDSA-CHACHA20-POLY1305"
        writer.close()
        ctx.set_ciphers("ECDHE-ECDSA-AES128-GCM-SHA256")  # outside the policy
        with pytest.raises((ssl.SSLError, ConnectionError)):
            await asyncio.wait_for(asyncio.open_connection(
                "127.0.0.1", port, ssl=ctx, server_hostname="a.example.com"), 5)
    finally:
        server.close()
        await server.wait_closed()


def test_bad_cipher_policy_is_a_clear_error(tmp_path: Path) -> None:
    store = CertStore(tmp_path / "state")
    tls = TLSContexts(store)
    with pytest.raises(TLSSetupError, match="selects no cipher"):
        tls.factory(https_vs("v", 1, ("a",), ciphers="NOPE-NOT-A-CIPHER"))


async def test_assignment_at_run_time_is_served_without_restart(site: Site) -> None:
    chain, key = issue(site.ca, "new.example.org")
    site.store.import_pem("new", chain, key)
    assert await handshake(site.port, "new.example.org") == site.serials["dflt"]
    site.store.assign("new", "shop")  # no refresh() call: the next handshake notices
    assert await handshake(site.port, "new.example.org") == serial_of(chain)
    site.store.assign("new", "shop", default=True)
    assert await handshake(site.port, None) == serial_of(chain)
    assert site.store.unassign("new", "shop")
    assert await handshake(site.port, "new.example.org") == site.serials["dflt"]
