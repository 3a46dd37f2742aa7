"""Typed async ACME operations (RFC 8555, 9773, profiles, EAB): AcmeClient, one account at one CA.

It alone holds the account key and signs requests; running an order's authorizations is left to
the asyncio shell in shell.py, which reaches the CA only through the client's signed POST.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from acmeclient.ari import RenewalInfo, cert_id
from acmeclient.challenges import ChallengeResponder, responder_type
from acmeclient.crypto import (
    CsrSubject,
    KeyType,
    PrivateKey,
    generate_key,
    issuer_common_name,
    make_csr,
    private_key_to_pem,
    split_pem_chain,
)
from acmeclient.errors import (
    AcmeProblem,
    ClientStateError,
    Identifier,
    MalformedResponseError,
    RateLimitedError,
)
from acmeclient.jws import JwsKey, b64url, external_account_binding
from acmeclient.messages import (
    Account,
    Authorization,
    Challenge,
    Directory,
    NewOrder,
    Order,
)
from acmeclient.order import OrderMachine, PollPolicy
from acmeclient.shell import drive_order
from acmeclient.transport import (
    DEFAULT_BAD_NONCE_RETRIES,
    DEFAULT_REQUEST_TIMEOUT,
    Response,
    Transport,
)

logger = logging.getLogger(__name__)


class RevocationReason:
    """CRL reason codes accepted by ACME revocation (RFC 5280 §5.3.1, RFC 8555 §7.6)."""

    UNSPECIFIED = 0
    KEY_COMPROMISE = 1
    AFFILIATION_CHANGED = 3
    SUPERSEDED = 4
    CESSATION_OF_OPERATION = 5


@dataclass(frozen=True, slots=True)
class ExternalAccountBinding:
    """EAB credentials handed out by the CA (RFC 8555 §7.3.4); hmac_key is base64url."""

    kid: str
    hmac_key: str

    def __repr__(self) -> str:  # never show the MAC key
        return f"ExternalAccountBinding(kid={self.kid!r}, hmac_key=<hidden>)"


@dataclass(frozen=True, slots=True)
class AccountResource:
    url: str
    account: Account


@dataclass(frozen=True, slots=True)
class OrderResource:
    url: str
    order: Order


@dataclass(frozen=True, slots=True)
class CertificateChain:
    """A PEM chain (leaf first) as downloaded, with the URLs of its alternates."""

    pem: str
    alternates: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class IssuedCertificate:
    chain_pem: str
    key_pem: bytes
    account_url: str


class AcmeClient:
    """One account at one CA. Use `async with AcmeClient(...) as client:`."""

    def __init__(
        self,
        directory_url: str,
        account_key: PrivateKey,
        *,
        account_url: str | None = None,
        ca_bundle: str | None = None,
        timeout: float = DEFAULT_REQUEST_TIMEOUT,
        bad_nonce_retries: int = DEFAULT_BAD_NONCE_RETRIES,
        poll_policy: PollPolicy | None = None,
    ) -> None:
        if not directory_url.startswith("https://"):
            raise ClientStateError(f"ACME needs HTTPS (RFC 8555 §6.1): {directory_url!r}")
        self.directory_url = directory_url
        self.account_url = account_url
        self._key = JwsKey.from_key(account_key)
        self._transport = Transport(
            ca_bundle=ca_bundle, timeout=timeout, bad_nonce_retries=bad_nonce_retries
        )
        self._poll = poll_policy or PollPolicy()
        self._directory: Directory | None = None

    async def __aenter__(self) -> AcmeClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        await self._transport.close()

    @property
    def account_key(self) -> PrivateKey:
        return self._key.key

    @property
    def bad_nonce_count(self) -> int:
        """How many badNonce answers were absorbed by retries so far."""
        return self._transport.bad_nonce_count

    @property
    def thumbprint(self) -> str:
        return self._key.thumbprint()

    # ---- plumbing

    async def directory(self) -> Directory:
        if self._directory is None:
            resp = await self._transport.get(self.directory_url)
            self._directory = Directory.from_json(resp.json())
            self._transport.new_nonce_url = self._directory.new_nonce
        return self._directory

    def _kid(self) -> str:
        if self.account_url is None:
            raise ClientStateError("no account URL: call new_account() or lookup_account() first")
        return self.account_url

    async def _post(
        self, url: str, payload: dict[str, Any] | None, *, key: JwsKey | None = None
    ) -> Response:
        """POST signed with the account key by kid, or with `key` by jwk."""
        await self.directory()
        signer = key or self._key
        kid = None if key is not None else self._kid()
        return await self._transport.post(
            url, lambda nonce: signer.sign(payload, url=url, nonce=nonce, kid=kid)
        )

    async def _post_as_get(self, url: str) -> Response:
        return await self._post(url, None)

    # ---- accounts (RFC 8555 §7.3)

    async def new_account(
        self,
        *,
        contact: Sequence[str] = (),
        terms_of_service_agreed: bool = False,
        only_return_existing: bool = False,
        eab: ExternalAccountBinding | None = None,
    ) -> AccountResource:
        directory = await self.directory()
        payload: dict[str, Any] = {}
        if contact:
            payload["contact"] = list(contact)
        if terms_of_service_agreed:
            payload["termsOfServiceAgreed"] = True
        if only_return_existing:
            payload["onlyReturnExisting"] = True
        if eab is not None:
            payload["externalAccountBinding"] = external_account_binding(
                self._key, kid=eab.kid, hmac_key_b64=eab.hmac_key, url=directory.new_account
            )
        elif directory.meta.external_account_required and not only_return_existing:
            raise ClientStateError("this CA requires external account binding (eab=...)")
        url = directory.new_account
        resp = await self._transport.post(
            url, lambda nonce: self._key.sign(payload, url=url, nonce=nonce, kid=None)
        )
        if not resp.location:
            raise MalformedResponseError("newAccount answer without Location")
        self.account_url = resp.location
        return AccountResource(resp.location, Account.from_json(resp.json()))

    async def lookup_account(self) -> AccountResource:
        """Find the account of this key (onlyReturnExisting); AccountDoesNotExistError if none."""
        return await self.new_account(only_return_existing=True)

    async def get_account(self) -> AccountResource:
        resp = await self._post_as_get(self._kid())
        return AccountResource(self._kid(), Account.from_json(resp.json()))

    async def update_account(self, *, contact: Sequence[str]) -> AccountResource:
        resp = await self._post(self._kid(), {"contact": list(contact)})
        return AccountResource(self._kid(), Account.from_json(resp.json()))

    async def deactivate_account(self) -> AccountResource:
        resp = await self._post(self._kid(), {"status": "deactivated"})
        return AccountResource(self._kid(), Account.from_json(resp.json()))

    async def rollover_key(self, new_key: PrivateKey) -> None:
        """Key change (RFC 8555 §7.3.5); afterwards this client signs with the new key."""
        directory = await self.directory()
        new = JwsKey.from_key(new_key)
        url = directory.key_change
        inner = new.sign(
            {"account": self._kid(), "oldKey": self._key.public_jwk()},
            url=url,
            nonce=None,
            kid=None,
        )
        await self._post(url, inner)
        self._key = new

    # ---- orders (RFC 8555 §7.4)

    async def new_order(
        self,
        names: Sequence[str],
        *,
        not_before: datetime | None = None,
        not_after: datetime | None = None,
        profile: str | None = None,
        replaces: str | None = None,
    ) -> OrderResource:
        directory = await self.directory()
        if profile is not None:
            if not directory.meta.profiles:
                raise ClientStateError(f"profile {profile!r} requested; the CA lists no profiles")
            if profile not in directory.meta.profiles:
                raise ClientStateError(
                    f"profile {profile!r} not offered; offered: {sorted(directory.meta.profiles)}"
                )
        if replaces is not None and directory.renewal_info is None:
            logger.info("CA has no renewalInfo; not sending replaces")
            replaces = None
        request = NewOrder(
            identifiers=tuple(Identifier(n) for n in dict.fromkeys(names)),
            not_before=not_before,
            not_after=not_after,
            profile=profile,
            replaces=replaces,
        )
        resp = await self._post(directory.new_order, request.to_json())
        if not resp.location:
            raise MalformedResponseError("newOrder answer without Location")
        return OrderResource(resp.location, Order.from_json(resp.json()))

    async def get_order(self, url: str) -> OrderResource:
        resp = await self._post_as_get(url)
        return OrderResource(url, Order.from_json(resp.json()))

    async def get_authorization(self, url: str) -> Authorization:
        return Authorization.from_json((await self._post_as_get(url)).json())

    async def deactivate_authorization(self, url: str) -> Authorization:
        """Give up a (valid or pending) authorization, so the next order for its name is proved
        again (RFC 8555 §7.5.2)."""
        return Authorization.from_json((await self._post(url, {"status": "deactivated"})).json())

    async def respond_challenge(self, url: str) -> Challenge:
        return Challenge.from_json((await self._post(url, {})).json())

    async def finalize(self, url: str, csr_der: bytes) -> Order:
        return Order.from_json((await self._post(url, {"csr": b64url(csr_der)})).json())

    async def download_certificate(self, url: str) -> CertificateChain:
        resp = await self._post_as_get(url)
        pem = resp.body.decode("ascii", "replace")
        split_pem_chain(pem)  # validates
        return CertificateChain(pem, tuple(resp.link("alternate")))

    async def download_chains(self, url: str) -> list[str]:
        """The default chain followed by every alternate (Link rel="alternate", RFC 8555 §7.4.2)."""
        first = await self.download_certificate(url)
        others = await asyncio.gather(*(self.download_certificate(u) for u in first.alternates))
        return [first.pem, *(c.pem for c in others)]

    async def run_order(
        self, order: OrderResource, csr_der: bytes, responder: ChallengeResponder
    ) -> Order:
        """Authorize and finalize an order, answering each authorization's challenge of the
        responder's type (its `challenge_type`, http-01 without one); returns the order valid,
        with a certificate URL."""
        try:
            kind = responder_type(responder)
        except ValueError as exc:
            raise ClientStateError(str(exc)) from None
        machine = OrderMachine(order.url, order.order, self.thumbprint, csr_der, self._poll,
                               challenge_type=kind)
        return await drive_order(machine, responder, self._post)

    # ---- the high-level call lbproxy uses

    async def obtain_certificate(
        self,
        names: Sequence[str],
        cert_key: PrivateKey,
        responder: ChallengeResponder,
        *,
        subject: CsrSubject | None = None,
        profile: str | None = None,
        replaces: str | None = None,
        preferred_chain: str | None = None,
        not_before: datetime | None = None,
        not_after: datetime | None = None,
    ) -> str:
        """Order, authorize, finalize and download; returns the PEM chain (leaf first).

        With `replaces` (an ARI CertID) the order is marked as a renewal; if the CA rejects that,
        the order is placed once more without it (RFC 9773 §5). `preferred_chain` picks, among the
        default and alternate chains, the first whose topmost certificate's issuer CN matches.
        """
        csr = make_csr(cert_key, list(names), subject)
        try:
            order = await self.new_order(
                names,
                not_before=not_before,
                not_after=not_after,
                profile=profile,
                replaces=replaces,
            )
        except AcmeProblem as exc:
            if replaces is None or isinstance(exc, RateLimitedError):
                raise
            logger.warning("CA rejected replaces=%s (%s); ordering without it", replaces, exc.type)
            order = await self.new_order(
                names, not_before=not_before, not_after=not_after, profile=profile
            )
        done = await self.run_order(order, csr, responder)
        assert done.certificate is not None  # OrderDone guarantees it
        if preferred_chain is None:
            return (await self.download_certificate(done.certificate)).pem
        chains = await self.download_chains(done.certificate)
        return choose_chain(chains, preferred_chain)

    # ---- revocation (RFC 8555 §7.6)

    async def revoke(
        self,
        cert_pem: str,
        *,
        reason: int = RevocationReason.UNSPECIFIED,
        cert_key: PrivateKey | None = None,
    ) -> None:
        """Revoke with the account key (default) or with the certificate's own key."""
        directory = await self.directory()
        leaf = split_pem_chain(cert_pem)[0]
        payload = {
            "certificate": b64url(leaf.public_bytes(serialization.Encoding.DER)),
            "reason": reason,
        }
        key = JwsKey.from_key(cert_key) if cert_key is not None else None
        await self._post(directory.revoke_cert, payload, key=key)

    # ---- ARI (RFC 9773)

    async def fetch_renewal_info(self, cert_pem_or_id: str) -> RenewalInfo | None:
        """The CA's renewal window for a certificate (PEM or CertID); None if the CA has no ARI."""
        return await fetch_renewal_info(self, cert_pem_or_id)


