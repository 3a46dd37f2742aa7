"""Where a parsed request goes: dispatch (rules, balancer, pool) and the upstream side's
callbacks; how its answer ends is the layer below (answers.py).

One path per step whichever way a request came: `_start` dispatches (the VS kinds `Service.fast`
names first), `_serve` picks the real server (`Balancer.pick`), `_send` binds the request to an
upstream connection (`ConnPool.acquire`, or `ConnPool.connect` whose callback `attach` comes back
to it) and sends its head, and `Answers.response_done` ends every answered request, relayed or
local.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Final, cast

from ..config.model import BODY_MATCH_LIMIT
from ..routing import MEMO_URL, REFUSE
from . import http as h
from .answers import Answers
from .clientstate import (
    P_BUFFER,
    P_PIPELINE,
    P_UPGRADE,
    logger,
)
from .clock import clock
from .http import CRLF, ERRORS
from .proxyproto import Addresses, connection_addresses
from .proxyproto import build as build_proxy_header
from .request import Request
from .service import FAST_DIRECT, FAST_ROUTE, M_DIRECT, M_REDIRECT, M_SWITCH, ROUTE_MEMO_SIZE

if TYPE_CHECKING:
    from .balancer import Backend
    from .connpool import ConnPool
    from .service import Target
    from .upstream import UpstreamConnection

_CONTINUE: Final = b"HTTP/1.1 100 Continue\r\n\r\n"


class Exchange(Answers):
    """The client connection's requests, from dispatch to the end of their answers."""

    __slots__ = ()

    # The client as a PROXY protocol header named it, or None (client.py's slot).
    addrs: Addresses | None

    # -- dispatch -----------------------------------------------------------------------------

    def _start(self, req: Request) -> None:
        """Send `req` where its VS says: the one dispatch, as soon as its head is read or when it
        leaves the queue."""
        req.started = True
        svc = req.svc
        svc.counters.requests += 1
        fast = svc.fast
        if fast == FAST_DIRECT and svc.direct is not None:
            self._serve(req, svc.direct, None)
            return
        if fast == FAST_ROUTE:
            self._route_now(req)
            return
        pre = svc.pre_router
        if pre is not None:
            idx = pre.route(req)
            if idx >= 0:
                self._serve(req, svc.pre_targets[idx], None)
                return
        mode = svc.mode
        if mode == M_DIRECT:
            target = svc.direct
            assert target is not None
            self._serve(req, target, None)
        elif mode == M_SWITCH:
            if svc.router.needs_body and not req.complete:
                req.waiting_route = True
                if req.expect and not req.v10:
                    req.sent_continue = True
                    self._write(_CONTINUE)
                return
            self._route_now(req)
        elif mode == M_REDIRECT:
            self._redirect(req, svc)
        else:  # M_ORDERED: the first SubVS with an available real server
            for t in svc.targets:
                bal = t.balancer
                if bal is not None and bal.any_available():
                    self._serve(req, t, None)
                    return
            self._local(req, svc.na)

    def _route_now(self, req: Request) -> None:
        req.waiting_route = False
        svc = req.svc
        router = svc.router
        if router.needs_body and req.chunks:
            body = b"".join(req.chunks)
            req.body = body[:BODY_MATCH_LIMIT]
        # router.route() split in two to count the deciding rule (route_with_rule without the
        # tuple): the index of the rule, then its outcome. A decision that is a function of the
        # request target alone is remembered.
        memo_by = router.memo_by
        if memo_by:
            key: object = req.url if memo_by == MEMO_URL else (req.host_b.lower(), req.url)
            memo = svc.memo
            i = memo.get(key, -1)
            if i < 0:
                i = router.decide(req)
                if len(memo) >= ROUTE_MEMO_SIZE:
                    memo.clear()
                memo[key] = i
        else:
            i = router.decide(req)
        svc.rule_hits[i] += 1
        idx = router.outcomes[i]
        if idx >= 0:
            self._serve(req, svc.targets[idx], None)
        elif idx == REFUSE:
            svc.counters.limits["refused_by_rule"] += 1
            self._local(req, ERRORS[403], close=True)
        else:
            self._local(req, svc.na)

    def _serve(self, req: Request, target: Target, exclude: Backend | None) -> None:
        """Send `req` to a real server of `target` other than `exclude` (a retry's)."""
        req.target = target
        gate = target.gate  # rate limits, compression (ratelimit.py): None unless configured
        if gate is not None and exclude is None:
            refused = gate.admit(self.src_ip, clock())
            if refused is not None:
                self._local(req, refused)
                return
            if not req.is_head and not req.v10:
                req.compress = gate.offer(req.fwd)
        bal = target.balancer
        if bal is None:
            target.counters.not_available += 1
            self._local(req, target.na)
            return
        backend = bal.pick(self.src_ip, req.url.decode("latin-1") if target.needs_url else "",
                           exclude)
        if backend is None:
            if exclude is not None:  # a retry found no other server: the failure stands
                self._local(req, ERRORS[502], close=not req.complete)
                return
            target.counters.not_available += 1
            self._local(req, target.na)
            return
        req.backend = backend
        srv = target.pools[backend]
        req.server = srv  # counts the request; its address, preformatted, names it in logs
        if not req.head:
            edit = target.headers
            if edit is not None:  # header rules (headerrules.py)
                port = req.svc.port
                req.fwd = edit.request(req.fwd, self.ip_b, req.host_b, port)
                req.hresp = edit.response(self.ip_b, req.host_b, port)
            req.head = self._build_head(req)
        self._send(req, srv.cp, None)

    def _build_head(self, req: Request) -> bytes:
        svc = req.svc
        parts = req.fwd
        if svc.add_forwarded:
            if req.xff:
                parts += (b"X-Forwarded-For: ", req.xff, b", ", self.ip_b, CRLF)
            else:
                parts.append(self.xff_b)
            parts.append(svc.xfp_line)
            if req.host_b:
                parts += (b"X-Forwarded-Host: ", req.host_b, CRLF)
        if not req.host_b and req.backend is not None:
            # An HTTP/1.0 request without Host goes out as HTTP/1.1, which requires one.
            parts.append(f"Host: {req.backend.address}\r\n".encode())
        if req.chunked:
            parts.append(b"Transfer-Encoding: chunked\r\n")
        if req.upgrade:
            parts += (b"Connection: upgrade\r\nUpgrade: ", req.upgrade_b, CRLF)
        parts.append(CRLF)
        return b"".join(parts)

    def attach(self, req: Request, up: UpstreamConnection[Request]) -> None:
        """A connection opened for `req` is ready (ConnPool.connect): send `req` on it, unless
        the request was given up meanwhile (then the connection is kept for another)."""
        if self.closed or req is not self.cur:
            up.pool.release(up, clock())
            self._release(req, True)
            return
        pp = up.pool.send_proxy
        if pp and not up.pp_key:  # a new connection to a real server that wants the PROXY
            up.pp_key = header = self.proxy_header(pp)  # protocol: its header first
            up.write(header)
        self._send(req, cast("ConnPool", up.pool), up)  # the pool that opened it

    def proxy_header(self, version: int) -> bytes:
        """The PROXY header (proxyproto.py) that names this client to a real server."""
        return build_proxy_header(version, self.addrs or connection_addresses(self.transport))

    def _send(self, req: Request, pool: ConnPool,
              up: UpstreamConnection[Request] | None) -> None:
        """Send `req` to `pool`'s real server on `up`, or else on an idle connection, or else on
        a new one once it is open (then `attach` comes back here with it): the one place an
        exchange is bound to an upstream connection and its head (with any body read so far)
        goes out."""
        now = clock()
        log = req.svc.log
        timed = log is not None and log.timed  # the log shows upstream timings (Request.t_up)
        if up is None:
            if timed:
                req.t_up = now
                req.t_conn = 0.0
            up = pool.acquire(now)
            if up is None:
                if timed:
                    req.t_conn = -1.0
                pool.connect(self, req, req.svc.t_connect)
                return
        elif timed:
            req.t_conn = now  # a connection opened for it (attach)
        req.up = up
        t = up.start(self, req)
        if not req.has_body and not req.expect:
            # The common shape, a head alone: held with the loop iteration's other writes.
            self.outbox.add(t, req.head)
            self._wait_first_byte(req, now)
            return
        if req.expect and not req.sent_continue and not req.v10 and not req.complete:
            req.sent_continue = True
            self._write(_CONTINUE)
        data = req.head
        chunks = req.chunks
        if chunks:
            parts = [data]
            if req.chunked:
                for c in chunks:
                    parts += (b"%x\r\n" % len(c), c, CRLF)
            else:
                parts += chunks
            req.chunks = []
            req.buffered = 0
            if req.complete and req.chunked:
                parts.append(b"0\r\n\r\n")
            data = b"".join(parts)
            self.resume(P_BUFFER)
        elif req.complete and req.chunked:
            data += b"0\r\n\r\n"
        self._up_send(up, data)
        if req.complete:
            self._wait_first_byte(req, now)
        else:
            # The first-byte wait starts once the whole request went out (on_message_complete);
            # until then the client has t_body between reads, within the request timeout.
            self._await_body(req)

    def _up_send(self, up: UpstreamConnection[Request], data: bytes) -> None:
        if self.feeding:
            if self.out_up is not up:
                self._flush_out()
                self.out_up = up
            self.out.append(data)
        else:
            up.write(data)

    def _flush_out(self) -> None:
        out = self.out
        up = self.out_up
        self.out_up = None
        if out:
            self.out = []
            if up is not None:
                up.write(out[0] if len(out) == 1 else b"".join(out))

    # -- the upstream side's callbacks (contract.ClientForUpstream) ----------------------------

    def first_byte(self, req: Request) -> None:
        log = req.svc.log
        if log is not None and log.timed:
            req.t_hdr = clock()
        if req is self.cur:
            self._wait_response(req)

    def upstream_failed(self, req: Request, why: str, retry_ok: bool) -> None:
        if req is not self.cur or self.closed:
            self._release(req, True)
            return
        req.up = None
        if req.resp_started:
            logger.warning("VS %s: real server %s failed mid-response: %s", self.listener.name,
                           server_name(req), why)
            self._release(req, False)
            self._abort_mid_response(req)
            return
        if (retry_ok and req.attempts < 1 and req.body_bytes == 0 and req.complete
                and req.server is not None):
            # A pooled connection the server had closed: resend on a fresh one.
            req.attempts += 1
            self._send(req, req.server.cp, None)
            return
        logger.warning("VS %s: real server %s failed: %s", self.listener.name, server_name(req),
                       why)
        self._release(req, False)
        self._local(req, ERRORS[502], close=not req.complete)

    def connect_failed(self, req: Request, why: str, timed_out: bool = False) -> None:
        backend = req.backend
        target = req.target
        if req is not self.cur or self.closed or backend is None or target is None:
            self._release(req, True)
            return
        if timed_out:
            self.listener.counters.limits["upstream_timeout"] += 1
        logger.warning("VS %s: %s", self.listener.name, why)
        self._release(req, False)
        if req.attempts < 1 and req.method_b in h.IDEMPOTENT:
            req.attempts += 1
            self._serve(req, target, backend)
            return
        self._local(req, ERRORS[502], close=not req.complete)

    def start_tunnel(self, req: Request, up: UpstreamConnection[Request]) -> None:
        now = clock()
        self._release(req, True)
        self._record(req, now)
        self.cur = None
        self.tunnel = up
        raw, self.raw = self.raw, None
        for chunk in raw or ():
            up.write(chunk)
        self._wait_tunnel(now)
        self.resume(P_UPGRADE | P_PIPELINE)

    def tunnel_closed(self) -> None:
        self.tunnel = None
        if not self.closed:
            self._close()


def server_name(req: Request) -> str:
    """How log lines name the real server of `req`."""
    b = req.server
    return str(b.address) if b is not None else "-"
