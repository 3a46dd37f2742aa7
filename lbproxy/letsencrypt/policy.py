"""When a certificate is renewed and when a failure is retried: pure functions taking `now`.

They read a certificate's validity, the operator's renew period, the CA's ARI window (RFC 9773)
and the failure history; the scheduler's shell sleeps until `next_attempt(...)`; tests drive the
same functions with a fake clock over a year.
"""

from __future__ import annotations

import enum
import logging
from dataclasses import dataclass, replace
from datetime import datetime, timedelta

logger = logging.getLogger(__name__)

# LoadMaster's renew period: 1 to 60 days before expiry, default 30.
MIN_RENEW_PERIOD_DAYS = 1
MAX_RENEW_PERIOD_DAYS = 60
DEFAULT_RENEW_PERIOD_DAYS = 30
# The renew window is at most a third of the lifetime: a 30-day period on a 6-day certificate
# would otherwise make every fresh certificate due at once (a renewal loop).
MAX_WINDOW_FRACTION = 3
# A certificate younger than a tenth of its lifetime is never renewed by schedule, whatever an
# ARI window says: a CA whose window is already past on a fresh certificate must not cause a loop.
MIN_AGE_FRACTION = 10
# Retry after a failure: 5 minutes doubling up to 6 hours (minutes to hours, never hammering the
# CA), and never later than a quarter of the time left so a failing renewal is retried several
# times before the certificate expires.
BACKOFF_BASE = timedelta(minutes=5)
BACKOFF_CAP = timedelta(hours=6)
BACKOFF_MIN = timedelta(minutes=1)
# Retry-After is honoured up to a day (Let's Encrypt's rate limits refill within hours) and never
# past half of the time the certificate has left: a CA's (or a proxy's) Retry-After of a year
# must not park a renewal until after expiry.
MAX_RETRY_AFTER = timedelta(hours=24)
# ARI is fetched again this often when the CA sends no Retry-After (RFC 9773 §4.3.3: ~6 hours).
ARI_REFRESH = timedelta(hours=6)
# The CA's renewalInfo Retry-After is clamped to [1 minute, 1 day], the bounds RFC 9773 §4.3.3
# gives as reasonable: a smaller one would hammer the CA, a larger one could miss a revocation.
ARI_MIN_RETRY = timedelta(minutes=1)
ARI_MAX_RETRY = timedelta(days=1)


class RenewalState(enum.StrEnum):
    """Where a certificate is in its life, as shown by `lbproxy le list`."""

    VALID = "valid"            # issued, not yet in its renewal window
    DUE = "due"                # in its window; a renewal will start
    RENEWING = "renewing"      # an order is running for an issued certificate
    ORDERING = "ordering"      # the first order of a certificate never issued is running
    BACKOFF = "backoff"        # the last attempt failed; waiting for next_attempt
    EXPIRED = "expired"        # not_after has passed (renewal keeps being retried)
    PENDING = "pending"        # requested, never issued yet


@dataclass(frozen=True, slots=True)
class AriWindow:
    """The CA's suggested renewal window (RFC 9773 §4.2); `retry_after` in seconds."""

    start: datetime
    end: datetime
    retry_after: float | None = None


@dataclass(frozen=True, slots=True)
class Validity:
    not_before: datetime
    not_after: datetime

    @property
    def lifetime(self) -> timedelta:
        return self.not_after - self.not_before


@dataclass(frozen=True, slots=True)
class Window:
    """When renewal should happen: [start, end); `source` is "ari" or "period"."""

    start: datetime
    end: datetime
    source: str


@dataclass(frozen=True, slots=True)
class Failures:
    """The failure history since the last success; `retry_after` is the CA's earliest retry."""

    count: int = 0
    last_at: datetime | None = None
    retry_at: datetime | None = None


def clamp_period(days: int) -> int:
    """The renew period limited to LoadMaster's 1-60 days."""
    return max(MIN_RENEW_PERIOD_DAYS, min(MAX_RENEW_PERIOD_DAYS, days))


def effective_period(validity: Validity, renew_period_days: int) -> timedelta:
    """The renew period clamped to a third of the certificate's lifetime."""
    period = timedelta(days=clamp_period(renew_period_days))
    return min(period, validity.lifetime / MAX_WINDOW_FRACTION)


def renewal_window(
    validity: Validity, renew_period_days: int, ari: AriWindow | None = None
) -> Window:
    """ARI's window when the CA offers one (it takes precedence), else the renew period before
    expiry. Either is limited to the certificate's validity and its minimum age."""
    earliest = validity.not_before + validity.lifetime / MIN_AGE_FRACTION
    # A window that ends before the certificate began (or starts after it ends) cannot be about
    # this certificate: it is ignored rather than obeyed into a renewal loop.
    if ari is not None and validity.not_before < ari.end and ari.start < validity.not_after:
        start = max(ari.start, earliest)
        end = min(max(ari.end, start + BACKOFF_MIN), validity.not_after)
        return Window(start, max(end, start), "ari")
    start = max(validity.not_after - effective_period(validity, renew_period_days), earliest)
    # The period window is short: renew at its start; the rest of it is room for retries.
    return Window(start, validity.not_after, "period")


