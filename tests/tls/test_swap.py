"""Live swap: replacing a certificate during a bounded HTTPS load loop drops no request, new
handshakes see the new serial at once, and established connections carry on with the old one."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import trustme

from lbproxy.certs import CertStore
from lbproxy.proxy.tls import TLSContexts
from tests.certs.helpers import (
    DEADLINE,
    client_context,
    https_vs,
    issue,
    peer_serial,
    request,
    serial_of,
    start_responder,
)

WORKERS = 6
CONNECTIONS_PER_WORKER = 5
REQUESTS_PER_CONNECTION = 10  # 6 x 5 x 10 = 300 requests, 30 handshakes
SWAP_AFTER = 100  # requests done before the certificate is replaced
HOST = "shop.example.com"


async def test_swap_under_load_drops_nothing(tmp_path: Path) -> None:
    ca = trustme.CA()
    store = CertStore(tmp_path / "state")
    old_chain, old_key = issue(ca, HOST)
    store.import_pem("shop", old_chain, old_key)
    vs = https_vs("shop", 1, ("shop",))
    tls = TLSContexts(store, [vs])
    listener_ctx = tls.factory(vs)
    server, port = await start_responder(listener_ctx)
    ctx = client_context(ca)
    new_chain, new_key = issue(ca, HOST)
    old_serial, new_serial = serial_of(old_chain), serial_of(new_chain)

    done = 0
    failures: list[BaseException] = []
    handshakes: list[tuple[float, int]] = []  # (time the connection was started, serial)
    swap_due = asyncio.Event()
    swapped = asyncio.Event()
    swapped_at: list[float] = []

    async def worker() -> None:
        nonlocal done
        for _ in range(CONNECTIONS_PER_WORKER):
            started = time.monotonic()
            try:
                reader, writer = await asyncio.wait_for(asyncio.open_connection(
                    "127.0.0.1", port, ssl=ctx, server_hostname=HOST), DEADLINE)
            except (OSError, TimeoutError) as e:
                failures.append(e)
                continue
            handshakes.append((started, peer_serial(writer)))
            try:
                for _ in range(REQUESTS_PER_CONNECTION):
                    assert await request(reader, writer, HOST) == b"HTTP/1.1 200 OK\nok"
                    done += 1
                    if done >= SWAP_AFTER:
                        swap_due.set()
            except (OSError, TimeoutError, asyncio.IncompleteReadError, AssertionError) as e:
                failures.append(e)
            finally:
                writer.close()

    async def long_lived() -> None:
        """One connection opened before the swap and used after it."""
        nonlocal done
        reader, writer = await asyncio.open_connection("127.0.0.1", port, ssl=ctx,
                                                       server_hostname=HOST)
        assert peer_serial(writer) == old_serial
        await swapped.wait()
        assert await request(reader, writer, HOST) == b"HTTP/1.1 200 OK\nok"
        assert peer_serial(writer) == old_serial  # keeps the certificate it shook hands with
        writer.close()

    async def swapper() -> None:
        await swap_due.wait()
        store.import_pem("shop", new_chain, new_key, replace=True)
        tls.refresh()
        swapped_at.append(time.monotonic())
        swapped.set()

    try:
        await asyncio.wait_for(asyncio.gather(
            long_lived(), swapper(), *(worker() for _ in range(WORKERS))), 60)
    finally:
        server.close()
        await server.wait_closed()

    assert failures == []
    assert done == WORKERS * CONNECTIONS_PER_WORKER * REQUESTS_PER_CONNECTION
    assert tls.factory(vs) is listener_ctx  # the listener was never rebuilt
    (t_swap,) = swapped_at
    after = [serial for started, serial in handshakes if started > t_swap]
    before = [serial for started, serial in handshakes if started < t_swap - 1.0]
    assert after, "the load loop ended before any handshake followed the swap"
    # Required: within 1 s. Delivered: the very next handshake (refresh is synchronous).
    assert set(after) == {new_serial}
    assert set(before) <= {old_serial}
    assert {s for _, s in handshakes} == {old_serial, new_serial}


async def test_new_handshake_sees_swap_without_explicit_refresh(tmp_path: Path) -> None:
    """A writer that forgets refresh() (another component) is still picked up on the next
    handshake, because the listener compares the store's version."""
    ca = trustme.CA()
    store = CertStore(tmp_path / "state")
    store.import_pem("s", *issue(ca, HOST))
    vs = https_vs("v", 1, ("s",))
    tls = TLSContexts(store, [vs])
    server, port = await start_responder(tls.factory(vs))
    try:
        chain, key = issue(ca, HOST)
        store.import_pem("s", chain, key, replace=True)
        t0 = time.monotonic()
        _reader, writer = await asyncio.open_connection(
            "127.0.0.1", port, ssl=client_context(ca), server_hostname=HOST)
        assert peer_serial(writer) == serial_of(chain)
        assert time.monotonic() - t0 < 1.0
        writer.close()
    finally:
        server.close()
        await server.wait_closed()
