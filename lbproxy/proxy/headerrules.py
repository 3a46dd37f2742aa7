"""Header rules of a VS and its SubVS compiled for one pool (`Target.headers`): what a request head
loses and gains on its way to a real server, and what the response head loses and gains on its way
back, as byte snippets made once per config generation.

A pool whose VS and SubVS have no rules (nor HSTS, Forwarded, X-Forwarded-Proto) gets None, and
its requests pay one attribute test (`Exchange._serve`) and the response one more (upstream.py).
Otherwise a request costs a filter of its fields when something is removed or set, and a join of
the added fields; variables ($client_ip, $host, $server_port) are filled in per request, $scheme
when compiling. The checks of names and values are the config's (config/headers.py): what reaches
this module is valid, and values filled in per request come from checked sources (an IP address,
a Host that passed HOST_CHARS, a port number).

Order: the VS's rules, then the SubVS's (which can remove what the VS added); within one table,
remove, then set (remove + add), then add.
"""

from __future__ import annotations

import re

from ..config.headers import parse_template
from ..config.model import HeaderRules, Hsts, Protocol, SubVS, VirtualService
from .http import CRLF

# Per-request values a template can hold (indexes into the tuple `_expand` takes).
_V_IP = 0
_V_HOST = 1
_V_PORT = 2
_VAR_CODE = {"client_ip": _V_IP, "remote_addr": _V_IP, "host": _V_HOST, "server_port": _V_PORT}

# A field's compiled line: bytes when it has no variable, else its pieces (bytes or a _V_* code).
Line = bytes | tuple[bytes | int, ...]
# What a response head loses (a pattern of its fields, None: nothing) and gains (field lines).
ResponseEdit = tuple[re.Pattern[bytes] | None, bytes]

# RFC 7230 tchar: a Forwarded host made of these goes unquoted (RFC 7239 §4).
_TCHAR = frozenset(b"!#$%&'*+-.^_`|~0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ")


class HeaderEdit:
    """The compiled rules of one pool. `request()` edits a request head's fields (Request.fwd's
    shape) and `response()` gives what its response head gets (`edit_response`)."""

    __slots__ = ("add_dyn", "add_static", "drop", "forwarded", "resp", "resp_dyn", "resp_pat",
                 "scheme_b")

    def __init__(self, drop: frozenset[bytes], adds: list[Line], forwarded: bool, scheme: bytes,
                 resp_drop: frozenset[bytes], resp_adds: list[Line]) -> None:
        self.drop = drop
        self.add_static = b"".join(a for a in adds if isinstance(a, bytes))
        self.add_dyn = tuple(a for a in adds if not isinstance(a, bytes))
        self.forwarded = forwarded
        self.scheme_b = scheme
        self.resp_pat = _fields_pattern(resp_drop)
        self.resp_dyn = tuple(resp_adds) if any(not isinstance(a, bytes) for a in resp_adds) \
            else ()
        static = b"".join(a for a in resp_adds if isinstance(a, bytes))
        self.resp: ResponseEdit | None = None
        if not self.resp_dyn and (self.resp_pat is not None or static):
            self.resp = (self.resp_pat, static)

    def request(self, fwd: list[bytes], ip_b: bytes, host_b: bytes, port: int) -> list[bytes]:
        """`fwd` ([method, " ", url, " HTTP/1.1\\r\\n", name, ": ", value, CRLF, ...]) without the
        fields removed or set, and with the added ones (as one more piece)."""
        drop = self.drop
        if drop:
            out = fwd[:4]
            for i in range(4, len(fwd) - 3, 4):
                if fwd[i].lower() not in drop:
                    out += fwd[i:i + 4]
        else:
            out = fwd
        if self.add_static:
            out.append(self.add_static)
        if self.add_dyn:
            values = (ip_b, host_b, b"%d" % port)
            out += [_expand(line, values) for line in self.add_dyn]
        if self.forwarded:
            out.append(forwarded_line(ip_b, self.scheme_b, host_b))
        return out

    def response(self, ip_b: bytes, host_b: bytes, port: int) -> ResponseEdit | None:
        """What the response head gets: the same each time unless a value has a variable."""
        if not self.resp_dyn:
            return self.resp
        values = (ip_b, host_b, b"%d" % port)
        return (self.resp_pat, b"".join(a if isinstance(a, bytes) else _expand(a, values)
                                        for a in self.resp_dyn))


def edit_response(head: bytes, edit: ResponseEdit) -> bytes:
    """A response head (status line and fields, each ending in CRLF, no blank line) edited."""
    pat, add = edit
    if pat is not None:
        head = pat.sub(b"", head)
    return head + add


