"""TLS on the connection's own socket: the transport of every accepted HTTPS connection, where
OpenSSL reads and writes the file descriptor itself (a socket BIO, as nginx and HAProxy use it).

The event loop's TLS (uvloop's SSLProtocol, asyncio's sslproto) goes through memory BIOs: every
record is read by the loop into a Python buffer, copied into OpenSSL, decrypted, copied out, and
the answer takes the same way back, through a protocol layer between the loop and the connection.
Here a readable socket is one `SSL_read` into one bytes object handed to the protocol, and a write
is one `SSL_write` that encrypts and sends (bench/README.md, "HTTPS"). The loop only polls the
descriptor (`add_reader` / `add_writer`).

`TLSSocketTransport` implements what the client connections use of `asyncio.Transport`: write and
writelines (bytes OpenSSL could not send yet are kept, in order, and the protocol is paused above
the high-water mark), close (once everything is sent: close_notify, then the socket), abort,
pause/resume reading, the extra info (peername, sockname, socket, ssl_object, cipher), and
set_protocol (an HTTP/2 session takes the connection over after ALPN). The handshake runs before
the protocol exists, bounded by `timeout`; a handshake that fails or times out closes the socket
and is logged at debug level, as the loop's own server does it silently.

End of input (a close_notify, or a TCP FIN without one) calls `eof_received` and then closes the
connection whatever it returns: TLS has no half-close here, as in the loop's own TLS.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import ssl
from collections.abc import Callable, Iterable
from typing import Any, Final, cast

logger = logging.getLogger(__name__)

# Bytes asked of SSL_read at once: more than a TLS record's 16 KiB of plaintext.
READ_SIZE: Final = 65536
_HIGH_WATER: Final = 64 * 1024
_WANT: Final = (ssl.SSLWantReadError, ssl.SSLWantWriteError)


class TLSSocketTransport:
    """One TLS connection on a non-blocking socket whose TLS OpenSSL runs on the socket itself.

    An asyncio.Transport by what it implements, not by its base class: a compiled class cannot
    derive from an interpreted one (docs/architecture.md, "Compiled hot path")."""

    __slots__ = ("_closed", "_closing", "_factory", "_fd", "_handshakes", "_high", "_loop",
                 "_paused", "_peername", "_protocol", "_protocol_paused", "_queue", "_reading",
                 "_retry", "_size", "_sock", "_ssl", "_timeout", "_timer", "_writing")

    def __init__(self, loop: asyncio.AbstractEventLoop, sock: ssl.SSLSocket,
                 peername: Any, factory: Callable[[], asyncio.BaseProtocol],
                 timeout: float, handshakes: set[TLSSocketTransport]) -> None:
        self._loop = loop
        self._sock = sock
        self._fd = sock.fileno()
        # The C object under SSLSocket: its read/write are SSLSocket.recv/send without the two
        # Python frames each (a private attribute, stable since Python 3.7).
        self._ssl: Any = cast(Any, sock)._sslobj
        self._peername = peername
        self._factory = factory
        self._handshakes = handshakes  # the server's connections in their handshake
        self._protocol: Any = None
        self._timeout = timeout
        self._timer: asyncio.TimerHandle | None = None
        self._reading = False  # add_reader is in place (for the handshake or for data)
        self._paused = False  # the protocol paused reading
        self._writing = False  # add_writer is in place
        self._retry: bytes | None = None  # what SSL_write must be given again (OpenSSL's rule)
        self._queue: list[bytes] = []  # written after `_retry`, in order
        self._size = 0  # bytes in _retry and _queue
        # Above this the protocol is paused; it resumes once all is sent (OpenSSL does not say
        # how much of a write it must be given again has gone out, so no low-water mark).
        self._high = _HIGH_WATER
        self._protocol_paused = False
        self._closing = False  # close() or the end: no more reads, close once all is sent
        self._closed = False  # the socket is closed (implies _closing)

    # -- the handshake ------------------------------------------------------------------------

    def start(self) -> None:
        self._handshakes.add(self)
        self._timer = self._loop.call_later(self._timeout, self._handshake_late)
        self._handshake()

    def _handshake(self) -> None:
        try:
            self._ssl.do_handshake()
        except ssl.SSLWantReadError:
            self._poll(read=True, write=False, cb=self._handshake)
            return
        except ssl.SSLWantWriteError:
            self._poll(read=False, write=True, cb=self._handshake)
            return
        except (OSError, ValueError) as e:  # ssl.SSLError is an OSError
            self._handshake_failed(str(e) or type(e).__name__)
            return
        self._handshake_over()
        loop = self._loop
        if self._writing:
            loop.remove_writer(self._fd)
            self._writing = False
        if self._reading:  # the handshake's callback gives way to the data's (the poll stays)
            loop.add_reader(self._fd, self._read_ready)
        try:
            self._protocol = self._factory()
            self._protocol.connection_made(self)
        except Exception:
            logger.exception("connection setup failed")
            self.abort()
            return
        if self._closing or self._paused:
            return
        if not self._reading:
            loop.add_reader(self._fd, self._read_ready)
            self._reading = True
        if self._ssl.pending():  # a record read with the handshake's last flight
            self._read_ready()

    def _handshake_late(self) -> None:
        self._timer = None
        self._handshake_failed("timed out")

    def _handshake_failed(self, why: str) -> None:
        logger.debug("TLS handshake with %s failed: %s", self._peer_ip(), why)
        self.abort_handshake()

    def _handshake_over(self) -> None:
        """Done, failed or cut short: no deadline, no longer among the server's handshakes."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._handshakes.discard(self)

    def _poll(self, *, read: bool, write: bool, cb: Callable[[], None]) -> None:
        """The handshake's interest in the descriptor."""
        loop = self._loop
        if read:
            loop.add_reader(self._fd, cb)
        elif self._reading:
            loop.remove_reader(self._fd)
        self._reading = read
        if write:
            loop.add_writer(self._fd, cb)
        elif self._writing:
            loop.remove_writer(self._fd)
        self._writing = write

    def abort_handshake(self) -> None:
        """End a connection still in its handshake (it failed, or the server closes)."""
        self._handshake_over()
        self._shut(notify=False)

    # -- reading ------------------------------------------------------------------------------

    def _read_ready(self) -> None:
        try:
            data = self._ssl.read(READ_SIZE)
        except _WANT:
            return
        except ssl.SSLEOFError:
            data = b""
        except (OSError, ValueError) as e:
            self._fatal(e)
            return
        if data:
            try:
                self._protocol.data_received(data)
                # Plaintext of the same record left in OpenSSL (not on the socket: no poll for it).
                while self._reading and self._ssl.pending():  # (a close stops reading)
                    try:
                        more = self._ssl.read(READ_SIZE)
                    except _WANT:
                        return
                    except (OSError, ValueError) as e:
                        self._fatal(e)
                        return
                    self._protocol.data_received(more)
            except Exception:  # a bug in the protocol: this connection ends, not the loop's turn
                logger.exception("TLS connection with %s: data_received failed", self._peer_ip())
                self.abort()
            return
        # The end of input (close_notify, or a TCP FIN, after which OpenSSL writes nothing more):
        # the protocol hears of it, then the connection closes, as the loop's TLS does it.
        self._stop_reading()
        try:
            self._protocol.eof_received()
        except Exception:
            logger.exception("eof_received failed")
        self.close()

    def _stop_reading(self) -> None:
        if self._reading:
            self._loop.remove_reader(self._fd)
            self._reading = False

    def pause_reading(self) -> None:
        self._paused = True
        self._stop_reading()

    def resume_reading(self) -> None:
        self._paused = False
        if not self._reading and not self._closing and self._protocol is not None:
            self._loop.add_reader(self._fd, self._read_ready)
            self._reading = True
            if self._ssl.pending():
                self._loop.call_soon(self._read_ready)

    def is_reading(self) -> bool:
        return self._reading

    # -- writing ------------------------------------------------------------------------------

    def write(self, data: bytes | bytearray | memoryview) -> None:
        if self._closed or not data:
            return
        if self._retry is not None:
            self._queue.append(bytes(data))
            self._grew(len(data))
            return
        try:
            self._ssl.write(data)
        except _WANT:
            self._retry = bytes(data)
            self._grew(len(data))
            self._want_write()
        except (OSError, ValueError) as e:
            self._fatal(e)

    def writelines(self, list_of_data: Iterable[bytes | bytearray | memoryview]) -> None:
        self.write(b"".join(list_of_data))

    def _want_write(self) -> None:
        if not self._writing and not self._closed:
            self._loop.add_writer(self._fd, self._write_ready)
            self._writing = True

    def _grew(self, n: int) -> None:
        self._size += n
        if not self._protocol_paused and self._size > self._high and self._protocol is not None:
            self._protocol_paused = True
            try:
                self._protocol.pause_writing()
            except Exception:
                logger.exception("pause_writing failed")

    def _write_ready(self) -> None:
        while self._retry is not None:
            try:
                self._ssl.write(self._retry)
            except _WANT:
                return
            except (OSError, ValueError) as e:
                self._fatal(e)
                return
            self._size -= len(self._retry)
            queue = self._queue
            if queue:
                self._retry = queue[0] if len(queue) == 1 else b"".join(queue)
                self._queue = []
            else:
                self._retry = None
        if self._writing:
            self._loop.remove_writer(self._fd)
            self._writing = False
        if self._protocol_paused:
            self._protocol_paused = False
            try:
                self._protocol.resume_writing()
            except Exception:
                logger.exception("resume_writing failed")
        if self._closing:
            self._shut(notify=True)

    def get_write_buffer_size(self) -> int:
        return self._size

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        self._high = _HIGH_WATER if high is None else high  # `low`: see _high in __init__

    def can_write_eof(self) -> bool:
        return False

    def write_eof(self) -> None:
        raise NotImplementedError("TLS cannot half-close; close() sends close_notify")

    # -- ending -------------------------------------------------------------------------------

    def is_closing(self) -> bool:
        return self._closing

    def close(self) -> None:
        """Stop reading; once everything written is sent, close_notify and close the socket."""
        if self._closing:
            return
        self._closing = True
        self._stop_reading()
        if self._retry is None:
            self._shut(notify=True)

    def abort(self) -> None:
        if not self._closed:
            self._shut(notify=False)

    def _fatal(self, exc: BaseException) -> None:
        logger.debug("TLS connection with %s: %s", self._peer_ip(), exc)
        self._shut(notify=False, exc=exc if isinstance(exc, Exception) else None)

    def _shut(self, *, notify: bool, exc: Exception | None = None) -> None:
        if self._closed:
            return
        self._closed = True
        self._closing = True
        loop = self._loop
        if self._reading:
            loop.remove_reader(self._fd)
            self._reading = False
        if self._writing:
            loop.remove_writer(self._fd)
            self._writing = False
        if notify:
            try:
                self._ssl.shutdown()  # close_notify; the peer's is not waited for
            except (OSError, ValueError):
                pass
        self._retry = None
        self._queue = []
        self._size = 0
        self._sock.close()
        if self._protocol is not None:
            loop.call_soon(self._lost, exc)

    def _lost(self, exc: Exception | None) -> None:
        protocol, self._protocol = self._protocol, None
        if protocol is not None:
            protocol.connection_lost(exc)

    # -- the rest of asyncio.Transport ----------------------------------------------------------

    def set_protocol(self, protocol: asyncio.BaseProtocol) -> None:
        self._protocol = protocol

    def get_protocol(self) -> asyncio.BaseProtocol:
        return cast(asyncio.BaseProtocol, self._protocol)

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        if name == "peername":
            return self._peername
        if name == "ssl_object":
            return self._sock
        if name == "socket":
            return self._sock
        if name == "sslcontext":
            return self._sock.context
        if name == "sockname":
            try:
                return self._sock.getsockname()
            except OSError:
                return default
        if name == "cipher":
            return self._sock.cipher()
        if name == "peercert":
            return self._sock.getpeercert()
        return default

    def _peer_ip(self) -> str:
        p = self._peername
        return str(p[0]) if isinstance(p, tuple) and p else "?"


def start_tls(loop: asyncio.AbstractEventLoop, sock: socket.socket, peername: Any,
              ctx: ssl.SSLContext, factory: Callable[[], asyncio.BaseProtocol], timeout: float,
              handshakes: set[TLSSocketTransport]) -> TLSSocketTransport | None:
    """Begin the server side of TLS on an accepted, non-blocking socket; the protocol `factory`
    makes is connected once the handshake is done. The connection is in `handshakes` until its
    handshake ends either way. None (the socket closed) if OpenSSL refuses the socket at once."""
    try:
        tls = ctx.wrap_socket(sock, server_side=True, do_handshake_on_connect=False)
    except (OSError, ValueError) as e:
        logger.debug("TLS with %s not started: %s", peername, e)
        sock.close()
        return None
    transport = TLSSocketTransport(loop, tls, peername, factory, timeout, handshakes)
    transport.start()
    return transport
