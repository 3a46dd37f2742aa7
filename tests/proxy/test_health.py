"""Health checks: rise/fall counting, the probe loop on a fake clock, probes over real sockets."""

from __future__ import annotations

import asyncio
import logging
import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager

import pytest

from lbproxy.config.model import Address, HealthCheck, HealthCheckType
from lbproxy.proxy.balancer import Backend
from lbproxy.proxy.health import HealthMonitor, HealthState, probe_http, probe_tcp

LABEL = "SubVS api of VS web"
WAIT = 5.0  # seconds any single event may take on a loaded 2-core machine

# -- HealthState -------------------------------------------------------------------------------

# (rise, fall, start healthy, provisional, results, expected observe() return values)
CASES = [
    (2, 3, True, False, "+++", [None, None, None]),
    (2, 3, True, False, "---", [None, None, False]),
    (2, 3, True, False, "--+---", [None, None, None, None, None, False]),
    (2, 3, False, False, "++", [None, True]),
    (2, 3, False, False, "+-++", [None, None, None, True]),
    (2, 3, True, False, "---++", [None, None, False, None, True]),
    (1, 1, True, False, "-+-+", [False, True, False, True]),
    (3, 1, True, False, "-++-+++", [False, None, None, None, None, None, True]),
    # No result yet: the first one alone decides, then the counts apply.
    (2, 3, True, True, "-", [False]),
    (2, 3, True, True, "+--", [None, None, None]),
    (2, 3, True, True, "-+", [False, None]),
    (2, 3, False, True, "+", [True]),
]


@pytest.mark.parametrize(("rise", "fall", "healthy", "provisional", "results", "expected"), CASES)
def test_health_state_transitions(rise: int, fall: int, healthy: bool, provisional: bool,
                                  results: str, expected: list[bool | None]) -> None:
    s = HealthState(rise, fall, healthy=healthy, provisional=provisional)
    got = [s.observe(r == "+") for r in results]
    assert got == expected
    last = next((t for t in reversed(expected) if t is not None), healthy)
    assert s.healthy is last


def test_health_state_rejects_zero_counts() -> None:
    with pytest.raises(ValueError, match="rise"):
        HealthState(0, 1)


# -- HealthMonitor on a fake clock -------------------------------------------------------------

