"""End-to-end tests of acmeclient against a real Pebble started by the test suite."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
from cryptography import x509

from acmeclient import (
    AcmeClient,
    ExternalAccountBinding,
    KeyType,
    RevocationReason,
    StandaloneHttp01Responder,
    generate_key,
)
from acmeclient.crypto import issuer_common_name, split_pem_chain
from acmeclient.errors import (
    AccountDoesNotExistError,
    ClientStateError,
    ExternalAccountRequiredError,
    MalformedError,
    NetworkError,
    UnauthorizedError,
    ValidationError,
)
from tests.support.pebble import PebbleInstance, pebble_or_skip, start_pebble


def verify_chain(chain_pem: str, root_pem: str, names: list[str], tmp: Path) -> None:
    """openssl verify: leaf against the root, intermediates untrusted, every name checked."""
    certs = split_pem_chain(chain_pem)
    leaf_sans = certs[0].extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert sorted(leaf_sans.get_values_for_type(x509.DNSName)) == sorted(names)
    (tmp / "root.pem").write_text(root_pem)
    (tmp / "chain.pem").write_text(chain_pem)
    first, *_ = chain_pem.split("-----END CERTIFICATE-----")
    (tmp / "leaf.pem").write_text(first + "-----END CERTIFICATE-----\n")
    for name in names:
        out = subprocess.run(
            ["openssl", "verify", "-CAfile", str(tmp / "root.pem"), "-untrusted",
             str(tmp / "chain.pem"), "-verify_hostname", name, "-purpose", "sslserver",
             str(tmp / "leaf.pem")],
            capture_output=True, text=True, check=False,
        )  # fmt: skip
        assert out.returncode == 0, out.stdout + out.stderr


def client_for(pebble: PebbleInstance, key_type: KeyType = KeyType.EC_P256) -> AcmeClient:
    return AcmeClient(pebble.directory_url, generate_key(key_type), ca_bundle=pebble.ca_bundle)


async def test_account_register_lookup_update_rollover_deactivate(pebble: PebbleInstance) -> None:
    key = generate_key(KeyType.RSA_2048)
    async with AcmeClient(pebble.directory_url, key, ca_bundle=pebble.ca_bundle) as c:
        directory = await c.directory()
        assert directory.meta.terms_of_service
        reg = await c.new_account(contact=["mailto:ops@example.com"], terms_of_service_agreed=True)
        assert reg.account.status == "valid"
        assert reg.account.contact == ("mailto:ops@example.com",)
        url = reg.url

    async with AcmeClient(pebble.directory_url, key, ca_bundle=pebble.ca_bundle) as c:
        found = await c.lookup_account()
        assert found.url == url
        updated = await c.update_account(contact=["mailto:new@example.com"])
        assert updated.account.contact == ("mailto:new@example.com",)
        assert (await c.get_account()).account.contact == ("mailto:new@example.com",)

        new_key = generate_key(KeyType.EC_P384)
        await c.rollover_key(new_key)
        assert (await c.get_account()).url == url  # signed with the new key now

    async with AcmeClient(pebble.directory_url, key, ca_bundle=pebble.ca_bundle) as old:
        with pytest.raises(AccountDoesNotExistError) as info:
            await old.lookup_account()
        assert info.value.status == 400
        assert info.value.type == "urn:ietf:params:acme:error:accountDoesNotExist"

    async with AcmeClient(pebble.directory_url, new_key, ca_bundle=pebble.ca_bundle) as c:
        assert (await c.lookup_account()).url == url
        gone = await c.deactivate_account()
        assert gone.account.status == "deactivated"
        with pytest.raises(UnauthorizedError):
            await c.new_order(["after-deactivation.example.com"])


async def test_unknown_account_lookup_is_typed(pebble: PebbleInstance) -> None:
    async with client_for(pebble) as c:
        with pytest.raises(AccountDoesNotExistError):
            await c.lookup_account()
        with pytest.raises(ClientStateError):
            await c.new_order(["no-account.example.com"])


@pytest.mark.parametrize(
    ("count", "key_type"), [(1, KeyType.EC_P256), (10, KeyType.RSA_2048)], ids=["1name", "10names"]
)
async def test_issue_and_verify_chain(
    pebble: PebbleInstance,
    responder: StandaloneHttp01Responder,
    tmp_path: Path,
    count: int,
    key_type: KeyType,
) -> None:
    names = [f"n{i}.issue{count}.example.com" for i in range(count)]
    async with client_for(pebble, key_type) as c:
        await c.new_account(terms_of_service_agreed=True)
        chain = await c.obtain_certificate(names, generate_key(key_type), responder)
    assert len(split_pem_chain(chain)) == 2
    verify_chain(chain, pebble.root_pem(0), names, tmp_path)


@pytest.mark.parametrize("by", ["account-key", "certificate-key"])
async def test_revocation(
    pebble: PebbleInstance, responder: StandaloneHttp01Responder, by: str
) -> None:
    cert_key = generate_key(KeyType.EC_P256)
    name = f"revoke-{by}.example.com"
    async with client_for(pebble) as c:
        await c.new_account(terms_of_service_agreed=True)
        chain = await c.obtain_certificate([name], cert_key, responder)
        serial = split_pem_chain(chain)[0].serial_number
        assert pebble.cert_status(serial)["Status"] == "Valid"
        if by == "account-key":
            await c.revoke(chain, reason=RevocationReason.SUPERSEDED)
        else:
            async with client_for(pebble) as stranger:  # no account at all: the cert key signs
                await stranger.revoke(
                    chain, reason=RevocationReason.KEY_COMPROMISE, cert_key=cert_key
                )
    status = pebble.cert_status(serial)
    assert status["Status"] == "Revoked"
    expected = RevocationReason.SUPERSEDED if by == "account-key" else 1
    assert status.get("Reason") == expected


async def test_wrong_challenge_answer_is_a_typed_validation_error(
    pebble: PebbleInstance, responder: StandaloneHttp01Responder
) -> None:
    class WrongAnswer:
        async def present(self, domain: str, token: str, key_authorization: str) -> None:
            await responder.present(domain, token, key_authorization + "-wrong")

        async def cleanup(self, domain: str, token: str) -> None:
            await responder.cleanup(domain, token)

    async with client_for(pebble) as c:
        await c.new_account(terms_of_service_agreed=True)
        with pytest.raises(ValidationError) as info:
            await c.obtain_certificate(["wrong.example.com"], generate_key(), WrongAnswer())
    err = info.value
    assert err.identifier == "wrong.example.com"
    assert err.type == "urn:ietf:params:acme:error:unauthorized"
    assert "key authorization" in err.detail.lower() or "expected" in err.detail.lower()
    assert responder._answers == {}  # cleaned up after failure


async def test_tls_is_verified_against_the_system_store(pebble: PebbleInstance) -> None:
    async with AcmeClient(pebble.directory_url, generate_key()) as c:  # no ca_bundle
        with pytest.raises(NetworkError, match=r"(?i)certificate"):
            await c.directory()


async def test_profile_and_replaces_on_a_ca_without_them(pebble: PebbleInstance) -> None:
    async with client_for(pebble) as c:
        await c.new_account(terms_of_service_agreed=True)
        with pytest.raises(ClientStateError, match="no profiles"):
            await c.new_order(["p.example.com"], profile="shortlived")
        assert await c.fetch_renewal_info("aYhba4dGQEHhs3uEe6CuLN4ByNQ.AIdlQyE") is None


def test_pebble_helper_skips_cleanly_without_binary(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", "/nonexistent")
    with pytest.raises(pytest.skip.Exception, match="pebble"):
        pebble_or_skip()


# ---- Pebble variants: each starts its own Pebble with different knobs


async def test_alternate_chains_preferred_issuer(tmp_path: Path) -> None:
    pebble_or_skip()
    with start_pebble(tmp_path / "pebble", env={"PEBBLE_ALTERNATE_ROOTS": "1"}) as peb:
        alt_root = x509.load_pem_x509_certificate(peb.root_pem(1).encode())
        alt_cn = alt_root.subject.get_attributes_for_oid(x509.oid.NameOID.COMMON_NAME)[0].value
        assert isinstance(alt_cn, str)
        async with (
            StandaloneHttp01Responder("127.0.0.1", peb.http_port) as r,
            client_for(peb) as c,
        ):
            await c.new_account(terms_of_service_agreed=True)
            order = await c.new_order(["alt.example.com"])
            from acmeclient.crypto import make_csr

            key = generate_key()
            done = await c.run_order(order, make_csr(key, ["alt.example.com"]), r)
            assert done.certificate is not None
            chains = await c.download_chains(done.certificate)
            assert len(chains) == 2
            default_chain = await c.obtain_certificate(["alt2.example.com"], key, r)
            preferred = await c.obtain_certificate(
                ["alt2.example.com"], key, r, preferred_chain=alt_cn
            )
        assert issuer_common_name(split_pem_chain(preferred)[-1]) == alt_cn
        assert issuer_common_name(split_pem_chain(default_chain)[-1]) != alt_cn
        verify_chain(preferred, peb.root_pem(1), ["alt2.example.com"], tmp_path)
        verify_chain(default_chain, peb.root_pem(0), ["alt2.example.com"], tmp_path)


async def test_twenty_orders_with_30_percent_bad_nonces(tmp_path: Path) -> None:
    pebble_or_skip()
    with start_pebble(tmp_path / "pebble", env={"PEBBLE_WFE_NONCEREJECT": "30"}) as peb:
        async with (
            StandaloneHttp01Responder("127.0.0.1", peb.http_port) as r,
            client_for(peb) as c,
        ):
            await c.new_account(terms_of_service_agreed=True)
            for i in range(20):
                chain = await c.obtain_certificate([f"nonce{i}.example.com"], generate_key(), r)
                assert len(split_pem_chain(chain)) == 2
            assert c.bad_nonce_count >= 10  # ~30 % of ~150 requests were rejected and retried


async def test_external_account_binding(tmp_path: Path) -> None:
    pebble_or_skip()
    hmac_key = "zWNDZM6eQGHWpSRTPal5eIUYFTu7EajVIoguysqZ9wG44nMEtx3MUAsUDkMTQ12W"
    with start_pebble(tmp_path / "pebble", eab_keys={"kid-1": hmac_key}) as peb:
        async with client_for(peb) as c:
            directory = await c.directory()
            assert directory.meta.external_account_required
            with pytest.raises(ClientStateError, match="external account"):
                await c.new_account(terms_of_service_agreed=True)
            with pytest.raises((MalformedError, UnauthorizedError, ExternalAccountRequiredError)):
                await c.new_account(
                    terms_of_service_agreed=True,
                    eab=ExternalAccountBinding("kid-1", "d3JvbmcgbWFjIGtleSBlbnRpcmVseQ"),
                )
            reg = await c.new_account(
                terms_of_service_agreed=True, eab=ExternalAccountBinding("kid-1", hmac_key)
            )
            assert reg.account.status == "valid"


def test_cli_issues_into_a_directory_and_reuses_the_account(
    pebble: PebbleInstance, tmp_path: Path
) -> None:
    import json
    import os
    import sys

    out = tmp_path / "out"
    cmd = [
        sys.executable, "-m", "acmeclient", "--directory", pebble.directory_url,
        "--ca-bundle", pebble.ca_bundle, "--http-host", "127.0.0.1",
        "--http-port", str(pebble.http_port), "-d", "cli.example.com", "-d", "www.cli.example.com",
        "--out", str(out), "--country", "DE", "--organization", "Example",
    ]  # fmt: skip
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[2]))
    first = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=60, check=False)
    assert first.returncode == 0, first.stderr
    for name in ("privkey.pem", "account.key"):
        assert (out / name).stat().st_mode & 0o777 == 0o600
    chain = (out / "fullchain.pem").read_text()
    assert (out / "cert.pem").read_text() + (out / "chain.pem").read_text() == chain
    verify_chain(chain, pebble.root_pem(0), ["cli.example.com", "www.cli.example.com"], tmp_path)
    url = json.loads((out / "account.json").read_text())["url"]
    second = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=60, check=False)
    assert second.returncode == 0, second.stderr
    assert json.loads((out / "account.json").read_text())["url"] == url
    assert (out / "fullchain.pem").read_text() != chain

    bad = subprocess.run(
        [*cmd[:-4], "--country", "Germany"], capture_output=True, text=True, env=env, check=False
    )
    assert bad.returncode == 1 and "country" in bad.stderr


async def test_issue_one_call_with_subject_fields(
    pebble: PebbleInstance, responder: StandaloneHttp01Responder, tmp_path: Path
) -> None:
    from acmeclient import CsrSubject, issue, load_private_key

    result = await issue(
        pebble.directory_url,
        ["one-call.example.com"],
        responder,
        ca_bundle=pebble.ca_bundle,
        contact=["mailto:ops@example.com"],
        cert_key_type=KeyType.RSA_3072,
        subject=CsrSubject(country="NL", organization="Example BV"),
    )
    assert result.account_url.startswith("https://127.0.0.1:")
    key = load_private_key(result.key_pem)
    leaf = split_pem_chain(result.chain_pem)[0]
    assert leaf.public_key() == key.public_key()
    verify_chain(result.chain_pem, pebble.root_pem(0), ["one-call.example.com"], tmp_path)


async def test_new_order_with_validity_window(pebble: PebbleInstance) -> None:
    from datetime import UTC, datetime, timedelta

    from acmeclient.messages import parse_time

    now = datetime.now(UTC).replace(microsecond=0)
    async with client_for(pebble) as c:
        await c.new_account(terms_of_service_agreed=True)
        res = await c.new_order(
            ["window.example.com", "www.window.example.com"],
            not_before=now,
            not_after=now + timedelta(days=3),
        )
    assert res.order.not_before is not None and res.order.not_after is not None
    assert parse_time(res.order.not_before) == now
    assert parse_time(res.order.not_after) == now + timedelta(days=3)
    assert {i.value for i in res.order.identifiers} == {"window.example.com",
                                                         "www.window.example.com"}  # fmt: skip
    assert len(res.order.authorizations) == 2


async def test_broken_responder_fails_the_order_at_once(pebble: PebbleInstance) -> None:
    from acmeclient import PollPolicy
    from acmeclient.errors import ResponderError

    class Broken:
        cleaned: list[str] = []
        asked: list[str] = []

        async def present(self, domain: str, token: str, key_authorization: str) -> None:
            self.asked.append(domain)
            if domain.startswith("b"):
                raise OSError("port 80 in use")

        async def cleanup(self, domain: str, token: str) -> None:
            self.cleaned.append(domain)

    broken = Broken()
    async with AcmeClient(
        pebble.directory_url,
        generate_key(),
        ca_bundle=pebble.ca_bundle,
        poll_policy=PollPolicy(order_timeout=10.0),
    ) as c:
        await c.new_account(terms_of_service_agreed=True)
        with pytest.raises(ResponderError, match="port 80 in use"):
            await c.obtain_certificate(["a.broken.example", "b.broken.example"], generate_key(),
                                       broken)  # fmt: skip
    # everything asked to be presented is cleaned up, even the one whose present() failed
    # (whether "a" was asked before "b" failed depends on which authorization came back first)
    assert "b.broken.example" in broken.asked
    assert set(broken.asked) <= set(broken.cleaned) <= {"a.broken.example", "b.broken.example"}
