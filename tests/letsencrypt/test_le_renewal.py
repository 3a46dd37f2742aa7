"""The renewal policy with a fake clock: a simulated year per lifetime and renew period."""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

import pytest

from lbproxy.letsencrypt.policy import (
    AriWindow,
    Failures,
    RenewalState,
    Validity,
    backoff,
    effective_period,
    next_attempt,
    record_failure,
    renewal_window,
    state_at,
    succeeded,
)

START = datetime(2026, 1, 1, tzinfo=UTC)
YEAR = timedelta(days=365)
BACKDATE = timedelta(hours=1)  # Let's Encrypt backdates notBefore by an hour
MAX_STEPS = 20_000  # bounds every simulation loop


@dataclass
class SimCA:
    """A CA issuing certificates of one lifetime, optionally with ARI and outages."""

    lifetime: timedelta
    ari: Callable[[Validity, datetime], AriWindow | None] | None = None
    down: Callable[[datetime], float | None] = lambda now: None  # Retry-After when down
    issued: list[tuple[datetime, Validity]] = field(default_factory=list)

    def issue(self, now: datetime) -> Validity:
        v = Validity(now - BACKDATE, now - BACKDATE + self.lifetime)
        self.issued.append((now, v))
        return v


@dataclass
class SimResult:
    renewals: list[tuple[datetime, Validity]]  # (when, the certificate that was replaced)
    attempts: int
    failures: int


def simulate(ca: SimCA, period_days: int, *, seed: int = 1, until: timedelta = YEAR) -> SimResult:
    rng = random.Random(seed)
    now = START
    cert = ca.issue(now)
    failures = Failures()
    renewals: list[tuple[datetime, Validity]] = []
    attempts = failed = 0
    jitter = rng.random()
    for _ in range(MAX_STEPS):
        ari = ca.ari(cert, now) if ca.ari else None
        when = next_attempt(now, cert, period_days, ari, failures, jitter=jitter)
        assert when >= now
        if when >= START + until:
            # the certificate in service must last until the end of the simulation
            assert cert.not_after > START + until or when < cert.not_after
            return SimResult(renewals, attempts, failed)
        # never an expired minute: the certificate in service is valid up to the attempt
        assert when < cert.not_after, f"expired at {cert.not_after}, next attempt {when}"
        now = when
        attempts += 1
        retry_after = ca.down(now)
        if retry_after is not None:
            failed += 1
            failures = record_failure(failures, now, cert, retry_after)
            assert failures.retry_at is not None and failures.retry_at > now
            continue
        renewals.append((now, cert))
        cert = ca.issue(now)
        failures = succeeded(failures)
        jitter = rng.random()
    raise AssertionError("simulation did not finish: a renewal loop")


LIFETIMES = [90, 45, 6]
PERIODS = [1, 30, 60]


@pytest.mark.parametrize("lifetime_days", LIFETIMES)
@pytest.mark.parametrize("period_days", PERIODS)
def test_one_renewal_per_window_over_a_year(lifetime_days: int, period_days: int) -> None:
    lifetime = timedelta(days=lifetime_days)
    ca = SimCA(lifetime)
    result = simulate(ca, period_days)
    effective = min(timedelta(days=period_days), lifetime / 3)
    # each certificate is replaced exactly once, at the start of its window
    for when, old in result.renewals:
        assert when == old.not_after - effective
    gaps = [b[0] - a[0] for a, b in zip(result.renewals, result.renewals[1:], strict=False)]
    # the new certificate is backdated by an hour, so its window starts an hour earlier
    interval = lifetime - effective - BACKDATE
    assert all(g == interval for g in gaps)
    # count matches one renewal per interval (BACKDATE shifts the first one by an hour)
    assert abs(len(result.renewals) - YEAR / interval) <= 1
    assert result.attempts == len(result.renewals)
    # 6-day certificates with a 30 or 60-day period renew at two thirds of their life
    if lifetime_days == 6 and period_days >= 2:
        assert effective == timedelta(days=2)
        assert len(result.renewals) in (91, 92)


