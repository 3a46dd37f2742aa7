"""The dns-01 RFC 2136 provider against a real Knot DNS server started by each test: records added
and removed with a TSIG key, the server's refusals named with their rcode, an absent or silent
server, the propagation wait over two servers (with a fake clock), and the secret file."""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import re
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.knot import KnotInstance, knot_or_skip, start_knot

knot_or_skip()

from acmeclient.challenges import dns01_txt_value  # noqa: E402
from lbproxy.config.dnsconfig import DnsServer  # noqa: E402
from lbproxy.errors import ConfigError  # noqa: E402
from lbproxy.letsencrypt.codes import AcmeCode, LeError  # noqa: E402
from lbproxy.letsencrypt.dns01 import Dns01Error, Rfc2136Responder  # noqa: E402

NAME = "_acme-challenge.example.test."
KA1 = "token-one.thumbprint"
KA2 = "token-two.thumbprint"


@pytest.fixture
def knot(tmp_path: Path) -> Iterator[KnotInstance]:
    with start_knot(tmp_path / "knot") as k:
        yield k


class FakeTime:
    """A clock that only `sleep` moves; `on_sleep` runs at each sleep (before the clock moves)."""

    def __init__(self) -> None:
        self.now = 1000.0
        self.sleeps: list[float] = []
        self.on_sleep = lambda: None

    def clock(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.on_sleep()
        self.now += seconds
        await asyncio.sleep(0)


def responder(knot: KnotInstance, **overrides: object) -> Rfc2136Responder:
    return Rfc2136Responder.from_settings(knot.settings(**overrides))


def serial(knot: KnotInstance) -> int:
    return int(knot.query(knot.zone, "SOA").answer[0][0].serial)


async def test_present_puts_the_record_and_cleanup_takes_it_away(knot: KnotInstance) -> None:
    r = responder(knot)
    assert r.challenge_type == "dns-01"
    await r.present("example.test", "t1", KA1)
    assert knot.txt(NAME) == {dns01_txt_value(KA1)}
    assert r.pending == ((NAME, dns01_txt_value(KA1)),)
    assert str(await r.zone_for("example.test")) == "example.test."
    await r.cleanup("example.test", "t1")
    assert knot.txt(NAME) == set()
    assert r.pending == ()
    await r.cleanup("example.test", "t1")  # idempotent


async def test_a_name_below_the_apex_and_a_configured_zone(knot: KnotInstance) -> None:
    r = responder(knot, zone="example.test.")
    await r.present("www.Example.TEST.", "t1", KA1)
    assert knot.txt("_acme-challenge.www.example.test.") == {dns01_txt_value(KA1)}
    await r.cleanup("www.example.test", "t1")
    assert knot.txt("_acme-challenge.www.example.test.") == set()


async def test_cleanup_removes_only_its_own_value(knot: KnotInstance) -> None:
    knot.update_txt(NAME, "someone-else")
    r = responder(knot)
    await r.present("example.test", "t1", KA1)
    assert knot.txt(NAME) == {"someone-else", dns01_txt_value(KA1)}
    await r.cleanup("example.test", "t1")
    assert knot.txt(NAME) == {"someone-else"}


async def test_two_values_for_one_name_a_wildcard_and_its_base(knot: KnotInstance) -> None:
    r = responder(knot)
    await r.present("example.test", "t1", KA1)
    await r.present("*.example.test", "t2", KA2)  # "*." dropped as the authorization does
    assert knot.txt(NAME) == {dns01_txt_value(KA1), dns01_txt_value(KA2)}
    await r.cleanup("*.example.test", "t2")
    assert knot.txt(NAME) == {dns01_txt_value(KA1)}
    await r.cleanup("example.test", "t1")
    assert knot.txt(NAME) == set()


async def test_check_proves_the_key_and_changes_nothing(knot: KnotInstance) -> None:
    before = serial(knot)
    await responder(knot).check(["example.test", "*.example.test", "www.example.test"])
    await responder(knot, zone="example.test.").check()
    assert serial(knot) == before


async def test_check_names_the_records_so_a_per_name_acl_is_checked_too(tmp_path: Path) -> None:
    """The operator allows the key TXT at _acme-challenge.example.test only: check() of that
    name passes; of www.example.test it fails before any order, as present() would."""
    with start_knot(tmp_path / "narrow", allowed_names=["_acme-challenge"]) as knot:
        r = responder(knot)
        await r.check(["example.test", "*.example.test"])
        with pytest.raises(Dns01Error) as err:
            await r.check(["example.test", "www.example.test"])
        _refusal(err.value, knot, err.value.rcode, "lbproxy-update.")
        with pytest.raises(Dns01Error) as present:
            await r.present("www.example.test", "t1", KA1)
        assert present.value.rcode == err.value.rcode
        assert serial(knot) == 1  # nothing changed the zone
        await r.present("example.test", "t1", KA1)
        assert knot.txt(NAME) == {dns01_txt_value(KA1)}


async def test_hmac_sha512(tmp_path: Path) -> None:
    with start_knot(tmp_path / "k512", algorithm="hmac-sha512") as knot:
        r = Rfc2136Responder.from_settings(knot.settings(tsig_algorithm="hmac-sha512"))
        await r.check(["example.test"])
        await r.present("example.test", "t1", KA1)
        assert knot.txt(NAME) == {dns01_txt_value(KA1)}


def _refusal(exc: BaseException, knot: KnotInstance, rcode: str, key: str) -> Dns01Error:
    assert isinstance(exc, Dns01Error) and isinstance(exc, LeError)
    assert exc.code == AcmeCode.DNS_UPDATE_REFUSED and exc.rcode == rcode
    text = str(exc)
    assert f"answered {rcode}" in text
    assert f"127.0.0.1:{knot.port}" in text and key in text and "example.test." in text
    assert text.endswith(f"(code: {int(AcmeCode.DNS_UPDATE_REFUSED)})")
    return exc


async def test_wrong_secret_is_badsig_and_leaves_no_record(knot: KnotInstance,
                                                          tmp_path: Path) -> None:
    wrong = tmp_path / "wrong.key"
    wrong.write_text(base64.b64encode(b"x" * 32).decode())
    r = responder(knot, tsig_secret_file=str(wrong))
    with pytest.raises(Dns01Error) as check:
        await r.check(["example.test"])
    _refusal(check.value, knot, "BADSIG", "lbproxy-update.")
    assert "wrong secret" in str(check.value)
    with pytest.raises(Dns01Error) as present:
        await r.present("example.test", "t1", KA1)
    _refusal(present.value, knot, "BADSIG", "lbproxy-update.")
    assert knot.txt(NAME) == set()
    assert r.pending == ()  # refused, so nothing to clean up (and no second refusal logged)
    await r.cleanup("example.test", "t1")
    for secret in (base64.b64encode(b"x" * 32).decode(), knot.update_key.secret):
        assert secret not in str(check.value) + str(present.value)


async def test_unknown_key_name_is_badkey(knot: KnotInstance) -> None:
    r = responder(knot, tsig_key_name="nobody-knows-me.")
    with pytest.raises(Dns01Error) as err:
        await r.check(["example.test"])
    _refusal(err.value, knot, "BADKEY", "nobody-knows-me.")
    with pytest.raises(Dns01Error):
        await r.present("example.test", "t1", KA1)
    assert knot.txt(NAME) == set()


async def test_a_key_the_server_knows_but_does_not_allow(knot: KnotInstance,
                                                        tmp_path: Path) -> None:
    secret = tmp_path / "query.key"
    secret.write_text(knot.query_key.secret)
    r = responder(knot, tsig_key_name=knot.query_key.name, tsig_secret_file=str(secret))
    with pytest.raises(Dns01Error) as err:
        await r.check(["example.test"])
    # Knot answers BADKEY for a key no ACL of the zone names; BIND says REFUSED or NOTAUTH.
    assert err.value.rcode in ("BADKEY", "REFUSED", "NOTAUTH")
    _refusal(err.value, knot, err.value.rcode, "lbproxy-query-only.")
    with pytest.raises(Dns01Error):
        await r.present("example.test", "t1", KA1)
    assert knot.txt(NAME) == set()


async def test_a_zone_the_server_does_not_serve(knot: KnotInstance) -> None:
    # Found by SOA lookup: the server answers REFUSED for every name of other.test.
    with pytest.raises(Dns01Error) as found:
        await responder(knot).present("www.other.test", "t1", KA1)
    assert found.value.code == AcmeCode.DNS_NO_ZONE
    assert f"127.0.0.1:{knot.port} serves no zone" in str(found.value)
    assert "REFUSED" in str(found.value)
    # Configured: the update itself is refused.
    r = responder(knot, zone="other.test.")
    with pytest.raises(Dns01Error) as updated:
        await r.present("www.other.test", "t1", KA1)
    assert updated.value.rcode in ("NOTAUTH", "NOTZONE", "REFUSED")
    assert "zone other.test." in str(updated.value)
    with pytest.raises(Dns01Error) as checked:
        await r.check()
    assert checked.value.rcode == updated.value.rcode
    # A name outside the configured zone is refused before anything is sent.
    with pytest.raises(Dns01Error) as outside:
        await responder(knot, zone="example.test.").present("www.other.test", "t1", KA1)
    assert outside.value.code == AcmeCode.DNS_NO_ZONE
    assert "not inside the configured zone example.test." in str(outside.value)


async def test_server_down_connection_refused(knot: KnotInstance) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again: nothing listens there
    r = responder(knot, port=port, zone="example.test.")
    started = time.monotonic()
    with pytest.raises(Dns01Error) as err:
        await r.present("example.test", "t1", KA1)
    assert time.monotonic() - started < 2.0
    assert err.value.code == AcmeCode.DNS_UNREACHABLE
    assert f"127.0.0.1:{port} did not answer: connection refused" in str(err.value)
    assert "lbproxy-update." in str(err.value)
    # Not answered, so maybe applied: cleanup tries the delete, and says it could not.
    assert len(r.pending) == 1
    with pytest.raises(Dns01Error, match=re.escape(f"delete TXT {NAME}")):
        await r.cleanup("example.test", "t1")
    assert r.pending == ()


async def test_server_silent_times_out_within_the_bound(knot: KnotInstance) -> None:
    with socket.socket() as tcp, socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
        tcp.bind(("127.0.0.1", 0))
        tcp.listen(4)  # connections complete in the backlog; nothing is ever answered
        port = tcp.getsockname()[1]
        udp.bind(("127.0.0.1", port))  # datagrams are taken and never answered
        for zone in ("example.test.", ""):  # "" = the SOA lookup (UDP) is what times out
            r = responder(knot, port=port, zone=zone, timeout=0.3)
            started = time.monotonic()
            with pytest.raises(Dns01Error) as err:
                await r.present("example.test", "t1", KA1)
            assert 0.25 < time.monotonic() - started < 2.0
            assert err.value.code == AcmeCode.DNS_UNREACHABLE
            assert "did not answer: timeout (limit 0.3 s)" in str(err.value)
            with pytest.raises(Dns01Error):
                await r.check(["example.test"])


async def test_propagation_waits_until_every_checked_server_shows_it(knot: KnotInstance,
                                                                     tmp_path: Path) -> None:
    with start_knot(tmp_path / "second") as second:
        fake = FakeTime()
        value = dns01_txt_value(KA1)
        seen_before: list[set[str]] = []

        def propagate() -> None:  # the first wait: "the secondary catches up" now
            if not fake.sleeps[1:]:
                seen_before.append(second.txt(NAME))
                second.update_txt(NAME, value)

        fake.on_sleep = propagate
        settings = knot.settings(nameservers=(f"127.0.0.1:{knot.port}",
                                              f"127.0.0.1:{second.port}"),
                                 poll_interval=2.0, propagation_timeout=120.0)
        r = Rfc2136Responder.from_settings(settings, clock=fake.clock, sleep=fake.sleep)
        await r.present("example.test", "t1", KA1)
        assert seen_before == [set()]   # it did not return while the second lacked it
        assert fake.sleeps == [2.0]     # and returned at the first round that saw it
        assert knot.txt(NAME) == second.txt(NAME) == {value}


async def test_propagation_timeout_names_the_server_that_never_shows_it(
        knot: KnotInstance, tmp_path: Path) -> None:
    with start_knot(tmp_path / "second") as second:
        fake = FakeTime()
        settings = knot.settings(nameservers=(f"127.0.0.1:{knot.port}",
                                              f"127.0.0.1:{second.port}"),
                                 poll_interval=5.0, propagation_timeout=60.0)
        r = Rfc2136Responder.from_settings(settings, clock=fake.clock, sleep=fake.sleep)
        with pytest.raises(Dns01Error) as err:
            await r.present("example.test", "t1", KA1)
        assert err.value.code == AcmeCode.DNS_NOT_PROPAGATED
        text = str(err.value)
        assert f"127.0.0.1:{second.port}: 0 TXT value(s), not this one" in text
        assert f"127.0.0.1:{knot.port}:" not in text  # the primary showed it
        assert "within 60 s" in text
        assert sum(fake.sleeps) == pytest.approx(60.0) and len(fake.sleeps) == 12
        # The record was added: the order's cleanup still takes it away.
        assert knot.txt(NAME) == {dns01_txt_value(KA1)}
        await r.cleanup("example.test", "t1")
        assert knot.txt(NAME) == set()


async def test_propagation_to_a_server_that_does_not_answer(knot: KnotInstance) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
        udp.bind(("127.0.0.1", 0))
        fake = FakeTime()
        dead = DnsServer("127.0.0.1", udp.getsockname()[1])
        r = Rfc2136Responder.from_settings(
            knot.settings(nameservers=(str(dead),), timeout=0.2, propagation_timeout=1.0,
                          poll_interval=0.5), clock=fake.clock, sleep=fake.sleep)
        with pytest.raises(Dns01Error) as err:
            await r.present("example.test", "t1", KA1)
        assert err.value.code == AcmeCode.DNS_NOT_PROPAGATED
        assert f"{dead}: timeout" in str(err.value)


async def test_secret_file_missing_or_not_base64(knot: KnotInstance, tmp_path: Path) -> None:
    cases = {
        "missing.key": None,
        "bad.key": "this is not base64!\n",
        "empty.key": "\n",
        "two.key": 'key "a" { secret "AAAA"; };\nkey "b" { secret "BBBB"; };\n',
    }
    for name, content in cases.items():
        path = tmp_path / name
        if content is not None:
            path.write_text(content)
        with pytest.raises(ConfigError) as err:
            responder(knot, tsig_secret_file=str(path))
        (problem,) = err.value.problems
        assert problem.where == "letsencrypt.dns.tsig_secret_file"
        assert str(path) in problem.message, name
    directory = tmp_path / "a-directory"
    directory.mkdir()
    with pytest.raises(ConfigError, match="cannot read the TSIG secret"):
        responder(knot, tsig_secret_file=str(directory))


async def test_bind_and_knot_key_files_are_read(knot: KnotInstance, tmp_path: Path) -> None:
    secret = knot.update_key.secret
    files = {
        "bind.key": f'key "lbproxy-update" {{\n\talgorithm hmac-sha256;\n'
                    f'\tsecret "{secret}";\n}};\n',
        "knot.key": f"key:\n  - id: lbproxy-update\n    algorithm: hmac-sha256\n"
                    f"    secret: {secret}",
    }
    for name, text in files.items():
        (tmp_path / name).write_text(text)
        await responder(knot, tsig_secret_file=str(tmp_path / name)).check(["example.test"])


async def test_a_bad_domain_is_refused_before_sending(knot: KnotInstance) -> None:
    r = responder(knot)
    for bad in ("", "exa mple.test", "-bad.example.test", "a..b"):
        with pytest.raises(ValueError, match="dns-01: domain"):
            await r.present(bad, "t1", KA1)
    assert serial(knot) == 1


def test_settings_are_plain_values(knot: KnotInstance) -> None:
    s = knot.settings()
    assert s.checked_servers == (s.update_server,) == (DnsServer("127.0.0.1", knot.port),)
    assert dataclasses.replace(s, nameservers=("[::1]:5353",)).checked_servers == (
        DnsServer("::1", 5353),)


async def test_an_unsigned_answer_to_a_signed_update_is_not_trusted(knot: KnotInstance) -> None:
    """Real servers sign their answer to a signed request; a forged NOERROR would not be."""
    import dns.message
    import dns.tsig

    key = dns.tsig.Key(knot.update_key.name, knot.update_key.secret, knot.update_key.algorithm)
    requests: list[dns.message.Message] = []

    async def forger(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        size = int.from_bytes(await reader.readexactly(2), "big")
        request = dns.message.from_wire(await reader.readexactly(size), keyring=key)
        requests.append(request)
        response = dns.message.make_response(request)
        response.keyring, response.tsig = None, None  # NOERROR, without the signature
        wire = response.to_wire()
        writer.write(len(wire).to_bytes(2, "big") + wire)
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(forger, "127.0.0.1", 0)
    async with server:
        port = server.sockets[0].getsockname()[1]
        r = responder(knot, port=port, zone="example.test.")
        with pytest.raises(Dns01Error) as err:
            await r.present("example.test", "t1", KA1)
    assert requests and requests[0].had_tsig
    assert err.value.rcode == "unsigned" and "no TSIG signature" in str(err.value)


async def test_propagation_to_a_real_secondary(knot: KnotInstance, tmp_path: Path) -> None:
    """A secondary that follows the primary by SOA polling (up to 2 s behind): present()
    returns once the secondary answers the value, and cleanup's delete reaches it too."""
    with start_knot(tmp_path / "secondary", secondary_of=knot) as secondary:
        assert secondary.txt(NAME) == set()
        r = responder(knot, nameservers=(f"127.0.0.1:{knot.port}",
                                         f"127.0.0.1:{secondary.port}"),
                      poll_interval=0.1, propagation_timeout=15.0)
        await r.present("example.test", "t1", KA1)
        assert secondary.txt(NAME) == {dns01_txt_value(KA1)}
        await r.cleanup("example.test", "t1")
        assert knot.txt(NAME) == set()
        for _ in range(100):  # bounded: 100 x 0.05 s, over twice the secondary's polling period
            if secondary.txt(NAME) == set():
                break
            await asyncio.sleep(0.05)
        assert secondary.txt(NAME) == set()


async def test_a_wildcard_certificate_from_pebble_through_knot(knot: KnotInstance,
                                                                tmp_path: Path) -> None:
    """acmeclient alone with this responder: Pebble's validator resolves through the knot the
    responder updates; the wildcard and its base share one record name; nothing is left."""
    from cryptography import x509

    from acmeclient import AcmeClient, KeyType, generate_key
    from tests.support.pebble import pebble_or_skip, start_pebble

    pebble_or_skip()
    r = responder(knot)
    await r.check(["example.test", "*.example.test"])
    with start_pebble(tmp_path / "pebble", dns_server=knot.dns_address) as pebble:
        async with AcmeClient(pebble.directory_url, generate_key(KeyType.EC_P256),
                              ca_bundle=pebble.ca_bundle) as client:
            await client.new_account(terms_of_service_agreed=True)
            chain = await client.obtain_certificate(["*.example.test", "example.test"],
                                                    generate_key(KeyType.EC_P256), r)
    leaf = x509.load_pem_x509_certificate(chain.encode())
    san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert sorted(san.get_values_for_type(x509.DNSName)) == ["*.example.test", "example.test"]
    assert knot.txt(NAME) == set() and r.pending == ()
    assert "DDNS, finished" in knot.log.read_text()
