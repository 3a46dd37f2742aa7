"""How a request's answer ends: local answers (errors, "not available", redirects), the one end of
every answered request (`response_done`: release, count and log, wait for the next), requests cut
short, and the queue of pipelined requests. A layer of the client connection (clientstate.py)
under exchange.py, which dispatches.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .clientstate import P_BUFFER, P_PIPELINE, P_STOP, P_UPSTREAM, ClientState
from .clock import clock
from .http import ERRORS, LocalResponse
from .request import Request

if TYPE_CHECKING:
    from .service import Service


class Answers(ClientState):
    """The client connection's answers and the end of its requests."""

    __slots__ = ()

    def _start(self, req: Request) -> None:
        """Dispatch `req` (exchange.py, the layer above, which _run_queue calls through)."""
        raise NotImplementedError

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
        now = clock()
        self._record(req, now)
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
            now = clock()
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
        self._record(req, clock())
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
        now = clock()
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
        self._record(req, now)


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
