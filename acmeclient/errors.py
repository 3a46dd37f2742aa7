"""Every exception acmeclient raises, one tree, each carrying what a caller needs to react.

AcmeError
├── AcmeProblem                   an RFC 7807 problem document from the CA (RFC 8555 §6.7)
│   ├── AccountDoesNotExistError  urn:ietf:params:acme:error:accountDoesNotExist
│   ├── AlreadyReplacedError      ...:alreadyReplaced (RFC 9773 §5)
│   ├── AlreadyRevokedError       ...:alreadyRevoked
│   ├── BadCSRError               ...:badCSR
│   ├── BadNonceError             ...:badNonce (retried by the transport before it surfaces)
│   ├── BadPublicKeyError         ...:badPublicKey
│   ├── BadRevocationReasonError  ...:badRevocationReason
│   ├── BadSignatureAlgorithmError ...:badSignatureAlgorithm
│   ├── CAAError                  ...:caa
│   ├── CompoundError             ...:compound (see .subproblems)
│   ├── ConflictError             ...:conflict (RFC 9773, a replacement conflict)
│   ├── ConnectionProblemError    ...:connection
│   ├── DNSError                  ...:dns
│   ├── ExternalAccountRequiredError ...:externalAccountRequired
│   ├── IncorrectResponseError    ...:incorrectResponse
│   ├── InvalidContactError       ...:invalidContact
│   ├── InvalidProfileError       ...:invalidProfile (ACME profiles draft)
│   ├── MalformedError            ...:malformed
│   ├── OrderNotReadyError        ...:orderNotReady
│   ├── RateLimitedError          ...:rateLimited (see .retry_after)
│   ├── RejectedIdentifierError   ...:rejectedIdentifier
│   ├── ServerInternalError       ...:serverInternal
│   ├── TLSProblemError           ...:tls
│   ├── UnauthorizedError         ...:unauthorized
│   ├── UnsupportedContactError   ...:unsupportedContact
│   ├── UnsupportedIdentifierError ...:unsupportedIdentifier
│   └── UserActionRequiredError   ...:userActionRequired
├── ValidationError               a challenge/order became "invalid"; carries the CA's problem
├── TransportError                the exchange itself failed
│   ├── NetworkError              refused/reset connection, TLS handshake/verification failure
│   ├── AcmeTimeoutError          a named deadline passed (request or order)
│   └── MalformedResponseError    an answer that is not what RFC 8555 says it must be
│       └── UnexpectedStatusError non-2xx without a problem document (.status, .retry_after)
├── ResponderError                the HTTP-01 responder failed to present or clean up
├── ClientStateError              asked for something out of order (no account yet,
│   │                             unsupported profile, an event the order machine cannot take)
│   └── NoSupportedChallengeError an authorization offers no challenge of the responder's type
└── CryptoError                   bad key/CSR/certificate input: unreadable PEM or JWK, wrong
                                  passphrase, unsupported key type, invalid subject field

Below the tree stands what AcmeProblem and ValidationError carry, the CA's problem document
(`Problem`: RFC 7807 with ACME's subproblems and `Identifier`), and the JSON readers that raise
MalformedResponseError. They live here so that this module imports no other of acmeclient: the
wire objects (acmeclient.messages) build on it, never the other way round.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

ACME_ERROR_PREFIX = "urn:ietf:params:acme:error:"


class AcmeError(Exception):
    """Base of every acmeclient error."""


class AcmeProblem(AcmeError):
    """The CA answered with a problem document; subclasses name the ACME error type."""

    def __init__(
        self,
        problem: Problem,
        *,
        status: int | None = None,
        retry_after: float | None = None,
    ) -> None:
        self.problem = problem
        self.status = status if status is not None else problem.status
        self.retry_after = retry_after
        super().__init__(f"{problem.type}: {problem.detail}" if problem.detail else problem.type)

    @property
    def type(self) -> str:
        return self.problem.type

    @property
    def detail(self) -> str:
        return self.problem.detail

    @property
    def subproblems(self) -> tuple[Problem, ...]:
        return self.problem.subproblems


class AccountDoesNotExistError(AcmeProblem):
    pass


class AlreadyReplacedError(AcmeProblem):
    pass


class AlreadyRevokedError(AcmeProblem):
    pass


class BadCSRError(AcmeProblem):
    pass


class BadNonceError(AcmeProblem):
    pass


class BadPublicKeyError(AcmeProblem):
    pass


class BadRevocationReasonError(AcmeProblem):
    pass


class BadSignatureAlgorithmError(AcmeProblem):
    pass


class CAAError(AcmeProblem):
    pass


class CompoundError(AcmeProblem):
    pass


class ConflictError(AcmeProblem):
    pass


class ConnectionProblemError(AcmeProblem):
    pass


class DNSError(AcmeProblem):
    pass


class ExternalAccountRequiredError(AcmeProblem):
    pass


class IncorrectResponseError(AcmeProblem):
    pass


class InvalidContactError(AcmeProblem):
    pass


class InvalidProfileError(AcmeProblem):
    pass


class MalformedError(AcmeProblem):
    pass


class OrderNotReadyError(AcmeProblem):
    pass


class RateLimitedError(AcmeProblem):
    pass


class RejectedIdentifierError(AcmeProblem):
    pass


class ServerInternalError(AcmeProblem):
    pass


class TLSProblemError(AcmeProblem):
    pass


class UnauthorizedError(AcmeProblem):
    pass


class UnsupportedContactError(AcmeProblem):
    pass


class UnsupportedIdentifierError(AcmeProblem):
    pass


class UserActionRequiredError(AcmeProblem):
    pass


_BY_TYPE: dict[str, type[AcmeProblem]] = {
    "accountDoesNotExist": AccountDoesNotExistError,
    "alreadyReplaced": AlreadyReplacedError,
    "alreadyRevoked": AlreadyRevokedError,
    "badCSR": BadCSRError,
    "badNonce": BadNonceError,
    "badPublicKey": BadPublicKeyError,
    "badRevocationReason": BadRevocationReasonError,
    "badSignatureAlgorithm": BadSignatureAlgorithmError,
    "caa": CAAError,
    "compound": CompoundError,
    "conflict": ConflictError,
    "connection": ConnectionProblemError,
    "dns": DNSError,
    "externalAccountRequired": ExternalAccountRequiredError,
    "incorrectResponse": IncorrectResponseError,
    "invalidContact": InvalidContactError,
    "invalidProfile": InvalidProfileError,
    "malformed": MalformedError,
    "orderNotReady": OrderNotReadyError,
    "rateLimited": RateLimitedError,
    "rejectedIdentifier": RejectedIdentifierError,
    "serverInternal": ServerInternalError,
    "tls": TLSProblemError,
    "unauthorized": UnauthorizedError,
    "unsupportedContact": UnsupportedContactError,
    "unsupportedIdentifier": UnsupportedIdentifierError,
    "userActionRequired": UserActionRequiredError,
}


def problem_error(
    problem: Problem, *, status: int | None = None, retry_after: float | None = None
) -> AcmeProblem:
    """Map a problem document to its typed error (plain AcmeProblem for unknown types)."""
    cls = AcmeProblem
    if problem.type.startswith(ACME_ERROR_PREFIX):
        cls = _BY_TYPE.get(problem.type[len(ACME_ERROR_PREFIX) :], AcmeProblem)
    return cls(problem, status=status, retry_after=retry_after)


class ValidationError(AcmeError):
    """A challenge, authorization or order became invalid; `problem` is the CA's reason."""

    def __init__(self, message: str, problem: Problem | None, *, identifier: str = "") -> None:
        self.problem = problem
        self.identifier = identifier
        detail = f": {problem.type}: {problem.detail}" if problem is not None else ""
        super().__init__(message + detail)

    @property
    def type(self) -> str:
        return self.problem.type if self.problem is not None else ""

    @property
    def detail(self) -> str:
        return self.problem.detail if self.problem is not None else ""


