"""I/O-free unit tests: the order machine (table-driven, fake time), messages, keys, JWS, errors."""

from __future__ import annotations

import base64
import json
from typing import Any

import josepy
import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID

from acmeclient.crypto import (
    CsrSubject,
    KeyType,
    generate_key,
    key_type_of,
    load_account_key,
    make_csr,
    private_key_to_pem,
)
from acmeclient.errors import (
    AcmeProblem,
    AcmeTimeoutError,
    BadNonceError,
    ClientStateError,
    CompoundError,
    CryptoError,
    InvalidProfileError,
    MalformedResponseError,
    RateLimitedError,
    ValidationError,
    problem_error,
)
from acmeclient.jws import JwsKey, b64url, b64url_decode, external_account_binding
from acmeclient.messages import Authorization, Directory, Order, Problem, Status
from acmeclient.order import (
    AuthorizationFetched,
    ChallengePresented,
    ChallengeResponded,
    CleanupChallenge,
    CommandFailed,
    FetchAuthorization,
    FinalizeOrder,
    OrderDone,
    OrderFailed,
    OrderMachine,
    OrderState,
    OrderUpdated,
    PollOrder,
    PollPolicy,
    PresentChallenge,
    RespondChallenge,
)
from acmeclient.transport import parse_links, parse_retry_after

# ---- order machine


def order(status: str, authzs: int = 1, cert: str | None = None, **extra: Any) -> Order:
    obj: dict[str, Any] = {
        "status": status,
        "identifiers": [{"type": "dns", "value": f"n{i}.example"} for i in range(authzs)],
        "authorizations": [f"https://ca/authz/{i}" for i in range(authzs)],
        "finalize": "https://ca/order/1/finalize",
        **extra,
    }
    if cert:
        obj["certificate"] = cert
    return Order.from_json(obj)


def authz(i: int, status: str, chal_status: str = "pending", error: Any = None) -> Authorization:
    chal: dict[str, Any] = {
        "type": "http-01",
        "url": f"https://ca/chall/{i}",
        "token": f"tok{i}",
        "status": chal_status,
    }
    if error:
        chal["error"] = error
    return Authorization.from_json(
        {
            "identifier": {"type": "dns", "value": f"n{i}.example"},
            "status": status,
            "challenges": [
                {"type": "dns-01", "url": "https://ca/x", "token": "t", "status": "pending"},
                chal,
            ],
        }
    )


def machine(o: Order) -> OrderMachine:
    return OrderMachine("https://ca/order/1", o, "THUMB", b"csr", PollPolicy(first=0.02, cap=1.0))


def test_happy_path_two_authorizations() -> None:
    m = machine(order("pending", 2))
    assert m.start(100.0) == [FetchAuthorization("https://ca/authz/0"),
                              FetchAuthorization("https://ca/authz/1")]  # fmt: skip
    cmds = m.handle(AuthorizationFetched("https://ca/authz/0", authz(0, "pending")), 100.0)
    assert cmds == [
        PresentChallenge("https://ca/authz/0", "https://ca/chall/0", "n0.example", "tok0",
                         "tok0.THUMB")
    ]  # fmt: skip
    # the second one was already valid (authorization reuse): nothing to present
    assert m.handle(AuthorizationFetched("https://ca/authz/1", authz(1, "valid")), 100.0) == []
    assert m.handle(ChallengePresented("https://ca/authz/0", "https://ca/chall/0"), 100.0) == [
        RespondChallenge("https://ca/authz/0", "https://ca/chall/0")
    ]
    chal = authz(0, "pending").challenges[1]
    assert m.handle(ChallengeResponded("https://ca/authz/0", chal), 100.0) == []
    assert m.next_deadline() == pytest.approx(100.02)
    assert m.handle_timer(100.01) == []
    assert m.handle_timer(100.02) == [FetchAuthorization("https://ca/authz/0")]
    # still pending: backoff doubles
    assert m.handle(AuthorizationFetched("https://ca/authz/0", authz(0, "pending")), 100.03) == []
    assert m.next_deadline() == pytest.approx(100.07)
    cmds = m.handle(AuthorizationFetched("https://ca/authz/0", authz(0, "valid")), 100.08)
    assert cmds == [CleanupChallenge("n0.example", "tok0"),
                    FinalizeOrder("https://ca/order/1/finalize", b"csr")]  # fmt: skip
    assert m.state is OrderState.FINALIZING
    assert m.handle(OrderUpdated(order("processing", 2)), 100.1) == []
    assert m.handle_timer(100.12) == [PollOrder("https://ca/order/1")]
    done = order("valid", 2, cert="https://ca/cert/1")
    assert m.handle(OrderUpdated(done), 100.13) == [OrderDone(done)]
    assert m.state is OrderState.DONE and m.next_deadline() is None


