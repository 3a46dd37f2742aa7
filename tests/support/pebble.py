"""Start and stop a real Pebble (+ pebble-challtestsrv as its DNS) on free loopback ports.

Reusable: `start_pebble(workdir, http_port=..., env={...})` is a context manager yielding a
`PebbleInstance`; `pebble_or_skip()` skips a test cleanly when the binaries are absent. Every name
resolves to 127.0.0.1 only, so Pebble's HTTP-01 validator dials 127.0.0.1:<http_port>, which may
be any listener (a test responder, or an lbproxy VS). No AAAA: Pebble asks for AAAA first and
dials only the first answer, and challtestsrv answers ::1 unless `-defaultIPv6 ""`, so a listener
on 127.0.0.1 would never be reached ("dial tcp [::1]:PORT: connection refused").
"""

from __future__ import annotations

import contextlib
import datetime
import ipaddress
import json
import os
import shutil
import socket
import ssl
import subprocess
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from tests.support.process import wait_ready

if TYPE_CHECKING:
    import pytest

READY_TIMEOUT = 15.0  # seconds for both daemons to answer; they start in ~100 ms here
POLL_INTERVAL = 0.05  # readiness polling step (bounded by READY_TIMEOUT)


@dataclass(frozen=True, slots=True)
class PebbleInstance:
    directory_url: str
    ca_bundle: str  # trust anchor for Pebble's own HTTPS (ACME and management API)
    management_url: str
    http_port: int  # the port Pebble's VA connects to on 127.0.0.1 for http-01
    challtestsrv_url: str
    workdir: Path
    tls_port: int = 0  # the port Pebble's VA connects to on 127.0.0.1 for tls-alpn-01
    dns_server: str = ""  # host:port Pebble's VA resolves names through

    def _get(self, path: str) -> bytes:
        ctx = ssl.create_default_context(cafile=self.ca_bundle)
        with urllib.request.urlopen(self.management_url + path, context=ctx, timeout=5) as r:
            data: bytes = r.read()
            return data

    def root_pem(self, index: int = 0) -> str:
        """The issuing root (Pebble makes new ones on every start; index>0 for alternates)."""
        return self._get(f"/roots/{index}").decode()

    def intermediate_pem(self, index: int = 0) -> str:
        return self._get(f"/intermediates/{index}").decode()

    def cert_status(self, serial: int) -> dict[str, object]:
        """Pebble's management view of a certificate: {"Status": "Valid"|"Revoked", ...}."""
        result: dict[str, object] = json.loads(self._get(f"/cert-status-by-serial/{serial:x}"))
        return result


def pebble_available() -> bool:
    return shutil.which("pebble") is not None and shutil.which("pebble-challtestsrv") is not None


def pebble_or_skip() -> None:
    import pytest

    if not pebble_available():
        pytest.skip("pebble / pebble-challtestsrv not installed (apt-get install -y pebble)")


def tls_alpn_pebble(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PebbleInstance]:
    """A module's Pebble whose tls-alpn-01 validator dials `tls_port` (free: for the test's
    HTTPS VS) and whose HTTP port nothing listens on; skipped when Pebble is absent. A fixture
    as `pebble = pytest.fixture(scope="module")(tls_alpn_pebble)`."""
    pebble_or_skip()
    with start_pebble(tmp_path_factory.mktemp("pebble"), tls_port=free_port()) as p:
        yield p


def free_port(udp_too: bool = False) -> int:
    """A currently free 127.0.0.1 TCP port (and UDP, for the DNS server)."""
    for _ in range(50):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.bind(("127.0.0.1", 0))
            port: int = s.getsockname()[1]
        if not udp_too:
            return port
        try:
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as u:
                u.bind(("127.0.0.1", port))
            return port
        except OSError:
            continue
    raise RuntimeError("no free port")


def _write_tls(workdir: Path) -> tuple[Path, Path, Path]:
    """A tiny CA and a localhost/127.0.0.1 server certificate for Pebble's HTTPS listeners."""
    now = datetime.datetime.now(datetime.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "lbproxy test pebble minica")])
    ca = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + datetime.timedelta(days=30))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(False, False, False, False, False, True, True, False, False),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), False)
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")]))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + datetime.timedelta(days=30))
        .add_extension(
            x509.SubjectAlternativeName(
                [
                    x509.DNSName("localhost"),
                    x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
                ]
            ),
            critical=False,
        )
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), False
        )
        .sign(ca_key, hashes.SHA256())
    )
    ca_path, cert_path, key_path = workdir / "minica.pem", workdir / "cert.pem", workdir / "key.pem"
    ca_path.write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return ca_path, cert_path, key_path


