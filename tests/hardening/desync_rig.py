"""Runs one case of the desync table (desync_cases.py) against a proxy and gives its verdict;
shared by tests/hardening/test_desync.py, test_poisoning.py and bench/smuggling.py.

`Upstream` is the real server behind the proxy: it reads every request strictly (desync_http.py)
and answers each with its own target (X-Target and body), a case's scripted bytes, or a WebSocket
101 and an echo; a request smuggled in a body (target /smuggled...) is answered only when the next
request arrives on its connection, so a proxy that let it through hands that answer to the next
request it sends there, as a slower real server would at random.

`run_case` sends a case on a fresh connection, then a probe request on the same connection and one
from the next client (which a proxy with one real server sends on the pooled upstream connection),
and `judge` classifies what both ends saw:
- desync: a response from the real server reached a request that is not the one it answers;
- ambiguous: what the real server read is not one of the case's safe readings or could be read
  two ways (framing, obs-fold, Connection naming framing fields, h2c, ...), or it still waits for
  the rest of a message the proxy has finished with, or the client got a response other than the
  real server's, or one that can be read two ways;
- rejected: nothing reached the real server whole (request cases), or the client got the proxy's
  own answer instead of the real server's (response cases);
- forwarded: the real server read one of the safe readings and the client got its answer.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from .desync_cases import (
    AMBIGUOUS,
    DESYNC,
    FORWARDED,
    REJECTED,
    SMUGGLED,
    Case,
    Seen,
    case_paths,
)
from .desync_http import (
    Got,
    Reader,
    Received,
    Unparsable,
    close,
    parse_head,
    parse_request,
    send,
)

PROBE = b"/probe-"
_WS_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"  # RFC 6455 §1.3
ECHO = b"echo through the tunnel"


def probe_request(path: bytes) -> bytes:
    return b"GET " + path + b" HTTP/1.1\r\nHost: example.com\r\n\r\n"


def answer_for(target: bytes) -> bytes:
    """The real server's answer to a plain request: its own target, in a field and as the body."""
    return (b"HTTP/1.1 200 OK\r\nX-Target: " + target + b"\r\nContent-Length: %d\r\n\r\n"
            % len(target) + target)


@dataclass
class _Conn:
    touched: set[str] = field(default_factory=set)  # cases during which bytes came
    probed: set[str] = field(default_factory=set)  # cases whose probe it read
    open: bool = True
    partial: bool = False  # it holds the start of a request whose end has not come