class TransportError(AcmeError):
    """The HTTP exchange with the CA failed before a usable answer arrived."""


class NetworkError(TransportError):
    """Connection, TLS handshake or certificate verification failure."""


class AcmeTimeoutError(TransportError):
    """A named deadline passed."""


class MalformedResponseError(TransportError):
    """The CA's answer violates RFC 8555 (bad JSON, missing field or header)."""


class UnexpectedStatusError(MalformedResponseError):
    """A non-2xx answer without a problem document (a proxy's 502, a CA's bare 503): `status`
    and the Retry-After it carried (seconds, or None) let the caller back off correctly."""

    def __init__(self, message: str, *, status: int, retry_after: float | None = None) -> None:
        self.status = status
        self.retry_after = retry_after
        super().__init__(message)


class ResponderError(AcmeError):
    """The pluggable HTTP-01 responder raised while presenting or cleaning up a challenge."""


class ClientStateError(AcmeError):
    """The caller asked for something the current state does not allow."""


class NoSupportedChallengeError(ClientStateError):
    """The CA offered no challenge of the type the responder answers (`wanted`, http-01 by
    default) for `identifier`; `offered` lists the challenge types it did offer."""

    def __init__(self, identifier: str, offered: tuple[str, ...] = (),
                 wanted: str = "http-01") -> None:
        self.identifier = identifier
        self.offered = offered
        self.wanted = wanted
        listed = ", ".join(offered) if offered else "none"
        super().__init__(f"the CA offers no {wanted} challenge for {identifier} "
                         f"(offered: {listed})")