def _wait_ready(probe: Callable[[], None], proc: subprocess.Popen[bytes], what: str,
                log: Path) -> None:
    def answered() -> bool:
        probe()
        return True

    wait_ready(proc, what, answered, lambda: log.read_text()[-2000:], timeout=READY_TIMEOUT,
               interval=POLL_INTERVAL, not_yet=(OSError, urllib.error.URLError))


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=5)


@contextlib.contextmanager
def start_pebble(
    workdir: Path,
    *,
    http_port: int | None = None,
    tls_port: int | None = None,
    dns_server: str | None = None,
    env: Mapping[str, str] | None = None,
    eab_keys: Mapping[str, str] | None = None,
) -> Iterator[PebbleInstance]:
    """Run challtestsrv + pebble until the block exits.

    tls_port: where the VA dials for tls-alpn-01 (default: a free port nobody listens on).
    dns_server: "host:port" of the DNS server Pebble's VA resolves through (an authoritative
    server a dns-01 test updates) instead of challtestsrv's; challtestsrv still runs.

    env: PEBBLE_* knobs; defaults here are PEBBLE_VA_NOSLEEP=1, PEBBLE_WFE_NONCEREJECT=0 and
    PEBBLE_AUTHZREUSE=0, each overridable. 0 is Pebble's lowest, and it still reuses a valid
    authorization one time in a hundred: a test that needs a fresh validation deactivates the
    old ones first (tests.support.acme_counting.AuthzRecorder). eab_keys (kid -> base64url HMAC key)
    turns on externalAccountBindingRequired.
    """
    workdir.mkdir(parents=True, exist_ok=True)
    ca_path, cert_path, key_path = _write_tls(workdir)
    http_port = http_port if http_port is not None else free_port()
    tls_port = tls_port if tls_port is not None else free_port()
    acme_port, mgmt_port, cts_port = free_port(), free_port(), free_port()
    dns_port = free_port(udp_too=True)
    config: dict[str, object] = {
        "listenAddress": f"127.0.0.1:{acme_port}",
        "managementListenAddress": f"127.0.0.1:{mgmt_port}",
        "certificate": str(cert_path),
        "privateKey": str(key_path),
        "httpPort": http_port,
        "tlsPort": tls_port,
        "ocspResponderURL": "",
        "externalAccountBindingRequired": bool(eab_keys),
    }
    if eab_keys:
        config["externalAccountMACKeys"] = dict(eab_keys)
    config_path = workdir / "pebble-config.json"
    config_path.write_text(json.dumps({"pebble": config}))
    proc_env = dict(os.environ)
    proc_env.update(
        {"PEBBLE_VA_NOSLEEP": "1", "PEBBLE_WFE_NONCEREJECT": "0", "PEBBLE_AUTHZREUSE": "0"}
    )
    proc_env.update(env or {})
    cts_log, pebble_log = workdir / "challtestsrv.log", workdir / "pebble.log"
    procs: list[subprocess.Popen[bytes]] = []
    try:
        with cts_log.open("wb") as out:
            cts = subprocess.Popen(
                [
                    "pebble-challtestsrv",
                    "-defaultIPv4", "127.0.0.1",
                    "-defaultIPv6", "",
                    "-dns01", f"127.0.0.1:{dns_port}",
                    "-management", f"127.0.0.1:{cts_port}",
                    "-http01", "", "-https01", "", "-tlsalpn01", "",
                ],
                stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                env=proc_env,
            )  # fmt: skip
        procs.append(cts)
        cts_url = f"http://127.0.0.1:{cts_port}"

        def probe_cts() -> None:
            try:
                urllib.request.urlopen(cts_url + "/", timeout=1).close()
            except urllib.error.HTTPError:
                pass  # any HTTP answer means it is up

        _wait_ready(probe_cts, cts, "pebble-challtestsrv", cts_log)
        resolver = dns_server or f"127.0.0.1:{dns_port}"
        with pebble_log.open("wb") as out:
            peb = subprocess.Popen(
                ["pebble", "-config", str(config_path), "-dnsserver", resolver],
                stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                env=proc_env,
            )  # fmt: skip
        procs.append(peb)
        directory_url = f"https://127.0.0.1:{acme_port}/dir"
        ctx = ssl.create_default_context(cafile=str(ca_path))

        def probe_pebble() -> None:
            urllib.request.urlopen(directory_url, context=ctx, timeout=1).close()

        _wait_ready(probe_pebble, peb, "pebble", pebble_log)
        yield PebbleInstance(
            directory_url=directory_url,
            ca_bundle=str(ca_path),
            management_url=f"https://127.0.0.1:{mgmt_port}",
            http_port=http_port,
            challtestsrv_url=cts_url,
            workdir=workdir,
            tls_port=tls_port,
            dns_server=resolver,
        )
    finally:
        for proc in reversed(procs):
            _stop(proc)
