"""The responder seam beyond http-01: the order machine answers the responder's challenge type
(dns-01, tls-alpn-01), wildcard authorizations, the tls-alpn-01 validation certificate (RFC 8737),
and one real tls-alpn-01 order through acmeclient alone against Pebble's validator."""

from __future__ import annotations

import asyncio
import hashlib
import ssl
import tempfile
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec

from acmeclient import AcmeClient, KeyType, generate_key
from acmeclient.challenges import (
    ACME_IDENTIFIER_OID,
    ACME_TLS_ALPN,
    DNS01,
    HTTP01,
    TLS_ALPN01,
    responder_type,
    tls_alpn01_certificate,
)
from acmeclient.errors import ClientStateError, NoSupportedChallengeError, ValidationError
from acmeclient.messages import Authorization, Order
from acmeclient.order import (
    AuthorizationFetched,
    CleanupChallenge,
    FetchAuthorization,
    FinalizeOrder,
    OrderFailed,
    OrderMachine,
    PollPolicy,
    PresentChallenge,
)
from tests.support.pebble import PebbleInstance

ALL = ("http-01", "dns-01", "tls-alpn-01")


def order(names: list[str]) -> Order:
    return Order.from_json({
        "status": "pending",
        "identifiers": [{"type": "dns", "value": n} for n in names],
        "authorizations": [f"https://ca/authz/{i}" for i in range(len(names))],
        "finalize": "https://ca/order/1/finalize",
    })


def authz(i: int, value: str, offered: tuple[str, ...] = ALL, *, wildcard: bool = False,
          status: str = "pending", error: Any = None) -> Authorization:
    chals = []
    for kind in offered:
        chal: dict[str, Any] = {"type": kind, "url": f"https://ca/chall/{i}/{kind}",
                                "token": f"tok{i}{kind[:3]}", "status": "pending"}
        if error is not None:
            chal["error"] = error
        chals.append(chal)
    obj: dict[str, Any] = {"identifier": {"type": "dns", "value": value}, "status": status,
                           "challenges": chals}
    if wildcard:
        obj["wildcard"] = True
    return Authorization.from_json(obj)


def machine(names: list[str], kind: str) -> OrderMachine:
    return OrderMachine("https://ca/order/1", order(names), "THUMB", b"csr",
                        PollPolicy(first=0.02, cap=1.0), challenge_type=kind)


@pytest.mark.parametrize("kind", ["http-01", "dns-01", "tls-alpn-01"])
def test_the_machine_answers_the_responders_type(kind: str) -> None:
    m = machine(["a.example"], kind)
    assert m.start(0.0) == [FetchAuthorization("https://ca/authz/0")]
    cmds = m.handle(AuthorizationFetched("https://ca/authz/0", authz(0, "a.example")), 0.0)
    token = f"tok0{kind[:3]}"
    assert cmds == [PresentChallenge("https://ca/authz/0", f"https://ca/chall/0/{kind}",
                                     "a.example", token, f"{token}.THUMB", kind, False)]


def test_http01_stays_the_default() -> None:
    m = OrderMachine("https://ca/o", order(["a.example"]), "T", b"c")
    assert m.challenge_type == HTTP01
    m.start(0.0)
    cmds = m.handle(AuthorizationFetched("https://ca/authz/0", authz(0, "a.example")), 0.0)
    assert isinstance(cmds[0], PresentChallenge) and cmds[0].challenge_type == HTTP01


@pytest.mark.parametrize("kind", ["tls-alpn-01", "dns-01", "http-01"])
def test_no_challenge_of_the_type_names_it(kind: str) -> None:
    m = machine(["a.example"], kind)
    m.start(0.0)
    others = tuple(k for k in ALL if k != kind)
    cmds = m.handle(AuthorizationFetched("https://ca/authz/0", authz(0, "a.example", others)),
                    0.0)
    failed = cmds[-1]
    assert isinstance(failed, OrderFailed)
    assert isinstance(failed.error, NoSupportedChallengeError)
    assert failed.error.wanted == kind and failed.error.offered == others
    assert str(failed.error) == (f"the CA offers no {kind} challenge for a.example "
                                 f"(offered: {', '.join(others)})")


