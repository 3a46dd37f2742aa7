"""The sans-I/O order state machine: from a new order to a valid one with a certificate URL.

It never sleeps, reads a clock or touches a socket. The shell feeds it events with the current time
(`handle(event, now)`), executes the commands it returns, and calls `handle_timer(now)` when
`next_deadline()` is reached. Polling honours Retry-After and otherwise backs off from a few
milliseconds, doubling up to a cap, so a CA that validates in milliseconds (Pebble) costs
milliseconds and a slow one is not hammered.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

from acmeclient.challenges import HTTP01
from acmeclient.errors import (
    AcmeError,
    AcmeTimeoutError,
    ClientStateError,
    NoSupportedChallengeError,
    ValidationError,
)
from acmeclient.jws import key_authorization
from acmeclient.messages import Authorization, Challenge, Order, Status


@dataclass(frozen=True, slots=True)
class PollPolicy:
    """Backoff for polling without Retry-After: first, first*factor, ... capped at `cap`."""

    first: float = 0.02  # Pebble finishes validation within ms; LE within ~1 s
    factor: float = 2.0
    cap: float = 5.0  # never poll slower than this without a Retry-After
    max_retry_after: float = 600.0  # a Retry-After beyond this is clamped (order deadline rules)
    order_timeout: float = 300.0  # whole order, from start to a certificate URL

    def delay(self, attempt: int, retry_after: float | None) -> float:
        if retry_after is not None:
            return min(max(retry_after, 0.0), self.max_retry_after)
        return min(self.first * self.factor**attempt, self.cap)


# ---- commands (machine -> shell)


@dataclass(frozen=True, slots=True)
class FetchAuthorization:
    url: str


@dataclass(frozen=True, slots=True)
class PresentChallenge:
    """Answer one challenge of `challenge_type`. `domain` is the authorization's identifier:
    for a wildcard name (`wildcard`), the name without its "*." (RFC 8555 §7.1.4)."""

    authz_url: str
    challenge_url: str
    domain: str
    token: str
    key_authorization: str
    challenge_type: str = HTTP01
    wildcard: bool = False


@dataclass(frozen=True, slots=True)
class RespondChallenge:
    authz_url: str
    challenge_url: str


@dataclass(frozen=True, slots=True)
class CleanupChallenge:
    domain: str
    token: str


@dataclass(frozen=True, slots=True)
class FinalizeOrder:
    url: str
    csr_der: bytes


@dataclass(frozen=True, slots=True)
class PollOrder:
    url: str


@dataclass(frozen=True, slots=True)
class OrderDone:
    order: Order


@dataclass(frozen=True, slots=True)
class OrderFailed:
    error: AcmeError


Command = (
    FetchAuthorization
    | PresentChallenge
    | RespondChallenge
    | CleanupChallenge
    | FinalizeOrder
    | PollOrder
    | OrderDone
    | OrderFailed
)

# ---- events (shell -> machine)


@dataclass(frozen=True, slots=True)
class AuthorizationFetched:
    url: str
    authorization: Authorization
    retry_after: float | None = None


@dataclass(frozen=True, slots=True)
class ChallengePresented:
    authz_url: str
    challenge_url: str


@dataclass(frozen=True, slots=True)
class ChallengeResponded:
    authz_url: str
    challenge: Challenge
    retry_after: float | None = None


@dataclass(frozen=True, slots=True)
class OrderUpdated:
    order: Order
    retry_after: float | None = None


@dataclass(frozen=True, slots=True)
class CommandFailed:
    error: AcmeError


Event = (
    AuthorizationFetched | ChallengePresented | ChallengeResponded | OrderUpdated | CommandFailed
)


class OrderState(enum.Enum):
    NEW = "new"
    AUTHORIZING = "authorizing"
    FINALIZING = "finalizing"
    DONE = "done"
    FAILED = "failed"


_ALLOWED: dict[OrderState, frozenset[type]] = {
    OrderState.NEW: frozenset(),
    OrderState.AUTHORIZING: frozenset(
        {AuthorizationFetched, ChallengePresented, ChallengeResponded, CommandFailed}
    ),
    OrderState.FINALIZING: frozenset({OrderUpdated, CommandFailed}),
    OrderState.DONE: frozenset(),
    OrderState.FAILED: frozenset(),
}


@dataclass(slots=True)
class _Authz:
    url: str
    domain: str = ""
    challenge_url: str | None = None
    token: str | None = None
    presented: bool = False
    valid: bool = False
    polls: int = 0


@dataclass(slots=True)
class OrderMachine:
    """Drives one order; see the module docstring for the shell contract. Every authorization
    is answered with its challenge of `challenge_type` (http-01 unless told otherwise)."""

    order_url: str
    order: Order
    thumbprint: str
    csr_der: bytes
    policy: PollPolicy = field(default_factory=PollPolicy)
    challenge_type: str = HTTP01
    state: OrderState = OrderState.NEW
    _authzs: dict[str, _Authz] = field(default_factory=dict)
    _timers: dict[str, float] = field(default_factory=dict)  # authz url or order url -> due
    _order_polls: int = 0
    _deadline: float = 0.0

    # -- public API

    def start(self, now: float) -> list[Command]:
        self._expect_state(OrderState.NEW, "start")
        self._deadline = now + self.policy.order_timeout
        self._authzs = {url: _Authz(url) for url in self.order.authorizations}
        return self._on_order(self.order, None, now)

    def handle(self, event: Event, now: float) -> list[Command]:
        if type(event) not in _ALLOWED[self.state]:
            raise ClientStateError(
                f"order machine in state {self.state.value} cannot take {type(event).__name__}"
            )
        if isinstance(event, CommandFailed):
            return self._fail(event.error)
        if isinstance(event, AuthorizationFetched):
            return self._on_authz(event.url, event.authorization, event.retry_after, now)
        if isinstance(event, ChallengePresented):
            return [RespondChallenge(event.authz_url, event.challenge_url)]
        if isinstance(event, ChallengeResponded):
            return self._on_challenge(event.authz_url, event.challenge, event.retry_after, now)
        return self._on_order(event.order, event.retry_after, now)

    def next_deadline(self) -> float | None:
        if self.state in (OrderState.DONE, OrderState.FAILED, OrderState.NEW):
            return None
        return min([*self._timers.values(), self._deadline])

    def handle_timer(self, now: float) -> list[Command]:
        if self.state in (OrderState.DONE, OrderState.FAILED, OrderState.NEW):
            return []
        if now >= self._deadline:
            return self._fail(
                AcmeTimeoutError(
                    f"order {self.order_url} not done within {self.policy.order_timeout} s "
                    f"(state {self.state.value})"
                )
            )
        due = [key for key, when in self._timers.items() if when <= now]
        cmds: list[Command] = []
        for key in due:
            del self._timers[key]
            if key == self.order_url:
                cmds.append(PollOrder(self.order_url))
            else:
                cmds.append(FetchAuthorization(key))
        return cmds

    # -- transitions

    def _expect_state(self, state: OrderState, what: str) -> None:
        if self.state is not state:
            raise ClientStateError(f"order machine in state {self.state.value} cannot {what}")

    def _on_order(self, order: Order, retry_after: float | None, now: float) -> list[Command]:
        self.order = order
        if order.status is Status.INVALID:
            return self._fail(ValidationError(f"order {self.order_url} is invalid", order.error))
        if order.status is Status.VALID:
            if order.certificate is None:
                return self._fail(ValidationError("valid order without certificate URL", None))
            self.state = OrderState.DONE
            self._timers.clear()
            return [*self._cleanups(), OrderDone(order)]
        if self.state is OrderState.NEW:
            if order.status is Status.PENDING:
                self.state = OrderState.AUTHORIZING
                return [FetchAuthorization(url) for url in self._authzs]
            if order.status is Status.READY:
                return self._finalize()
            if order.status is Status.PROCESSING:
                self.state = OrderState.FINALIZING
                return self._schedule_order_poll(retry_after, now)
        if self.state is OrderState.FINALIZING and order.status is Status.PROCESSING:
            return self._schedule_order_poll(retry_after, now)
        if self.state is OrderState.FINALIZING and order.status is Status.READY:
            # finalize accepted but not started yet; poll again
            return self._schedule_order_poll(retry_after, now)
        return self._fail(
            ValidationError(
                f"order {self.order_url} has status {order.status} in state {self.state.value}",
                order.error,
            )
        )

    def _on_authz(
        self, url: str, authz: Authorization, retry_after: float | None, now: float
    ) -> list[Command]:
        slot = self._authzs.get(url)
        if slot is None:
            raise ClientStateError(f"authorization {url} is not part of order {self.order_url}")
        slot.domain = authz.identifier.value
        if authz.status is Status.VALID:
            slot.valid = True
            if all(a.valid for a in self._authzs.values()):
                return self._finalize()
            return []
        if authz.status is not Status.PENDING:
            chal = authz.challenge(self.challenge_type)
            problem = chal.error if chal is not None else None
            return self._fail(
                ValidationError(
                    f"authorization for {slot.domain} is {authz.status}",
                    problem,
                    identifier=slot.domain,
                )
            )
        if slot.challenge_url is None:
            chal = authz.challenge(self.challenge_type)
            if chal is None:
                return self._fail(
                    NoSupportedChallengeError(
                        slot.domain, tuple(c.type for c in authz.challenges),
                        self.challenge_type,
                    )
                )
            slot.challenge_url = chal.url
            slot.token = chal.token
            slot.presented = True
            return [
                PresentChallenge(
                    url,
                    chal.url,
                    slot.domain,
                    chal.token,
                    key_authorization(chal.token, self.thumbprint),
                    self.challenge_type,
                    authz.wildcard,
                )
            ]
        return self._schedule_authz_poll(slot, retry_after, now)

    def _on_challenge(
        self, authz_url: str, chal: Challenge, retry_after: float | None, now: float
    ) -> list[Command]:
        slot = self._authzs[authz_url]
        if chal.status is Status.INVALID:
            return self._fail(
                ValidationError(
                    f"challenge for {slot.domain} is invalid", chal.error, identifier=slot.domain
                )
            )
        return self._schedule_authz_poll(slot, retry_after, now)

    def _schedule_authz_poll(
        self, slot: _Authz, retry_after: float | None, now: float
    ) -> list[Command]:
        self._timers[slot.url] = now + self.policy.delay(slot.polls, retry_after)
        slot.polls += 1
        return []

    def _schedule_order_poll(self, retry_after: float | None, now: float) -> list[Command]:
        self._timers[self.order_url] = now + self.policy.delay(self._order_polls, retry_after)
        self._order_polls += 1
        return []

    def _finalize(self) -> list[Command]:
        self.state = OrderState.FINALIZING
        self._timers.clear()
        return [*self._cleanups(), FinalizeOrder(self.order.finalize, self.csr_der)]

    def _cleanups(self) -> list[Command]:
        cmds: list[Command] = []
        for slot in self._authzs.values():
            if slot.presented and slot.token is not None:
                cmds.append(CleanupChallenge(slot.domain, slot.token))
                slot.presented = False
        return cmds

    def _fail(self, error: AcmeError) -> list[Command]:
        self.state = OrderState.FAILED
        self._timers.clear()
        return [*self._cleanups(), OrderFailed(error)]
