"""Response compression: which coding a request accepts (Accept-Encoding), whether a response head
qualifies, the head rewritten for it, and the streaming encoders (gzip from zlib, brotli when the
`brotli` package is installed).

Compiled once per config generation (`Policy`, from a VS's [vs.compression]); per request the
proxy reads the request head only when the VS compresses (`Policy.offer`, through the pool's gate:
ratelimit.PoolGate), and per response the head only when the request was offered a coding
(`Offer.start`, from upstream.py). A response is compressed when all of these hold: the client
is HTTP/1.1 and accepts the coding (q > 0, by name or by `*`); the request is not HEAD and asks
no Range; the status has a body and is not 206; the head has no Content-Encoding, no
Content-Range and no `Cache-Control: no-transform`; its Content-Type is one of the configured
types; an announced Content-Length is at least `min_length`. Then Content-Length goes (the body
is sent chunked), Content-Encoding and `Vary: Accept-Encoding` are added, and a strong ETag is
made weak (the bytes differ, the meaning does not).

Encoders never hold a whole body: each piece the real server sends is compressed and flushed
(a sync flush) as it arrives, so streamed responses keep flowing; an encoder holds its window,
about 256 KiB for gzip and for brotli (lgwin 18), while its response is relayed.
"""

from __future__ import annotations

import importlib
import zlib
from typing import Any

from ..config.model import Compression

_brotli: Any
try:
    _brotli = importlib.import_module("brotli")
except ImportError:  # optional: [vs.compression] refuses "br" without it (config/loader.py)
    _brotli = None

# Distinct Accept-Encoding values remembered per VS with their choice (browsers send a handful).
_CACHE_SIZE = 256
_NO_BODY = frozenset((204, 206, 304))


class CompressStats:
    """Per-VS compression counters (kept across reloads, like the VS's Counters)."""

    __slots__ = ("bytes_in", "bytes_out", "responses")

    def __init__(self) -> None:
        self.responses: dict[str, int] = {}
        self.bytes_in = 0  # body bytes before compression
        self.bytes_out = 0  # ... and after (chunk framing excluded)

    def stats(self) -> dict[str, Any]:
        return {"responses": dict(self.responses), "bytes_in": self.bytes_in,
                "bytes_out": self.bytes_out}


def parse_accept_encoding(value: bytes) -> dict[str, float]:
    """Accept-Encoding as {coding (lower case): q}; elements with a bad q-value are ignored."""
    out: dict[str, float] = {}
    for element in value.decode("latin-1").split(","):
        coding, _, params = element.partition(";")
        coding = coding.strip().lower()
        if not coding:
            continue
        q = 1.0
        for p in params.split(";"):
            k, _, v = p.partition("=")
            if k.strip().lower() == "q":
                try:
                    q = float(v.strip())
                except ValueError:
                    q = -1.0
                if not 0.0 <= q <= 1.0:
                    q = -1.0
        if q < 0:
            continue
        if coding == "x-gzip":
            coding = "gzip"
        out[coding] = max(q, out.get(coding, 0.0)) if coding in out else q
    return out


class Policy:
    """A VS's compression for one config generation."""

    __slots__ = ("brotli_level", "cache", "counts", "encodings", "exact", "level", "min_length",
                 "offers", "prefixes")

    def __init__(self, cfg: Compression, counts: CompressStats) -> None:
        self.encodings = cfg.encodings
        self.exact = frozenset(t for t in cfg.types if not t.endswith("/*"))
        self.prefixes = tuple(t[:-1] for t in cfg.types if t.endswith("/*"))  # "text/"
        self.min_length = cfg.min_length
        self.level = cfg.level
        self.brotli_level = cfg.brotli_level
        self.counts = counts
        self.offers = {e: Offer(self, e) for e in cfg.encodings}
        self.cache: dict[bytes, Offer | None] = {}

    def choose(self, accept: bytes) -> Offer | None:
        """The coding to use for a request that sent `accept` (Accept-Encoding): the highest q
        of the configured ones, ties going to the configured order; None: identity."""
        cache = self.cache
        if accept in cache:
            return cache[accept]
        qs = parse_accept_encoding(accept)
        star = qs.get("*", 0.0)
        best: Offer | None = None
        best_q = 0.0
        for e in self.encodings:
            q = qs.get(e, star)
            if q > best_q:
                best, best_q = self.offers[e], q
        if len(cache) >= _CACHE_SIZE:
            cache.clear()
        cache[accept] = best
        return best

    def offer(self, fwd: list[bytes]) -> Offer | None:
        """The coding a request head (Request.fwd, as pieces) allows, or None (no
        Accept-Encoding, nothing acceptable, or a Range request)."""
        accept: bytes | None = None
        for i in range(4, len(fwd) - 3, 4):
            name = fwd[i]
            n = len(name)
            if n == 15 and name.lower() == b"accept-encoding":
                accept = fwd[i + 2] if accept is None else accept + b"," + fwd[i + 2]
            elif n == 5 and name.lower() == b"range":
                return None
        if accept is None:
            return None
        return self.choose(accept)

    def wants(self, content_type: bytes) -> bool:
        mt = content_type.partition(b";")[0].strip().lower().decode("latin-1")
        return mt in self.exact or (bool(self.prefixes) and mt.startswith(self.prefixes))