async def fetch_renewal_info(client: AcmeClient, cert_pem_or_id: str) -> RenewalInfo | None:
    """GET {renewalInfo}/{CertID} (RFC 9773 §4.1), unauthenticated; None if not offered."""
    directory = await client.directory()
    if directory.renewal_info is None:
        return None
    ident = cert_id(cert_pem_or_id) if "-----BEGIN" in cert_pem_or_id else cert_pem_or_id
    resp = await client._transport.get(directory.renewal_info.rstrip("/") + "/" + ident)
    return RenewalInfo.from_json(resp.json(), resp.retry_after)


def choose_chain(chains: Sequence[str], preferred_issuer: str) -> str:
    """The first chain whose topmost certificate was issued by `preferred_issuer` (CN), else
    the first chain whose certificates have that subject CN, else the default (first)."""
    if not chains:
        raise ClientStateError("no chain to choose from")
    parsed = [split_pem_chain(c) for c in chains]
    for pem, certs in zip(chains, parsed, strict=True):
        if issuer_common_name(certs[-1]) == preferred_issuer:
            return pem
    for pem, certs in zip(chains, parsed, strict=True):
        for cert in certs:
            cns = cert.subject.get_attributes_for_oid(x509.oid.NameOID.COMMON_NAME)
            if cns and cns[0].value == preferred_issuer:
                return pem
    return chains[0]


