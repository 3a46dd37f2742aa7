"""The desync table (issue 13): request and response vectors whose danger is not a malformed byte
but two parties framing the same bytes differently, with the readings that are safe for each.

Shared by tests/hardening/test_desync.py (lbproxy's verdicts) and bench/smuggling.py (lbproxy,
nginx and HAProxy side by side); the rig that runs a case and gives its verdict is desync_rig.py.

A request case is raw bytes sent on a fresh connection; `readings` lists what the real server may
read from them (besides nothing at all: a rejection is always safe). A response case sends
`GET /r/<name>` (or HEAD) and the real server answers with `response`, as written; `want` lists the
final responses (status, body) the client may get from it (besides the proxy's own error). The
classes the issue names, in `kind`: Connection naming framing fields (both directions), upgrade
variants, obs-fold, whitespace before the colon, Transfer-Encoding values, 1xx responses,
responses to HEAD with a body, pipelined requests after an error.
"""

from __future__ import annotations

from dataclasses import dataclass

from .smuggling_cases import MAX_BODY

REJECTED = "rejected"
FORWARDED = "forwarded"
AMBIGUOUS = "ambiguous"
DESYNC = "desync"


@dataclass(frozen=True, slots=True)
class Seen:
    """One request as a real server reads it: method, target, body (de-chunked)."""

    method: bytes
    target: bytes
    body: bytes = b""


@dataclass(frozen=True, slots=True)
class Case:
    name: str
    kind: str  # the vector's class
    raw: bytes  # what the client sends, in one write on a fresh connection
    lbproxy: str  # lbproxy's documented verdict: REJECTED or FORWARDED
    why: str  # what the vector tries, for the printed table
    readings: tuple[tuple[Seen, ...], ...] = ()  # what the real server may read (request cases)
    response: bytes = b""  # response cases: the real server's answer, as written
    want: tuple[tuple[int, bytes], ...] = ()  # response cases: final answers the client may get
    answers: int = 1  # responses the client reads before its follow-up probe
    paths: tuple[bytes, ...] = ()  # the targets of the client's requests, in order
    echo: bool = False  # a WebSocket upgrade: after a 101, bytes sent must come back


# A whole request hidden in a body: a real server that reads the body as a request answers it,
# and that answer is what a poisoned response queue hands to the next client.
SMUGGLED = b"/smuggled"
HIDDEN = b"GET /smuggled HTTP/1.1\r\nHost: example.com\r\n\r\n"
# The same for responses: a whole response hidden in a body.
HIDDEN_RESP = b"HTTP/1.1 200 OK\r\nX-Target: /smuggled\r\nContent-Length: 9\r\n\r\n/smuggled"
WS_KEY = b"dGhlIHNhbXBsZSBub25jZQ=="
_WS = b"Sec-WebSocket-Key: " + WS_KEY + b"\r\nSec-WebSocket-Version: 13\r\n"
H2_SETTINGS = b"HTTP2-Settings: AAMAAABkAARAAAAAAAIAAAAA\r\n"


def _req(method: bytes, target: bytes, fields: bytes, body: bytes = b"",
         version: bytes = b"HTTP/1.1") -> bytes:
    return (method + b" " + target + b" " + version + b"\r\nHost: example.com\r\n" + fields
            + b"\r\n" + body)


def _cl(body: bytes) -> bytes:
    return b"Content-Length: %d\r\n" % len(body)


def chunked(body: bytes) -> bytes:
    return b"%x\r\n%b\r\n0\r\n\r\n" % (len(body), body)


_TE = b"Transfer-Encoding: chunked\r\n"
_UPLOAD = ((Seen(b"POST", b"/upload", HIDDEN),),)  # the upload with the hidden request as its body


def _upload(fields: bytes, body: bytes = HIDDEN) -> bytes:
    return _req(b"POST", b"/upload", fields, body)


def _resp(name: str, fields: bytes, body: bytes = b"", status: bytes = b"200 OK") -> bytes:
    return (b"HTTP/1.1 " + status + b"\r\nX-Target: /r/" + name.encode() + b"\r\n" + fields
            + b"\r\n" + body)


def _rcase(name: str, kind: str, response: bytes, lbproxy: str, why: str,
           want: tuple[tuple[int, bytes], ...], method: bytes = b"GET") -> Case:
    target = b"/r/" + name.encode()
    return Case(name, kind, _req(method, target, b""), lbproxy, why,
                readings=((Seen(method, target),),), response=response, want=want)


