"""Certificate events: the Let's Encrypt manager emits requested, challenge presented, issued,
renewed, failed and deleted; the expiry check warns once per certificate version entering the
threshold and, at every check, about a certificate within 1/3 of its lifetime whose renewal fails;
`Events` sends them to the log (and counts them)."""

from __future__ import annotations

import datetime as dt
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from acmeclient.errors import RateLimitedError
from acmeclient.messages import Problem
from lbproxy.certs import CertStore
from lbproxy.config.model import EventSettings
from lbproxy.events import (
    CertStatus,
    EventKind,
    Events,
    ExpiryMonitor,
    RecordingSink,
    expiry_alerts,
)
from lbproxy.letsencrypt import LEManager, Template
from lbproxy.runtime import RuntimeStore
from tests.letsencrypt.le_fakes import FakeCA, FakeClock
from tests.letsencrypt.test_le_manager import CONFIG, T0

DAY = dt.timedelta(days=1)


def cert(cid: str = "c", *, left: float, lifetime: float = 90, failures: int = 0,
         managed: bool = True) -> CertStatus:
    not_after = T0 + left * DAY
    return CertStatus(id=cid, names=("a.test",), managed_by="letsencrypt" if managed else "",
                      not_before=not_after - lifetime * DAY, not_after=not_after,
                      auto_renew=managed, failures=failures,
                      last_error="validation failed" if failures else "", last_code=13
                      if failures else None)


@pytest.mark.parametrize(("status", "kinds"), [
    (cert(left=40), []),
    (cert(left=14), ["expiring"]),
    (cert(left=13, managed=False), ["expiring"]),
    (cert(left=31, failures=1), []),                          # 31 > 90/3: not yet
    (cert(left=29, failures=2), ["renewal_failing"]),
    (cert(left=31, failures=0), []),
    (cert(left=31, failures=3, managed=False), []),           # nothing renews it anyway
    (cert(left=5, failures=1), ["expiring", "renewal_failing"]),
    (cert(left=-1, failures=4), ["expiring", "renewal_failing"]),
    (cert(left=1.5, lifetime=6, failures=1), ["expiring", "renewal_failing"]),
    (cert(left=1.5, lifetime=6, failures=0), ["expiring"]),
    (cert(left=2.5, lifetime=6, failures=1), ["expiring"]),   # 2.5 > 6/3: not yet
])
def test_one_check(status: CertStatus, kinds: list[str]) -> None:
    events, _ = expiry_alerts(T0, [status], 14 * DAY)
    assert [e.kind.value for e in events] == kinds
    for e in events:
        assert e.cert_id == "c" and e.not_after == status.not_after


def test_expiring_once_per_version_renewal_failing_at_every_check() -> None:
    clock = FakeClock(T0)
    sink = RecordingSink()
    certs = [cert(left=10, failures=1)]
    mon = ExpiryMonitor(lambda: certs, sink, warn_within=14 * DAY, clock=clock)
    for _ in range(3):
        mon.check()
        clock.advance(dt.timedelta(hours=1))
    assert sink.kinds() == ["expiring", "renewal_failing", "renewal_failing", "renewal_failing"]
    assert "failed 1 time(s)" in sink.events[1].message and sink.events[1].code == 13
    certs[0] = cert(left=90)  # renewed: a new version, fresh warnings later
    mon.check()
    assert len(sink.events) == 4
    certs[0] = cert(left=12)
    mon.check()
    assert sink.kinds()[-1] == "expiring"


@dataclass
class Env:
    clock: FakeClock
    ca: FakeCA
    manager: LEManager
    sink: RecordingSink
    events: Events


@pytest.fixture
async def env(tmp_path: Path) -> AsyncIterator[Env]:
    clock = FakeClock(T0)
    ca = FakeCA(clock)
    runtime = RuntimeStore(CONFIG)
    store = CertStore(tmp_path, clock=clock)
    events = Events(EventSettings(), clock=clock)
    sink = events.recent
    m = LEManager(tmp_path, runtime, store, clock=clock, client_factory=ca.factory,
                  hostname="h", events=events)
    await m.start()
    await m.register("ops@example.test")
    yield Env(clock, ca, m, sink, events)
    await m.stop()


async def test_the_manager_emits_every_certificate_event(env: Env,
                                                         caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="lbproxy.events")
    await env.manager.request("c", Template("a.test", "web", (("b.test", "web"),)))
    assert env.sink.kinds() == ["requested", "challenge_presented", "challenge_presented",
                                "issued"]
    presented = [e.message for e in env.sink.events if e.kind is EventKind.CHALLENGE_PRESENTED]
    assert presented == ["http-01 answer for a.test served by VS web",
                         "http-01 answer for b.test served by VS web"]
    issued = env.sink.events[-1]
    assert issued.names == ("a.test", "b.test") and issued.serial
    assert issued.not_after == env.manager.store.require("c").not_after

    await env.manager.renew("c")
    assert env.sink.kinds()[-1] == "renewed"
    assert env.sink.events[-1].serial == f"{env.manager.store.require('c').serial:x}"

    env.ca.fail_with = RateLimitedError(
        Problem("urn:ietf:params:acme:error:rateLimited", "too many"), status=429)
    await env.manager.renew("c", wait=False)
    await env.manager.wait_idle()
    failed = env.sink.events[-1]
    assert failed.kind is EventKind.FAILED and failed.code == 4 and failed.failures == 1
    assert "too many" in failed.message

    await env.manager.delete("c")
    assert env.sink.kinds()[-1] == "deleted"
    assert env.events.counts["requested"] == 3 and env.events.counts["deleted"] == 1
    assert "certificate c issued: issued until" in caplog.text
    assert any(r.levelno == logging.WARNING and "certificate c failed" in r.getMessage()
               for r in caplog.records)
    assert env.manager.acme_requests[("order", "success")] == 2
    assert env.manager.acme_requests[("order", "4")] == 1
    assert env.manager.acme_requests[("new_account", "success")] == 1


async def test_a_failing_renewal_in_the_last_third_warns_at_every_check(env: Env) -> None:
    env.ca.lifetime = dt.timedelta(days=6)
    await env.manager.request("c", Template("a.test", "web"))
    monitor = env.events.watch(env.manager.cert_statuses)
    env.ca.fail_with = RateLimitedError(
        Problem("urn:ietf:params:acme:error:rateLimited", "too many"), status=429)
    warnings = []
    for _ in range(6 * 24):  # six days in 1-hour steps: the scheduler tries, the monitor checks
        env.clock.advance(dt.timedelta(hours=1))
        await env.manager.run_due()
        await env.manager.wait_idle()
        kinds = [e.kind.value for e in monitor.check()]
        warnings.append("renewal_failing" in kinds)
    # renewal starts at 4 days (1/3 of 6), fails, and from then on every hourly check warns
    first = warnings.index(True)
    assert 4 * 24 - 3 <= first <= 4 * 24 + 1
    assert all(warnings[first:])
    statuses = env.manager.cert_statuses()
    assert statuses[0].failures >= 2 and statuses[0].state in ("backoff", "expired")
    assert env.events.counts["expiring"] == 1  # once for this certificate version
