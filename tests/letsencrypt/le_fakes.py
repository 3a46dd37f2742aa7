"""A fake ACME client for manager tests on a fake clock: issues real X.509 certificates for the
manager's own key, drives the responder like a CA would, and can fail or offer ARI windows."""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from acmeclient import CsrSubject, RenewalInfo
from acmeclient.crypto import PrivateKey
from acmeclient.errors import AcmeError
from lbproxy.certs import CertStore, config_usage
from lbproxy.config.model import Config
from lbproxy.letsencrypt import LEManager
from lbproxy.runtime import RuntimeStore

BACKDATE = dt.timedelta(hours=1)


class FakeClock:
    def __init__(self, start: dt.datetime) -> None:
        self.now = start

    def __call__(self) -> dt.datetime:
        return self.now

    def advance(self, delta: dt.timedelta) -> None:
        self.now += delta


@dataclass
class FakeAccount:
    url: str
    account: Any = None


@dataclass
class FakeCA:
    """Shared state of every FakeClient the factory hands out."""

    clock: FakeClock
    lifetime: dt.timedelta = dt.timedelta(days=90)
    fail_with: AcmeError | None = None
    # Served instead of the signed chain (a CA sending a broken one: code 15).
    chain_override: str | None = None
    ari: RenewalInfo | None = None
    orders: list[dict[str, Any]] = field(default_factory=list)
    presented: list[tuple[str, str]] = field(default_factory=list)
    key: ec.EllipticCurvePrivateKey = field(
        default_factory=lambda: ec.generate_private_key(ec.SECP256R1()))

    def factory(self, url: str, key: PrivateKey, acct: str | None,
                bundle: str | None) -> FakeClient:
        return FakeClient(self, acct)

    def sign(self, names: Sequence[str], public_key: Any) -> str:
        now = self.clock()
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "fake CA")])
        ski = x509.SubjectKeyIdentifier.from_public_key(self.key.public_key())
        cert = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, names[0])]))
            .issuer_name(name)
            .public_key(public_key)
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - BACKDATE)
            .not_valid_after(now - BACKDATE + self.lifetime)
            .add_extension(x509.SubjectAlternativeName([x509.DNSName(n) for n in names]), False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski),
                           False)
            .sign(self.key, hashes.SHA256())
        )
        return cert.public_bytes(serialization.Encoding.PEM).decode()


class FakeClient:
    def __init__(self, ca: FakeCA, account_url: str | None) -> None:
        self.ca = ca
        self.account_url = account_url

    async def directory(self) -> Any:
        return {}

    async def new_account(self, *, contact: Sequence[str] = (),
                          terms_of_service_agreed: bool = False,
                          only_return_existing: bool = False) -> FakeAccount:
        self.account_url = "https://fake.test/acct/1"
        return FakeAccount(self.account_url)

    async def obtain_certificate(self, names: Sequence[str], cert_key: PrivateKey,
                                 responder: Any, *, subject: CsrSubject | None = None,
                                 replaces: str | None = None) -> str:
        self.ca.orders.append({"names": list(names), "replaces": replaces,
                               "at": self.ca.clock()})
        if self.ca.fail_with is not None:
            raise self.ca.fail_with
        for i, n in enumerate(names):
            token = f"tok{i}" + "x" * 40
            await responder.present(n, token, token + ".thumb")
            self.ca.presented.append((n, token))
        for i, n in enumerate(names):
            await responder.cleanup(n, f"tok{i}" + "x" * 40)
        if self.ca.chain_override is not None:
            return self.ca.chain_override
        return self.ca.sign(names, cert_key.public_key())

    async def fetch_renewal_info(self, cert_pem_or_id: str) -> RenewalInfo | None:
        return self.ca.ari

    async def close(self) -> None:
        pass


@dataclass
class ManagerEnv:
    """An LEManager with its store and runtime on a fake clock and a fake CA, restartable."""

    state: Path
    clock: FakeClock
    ca: FakeCA
    runtime: RuntimeStore
    store: CertStore
    manager: LEManager

    @classmethod
    async def start(cls, state: Path, config: Config, now: dt.datetime) -> ManagerEnv:
        clock = FakeClock(now)
        ca = FakeCA(clock)
        runtime = RuntimeStore(config)
        store = CertStore(state, clock=clock)
        m = LEManager(state, runtime, store, clock=clock, client_factory=ca.factory,
                      hostname="h")
        await m.start()
        await m.register("ops@example.test")
        return cls(state, clock, ca, runtime, store, m)

    async def restart(self, *, scheduler: bool = True) -> None:
        """A new store and manager on the same state; `scheduler=False` leaves the background
        scheduler stopped so a test drives it by hand."""
        await self.manager.stop()
        self.store = CertStore(self.state, clock=self.clock,
                               usage=config_usage(lambda: self.runtime.current.config))
        self.manager = LEManager(self.state, self.runtime, self.store, clock=self.clock,
                                 client_factory=self.ca.factory, hostname="h")
        await self.manager.start()
        if not scheduler:
            await self.manager.stop()

    async def step(self, delta: dt.timedelta) -> None:
        self.clock.advance(delta)
        await self.manager.run_due()
        await self.manager.wait_idle()

    def messages(self) -> str:
        return (self.state / "system-messages.log").read_text()
