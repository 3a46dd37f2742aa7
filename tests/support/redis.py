"""Start, stop and restart a real redis-server (Debian's /usr/bin/redis-server) on a free
127.0.0.1 port for tests.

`start_redis(workdir, password=..., user=...)` is a context manager yielding a `RedisInstance`:
its own directory and config file, no persistence while it runs, but `stop()` saves the data
(`SHUTDOWN SAVE`) and `start()` brings it back on the same port with the same dump file, so a
client sees "Redis went away, then came back". Readiness is a PING answered within a bounded
deadline. `redis_or_skip()` skips a test cleanly when redis-server or redis-py is absent.
"""

from __future__ import annotations

import contextlib
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import quote

from tests.support.pebble import free_port
from tests.support.process import kill, wait_ready

if TYPE_CHECKING:
    import redis

READY_TIMEOUT = 10.0  # seconds for redis-server to answer PING; it starts in ~20 ms here
STOP_TIMEOUT = 10.0   # seconds for it to save and exit
POLL_INTERVAL = 0.02  # readiness polling step (bounded by READY_TIMEOUT)


def redis_available() -> bool:
    if shutil.which("redis-server") is None:
        return False
    try:
        import redis  # noqa: F401
    except ImportError:
        return False
    return True


def redis_or_skip() -> None:
    import pytest

    if not redis_available():
        pytest.skip("redis-server or redis-py not installed (apt-get install -y redis-server)")


class RedisInstance:
    """One redis-server; `url` stays valid across `stop()` / `start()`."""

    def __init__(self, workdir: Path, *, password: str | None = None,
                 user: tuple[str, str] | None = None) -> None:
        self.workdir = workdir
        self.port = free_port()
        self.password = password
        self.user = user  # an extra ACL user (name, password) allowed everything
        self.log = workdir / "redis.log"
        self.conf = workdir / "redis.conf"
        self.proc: subprocess.Popen[bytes] | None = None
        lines = [
            "bind 127.0.0.1",
            f"port {self.port}",
            f"dir {workdir}",
            "dbfilename dump.rdb",
            'save ""',          # nothing written while it runs; stop() saves explicitly
            "appendonly no",
            "daemonize no",
            f"logfile {self.log}",
            "databases 4",
        ]
        if password is not None:
            lines.append(f"requirepass {password}")
        if user is not None:
            lines.append(f"user {user[0]} on >{user[1]} ~* &* +@all")
        self.conf.write_text("\n".join(lines) + "\n")

    @property
    def url(self) -> str:
        """redis:// with the default user's password, if the server has one."""
        auth = f":{quote(self.password, safe='')}@" if self.password is not None else ""
        return f"redis://{auth}127.0.0.1:{self.port}/0"

    @property
    def bare_url(self) -> str:
        """redis:// without any password."""
        return f"redis://127.0.0.1:{self.port}/0"

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def client(self, db: int = 0, *, timeout: float = 5.0) -> redis.Redis:
        """A synchronous client (as the default user), for reading Redis directly. It does not
        retry: a test sees a failure as it happens."""
        import redis
        from redis.backoff import NoBackoff
        from redis.retry import Retry

        return redis.Redis(host="127.0.0.1", port=self.port, db=db, password=self.password,
                           socket_timeout=timeout, socket_connect_timeout=timeout,
                           retry=Retry(NoBackoff(), 0))

    def start(self) -> None:
        """Run redis-server (again) on the same port, directory and dump file."""
        if self.running:
            raise RuntimeError("redis-server is already running")
        self.proc = subprocess.Popen(["redis-server", str(self.conf)], stdin=subprocess.DEVNULL,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
        self._wait_ready()

    def _wait_ready(self) -> None:
        import redis

        def pong() -> bool:
            c = self.client(timeout=1.0)
            try:
                return bool(c.ping())
            finally:
                c.close()

        assert self.proc is not None
        # BusyLoadingError: loading the dump, up soon
        wait_ready(self.proc, "redis-server", pong, self._tail, timeout=READY_TIMEOUT,
                   interval=POLL_INTERVAL, stop_timeout=STOP_TIMEOUT,
                   not_yet=(redis.exceptions.BusyLoadingError, redis.exceptions.ConnectionError))

    def stop(self, *, save: bool = True) -> None:
        """SHUTDOWN SAVE (or NOSAVE) and wait for the process to exit."""
        import redis

        if not self.running:
            return
        assert self.proc is not None
        c = self.client()
        try:
            c.shutdown(save=save, nosave=not save)
        except redis.exceptions.ConnectionError:
            pass  # it closed the connection while exiting
        finally:
            c.close()
        try:
            self.proc.wait(timeout=STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            self._kill()
            raise RuntimeError(
                f"redis-server did not exit on SHUTDOWN:\n{self._tail()}") from None
        self.proc = None

    def _kill(self) -> None:
        kill(self.proc, STOP_TIMEOUT)
        self.proc = None

    def _tail(self) -> str:
        try:
            return self.log.read_text(errors="replace")[-2000:]
        except OSError:
            return "(no log)"


@contextlib.contextmanager
def start_redis(workdir: Path, password: str | None = None, *,
                user: tuple[str, str] | None = None) -> Iterator[RedisInstance]:
    """A running redis-server until the block exits (then stopped without saving)."""
    workdir.mkdir(parents=True, exist_ok=True)
    instance = RedisInstance(workdir, password=password, user=user)
    instance.start()
    try:
        yield instance
    finally:
        if instance.running:
            assert instance.proc is not None
            instance.proc.terminate()  # SIGTERM: with `save ""` it exits without writing
            try:
                instance.proc.wait(timeout=STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                instance._kill()
        instance.proc = None