def forwarded_line(ip_b: bytes, scheme_b: bytes, host_b: bytes) -> bytes:
    """A Forwarded field (RFC 7239 §4): for= the client (an IPv6 address bracketed and quoted),
    proto=, and host= (quoted unless a token) when the request had a Host."""
    node = b'"[' + ip_b + b']"' if b":" in ip_b else ip_b
    line = b"Forwarded: for=" + node + b";proto=" + scheme_b
    if host_b:
        if all(c in _TCHAR for c in host_b):
            line += b";host=" + host_b
        else:
            line += b';host="' + host_b.replace(b"\\", b"\\\\").replace(b'"', b'\\"') + b'"'
    return line + CRLF


def compile_headers(vs: VirtualService, subvs: SubVS | None) -> HeaderEdit | None:
    """The rules of `vs` and then of `subvs` (None: the VS's own pool, or a pool of its own such
    as an injected one) for one pool, or None when there are none."""
    tables = [vs.headers] if subvs is None else [vs.headers, subvs.headers]
    if all(_empty(t) for t in tables):
        return None
    scheme = vs.protocol.value
    drop: set[bytes] = set()
    adds: list[tuple[bytes, Line]] = []
    resp_drop: set[bytes] = set()
    resp_adds: list[tuple[bytes, Line]] = []
    forwarded = False
    for t in tables:
        req_set = list(t.request_set)
        if t.x_forwarded_proto and not vs.add_forwarded_headers:
            req_set.append(("X-Forwarded-Proto", "$scheme"))
        _apply(drop, adds, t.request_remove, req_set, t.request_add, scheme)
        resp_set = list(t.response_set)
        if t.hsts is not None and vs.protocol is Protocol.HTTPS:
            resp_set.append(("Strict-Transport-Security", hsts_value(t.hsts)))
        _apply(resp_drop, resp_adds, t.response_remove, resp_set, t.response_add, scheme)
        forwarded = forwarded or t.forwarded
    return HeaderEdit(frozenset(drop), [line for _, line in adds], forwarded, scheme.encode(),
                      frozenset(resp_drop), [line for _, line in resp_adds])


def local_fields(vs: VirtualService, subvs: SubVS | None) -> tuple[tuple[str, str], ...]:
    """Fields of the answers the proxy makes itself for `vs` (and `subvs`): HSTS on an HTTPS VS
    (a redirect or a "not available" page must carry it too: browsers and preload lists read it
    on any HTTPS response), the SubVS's over the VS's. Prebuilt with the answers."""
    hsts = subvs.headers.hsts if subvs is not None else None
    hsts = hsts or vs.headers.hsts
    if hsts is None or vs.protocol is not Protocol.HTTPS:
        return ()
    return (("Strict-Transport-Security", hsts_value(hsts)),)


def hsts_value(h: Hsts) -> str:
    """The Strict-Transport-Security value of `h` (RFC 6797 §6.1)."""
    value = f"max-age={h.max_age}"
    if h.include_subdomains:
        value += "; includeSubDomains"
    if h.preload:
        value += "; preload"
    return value


def _empty(t: HeaderRules) -> bool:
    return not (t.request_add or t.request_set or t.request_remove or t.response_add
                or t.response_set or t.response_remove or t.hsts is not None or t.forwarded
                or t.x_forwarded_proto)


def _apply(drop: set[bytes], adds: list[tuple[bytes, Line]], remove: tuple[str, ...],
           set_: list[tuple[str, str]], add: tuple[tuple[str, str], ...], scheme: str) -> None:
    """One table's remove, set and add laid over what the tables before it did."""
    for name in (*remove, *(n for n, _ in set_)):
        low = name.lower().encode()
        drop.add(low)
        adds[:] = [a for a in adds if a[0] != low]
    for name, value in (*set_, *add):
        adds.append((name.lower().encode(), _line(name, value, scheme)))


def _line(name: str, value: str, scheme: str) -> Line:
    """`name: value` CRLF, compiled: bytes, or pieces where the value has request variables."""
    pieces: list[bytes | int] = [name.encode() + b": "]
    for is_var, text in parse_template(value):
        if is_var and text == "scheme":
            pieces.append(scheme.encode())
        elif is_var:
            pieces.append(_VAR_CODE[text])
        else:
            pieces.append(text.encode("ascii"))
    pieces.append(CRLF)
    merged: list[bytes | int] = []
    for p in pieces:
        if isinstance(p, bytes) and merged and isinstance(merged[-1], bytes):
            merged[-1] += p
        else:
            merged.append(p)
    if len(merged) == 1 and isinstance(merged[0], bytes):
        return merged[0]
    return tuple(merged)


def _expand(line: Line, values: tuple[bytes, bytes, bytes]) -> bytes:
    if isinstance(line, bytes):
        return line
    return b"".join(p if isinstance(p, bytes) else values[p] for p in line)


def _fields_pattern(names: frozenset[bytes]) -> re.Pattern[bytes] | None:
    """The fields called `names` in a head (each with the CRLF before it), any case."""
    if not names:
        return None
    alt = b"|".join(re.escape(n) for n in sorted(names))
    return re.compile(rb"\r\n(?:" + alt + rb")[ \t]*:[^\r\n]*", re.IGNORECASE)