async def issue(
    directory_url: str,
    names: Sequence[str],
    responder: ChallengeResponder,
    *,
    account_key: PrivateKey | None = None,
    account_url: str | None = None,
    cert_key: PrivateKey | None = None,
    cert_key_type: KeyType = KeyType.EC_P256,
    ca_bundle: str | None = None,
    contact: Sequence[str] = (),
    agree_terms: bool = True,
    eab: ExternalAccountBinding | None = None,
    subject: CsrSubject | None = None,
    profile: str | None = None,
    replaces: str | None = None,
    preferred_chain: str | None = None,
) -> IssuedCertificate:
    """One call from nothing to a certificate: register (or reuse) the account, then obtain."""
    key = account_key or generate_key(KeyType.EC_P256)
    ckey = cert_key or generate_key(cert_key_type)
    async with AcmeClient(directory_url, key, account_url=account_url, ca_bundle=ca_bundle) as c:
        if c.account_url is None:
            await c.new_account(contact=contact, terms_of_service_agreed=agree_terms, eab=eab)
        order_names = list(names)
        chain = await c.obtain_certificate(
            order_names,
            ckey,
            responder,
            subject=subject,
            profile=profile,
            replaces=replaces,
            preferred_chain=preferred_chain,
        )
        assert c.account_url is not None
        return IssuedCertificate(chain, private_key_to_pem(ckey), c.account_url)
