"""Where a parsed request goes and how its exchange ends: dispatch (rules, balancer, pool), the
upstream side's callbacks, local answers, and the queue of pipelined requests.

One path per step whichever way a request came: `_start` dispatches (the VS kinds `Service.fast`
names first), `_serve` picks the real server (`Balancer.pick`), `_send` binds the request to an
upstream connection (`ConnPool.acquire`, or `ConnPool.connect` whose callback `attach` comes back
to it) and sends its head, and `response_done` ends every answered request, relayed or local.
"""

from __future__ import annotations

from time import monotonic
from typing import TYPE_CHECKING, cast

from ..config.model import BODY_MATCH_LIMIT
from ..routing import MEMO_URL, REFUSE
from . import http as h
from .clientstate import (
    P_BUFFER,
    P_PIPELINE,
    P_STOP,
    P_UPGRADE,
    P_UPSTREAM,
    ClientState,
    logger,
)
from .http import CRLF, ERRORS, LocalResponse
from .proxyproto import Addresses, connection_addresses
from .proxyproto import build as build_proxy_header
from .request import Request
from .service import FAST_DIRECT, FAST_ROUTE, M_DIRECT, M_REDIRECT, M_SWITCH, ROUTE_MEMO_SIZE

if TYPE_CHECKING:
    from .balancer import Backend
    from .connpool import ConnPool
    from .service import Service, Target
    from .upstream import UpstreamConnection

_CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"


