"""The control-worker channel's framing: what one end writes the other reads, and what it refuses
(another format version, an oversized length, a foreign type, a stream cut inside a message)."""

from __future__ import annotations

import asyncio
import pickle
import struct

import pytest

from lbproxy.config import parse_config
from lbproxy.runtime import Runtime
from lbproxy.workers import channel as ch


def reader_of(data: bytes) -> asyncio.StreamReader:
    r = asyncio.StreamReader()
    r.feed_data(data)
    r.feed_eof()
    return r


async def test_messages_round_trip_in_order() -> None:
    cfg = parse_config('[[vs]]\nname = "w"\nlisten = "127.0.0.1:8080"\n'
                       'not_available = { status = 200, body = "x" }\n')
    sent: list[ch.Message] = [ch.Apply(Runtime(3, cfg)), ch.StatsQuery(7), ch.Stop(2.5),
                              ch.Applied(3, "boom"), ch.TicketKeys((b"k" * 80,))]
    r = reader_of(b"".join(ch.encode(m) for m in sent))
    got = [await ch.receive(r) for _ in sent]
    assert got == sent
    assert await ch.receive(r) is None  # a clean end between messages


@pytest.mark.parametrize(("data", "error"), [
    (struct.pack("!IB", 1, ch.FORMAT_VERSION + 1) + b"x", "message format"),
    (struct.pack("!IB", ch.MAX_MESSAGE + 1, ch.FORMAT_VERSION), "bytes announced"),
    (struct.pack("!IB", 10, ch.FORMAT_VERSION) + b"abc", "inside a message"),
    (b"\x00\x00", "inside a message header"),
    (struct.pack("!IB", 3, ch.FORMAT_VERSION) + b"zzz", "unreadable message"),
])
async def test_damaged_streams_are_refused(data: bytes, error: str) -> None:
    with pytest.raises(ch.ChannelError, match=error):
        await ch.receive(reader_of(data))


async def test_a_foreign_type_is_refused() -> None:
    payload = pickle.dumps({"not": "a message"})
    data = struct.pack("!IB", len(payload), ch.FORMAT_VERSION) + payload
    with pytest.raises(ch.ChannelError, match="unexpected message type dict"):
        await ch.receive(reader_of(data))