_FINAL = b"Content-Length: 5\r\n\r\nfinal"  # the final response after 1xx ones: body "final"


def _final(name: str) -> bytes:
    return b"HTTP/1.1 200 OK\r\nX-Target: /r/" + name.encode() + b"\r\n" + _FINAL


CASES: tuple[Case, ...] = (
    # Connection naming the fields that frame or route the request (RFC 9110 §7.6.1 lets a sender
    # name any field; removing Content-Length makes the real server read the body as a request).
    Case("conn_cl", "Connection names framing", _upload(b"Connection: content-length\r\n"
                                                         + _cl(HIDDEN)),
         FORWARDED, "Connection: content-length on a POST", _UPLOAD),
    Case("conn_cl_mixed_case", "Connection names framing",
         _upload(b"Connection: Content-Length\r\n" + _cl(HIDDEN)), FORWARDED,
         "Connection: Content-Length", _UPLOAD),
    Case("conn_cl_in_list", "Connection names framing",
         _upload(b"Connection: keep-alive, x-trace, content-length\r\nX-Trace: 1\r\n"
                 + _cl(HIDDEN)), FORWARDED,
         "content-length last in a list (x-trace named too)", _UPLOAD),
    Case("conn_cl_two_fields", "Connection names framing",
         _upload(b"Connection: keep-alive\r\n" + _cl(HIDDEN) + b"Connection: content-length\r\n"),
         FORWARDED, "a second Connection field names content-length", _UPLOAD),
    Case("conn_cl_padded_list", "Connection names framing",
         _upload(b"Connection: ,\t content-length ,\r\n" + _cl(HIDDEN)), FORWARDED,
         "empty list elements and tabs around content-length", _UPLOAD),
    Case("conn_cl_close", "Connection names framing",
         _upload(b"Connection: close, Content-Length\r\n" + _cl(HIDDEN)), FORWARDED,
         "Connection: close, Content-Length", _UPLOAD),
    Case("conn_cl_get", "Connection names framing",
         _req(b"GET", b"/", b"Connection: content-length\r\n" + _cl(HIDDEN), HIDDEN), FORWARDED,
         "a GET with a body and Connection: content-length", ((Seen(b"GET", b"/", HIDDEN),),)),
    Case("conn_cl_http10", "Connection names framing",
         _req(b"POST", b"/upload", b"Connection: keep-alive, content-length\r\n" + _cl(HIDDEN),
              HIDDEN, b"HTTP/1.0"), FORWARDED, "HTTP/1.0 keep-alive naming content-length",
         _UPLOAD),
    Case("conn_te", "Connection names framing",
         _upload(b"Connection: transfer-encoding\r\n" + _TE, chunked(HIDDEN)), FORWARDED,
         "Connection: transfer-encoding on a chunked POST", _UPLOAD),
    Case("conn_cl_te", "Connection names framing",
         _upload(b"Connection: content-length, transfer-encoding\r\n"
                 + _cl(chunked(HIDDEN)) + _TE, chunked(HIDDEN)), REJECTED,
         "both framing fields, both named", _UPLOAD),
    Case("conn_host", "Connection names framing",
         _req(b"GET", b"/", b"Connection: host\r\n"), FORWARDED, "Connection: host",
         ((Seen(b"GET", b"/"),),)),
    # Upgrade variants (RFC 9110 §7.8; h2c, RFC 7540 §3.2).
    Case("h2c", "upgrade", _req(b"GET", b"/", b"Connection: Upgrade, HTTP2-Settings\r\n"
                                b"Upgrade: h2c\r\n" + H2_SETTINGS), FORWARDED,
         "h2c upgrade (curl --http2)", ((Seen(b"GET", b"/"),),)),
    Case("h2c_upper_no_settings", "upgrade",
         _req(b"GET", b"/", b"Connection: upgrade\r\nUpgrade: H2C\r\n"), FORWARDED,
         "Upgrade: H2C without HTTP2-Settings", ((Seen(b"GET", b"/"),),)),
    Case("h2c_with_body", "upgrade",
         _upload(b"Connection: Upgrade, HTTP2-Settings\r\nUpgrade: h2c\r\n" + H2_SETTINGS
                 + _cl(HIDDEN)), FORWARDED, "h2c upgrade on a POST with a body", _UPLOAD),
    Case("h2c_then_websocket", "upgrade",
         _req(b"GET", b"/ws", b"Connection: Upgrade\r\nUpgrade: h2c, websocket\r\n" + _WS),
         FORWARDED, "Upgrade: h2c, websocket (h2c dropped from the list)",
         ((Seen(b"GET", b"/ws"),),), echo=True),
    Case("websocket", "upgrade",
         _req(b"GET", b"/ws", b"Connection: Upgrade\r\nUpgrade: websocket\r\n" + _WS), FORWARDED,
         "a plain WebSocket upgrade (must keep working)", ((Seen(b"GET", b"/ws"),),), echo=True),
    Case("websocket_post_body", "upgrade",
         _upload(b"Connection: Upgrade\r\nUpgrade: websocket\r\n" + _WS + _cl(HIDDEN)), FORWARDED,
         "upgrade offered on a POST with a body (declined)", _UPLOAD),
    Case("h2_preface", "upgrade", b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + HIDDEN, REJECTED,
         "HTTP/2 prior-knowledge preface, then a request", ()),
    # obs-fold (RFC 9112 §5.2) on the fields that frame the message.
    Case("fold_te", "obs-fold", _upload(b"Transfer-Encoding:\r\n chunked\r\n", chunked(HIDDEN)),
         REJECTED, "Transfer-Encoding value on a continuation line", _UPLOAD),
    Case("fold_cl", "obs-fold",
         _upload(b"Content-Length:\r\n %d\r\n" % len(HIDDEN)), REJECTED,
         "Content-Length value on a continuation line", _UPLOAD),
    Case("fold_connection", "obs-fold",
         _upload(b"Connection: keep-alive,\r\n content-length\r\n" + _cl(HIDDEN)), REJECTED,
         "content-length named on a continuation of Connection", _UPLOAD),
    Case("fold_hides_te", "obs-fold",
         _upload(b"X-Pad: a\r\n Transfer-Encoding: chunked\r\n" + _cl(chunked(HIDDEN)),
                 chunked(HIDDEN)), REJECTED,
         "a folded line that reads as Transfer-Encoding",
         ((Seen(b"POST", b"/upload", chunked(HIDDEN)),),)),
    # Whitespace between a field name and its colon (RFC 9112 §5.1: 400).
    Case("ws_colon_connection", "whitespace before colon",
         _upload(b"Connection : content-length\r\n" + _cl(HIDDEN)), REJECTED,
         "Connection : content-length", _UPLOAD),
    Case("ws_colon_host", "whitespace before colon",
         _req(b"GET", b"/", b"Host : evil.example\r\n"), REJECTED,
         "a second Host with a space before its colon", ((Seen(b"GET", b"/"),),)),
    Case("ws_colon_te_with_cl", "whitespace before colon",
         _upload(b"Transfer-Encoding : chunked\r\n" + _cl(chunked(HIDDEN)), chunked(HIDDEN)),
         REJECTED, "Transfer-Encoding : chunked beside a Content-Length",
         ((Seen(b"POST", b"/upload", chunked(HIDDEN)),), *_UPLOAD)),
    Case("tab_colon_cl", "whitespace before colon",
         _upload(b"Content-Length\t: %d\r\n" % len(HIDDEN)), REJECTED,
         "tab between Content-Length and its colon", _UPLOAD),
    # Transfer-Encoding values: coding names are case-insensitive (RFC 9112 §7), chunked once.
    Case("te_upper", "Transfer-Encoding values", _upload(b"Transfer-Encoding: CHUNKED\r\n",
                                                         chunked(HIDDEN)),
         FORWARDED, "Transfer-Encoding: CHUNKED", _UPLOAD),
    Case("te_mixed_case", "Transfer-Encoding values",
         _upload(b"Transfer-Encoding: ChUnKeD\r\n", chunked(HIDDEN)), FORWARDED,
         "Transfer-Encoding: ChUnKeD", _UPLOAD),
    Case("te_chunked_twice", "Transfer-Encoding values",
         _upload(b"Transfer-Encoding: chunked, chunked\r\n", chunked(HIDDEN)), REJECTED,
         "chunked listed twice", _UPLOAD),
    Case("te_two_fields_case", "Transfer-Encoding values",
         _upload(_TE + b"Transfer-Encoding: CHUNKED\r\n", chunked(HIDDEN)), REJECTED,
         "two Transfer-Encoding fields, cases differ", _UPLOAD),
    Case("te_identity_chunked", "Transfer-Encoding values",
         _upload(b"Transfer-Encoding: identity, chunked\r\n", chunked(HIDDEN)), REJECTED,
         "identity (no longer a coding) before chunked", _UPLOAD),
    Case("te_trailing_comma", "Transfer-Encoding values",
         _upload(b"Transfer-Encoding: chunked,\r\n", chunked(HIDDEN)), REJECTED,
         "chunked followed by an empty list element", _UPLOAD),
    Case("te_upper_with_cl", "Transfer-Encoding values",
         _upload(b"Transfer-Encoding: CHUNKED\r\n" + _cl(chunked(HIDDEN)), chunked(HIDDEN)),
         REJECTED, "CL.TE with the coding in capitals", _UPLOAD),
    # Requests pipelined behind one that is refused: nothing after an error may be read.
    Case("pipe_after_400", "pipelined after an error",
         _req(b"GET", b"/", b"X-A: a\x00b\r\n") + HIDDEN, REJECTED,
         "a request behind a NUL byte", ()),
    Case("pipe_after_413", "pipelined after an error",
         _upload(b"Content-Length: 2000\r\n", HIDDEN + b"x" * (2000 - len(HIDDEN))), REJECTED,
         f"a request at the start of a body over max_body ({MAX_BODY})", ()),
    Case("pipe_after_expect_413", "pipelined after an error",
         _upload(b"Expect: 100-continue\r\nContent-Length: 2000\r\n", HIDDEN), REJECTED,
         "a request instead of the body refused at Expect", ()),
    Case("pipe_after_505", "pipelined after an error",
         _req(b"GET", b"/", b"", version=b"HTTP/2.0") + HIDDEN, REJECTED,
         "a request behind an HTTP/2.0 request line", ()),
    Case("pipe_after_cl_te", "pipelined after an error",
         _upload(b"Content-Length: %d\r\n" % (5 + len(HIDDEN)) + _TE, b"0\r\n\r\n" + HIDDEN),
         REJECTED, "CL.TE where the chunked reading leaves a request",
         ((Seen(b"POST", b"/upload"),), (Seen(b"POST", b"/upload", b"0\r\n\r\n" + HIDDEN),))),
    Case("pipe_good_then_bad", "pipelined after an error",
         _req(b"GET", b"/first", b"") + _req(b"GET", b"/second", b"X-A: a\x00b\r\n") + HIDDEN,
         FORWARDED, "a good request, a bad one, then a third",
         ((Seen(b"GET", b"/first"),),), answers=2, paths=(b"/first", b"/second")),
    # The response direction: the real server answers with the vector, then a probe follows on
    # the pooled connection. Connection naming framing fields in a response.
    _rcase("resp_conn_cl", "Connection names framing (response)",
           _resp("resp_conn_cl", b"Connection: content-length\r\n" + _cl(HIDDEN_RESP),
                 HIDDEN_RESP), FORWARDED, "response Connection: content-length",
           ((200, HIDDEN_RESP),)),
    _rcase("resp_conn_te", "Connection names framing (response)",
           _resp("resp_conn_te", b"Connection: transfer-encoding\r\n" + _TE,
                 chunked(HIDDEN_RESP)), FORWARDED, "response Connection: transfer-encoding",
           ((200, HIDDEN_RESP),)),
    _rcase("resp_conn_cl_ka", "Connection names framing (response)",
           _resp("resp_conn_cl_ka", b"Connection: keep-alive, Content-Length\r\n"
                 + _cl(HIDDEN_RESP), HIDDEN_RESP), FORWARDED,
           "response Connection: keep-alive, Content-Length", ((200, HIDDEN_RESP),)),
    # A real server that closes after each response (HTTP/1.0 servers, Python's http.server):
    # its connection ends, the client's need not.
    _rcase("resp_conn_close", "Connection in responses",
           _resp("resp_conn_close", b"Connection: close\r\n" + _cl(b"hello"), b"hello"),
           FORWARDED, "the real server says Connection: close and closes", ((200, b"hello"),)),
    # 1xx responses (RFC 9110 §15.2): no body, any number before the final one.
    _rcase("resp_100_unasked", "1xx responses",
           b"HTTP/1.1 100 Continue\r\n\r\n" + _final("resp_100_unasked"), FORWARDED,
           "100 Continue to a request without Expect", ((200, b"final"),)),
    _rcase("resp_103_hints", "1xx responses",
           b"HTTP/1.1 103 Early Hints\r\nLink: </a.css>; rel=preload\r\n\r\n"
           + _final("resp_103_hints"), FORWARDED, "103 Early Hints", ((200, b"final"),)),
    _rcase("resp_1xx_with_cl", "1xx responses",
           b"HTTP/1.1 102 Processing\r\nContent-Length: 20\r\n\r\n" + _final("resp_1xx_with_cl"),
           FORWARDED, "a 1xx with a Content-Length (it has no body)", ((200, b"final"),)),
    _rcase("resp_many_1xx", "1xx responses",
           b"HTTP/1.1 102 Processing\r\n\r\n" * 3 + b"HTTP/1.1 103 Early Hints\r\n\r\n"
           + _final("resp_many_1xx"), FORWARDED, "four 1xx before the final response",
           ((200, b"final"),)),
    _rcase("resp_101_unasked", "1xx responses",
           b"HTTP/1.1 101 Switching Protocols\r\nX-Target: /r/resp_101_unasked\r\n"
           b"Connection: upgrade\r\nUpgrade: websocket\r\n\r\n" + HIDDEN_RESP, REJECTED,
           "101 to a request that asked for no upgrade", ()),
    # Responses to HEAD that carry a body anyway (RFC 9110 §9.3.2: there is none).
    _rcase("head_cl_body", "HEAD answered with a body",
           _resp("head_cl_body", _cl(HIDDEN_RESP), HIDDEN_RESP), FORWARDED,
           "a Content-Length body after a HEAD response", ((200, b""),), method=b"HEAD"),
    _rcase("head_chunked_body", "HEAD answered with a body",
           _resp("head_chunked_body", _TE, chunked(HIDDEN_RESP)), FORWARDED,
           "a chunked body after a HEAD response", ((200, b""),), method=b"HEAD"),
    _rcase("head_chunk_end", "HEAD answered with a body",
           _resp("head_chunk_end", _TE, b"0\r\n\r\n"), FORWARDED,
           "the last-chunk after a chunked HEAD response", ((200, b""),), method=b"HEAD"),
    # Transfer-Encoding, obs-fold and whitespace in responses.
    _rcase("resp_te_upper", "Transfer-Encoding values (response)",
           _resp("resp_te_upper", b"Transfer-Encoding: CHUNKED\r\n", chunked(b"hello")),
           FORWARDED, "response Transfer-Encoding: CHUNKED", ((200, b"hello"),)),
    _rcase("resp_te_and_cl", "Transfer-Encoding values (response)",
           _resp("resp_te_and_cl", _TE + _cl(chunked(b"hello") + HIDDEN_RESP),
                 chunked(b"hello") + HIDDEN_RESP), REJECTED,
           "chunked body, a Content-Length that covers a hidden response", ((200, b"hello"),)),
    _rcase("resp_te_ws_colon", "whitespace before colon (response)",
           _resp("resp_te_ws_colon", b"Transfer-Encoding : chunked\r\n"
                 + _cl(chunked(HIDDEN_RESP)), chunked(HIDDEN_RESP)), REJECTED,
           "response Transfer-Encoding : chunked beside a Content-Length",
           ((200, chunked(HIDDEN_RESP)), (200, HIDDEN_RESP))),
    _rcase("resp_fold_cl", "obs-fold (response)",
           _resp("resp_fold_cl", b"X-A: a\r\n Content-Length: 99\r\n" + _cl(b"hello"),
                 b"hello"), REJECTED, "a folded line that reads as a second Content-Length",
           ((200, b"hello"),)),
)


def case_paths(case: Case) -> tuple[bytes, ...]:
    """The targets of the client's requests in order (given, or the first request line's)."""
    return case.paths or (case.raw.split(b" ", 2)[1],)


# The real server's scripted answers, by request target.
SCRIPTS: dict[bytes, bytes] = {case_paths(c)[0]: c.response for c in CASES if c.response}
