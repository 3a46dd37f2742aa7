"""Writes of the relay's fast paths, held until the end of the event-loop iteration and then made.

A request head without a body (exchange.py, `Exchange._send`) and a whole response for the client
(upstream.py, and local answers) are handed to the `Outbox` instead of being written at once.
uvloop runs call_soon callbacks after every I/O callback of one epoll wake-up, so all of an
iteration's writes go out together once the Python work for every ready connection is done: the
peers (clients, real servers) are woken by a burst rather than once per write, and this core
spends less time in wake-ups and cache misses (bench/README.md, "Writes held to the end of the
loop iteration": about a fifth less kernel time per request).

Order per transport: any other write to, or close of, a transport that may have bytes here goes
through `write()` / `close()`, which flush first (every write and close of the client and upstream
connections does). An abort needs no flush: it drops what is unsent anyway. There is one Outbox
per event loop, shared by every listener and connection pool of the DataPlane: held bytes of one
transport can only be ordered against writes that flush the same Outbox.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

logger = logging.getLogger(__name__)


class Outbox:
    """One per event loop (the DataPlane's): (transport, bytes) pairs in the order handed in."""

    __slots__ = ("items", "loop", "scheduled")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        # transport, data, transport, data, ...; data is bytes, or a list of them when one
        # transport was handed several in a row (pipelined answers): they go out in one write.
        self.items: list[Any] = []
        self.scheduled = False

    def add(self, transport: asyncio.WriteTransport, data: bytes) -> None:
        items = self.items
        if items and items[-2] is transport:
            last = items[-1]
            if type(last) is list:
                last.append(data)
            else:
                items[-1] = [last, data]
            return
        items.append(transport)
        items.append(data)
        if not self.scheduled:
            self.scheduled = True
            self.loop.call_soon(self.flush)

    def write(self, transport: asyncio.WriteTransport, data: bytes) -> None:
        """Write now, after everything held."""
        self.flush()
        transport.write(data)

    def close(self, transport: asyncio.BaseTransport) -> None:
        """Close once everything held (and written) has gone out."""
        self.flush()
        transport.close()

    def flush(self) -> None:
        """Write everything held now, in order (a transport closed meanwhile is skipped): the
        callback at the end of the iteration, or early, before a write or close. An early flush
        lets the next add() schedule a callback of its own (the pending one may find nothing)."""
        self.scheduled = False
        items = self.items
        if not items:
            return
        self.items = []
        for i in range(0, len(items), 2):
            t = items[i]
            if t.is_closing():
                continue
            data = items[i + 1]
            try:
                if type(data) is list:
                    t.writelines(data)  # one write (uvloop: one writev; TLS: one send)
                else:
                    t.write(data)
            except Exception:  # a transport's own failure reaches its protocol; keep going
                logger.exception("write of a held response or request failed")
