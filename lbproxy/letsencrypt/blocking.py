"""Blocking work moved off the loop that serves traffic: key generation, scrypt, PEM encoding
and fsync'd writes run on a worker thread through `on_thread`, the feature's one way to do so."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


async def on_thread(fn: Callable[[], T]) -> T:
    """`fn()` on a worker thread. A cancelled caller still waits for it to end before the
    cancellation goes on: a thread cannot be stopped, and a write must never continue after its
    caller (and so `stop()`) has returned."""
    fut = asyncio.ensure_future(asyncio.to_thread(fn))
    try:
        return await asyncio.shield(fut)
    except asyncio.CancelledError:
        await asyncio.gather(fut, return_exceptions=True)
        raise