def renew_at(window: Window, jitter: float = 0.0) -> datetime:
    """The instant to start renewing: ARI windows are spread by `jitter` in [0, 1) over their
    first half (RFC 9773 §4.2 asks for a random point; the second half is left for retries);
    period windows start at once."""
    if window.source != "ari":
        return window.start
    span = window.end - window.start
    return window.start + span * (max(0.0, min(jitter, 0.999)) / 2)


def backoff(failures: int, remaining: timedelta) -> timedelta:
    """The delay after the `failures`-th consecutive failure (failures >= 1)."""
    doublings: int = min(max(failures - 1, 0), 16)  # 16: far past the cap, keeps ints small
    delay: timedelta = BACKOFF_BASE * (1 << doublings)
    delay = min(delay, BACKOFF_CAP)
    if remaining > timedelta(0):
        delay = min(delay, max(remaining / 4, BACKOFF_MIN))
    return max(delay, BACKOFF_MIN)


def record_failure(
    failures: Failures, now: datetime, validity: Validity | None, retry_after: float | None
) -> Failures:
    """The history after one more failure at `now`: back-off, or the CA's Retry-After (seconds)
    when it is longer, up to MAX_RETRY_AFTER and half of the time the certificate has left."""
    count = failures.count + 1
    remaining = validity.not_after - now if validity is not None else BACKOFF_CAP * 4
    retry = now + backoff(count, remaining)
    if retry_after is not None and retry_after > 0:
        # timedelta(seconds=) overflows past ~2.7 million years: bound the number first.
        wait = timedelta(seconds=min(retry_after, MAX_RETRY_AFTER.total_seconds()))
        if remaining > timedelta(0):
            wait = min(wait, remaining / 2)
        retry = max(retry, now + wait)
    return Failures(count, now, retry)


def planned_attempt(
    validity: Validity | None,
    renew_period_days: int,
    ari: AriWindow | None = None,
    failures: Failures = Failures(),
    *,
    jitter: float = 0.0,
) -> datetime | None:
    """When the next order is planned, whatever the time now; None for "at once" (a certificate
    never issued and not backing off). `next_attempt` is this, never before `now`."""
    due = None if validity is None else renew_at(
        renewal_window(validity, renew_period_days, ari), jitter)
    if failures.retry_at is not None:
        due = failures.retry_at if due is None else max(due, failures.retry_at)
    return due


def next_attempt(
    now: datetime,
    validity: Validity | None,
    renew_period_days: int,
    ari: AriWindow | None = None,
    failures: Failures = Failures(),
    *,
    jitter: float = 0.0,
) -> datetime:
    """When the next order should be placed: never before `now`, never before a backoff ends.

    A certificate never issued (validity None) is due now, subject to backoff.
    """
    due = planned_attempt(validity, renew_period_days, ari, failures, jitter=jitter)
    return now if due is None else max(due, now)


def next_ari_check(now: datetime, ari: AriWindow | None, validity: Validity) -> datetime:
    """When renewalInfo should be fetched again: after Retry-After (clamped to a minute..a day)
    or six hours, and not after the certificate expires."""
    wait = ARI_REFRESH if ari is None or ari.retry_after is None else _ari_wait(ari.retry_after)
    return min(now + wait, validity.not_after)


_ARI_WAITS: dict[float, timedelta] = {}   # Retry-After -> its clamped wait (a CA sends few)


def _ari_wait(retry_after: float) -> timedelta:
    wait = _ARI_WAITS.get(retry_after)
    if wait is None:
        # bounded as a number first: timedelta(seconds=) overflows on an absurd header
        wait = timedelta(seconds=min(max(retry_after, ARI_MIN_RETRY.total_seconds()),
                                     ARI_MAX_RETRY.total_seconds()))
        if len(_ARI_WAITS) < 256:
            _ARI_WAITS[retry_after] = wait
    return wait


def state_at(
    now: datetime,
    validity: Validity | None,
    renew_period_days: int,
    ari: AriWindow | None,
    failures: Failures,
    renewing: bool,
) -> RenewalState:
    """The state shown to the operator."""
    if renewing:
        return RenewalState.ORDERING if validity is None else RenewalState.RENEWING
    if validity is None:
        return RenewalState.BACKOFF if failures.count else RenewalState.PENDING
    if now >= validity.not_after:
        return RenewalState.EXPIRED
    if failures.count:
        return RenewalState.BACKOFF
    if now >= renew_at(renewal_window(validity, renew_period_days, ari)):
        return RenewalState.DUE
    return RenewalState.VALID


def succeeded(failures: Failures) -> Failures:
    """The history after a success: cleared."""
    return replace(failures, count=0, last_at=None, retry_at=None)
