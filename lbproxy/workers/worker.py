"""A worker process: the data plane alone, fed by its control process over the channel.

Started by the supervisor as `python -m lbproxy.workers.worker --fd N --worker I`. It never reads
the config file, the state directory or a certificate file: every generation, certificate,
health state, real-server override and ticket key arrives as a message, and it answers with
`Applied` and `Stats`. When the channel closes (the control process died) it drains and exits;
SIGINT and SIGHUP, which a terminal or `pkill` sends to the whole process group, are the control
process's to act on; SIGUSR1, which the control process forwards, reopens its access-log file.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import logging
import signal
import socket
import sys
from pathlib import Path

from .. import __version__
from ..accesslog import configure_access_log, reopen_access_log
from ..config.model import AccessLogSettings
from ..proxy import DataPlane
from ..proxy.tls import SwappedLookup, TLSContexts
from . import channel as ch

logger = logging.getLogger(__name__)

# How long a worker whose control process vanished lets requests in flight finish.
ORPHAN_DRAIN = 10.0


class Worker:
    """One worker's state: its data plane, TLS contexts and what the last messages said."""

    def __init__(self, hello: ch.Hello) -> None:
        self.id = hello.worker
        self.base = Path(hello.base_dir)
        self.lookup = SwappedLookup()
        self.tls = TLSContexts(self.lookup)
        tag = f"X-Lbproxy-Worker: {hello.worker}\r\n".encode() if hello.request_tag else b""
        self.dataplane = DataPlane(tls_factory=self.tls.factory, reuse_port=True, probes=False,
                                   request_tag=tag)
        self.access_log: AccessLogSettings | None = None
        self.drain_timeout = ORPHAN_DRAIN
        self.frozen = False

    async def handle(self, msg: ch.Message, writer: asyncio.StreamWriter) -> bool:
        """Act on one message; False once told to stop."""
        if isinstance(msg, ch.Apply):
            await ch.send(writer, await self.apply(msg))
        elif isinstance(msg, ch.Certificates):
            self.lookup.current = msg.snapshot
            self.tls.refresh()
        elif isinstance(msg, ch.Health):
            self.dataplane.set_health(msg.states)
        elif isinstance(msg, ch.Servers):
            self.dataplane.set_servers(msg.table)
        elif isinstance(msg, ch.TicketKeys):
            self.tls.set_ticket_keys(msg.keys)
        elif isinstance(msg, ch.StatsQuery):
            await ch.send(writer, ch.Stats(msg.query, self.dataplane.stats()))
        elif isinstance(msg, ch.Stop):
            self.drain_timeout = msg.drain_timeout
            return False
        else:
            raise ch.ChannelError(f"a worker does not take {type(msg).__name__}")
        return True

    async def apply(self, msg: ch.Apply) -> ch.Applied:
        rt = msg.runtime
        cfg = rt.config
        try:
            self.tls.use(rt)   # its HTTPS VSs and tls-alpn-01 validations
            if cfg.access_log != self.access_log:
                configure_access_log(cfg.access_log, self.base)
                self.access_log = cfg.access_log
            await self.dataplane.apply(rt)
        except Exception as e:  # reported to the control process; the last generation serves
            logger.exception("worker %d: generation %d not applied", self.id, rt.generation)
            return ch.Applied(rt.generation, str(e) or type(e).__name__)
        self.drain_timeout = cfg.drain_timeout
        if not self.frozen:
            # As a single process does after start-up (see app.py): what lives as long as the
            # process leaves the cyclic collector's reach.
            gc.collect()
            gc.freeze()
            self.frozen = True
        return ch.Applied(rt.generation)

    async def stop(self) -> None:
        await self.dataplane.shutdown(self.drain_timeout)
        configure_access_log(AccessLogSettings(enabled=False), self.base)


async def serve(sock: socket.socket) -> int:
    reader, writer = await asyncio.open_unix_connection(sock=sock)
    hello = await ch.receive(reader)
    if not isinstance(hello, ch.Hello):
        logger.error("worker: the control process did not say hello (%r)", hello)
        return 2
    if hello.package_version != __version__:
        logger.error("worker %d: lbproxy %s here, %s in the control process (upgraded on disk?); "
                     "restart lbproxy", hello.worker, __version__, hello.package_version)
        return 2
    logging.getLogger().setLevel(hello.log_level)
    worker = Worker(hello)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    for sig in (signal.SIGINT, signal.SIGHUP):
        loop.add_signal_handler(sig, lambda: None)

    def reopen() -> None:
        # Forwarded by the control process (logrotate's SIGUSR1): this worker's access-log file.
        if reopen_access_log():
            logger.info("worker %d: access log reopened", worker.id)

    loop.add_signal_handler(signal.SIGUSR1, reopen)

    async def read() -> None:
        while True:
            msg = await ch.receive(reader)
            if msg is None:
                logger.warning("worker %d: the control process is gone; draining for %.0f s",
                               worker.id, ORPHAN_DRAIN)
                worker.drain_timeout = min(worker.drain_timeout, ORPHAN_DRAIN)
                return
            if not await worker.handle(msg, writer):
                return

    reading = asyncio.create_task(read(), name="worker-channel")
    stopping = asyncio.create_task(stop.wait(), name="worker-sigterm")
    code = 0
    try:
        await asyncio.wait({reading, stopping}, return_when=asyncio.FIRST_COMPLETED)
        if reading.done() and reading.exception() is not None:
            logger.error("worker %d: channel failed: %s", worker.id, reading.exception())
            code = 1
    finally:
        for t in (reading, stopping):
            t.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await t
        await worker.stop()
        writer.close()
    return code


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="lbproxy-worker")
    p.add_argument("--fd", type=int, required=True, help="the channel's socket descriptor")
    p.add_argument("--worker", type=int, required=True)
    args = p.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO,
        format=f"%(asctime)s %(levelname)s worker[{args.worker}] %(name)s: %(message)s")
    sock = socket.socket(fileno=args.fd)
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency; stay usable without it
        return asyncio.run(serve(sock))
    return uvloop.run(serve(sock))


if __name__ == "__main__":
    sys.exit(main())
