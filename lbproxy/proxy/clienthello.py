"""The ALPN protocols a TLS client offers, read from its raw ClientHello: what tls.py needs to
answer a tls-alpn-01 validation (RFC 8737) and only it, since `ssl` shows the client's ALPN list
nowhere. `remember_alpn` is an `SSLContext._msg_callback` (OpenSSL's message callback, the one hook
that sees the ClientHello before the servername callback); it notes the list on the SSLObject,
where `alpn_offered` reads it."""

from __future__ import annotations

from typing import Any

# RFC 8737 §6.2 (acmeclient.challenges.ACME_TLS_ALPN, not imported: a worker process would load
# the whole ACME client, aiohttp and all, for one string).
ACME_TLS_ALPN = "acme-tls/1"

# The attribute of an SSLObject holding the ALPN protocols its ClientHello offered (a tuple; ()
# when it offered none or the hello could not be read).
_OFFERED = "_lbproxy_alpn_offered"
_HANDSHAKE = 22      # TLS record content type
_CLIENT_HELLO = 1    # handshake message type
_EXT_ALPN = 16       # RFC 7301


def client_hello_alpn(msg: bytes) -> tuple[str, ...]:
    """The ALPN protocols a ClientHello handshake message (with its 4-byte header) offers; ()
    when it offers none. Every length is checked: a short or malformed hello gives () rather
    than an exception (this runs inside OpenSSL's callback)."""
    n = len(msg)
    if n < 4 or msg[0] != _CLIENT_HELLO:
        return ()
    end = min(n, 4 + int.from_bytes(msg[1:4], "big"))
    i = 4 + 2 + 32                       # legacy_version, random
    if i + 1 > end:
        return ()
    i += 1 + msg[i]                      # legacy_session_id
    if i + 2 > end:
        return ()
    i += 2 + int.from_bytes(msg[i:i + 2], "big")   # cipher_suites
    if i + 1 > end:
        return ()
    i += 1 + msg[i]                      # legacy_compression_methods
    if i + 2 > end:
        return ()
    ext_end = min(end, i + 2 + int.from_bytes(msg[i:i + 2], "big"))
    i += 2
    while i + 4 <= ext_end:
        kind = int.from_bytes(msg[i:i + 2], "big")
        size = int.from_bytes(msg[i + 2:i + 4], "big")
        i += 4
        if i + size > ext_end:
            return ()
        if kind == _EXT_ALPN:
            return _alpn_list(msg[i:i + size])
        i += size
    return ()


def _alpn_list(data: bytes) -> tuple[str, ...]:
    if len(data) < 2:
        return ()
    end = min(len(data), 2 + int.from_bytes(data[:2], "big"))
    out: list[str] = []
    i = 2
    while i < end:
        size = data[i]
        i += 1
        if size == 0 or i + size > end:
            return ()
        out.append(data[i:i + size].decode("latin-1"))
        i += size
    return tuple(out)


def remember_alpn(conn: Any, direction: str, version: object, content_type: int,
                   msg_type: int, data: bytes) -> None:
    """SSLContext._msg_callback of a listener with a validation running: notes on the SSLObject
    the ALPN list of its (first) ClientHello. Never raises (an exception would surface in the
    handshake)."""
    try:
        if (direction == "read" and content_type == _HANDSHAKE and msg_type == _CLIENT_HELLO
                and getattr(conn, _OFFERED, None) is None):
            setattr(conn, _OFFERED, client_hello_alpn(data))
    except Exception:
        pass


def alpn_offered(ssl_obj: object) -> tuple[str, ...] | None:
    """What `_remember_alpn` noted for a connection (None: its hello was not read)."""
    return getattr(ssl_obj, _OFFERED, None)
