"""The access log: one line per request in the configured format, handed to the `lbproxy.access`
logger in batches.

A `logging` record costs far more than relaying a small request (record creation, handler lock,
formatting, a write and a flush: measured 12-30 us here against ~15 us for the relay itself), so a
request only appends its fields to a list, and once per event-loop iteration (or every
`MAX_BATCH` lines) the batch is formatted by one bytes %-format in C and passed on whole: to the
access-log file's handler as bytes, or to any other handler as one record whose lines are joined
by newlines (give `lbproxy.access` a plain "%(message)s" formatter). Formatting per line in
Python (an f-string) cost about 1 us per request, a fifth of the relay's own Python work.

Formats (`[access_log] format`), each line's timestamp (UTC, to the second) taken when the batch
is formatted, at the end of the loop iteration in which the requests finished:

- ``lbproxy`` (the default): ``2026-01-31T12:00:00Z <vs> <subvs|-> <real server|-> <client ip>
  "<method> <url>" <status> <response body bytes> <duration ms, to the us>[ cut]``; the method
  and URL as the client sent them (a text handler shows bytes that are not UTF-8 as \\xNN).
- ``combined``: Apache/nginx combined, strictly (standard parsers read it): ``<client ip> - -
  [31/Jan/2026:12:00:00 +0000] "<method> <url> <protocol>" <status> <response body bytes>
  "<referer>" "<user agent>"``; `"`, `\\` and bytes outside printable ASCII inside the quotes
  are written \\xNN, as nginx does; a missing header is "-". `<protocol>` (and json's
  `protocol`) is the client's: HTTP/1.0, HTTP/1.1, or HTTP/2.0 for a request that came over
  HTTP/2 (relayed as HTTP/1.1).
- ``json``: one object per line, every field always present (`JSON_FIELDS`): strings, integers
  (durations in microseconds), null for what does not apply, and `cut` a boolean.

`cut` marks a response that did not reach the client whole (the real server failed or a timeout
struck mid-response, or the client went away: then the status is the real server's, or 499 when
no response had begun, as nginx logs it). Durations run from the first byte of the request head
to the end of the response, on `time.monotonic()` (nanosecond resolution; the event loop's clock
ticks in milliseconds). The upstream timings of `json` run from the start of the exchange with
the real server (its connection attempt, or the send on a pooled connection): `upstream_connect_us`
(0 on a pooled connection, null if no connection was made), `upstream_header_us` (until the
response head was read; null if none came: the answer was then lbproxy's own, e.g. a 502) and
`upstream_response_us` (until the response ended, or the exchange was given up).
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from typing import Protocol


class LoggedRequest(Protocol):
    """What a `combined` or `json` line reads of a request (request.py's Request)."""

    @property
    def fwd(self) -> list[bytes]: ...
    @property
    def method_b(self) -> bytes: ...
    @property
    def url(self) -> bytes: ...
    @property
    def host_b(self) -> bytes: ...
    @property
    def v10(self) -> bool: ...
    @property
    def h2(self) -> bool: ...
    @property
    def status(self) -> int: ...
    @property
    def hlen(self) -> int: ...
    @property
    def resp_bytes(self) -> int: ...
    @property
    def resp_started(self) -> bool: ...
    @property
    def cut(self) -> bool: ...
    @property
    def server(self) -> object: ...
    @property
    def ts(self) -> float: ...
    @property
    def t_up(self) -> float: ...
    @property
    def t_conn(self) -> float: ...
    @property
    def t_hdr(self) -> float: ...


logger = logging.getLogger(__name__)

ACCESS_LOGGER = "lbproxy.access"
FORMATS = ("lbproxy", "combined", "json")
# Lines per batch at most: bounds the latency of a line and the size of one write under load.
MAX_BATCH = 256
CUT = b" cut"

# A line is `head + stamp + tail` % its fields; the stamp (per second) is made by `_STAMPS`.
# lbproxy: prefix (ends with the opening quote), method, url, status, bytes, ms, marker.
_LBPROXY = (b"", b' %b%b %b" %d %d %.3f%b\n', 7)
# combined: client, request line, status, bytes, referer, user agent.
_COMBINED = (b"%b - - [", b'] "%b" %d %d "%b" "%b"\n', 6)
# json: prefix (client .. tls_version), then 13 fields (the upstream timings as one).
_JSON = (b'{"time":"', b'",%b"method":"%b","uri":"%b","protocol":"%b","status":%d,'
         b'"bytes_out":%d,"body_bytes":%d,"bytes_in":%d,"host":"%b","user_agent":%b,'
         b'"referer":%b,"duration_us":%d,%b"cut":%b}\n', 14)
# The upstream timings of a json line, as one field (made once per line, or this constant).
_UPSTREAM = b'"upstream_connect_us":%b,"upstream_header_us":%b,"upstream_response_us":%d,'
_NO_UPSTREAM = b'"upstream_connect_us":null,"upstream_header_us":null,"upstream_response_us":null,'

_TEMPLATES = {"lbproxy": _LBPROXY, "combined": _COMBINED, "json": _JSON}
# Every key of a json line, in order, with its JSON type(s) (None: null).
JSON_FIELDS: dict[str, tuple[type | None, ...]] = {
    "time": (str,), "client": (str,), "vs": (str,), "subvs": (str, None), "server": (str, None),
    "tls_version": (str, None), "method": (str,), "uri": (str,), "protocol": (str,),
    "status": (int,), "bytes_out": (int,), "body_bytes": (int,), "bytes_in": (int,),
    "host": (str,), "user_agent": (str, None), "referer": (str, None), "duration_us": (int,),
    "upstream_connect_us": (int, None), "upstream_header_us": (int, None),
    "upstream_response_us": (int, None), "cut": (bool,),
}

_MONTHS = ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec")


def _iso_stamp(sec: int) -> bytes:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(sec)).encode()


