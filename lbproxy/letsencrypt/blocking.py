"""Blocking work moved off the loop that serves traffic: key generation, scrypt, PEM encoding
and fsync'd writes run on a worker thread through `on_thread`, the feature's one way to do so;
RSA key generation (seconds per key) on the manager's low-priority `CpuWorkers` instead."""

from __future__ import annotations

import asyncio
import contextvars
import functools
import logging
import os
import threading
from collections.abc import Awaitable, Callable
from concurrent.futures import Executor, ThreadPoolExecutor
from typing import Protocol, TypeVar

logger = logging.getLogger(__name__)

T = TypeVar("T")

# One thread for CPU-bound work, at the lowest priority, so that while 20 RSA-4096 keys are
# generated the serving loop keeps its core and most of the GIL: with asyncio's default executor
# six threads at the loop's own priority took 6/7 of the core, and each thread that computes
# takes its share of the GIL too, so a second one only slows the loop (bench/README.md, "Let's
# Encrypt work and the serving loop").
CPU_WORKERS = 1
CPU_NICE = 19


def _lower_priority() -> None:
    """Nice 19, then (Linux) the SCHED_IDLE policy: the kernel still hands a nice-19 thread a
    full time slice (1-3 ms) whenever the loop waits for a packet, and the loop, woken, waits
    for that slice to end; a SCHED_IDLE thread is preempted as soon as the loop wakes (alone on
    one core: a 1 ms busy/sleep loop's worst wake-up 6.0 ms beside nice-19 RSA key generation,
    0.5 ms beside SCHED_IDLE)."""
    tid = threading.get_native_id()
    try:  # Linux: a thread's priority is its own (setpriority on its thread id)
        os.setpriority(os.PRIO_PROCESS, tid, CPU_NICE)
    except (OSError, AttributeError) as exc:
        logger.debug("CPU workers keep the process priority: %s", exc)
    try:
        os.sched_setscheduler(tid, os.SCHED_IDLE, os.sched_param(0))
    except (OSError, AttributeError) as exc:
        logger.debug("CPU workers keep the normal scheduling policy: %s", exc)


class CpuWorkers:
    """The manager's executor for CPU-bound work, made when first used, shut down by close()."""

    def __init__(self) -> None:
        self._pool: ThreadPoolExecutor | None = None

    def executor(self) -> Executor:
        if self._pool is None:
            self._pool = ThreadPoolExecutor(CPU_WORKERS, thread_name_prefix="lbproxy-le-cpu",
                                            initializer=_lower_priority)
        return self._pool

    def close(self) -> None:
        pool, self._pool = self._pool, None
        if pool is not None:
            pool.shutdown(wait=False)  # queued work still ends: its callers wait for it


async def _run(fn: Callable[[], T], executor: Executor | None) -> T:
    loop = asyncio.get_running_loop()
    ctx = contextvars.copy_context()
    return await loop.run_in_executor(executor, functools.partial(ctx.run, fn))


async def on_thread(fn: Callable[[], T], cpu: CpuWorkers | None = None) -> T:
    """`fn()` on a worker thread (on `cpu`'s low-priority threads when it is CPU-bound work). A
    cancelled caller still waits for it to end before the cancellation goes on: a thread cannot
    be stopped, and a write must never continue after its caller (and so `stop()`) has
    returned."""
    fut = asyncio.ensure_future(_run(fn, cpu.executor() if cpu is not None else None))
    try:
        return await asyncio.shield(fut)
    except asyncio.CancelledError:
        await asyncio.gather(fut, return_exceptions=True)
        raise


class Offload(Protocol):
    """How blocking work (certificate store writes, parsing) leaves the loop: `on_thread` in
    production; a test on a fake clock may run it inline (nothing else waits on that loop)."""

    def __call__(self, fn: Callable[[], T], /) -> Awaitable[T]: ...
