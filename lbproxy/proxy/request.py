"""One request on a client connection: what was parsed, and the state of its exchange.

Its fields name the objects of the exchange by their own types (the VS's Service, the pool's
Target, the real server's Backend and counters, the upstream connection), so this module sits above
service.py and upstream.py; below it, upstream.py sees a request as contract.py's
`RequestForUpstream`, which this class meets.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .balancer import Backend
    from .compress import Offer
    from .counters import ServerStats
    from .headerrules import ResponseEdit
    from .service import Service, Target
    from .upstream import UpstreamConnection


class Request:
    """One request on a client connection: what was parsed, and the state of its exchange.

    Satisfies routing's `RequestInfo` (method, path, query, host, src_ip, body, header()); the str
    views are properties decoded only when a router asks for them. `fwd` is the head forwarded
    upstream, as pieces: [method, " ", url, " HTTP/1.1\\r\\n", name, ": ", value, "\\r\\n", ...].
    """

    __slots__ = (
        "_hmap", "attempts", "backend", "body", "body_bytes", "buffered", "chunked", "chunks",
        "complete", "compress", "cut", "discard", "expect", "fwd", "h2", "has_body", "head",
        "hidden",
        "hidden_bytes", "hlen", "host_b", "hresp", "is_head",
        "keep_alive", "method_b", "rebody", "resp_bytes", "resp_started", "sent_continue", "server",
        "src_ip", "started", "status", "svc", "t_conn", "t_hdr", "t_up", "target", "ts",
        "up", "upgrade", "upgrade_b",
        "url", "v10", "waiting_route", "xff")

    def __init__(self, svc: Service, src_ip: str, ts: float, url: bytes) -> None:
        self.svc = svc
        self.src_ip = src_ip
        # On the data plane's clock (clock.py), for its deadlines and its durations (the access
        # log, the latency histograms): the request began at `ts`; for formats that show upstream
        # timings (AccessLog.timed) the exchange with the real server began at `t_up` and its
        # response head was read at `t_hdr` (0: not yet), on a connection opened at `t_conn` (0: a
        # pooled one; -1: still connecting).
        self.ts = ts
        self.t_up = 0.0
        self.t_conn = 0.0
        self.t_hdr = 0.0
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
        self.h2 = False  # it came over HTTP/2 (h2conn.py), relayed as HTTP/1.1: logged as HTTP/2.0
        self.waiting_route = False
        self.up: UpstreamConnection[Request] | None = None  # the connection of its exchange
        self.backend: Backend | None = None  # picked from target's balancer, until released
        self.server: ServerStats | None = None  # the real server's counters; names it in logs
        self.target: Target | None = None  # the pool (VS, SubVS) that took it
        self._hmap: dict[str, str] | None = None
        self.compress: Offer | None = None  # the response coding it accepts (compress.py)
        self.hresp: ResponseEdit | None = None  # header rules for its response (headerrules.py)

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