class Exchange(ClientState):
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
            refused = gate.admit(self.src_ip, self.loop.time())
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
            up.pool.release(up, self.loop.time())
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
        now = self.loop.time()
        log = req.svc.log
        timed = log is not None and log.timed  # the log shows upstream timings (Request.t_up)
        if up is None:
            if timed:
                req.t_up = monotonic()
                req.t_conn = 0.0
            up = pool.acquire(now)
            if up is None:
                if timed:
                    req.t_conn = -1.0
                pool.connect(self, req, req.svc.t_connect)
                return
        elif timed:
            req.t_conn = monotonic()  # a connection opened for it (attach)
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
            req.t_hdr = monotonic()
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
        now = self.loop.time()
        self._release(req, True)
        self._record(req)
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

    # -- answers and the end of a request -----------------------------------------------------

    def _local(self, req: Request, resp: LocalResponse, close: bool = False) -> None:
        keep = req.keep_alive and not close and not self.closing
        if keep and not req.complete and req.expect and not req.sent_continue:
            keep = False  # the client waits for 100 before sending a body we never asked for
        req.keep_alive = keep
        if req.is_head:
            data = (resp.keep10 if req.v10 else resp.keep) if keep else resp.close
            req.hlen = len(data)
        elif keep:
            data = resp.keep_full if not req.v10 else resp.keep10 + resp.body
            req.resp_bytes = len(resp.body)
            req.hlen = len(data) - req.resp_bytes
        else:
            data = resp.close_full
            req.resp_bytes = len(resp.body)
            req.hlen = len(data) - req.resp_bytes
        req.status = resp.status
        req.resp_started = True
        if req.t_up:
            req.t_hdr = -1.0  # the exchange with a real server ended in a local answer
        self.outbox.add(self.transport, data)  # held like a relayed response (outbox.py)
        self.response_done(req)

    def _redirect(self, req: Request, svc: Service) -> None:
        host = req.host_b.decode("latin-1")
        hostname, port = _split_host(host, svc.port)
        url = req.url.decode("latin-1")
        try:
            location = svc.redirect_to.format(host=host, hostname=hostname, port=port, path=url)
        except (KeyError, IndexError, ValueError):
            self._local(req, ERRORS[500])
            return
        if "\r" in location or "\n" in location:
            self._local(req, ERRORS[400], close=True)
            return
        resp = LocalResponse(svc.redirect_status, b"", "", (("Location", location),
                                                            *svc.local_extra))
        self._local(req, resp)

    def response_done(self, req: Request) -> None:
        """The response to `req` went out whole, relayed or answered here: the one end of an
        answered request. The real server it held is released (it did not fail there), the
        request is counted and logged, and the connection waits for the next one (at once in the
        common case, else through `_finish_slow`)."""
        if req.backend is not None:
            self._release(req, True)
        now = self.loop.time()
        self._record(req)
        if req is self.cur:
            self.cur = None
        # A request without a body answered from its head (a local answer) is not `complete`
        # yet, but llhttp ends it in this same callback chain: nothing of it is left to discard.
        if (self.paused or not req.keep_alive or self.closing or self.queue or self.in_head
                or (not req.complete and (req.has_body or req.rebody))):
            self._finish_slow(req)
            return
        self._keep_alive(now)

    def _finish_slow(self, req: Request) -> None:
        if self.paused & P_UPSTREAM:
            self.resume(P_UPSTREAM)
        if not req.keep_alive or self.closing or (self.eof and not self.queue):
            self.pause(P_STOP)
            if not self.closed:
                self._close()
            return
        if not req.complete:
            # Answered before the body was read (not available, redirect, early response): read
            # and discard the rest so the connection stays usable.
            req.discard = True
            req.chunks = []
            self.resume(P_BUFFER)
        if not self.running:
            self._run_queue()

    def _run_queue(self) -> None:
        self.running = True
        try:
            queue = self.queue
            while self.cur is None and queue:
                req = queue.pop(0)
                self.cur = req
                self._start(req)
                if self.closed:
                    return
        finally:
            self.running = False
        if not self.queue:
            self.resume(P_PIPELINE)
        if self.cur is None:
            if self.pending_error:
                status, self.pending_error = self.pending_error, 0
                self._write_error_and_close(status)
                return
            now = self.loop.time()
            if self.in_head:
                self._wait_head(now)
            else:
                self._keep_alive(now)

    def _cut(self, req: Request, status: int, key: str) -> None:
        """End the exchange of `req` (the one being answered) early: its upstream connection is
        aborted; the client gets `status` and a close, or an abort if its response had begun."""
        self.listener.counters.limits[key] += 1
        self._drop_upstream(req)
        self._release(req, True)
        if self.req is req:
            self.req = None
        if req.resp_started:
            self._abort_mid_response(req)
        else:
            self._local(req, ERRORS[status], close=True)

    def _abort_mid_response(self, req: Request) -> None:
        """The response to `req` cannot be finished: log it as cut and abort the connection."""
        self._finish_cut(req)
        self.pause(P_STOP)
        self.transport.abort()

    def _finish_cut(self, req: Request) -> None:
        """Count and log a request whose response did not go out whole (marked in the log)."""
        if req.cut:
            return
        req.cut = True
        self._record(req)
        if req is self.cur:
            self.cur = None

    def _bad(self, status: int, key: str) -> None:
        """A request that cannot be served (malformed, too big, too slow): answer `status`, count
        it under the limit `key`, and close."""
        self.listener.counters.limits[key] += 1
        self.pause(P_STOP)
        self.closing = True
        bad = self.req
        cur = self.cur
        if bad is not None and bad is cur and bad.started:
            self._drop_upstream(bad)
            self._release(bad, True)
            if bad.resp_started:
                self._abort_mid_response(bad)
                return
            self.cur = None
            self._write_error_and_close(status, bad)
            return
        if bad is not None and self.queue and self.queue[-1] is bad:
            self.queue.pop()
        if cur is None and not self.queue:
            self._write_error_and_close(status)
        else:
            self.pending_error = status

    def _write_error_and_close(self, status: int, req: Request | None = None) -> None:
        resp = ERRORS[status]
        now = self.loop.time()
        if req is None:
            svc = self.listener.service
            req = Request(svc, self.src_ip, now, b"-")
            req.method_b = b"-"
            svc.counters.requests += 1
        req.status = status
        req.resp_bytes = len(resp.body)
        req.hlen = len(resp.close_full) - req.resp_bytes
        if not self.closed:
            self._write(resp.close_full)
            self._close()
        self._record(req)


def server_name(req: Request) -> str:
    """How log lines name the real server of `req`."""
    b = req.server
    return str(b.address) if b is not None else "-"


def _split_host(host: str, default_port: int) -> tuple[str, str]:
    if host.startswith("["):
        end = host.find("]")
        name = host[:end + 1]
        rest = host[end + 1:]
        return name, rest[1:] if rest.startswith(":") else str(default_port)
    name, sep, port = host.rpartition(":")
    if sep and port.isdigit():
        return name, port
    return host, str(default_port)