class Upstream:
    """The real server: records what it read under the name of the case being run (`case`)."""

    def __init__(self, scripts: Mapping[bytes, bytes] | None = None) -> None:
        self.scripts = dict(scripts or {})
        self.case = ""
        self.received: list[tuple[str, int, Received]] = []  # (case, connection, request)
        self.garbage: list[tuple[str, str]] = []  # (case, what could not be read)
        self.conns: list[_Conn] = []
        self.port = 0
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._changed = asyncio.Event()

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
        for t in self._tasks:
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    def _note(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()

    def read_during(self, case: str) -> list[Received]:
        """What was read while `case` ran, the probes left out."""
        return [r for c, _, r in self.received
                if c == case and not r.seen.target.startswith(PROBE)]

    def stuck(self, case: str) -> int:
        """Connections touched during `case` still open in the middle of a request: the proxy
        announced more than it sent (its own reading of the message ended earlier)."""
        return sum(case in c.touched and c.open and c.partial for c in self.conns)

    async def settle(self, case: str, within: float) -> bool:
        """Wait until every connection that got bytes during `case` is closed or has read one of
        its probes (then it has read all that came before it); False after `within` seconds."""
        return await self.wait_until(
            lambda: not any(case in c.touched and c.open and case not in c.probed
                            for c in self.conns), within)

    def open_partial(self) -> int:
        """Connections open in the middle of a request."""
        return sum(c.open and c.partial for c in self.conns)

    async def wait_until(self, done: Callable[[], bool], within: float) -> bool:
        """Wait until `done()` holds, checked at every read and close; False after `within`."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + within
        while not done():
            changed = self._changed
            try:
                async with asyncio.timeout(max(0.0, deadline - loop.time())):
                    await changed.wait()
            except TimeoutError:
                return False
        return True

    async def _serve(self, r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        conn = _Conn()
        self.conns.append(conn)
        n = len(self.conns) - 1
        buf = b""
        echo = False
        held: list[bytes] = []  # answers to smuggled requests, not written yet
        try:
            while data := await r.read(65536):
                conn.touched.add(self.case)
                if echo:
                    w.write(data)
                    continue
                buf += data
                while not echo:
                    try:
                        parsed = parse_request(buf)
                    except Unparsable as e:
                        self.garbage.append((self.case, f"unparsable: {e}"))
                        return
                    if parsed is None:
                        break
                    req, used = parsed
                    buf = buf[used:]
                    self.received.append((self.case, n, req))
                    if req.seen.target.startswith(PROBE):
                        conn.probed.add(self.case)
                    answer, echo = self._answer(req)
                    if req.seen.target in self.scripts and _says_close(answer):
                        w.write(b"".join(held) + answer)
                        return  # as it said
                    if req.seen.target.startswith(SMUGGLED):
                        # Answered when the next request comes: the worst case for the proxy's
                        # response queue, which a real server that is slower at it gives at
                        # random.
                        held.append(answer)
                        continue
                    w.write(b"".join(held) + answer)
                    held.clear()
                if echo and buf:
                    w.write(buf)
                    buf = b""
                conn.partial = bool(buf)
                self._note()
        except (OSError, asyncio.CancelledError):
            pass
        finally:
            conn.open = False
            w.close()
            self._tasks.discard(task)
            self._note()

    def _answer(self, req: Received) -> tuple[bytes, bool]:
        """The answer to `req`, and whether the connection is an echoing tunnel after it."""
        target = req.seen.target
        if target in self.scripts:
            return self.scripts[target], False
        h = req.head
        if (req.seen.method == b"GET" and b"websocket" in h.tokens(b"upgrade")
                and b"upgrade" in h.tokens(b"connection") and h.values(b"sec-websocket-key")):
            key = h.values(b"sec-websocket-key")[0]
            accept = base64.b64encode(hashlib.sha1(key + _WS_GUID).digest())
            return (b"HTTP/1.1 101 Switching Protocols\r\nX-Target: " + target
                    + b"\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: "
                    + accept + b"\r\n\r\n"), True
        if req.seen.method == b"HEAD":
            return answer_for(target)[:-len(target)], False
        return answer_for(target), False


def _says_close(answer: bytes) -> bool:
    try:
        h = parse_head(answer)
    except Unparsable:
        return False
    return h is not None and b"close" in h.tokens(b"connection")


@dataclass
class Outcome:
    case: Case
    got: list[Got]  # the responses on the case's connection
    same: Got | None  # the follow-up probe on that connection (None: not sent)
    next: Got  # the next client's probe
    received: list[Received]  # what the real server read during the case (probes left out)
    garbage: list[str]
    closed: bool  # the proxy closed the case's connection
    tunnel: bool | None = None  # a 101 with an echo case: whether the bytes came back
    stop: str = ""  # how the read after the last response ended ("timeout", "closed"), if it did
    stuck: int = 0  # the real server's connections left waiting for the rest of a request
    verdict: str = ""
    notes: list[str] = field(default_factory=list)

    def cell(self) -> str:
        """For a table: the verdict and the statuses the client got."""
        s = ",".join(str(g.status) for g in self.got) or "-"
        if self.stop == "timeout":
            s += " timeout"
        if self.closed:
            s += "+close"
        if self.tunnel:
            s += " echo"
        if self.next.target is None or self.next.status != 200:
            s += f" next:{self.next.status or self.next.end}"
        return f"{self.verdict} ({s})"


def same_path(case: Case) -> bytes:
    return PROBE + b"same-" + case.name.encode()


def next_path(case: Case) -> bytes:
    return PROBE + b"next-" + case.name.encode()


async def run_case(port: int, case: Case, up: Upstream, wait: float, settle: float) -> Outcome:
    """Run `case` through the proxy listening on `port` in front of `up`; each read waits at most
    `wait` seconds, and the real server's connections at most `settle` to have read all."""
    loop = asyncio.get_running_loop()
    up.case = case.name
    r, w = await asyncio.open_connection("127.0.0.1", port)
    rd = Reader(r, loop.time() + wait)
    got: list[Got] = []
    same: Got | None = None
    tunnel: bool | None = None
    stop = ""
    try:
        await send(w, case.raw)
        for i in range(case.answers):
            g = await rd.response(head_only=i == 0 and case.raw.startswith(b"HEAD "))
            if g.status:
                got.append(g)
            stop = g.end
            if g.end or not g.status or g.status == 101:
                break
        last = got[-1] if got else None
        if last is not None and last.status == 101:
            if case.echo:
                rd.deadline = loop.time() + wait
                tunnel = await send(w, ECHO) and await rd.exactly(len(ECHO)) == ECHO
        elif last is not None and not last.end and not rd.eof:
            rd.deadline = loop.time() + wait
            if await send(w, probe_request(same_path(case))):
                same = await rd.response(head_only=False)
            else:
                same = Got(0, None, end="closed")
                rd.eof = True
    finally:
        await close(w)
    r2, w2 = await asyncio.open_connection("127.0.0.1", port)
    try:
        await send(w2, probe_request(next_path(case)))
        nxt = await Reader(r2, loop.time() + wait).response(head_only=False)
    finally:
        await close(w2)
    await up.settle(case.name, settle)
    o = Outcome(case, got, same, nxt, up.read_during(case.name),
                [g for c, g in up.garbage if c == case.name], rd.eof, tunnel=tunnel, stop=stop,
                stuck=up.stuck(case.name))
    o.verdict, o.notes = judge(o)
    return o


def describe(seen: tuple[Seen, ...]) -> str:
    return ", ".join(f"{s.method.decode()} {s.target.decode('latin-1')}"
                     + (f" ({len(s.body)} B body)" if s.body else "") for s in seen)


def judge(o: Outcome) -> tuple[str, list[str]]:
    """The verdict on an outcome, and why (for desync and ambiguous)."""
    case = o.case
    paths = case_paths(case)
    wrong = []
    for i, g in enumerate(o.got):
        if g.target is not None and (i >= len(paths) or g.target != paths[i]):
            wrong.append(f"answer {i + 1} was the one for {g.target.decode('latin-1')}")
    for label, probe, path in (("its follow-up", o.same, same_path(case)),
                               ("the next client", o.next, next_path(case))):
        if probe is not None and probe.target is not None and probe.target != path:
            wrong.append(f"{label} got the answer for {probe.target.decode('latin-1')}")
    if wrong:
        return DESYNC, wrong
    notes = [f"real server: {x}" for r in o.received for x in r.odd]
    notes += [f"real server: {x}" for x in o.garbage]
    if o.stuck:
        notes.append("real server: waits for the rest of a request the proxy sent as ended")
    seen = tuple(r.seen for r in o.received)
    if seen and seen not in case.readings:
        notes.append(f"real server read {describe(seen)}")
    for got in (*o.got, o.same, o.next):
        if got is not None:
            notes += [f"client: {x}" for x in got.odd]
    final = next((g for g in o.got if g.target is not None), None)  # the real server's answer
    if case.response and final is not None and (final.status, final.body) not in case.want:
        notes.append(f"client got {final.status} {final.body[:40]!r}"
                     + (f" ({final.end})" if final.end else ""))
    if notes:
        return AMBIGUOUS, notes
    relayed = final is not None if case.response else bool(seen)
    return (FORWARDED if relayed else REJECTED), []


async def run_all(port: int, cases: tuple[Case, ...], up: Upstream, wait: float,
                  settle: float) -> list[Outcome]:
    return [await run_case(port, case, up, wait, settle) for case in cases]