def test_retry_after_overrides_backoff_and_is_clamped() -> None:
    m = OrderMachine("https://ca/o", order("processing"), "T", b"c", PollPolicy(order_timeout=900))
    assert m.start(0.0) == []
    m.handle(OrderUpdated(order("processing"), retry_after=7.0), 0.0)
    assert m.next_deadline() == 7.0
    m.handle(OrderUpdated(order("processing"), retry_after=10_000.0), 7.0)
    assert m.next_deadline() == 7.0 + 600.0


def test_backoff_is_capped() -> None:
    policy = PollPolicy(first=0.02, factor=2.0, cap=1.0)
    assert [policy.delay(i, None) for i in range(8)] == [0.02, 0.04, 0.08, 0.16, 0.32, 0.64,
                                                         1.0, 1.0]  # fmt: skip


def test_invalid_challenge_fails_with_the_ca_problem_and_cleans_up() -> None:
    m = machine(order("pending"))
    m.start(0.0)
    m.handle(AuthorizationFetched("https://ca/authz/0", authz(0, "pending")), 0.0)
    m.handle(ChallengePresented("https://ca/authz/0", "https://ca/chall/0"), 0.0)
    err = {"type": "urn:ietf:params:acme:error:unauthorized", "detail": "wrong key auth"}
    cmds = m.handle(AuthorizationFetched("https://ca/authz/0", authz(0, "invalid", "invalid",
                                                                     err)), 0.1)  # fmt: skip
    assert cmds[0] == CleanupChallenge("n0.example", "tok0")
    failed = cmds[1]
    assert isinstance(failed, OrderFailed) and isinstance(failed.error, ValidationError)
    assert failed.error.detail == "wrong key auth"
    assert failed.error.identifier == "n0.example"
    assert m.state is OrderState.FAILED


def test_order_deadline() -> None:
    m = OrderMachine("https://ca/o", order("pending"), "T", b"c", PollPolicy(order_timeout=5.0))
    m.start(0.0)
    assert m.next_deadline() == 5.0
    cmds = m.handle_timer(5.0)
    assert isinstance(cmds[-1], OrderFailed)
    assert isinstance(cmds[-1].error, AcmeTimeoutError)


def test_command_failure_and_events_out_of_state() -> None:
    m = machine(order("ready"))
    assert m.start(0.0) == [FinalizeOrder("https://ca/order/1/finalize", b"csr")]
    with pytest.raises(ClientStateError, match="finalizing"):
        m.handle(ChallengePresented("a", "b"), 0.0)
    problem = problem_error(Problem("urn:ietf:params:acme:error:orderNotReady"))
    assert m.handle(CommandFailed(problem), 0.0) == [OrderFailed(problem)]
    with pytest.raises(ClientStateError, match="failed"):
        m.handle(OrderUpdated(order("valid", cert="x")), 0.0)
    with pytest.raises(ClientStateError, match="new"):
        machine(order("pending")).handle(OrderUpdated(order("pending")), 0.0)


@pytest.mark.parametrize(
    ("status", "expected"),
    [("valid", OrderDone), ("invalid", OrderFailed), ("ready", FinalizeOrder)],
)
def test_start_from_each_order_status(status: str, expected: type) -> None:
    m = machine(order(status, cert="https://ca/cert/1" if status == "valid" else None))
    assert isinstance(m.start(0.0)[-1], expected)