@pytest.mark.parametrize("lifetime_days", LIFETIMES)
@pytest.mark.parametrize("period_days", PERIODS)
def test_ari_windows_take_precedence(lifetime_days: int, period_days: int) -> None:
    lifetime = timedelta(days=lifetime_days)

    def ari(v: Validity, now: datetime) -> AriWindow:
        # like Let's Encrypt: a window around two thirds of the lifetime
        return AriWindow(v.not_before + v.lifetime * 0.60, v.not_before + v.lifetime * 0.66)

    ca = SimCA(lifetime, ari=ari)
    result = simulate(ca, period_days, seed=lifetime_days * 100 + period_days)
    assert result.renewals
    for when, old in result.renewals:
        w = ari(old, when)
        assert w.start <= when < w.end, (when, w)
    shortest, longest = lifetime * 0.60 - BACKDATE, lifetime * 0.66
    assert YEAR / longest - 1 <= len(result.renewals) <= YEAR / shortest + 1


def test_ari_window_moved_into_the_past_renews_once() -> None:
    """A revocation-style window in the past: renew at once, once, then back to normal."""
    lifetime = timedelta(days=90)
    revoke_day = START + timedelta(days=20)
    state = {"revoked_cert": None}

    def ari(v: Validity, now: datetime) -> AriWindow:
        if now >= revoke_day and v.not_before < revoke_day - BACKDATE:
            state["revoked_cert"] = v  # type: ignore[assignment]
            return AriWindow(revoke_day - timedelta(days=2), revoke_day - timedelta(days=1))
        return AriWindow(v.not_before + timedelta(days=60), v.not_before + timedelta(days=62))

    ca = SimCA(lifetime, ari=ari)

    # The simulation only re-evaluates at attempts; emulate the 6-hour ARI poll by stepping.
    now = START
    cert = ca.issue(now)
    renewals = []
    for _ in range(MAX_STEPS):
        when = min(next_attempt(now, cert, 30, ari(cert, now)), now + timedelta(hours=6))
        if when >= START + timedelta(days=120):
            break
        now = when
        if now >= next_attempt(now, cert, 30, ari(cert, now)):
            renewals.append(now)
            cert = ca.issue(now)
    assert renewals[0] == revoke_day  # the first poll after the window moved
    # then the normal window again (the new certificate is backdated by an hour)
    assert renewals[1] - renewals[0] == timedelta(days=60) - BACKDATE
    assert len(renewals) == 2


def test_fresh_certificate_with_past_ari_window_does_not_loop() -> None:
    lifetime = timedelta(days=6)

    def broken(v: Validity, now: datetime) -> AriWindow:
        return AriWindow(START - timedelta(days=10), START - timedelta(days=9))

    result = simulate(SimCA(lifetime, ari=broken), 30, until=timedelta(days=30))
    # a window that ended before the certificate began is ignored: the period window applies
    for when, old in result.renewals:
        assert when - old.not_before == lifetime * 2 / 3
    assert len(result.renewals) == 7


@pytest.mark.parametrize("lifetime_days", LIFETIMES)
def test_outage_backs_off_and_never_expires(lifetime_days: int) -> None:
    """The CA is down for a third of each window; retries back off, honour Retry-After, and the
    certificate is renewed before it expires."""
    lifetime = timedelta(days=lifetime_days)
    period = 30
    eff = effective_period(Validity(START, START + lifetime), period)
    outages: list[tuple[datetime, datetime]] = []

    def down(now: datetime) -> float | None:
        for a, b in outages:
            if a <= now < b:
                return 600.0  # Retry-After: 10 minutes
        return None

    ca = SimCA(lifetime, down=down)
    # an outage starting at every window start, lasting a third of the window
    t = START - BACKDATE + lifetime - eff
    while t < START + YEAR:
        outages.append((t, t + eff / 3))
        t += lifetime - eff + eff / 3
    result = simulate(ca, period)
    assert result.failures > 0
    assert result.renewals
    for when, old in result.renewals:
        assert when < old.not_after
    # bounded retries: at most ~log2(cap/base) + window/cap attempts per window
    per_window = result.attempts / len(result.renewals)
    assert per_window < 40