class FakeTime:
    """A clock that only moves when the monitor sleeps or a fake probe 'takes' time."""

    def __init__(self) -> None:
        self.now = 100.0
        self.sleeps: list[float] = []

    def clock(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds
        await asyncio.sleep(0)


class ScriptedProbe:
    """Answers from a script ("+" healthy, "-" not, "!" raises), then blocks until cancelled."""

    def __init__(self, t: FakeTime, script: str, duration: float = 0.25) -> None:
        self.t = t
        self.script = list(script)
        self.duration = duration
        self.started: list[float] = []
        self.done = asyncio.Event()

    async def __call__(self, address: Address, check: HealthCheck) -> str | None:
        self.started.append(self.t.now)
        if not self.script:
            self.done.set()
            await asyncio.Event().wait()
        self.t.now += self.duration
        r = self.script.pop(0)
        if r == "!":
            raise RuntimeError("probe bug")
        return None if r == "+" else f"fake failure {len(self.started)}"


def backend(port: int = 9001) -> Backend:
    return Backend(Address("127.0.0.1", port))


async def run_script(b: Backend, check: HealthCheck, script: str
                     ) -> tuple[ScriptedProbe, FakeTime, list[tuple[bool, str, int]]]:
    t = FakeTime()
    probe = ScriptedProbe(t, script)
    changes: list[tuple[bool, str, int]] = []
    mon = HealthMonitor([b], check, LABEL, clock=t.clock, sleep=t.sleep, probe=probe,
                        on_change=lambda bk, up, why: changes.append((up, why, len(probe.started))))
    mon.start()
    try:
        async with asyncio.timeout(WAIT):
            await probe.done.wait()
    finally:
        await mon.stop()
    return probe, t, changes


async def test_monitor_counts_rise_and_fall_and_logs(caplog: pytest.LogCaptureFixture) -> None:
    b = backend()
    check = HealthCheck(HealthCheckType.TCP, interval=5.0, rise=2, fall=3)
    with caplog.at_level(logging.WARNING, "lbproxy.proxy.health"):
        probe, t, changes = await run_script(b, check, "+---" + "-+" + "+")
    # Down on the 3rd failure in a row (probe 4), up on the 2nd success in a row (probe 7).
    assert changes == [(False, "fake failure 4", 4), (True, "", 7)]
    assert b.healthy and b.checked and b.down_reason == ""
    # The first probe runs at once; then one every interval, measured from probe start to start.
    assert probe.started[:3] == [100.0, 105.0, 110.0]
    assert t.sleeps == [4.75] * 7
    assert [r.getMessage() for r in caplog.records] == [
        f"real server 127.0.0.1:9001 in {LABEL} is DOWN: fake failure 4",
        f"real server 127.0.0.1:9001 in {LABEL} is UP",
    ]


async def test_monitor_never_sleeps_negative_when_a_probe_outlasts_the_interval() -> None:
    check = HealthCheck(HealthCheckType.TCP, interval=0.1, rise=1, fall=1)
    _, t, _ = await run_script(backend(), check, "++")
    assert t.sleeps == [0.0, 0.0]


async def test_monitor_keeps_the_reason_while_down() -> None:
    b = backend()
    check = HealthCheck(HealthCheckType.TCP, rise=3, fall=1)
    await run_script(b, check, "-+")
    assert not b.healthy and b.down_reason == "fake failure 1"


async def test_a_crashing_probe_counts_as_a_failure(caplog: pytest.LogCaptureFixture) -> None:
    b = backend()
    check = HealthCheck(HealthCheckType.TCP, rise=1, fall=2)
    with caplog.at_level(logging.WARNING, "lbproxy.proxy.health"):
        _, _, changes = await run_script(b, check, "+!!+")
    assert changes == [(False, "probe error: RuntimeError: probe bug", 3), (True, "", 4)]
    assert "crashed" in caplog.text


async def test_new_server_goes_down_on_its_first_failure() -> None:
    b = backend()
    _, _, changes = await run_script(b, HealthCheck(HealthCheckType.TCP, fall=3), "-")
    assert changes == [(False, "fake failure 1", 1)] and not b.healthy


async def test_adopted_down_server_needs_rise_successes() -> None:
    b = backend()
    b.healthy, b.checked = False, True  # what the previous generation's monitor left behind
    _, _, changes = await run_script(b, HealthCheck(HealthCheckType.TCP, rise=3), "++")
    assert changes == [] and not b.healthy


async def test_check_none_marks_all_healthy_without_tasks() -> None:
    a, b = backend(9001), backend(9002)
    b.healthy, b.checked, b.down_reason = False, True, "old"
    mon = HealthMonitor([a, b], HealthCheck(HealthCheckType.NONE), LABEL)
    mon.start()
    assert a.healthy and b.healthy and not b.checked and b.down_reason == ""
    assert mon._tasks == []
    await mon.stop()


async def test_stop_interrupts_a_probe_in_progress() -> None:
    t = FakeTime()
    probe = ScriptedProbe(t, "")  # blocks on its first call
    mon = HealthMonitor([backend(9001), backend(9002)], HealthCheck(HealthCheckType.TCP), LABEL,
                        clock=t.clock, sleep=t.sleep, probe=probe)
    mon.start()
    with pytest.raises(RuntimeError, match="already running"):
        mon.start()
    async with asyncio.timeout(WAIT):
        await probe.done.wait()
        await mon.stop()
    assert len(probe.started) == 2


# -- probes over real sockets ------------------------------------------------------------------

def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
    return port


Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


@asynccontextmanager
async def tcp_server(handler: Handler) -> AsyncIterator[int]:
    """A listener on an ephemeral 127.0.0.1 port; on exit every connection is closed and done."""
    conns: dict[asyncio.Task[None] | None, asyncio.StreamWriter] = {}

    async def wrapped(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        conns[asyncio.current_task()] = w
        try:
            await handler(r, w)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass  # the probe hung up first: its business
        finally:
            w.close()

    server = await asyncio.start_server(wrapped, "127.0.0.1", 0)
    try:
        yield server.sockets[0].getsockname()[1]
    finally:
        server.close()
        for w in conns.values():
            w.close()
        async with asyncio.timeout(WAIT):
            await asyncio.gather(*(t for t in conns if t is not None))
            await server.wait_closed()


class ScriptedHTTP:
    """Answers each health GET with the next status of a script (then 200); records the heads."""

    def __init__(self, statuses: list[int]) -> None:
        self.statuses = statuses
        self.heads: list[bytes] = []

    async def __call__(self, r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        self.heads.append(await r.readuntil(b"\r\n\r\n"))
        status = self.statuses.pop(0) if self.statuses else 200
        w.write(b"HTTP/1.1 %d X\r\nContent-Length: 0\r\nConnection: close\r\n\r\n" % status)
        await w.drain()


async def test_tcp_probe_against_listening_and_closed_ports() -> None:
    check = HealthCheck(HealthCheckType.TCP, timeout=WAIT)

    async def idle(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        await r.read()

    async with tcp_server(idle) as port:
        assert await probe_tcp(Address("127.0.0.1", port), check) is None
    reason = await probe_tcp(Address("127.0.0.1", closed_port()), check)
    assert reason is not None and reason.startswith("TCP connect failed: ConnectionRefusedError")


async def test_tcp_monitor_marks_a_closed_port_down_and_a_listening_one_up() -> None:
    async def idle(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        await r.read()

    async with tcp_server(idle) as port:
        up, down = backend(port), backend(closed_port())
        probed: dict[Address, asyncio.Event] = {up.address: asyncio.Event(),
                                                down.address: asyncio.Event()}

        async def probe(address: Address, check: HealthCheck) -> str | None:
            try:
                return await probe_tcp(address, check)
            finally:
                probed[address].set()

        check = HealthCheck(HealthCheckType.TCP, interval=0.01, timeout=WAIT, fall=3)
        mon = HealthMonitor([up, down], check, LABEL, probe=probe)
        mon.start()
        try:
            async with asyncio.timeout(WAIT):
                for e in probed.values():
                    await e.wait()
        finally:
            await mon.stop()
    assert up.healthy and up.checked
    assert not down.healthy and "Refused" in down.down_reason


async def test_http_check_goes_down_after_fall_and_up_after_rise(
        caplog: pytest.LogCaptureFixture) -> None:
    server = ScriptedHTTP([200, 500, 500, 500, 200, 200])
    async with tcp_server(server) as port:
        b = backend(port)
        changes: asyncio.Queue[tuple[bool, int]] = asyncio.Queue()
        check = HealthCheck(HealthCheckType.HTTP, path="/health", host="api.example",
                            interval=0.01, timeout=WAIT, rise=2, fall=3)
        mon = HealthMonitor([b], check, LABEL, on_change=lambda bk, up, why: changes.put_nowait(
            (up, len(server.heads))))
        with caplog.at_level(logging.WARNING, "lbproxy.proxy.health"):
            mon.start()
            try:
                async with asyncio.timeout(WAIT):
                    assert await changes.get() == (False, 4)
                    assert not b.healthy
                    assert await changes.get() == (True, 6)
                    assert b.healthy
            finally:
                await mon.stop()
    assert caplog.records[0].getMessage() == (
        f"real server 127.0.0.1:{port} in {LABEL} is DOWN: GET /health answered 500, expected 200")
    assert caplog.records[1].getMessage() == f"real server 127.0.0.1:{port} in {LABEL} is UP"
    assert server.heads[0].startswith(b"GET /health HTTP/1.1\r\nHost: api.example\r\n")
    assert b"Connection: close\r\n" in server.heads[0]


async def test_http_probe_default_host_and_expected_statuses() -> None:
    server = ScriptedHTTP([204, 301])
    async with tcp_server(server) as port:
        addr = Address("127.0.0.1", port)
        check = HealthCheck(HealthCheckType.HTTP, path="/ping?x=1", expect_status=(200, 204),
                            timeout=WAIT)
        assert await probe_http(addr, check) is None
        assert await probe_http(addr, check) == "GET /ping?x=1 answered 301, expected 200, 204"
    assert server.heads[0].startswith(f"GET /ping?x=1 HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
                                      .encode())


@pytest.mark.parametrize(("answer", "reason"), [
    (b"SSH-2.0-OpenSSH_9.6\r\n", "not an HTTP status line: b'SSH-2.0-OpenSSH_9.6\\r\\n'"),
    (b"HTTP/1.1 2xx OK\r\n", "not an HTTP status line"),
    (b"HTTP/1.1 200 OK", "connection closed before a status line (15 bytes)"),
    (b"", "connection closed before a status line (0 bytes)"),
    (b"x" * 3000, "no status line in the first 1024 bytes"),
])
async def test_http_probe_rejects_what_is_not_http(answer: bytes, reason: str) -> None:
    async def handler(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        await r.readuntil(b"\r\n\r\n")
        w.write(answer)
        await w.drain()

    async with tcp_server(handler) as port:
        got = await probe_http(Address("127.0.0.1", port), HealthCheck(HealthCheckType.HTTP,
                                                                       timeout=WAIT))
    assert got is not None and got.startswith(reason)


async def test_http_probe_times_out_on_a_silent_server() -> None:
    async def silent(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        await r.read()

    async with tcp_server(silent) as port:
        async with asyncio.timeout(WAIT):
            got = await probe_http(Address("127.0.0.1", port),
                                   HealthCheck(HealthCheckType.HTTP, timeout=0.05))
    assert got == "no HTTP answer within 0.05s"


async def test_http_probe_against_a_closed_port() -> None:
    got = await probe_http(Address("127.0.0.1", closed_port()),
                           HealthCheck(HealthCheckType.HTTP, timeout=WAIT))
    assert got is not None and got.startswith("HTTP check failed: ConnectionRefusedError")


@pytest.mark.parametrize(("path", "host"), [("/a b", ""), ("/x\r\nEvil: 1", ""), ("/caf\u00e9", ""),
                                            ("/", "a\r\nb")])
async def test_http_probe_refuses_to_send_a_malformed_request(path: str, host: str) -> None:
    server = ScriptedHTTP([])
    async with tcp_server(server) as port:
        got = await probe_http(Address("127.0.0.1", port),
                               HealthCheck(HealthCheckType.HTTP, path=path, host=host))
    assert got is not None and "not printable ASCII" in got
    assert server.heads == []