def test_a_wildcard_and_its_base_name_are_two_authorizations_of_one_domain() -> None:
    # RFC 8555 §7.1.4: the wildcard's authorization names the base domain, wildcard: true.
    m = machine(["*.example.test", "example.test"], DNS01)
    m.start(0.0)
    first = m.handle(AuthorizationFetched(
        "https://ca/authz/0", authz(0, "example.test", (DNS01,), wildcard=True)), 0.0)
    second = m.handle(AuthorizationFetched(
        "https://ca/authz/1", authz(1, "example.test", (DNS01, HTTP01))), 0.0)
    assert first == [PresentChallenge("https://ca/authz/0", "https://ca/chall/0/dns-01",
                                      "example.test", "tok0dns", "tok0dns.THUMB", DNS01, True)]
    assert second == [PresentChallenge("https://ca/authz/1", "https://ca/chall/1/dns-01",
                                       "example.test", "tok1dns", "tok1dns.THUMB", DNS01, False)]
    m.handle(AuthorizationFetched("https://ca/authz/0", authz(0, "example.test", (DNS01,),
                                                              wildcard=True, status="valid")),
             0.1)
    done = m.handle(AuthorizationFetched("https://ca/authz/1",
                                         authz(1, "example.test", (DNS01,), status="valid")), 0.1)
    # both answers (same record name, two tokens) go, then the order is finalized
    assert done == [CleanupChallenge("example.test", "tok0dns"),
                    CleanupChallenge("example.test", "tok1dns"),
                    FinalizeOrder("https://ca/order/1/finalize", b"csr")]


def test_a_wildcard_offering_only_dns01_fails_an_http01_order() -> None:
    m = machine(["*.example.test"], HTTP01)
    m.start(0.0)
    cmds = m.handle(AuthorizationFetched(
        "https://ca/authz/0", authz(0, "example.test", (DNS01,), wildcard=True)), 0.0)
    assert isinstance(cmds[-1], OrderFailed)
    assert "no http-01 challenge for example.test (offered: dns-01)" in str(cmds[-1].error)


def test_an_invalid_authorization_carries_the_problem_of_the_chosen_type() -> None:
    m = machine(["a.example"], TLS_ALPN01)
    m.start(0.0)
    m.handle(AuthorizationFetched("https://ca/authz/0", authz(0, "a.example")), 0.0)
    err = {"type": "urn:ietf:params:acme:error:tls", "detail": "no acme-tls/1"}
    cmds = m.handle(AuthorizationFetched("https://ca/authz/0", authz(
        0, "a.example", (TLS_ALPN01,), status="invalid", error=err)), 0.1)
    assert cmds[0] == CleanupChallenge("a.example", "tok0tls")
    failed = cmds[1]
    assert isinstance(failed, OrderFailed) and isinstance(failed.error, ValidationError)
    assert failed.error.detail == "no acme-tls/1"


class _Typed:
    def __init__(self, kind: object) -> None:
        self.challenge_type = kind

    async def present(self, domain: str, token: str, key_authorization: str) -> None:
        raise AssertionError("never called")

    async def cleanup(self, domain: str, token: str) -> None:
        raise AssertionError("never called")


def test_responder_type() -> None:
    assert responder_type(object()) == HTTP01
    assert responder_type(_Typed(TLS_ALPN01)) == TLS_ALPN01
    with pytest.raises(ValueError, match="challenge_type must be a non-empty string"):
        responder_type(_Typed(""))
    with pytest.raises(ValueError, match="challenge_type"):
        responder_type(_Typed(3))


async def test_a_bad_responder_type_is_refused_before_any_request() -> None:
    async with AcmeClient("https://127.0.0.1:9/dir", generate_key(KeyType.EC_P256)) as c:
        from acmeclient.client import OrderResource
        with pytest.raises(ClientStateError, match="challenge_type"):
            await c.run_order(OrderResource("https://ca/o", order(["a.example"])), b"c",
                              _Typed(None))


# ---- the tls-alpn-01 validation certificate


