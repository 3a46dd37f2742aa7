"""HTTP/2 to clients: the session that speaks HTTP/2 (h2 for framing and HPACK) and owns flow
control, stream limits and the defences against HTTP/2's known attacks. Each stream is relayed as
one HTTP/1.1 exchange (h2stream.py).

A connection whose TLS handshake chose "h2" (alpn.py, `ALPNClientConnection`) hands its transport
to an `H2Session`; only such connections run any code of this module.

Limits (per VS, [vs.http2_limits]; counted in `limit_rejections` under the key given):
- streams open at once: max_concurrent_streams (SETTINGS_MAX_CONCURRENT_STREAMS, 100); a client
  that opens more gets GOAWAY PROTOCOL_ERROR (h2); h2_protocol_error
- decoded header list: max_header_list_size (SETTINGS_MAX_HEADER_LIST_SIZE, 32 KiB; HPACK bombs):
  GOAWAY ENHANCE_YOUR_CALM/PROTOCOL_ERROR; h2_protocol_error. The HTTP/1.1 head made of it is
  still held to max_header_bytes/max_headers (431 on the stream).
- compressed header block over HEADERS + CONTINUATION: max_header_block (32 KiB; CONTINUATION
  flood; h2 also stops at 64 CONTINUATION frames): GOAWAY ENHANCE_YOUR_CALM; h2_flood
- a malformed request (RFC 9113 §8.1.1, h2stream.malformed: upper case or invalid names, bad
  values, connection-specific fields, pseudo-headers missing, unknown, repeated, after a regular
  field or in trailers): RST_STREAM PROTOCOL_ERROR on its stream, the others go on;
  h2_protocol_error. Those resets count toward max_resets with the client's own (MadeYouReset).
  A Content-Length that is invalid, repeated with another value or unlike the DATA received is
  h2's stream-state check and stays a connection error (GOAWAY PROTOCOL_ERROR).
- streams reset by the client before their response ended: max_resets at once, draining at
  max_resets/10 per second (rapid reset, CVE-2023-44487): GOAWAY ENHANCE_YOUR_CALM; h2_rapid_reset
- SETTINGS, PING, PRIORITY, small WINDOW_UPDATE and empty DATA frames: max_control_frames at once,
  draining at a tenth per second: GOAWAY ENHANCE_YOUR_CALM; h2_flood
- our unsent bytes to a client that does not read (PING/SETTINGS acknowledgements pile up): 4 MiB:
  abort; h2_flood
- flow control: the client may send stream_window (256 KiB) per stream and connection_window
  (1 MiB) per connection ahead of what the real server took; we send DATA only within the
  client's windows and hold at most HIGH_WATER (h2stream.py) per stream before pausing its real
  server.
- idle connection (no stream open): the VS's idle timeout, then GOAWAY; before the first request,
  the head timeout.
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING, Final, cast

import h2.config
import h2.connection
import h2.events
import h2.exceptions
import h2.settings
from h2.errors import ErrorCodes
from hyperframe.frame import GoAwayFrame

from .client import ClientConnection
from .h2frames import BoundedFrameBuffer, Calm, Decoder
from .h2stream import HIGH_WATER, LOW_WATER, BadRequest, H2Stream, malformed, request_head
from .http import error_response

if TYPE_CHECKING:
    from ..config.model import HTTP2Limits

logger = logging.getLogger(__name__)

# Unsent bytes to a client above which it is taken for one that reads nothing (abort).
MAX_UNSENT: Final = 4 * 1024 * 1024


class _Leaky:
    """A leaky bucket: `hit` adds one and says whether the level went over `cap` (it drains at
    cap/10 per second)."""

    __slots__ = ("level", "t")

    def __init__(self) -> None:
        self.level = 0.0
        self.t = 0.0

    def hit(self, now: float, cap: int) -> bool:
        self.level = max(0.0, self.level - (now - self.t) * cap / 10) + 1
        self.t = now
        return self.level > cap


class StreamConnection(ClientConnection):
    """The HTTP/1.1 side of one HTTP/2 stream (h2stream.py): a ClientConnection whose requests
    say they came over HTTP/2 (the access log shows HTTP/2.0)."""

    __slots__ = ()

    def on_url(self, url: bytes) -> None:
        first = self.req is None
        super().on_url(url)
        req = self.req
        if first and req is not None:
            req.h2 = True


class H2Session(asyncio.Protocol):
    """One HTTP/2 connection: frames in and out through h2, its streams (H2Stream) and limits."""

    def __init__(self, owner: ClientConnection, transport: asyncio.Transport) -> None:
        """`owner`: the connection that accepted the client (alpn.ALPNClientConnection), its
        handle in the listener."""
        self.owner = owner
        self.transport = transport
        self.loop = owner.loop
        self.listener = owner.listener
        self.limits: HTTP2Limits = owner.listener.service.vs.http2_limits
        self.conn = h2.connection.H2Connection(h2.config.H2Configuration(
            # Header lists are checked by h2stream.malformed: a stream error, not h2's
            # connection error (RFC 9113 §8.1.1).
            client_side=False, header_encoding=None, validate_inbound_headers=False,
            normalize_inbound_headers=True, validate_outbound_headers=False,
            normalize_outbound_headers=False))
        self.streams: dict[int, H2Stream] = {}
        self.scheduled = False
        self.write_paused = False
        self.closing = False  # GOAWAY sent: no new streams; closes when the last one ends
        self.dead = False
        self.last_sid = 0
        self.idle_since = self.loop.time()
        self.resets = _Leaky()
        self.control = _Leaky()

    # -- setup and teardown ---------------------------------------------------------------------

    def start(self) -> None:
        lim = self.limits
        conn = self.conn
        buf = BoundedFrameBuffer(server=True)
        buf.max_block = lim.max_header_block
        conn.incoming_buffer = buf
        conn.local_settings = h2.settings.Settings(client=False, initial_values={
            h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS: lim.max_concurrent_streams,
            h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: lim.stream_window,
            h2.settings.SettingCodes.MAX_HEADER_LIST_SIZE: lim.max_header_list_size,
        })
        conn.decoder = Decoder()
        conn.decoder.max_header_list_size = lim.max_header_list_size
        conn.initiate_connection()
        if lim.connection_window > 65_535:
            conn.increment_flow_control_window(lim.connection_window - 65_535)
        self.flush()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        pass  # handed over after the handshake (ALPNClientConnection)

    def connection_lost(self, exc: Exception | None) -> None:
        self.dead = True
        streams, self.streams = self.streams, {}
        for s in streams.values():
            s.ended = True
            self._client_gone(s)
        self.owner.connection_lost(exc)

    def eof_received(self) -> bool | None:
        return False

    def pause_writing(self) -> None:
        self.write_paused = True

    def resume_writing(self) -> None:
        self.write_paused = False
        for s in list(self.streams.values()):
            self.push(s)

    def goaway(self, code: ErrorCodes) -> None:
        """Tell the client no new stream will be served; close once the open ones end."""
        if not self.closing and not self.dead:
            self.closing = True
            frame = GoAwayFrame(0, last_stream_id=self.last_sid, error_code=code)
            self.flush()
            self.transport.write(frame.serialize())
        if not self.streams:
            self._close()

    def _close(self) -> None:
        if not self.dead:
            self.flush()
            self.owner.closing = True
            self.transport.close()

    def _fail(self, key: str, code: ErrorCodes, why: str) -> None:
        """A connection error: GOAWAY `code`, every stream cut, the connection closed."""
        self.listener.counters.limits[key] += 1
        logger.info("VS %s: HTTP/2 client %s: %s; closing", self.listener.name,
                    self.owner.src_ip, why)
        if not self.dead:
            try:
                self.conn.close_connection(code, last_stream_id=self.last_sid)
            except h2.exceptions.H2Error:
                pass
            self.flush()
            self.transport.close()
            self.dead = True
        streams, self.streams = self.streams, {}
        for s in streams.values():
            s.ended = True
            self._client_gone(s)

    # -- deadlines (through the owner, in the listener's sweep) ---------------------------------

    def on_timeout(self, now: float) -> None:
        owner = self.owner
        owner._no_deadline()
        if self.streams:
            return
        self.listener.counters.limits["idle_timeout" if self.last_sid else "head_timeout"] += 1
        self.goaway(ErrorCodes.NO_ERROR)

    def shutdown(self) -> None:
        self.goaway(ErrorCodes.NO_ERROR)

    def waiting_since(self) -> float:
        if self.streams or self.closing or self.dead:
            return float("inf")
        return self.idle_since

    def _idle(self) -> None:
        now = self.loop.time()
        self.idle_since = now
        if self.closing:
            self._close()
        else:
            self.owner._wait_idle(now)

    # -- frames in ------------------------------------------------------------------------------

    def data_received(self, data: bytes) -> None:
        if self.dead:
            return
        try:
            events = self.conn.receive_data(data)
        except Calm as e:
            self._fail("h2_flood", ErrorCodes.ENHANCE_YOUR_CALM, str(e))
            return
        except h2.exceptions.ProtocolError as e:
            code = e.error_code if isinstance(e.error_code, ErrorCodes) else \
                ErrorCodes.PROTOCOL_ERROR
            self._fail("h2_protocol_error", code, str(e) or type(e).__name__)
            return
        now = self.loop.time()
        lim = self.limits
        for ev in events:
            if self.dead:
                return
            if isinstance(ev, h2.events.DataReceived):
                s = self.streams.get(ev.stream_id)
                if not ev.data and not ev.stream_ended and self.control.hit(
                        now, lim.max_control_frames):
                    self._fail("h2_flood", ErrorCodes.ENHANCE_YOUR_CALM, "empty DATA flood")
                    return
                if s is None:
                    self.ack(ev.stream_id, ev.flow_controlled_length)
                else:
                    s.feed(ev.data, ev.flow_controlled_length)
            elif isinstance(ev, h2.events.RequestReceived):
                self._request(ev.stream_id, ev.headers or [], ev.stream_ended is not None, now)
            elif isinstance(ev, h2.events.TrailersReceived):
                why = malformed(ev.headers or [], trailers=True)
                if why is not None:  # (valid trailers are not relayed: HTTP/1.1 side, chunked)
                    self._malformed(ev.stream_id, why, now)
            elif isinstance(ev, h2.events.StreamEnded):
                s = self.streams.get(ev.stream_id)
                if s is not None and not s.req_done:
                    s.end_request()
            elif isinstance(ev, h2.events.StreamReset):
                s = self.streams.pop(ev.stream_id, None)
                if s is not None:
                    if not s.ended and self.resets.hit(now, lim.max_resets):
                        self._fail("h2_rapid_reset", ErrorCodes.ENHANCE_YOUR_CALM,
                                   "too many streams reset")
                        return
                    s.ended = True
                    self._client_gone(s)
                    if not self.streams:
                        self._idle()
            elif isinstance(ev, h2.events.WindowUpdated):
                if ev.delta < 1024 and self.control.hit(now, lim.max_control_frames):
                    self._fail("h2_flood", ErrorCodes.ENHANCE_YOUR_CALM, "WINDOW_UPDATE flood")
                    return
                targets = (list(self.streams.values()) if ev.stream_id == 0
                           else [s for s in (self.streams.get(ev.stream_id),) if s is not None])
                for s in targets:
                    self.push(s)
            elif isinstance(ev, (h2.events.PingReceived, h2.events.RemoteSettingsChanged,
                                 h2.events.PriorityUpdated)):
                if self.control.hit(now, lim.max_control_frames):
                    self._fail("h2_flood", ErrorCodes.ENHANCE_YOUR_CALM,
                               f"{type(ev).__name__} flood")
                    return
            elif isinstance(ev, h2.events.ConnectionTerminated):
                self.dead = True
                self.flush()
                self.transport.close()
                return
        self.flush()

    def _request(self, sid: int, headers: list[tuple[bytes, bytes]], end: bool,
                 now: float) -> None:
        self.last_sid = max(self.last_sid, sid)
        if self.closing:
            self._send_reset(sid, ErrorCodes.REFUSED_STREAM)
            return
        why = malformed(headers)
        if why is not None:
            self._malformed(sid, why, now)
            return
        try:
            head, chunked, length = request_head(headers, end)
        except BadRequest as e:
            self.listener.counters.limits["bad_request"] += 1
            logger.debug("HTTP/2 bad request from %s: %s", self.owner.src_ip, e)
            self._answer(sid, 400)
            return
        method = next((v for k, v in headers if k == b":method"), b"")
        s = H2Stream(self, sid, method == b"HEAD", chunked, length)
        s.req_done = end
        if not self.streams:
            self.owner._no_deadline()
        self.streams[sid] = s
        conn = StreamConnection(self.listener)
        s.conn = conn
        conn.connection_made(cast(asyncio.Transport, s))
        if s.closed:
            return
        if self.owner.addrs is not None:  # a PROXY header named the client (tlsserver.py)
            conn.proxied(self.owner.addrs)
        # Its own connection's count is this one's (an HTTP/2 connection counts once).
        self.listener.counters.connections -= 1
        conn.data_received(head)

    def _malformed(self, sid: int, why: str, now: float) -> None:
        """A malformed request (RFC 9113 §8.1.1): RST_STREAM PROTOCOL_ERROR on its stream, the
        others go on. Resets we are made to send count with the client's own (MadeYouReset)."""
        self.listener.counters.limits["h2_protocol_error"] += 1
        logger.debug("HTTP/2 malformed request from %s on stream %d: %s", self.owner.src_ip, sid,
                     why)
        if self.resets.hit(now, self.limits.max_resets):
            self._fail("h2_rapid_reset", ErrorCodes.ENHANCE_YOUR_CALM,
                       "too many malformed requests")
            return
        s = self.streams.get(sid)
        if s is not None:
            self.reset(s, ErrorCodes.PROTOCOL_ERROR)
        else:
            self._send_reset(sid, ErrorCodes.PROTOCOL_ERROR)

    def _answer(self, sid: int, status: int) -> None:
        """A response of our own on a stream that never reached the HTTP/1.1 side."""
        resp = error_response(status)
        try:
            self.conn.send_headers(sid, [(b":status", b"%d" % status),
                                         (b"content-type", b"text/html"),
                                         (b"content-length", b"%d" % len(resp.body))])
            self.conn.send_data(sid, resp.body, end_stream=True)
        except h2.exceptions.H2Error:
            self._send_reset(sid, ErrorCodes.PROTOCOL_ERROR)

    def _send_reset(self, sid: int, code: ErrorCodes) -> None:
        try:
            self.conn.reset_stream(sid, code)
        except h2.exceptions.H2Error:
            pass

    def ack(self, sid: int, flow: int) -> None:
        """`flow` bytes of request body were taken: the client may send as much again."""
        if flow > 0 and not self.dead:
            try:
                self.conn.acknowledge_received_data(flow, sid)
            except h2.exceptions.H2Error:
                # The stream is gone: give the connection's window back all the same.
                try:
                    self.conn.acknowledge_received_data(flow, 0)
                except (h2.exceptions.H2Error, ValueError):
                    pass
            self.schedule()

    # -- the streams' side ----------------------------------------------------------------------

    def _client_gone(self, s: H2Stream) -> None:
        """The client reset `s` or the connection went: its ClientConnection loses its client."""
        s.out = []
        s.out_size = 0
        if not s.closed:
            s.closed = True
            s.drop_input()
            conn = s.conn
            if conn is not None:
                conn.connection_lost(None)

    def conn_done(self, s: H2Stream) -> None:
        """The ClientConnection of `s` closed its transport: it hears so in the next iteration,
        as from a real transport."""
        conn = s.conn
        if conn is not None:
            self.loop.call_soon(conn.connection_lost, None)
        self._forget(s)

    def _forget(self, s: H2Stream) -> None:
        if s.ended and s.closed and self.streams.get(s.sid) is s:
            del self.streams[s.sid]
            if not self.streams:
                self._idle()

    def send_headers(self, s: H2Stream, status: int, headers: list[tuple[bytes, bytes]],
                     end: bool) -> None:
        if s.ended or self.dead:
            return
        try:
            self.conn.send_headers(s.sid, [(b":status", b"%d" % status), *headers],
                                   end_stream=end)
        except h2.exceptions.H2Error:
            self.reset(s, ErrorCodes.INTERNAL_ERROR)
            return
        if end:
            self._ended(s)
        self.schedule()

    def push(self, s: H2Stream) -> None:
        """Send what `s` holds, within the windows, and its end once all went."""
        if s.ended or self.dead:
            return
        conn = self.conn
        ended = False
        if s.out and not self.write_paused:
            data = s.out[0] if len(s.out) == 1 else b"".join(s.out)
            pos = 0
            size = len(data)
            done = s.msg_done
            try:
                window = conn.local_flow_control_window(s.sid)
                frame = conn.max_outbound_frame_size
                while pos < size and window > 0:
                    n = min(window, frame, size - pos)
                    pos += n
                    # The last DATA of a whole response carries END_STREAM (no empty frame more).
                    ended = done and pos == size
                    conn.send_data(s.sid, data[pos - n:pos], end_stream=ended)
                    window -= n
            except h2.exceptions.H2Error:
                self.reset(s, ErrorCodes.INTERNAL_ERROR)
                return
            s.out = [data[pos:]] if pos < size else []
            s.out_size = size - pos
        if not s.out and s.msg_done:
            if not ended:
                try:
                    conn.end_stream(s.sid)
                except h2.exceptions.H2Error:
                    pass
            self._ended(s)
        else:
            c = s.conn
            if s.out_size > HIGH_WATER and not s.up_paused and c is not None and not s.closed:
                s.up_paused = True
                c.pause_writing()
            elif s.up_paused and s.out_size < LOW_WATER and c is not None and not s.closed:
                s.up_paused = False
                c.resume_writing()
        self.schedule()

    def _ended(self, s: H2Stream) -> None:
        """The response on `s` went out whole."""
        s.ended = True
        if not s.req_done:
            # Answered before the request body ended: the client may stop sending it (§8.1).
            self._send_reset(s.sid, ErrorCodes.NO_ERROR)
            s.req_done = True
        self._forget(s)

    def reset(self, s: H2Stream, code: ErrorCodes) -> None:
        """End `s` with RST_STREAM `code` (and cut its exchange if it is still going)."""
        if not s.ended:
            s.ended = True
            self._send_reset(s.sid, code)
            self.schedule()
        if not s.closed:
            self.streams.pop(s.sid, None)
            self._client_gone(s)
            if not self.streams:
                self._idle()
        else:
            self._forget(s)

    # -- frames out -----------------------------------------------------------------------------

    def schedule(self) -> None:
        """Flush h2's output at the end of this loop iteration (once, however many streams)."""
        if not self.scheduled:
            self.scheduled = True
            self.loop.call_soon(self.flush)

    def flush(self) -> None:
        self.scheduled = False
        data = self.conn.data_to_send()
        if data and not self.dead:
            t = self.transport
            self.owner.outbox.write(t, data)
            if t.get_write_buffer_size() > MAX_UNSENT:
                self._fail("h2_flood", ErrorCodes.ENHANCE_YOUR_CALM, "client reads nothing")
                t.abort()
