r"""LoadMaster's Let's Encrypt codes: the codes, the error that carries them, the mapping of
acmeclient's errors to them (by type), and the two log files they are written to.

Every ACME problem becomes an `LeError(code, text)` and one line in the System Message File in
LoadMaster's exact shape, `<time, +00:00> <hostname> Acme: <text> (code: N)`: the line always ends
in `(code: N)`, and a sub-code (code 17) is part of the text (`..., sub-code 2 (code: 17)`), so one
pattern, `\(code: \d+\)$`, finds every coded line. Account and certificate events go to the Audit
LogFile. The codes are those of the LoadMaster Let's Encrypt troubleshooting table.
"""

from __future__ import annotations

import enum
import json
import logging
import os
import re
import socket
import threading
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

from acmeclient.errors import (
    AccountDoesNotExistError,
    AcmeError,
    AcmeProblem,
    AcmeTimeoutError,
    CryptoError,
    MalformedResponseError,
    NetworkError,
    NoSupportedChallengeError,
    ResponderError,
    UnexpectedStatusError,
    ValidationError,
)

from ..errors import LBProxyError

logger = logging.getLogger(__name__)

SYSTEM_MESSAGE_FILE = "system-messages.log"
AUDIT_LOG_FILE = "audit.log"
# One log line stays readable: the CA's answers are cut at this many characters.
MAX_TEXT = 2000


class AcmeCode(enum.IntEnum):
    """LoadMaster's Let's Encrypt troubleshooting codes."""

    NETWORK = 3                 # network failure reaching the CA
    HTTP_STATUS = 4             # the CA answered non-2xx (with its response)
    BAD_DIRECTORY = 5           # the directory cannot be fetched or parsed
    ACCOUNT_EXISTS = 6          # registering an account that is already registered
    INVALID_ACCOUNT_KEY = 7     # the generated or uploaded account key is invalid
    NOT_REGISTERED = 8          # no account registered (or the CA does not know it)
    INVALID_STORED_KEY = 9      # the stored account key cannot be read
    ACCOUNT_WITHOUT_URL = 10    # an account ID without URL
    NO_HTTP01 = 11              # the CA offered no http-01 challenge (no challenge of the
                                # certificate's type; a wildcard without dns-01, before ordering)
    UNREQUESTED_NAME = 12       # an authorization for a name that was not requested
    VALIDATION_FAILED = 13      # validation failed (with the CA's challenge JSON)
    UNKNOWN_CERT_STATUS = 14    # a certificate/order status that is not understood
    UNPARSABLE_CERT = 15        # the issued certificate cannot be parsed
    NAMES_VS_MISMATCH = 16      # names and VSs do not match
    VS_VERIFY = 17              # VS verification failed (sub-codes below)
    NO_DOMAIN = 18              # no domain to sign
    ADD_RULE = 20               # failed to add the challenge content rule
    ADD_SUBVS = 21              # failed to add the challenge SubVS
    ASSIGN_RULE = 22            # failed to assign the rule to the SubVS
    SET_PRECEDENCE = 23         # failed to give the rule first precedence
    SET_ERROR_RESPONSE = 24     # failed to set the SubVS's "not available" response
    SET_ERROR_PAGE = 25         # failed to set the SubVS's error page (the key authorization)
    # lbproxy's own, numbered from 101 so that they never clash with LoadMaster's table:
    RESTORE_FAILED = 101        # a backup was not restored (passphrase, damaged, crafted entry)
    NOT_RESTORED = 102          # a part of a restored backup could not be restored here
    CHALLENGE_PUBLISH = 103     # a tls-alpn-01 certificate or dns-01 record was not put in place
    CHALLENGE_UNAVAILABLE = 104  # the certificate's challenge type has no solver here (dns-01)
    # dns-01 by RFC 2136 (dns01.py): each needs another fix, so each has its code.
    DNS_UPDATE_REFUSED = 105    # the DNS server refused the update or the TSIG key (its rcode)
    DNS_UNREACHABLE = 106       # the DNS server did not answer (refused, timeout, bad answer)
    DNS_NOT_PROPAGATED = 107    # a checked server did not show the record in time
    DNS_NO_ZONE = 108           # no zone holds the name on the server (or not inside `zone`)


