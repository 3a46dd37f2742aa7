"""HTTP/1.1 codec glue for the relay: prebuilt responses, hop-by-hop rules, the request object."""

from __future__ import annotations

import re
from http import HTTPStatus

CRLF = b"\r\n"

# RFC 9110 §7.6.1: hop-by-hop fields, never forwarded (plus those named in Connection).
# Codes used by the connection callbacks for the request/response fields they treat specially.
H_HOP = 1
H_CONNECTION = 2
H_TE = 3  # transfer-encoding
H_UPGRADE = 4
H_HOST = 5
H_EXPECT = 6
H_XFF = 7
H_XFP = 8
H_XFH = 9
H_CLEN = 10

SPECIAL: dict[bytes, int] = {
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

# Connection tokens that are not header names to remove.
CONNECTION_KEYWORDS = frozenset((b"close", b"keep-alive", b"upgrade"))
# Fields that frame or route a message: a peer's Connection header may name them, but they are
# never removed or altered because of it (RFC 9110 §7.6.1 lets a sender name any field; removing
# Content-Length or Transfer-Encoding would make the next hop read the body as another message,
# removing Host would change where it goes). The names are ignored, in both directions; nginx and
# HAProxy keep them too.
PROTECTED_FIELDS = frozenset((b"content-length", b"transfer-encoding", b"host"))


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
NO_UPGRADE = frozenset((b"h2c",))

# What a Host value may contain (RFC 3986 host [":" port]: reg-name, IPv4, [IPv6]); deleting
# these with bytes.translate leaves nothing for a valid one. "," and "@" are left out on purpose
# (a list or userinfo in Host only ever means someone probing for a confused parser).
HOST_CHARS = (b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789"
              b"-._~!$&'()*+;=:[]%")
# An absolute-form request target (RFC 9112 §3.2.2): scheme, authority without userinfo, rest.
ABSOLUTE_FORM = re.compile(rb"(https?)://([^/?#@]+)([/?][^#]*)?", re.IGNORECASE)

IDEMPOTENT = frozenset((b"GET", b"HEAD", b"OPTIONS", b"PUT", b"DELETE", b"TRACE"))


def reason(status: int) -> str:
    try:
        return HTTPStatus(status).phrase
    except ValueError:
        return "Unknown"


_STATUS_LINES: dict[int, bytes] = {
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


ERRORS: dict[int, LocalResponse] = {
    s: error_response(s) for s in (400, 403, 405, 408, 413, 431, 500, 502, 503, 504, 505)}


class Request:
    """One request on a client connection: what was parsed, and the state of its exchange.

    Satisfies routing's `RequestInfo` (method, path, query, host, src_ip, body, header()); the str
    views are properties decoded only when a router asks for them. `fwd` is the head forwarded
    upstream, as pieces: [method, " ", url, " HTTP/1.1\\r\\n", name, ": ", value, "\\r\\n", ...].
    """

    __slots__ = (
        "_hmap", "attempts", "backend", "body", "body_bytes", "buffered", "chunked", "chunks",
        "complete", "cut", "discard", "expect", "fwd", "has_body", "head", "hidden", "hidden_bytes",
        "hlen", "host_b", "is_head",
        "keep_alive", "method_b", "rebody", "resp_bytes", "resp_started", "sent_continue", "server",
        "src_ip", "started", "status", "svc", "t0", "target", "up", "upgrade", "upgrade_b",
        "url", "v10", "waiting_route", "xff")

    def __init__(self, svc: object, src_ip: str, t0: float, url: bytes) -> None:
        self.svc = svc
        self.src_ip = src_ip
        self.t0 = t0
        self.url = url
        self.fwd: list[bytes] = [b"", b" ", b"", b" HTTP/1.1\r\n"]
        self.host_b = b""
        self.xff = b""
        self.method_b = b""
        self.body = b""
        self.head = b""
        self.upgrade_b = b""
        self.chunks: list[bytes] = []
        self.buffered = 0
        self.body_bytes = 0
        self.resp_bytes = 0
        self.hlen = 0  # response head bytes sent to the client
        self.hidden = 0  # fields not in `fwd` as they came (hop-by-hop, framing, X-Forwarded-*)
        self.hidden_bytes = 0  # ... and their bytes
        self.status = 0
        self.attempts = 0
        self.chunked = False
        self.complete = False
        self.cut = False  # its response did not go out whole (logged so)
        self.rebody = 0  # an Upgrade request whose upgrade was dropped, with a body (client.py)
        self.discard = False
        self.has_body = False
        self.expect = False
        self.is_head = False
        self.keep_alive = True
        self.resp_started = False
        self.sent_continue = False
        self.started = False
        self.upgrade = False
        self.v10 = False
        self.waiting_route = False
        self.up: object = None
        self.backend: object = None
        self.server: object = None  # the real server's ServerStats (counters, address)
        self.target: object = None
        self._hmap: dict[str, str] | None = None

    @property
    def method(self) -> str:
        return self.method_b.decode("latin-1")

    @property
    def path(self) -> str:
        url = self.url
        q = url.find(b"?")
        return (url if q < 0 else url[:q]).decode("latin-1")

    @property
    def query(self) -> str:
        url = self.url
        q = url.find(b"?")
        return "" if q < 0 else url[q + 1:].decode("latin-1")

    @property
    def host(self) -> str:
        return self.host_b.decode("latin-1").lower()

    def header(self, name_lower: str) -> str:
        """A request header as the client sent it (several joined with ", "; missing = "").

        Hop-by-hop fields are not visible; X-Forwarded-For is (as the client sent it).
        """
        m = self._hmap
        if m is None:
            m = {}
            fwd = self.fwd
            for i in range(4, len(fwd) - 3, 4):
                lk = fwd[i].decode("latin-1").lower()
                sv = fwd[i + 2].decode("latin-1")
                m[lk] = f"{m[lk]}, {sv}" if lk in m else sv
            if self.xff:
                m["x-forwarded-for"] = self.xff.decode("latin-1")
            self._hmap = m
        return m.get(name_lower, "")