def _clf_stamp(sec: int) -> bytes:
    t = time.gmtime(sec)  # English month names whatever the locale
    return b"%02d/%b/%04d:%02d:%02d:%02d +0000" % (
        t.tm_mday, _MONTHS[t.tm_mon - 1].encode(), t.tm_year, t.tm_hour, t.tm_min, t.tm_sec)


_STAMPS = {"lbproxy": _iso_stamp, "combined": _clf_stamp, "json": _iso_stamp}

# Bytes that need no escaping inside a quoted field: printable ASCII but `"` and `\`.
_PLAIN = bytes(c for c in range(0x20, 0x7F) if c not in b'"\\')


def clf_quoted(value: bytes) -> bytes:
    """`value` safe between the double quotes of a combined line (nginx's escaping: \\xNN)."""
    if not value.translate(None, _PLAIN):
        return value
    return b"".join(bytes((c,)) if c in _PLAIN else b"\\x%02X" % c for c in value)


def json_text(value: bytes) -> bytes:
    """`value` as the inside of a JSON string (UTF-8 decoded, other bytes shown as \\\\xNN)."""
    if not value.translate(None, _PLAIN):
        return value
    return json.dumps(value.decode("utf-8", "backslashreplace"))[1:-1].encode()


def _json_or_null(value: str | None) -> bytes:
    return b"null" if value is None else json.dumps(value).encode()


def line_prefix(vs: str, subvs: str, server: object, client: str) -> bytes:
    """The part of an `lbproxy` line that is the same for every request of one client, VS, SubVS
    and real server: everything after the timestamp up to the opening quote of the request."""
    return f'{vs} {subvs} {server} {client} "'.encode()


def request_headers(fwd: list[bytes]) -> tuple[bytes | None, bytes | None]:
    """(User-Agent, Referer) of a request, from its fields as parsed (`Request.fwd`: method, url
    and version, then name, ": ", value, CRLF per field, then what the proxy appended, where the
    scan stops). Read only for the formats that show them: the lbproxy format costs nothing."""
    ua = ref = None
    n = len(fwd) - 3
    i = 4
    while i < n and fwd[i + 1] == b": " and fwd[i + 3] == b"\r\n":
        name = fwd[i]
        size = len(name)
        if size == 10 and ua is None and name.lower() == b"user-agent":
            ua = fwd[i + 2]
            if ref is not None:
                break
        elif size == 7 and ref is None and name.lower() == b"referer":
            ref = fwd[i + 2]
            if ua is not None:
                break
        i += 4
    return ua, ref


