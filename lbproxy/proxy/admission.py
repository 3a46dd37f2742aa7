"""Admission at a listener's connection limit: which waiting connection makes room for a new one."""

from __future__ import annotations

from math import inf
from typing import TYPE_CHECKING, Protocol, TypeVar

from .contract import ClientForListener

if TYPE_CHECKING:
    from .service import Listener


class Evictable(ClientForListener, Protocol):
    """A connection that can say how long it has waited on its client and be closed for that
    (client.py's ClientConnection)."""

    def waiting_since(self) -> float:
        """When it began to wait on its client, or inf if it does not."""

    def evict(self) -> None:
        """Close it to make room for a new connection."""


Conn = TypeVar("Conn", bound=Evictable)


def make_room(listener: Listener[Conn]) -> bool:
    """At max_connections: close the connection that has waited longest on its client (an idle
    keep-alive one, a head or a body that stopped coming), so that clients that stall cannot hold
    the limit against active ones (nginx reuses idle keep-alive connections the same way). False
    when every connection is busy with a real server, a tunnel or its close: the new one gets 503.

    The candidates are sorted once and then taken in turn (each checked to still be waiting), so
    a burst of new connections at the limit costs one scan, not one per connection.
    """
    victims = listener.victims
    for _ in range(2):
        while victims:
            c = victims.pop()
            if c in listener.conns and c.waiting_since() != inf:
                c.evict()
                return True
        waiting = [(t, id(c), c) for c in listener.conns if (t := c.waiting_since()) != inf]
        if not waiting:
            return False
        waiting.sort(reverse=True)  # the longest wait last: pop() takes it first
        victims[:] = [c for _, _, c in waiting]
    return False
