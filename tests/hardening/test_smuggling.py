"""Every malformed or ambiguous request of the shared table gets its documented answer, the
connection is closed, and the real server receives none of them; the limit counters move."""

from __future__ import annotations

import asyncio

import pytest

from lbproxy.config.model import Limits
from lbproxy.proxy import DataPlane

from ..proxy.conftest import make_vs, serve
from .conftest import RecordingUpstream
from .smuggling_cases import CASES, GOOD, MAX_BODY, Case, send_case

T = 10  # seconds: an upper bound for any step


def test_the_table_is_big_enough() -> None:
    assert len(CASES) >= 30
    assert len({c.name for c in CASES}) == len(CASES)


async def test_every_case_gets_its_answer_and_reaches_no_real_server(
        dataplane: DataPlane, recorder: RecordingUpstream) -> None:
    ports = await serve(dataplane, make_vs(ports=(recorder.port,),
                                           limits=Limits(max_body=MAX_BODY)))
    port = ports["web"]
    wrong: list[tuple[Case, int, bool]] = []
    async with asyncio.timeout(T * 3):
        for case in CASES:
            status, closed = await asyncio.to_thread(send_case, "127.0.0.1", port, case.raw)
            if status != case.status or not closed:
                wrong.append((case, status, closed))
    assert not wrong, [(c.name, c.status, got, closed) for c, got, closed in wrong]
    assert recorder.received == b"", bytes(recorder.received[:200])
    assert recorder.connections == 0 or recorder.heads == 0
    # The path itself works: a good request reaches the real server.
    status, _ = await asyncio.to_thread(send_case, "127.0.0.1", port, GOOD)
    assert status == 200 and recorder.heads == 1
    limits = dataplane.stats()["virtual_services"]["web"]["limit_rejections"]
    want = {"bad_request": sum(c.status in (400, 405, 505) for c in CASES),
            "header_too_large": 2, "too_many_headers": 1, "body_too_large": 1}
    assert {k: limits[k] for k in want} == want


@pytest.mark.parametrize("split", [1, 7])
async def test_cases_in_pieces_on_a_warm_pool(dataplane: DataPlane, recorder: RecordingUpstream,
                                              split: int) -> None:
    """The same answers when the bytes arrive in pieces and a pooled upstream connection is idle
    (the request head is never flushed to it when the body turns out bad)."""
    ports = await serve(dataplane, make_vs(ports=(recorder.port,),
                                           limits=Limits(max_body=MAX_BODY)))
    port = ports["web"]
    async with asyncio.timeout(T * 3):
        for case in CASES:
            if len(case.raw) > 4096:
                continue
            # Warm the pool: one good request leaves an idle upstream connection.
            r, w = await asyncio.open_connection("127.0.0.1", port)
            w.write(b"GET /warm HTTP/1.1\r\nHost: example.com\r\n\r\n")
            head = await r.readuntil(b"ok")
            assert head.startswith(b"HTTP/1.1 200")
            before = len(recorder.received)
            pieces = [case.raw[i:i + split] for i in range(0, len(case.raw), split)] \
                if split > 1 else [case.raw]
            try:
                for p in pieces:
                    w.write(p)
                    await w.drain()
                rest = await r.read()
            except ConnectionError:
                # Answered and closed while pieces were still going out: the kernel's reset may
                # eat the answer; the real server must still have seen nothing.
                rest = b""
            w.close()
            assert (rest == b"" and split > 1) or rest.startswith(b"HTTP/1.1 %d" % case.status), \
                (case.name, rest[:60])
            got = bytes(recorder.received[before:])
            # A body error comes after a head that was valid: at most that head may have
            # started upstream (then the upstream connection is aborted, never completed).
            assert got == b"" or case.name.startswith("chunk"), (case.name, got[:200])
