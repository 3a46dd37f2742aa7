"""Waiting for a server process a test started (knotd, redis-server, Pebble) to be ready, and
killing it: the one bounded readiness loop the support modules share."""

from __future__ import annotations

import subprocess
import time
from collections.abc import Callable


def kill(proc: subprocess.Popen[bytes] | None, timeout: float) -> None:
    """SIGKILL `proc` if it still runs, and reap it."""
    if proc is not None and proc.poll() is None:
        proc.kill()
        proc.wait(timeout=timeout)


def wait_ready(proc: subprocess.Popen[bytes], what: str, probe: Callable[[], bool],
               tail: Callable[[], str], *, timeout: float, interval: float,
               not_yet: tuple[type[BaseException], ...] = (), not_ready: str = "not ready",
               stop_timeout: float = 10.0) -> None:
    """Poll `probe` until it returns True (an exception in `not_yet` counts as "not yet").
    `proc` exiting first is an error with `tail()` (its log); so is `timeout` passing, after
    `proc` is killed."""
    deadline = time.monotonic() + timeout
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited at start-up:\n{tail()}")
        try:
            if probe():
                return
        except not_yet:
            pass
        if time.monotonic() > deadline:
            kill(proc, stop_timeout)
            raise RuntimeError(f"{what} {not_ready} within {timeout} s:\n{tail()}")
        time.sleep(interval)
