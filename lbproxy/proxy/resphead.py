"""A real server's response head as the relay reads it: the hop-by-hop fields cut from it (RFC 9110
§7.6.1), its framing read (Content-Length, statuses without a body, the size bound), and the
syntax check of a response relayed without the parser (`Validator`)."""

from __future__ import annotations

import re
from typing import Any, Final

import httptools

from .http import CRLF


def _drop_fields(head: bytes, names: list[bytes]) -> bytes:
    """`head` without the fields called `names` (lower case)."""
    lines = head.split(CRLF)
    drop = set(names)
    kept = [lines[0]]
    for line in lines[1:]:
        colon = line.find(b":")
        if colon < 0 or line[:colon].lower() not in drop:
            kept.append(line)
    return CRLF.join(kept)


def _without_hop_fields(head: bytes, matches: list[re.Match[bytes]], named: list[bytes]) -> bytes:
    """`head` without its hop-by-hop fields (`matches`, from _HOP_FIELD) and the fields its
    Connection fields `named`."""
    if not matches:
        return head
    pieces = []
    pos = 0
    for m in matches:
        pieces.append(head[pos:m.start()])
        pos = m.end()
    pieces.append(head[pos:])
    head = b"".join(pieces)  # as _HOP_FIELD.sub(b"", head), without a second scan
    return _drop_fields(head, named) if named else head


def _is_keep_alive(m: re.Match[bytes]) -> bool:
    """A _HOP_FIELD match that is "Connection: keep-alive" (any case, any spacing)."""
    return m.group(1).lower() == b"connection" and m.group(2).strip().lower() == b"keep-alive"


def _announces_body(head: bytes) -> bool:
    """A response head (to HEAD) that gives a non-zero Content-Length."""
    m = _CONTENT_LENGTH.search(head)
    return m is not None and int(m.group(1)) != 0


# The response head is forwarded as the server wrote it, minus the hop-by-hop fields (RFC 9110
# §7.6.1), found by one case-insensitive scan; but a server's "Connection: keep-alive" that is its
# only one goes as it came to a client kept alive over HTTP/1.1 (it holds for that hop too), on
# both paths: the head relayed unparsed (_fast_response) and the parser's.
_HOP_FIELD: Final = re.compile(
    rb"\r\n(connection|keep-alive|proxy-connection|te|trailer|transfer-encoding|upgrade"
    rb"|proxy-authenticate)[ \t]*:[ \t]*([^\r\n]*)", re.IGNORECASE)
_CONTENT_LENGTH: Final = re.compile(rb"\r\ncontent-length:[ \t]*([0-9]+)[ \t]*(?=\r)",
                                     re.IGNORECASE)
# Final statuses without a body (RFC 9110 §6.4.1): left to the parser.
_NO_BODY: Final = frozenset((b"204", b"304"))
# A response head larger than this is refused (502): bounds what one upstream read buffers.
MAX_RESPONSE_HEAD: Final = 64 * 1024


class Validator:
    """llhttp with no callback but the end of a message: checks a response the fast path relays
    unparsed (RFC 9112 syntax: CRLF only, no obs-fold, no space before a colon, no control
    bytes, one framing) for the cost of llhttp's C scan, ~0.5 us."""

    __slots__ = ("done", "parser")

    def __init__(self) -> None:
        self.done = False
        self.parser: Any = httptools.HttpResponseParser(self)

    def on_message_complete(self) -> None:
        self.done = True

    def renew(self) -> None:
        """A fresh llhttp, after a message it refused or did not end (it cannot go on)."""
        self.parser = httptools.HttpResponseParser(self)


def frame_whole(data: bytes, v: Validator) -> tuple[int, int, tuple[tuple[int, int], ...], bool,
                                                    int] | None:
    """How to relay `data` unparsed, if it is one whole response of the common shape: HTTP/1.1, a
    final status with a body, exactly one Content-Length whose body ends `data`, no hop-by-hop
    field but "Connection: keep-alive"/"Keep-Alive", and nothing llhttp (`v`) would refuse.
    Returns (where the head's blank line starts, Content-Length, the hop-by-hop spans to cut,
    whether the only one is "Connection: keep-alive", status), or None."""
    end = data.find(b"\r\n\r\n")
    if end < 0 or not data.startswith(b"HTTP/1.1 "):
        return None
    status = data[9:12]
    if not status.isdigit() or status[0] < 50 or status in _NO_BODY:  # 50 = ord("2")
        return None
    hend = end + 2  # the head's last field ends here; the blank line follows
    lengths = _CONTENT_LENGTH.findall(data, 0, hend)
    if len(lengths) != 1:
        return None
    clen = int(lengths[0])
    if hend + 2 + clen != len(data):
        return None
    # Hop-by-hop fields to cut: only "Connection: keep-alive" and "Keep-Alive: ..." qualify.
    found = []
    ka_only = True
    for m in _HOP_FIELD.finditer(data, 0, hend):
        name = m.group(1).lower()
        if name == b"keep-alive":
            ka_only = False
        elif name != b"connection" or m.group(2).strip().lower() != b"keep-alive":
            return None
        found.append(m.span())
    # Only "Connection: keep-alive": what we would say to a client we keep alive anyway.
    ka_only = ka_only and len(found) == 1
    # The same scrutiny as the parser's path: what llhttp would refuse is not relayed here.
    # Only the Content-Length body counted above follows the head.
    v.done = False
    try:
        v.parser.feed_data(data)
    except httptools.HttpParserError:
        v.done = False
    if not v.done:
        v.renew()  # the parser's path answers (502) or relays it
        return None
    return end, clen, tuple(found), ka_only, int(status)
