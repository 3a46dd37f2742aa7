"""HTTP/1.1 codec glue for the relay: prebuilt responses, hop-by-hop rules, field codes."""

from __future__ import annotations

import re
from http import HTTPStatus
from typing import Final

CRLF: Final = b"\r\n"

# RFC 9110 §7.6.1: hop-by-hop fields, never forwarded (plus those named in Connection).
# Codes used by the connection callbacks for the request/response fields they treat specially.
H_HOP: Final = 1
H_CONNECTION: Final = 2
H_TE: Final = 3  # transfer-encoding
H_UPGRADE: Final = 4
H_HOST: Final = 5
H_EXPECT: Final = 6
H_XFF: Final = 7
H_XFP: Final = 8
H_XFH: Final = 9
H_CLEN: Final = 10

SPECIAL: Final[dict[bytes, int]] = {
    b"connection": H_CONNECTION,
    b"keep-alive": H_HOP,
    b"proxy-connection": H_HOP,
    b"te": H_HOP,
    b"trailer": H_HOP,
    b"transfer-encoding": H_TE,
    b"upgrade": H_UPGRADE,
    b"proxy-authenticate": H_HOP,
    b"proxy-authorization": H_HOP,
    # RFC 9113 §3.1 (h2c): hop-by-hop by definition; the h2c upgrade is never forwarded.
    b"http2-settings": H_HOP,
    b"host": H_HOST,
    b"expect": H_EXPECT,
    b"x-forwarded-for": H_XFF,
    b"x-forwarded-proto": H_XFP,
    b"x-forwarded-host": H_XFH,
    b"content-length": H_CLEN,
}

# Field names as they came (any case) -> their SPECIAL code, 0 for none: what a request's fields
# are looked up in first, sparing the lower-cased copy of every name. Bounded: names a client
# makes up cannot grow it past FIELD_CODES_MAX (it is emptied then and refilled).
FIELD_CODES: Final[dict[bytes, int]] = {}
FIELD_CODES_MAX: Final = 2048


def field_code(name: bytes) -> int:
    """The SPECIAL code of a field name in any case (0: none), remembered in FIELD_CODES."""
    code = SPECIAL.get(name.lower(), 0)
    if len(FIELD_CODES) >= FIELD_CODES_MAX:
        FIELD_CODES.clear()
    FIELD_CODES[name] = code
    return code


# Connection tokens that are not header names to remove.
CONNECTION_KEYWORDS: Final = frozenset((b"close", b"keep-alive", b"upgrade"))
# Fields that frame or route a message: a peer's Connection header may name them, but they are
# never removed or altered because of it (RFC 9110 §7.6.1 lets a sender name any field; removing
# Content-Length or Transfer-Encoding would make the next hop read the body as another message,
# removing Host would change where it goes). The names are ignored, in both directions; nginx and
# HAProxy keep them too.
PROTECTED_FIELDS: Final = frozenset((b"content-length", b"transfer-encoding", b"host"))


def connection_names(value: bytes) -> list[bytes]:
    """The field names a Connection value lists for removal (lower case), less its keywords and
    the PROTECTED_FIELDS, which are never removed: the one reading for requests and responses."""
    out = []
    for tok in value.lower().split(b","):
        tok = tok.strip(b" \t")
        if tok and tok not in CONNECTION_KEYWORDS and tok not in PROTECTED_FIELDS:
            out.append(tok)
    return out


# Upgrade protocols never relayed: h2c would let a client talk HTTP/2 straight to a real server,
# past the content rules (the request goes on as a plain HTTP/1.1 request, as nginx does).
NO_UPGRADE: Final = frozenset((b"h2c",))

# What a Host value may contain (RFC 3986 host [":" port]: reg-name, IPv4, [IPv6]); deleting
# these with bytes.translate leaves nothing for a valid one. "," and "@" are left out on purpose
# (a list or userinfo in Host only ever means someone probing for a confused parser).
HOST_CHARS: Final = (b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789"
              b"-._~!$&'()*+;=:[]%")
# An absolute-form request target (RFC 9112 §3.2.2): scheme, authority without userinfo, rest.
ABSOLUTE_FORM: Final = re.compile(rb"(https?)://([^/?#@]+)([/?][^#]*)?", re.IGNORECASE)

IDEMPOTENT: Final = frozenset((b"GET", b"HEAD", b"OPTIONS", b"PUT", b"DELETE", b"TRACE"))


def reason(status: int) -> str:
    try:
        return HTTPStatus(status).phrase
    except ValueError:
        return "Unknown"


_STATUS_LINES: Final[dict[int, bytes]] = {
    s.value: f"HTTP/1.1 {s.value} {s.phrase}\r\n".encode() for s in HTTPStatus}


def status_line(status: int) -> bytes:
    line = _STATUS_LINES.get(status)
    if line is None:
        line = f"HTTP/1.1 {status} Unknown\r\n".encode()
    return line


def status_prefix(status: int) -> bytes:
    """b"HTTP/1.1 200 " (reason phrase to be appended as the server sent it)."""
    return b"HTTP/1.1 %d " % status


class LocalResponse:
    """A response the proxy answers itself, prebuilt once per config generation.

    Three heads: keep-alive for HTTP/1.1, keep-alive for HTTP/1.0 (must say so), and close.
    """

    __slots__ = ("body", "close", "close_full", "keep", "keep10", "keep_full", "status")

    def __init__(self, status: int, body: bytes = b"", content_type: str = "",
                 extra: tuple[tuple[str, str], ...] = ()) -> None:
        fields = [status_line(status)]
        for k, v in extra:
            fields.append(f"{k}: {v}\r\n".encode("latin-1"))
        if content_type:
            fields.append(f"Content-Type: {content_type}\r\n".encode("latin-1"))
        fields.append(b"Content-Length: %d\r\n" % len(body))
        base = b"".join(fields)
        self.status = status
        self.body = body
        self.keep = base + CRLF
        self.keep10 = base + b"Connection: keep-alive\r\n\r\n"
        self.close = base + b"Connection: close\r\n\r\n"
        self.keep_full = self.keep + body
        self.close_full = self.close + body


def error_response(status: int) -> LocalResponse:
    text = f"{status} {reason(status)}\n".encode()
    return LocalResponse(status, text, "text/plain; charset=utf-8")


ERRORS: Final[dict[int, LocalResponse]] = {
    s: error_response(s) for s in (400, 403, 405, 408, 413, 431, 500, 502, 503, 504, 505)}