def test_validation_certificate_follows_rfc8737() -> None:
    cert_pem, key_pem = tls_alpn01_certificate("Www.Example.TEST.", "tok.THUMB")
    cert = x509.load_pem_x509_certificate(cert_pem)
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["www.example.test"]
    ext = cert.extensions.get_extension_for_oid(ACME_IDENTIFIER_OID)
    assert ext.critical
    assert isinstance(ext.value, x509.UnrecognizedExtension)
    assert ext.value.value == b"\x04\x20" + hashlib.sha256(b"tok.THUMB").digest()
    assert cert.issuer == cert.subject
    pub = cert.public_key()
    assert isinstance(pub, ec.EllipticCurvePublicKey)
    cert.verify_directly_issued_by(cert)  # self-signed
    # the key is the certificate's: ssl loads the pair
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "c.pem").write_bytes(cert_pem)
        (Path(tmp) / "k.pem").write_bytes(key_pem)
        ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER).load_cert_chain(Path(tmp) / "c.pem",
                                                                Path(tmp) / "k.pem")
    # every call makes a fresh key
    assert tls_alpn01_certificate("www.example.test", "tok.THUMB")[1] != key_pem


@pytest.mark.parametrize("bad", ["*.example.test", "", "."])
def test_validation_certificate_refuses_non_names(bad: str) -> None:
    with pytest.raises(ValueError, match="tls-alpn-01 validates one plain DNS name"):
        tls_alpn01_certificate(bad, "tok.THUMB")


# ---- one real order against Pebble: acmeclient alone, a minimal tls-alpn-01 responder


class AlpnResponder:
    """Serves the validation certificate on Pebble's tlsPort for the names presented; a
    handshake without ALPN acme-tls/1 is refused (so Pebble must offer it)."""

    challenge_type = TLS_ALPN01

    def __init__(self, port: int, workdir: Path) -> None:
        self.port = port
        self.workdir = workdir
        self.contexts: dict[str, ssl.SSLContext] = {}
        self.presented: list[tuple[str, str]] = []
        self.cleaned: list[tuple[str, str]] = []
        self.alpn_seen: list[str | None] = []
        self.server: asyncio.Server | None = None

    async def present(self, domain: str, token: str, key_authorization: str) -> None:
        cert_pem, key_pem = tls_alpn01_certificate(domain, key_authorization)
        (self.workdir / "c.pem").write_bytes(cert_pem)
        (self.workdir / "k.pem").write_bytes(key_pem)
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(self.workdir / "c.pem", self.workdir / "k.pem")
        ctx.set_alpn_protocols([ACME_TLS_ALPN])
        self.contexts[domain] = ctx
        self.presented.append((domain, token))

    async def cleanup(self, domain: str, token: str) -> None:
        self.contexts.pop(domain, None)
        self.cleaned.append((domain, token))

    async def start(self) -> None:
        listener = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)

        def sni(obj: Any, name: str | None, _ctx: ssl.SSLContext) -> int | None:
            ctx = self.contexts.get(name or "")
            if ctx is None:
                return ssl.ALERT_DESCRIPTION_UNRECOGNIZED_NAME
            obj.context = ctx
            return None

        listener.sni_callback = sni

        def on_conn(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
            self.alpn_seen.append(w.get_extra_info("ssl_object").selected_alpn_protocol())
            w.close()

        self.server = await asyncio.start_server(on_conn, "127.0.0.1", self.port, ssl=listener)


async def test_tls_alpn01_order_with_acmeclient_alone(pebble: PebbleInstance,
                                                      tmp_path: Path) -> None:
    responder = AlpnResponder(pebble.tls_port, tmp_path)
    await responder.start()
    assert responder.server is not None
    try:
        async with AcmeClient(pebble.directory_url, generate_key(KeyType.EC_P256),
                              ca_bundle=pebble.ca_bundle) as c:
            await c.new_account(terms_of_service_agreed=True)
            chain = await c.obtain_certificate(["alpn.example.test"],
                                               generate_key(KeyType.EC_P256), responder)
        leaf = x509.load_pem_x509_certificate(chain.encode())
        san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        assert san.get_values_for_type(x509.DNSName) == ["alpn.example.test"]
        assert responder.presented and responder.cleaned == responder.presented
        assert responder.alpn_seen and set(responder.alpn_seen) == {ACME_TLS_ALPN}
    finally:
        responder.server.close()
        await responder.server.wait_closed()
