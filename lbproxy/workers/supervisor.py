"""The control process's side of the worker processes: start N of them, feed each what it serves
(generations, certificates, health states, real-server overrides, ticket keys) over its channel,
restart one that dies (with back-off), collect their stats, stop them gracefully. It stands where
a `DataPlane` stands in a single process: `apply(runtime)`, `stats()`, `listening_ports()`,
`shutdown(drain_timeout)`, `set_servers(table)`. Every listener address is also held here, bound
and never listening (addresses.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import os
import signal
import socket
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from .. import __version__
from ..errors import LBProxyError
from ..proxy.tickets import new_ticket_key, tickets_supported
from ..proxy.tls import CertLookup, CertSnapshot, snapshot
from ..runtime import Runtime
from ..servercontrol import ServerTable
from . import channel as ch
from .addresses import Addresses, release
from .merge import merge_stats
from .probes import Probes

logger = logging.getLogger(__name__)

# A worker that dies is started again after 0.1 s, then 0.2, 0.4 ... at most 10 s while it keeps
# dying; one that ran this long before dying starts the count again.
RESTART_FIRST = 0.1
RESTART_MAX = 10.0
STABLE_AFTER = 30.0
# Longest a worker may take to serve a generation (1,024 rules compile in under a second; a
# worker slower than this is stuck and is restarted).
APPLY_TIMEOUT = 30.0
# Longest a stats query waits for a worker; a worker that misses it shows its last answer.
STATS_TIMEOUT = 2.0
# Ticket keys: a new one every 12 hours; the previous ones still decrypt, so a client that resumes
# within a day keeps its session (as Caddy rotates its STEKs).
TICKET_ROTATION = 12 * 3600.0
TICKET_KEYS_KEPT = 3
# How long a new ticket key is known (decrypt only) before it encrypts: far longer than a
# broadcast takes to reach every worker.
TICKET_PROMOTE = 60.0
# Beyond the drain timeout, how long a stopping worker may take to exit before it is killed.
EXIT_GRACE = 5.0
_PACKAGE_ROOT = str(Path(__file__).resolve().parents[2])


class _Worker:
    """One worker slot: the process now in it and what it reported."""

    def __init__(self, wid: int) -> None:
        self.id = wid
        self.proc: asyncio.subprocess.Process | None = None
        self.writer: asyncio.StreamWriter | None = None
        self.state = "starting"
        self.generation = 0
        self.restarts = 0
        self.started = 0.0
        self.delay = RESTART_FIRST
        self.acks: dict[int, asyncio.Future[str]] = {}
        self.queries: dict[int, asyncio.Future[Mapping[str, Any]]] = {}
        self.stats: Mapping[str, Any] = {}
        self.tasks: set[asyncio.Task[None]] = set()
        self.reopen = False  # an access-log reopen to forward once it runs

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None

    def send(self, data: bytes) -> None:
        if self.writer is not None and not self.writer.is_closing():
            self.writer.write(data)

    def expect(self, generation: int) -> asyncio.Future[str]:
        fut = self.acks.get(generation)
        if fut is None:
            fut = self.acks[generation] = asyncio.get_running_loop().create_future()
        return fut

    def gone(self, why: str) -> None:
        futures: list[asyncio.Future[Any]] = [*self.acks.values(), *self.queries.values()]
        for fut in futures:
            if not fut.done():
                fut.set_exception(LBProxyError(why))
        self.acks.clear()
        self.queries.clear()
        self.writer = None


class Supervisor:
    """N worker processes serving what this control process says."""

    def __init__(self, count: int, *, lookup: CertLookup, base_dir: Path,
                 log_level: int = logging.INFO, request_tag: bool = False) -> None:
        self.count = count
        self._lookup = lookup
        self._base_dir = base_dir
        self._log_level = log_level
        self._request_tag = request_tag
        self._workers = [_Worker(i) for i in range(count)]
        self._runtime: Runtime | None = None
        self._addresses = Addresses()
        self._certs = CertSnapshot()
        self._health: ch.HealthStates = {}
        self._servers: ServerTable = {}
        self._tickets: tuple[bytes, ...] = ()
        self._probes = Probes(self._health_changed)
        self._queries = itertools.count(1)
        self._merged: dict[str, Any] = {}
        self._started = False
        self._stopping = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._rotation: asyncio.Task[None] | None = None

    # -- the DataPlane face ---------------------------------------------------------------------

    async def apply(self, runtime: Runtime) -> None:
        """Serve `runtime` in every worker (the first call starts them) and return once each has
        applied it; requests in flight finish on the generation they started on. A bind failure
        raises ListenError before any worker is told."""
        if self._stopping:
            raise RuntimeError("the workers were shut down")
        self._loop = asyncio.get_running_loop()
        runtime, unused = await self._addresses.reserve(runtime)
        self._runtime = runtime
        await self._probes.apply(runtime)
        self._send_certs()
        gen = runtime.generation
        if not self._started:
            self._started = True
            self._start_tickets()
            results = await asyncio.gather(*(self._spawn(w) for w in self._workers),
                                           return_exceptions=True)
            failed = [r for r in results if isinstance(r, BaseException)]
            if failed:
                await self.shutdown(0)
                raise LBProxyError(f"workers could not start: {failed[0]}")
        else:
            data = ch.encode(ch.Apply(runtime))
            waits: dict[asyncio.Future[str], _Worker] = {}
            for w in self._workers:
                if w.writer is not None:
                    waits[w.expect(gen)] = w
                    w.send(data)
            # asyncio.wait, not wait_for: wait_for of 3.11 can swallow a cancellation.
            if waits:
                await asyncio.wait(waits, timeout=APPLY_TIMEOUT)
            for fut, w in waits.items():
                error = _outcome(fut, f"no answer in {APPLY_TIMEOUT:.0f} s")
                if error:
                    logger.error("worker %d (pid %s) did not apply generation %d: %s; "
                                 "restarting it", w.id, w.pid, gen, error)
                    self._kill(w)
                else:
                    w.generation = gen
        release(unused)

    def listening_ports(self) -> dict[str, tuple[str, int]]:
        return dict(self._addresses.ports)

    def stats(self) -> dict[str, Any]:
        """The sum of every worker's data-plane stats, as of the last `refresh()`."""
        return self._merged

    async def refresh(self) -> None:
        """Ask every worker for its stats (a worker that does not answer in time counts with its
        last answer)."""
        query = next(self._queries)
        data = ch.encode(ch.StatsQuery(query))
        waits: dict[asyncio.Future[Mapping[str, Any]], _Worker] = {}
        for w in self._workers:
            if w.writer is not None:
                fut = w.queries[query] = asyncio.get_running_loop().create_future()
                waits[fut] = w
                w.send(data)
        try:
            if waits:
                await asyncio.wait(waits, timeout=STATS_TIMEOUT)
        finally:
            for fut, w in waits.items():
                w.queries.pop(query, None)
                if fut.done() and not fut.cancelled() and fut.exception() is None:
                    w.stats = fut.result()
        self._merged = merge_stats([w.stats for w in self._workers if w.stats])

    def health(self) -> ch.HealthStates:
        """The health states last sent to the workers."""
        return self._health

    def workers(self) -> list[dict[str, Any]]:
        """Each worker as `lbproxy status` shows it."""
        out = []
        for w in self._workers:
            vss = w.stats.get("virtual_services", {})
            conns = sum(v.get("connections", {}).get("active", 0) for v in vss.values())
            out.append({"id": w.id, "pid": w.pid, "generation": w.generation,
                        "connections": conns, "restarts": w.restarts, "state": w.state})
        return out

    async def shutdown(self, drain_timeout: float) -> None:
        """Stop accepting everywhere, let every worker drain for up to `drain_timeout`, wait for
        them to exit (killing what is left EXIT_GRACE later), release the addresses."""
        self._stopping = True
        if self._rotation is not None:
            self._rotation.cancel()
        await self._probes.stop()
        data = ch.encode(ch.Stop(drain_timeout))
        for w in self._workers:
            w.state = "stopping"
            for t in list(w.tasks):
                if t.get_name().startswith("restart"):
                    t.cancel()
            w.send(data)
        procs = [w.proc for w in self._workers if w.proc is not None]
        if procs:
            _, pending = await asyncio.wait([asyncio.ensure_future(p.wait()) for p in procs],
                                            timeout=drain_timeout + EXIT_GRACE)
            for w in self._workers:
                if w.proc is not None and w.proc.returncode is None:
                    logger.error("worker %d (pid %s) did not exit in time; killed", w.id, w.pid)
                    w.proc.kill()
            if pending:
                await asyncio.wait(pending, timeout=EXIT_GRACE)
        for w in self._workers:
            w.state = "stopped"
            for t in list(w.tasks):
                t.cancel()
        self._addresses.release_all()

    # -- certificates ---------------------------------------------------------------------------

    def certs_changed(self) -> None:
        """A certificate or an assignment changed (any thread): every worker gets it at once."""
        loop = self._loop
        if loop is not None and not loop.is_closed():
            loop.call_soon_threadsafe(self._send_certs)

    def _send_certs(self) -> None:
        if self._runtime is None:
            return
        snap = snapshot(self._lookup, self._runtime.effective_services(),
                        self._certs.version + 1)
        if (snap.materials, snap.assignments) == (self._certs.materials, self._certs.assignments):
            return
        self._certs = snap
        self._broadcast(ch.Certificates(snap))

    # -- health ---------------------------------------------------------------------------------

    def _health_changed(self, states: ch.HealthStates) -> None:
        self._health = states
        self._broadcast(ch.Health(states))

    # -- real-server overrides ------------------------------------------------------------------

    def set_servers(self, table: ServerTable) -> None:
        """Run-time real-server overrides: every worker gets the table at once (ahead of any
        later generation on the same channel), and a worker (re)started later gets it first."""
        self._servers = table
        self._broadcast(ch.Servers(table))

    # -- ticket keys ----------------------------------------------------------------------------

    def _start_tickets(self) -> None:
        if not tickets_supported():
            logger.warning("TLS session tickets cannot be shared between workers here (no "
                           "access to OpenSSL's ticket keys): a session resumes only on the "
                           "worker that made it")
            return
        self._tickets = (new_ticket_key(),)
        self._rotation = asyncio.get_running_loop().create_task(self._rotate(),
                                                                name="ticket-key-rotation")

    async def _rotate(self) -> None:
        """A new key is first sent to decrypt only, and used to encrypt one step later: no
        worker issues a ticket under a key another worker does not know yet."""
        while True:
            await asyncio.sleep(TICKET_ROTATION - TICKET_PROMOTE)
            new = new_ticket_key()
            current, *older = self._tickets
            self._tickets = (current, new, *older)[:TICKET_KEYS_KEPT]
            self._broadcast(ch.TicketKeys(self._tickets))
            await asyncio.sleep(TICKET_PROMOTE)
            self._tickets = (new, current, *older)[:TICKET_KEYS_KEPT]
            self._broadcast(ch.TicketKeys(self._tickets))
            logger.info("TLS session ticket key rotated (%d kept)", len(self._tickets))

    # -- worker processes -----------------------------------------------------------------------

    async def _spawn(self, w: _Worker) -> None:
        """Start the process of slot `w`, send it everything, wait until it serves."""
        assert self._runtime is not None
        parent, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            proc = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "lbproxy.workers.worker", "--fd", str(child.fileno()),
                "--worker", str(w.id), pass_fds=(child.fileno(),),
                stdin=asyncio.subprocess.DEVNULL, env=_child_env())
        except BaseException:
            parent.close()
            raise
        finally:
            child.close()
        reader, writer = await asyncio.open_unix_connection(sock=parent)
        w.proc, w.writer, w.state, w.started = proc, writer, "starting", time.monotonic()
        self._task(w, self._read(w, reader, proc), f"worker {w.id} channel")
        rt = self._runtime
        ack = w.expect(rt.generation)
        for msg in (ch.Hello(w.id, __version__, self._log_level, str(self._base_dir),
                             self._request_tag),
                    ch.TicketKeys(self._tickets), ch.Certificates(self._certs),
                    ch.Health(self._health), ch.Servers(self._servers), ch.Apply(rt)):
            w.send(ch.encode(msg))
        await asyncio.wait({ack}, timeout=APPLY_TIMEOUT)
        error = _outcome(ack, f"no answer in {APPLY_TIMEOUT:.0f} s")
        if error:
            self._kill(w)
            raise LBProxyError(f"worker {w.id}: {error}")
        w.generation = rt.generation
        w.state = "running"
        logger.info("worker %d started (pid %d), generation %d", w.id, proc.pid, rt.generation)
        if w.reopen:  # SIGUSR1 came while it was starting
            self._signal_reopen(w)

    def _task(self, w: _Worker, coro: Any, name: str) -> None:
        task: asyncio.Task[None] = asyncio.get_running_loop().create_task(coro, name=name)
        w.tasks.add(task)
        task.add_done_callback(w.tasks.discard)

    async def _read(self, w: _Worker, reader: asyncio.StreamReader,
                    proc: asyncio.subprocess.Process) -> None:
        why = "its channel closed"
        try:
            while True:
                msg = await ch.receive(reader)
                if msg is None:
                    break
                if isinstance(msg, ch.Applied):
                    fut = w.acks.pop(msg.generation, None)
                    if fut is not None and not fut.done():
                        fut.set_result(msg.error)
                elif isinstance(msg, ch.Stats):
                    q = w.queries.get(msg.query)
                    if q is not None and not q.done():
                        q.set_result(msg.stats)
                else:
                    raise ch.ChannelError(f"a worker does not send {type(msg).__name__}")
        except ch.ChannelError as e:
            why = str(e)
            logger.error("worker %d (pid %d): %s; killing it", w.id, proc.pid, e)
            proc.kill()
        w.gone(f"worker {w.id} {why}")
        code = await proc.wait()
        if self._stopping:
            logger.info("worker %d (pid %d) exited (%s)", w.id, proc.pid, _describe(code))
            return
        ran = time.monotonic() - w.started
        if ran >= STABLE_AFTER:
            w.delay = RESTART_FIRST
        delay = w.delay
        w.delay = min(RESTART_MAX, w.delay * 2)
        w.restarts += 1
        w.state = "restarting"
        logger.error("worker %d (pid %d) exited (%s) after %.1f s; restarting it in %.1f s "
                     "(restart %d)", w.id, proc.pid, _describe(code), ran, delay, w.restarts)
        self._task(w, self._restart(w, delay), f"restart worker {w.id}")

    async def _restart(self, w: _Worker, delay: float) -> None:
        await asyncio.sleep(delay)
        if self._stopping:
            return
        try:
            await self._spawn(w)
        except Exception as e:  # the process is killed; its channel's end restarts it again
            logger.error("worker %d could not be restarted: %s", w.id, e)

    def _kill(self, w: _Worker) -> None:
        if w.proc is not None and w.proc.returncode is None:
            w.proc.kill()

    def reopen_logs(self) -> None:
        """Forward SIGUSR1 (reopen the access log) to every running worker. One still starting
        may have no handler yet (the signal would kill it) but may have opened the file
        already: it gets the signal once it has applied its generation (`_spawn`)."""
        n = 0
        for w in self._workers:
            if w.state == "running":
                n += self._signal_reopen(w)
            else:
                w.reopen = True
        logger.info("access log reopen: signalled %d worker(s)", n)

    @staticmethod
    def _signal_reopen(w: _Worker) -> int:
        w.reopen = False
        proc = w.proc
        if proc is None or proc.returncode is not None:
            return 0
        try:
            proc.send_signal(signal.SIGUSR1)
        except ProcessLookupError:
            return 0
        return 1

    def _broadcast(self, msg: ch.Message) -> None:
        data = ch.encode(msg)
        for w in self._workers:
            w.send(data)


def _child_env() -> dict[str, str]:
    env = dict(os.environ)
    path = env.get("PYTHONPATH")
    env["PYTHONPATH"] = f"{_PACKAGE_ROOT}{os.pathsep}{path}" if path else _PACKAGE_ROOT
    return env


def _outcome(ack: asyncio.Future[str], timeout: str) -> str:
    """A worker's answer to Apply: "" when applied, else why not."""
    if not ack.done():
        ack.cancel()
        return timeout
    if ack.cancelled():
        return "cancelled"
    exc = ack.exception()
    return str(exc) if exc is not None else ack.result()


def _describe(code: int) -> str:
    if code < 0:
        with contextlib.suppress(ValueError):
            return f"signal {signal.Signals(-code).name}"
        return f"signal {-code}"
    return f"code {code}"