class VSSubCode(enum.IntEnum):
    """Sub-codes of code 17."""

    MISSING = 1          # the VS named in the order does not exist
    DELETED = 2          # the VS existed when the certificate was requested and is gone
    NOT_ELIGIBLE = 3     # the VS exists but can no longer take a challenge SubVS
    NOT_HTTPS = 4        # tls-alpn-01: the VS is not an HTTPS VS (no TLS handshake to answer)


# Which HTTP status an admin API answer should carry for each code.
_STATUS: dict[int, int] = {
    AcmeCode.NETWORK: 502, AcmeCode.HTTP_STATUS: 502, AcmeCode.BAD_DIRECTORY: 502,
    AcmeCode.ACCOUNT_EXISTS: 409, AcmeCode.INVALID_ACCOUNT_KEY: 400,
    AcmeCode.NOT_REGISTERED: 409, AcmeCode.INVALID_STORED_KEY: 500,
    AcmeCode.ACCOUNT_WITHOUT_URL: 409, AcmeCode.NO_HTTP01: 502, AcmeCode.UNREQUESTED_NAME: 502,
    AcmeCode.VALIDATION_FAILED: 502, AcmeCode.UNKNOWN_CERT_STATUS: 502,
    AcmeCode.UNPARSABLE_CERT: 502, AcmeCode.NAMES_VS_MISMATCH: 400, AcmeCode.VS_VERIFY: 400,
    AcmeCode.NO_DOMAIN: 400, AcmeCode.CHALLENGE_PUBLISH: 500,
    AcmeCode.CHALLENGE_UNAVAILABLE: 400, AcmeCode.DNS_UPDATE_REFUSED: 502,
    AcmeCode.DNS_UNREACHABLE: 502, AcmeCode.DNS_NOT_PROPAGATED: 502, AcmeCode.DNS_NO_ZONE: 502,
}


class LeError(LBProxyError):
    """A Let's Encrypt operation failed with a LoadMaster code (and sub-code for 17)."""

    def __init__(
        self,
        code: int,
        text: str,
        *,
        subcode: int | None = None,
        retry_after: float | None = None,
        status: int | None = None,
    ) -> None:
        self.code = int(code)
        self.subcode = subcode
        self.text = text
        self.retry_after = retry_after
        self.status = status if status is not None else _STATUS.get(self.code, 500)
        super().__init__(text)

    @property
    def message(self) -> str:
        """The text as logged and answered: with the sub-code, if any, at its end."""
        return self.text if self.subcode is None else f"{self.text}, sub-code {self.subcode}"

    def __str__(self) -> str:
        # Built at each call: callers prefix `text` with the certificate after construction.
        return f"{self.message} ({code_suffix(self.code)})"


def code_suffix(code: int) -> str:
    """LoadMaster's code marker, without its parentheses: every coded line ends in `(code: N)`."""
    return f"code: {code}"


_PEM_BLOCK = re.compile(r"-----BEGIN [A-Z ]+-----.*?-----END [A-Z ]+-----", re.S)


def _one_line(text: str) -> str:
    """Keys never reach a log; neither do newlines (one event, one line)."""
    text = _PEM_BLOCK.sub("<pem>", text)
    text = " ".join(text.split())
    return text if len(text) <= MAX_TEXT else text[: MAX_TEXT - 3] + "..."


def _problem_json(exc: AcmeProblem | ValidationError) -> str:
    if exc.problem is None:
        return "{}"
    return json.dumps(exc.problem.to_json(), sort_keys=True)