def test_no_http01_challenge_offered() -> None:
    m = machine(order("pending"))
    m.start(0.0)
    only_dns = Authorization.from_json(
        {"identifier": {"type": "dns", "value": "x"}, "status": "pending",
         "challenges": [{"type": "dns-01", "url": "u", "token": "t", "status": "pending"}]}
    )  # fmt: skip
    cmds = m.handle(AuthorizationFetched("https://ca/authz/0", only_dns), 0.0)
    assert isinstance(cmds[-1], OrderFailed) and "http-01" in str(cmds[-1].error)


# ---- messages and errors


def test_messages_round_trip() -> None:
    d = {
        "newNonce": "n", "newAccount": "a", "newOrder": "o", "revokeCert": "r",
        "keyChange": "k", "renewalInfo": "ri",
        "meta": {"termsOfService": "tos", "externalAccountRequired": True,
                 "profiles": {"classic": "c"}},
    }  # fmt: skip
    directory = Directory.from_json(d)
    assert directory.meta.external_account_required and directory.meta.profiles == {"classic": "c"}
    assert Directory.from_json(directory.to_json()) == directory
    o = order("pending", 3, profile="classic", replaces="a.b", notBefore="2025-01-01T00:00:00Z")
    assert Order.from_json(o.to_json()) == o and o.profile == "classic"
    a = authz(0, "pending")
    assert Authorization.from_json(a.to_json()) == a
    assert Status("processing") is Status.PROCESSING


def test_malformed_answers_are_typed() -> None:
    with pytest.raises(MalformedResponseError, match="missing field 'newAccount'"):
        Directory.from_json({"newNonce": "n"})
    with pytest.raises(MalformedResponseError, match="unknown status"):
        order("exploded")
    with pytest.raises(MalformedResponseError, match="not a JSON object"):
        Order.from_json([1, 2])


def test_problem_mapping_carries_everything() -> None:
    p = Problem.from_json(
        {
            "type": "urn:ietf:params:acme:error:compound",
            "detail": "two problems",
            "status": 403,
            "subproblems": [
                {
                    "type": "urn:ietf:params:acme:error:rejectedIdentifier",
                    "detail": "x",
                    "identifier": {"type": "dns", "value": "bad.example"},
                },
                {"type": "urn:ietf:params:acme:error:caa", "detail": "y"},
            ],
        }
    )
    err = problem_error(p, retry_after=30.0)
    assert isinstance(err, CompoundError)
    assert err.status == 403 and err.retry_after == 30.0 and err.detail == "two problems"
    assert err.subproblems[0].identifier is not None
    assert err.subproblems[0].identifier.value == "bad.example"
    rl = problem_error(Problem("urn:ietf:params:acme:error:rateLimited"), status=429)
    assert isinstance(rl, RateLimitedError) and rl.status == 429
    assert isinstance(problem_error(Problem("urn:ietf:params:acme:error:badNonce")), BadNonceError)
    prof = problem_error(Problem("urn:ietf:params:acme:error:invalidProfile"))
    assert isinstance(prof, InvalidProfileError)
    other = problem_error(Problem("about:blank"))
    assert type(other) is AcmeProblem


def test_retry_after_and_links() -> None:
    assert parse_retry_after("120", 0.0) == 120.0
    assert parse_retry_after("Thu, 01 Jan 1970 00:01:00 GMT", 30.0) == 30.0
    assert parse_retry_after("soon", 0.0) is None
    assert parse_retry_after(None, 0.0) is None
    links = parse_links(
        ['<https://ca/dir>;rel="index", </cert/1/alt/1>;rel="alternate"',
         '<https://ca/cert/1/alt/2>; rel=alternate'],
        "https://ca/cert/1",
    )  # fmt: skip
    assert links == (("https://ca/dir", "index"), ("https://ca/cert/1/alt/1", "alternate"),
                     ("https://ca/cert/1/alt/2", "alternate"))  # fmt: skip


