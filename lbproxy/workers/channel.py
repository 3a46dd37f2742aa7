"""The channel between the control process and one worker process: the messages, and their framing
(a length, a format version, a pickle) over the Unix socket pair the control process made.

Why pickle: both ends are the same installed code, started by the control process, and the socket
is an inherited descriptor no other process can reach (no path, no port), so what crosses it is as
trusted as the control process's own memory; pickle carries the frozen config model as it is,
with no second codec to keep in step with it. The version byte and the package version in `Hello`
catch a worker started from another install (lbproxy upgraded on disk under a running control
process): it refuses to run rather than misread.
"""

from __future__ import annotations

import asyncio
import pickle
import struct
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from ..errors import LBProxyError
from ..proxy.tls import CertSnapshot
from ..runtime import Runtime, off_loop
from ..servercontrol import ServerTable

FORMAT_VERSION = 1
# Length of what follows (network order), then the format version.
_HEADER = struct.Struct("!IB")
# A config of 1,024 rules pickles to ~0.5 MB; anything near this is a bug, not a config.
MAX_MESSAGE = 64 * 1024 * 1024
# From this size on, a message is unpickled in a worker thread (the 10,000 rules of
# bench/reload_bench.py: ~0.75 MB, ~40 ms of unpickling).
_OFF_LOOP_BYTES = 64 * 1024

# (VS, SubVS name or "" for the VS's own real servers) -> address -> (healthy, checked, reason)
HealthStates = Mapping[tuple[str, str], Mapping[str, tuple[bool, bool, str]]]


class ChannelError(LBProxyError):
    """The other end sent something this end cannot read (version, size, type)."""


# -- control process -> worker --------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class Hello:
    """The first message: who the worker is and how it logs."""

    worker: int
    package_version: str
    log_level: int
    base_dir: str  # a relative access-log path is relative to it (the config file's folder)
    request_tag: bool  # add "X-Lbproxy-Worker: <worker>" to forwarded requests (debug)


@dataclass(frozen=True, slots=True)
class Apply:
    """Serve this generation (its config's port 0 listeners already resolved to real ports)."""

    runtime: Runtime


@dataclass(frozen=True, slots=True)
class Certificates:
    snapshot: CertSnapshot


@dataclass(frozen=True, slots=True)
class Health:
    states: HealthStates


@dataclass(frozen=True, slots=True)
class Servers:
    """Run-time real-server overrides (lbproxy.servercontrol), the whole table each time."""

    table: ServerTable


@dataclass(frozen=True, slots=True)
class TicketKeys:
    """Session ticket keys, newest first: the first encrypts, all decrypt."""

    keys: tuple[bytes, ...]


@dataclass(frozen=True, slots=True)
class StatsQuery:
    query: int


@dataclass(frozen=True, slots=True)
class Stop:
    """Stop accepting, let requests in flight finish for up to `drain_timeout`, exit."""

    drain_timeout: float


# -- worker -> control process --------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class Applied:
    """A generation is served ("" error), or could not be (the worker still serves its last)."""

    generation: int
    error: str = ""


@dataclass(frozen=True, slots=True)
class Stats:
    query: int
    stats: Mapping[str, Any] = field(default_factory=dict)


Message = (Hello | Apply | Certificates | Health | Servers | TicketKeys | StatsQuery | Stop
           | Applied | Stats)
_TYPES = (Hello, Apply, Certificates, Health, Servers, TicketKeys, StatsQuery, Stop, Applied,
          Stats)


def encode(msg: Message) -> bytes:
    payload = pickle.dumps(msg, protocol=pickle.HIGHEST_PROTOCOL)
    if len(payload) > MAX_MESSAGE:
        raise ChannelError(f"{type(msg).__name__} message of {len(payload)} bytes is too large")
    return _HEADER.pack(len(payload), FORMAT_VERSION) + payload


async def send(writer: asyncio.StreamWriter, msg: Message) -> None:
    writer.write(encode(msg))
    await writer.drain()


async def receive(reader: asyncio.StreamReader) -> Message | None:
    """The next message, or None when the other end closed the channel."""
    try:
        head = await reader.readexactly(_HEADER.size)
    except asyncio.IncompleteReadError as e:
        if e.partial:
            raise ChannelError("the channel closed inside a message header") from None
        return None
    length, version = _HEADER.unpack(head)
    if version != FORMAT_VERSION:
        raise ChannelError(f"message format {version}, this end reads {FORMAT_VERSION}")
    if length > MAX_MESSAGE:
        raise ChannelError(f"message of {length} bytes announced (at most {MAX_MESSAGE})")
    try:
        payload = await reader.readexactly(length)
    except asyncio.IncompleteReadError:
        raise ChannelError("the channel closed inside a message") from None
    try:
        # Off the loop of a worker that serves meanwhile (runtime.off_loop); small messages are
        # not worth a thread.
        msg = (pickle.loads(payload) if length < _OFF_LOOP_BYTES
               else await off_loop(pickle.loads, payload))
    except Exception as e:  # unpickling raises anything a damaged stream makes it meet
        raise ChannelError(f"unreadable message: {e}") from None
    if not isinstance(msg, _TYPES):
        raise ChannelError(f"unexpected message type {type(msg).__name__}")
    return msg