class Offer:
    """A coding a request accepts, under its VS's policy (Request.compress)."""

    __slots__ = ("coding", "field", "policy")

    def __init__(self, policy: Policy, coding: str) -> None:
        self.policy = policy
        self.coding = coding
        self.field = f"Content-Encoding: {coding}\r\n".encode()

    def start(self, head: bytes, status: int) -> tuple[bytes, Encoder] | None:
        """If the response with `head` (status line and fields, each ending in CRLF, no blank
        line) qualifies: the head to send instead (no Content-Length: the caller frames the body
        chunked) and the encoder of its body; else None (relayed as it is)."""
        if status < 200 or status in _NO_BODY:
            return None
        policy = self.policy
        lines = head.split(b"\r\n")
        out = [lines[0]]
        ctype = b""
        vary: int = -1
        for line in lines[1:-1]:
            colon = line.find(b":")
            name = line[:colon].strip().lower()
            value = line[colon + 1:].strip()
            if name == b"content-encoding":
                if value.lower() != b"identity":
                    return None
                continue
            if name == b"content-range":
                return None
            if name == b"content-length":
                if not value.isdigit() or int(value) < policy.min_length:
                    return None
                continue
            if name == b"content-type":
                ctype = value
            elif name == b"cache-control" and b"no-transform" in value.lower():
                return None
            elif name == b"etag" and value.startswith(b'"'):
                line = b"ETag: W/" + value
            elif name == b"vary":
                vary = len(out)
            out.append(line)
        if not ctype or not policy.wants(ctype):
            return None
        if vary >= 0:
            low = out[vary].lower()
            if b"accept-encoding" not in low and b"*" not in low:
                out[vary] += b", Accept-Encoding"
        else:
            out.append(b"Vary: Accept-Encoding")
        out.append(b"")
        enc = Encoder(self)
        counts = policy.counts
        counts.responses[self.coding] = counts.responses.get(self.coding, 0) + 1
        return b"\r\n".join(out) + self.field, enc


class Encoder:
    """One response body being compressed: `feed` each piece as it comes, `finish` at its end."""

    __slots__ = ("counts", "n_in", "n_out", "z")

    def __init__(self, offer: Offer) -> None:
        policy = offer.policy
        self.counts = policy.counts
        self.n_in = 0
        self.n_out = 0
        self.z: Any
        if offer.coding == "br":
            assert _brotli is not None  # the loader refuses "br" without it
            self.z = _BrotliStream(_brotli.Compressor(quality=policy.brotli_level, lgwin=18))
        else:
            self.z = _GzipStream(zlib.compressobj(policy.level, zlib.DEFLATED, 31))

    def feed(self, data: bytes) -> bytes:
        """`data` compressed and flushed: everything a client needs to decode it so far."""
        out: bytes = self.z.feed(data)
        self.n_in += len(data)
        self.n_out += len(out)
        return out

    def finish(self) -> bytes:
        """The end of the compressed stream; the counters take this response's figures."""
        out: bytes = self.z.finish()
        c = self.counts
        c.bytes_in += self.n_in
        c.bytes_out += self.n_out + len(out)
        return out


class _GzipStream:
    __slots__ = ("z",)

    def __init__(self, z: Any) -> None:
        self.z = z

    def feed(self, data: bytes) -> bytes:
        z = self.z
        return z.compress(data) + z.flush(zlib.Z_SYNC_FLUSH)  # type: ignore[no-any-return]

    def finish(self) -> bytes:
        return self.z.flush()  # type: ignore[no-any-return]


class _BrotliStream:
    __slots__ = ("z",)

    def __init__(self, z: Any) -> None:
        self.z = z

    def feed(self, data: bytes) -> bytes:
        z = self.z
        return z.process(data) + z.flush()  # type: ignore[no-any-return]

    def finish(self) -> bytes:
        return self.z.finish()  # type: ignore[no-any-return]
