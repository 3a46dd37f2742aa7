"""The table of malformed and ambiguous HTTP/1.1 requests (RFC 9112) and lbproxy's documented answer
to each, shared by tests/hardening/test_smuggling.py and bench/smuggling.py (which also sends them
to nginx and HAProxy).

Every case is raw bytes sent on a fresh connection. `status` is lbproxy's answer; after it the
connection must be closed and the real server must have received nothing. The VS the cases run
against sets `max_body = MAX_BODY`; the other limits are the defaults (16 KiB head, 100 fields).
"""

from __future__ import annotations

import socket
import time
from dataclasses import dataclass

MAX_BODY = 1024


@dataclass(frozen=True, slots=True)
class Case:
    name: str
    raw: bytes
    status: int  # lbproxy's answer
    why: str  # what is wrong, for the printed table


def _post(fields: bytes, body: bytes = b"") -> bytes:
    return b"POST /upload HTTP/1.1\r\nHost: example.com\r\n" + fields + b"\r\n" + body


def _get(fields: bytes) -> bytes:
    return b"GET / HTTP/1.1\r\nHost: example.com\r\n" + fields + b"\r\n"


_CHUNKED = b"Transfer-Encoding: chunked\r\n"

CASES: tuple[Case, ...] = (
    # Framing: Content-Length and Transfer-Encoding (RFC 9112 §6).
    Case("cl_and_te", _post(b"Content-Length: 6\r\n" + _CHUNKED, b"0\r\n\r\nG"), 400,
         "Content-Length and Transfer-Encoding (CL.TE)"),
    Case("te_and_cl", _post(_CHUNKED + b"Content-Length: 3\r\n", b"0\r\n\r\n"), 400,
         "Transfer-Encoding and Content-Length (TE.CL)"),
    Case("two_cl_differ", _post(b"Content-Length: 3\r\nContent-Length: 4\r\n", b"abcd"), 400,
         "two different Content-Lengths"),
    Case("two_cl_same", _post(b"Content-Length: 3\r\nContent-Length: 3\r\n", b"abc"), 400,
         "two equal Content-Length fields"),
    Case("cl_list", _post(b"Content-Length: 3, 3\r\n", b"abc"), 400,
         "Content-Length as a list"),
    Case("cl_plus", _post(b"Content-Length: +3\r\n", b"abc"), 400, "Content-Length with a sign"),
    Case("cl_negative", _post(b"Content-Length: -1\r\n"), 400, "negative Content-Length"),
    Case("cl_empty", _post(b"Content-Length: \r\n"), 400, "empty Content-Length"),
    Case("cl_space_before_colon", _post(b"Content-Length : 3\r\n", b"abc"), 400,
         "space between Content-Length and its colon"),
    Case("te_gzip", _post(b"Transfer-Encoding: gzip\r\n", b"abc"), 400,
         "final coding not chunked"),
    Case("te_gzip_chunked", _post(b"Transfer-Encoding: gzip, chunked\r\n", b"0\r\n\r\n"), 400,
         "unknown coding before chunked"),
    Case("te_chunked_gzip", _post(b"Transfer-Encoding: chunked, gzip\r\n", b"0\r\n\r\n"), 400,
         "chunked not last"),
    Case("te_twice", _post(_CHUNKED + _CHUNKED, b"0\r\n\r\n"), 400, "two Transfer-Encoding fields"),
    Case("te_chunkedx", _post(b"Transfer-Encoding: chunkedx\r\n", b"0\r\n\r\n"), 400,
         "unknown coding 'chunkedx'"),
    Case("te_vtab", _post(b"Transfer-Encoding: \x0bchunked\r\n", b"0\r\n\r\n"), 400,
         "vertical tab before chunked"),
    Case("te_space_before_colon", _post(b"Transfer-Encoding : chunked\r\n", b"0\r\n\r\n"), 400,
         "space between Transfer-Encoding and its colon"),
    Case("te_http10", b"POST / HTTP/1.0\r\nHost: example.com\r\n" + _CHUNKED + b"\r\n0\r\n\r\n",
         400, "Transfer-Encoding in HTTP/1.0"),
    # Chunked bodies (RFC 9112 §7.1).
    Case("chunk_size_invalid", _post(_CHUNKED, b"zz\r\nabc\r\n0\r\n\r\n"), 400,
         "chunk size not hex"),
    Case("chunk_size_negative", _post(_CHUNKED, b"-3\r\nabc\r\n0\r\n\r\n"), 400,
         "negative chunk size"),
    Case("chunk_size_overflow", _post(_CHUNKED, b"ffffffffffffffffff\r\nabc\r\n0\r\n\r\n"), 400,
         "chunk size overflow"),
    Case("chunk_size_0x", _post(_CHUNKED, b"0x3\r\nabc\r\n0\r\n\r\n"), 400, "chunk size 0x3"),
    Case("chunk_size_space", _post(_CHUNKED, b"3 \r\nabc\r\n0\r\n\r\n"), 400,
         "space after chunk size"),
    Case("chunk_ext_ctl", _post(_CHUNKED, b"3;a=\x01\r\nabc\r\n0\r\n\r\n"), 400,
         "control byte in chunk extension"),
    Case("chunk_ext_bare_lf", _post(_CHUNKED, b"3;a\nabc\r\n0\r\n\r\n"), 400,
         "bare LF after chunk extension"),
    Case("chunk_data_no_crlf", _post(_CHUNKED, b"3\r\nabcX0\r\n\r\n"), 400,
         "chunk data not followed by CRLF"),
    Case("chunk_lf_only", _post(_CHUNKED, b"3\nabc\n0\n\n"), 400, "chunk lines end in bare LF"),
    # Field syntax (RFC 9112 §5, §2.2).
    Case("obs_fold", _get(b"X-A: b\r\n c\r\n"), 400, "obs-fold (space)"),
    Case("obs_fold_tab", _get(b"X-A: b\r\n\tc\r\n"), 400, "obs-fold (tab)"),
    Case("space_before_colon", _get(b"X-A : b\r\n"), 400, "space between name and colon"),
    Case("tab_before_colon", _get(b"X-A\t: b\r\n"), 400, "tab between name and colon"),
    Case("leading_space_first_field", b"GET / HTTP/1.1\r\n Host: example.com\r\n\r\n", 400,
         "first field line starts with a space"),
    Case("empty_field_name", _get(b": x\r\n"), 400, "empty field name"),
    Case("no_colon", _get(b"Xyz\r\n"), 400, "field line without a colon"),
    Case("bare_lf_field", b"GET / HTTP/1.1\r\nHost: example.com\nX: y\r\n\r\n", 400,
         "bare LF ending a field line"),
    Case("bare_lf_request_line", b"GET / HTTP/1.1\nHost: example.com\r\n\r\n", 400,
         "bare LF ending the request line"),
    Case("all_bare_lf", b"GET / HTTP/1.1\nHost: example.com\n\n", 400, "LF line endings only"),
    Case("bare_cr_field", _get(b"X: a\rb\r\n"), 400, "bare CR in a field value"),
    Case("bare_cr_request_line", b"GET / HTTP/1.1\rHost: example.com\r\n\r\n", 400,
         "bare CR ending the request line"),
    Case("nul_in_value", _get(b"X: a\x00b\r\n"), 400, "NUL in a field value"),
    Case("ctl_in_value", _get(b"X: a\x01b\r\n"), 400, "control byte in a field value"),
    Case("del_in_value", _get(b"X: a\x7fb\r\n"), 400, "DEL in a field value"),
    Case("nul_in_name", _get(b"X\x00: ab\r\n"), 400, "NUL in a field name"),
    # Request line and target (RFC 9112 §3).
    Case("nul_in_target", b"GET /a\x00b HTTP/1.1\r\nHost: example.com\r\n\r\n", 400,
         "NUL in the target"),
    Case("space_in_target", b"GET /a b HTTP/1.1\r\nHost: example.com\r\n\r\n", 400,
         "space in the target"),
    Case("lowercase_method", b"get / HTTP/1.1\r\nHost: example.com\r\n\r\n", 400,
         "unknown method 'get'"),
    Case("http_1_2", b"GET / HTTP/1.2\r\nHost: example.com\r\n\r\n", 400, "HTTP/1.2"),
    Case("http_2_0", b"GET / HTTP/2.0\r\nHost: example.com\r\n\r\n", 505, "HTTP/2.0 over HTTP/1"),
    Case("http_0_9", b"GET /\r\n\r\n", 505, "HTTP/0.9 request line"),
    Case("star_not_options", b"GET * HTTP/1.1\r\nHost: example.com\r\n\r\n", 400,
         "asterisk-form with GET"),
    Case("connect", b"CONNECT example.com:443 HTTP/1.1\r\nHost: example.com:443\r\n\r\n", 405,
         "CONNECT (no tunnels to arbitrary hosts)"),
    # Host (RFC 9112 §3.2).
    Case("no_host", b"GET / HTTP/1.1\r\n\r\n", 400, "HTTP/1.1 without Host"),
    Case("two_hosts", b"GET / HTTP/1.1\r\nHost: a.example\r\nHost: b.example\r\n\r\n", 400,
         "two Host fields"),
    Case("host_space", b"GET / HTTP/1.1\r\nHost: a b\r\n\r\n", 400, "space in Host"),
    Case("host_list", b"GET / HTTP/1.1\r\nHost: a.example,b.example\r\n\r\n", 400,
         "list in Host"),
    Case("host_userinfo", b"GET / HTTP/1.1\r\nHost: u@b.example\r\n\r\n", 400,
         "userinfo in Host"),
    Case("absolute_form_mismatch",
         b"GET http://b.example/x HTTP/1.1\r\nHost: a.example\r\n\r\n", 400,
         "absolute-form target disagrees with Host"),
    Case("absolute_form_userinfo",
         b"GET http://u@a.example/x HTTP/1.1\r\nHost: a.example\r\n\r\n", 400,
         "absolute-form target with userinfo"),
    # Limits.
    Case("header_too_large", _get(b"X-Big: " + b"a" * (17 * 1024) + b"\r\n"), 431,
         "head over 16 KiB"),
    Case("request_line_too_long",
         b"GET /" + b"a" * (17 * 1024) + b" HTTP/1.1\r\nHost: example.com\r\n\r\n", 431,
         "request line over 16 KiB"),
    Case("too_many_fields", _get(b"".join(b"X-%d: v\r\n" % i for i in range(120))), 431,
         "120 fields (limit 100)"),
    Case("body_too_large", _post(b"Content-Length: 2000\r\n", b"a" * 2000), 413,
         f"Content-Length over max_body ({MAX_BODY})"),
)

# A well-formed request: the cases' connection and real server work for it.
GOOD = b"GET /ok HTTP/1.1\r\nHost: example.com\r\nConnection: close\r\n\r\n"


def send_case(host: str, port: int, raw: bytes, timeout: float = 5.0) -> tuple[int, bool]:
    """Send `raw` on a new connection; (status of the first answer or 0 for none, whether the
    server closed the connection after it). Blocking: call from a thread next to an event loop."""
    with socket.create_connection((host, port), timeout=timeout) as s:
        s.settimeout(timeout)
        try:
            s.sendall(raw)
        except OSError:
            pass  # refused mid-send (the answer may still be readable)
        data = b""
        closed = False
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                chunk = s.recv(65536)
            except TimeoutError:
                break
            except OSError:
                closed = True  # reset
                break
            if not chunk:
                closed = True
                break
            data += chunk
    status = 0
    if data.startswith(b"HTTP/1."):
        try:
            status = int(data[9:12])
        except ValueError:
            status = 0
    return status, closed
