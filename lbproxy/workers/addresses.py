"""The listener addresses the control process holds for its workers: every VS's address bound with
SO_REUSEPORT and never listening, and the port each VS listens on.

Holding them here means a bind failure (the port taken by another program) shows before any worker
is told, a VS on port 0 gets one real port that every worker then binds, and the address stays ours
while workers restart. A bound socket that does not listen receives no connections; the workers'
listening ones share them.
"""

from __future__ import annotations

import asyncio
import dataclasses
import socket
from collections.abc import Mapping
from typing import Any

from ..config.model import VirtualService
from ..proxy.dataplane import bind_sockets
from ..proxy.errors import ListenError
from ..runtime import Runtime

Key = tuple[Any, ...]


@dataclasses.dataclass(slots=True)
class Reservation:
    """One address held: its port and the sockets bound to it (one per address of its host)."""

    port: int
    socks: list[socket.socket]


class Addresses:
    """The addresses held now (by listen address, or by VS for a port 0) and each VS's port."""

    def __init__(self) -> None:
        self.held: dict[Key, Reservation] = {}
        self.ports: dict[str, tuple[str, int]] = {}

    async def reserve(self, runtime: Runtime) -> tuple[Runtime, dict[Key, Reservation]]:
        """`runtime` with every port 0 replaced by its reserved port, and the reservations it
        no longer uses (released once the workers have moved on). A bind failure raises
        ListenError and holds nothing new."""
        loop = asyncio.get_running_loop()
        keep: dict[Key, Reservation] = {}
        made: list[Reservation] = []
        vss: list[VirtualService] = []
        try:
            for vs in runtime.config.virtual_services:
                key = _listen_key(vs)
                r = keep.get(key) or self.held.get(key)
                if r is None:
                    r = await _bind(loop, vs)
                    made.append(r)
                keep[key] = r
                if not vs.listen.port:
                    vs = dataclasses.replace(
                        vs, listen=dataclasses.replace(vs.listen, port=r.port))
                vss.append(vs)
        except BaseException:
            release({i: r for i, r in enumerate(made)})
            raise
        unused = {k: r for k, r in self.held.items() if k not in keep}
        self.held = keep
        self.ports = {vs.name: (vs.listen.host, vs.listen.port) for vs in vss}
        config = dataclasses.replace(runtime.config, virtual_services=tuple(vss))
        return dataclasses.replace(runtime, config=config), unused

    def release_all(self) -> None:
        release(self.held)
        self.held = {}


def release(reserved: Mapping[Any, Reservation]) -> None:
    for r in reserved.values():
        for s in r.socks:
            s.close()


def _listen_key(vs: VirtualService) -> Key:
    a = vs.listen
    return (a.host, a.port) if a.port else (a.host, 0, vs.name)


async def _bind(loop: asyncio.AbstractEventLoop, vs: VirtualService) -> Reservation:
    """The VS's address held: bound with SO_REUSEPORT, not listening."""
    try:
        socks = await bind_sockets(loop, vs.listen.host, vs.listen.port, reuse_port=True,
                                   listen=False)
    except OSError as e:
        raise ListenError(vs.name, str(vs.listen), e.strerror or str(e)) from e
    return Reservation(int(socks[0].getsockname()[1]), socks)
