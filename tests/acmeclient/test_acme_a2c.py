"""ARI and profiles against a real third-party ACME server: acme2certifier from PyPI.

acme2certifier has heavy dependencies (jwcrypto, pyOpenSSL, certbot's acme, ...), so it lives in
its own virtualenv, never in lbproxy's: set ACME2CERTIFIER_PYTHON to that venv's python, e.g.
    python3 -m venv /tmp/a2c && /tmp/a2c/bin/pip install acme2certifier
    ACME2CERTIFIER_PYTHON=/tmp/a2c/bin/python pytest tests/acmeclient/test_acme_a2c.py
Skipped otherwise. The server runs with its openssl CA handler and HTTP-01 validation switched off
(its validator dials port 80 of each name via real DNS); validation is proven against Pebble.
"""

from __future__ import annotations

import datetime
import json
import os
import ssl
import subprocess
import time
import urllib.request
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import trustme
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.x509.oid import NameOID

from acmeclient import AcmeClient, StandaloneHttp01Responder, cert_id, generate_key
from acmeclient.crypto import private_key_to_pem, split_pem_chain
from acmeclient.errors import InvalidProfileError
from tests.support.pebble import free_port

READY_TIMEOUT = 20.0  # seconds; acme2certifier imports a lot


@dataclass(frozen=True)
class A2C:
    directory_url: str
    ca_bundle: str


def _python() -> str:
    python = os.environ.get("ACME2CERTIFIER_PYTHON", "")
    if not python or not Path(python).exists():
        pytest.skip("set ACME2CERTIFIER_PYTHON to a python with acme2certifier installed")
    probe = subprocess.run([python, "-c", "import acme2certifier"], capture_output=True)
    if probe.returncode != 0:
        pytest.skip(f"{python} cannot import acme2certifier")
    return python


@pytest.fixture(scope="module")
def a2c(tmp_path_factory: pytest.TempPathFactory) -> Iterator[A2C]:
    python = _python()
    work = tmp_path_factory.mktemp("a2c")
    key = generate_key()
    now = datetime.datetime.now(datetime.UTC)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "a2c test issuing CA")])
    ca = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + datetime.timedelta(days=60))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), False)
        .sign(key, hashes.SHA256())
    )
    (work / "ca.key").write_bytes(private_key_to_pem(key))
    (work / "ca.pem").write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    (work / "certs").mkdir()
    tls = trustme.CA()
    tls.issue_cert("127.0.0.1").private_key_and_cert_chain_pem.write_to_path(str(work / "tls.pem"))
    tls.cert_pem.write_to_path(str(work / "tls-ca.pem"))
    profiles = json.dumps({"classic": "30-day certificates", "shortlived": "short"})
    (work / "acme_srv.cfg").write_text(
        f"""[DEFAULT]
debug: False
[Nonce]
nonce_check_disable: False
[CAhandler]
handler_module: acme2certifier.cahandlers.openssl_ca_handler
issuing_ca_key: {work}/ca.key
issuing_ca_cert: {work}/ca.pem
issuing_ca_crl: {work}/crl.pem
cert_save_path: {work}/certs
cert_validity_days: 30
[DBhandler]
handler_module: acme2certifier.dbhandlers.wsgi_handler
dbfile: {work}/acme_srv.db
[Challenge]
challenge_validation_disable: True
[Order]
profiles: {profiles}
[Renewalinfo]
retry_after_timeout: 21600
"""
    )
    port = free_port()
    log = (work / "a2c.log").open("wb")
    proc = subprocess.Popen(
        [python, str(Path(__file__).with_name("a2c_runner.py")), str(work / "acme_srv.cfg"),
         str(port), str(work / "tls.pem"), str(work / "tls.pem")],
        stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, cwd=work,
        env=dict(os.environ, ACME2CERTIFIER_I_KNOW_THE_RISK="1"),
    )  # fmt: skip
    url = f"https://127.0.0.1:{port}/directory"
    ctx = ssl.create_default_context(cafile=str(work / "tls-ca.pem"))
    deadline = time.monotonic() + READY_TIMEOUT
    try:
        while True:
            if proc.poll() is not None:
                pytest.fail(f"acme2certifier exited:\n{(work / 'a2c.log').read_text()[-2000:]}")
            try:
                urllib.request.urlopen(url, context=ctx, timeout=1).close()
                break
            except OSError:
                if time.monotonic() > deadline:
                    pytest.fail("acme2certifier not ready in time")
                time.sleep(0.1)  # bounded readiness polling of a subprocess
        yield A2C(url, str(work / "tls-ca.pem"))
    finally:
        proc.terminate()
        proc.wait(timeout=10)
        log.close()


@pytest.fixture
async def client(a2c: A2C) -> AsyncIterator[AcmeClient]:
    async with AcmeClient(a2c.directory_url, generate_key(), ca_bundle=a2c.ca_bundle) as c:
        await c.new_account(terms_of_service_agreed=True, contact=["mailto:ops@example.com"])
        yield c


async def test_directory_advertises_ari_and_profiles(client: AcmeClient) -> None:
    directory = await client.directory()
    assert directory.renewal_info is not None
    assert set(directory.meta.profiles) == {"classic", "shortlived"}


async def test_profile_renewal_info_and_replaces(client: AcmeClient) -> None:
    async with StandaloneHttp01Responder("127.0.0.1", 0) as responder:
        order = await client.new_order(["a2c.example.com"], profile="shortlived")
        assert order.order.profile in ("shortlived", None)  # acme2certifier does not echo it
        # the server's own check of the profile name, bypassing the client's local check:
        directory = await client.directory()
        bad = {"identifiers": [{"type": "dns", "value": "a2c.example.com"}], "profile": "nope"}
        with pytest.raises(InvalidProfileError) as rejected:
            await client._post(directory.new_order, bad)
        assert (
            rejected.value.status in (400, 403)
            and rejected.value.detail == "Invalid profile specified"
        )
        chain = await client.obtain_certificate(
            ["a2c.example.com"], generate_key(), responder, profile="shortlived"
        )
        leaf = split_pem_chain(chain)[0]
        info = await client.fetch_renewal_info(chain)
        assert info is not None
        assert leaf.not_valid_before_utc < info.start < info.end <= leaf.not_valid_after_utc
        assert info.retry_after == 21600
        old = cert_id(chain)
        renewal = await client.new_order(["a2c.example.com"], replaces=old)
        assert renewal.order.replaces in (old, None)  # echoing is optional for the server
        renewed = await client.obtain_certificate(
            ["a2c.example.com"], generate_key(), responder, replaces=old
        )
        assert cert_id(renewed) != old