# ---- keys, CSR, JWS


@pytest.mark.parametrize("kt", list(KeyType))
def test_every_key_type_generates_signs_and_verifies(kt: KeyType) -> None:
    key = generate_key(kt)
    assert key_type_of(key) is kt
    jk = JwsKey.from_key(key)
    jws = jk.sign({"hello": 1}, url="https://ca/x", nonce="N", kid=None)
    protected = json.loads(b64url_decode(jws["protected"]))
    assert protected["nonce"] == "N" and protected["url"] == "https://ca/x"
    pub = josepy.JWK.from_json(protected["jwk"])
    alg = josepy.JWASignature.from_json(protected["alg"])
    msg = f"{jws['protected']}.{jws['payload']}".encode()
    assert alg.verify(pub.key, msg, b64url_decode(jws["signature"]))
    assert not alg.verify(pub.key, msg + b"x", b64url_decode(jws["signature"]))
    assert len(jk.thumbprint()) == 43  # SHA-256, base64url without padding


def test_post_as_get_and_kid() -> None:
    jws = JwsKey.from_key(generate_key()).sign(None, url="u", nonce="n", kid="https://ca/acct/1")
    protected = json.loads(b64url_decode(jws["protected"]))
    assert jws["payload"] == "" and protected["kid"] == "https://ca/acct/1"
    assert "jwk" not in protected


def test_thumbprint_rfc7638_example() -> None:
    # RFC 7638 §3.1 example key and thumbprint
    n = (
        "0vx7agoebGcQSuuPiLJXZptN9nndrQmbXEps2aiAFbWhM78LhWx4cbbfAAtVT86zwu1RK7aPFFxuhDR1L6tSoc"
        "_BJECPebWKRXjBZCiFV4n3oknjhMstn64tZ_2W-5JsGY4Hc5n9yBXArwl93lqt7_RN5w6Cf0h4QyQ5v-65YGjQR"
        "0_FDW2QvzqY368QQMicAtaSqzs8KJZgnYb9c7d0zgdAZHzu6qMQvRL5hajrn1n91CbOpbISD08qNLyrdkt-bFTWhA"
        "I4vMQFh6WeZu0fM4lFd2NcRwr3XPksINHaQ-G_xBniIqbw0Ls1jF44-csFCur-kEgU8awapJzKnqDKgw"
    )
    jwk = josepy.JWKRSA.from_json({"kty": "RSA", "n": n, "e": "AQAB"})
    from cryptography.hazmat.primitives import hashes

    assert b64url(jwk.thumbprint(hashes.SHA256)) == "NzbLsXh8uDCcd-6MNwXF4W_7noWXFZAfHkxZsRGC9Xs"


def test_eab_is_hs256_over_the_account_jwk() -> None:
    import hashlib
    import hmac

    account = JwsKey.from_key(generate_key())
    mac_key = b"0123456789abcdef0123456789abcdef"
    eab = external_account_binding(
        account, kid="kid-7", hmac_key_b64=b64url(mac_key), url="https://ca/new-acct"
    )
    protected = json.loads(b64url_decode(eab["protected"]))
    assert protected == {"alg": "HS256", "kid": "kid-7", "url": "https://ca/new-acct"}
    assert json.loads(b64url_decode(eab["payload"])) == account.public_jwk()
    expected = hmac.new(
        mac_key, f"{eab['protected']}.{eab['payload']}".encode(), hashlib.sha256
    ).digest()
    assert b64url_decode(eab["signature"]) == expected


