"""systemd's readiness protocol (sd_notify(3)), the few lines of it lbproxy needs: one datagram
of "KEY=value" lines to the unix socket named by $NOTIFY_SOCKET.

Without $NOTIFY_SOCKET (not started by systemd with `Type=notify`) every call does nothing. A
name starting with "@" is in the abstract namespace (its first byte becomes NUL). A message that
cannot be sent is logged once at debug level and otherwise ignored: the service keeps running
whatever happens to its supervisor's socket. lbproxy sends READY=1 once the listeners and the
admin API are up, RELOADING=1 (with MONOTONIC_USEC, as systemd 253+ wants for
`Type=notify-reload`; older ones ignore it) then READY=1 around a reload, STOPPING=1 at shutdown.
"""

from __future__ import annotations

import logging
import os
import socket
import time

logger = logging.getLogger(__name__)

ENV = "NOTIFY_SOCKET"


def _address(name: str) -> str | bytes | None:
    if name.startswith("@"):
        return b"\0" + name[1:].encode()
    if name.startswith("/"):
        return name
    return None  # vsock and other forms: not for a unit like lbproxy's


def notify(*lines: str) -> bool:
    """Send `lines` as one message; True if it was sent, False without $NOTIFY_SOCKET or when
    sending failed."""
    name = os.environ.get(ENV, "")
    if not name:
        return False
    address = _address(name)
    if address is None:
        logger.debug("sd_notify: unsupported %s=%r", ENV, name)
        return False
    data = "\n".join(lines).encode()
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as s:
            s.sendto(data, address)
    except OSError as e:
        logger.debug("sd_notify to %s failed: %s", name, e)
        return False
    return True


def notify_ready(status: str = "") -> bool:
    return notify("READY=1", *([f"STATUS={status}"] if status else []))


def notify_reloading() -> bool:
    # CLOCK_MONOTONIC in microseconds: systemd matches it against the time it sent the reload.
    usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    return notify("RELOADING=1", f"MONOTONIC_USEC={usec}")


def notify_stopping() -> bool:
    return notify("STOPPING=1")