def classify(exc: BaseException, *, action: str) -> LeError:
    """The LoadMaster code of an acmeclient (or responder) failure during `action`."""
    if isinstance(exc, LeError):
        return exc
    if isinstance(exc, ResponderError) and isinstance(exc.__cause__, LeError):
        return exc.__cause__
    if isinstance(exc, AccountDoesNotExistError):
        return LeError(AcmeCode.NOT_REGISTERED,
                       f"{action}: the CA does not know this account: {_problem_json(exc)}")
    if isinstance(exc, AcmeProblem):
        return LeError(
            AcmeCode.HTTP_STATUS,
            f"{action}: the CA answered HTTP {exc.status}: {_problem_json(exc)}",
            retry_after=exc.retry_after,
        )
    if isinstance(exc, ValidationError):
        if not exc.identifier:
            # About the order itself, not a name's challenge: it ended invalid outside any
            # challenge (at finalize, with or without the CA's reason), has a status it cannot
            # have at this step, or is valid without a certificate URL: code 14, not 13.
            return LeError(AcmeCode.UNKNOWN_CERT_STATUS,
                           f"{action}: order status not understood: {exc}")
        return LeError(AcmeCode.VALIDATION_FAILED,
                       f"{action}: validation failed for {exc.identifier}: {_problem_json(exc)}")
    if isinstance(exc, NetworkError | AcmeTimeoutError):
        return LeError(AcmeCode.NETWORK, f"{action}: network failure: {exc}")
    if isinstance(exc, UnexpectedStatusError):  # non-2xx without a problem document
        return LeError(AcmeCode.HTTP_STATUS, f"{action}: {exc}", retry_after=exc.retry_after)
    if isinstance(exc, MalformedResponseError):
        return LeError(AcmeCode.UNKNOWN_CERT_STATUS, f"{action}: unexpected CA answer: {exc}")
    if isinstance(exc, NoSupportedChallengeError):
        return LeError(AcmeCode.NO_HTTP01, f"{action}: {exc}")
    if isinstance(exc, CryptoError):
        return LeError(AcmeCode.UNPARSABLE_CERT, f"{action}: {exc}")
    if isinstance(exc, ResponderError):
        return LeError(AcmeCode.ADD_SUBVS, f"{action}: {exc}")
    if isinstance(exc, AcmeError):
        return LeError(AcmeCode.HTTP_STATUS, f"{action}: {exc}")
    return LeError(AcmeCode.NETWORK, f"{action}: {type(exc).__name__}: {exc}")


def rfc3339(when: datetime) -> str:
    """LoadMaster's timestamp: RFC 3339 in UTC, seconds, offset written `+00:00` (never `Z`)."""
    return when.astimezone(UTC).isoformat(timespec="seconds")


class AcmeLog:
    """Appends to the System Message File and the Audit LogFile in the state directory."""

    def __init__(
        self,
        state_dir: Path,
        *,
        now: Callable[[], datetime] = lambda: datetime.now(UTC),
        hostname: str | None = None,
    ) -> None:
        self.messages_path = state_dir / SYSTEM_MESSAGE_FILE
        self.audit_path = state_dir / AUDIT_LOG_FILE
        self._now = now
        self._host = hostname or socket.gethostname()
        self._lock = threading.Lock()

    def _append(self, path: Path, line: str) -> None:
        # A full or read-only state directory must not turn the report of a problem into a
        # second, unreported one: the line still reaches the process log.
        try:
            with self._lock:
                try:
                    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
                except FileNotFoundError:   # the first line in a new state directory
                    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
                    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
                try:
                    os.write(fd, (line + "\n").encode("utf-8", "replace"))
                finally:
                    os.close(fd)
        except OSError as exc:
            logger.error("cannot append to %s (%s): %s", path, exc.strerror or exc, line)

    def error(self, text: str) -> None:
        """A problem that has no Let's Encrypt code (damaged state, a failed state write): the
        System Message File and the process log."""
        line = f"{rfc3339(self._now())} {self._host} Acme: {_one_line(text)}"
        logger.error("%s", line)
        self._append(self.messages_path, line)

    def problem(self, err: LeError) -> None:
        """One ACME problem, with its code, in the System Message File."""
        line = (f"{rfc3339(self._now())} {self._host} Acme: {_one_line(err.message)} "
                f"({code_suffix(err.code)})")
        logger.warning("%s", line)
        self._append(self.messages_path, line)

    def info(self, text: str) -> None:
        """A non-problem ACME event in the System Message File (no code)."""
        self._append(self.messages_path,
                     f"{rfc3339(self._now())} {self._host} Acme: {_one_line(text)}")

    def audit(self, text: str) -> None:
        """Account registered, certificate issued/renewed/deleted: the Audit LogFile."""
        line = f"{rfc3339(self._now())} {self._host} Acme: {_one_line(text)}"
        logger.info("%s", line)
        self._append(self.audit_path, line)
        self._append(self.messages_path, line)

    def codes(self) -> list[tuple[int, int | None]]:
        """Every (code, sub-code) in the System Message File, in order (for tests and tools)."""
        try:
            text = self.messages_path.read_text()
        except FileNotFoundError:
            return []
        out = []
        for m in _CODED_LINE.finditer(text):
            out.append((int(m.group(2)), int(m.group(1)) if m.group(1) else None))
        return out


# A coded line's end: `..., sub-code S (code: N)` or `... (code: N)`.
_CODED_LINE = re.compile(r"(?:, sub-code (\d+))? \(code: (\d+)\)$", re.M)
