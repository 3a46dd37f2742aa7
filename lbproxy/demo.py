"""Demo real servers for the quickstart: tiny HTTP/1.1 servers that say who answered."""

from __future__ import annotations

import asyncio
import functools
import logging

from .config.model import Config
from .errors import CannotListen

logger = logging.getLogger(__name__)

_MAX_HEAD = 64 * 1024  # a demo server reads at most this much request head


async def _serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, name: str) -> None:
    try:
        while True:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), timeout=60)
            lines = head.decode("latin-1").split("\r\n")
            method, target, _ = [*lines[0].split(" "), "", ""][:3]
            length = 0
            for line in lines[1:]:
                k, _, v = line.partition(":")
                if k.strip().lower() == "content-length":
                    length = int(v.strip())
            if length:
                await reader.readexactly(length)
            body = f"served by {name}: {method} {target}\n".encode()
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n"
                         b"Content-Length: %d\r\n\r\n" % len(body))
            if method != "HEAD":
                writer.write(body)
            await writer.drain()
    except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError,
            TimeoutError, ValueError):
        pass
    finally:
        writer.close()


async def start_demo_backends(config: Config) -> list[asyncio.Server]:
    """Start one demo server on every distinct real-server address of the config; CannotListen
    (none left open) when one of them cannot be bound."""
    addrs = {rs.address for vs in config.virtual_services for rs in vs.real_servers}
    addrs |= {rs.address for vs in config.virtual_services for s in vs.subvs
              for rs in s.real_servers}
    servers: list[asyncio.Server] = []
    for addr in sorted(addrs, key=str):
        name = f"demo-{addr.port}"
        try:
            server = await asyncio.start_server(
                functools.partial(_serve, name=name), addr.host, addr.port, limit=_MAX_HEAD)
        except OSError as e:
            for s in servers:
                s.close()
            raise CannotListen.from_os_error(str(addr), "demo real server", e) from e
        logger.info("demo real server %s listening on %s", name, addr)
        servers.append(server)
    return servers


__all__ = ["start_demo_backends"]