def test_csr_subject_fields_and_sans() -> None:
    key = generate_key(KeyType.RSA_2048)
    subject = CsrSubject(country="DE", state="Berlin", locality="Berlin", organization="Ex",
                         organizational_unit="Ops", email="ops@example.com")  # fmt: skip
    csr = x509.load_der_x509_csr(make_csr(key, ["a.example", "b.example", "a.example"], subject))
    assert csr.is_signature_valid
    get = csr.subject.get_attributes_for_oid
    assert get(NameOID.COMMON_NAME)[0].value == "a.example"
    assert get(NameOID.COUNTRY_NAME)[0].value == "DE"
    assert get(NameOID.ORGANIZATIONAL_UNIT_NAME)[0].value == "Ops"
    assert get(NameOID.EMAIL_ADDRESS)[0].value == "ops@example.com"
    sans = csr.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert sans.get_values_for_type(x509.DNSName) == ["a.example", "b.example"]


@pytest.mark.parametrize("country", ["de", "DEU", "D", "1A"])
def test_country_must_be_two_capital_letters(country: str) -> None:
    with pytest.raises(CryptoError, match="country"):
        CsrSubject(country=country)


def test_load_account_key_pem_encrypted_and_certbot_jwk() -> None:
    ec_key = generate_key(KeyType.EC_P384)
    loaded = load_account_key(private_key_to_pem(ec_key))
    assert isinstance(loaded, ec.EllipticCurvePrivateKey)
    assert loaded.private_numbers() == ec_key.private_numbers()  # type: ignore[union-attr]
    enc = private_key_to_pem(ec_key, b"s3cret")
    assert b"ENCRYPTED" in enc
    assert load_account_key(enc, b"s3cret").public_key() == ec_key.public_key()
    with pytest.raises(CryptoError, match="passphrase"):
        load_account_key(enc, b"wrong")
    with pytest.raises(CryptoError, match="passphrase"):
        load_account_key(enc, None)
    rsa_key = generate_key(KeyType.RSA_2048)
    assert isinstance(rsa_key, rsa.RSAPrivateKey)
    # certbot's private_key.json: a one-line RSA JWK with n e d p q dp dq qi
    jwk_json = json.dumps(josepy.JWKRSA(key=rsa_key).to_json()).encode()
    assert set(json.loads(jwk_json)) >= {"n", "e", "d", "p", "q", "dp", "dq", "qi"}
    from_jwk = load_account_key(jwk_json)
    assert isinstance(from_jwk, rsa.RSAPrivateKey)
    assert from_jwk.private_numbers() == rsa_key.private_numbers()
    public_only = json.dumps(josepy.JWKRSA(key=rsa_key.public_key()).to_json()).encode()
    for bad, match in [
        (public_only, "no private key"),
        (b"{not json", "JWK"),
        (b"hello", "neither PEM nor JWK"),
        (b"-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n", "PEM"),
    ]:
        with pytest.raises(CryptoError, match=match):
            load_account_key(bad)
    small = rsa.generate_private_key(65537, 1024)
    with pytest.raises(CryptoError, match="1024"):
        key_type_of(small)


def test_b64url() -> None:
    assert b64url(b"\xfb\xff") == "-_8"
    assert b64url_decode("-_8") == b"\xfb\xff"
    assert base64.urlsafe_b64decode("-_8=") == b"\xfb\xff"


def test_new_order_payload() -> None:
    from datetime import UTC, datetime

    from acmeclient.messages import Identifier, NewOrder

    body = NewOrder(
        (Identifier("a.example"), Identifier("b.example")),
        not_before=datetime(2025, 1, 1, tzinfo=UTC),
        not_after=datetime(2025, 1, 7, 12, tzinfo=UTC),
        profile="shortlived",
        replaces="aYhba4dGQEHhs3uEe6CuLN4ByNQ.AIdlQyE",
    ).to_json()
    assert body == {
        "identifiers": [
            {"type": "dns", "value": "a.example"},
            {"type": "dns", "value": "b.example"},
        ],
        "notBefore": "2025-01-01T00:00:00Z",
        "notAfter": "2025-01-07T12:00:00Z",
        "profile": "shortlived",
        "replaces": "aYhba4dGQEHhs3uEe6CuLN4ByNQ.AIdlQyE",
    }
    assert NewOrder((Identifier("a.example"),)).to_json() == {
        "identifiers": [{"type": "dns", "value": "a.example"}]
    }