def test_ari_window_in_the_past_for_a_young_certificate_waits_a_tenth() -> None:
    v = Validity(START, START + timedelta(days=6))
    w = renewal_window(v, 30, AriWindow(START - timedelta(hours=1), START + timedelta(hours=1)))
    assert w.source == "ari" and w.start == START + timedelta(days=6) / 10


def test_backoff_honours_retry_after_and_caps() -> None:
    now = START
    v = Validity(START - timedelta(days=60), START + timedelta(days=30))
    f = Failures()
    delays = []
    for _ in range(10):
        f = record_failure(f, now, v, None)
        assert f.retry_at is not None
        delays.append(f.retry_at - now)
    assert delays[0] == timedelta(minutes=5)
    assert delays[1] == timedelta(minutes=10)
    assert max(delays) == timedelta(hours=6)
    f = record_failure(Failures(), now, v, 86400.0)
    assert f.retry_at == now + timedelta(days=1)
    # close to expiry the delay shrinks to a quarter of what is left
    assert backoff(10, timedelta(hours=2)) == timedelta(minutes=30)


def test_period_window_and_state() -> None:
    v = Validity(START, START + timedelta(days=90))
    w = renewal_window(v, 30)
    assert (w.start, w.source) == (START + timedelta(days=60), "period")
    assert renewal_window(v, 90).start == START + timedelta(days=60)  # clamped to 60
    assert renewal_window(v, 0).start == START + timedelta(days=89)  # clamped to 1
    six = Validity(START, START + timedelta(days=6))
    assert renewal_window(six, 30).start == START + timedelta(days=4)
    assert state_at(START, v, 30, None, Failures(), False) is RenewalState.VALID
    assert state_at(START + timedelta(days=61), v, 30, None, Failures(), False) is RenewalState.DUE
    assert state_at(START + timedelta(days=91), v, 30, None, Failures(), False) is (
        RenewalState.EXPIRED)
    assert state_at(START, v, 30, None, Failures(1, START, START), False) is RenewalState.BACKOFF
    assert state_at(START, None, 30, None, Failures(), False) is RenewalState.PENDING
    assert state_at(START, v, 30, None, Failures(), True) is RenewalState.RENEWING
    assert next_attempt(START, None, 30) == START


def test_a_first_order_in_progress_is_ordering_not_renewing() -> None:
    """Issue 14: a certificate never issued whose first order runs showed as `renewing`."""
    v = Validity(START, START + timedelta(days=90))
    assert state_at(START, None, 30, None, Failures(), True) is RenewalState.ORDERING
    assert state_at(START, v, 30, None, Failures(), True) is RenewalState.RENEWING


@pytest.mark.parametrize("lifetime_days", LIFETIMES)
def test_a_huge_retry_after_does_not_park_the_renewal_past_expiry(lifetime_days: int) -> None:
    """Issue 14: after a failure the next attempt read years ahead: a Retry-After of years (a
    misread HTTP-date, a broken proxy) was honoured in full. It is honoured up to a day and
    never past half of the time the certificate has left."""
    lifetime = timedelta(days=lifetime_days)
    v = Validity(START, START + lifetime)
    now = v.not_after - lifetime / 3        # the renewal window opens
    for retry_after in (3 * 365 * 86400.0, 1e30):
        f = record_failure(Failures(), now, v, retry_after)
        assert f.retry_at is not None
        assert f.retry_at - now <= timedelta(hours=24)
        assert f.retry_at - now <= (v.not_after - now) / 2
        when = next_attempt(now, v, 30, None, f)
        assert when < v.not_after
    # not yet issued: still a day at most
    f = record_failure(Failures(), START, None, 1e30)
    assert f.retry_at is not None and f.retry_at - START <= timedelta(hours=24)
    # an ordinary Retry-After is honoured in full
    f = record_failure(Failures(), now, v, 3600.0)
    assert f.retry_at == now + timedelta(hours=1)
