"""HTTPS VSs through the real DataPlane with TLSContexts as its tls_factory: SNI selection,
content rules and SubVSs exactly as on HTTP, and a certificate swap under load with no failed
request and no listener restart."""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import trustme

from lbproxy.certs import CertStore, config_usage
from lbproxy.config import parse_config
from lbproxy.config.model import Address
from lbproxy.proxy import DataPlane
from lbproxy.proxy.tls import TLSContexts
from lbproxy.runtime import RuntimeStore
from tests.certs.helpers import (
    DEADLINE,
    client_context,
    handshake,
    issue,
    peer_serial,
    request,
    serial_of,
)

NAMES = {"a": "a.example.com", "b": "b.example.com", "c": "c.example.net",
         "wild": "*.example.com", "dflt": "default.example.org"}

CONFIG = """
[[rule]]
name = "api"
match = "prefix"
pattern = "/api/"

[[vs]]
name = "shop"
listen = "127.0.0.1:1"  # replaced by port 0 (ephemeral) below
protocol = "https"
tls = { certificates = ["a", "b", "c", "wild", "dflt"], default_certificate = "dflt" }

  [[vs.subvs]]
  name = "api"
  rules = ["api"]
  not_available = { status = 200, body = "api" }

  [[vs.subvs]]
  name = "web"
  rules = ["default"]
  not_available = { status = 200, body = "web" }
"""


@dataclass
class Site:
    ca: trustme.CA
    store: CertStore
    tls: TLSContexts
    port: int
    serials: dict[str, int]
    dataplane: DataPlane


@pytest.fixture
async def site(tmp_path: Path) -> AsyncIterator[Site]:
    ca = trustme.CA()
    cfg = parse_config(CONFIG)
    vs = dataclasses.replace(cfg.virtual_services[0], listen=Address("127.0.0.1", 0))
    runtime = RuntimeStore(dataclasses.replace(cfg, virtual_services=(vs,)))
    store = CertStore(tmp_path / "state", usage=config_usage(lambda: runtime.current.config))
    serials = {}
    for cid, name in NAMES.items():
        chain, key = issue(ca, name)
        store.import_pem(cid, chain, key)
        serials[cid] = serial_of(chain)
    tls = TLSContexts(store, runtime.current.effective_services())
    dataplane = DataPlane(tls_factory=tls.factory)
    runtime.subscribe(tls.on_runtime)
    runtime.subscribe(dataplane.apply)
    await dataplane.apply(runtime.current)
    port = dataplane.listening_ports()["shop"][1]
    yield Site(ca, store, tls, port, serials, dataplane)
    await dataplane.shutdown(1.0)


@pytest.mark.parametrize(("sni", "expected"), [
    ("a.example.com", "a"), ("b.example.com", "b"), ("c.example.net", "c"),
    ("other.example.com", "wild"), ("nobody.test", "dflt"), (None, "dflt"),
])
async def test_sni_through_the_dataplane(site: Site, sni: str | None, expected: str) -> None:
    assert await handshake(site.port, sni) == site.serials[expected]


async def test_content_rules_and_subvs_as_on_http(site: Site) -> None:
    reader, writer = await asyncio.open_connection(
        "127.0.0.1", site.port, ssl=client_context(site.ca), server_hostname="a.example.com")
    try:
        assert await request(reader, writer, "a.example.com", "/api/x") == b"HTTP/1.1 200 OK\napi"
        assert await request(reader, writer, "a.example.com", "/") == b"HTTP/1.1 200 OK\nweb"
    finally:
        writer.close()


async def test_swap_under_load_through_the_dataplane(site: Site) -> None:
    """6 workers, each opening connections of 10 requests; the certificate of b.example.com is
    replaced after 100 requests. A worker opens at least 5 connections and goes on (at most 20)
    until one of them began after the swap, so that new handshakes are checked however long the
    swap takes on a loaded machine."""
    host, ctx = "b.example.com", client_context(site.ca)
    new_chain, new_key = issue(site.ca, host)
    new_serial = serial_of(new_chain)
    ports_before = site.dataplane.listening_ports()
    done, failures = 0, list[BaseException]()
    handshakes: list[tuple[float, int]] = []
    swap_due = asyncio.Event()
    swapped = asyncio.Event()
    swapped_at: list[float] = []

    async def worker() -> None:
        nonlocal done
        after_swap = False
        for n in range(20):
            if n >= 5 and after_swap:
                break
            after_swap = after_swap or swapped.is_set()
            started = time.monotonic()
            try:
                reader, writer = await asyncio.wait_for(asyncio.open_connection(
                    "127.0.0.1", site.port, ssl=ctx, server_hostname=host), DEADLINE)
            except (OSError, TimeoutError) as e:
                failures.append(e)
                continue
            handshakes.append((started, peer_serial(writer)))
            try:
                for _ in range(10):
                    assert await request(reader, writer, host, "/") == b"HTTP/1.1 200 OK\nweb"
                    done += 1
                    if done >= 100:
                        swap_due.set()
            except (OSError, TimeoutError, asyncio.IncompleteReadError, AssertionError) as e:
                failures.append(e)
            finally:
                writer.close()

    async def swapper() -> None:
        await swap_due.wait()
        await asyncio.to_thread(site.store.import_pem, "b", new_chain, new_key, replace=True)
        site.tls.refresh()
        swapped_at.append(time.monotonic())
        swapped.set()

    await asyncio.wait_for(asyncio.gather(swapper(), *(worker() for _ in range(6))), 60)
    assert failures == [] and done == 10 * len(handshakes) and len(handshakes) >= 30
    assert site.dataplane.listening_ports() == ports_before
    after = {s for started, s in handshakes if started > swapped_at[0]}
    assert after == {new_serial}
    assert site.serials["b"] in {s for _, s in handshakes}  # the swap happened mid-load