class AccessLog:
    """Collects access lines of one format and emits them once per loop iteration through
    `lbproxy.access`. The format is fixed for the object's life: a connection's cached prefix
    (`prefix`) is valid for the log that made it."""

    __slots__ = ("_fields", "_head", "_logger", "_loop", "_nfields", "_scheduled", "_sec",
                 "_stamp", "_stamper", "_tail", "format", "plain", "timed")

    def __init__(self, loop: asyncio.AbstractEventLoop,
                 log: logging.Logger | None = None, fmt: str = "lbproxy") -> None:
        if fmt not in _TEMPLATES:
            raise ValueError(f"unknown access log format {fmt!r}; expected one of "
                             f"{', '.join(FORMATS)}")
        self._loop = loop
        self._logger = log or logging.getLogger(ACCESS_LOGGER)
        self.format = fmt
        # `plain`: lines go through `entry` (the lbproxy format); `timed`: the format shows the
        # upstream timings, which the exchange then takes (Request.t_up, t_conn, t_hdr).
        self.plain = fmt == "lbproxy"
        self.timed = fmt == "json"
        self._head, self._tail, self._nfields = _TEMPLATES[fmt]
        self._stamper = _STAMPS[fmt]
        self._fields: list[object] = []  # _nfields per line
        self._scheduled = False
        self._sec = -1
        self._stamp = b""

    def enabled(self) -> bool:
        return self._logger.isEnabledFor(logging.INFO)

    def prefix(self, vs: str, subvs: str | None, server: str | None, client: str,
               tls_version: str | None) -> bytes:
        """The constant part of the lines of one connection, VS, SubVS and real server."""
        if self.plain:
            return line_prefix(vs, subvs or "-", server or "-", client)
        if self.format == "combined":
            return client.encode("latin-1", "backslashreplace")
        return b'"client":%b,"vs":%b,"subvs":%b,"server":%b,"tls_version":%b,' % (
            _json_or_null(client), _json_or_null(vs),
            _json_or_null(subvs if subvs != "-" else None),
            _json_or_null(server if server != "-" else None), _json_or_null(tls_version))

    def line(self, vs: str, subvs: str, server: object, client: str, method: bytes, url: bytes,
             status: int, nbytes: int, t0: float, now: float) -> None:
        self.entry(line_prefix(vs, subvs, server, client), method, url, status, nbytes, t0, now)

    def entry(self, prefix: bytes, method: bytes, url: bytes, status: int, nbytes: int, t0: float,
              now: float, marker: bytes = b"") -> None:
        """An `lbproxy` line whose constant part, `line_prefix(...)`, the caller keeps between
        requests."""
        fields = self._fields
        fields += (prefix, method, url, status, nbytes, (now - t0) * 1000.0, marker)
        if not self._scheduled:
            self._scheduled = True
            self._loop.call_soon(self.flush)
        elif len(fields) >= MAX_BATCH * 7:
            self.flush()

    def request(self, prefix: bytes, req: LoggedRequest, bytes_in: int, end: float) -> None:
        """A `combined` or `json` line for `req`, which ended at `end` (monotonic clock)."""
        ua, ref = request_headers(req.fwd)
        method = req.method_b
        proto = b"HTTP/2.0" if req.h2 else b"HTTP/1.0" if req.v10 else b"HTTP/1.1"
        fields = self._fields
        if self.format == "combined":
            if method and method != b"-":
                request = b"%b %b %b" % (method, clf_quoted(req.url), proto)
            else:
                request = b"-"
            fields += (prefix, request, req.status, req.resp_bytes,
                       b"-" if ref is None else clf_quoted(ref),
                       b"-" if ua is None else clf_quoted(ua))
        else:
            t_up = req.t_up
            if req.server is not None and t_up:
                t_conn = req.t_conn
                connect = (b"null" if t_conn < 0 else b"0" if not t_conn
                           else b"%d" % ((t_conn - t_up) * 1e6))
                t_hdr = req.t_hdr
                if t_hdr > 0:
                    header = b"%d" % ((t_hdr - t_up) * 1e6)
                elif not t_hdr and req.resp_started:
                    # The whole response came in one read: its head with it.
                    header = b"%d" % ((end - t_up) * 1e6)
                else:
                    header = b"null"  # no response head from the real server
                upstream = _UPSTREAM % (connect, header, (end - t_up) * 1e6)
            else:
                upstream = _NO_UPSTREAM
            # The method and Host need no escaping: the parser let only token characters
            # through in the one (llhttp) and HOST_CHARS in the other (reqparse.on_header).
            fields += (prefix, method or b"-", json_text(req.url), proto, req.status,
                       req.hlen + req.resp_bytes, req.resp_bytes, bytes_in, req.host_b,
                       b"null" if ua is None else b'"%b"' % json_text(ua),
                       b"null" if ref is None else b'"%b"' % json_text(ref),
                       (end - req.ts) * 1e6, upstream, b"true" if req.cut else b"false")
        if not self._scheduled:
            self._scheduled = True
            self._loop.call_soon(self.flush)
        elif len(fields) >= MAX_BATCH * self._nfields:
            self.flush()

    def flush(self) -> None:
        self._scheduled = False
        fields = self._fields
        if not fields:
            return
        self._fields = []
        sec = int(time.time())
        if sec != self._sec:
            self._sec = sec
            self._stamp = self._head + self._stamper(sec) + self._tail
        data = self._stamp * (len(fields) // self._nfields) % tuple(fields)
        log = self._logger
        handlers = log.handlers
        if len(handlers) == 1 and not log.filters and not handlers[0].filters:
            # A handler that takes lines as they are (the access-log file's) gets them without
            # a LogRecord: no record, lock or formatter per batch.
            write = getattr(handlers[0], "write_batch", None)
            if write is not None:
                write(data)
                return
        text = data[:-1].decode("utf-8", "backslashreplace")
        log.handle(log.makeRecord(ACCESS_LOGGER, logging.INFO, "", 0, text, (), None))
