"""LoadMaster log codes: line format, classification of acmeclient failures, no key material."""

from __future__ import annotations

import re
from datetime import UTC, datetime
from pathlib import Path

from acmeclient.errors import (
    AccountDoesNotExistError,
    AcmeTimeoutError,
    ClientStateError,
    MalformedError,
    MalformedResponseError,
    NetworkError,
    NoSupportedChallengeError,
    RateLimitedError,
    ResponderError,
    UnexpectedStatusError,
    ValidationError,
)
from acmeclient.messages import Problem
from lbproxy.letsencrypt.codes import AcmeCode, AcmeLog, LeError, classify

NOW = datetime(2026, 3, 4, 5, 6, 7, tzinfo=UTC)


def test_line_format_and_files(tmp_path: Path) -> None:
    log = AcmeLog(tmp_path / "state", now=lambda: NOW, hostname="lb1")
    log.problem(LeError(AcmeCode.VS_VERIFY, "VS web is gone", subcode=2))
    log.problem(LeError(AcmeCode.NETWORK, "cannot reach\nthe CA"))
    log.audit("certificate issued: www")
    lines = log.messages_path.read_text().splitlines()
    # LoadMaster's shape: +00:00, never Z; every coded line ends in `(code: N)`, the sub-code
    # is in the text
    assert lines[0] == "2026-03-04T05:06:07+00:00 lb1 Acme: VS web is gone, sub-code 2 (code: 17)"
    assert lines[1] == "2026-03-04T05:06:07+00:00 lb1 Acme: cannot reach the CA (code: 3)"
    assert log.audit_path.read_text() == (
        "2026-03-04T05:06:07+00:00 lb1 Acme: certificate issued: www\n")
    assert all(re.search(r"\(code: \d+\)$", ln) for ln in lines[:2])
    assert log.codes() == [(17, 2), (3, None)]
    # the error's text (API answers, CLI) has the same shape, even when prefixed afterwards
    err = LeError(AcmeCode.VS_VERIFY, "VS web is gone", subcode=2)
    err.text = f"certificate www: {err.text}"
    assert str(err) == "certificate www: VS web is gone, sub-code 2 (code: 17)"
    assert log.messages_path.stat().st_mode & 0o777 == 0o600


def test_keys_never_logged(tmp_path: Path) -> None:
    log = AcmeLog(tmp_path, now=lambda: NOW, hostname="h")
    pem = "-----BEGIN PRIVATE KEY-----\nMIGHAgEAMBMG\n-----END PRIVATE KEY-----"
    log.problem(LeError(AcmeCode.INVALID_ACCOUNT_KEY, f"bad key {pem}"))
    text = log.messages_path.read_text()
    assert "MIGHAgEAMBMG" not in text and "<pem>" in text


def test_classify_acmeclient_errors() -> None:
    prob = Problem("urn:ietf:params:acme:error:malformed", "bad", 400)
    assert classify(NetworkError("refused"), action="x").code == 3
    assert classify(AcmeTimeoutError("slow"), action="x").code == 3
    e = classify(MalformedError(prob, status=400), action="new order")
    assert e.code == 4 and '"detail": "bad"' in e.text and "HTTP 400" in e.text
    rl = classify(RateLimitedError(Problem("urn:ietf:params:acme:error:rateLimited"),
                                   status=429, retry_after=30.0), action="x")
    assert rl.code == 4 and rl.retry_after == 30.0
    assert classify(AccountDoesNotExistError(prob), action="x").code == 8
    v = classify(ValidationError("challenge invalid", Problem(
        "urn:ietf:params:acme:error:unauthorized", "wrong answer"), identifier="a.test"),
        action="x")
    assert v.code == 13 and "a.test" in v.text and "wrong answer" in v.text
    assert classify(NoSupportedChallengeError("a", ("dns-01",)), action="x").code == 11
    # the code comes from the type, not from words in a message
    assert classify(ClientStateError("the CA offers no http-01 challenge for a"),
                    action="x").code != 11
    bare = classify(UnexpectedStatusError("x: HTTP 503 without a problem document",
                                          status=503, retry_after=120.0), action="x")
    assert bare.code == 4 and bare.retry_after == 120.0
    assert classify(MalformedResponseError("order without finalize URL"), action="x").code == 14
    # the order itself, not a name's challenge: 14 whether or not the CA gave a reason
    for problem in (None, Problem("urn:ietf:params:acme:error:badCSR", "weak key", 400)):
        order = classify(ValidationError("order https://ca/o/1 is invalid", problem), action="x")
        assert order.code == 14
    expired = classify(ValidationError("authorization for a.test is expired", None,
                                       identifier="a.test"), action="x")
    assert expired.code == 13 and "a.test" in expired.text
    inner = LeError(AcmeCode.SET_PRECEDENCE, "precedence")
    wrapped = ResponderError("responder failed")
    wrapped.__cause__ = inner
    assert classify(wrapped, action="x") is inner
    assert re.search(r"\(code: 23\)$", str(inner))
