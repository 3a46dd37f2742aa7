"""ARI (RFC 9773) and profiles against the fake CA of fake_ca.py (Pebble 2.4 has neither)."""

from __future__ import annotations

import random
import ssl
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import pytest
import trustme
from aiohttp import web
from cryptography import x509

from acmeclient import AcmeClient, StandaloneHttp01Responder, cert_id, generate_key
from acmeclient.ari import RenewalInfo, cert_id_from_parts
from acmeclient.crypto import split_pem_chain
from acmeclient.errors import ClientStateError, MalformedResponseError
from tests.acmeclient.fake_ca import RFC_CERT_ID, RFC_KEY_ID, RFC_SERIAL, FakeCA
from tests.support.pebble import free_port


@dataclass
class Lab:
    ca: FakeCA
    directory_url: str
    ca_bundle: str
    responder: StandaloneHttp01Responder


@pytest.fixture
async def lab(tmp_path: object) -> AsyncIterator[Lab]:
    tls = trustme.CA()
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    tls.issue_cert("127.0.0.1").configure_cert(server_ctx)
    bundle = f"{tmp_path}/ca.pem"
    tls.cert_pem.write_to_path(bundle)
    http_port = free_port()
    ca = FakeCA(http_port=http_port)
    runner = web.AppRunner(ca.app(), access_log=None)
    await runner.setup()
    port = free_port()
    site = web.TCPSite(runner, "127.0.0.1", port, ssl_context=server_ctx)
    await site.start()
    ca.base = f"https://127.0.0.1:{port}"
    async with StandaloneHttp01Responder("127.0.0.1", http_port) as responder:
        yield Lab(ca, ca.base + "/dir", bundle, responder)
    await runner.cleanup()


def test_cert_id_rfc9773_example_vector() -> None:
    assert cert_id_from_parts(RFC_KEY_ID, RFC_SERIAL) == RFC_CERT_ID
    assert cert_id_from_parts(b"\x01", 0x7F) == "AQ.fw"  # no padding byte below the high bit


async def test_profile_ari_window_and_rfc_certid(lab: Lab) -> None:
    async with AcmeClient(lab.directory_url, generate_key(), ca_bundle=lab.ca_bundle) as c:
        directory = await c.directory()
        assert directory.renewal_info is not None
        assert dict(directory.meta.profiles) == {
            "classic": "90-day certificates",
            "shortlived": "6-day certificates",
        }
        await c.new_account(terms_of_service_agreed=True)
        chain = await c.obtain_certificate(
            ["ari.example.com"], generate_key(), lab.responder, profile="shortlived"
        )
        leaf = split_pem_chain(chain)[0]
        assert leaf.not_valid_after_utc - leaf.not_valid_before_utc == timedelta(days=6)
        new_orders = [p for path, p in lab.ca.requests if path == "/new-order"]
        assert new_orders[0]["profile"] == "shortlived"
        assert "replaces" not in new_orders[0]

        assert cert_id(chain) == RFC_CERT_ID  # the first issued certificate is the RFC's example
        info = await c.fetch_renewal_info(chain)
        assert info is not None
        life = timedelta(days=6)
        assert info.start == leaf.not_valid_before_utc + life * 2 / 3
        assert info.end == info.start + life / 6
        assert info.explanation_url == lab.ca.base + "/docs/ari"
        assert info.retry_after == 21600
        rng = random.Random(7)
        picks = [info.choose_time(rng) for _ in range(200)]
        assert all(info.start <= t < info.end for t in picks)
        assert max(picks) - min(picks) > (info.end - info.start) * 0.8  # spread, not a constant
        # the same by CertID string
        again = await c.fetch_renewal_info(RFC_CERT_ID)
        assert again == info


async def test_renewal_sends_replaces_and_retries_without_it_once(lab: Lab) -> None:
    async with AcmeClient(lab.directory_url, generate_key(), ca_bundle=lab.ca_bundle) as c:
        await c.new_account(terms_of_service_agreed=True)
        first = await c.obtain_certificate(["renew.example.com"], generate_key(), lab.responder)
        old_id = cert_id(first)
        second = await c.obtain_certificate(
            ["renew.example.com"], generate_key(), lab.responder, replaces=old_id
        )
        # replacing the same certificate again: the CA says alreadyReplaced; the client orders
        # once more without `replaces` and succeeds
        third = await c.obtain_certificate(
            ["renew.example.com"], generate_key(), lab.responder, replaces=old_id
        )
    orders = [p for path, p in lab.ca.requests if path == "/new-order"]
    assert [o.get("replaces") for o in orders] == [None, old_id, old_id, None]
    assert len({cert_id(x) for x in (first, second, third)}) == 3
    info_window = (await _renewal(lab, old_id)).end - (await _renewal(lab, old_id)).start
    assert info_window == timedelta(seconds=1)  # replaced: the CA says renew now


async def _renewal(lab: Lab, ident: str) -> RenewalInfo:
    async with AcmeClient(lab.directory_url, generate_key(), ca_bundle=lab.ca_bundle) as c:
        info = await c.fetch_renewal_info(ident)
    assert info is not None
    return info


async def test_unknown_profile_is_refused_before_ordering(lab: Lab) -> None:
    async with AcmeClient(lab.directory_url, generate_key(), ca_bundle=lab.ca_bundle) as c:
        await c.new_account(terms_of_service_agreed=True)
        with pytest.raises(ClientStateError, match="not offered"):
            await c.new_order(["p.example.com"], profile="tlsserver-2099")
    assert not [p for path, p in lab.ca.requests if path == "/new-order"]


async def test_retry_after_is_honoured_when_polling(lab: Lab) -> None:
    lab.ca.order_poll_retry_after = 1
    async with AcmeClient(lab.directory_url, generate_key(), ca_bundle=lab.ca_bundle) as c:
        await c.new_account(terms_of_service_agreed=True)
        await c.obtain_certificate(["slow.example.com"], generate_key(), lab.responder)
    polls = lab.ca.poll_times
    assert len(polls) == 2, polls  # processing (Retry-After: 1), then valid
    assert 1.0 <= polls[1] - polls[0] < 1.5


def test_renewal_info_rejects_inverted_window() -> None:
    with pytest.raises(MalformedResponseError, match="not after start"):
        RenewalInfo.from_json(
            {"suggestedWindow": {"start": "2025-01-02T00:00:00Z", "end": "2025-01-01T00:00:00Z"}}
        )
    with pytest.raises(MalformedResponseError):
        RenewalInfo.from_json({"suggestedWindow": {"start": "yesterday", "end": "today"}})
    ok = RenewalInfo.from_json(
        {
            "suggestedWindow": {
                "start": "2025-01-02T00:00:00.123456789Z",
                "end": "2025-01-03T00:00:00Z",
            }
        },
        retry_after=None,
    )
    assert ok.start == datetime(2025, 1, 2, 0, 0, 0, 123456, tzinfo=UTC)
    assert ok.next_check_after() == 6 * 3600


def test_cert_id_needs_aki() -> None:
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.x509.oid import NameOID

    from acmeclient.errors import CryptoError

    key = generate_key()
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "no-aki")])
    now = datetime.now(UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(5)
        .not_valid_before(now)
        .not_valid_after(now + timedelta(days=1))
        .sign(key, hashes.SHA256())
    )
    with pytest.raises(CryptoError, match="Authority Key Identifier"):
        cert_id(cert.public_bytes(serialization.Encoding.PEM))
    with pytest.raises(CryptoError, match="not a PEM"):
        cert_id("garbage")