class CryptoError(AcmeError):
    """Unusable key, CSR or certificate input (including a wrong passphrase)."""


# -- the problem document these errors carry, and the JSON readers that raise ---------------------


def json_object(obj: object, what: str) -> Mapping[str, Any]:
    """`obj` as a JSON object, or MalformedResponseError naming `what`."""
    if not isinstance(obj, Mapping):
        raise MalformedResponseError(f"{what}: not a JSON object")
    return obj


def required(obj: Mapping[str, Any], key: str, kind: type, what: str) -> Any:
    """Field `key` of `what`, which must be there and of type `kind`."""
    if key not in obj:
        raise MalformedResponseError(f"{what}: missing field {key!r}")
    value = obj[key]
    if not isinstance(value, kind):
        raise MalformedResponseError(f"{what}: field {key!r} is not {kind.__name__}")
    return value


def optional(obj: Mapping[str, Any], key: str, kind: type, what: str) -> Any:
    """Field `key` of `what`, None when absent, else of type `kind`."""
    value = obj.get(key)
    if value is not None and not isinstance(value, kind):
        raise MalformedResponseError(f"{what}: field {key!r} is not {kind.__name__}")
    return value


@dataclass(frozen=True, slots=True)
class Identifier:
    """RFC 8555 §9.7.7; only "dns" is used by this client."""

    value: str
    type: str = "dns"

    @classmethod
    def from_json(cls, obj: object) -> Identifier:
        o = json_object(obj, "identifier")
        return cls(value=required(o, "value", str, "identifier"),
                   type=required(o, "type", str, "identifier"))

    def to_json(self) -> dict[str, Any]:
        return {"type": self.type, "value": self.value}


@dataclass(frozen=True, slots=True)
class Problem:
    """RFC 7807 problem document with ACME subproblems (RFC 8555 §6.7.1)."""

    type: str
    detail: str = ""
    status: int | None = None
    subproblems: tuple[Problem, ...] = ()
    identifier: Identifier | None = None

    @classmethod
    def from_json(cls, obj: object) -> Problem:
        o = json_object(obj, "problem")
        subs = optional(o, "subproblems", list, "problem") or []
        ident = o.get("identifier")
        status = o.get("status")
        return cls(
            type=optional(o, "type", str, "problem") or "about:blank",
            detail=optional(o, "detail", str, "problem") or "",
            status=status if isinstance(status, int) else None,
            subproblems=tuple(cls.from_json(s) for s in subs),
            identifier=Identifier.from_json(ident) if ident is not None else None,
        )

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"type": self.type}
        if self.detail:
            out["detail"] = self.detail
        if self.status is not None:
            out["status"] = self.status
        if self.subproblems:
            out["subproblems"] = [s.to_json() for s in self.subproblems]
        if self.identifier is not None:
            out["identifier"] = self.identifier.to_json()
        return out
