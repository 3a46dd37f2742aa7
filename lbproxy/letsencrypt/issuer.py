"""The ACME client of the Let's Encrypt feature: one long-lived client for the current account
and directory, reused by every order and renewalInfo fetch (one aiohttp session, one directory
fetch, a warm nonce pool), replaced when the account or directory changes and closed at stop;
plus the short-lived clients of account registration and the directory check."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Sequence
from typing import Any, Protocol

from acmeclient import AcmeClient, CsrSubject, KeyType, RenewalInfo
from acmeclient.crypto import PrivateKey, generate_key, private_key_to_pem

from .blocking import CpuWorkers, on_thread
from .model import Account, Settings

logger = logging.getLogger(__name__)

# One order (authorizations, validation, finalize, download) must end within this; Let's Encrypt
# usually needs seconds, a slow validation a minute or two.
ORDER_TIMEOUT = 300.0
# Fetching the directory (or renewalInfo): one answer within this many seconds.
DIRECTORY_TIMEOUT = 30.0
# Key types generated on the loop (see new_cert_key).
_EC_KEYS = frozenset(k for k in KeyType if k.name.startswith("EC"))
# Closing a client: its session releases its connections at once; longer is a stuck peer.
CLOSE_TIMEOUT = 5.0


class AcmeClientLike(Protocol):
    """The part of acmeclient.AcmeClient the feature uses (a seam for fakes)."""

    account_url: str | None

    async def directory(self) -> Any: ...

    async def new_account(self, *, contact: Sequence[str] = (),
                          terms_of_service_agreed: bool = False,
                          only_return_existing: bool = False) -> Any: ...

    async def obtain_certificate(self, names: Sequence[str], cert_key: PrivateKey,
                                 responder: Any, *, subject: CsrSubject | None = None,
                                 replaces: str | None = None) -> str: ...

    async def fetch_renewal_info(self, cert_pem_or_id: str) -> RenewalInfo | None: ...

    async def close(self) -> None: ...


ClientFactory = Callable[[str, PrivateKey, str | None, str | None], AcmeClientLike]


def default_client_factory(directory_url: str, key: PrivateKey, account_url: str | None,
                           ca_bundle: str | None) -> AcmeClientLike:
    return AcmeClient(directory_url, key, account_url=account_url, ca_bundle=ca_bundle or None)


async def new_key(key_type: KeyType) -> PrivateKey:
    """A fresh private key, made on a worker thread (RSA-4096 takes a second or more)."""
    return await on_thread(lambda: generate_key(key_type))


def _key_and_pem(key_type: KeyType) -> tuple[PrivateKey, bytes]:
    key = generate_key(key_type)
    return key, private_key_to_pem(key)


async def new_cert_key(key_type: KeyType,
                       cpu: CpuWorkers | None = None) -> tuple[PrivateKey, bytes]:
    """A certificate's fresh key and its PEM. RSA keys are made on a worker thread (a second or
    more for RSA-4096), both in one hop; EC keys on the loop: P-256/P-384 take tens of
    microseconds, less than the thread hop that would carry them (a TLS handshake on the same
    loop does as much)."""
    if key_type in _EC_KEYS:
        return _key_and_pem(key_type)
    return await on_thread(lambda: _key_and_pem(key_type), cpu)


async def close_client(client: AcmeClientLike) -> None:
    try:
        async with asyncio.timeout(CLOSE_TIMEOUT):
            await client.close()
    except TimeoutError:
        logger.warning("an ACME client did not close within %.0f s; left to the collector",
                       CLOSE_TIMEOUT)


class Issuer:
    """Holds the one ACME client of the current (directory, CA bundle, account)."""

    def __init__(self, factory: ClientFactory) -> None:
        self._factory = factory
        self._client: AcmeClientLike | None = None
        self._made_for: tuple[object, ...] | None = None
        self._closing: set[asyncio.Task[None]] = set()

    @property
    def factory(self) -> ClientFactory:
        return self._factory

    @factory.setter
    def factory(self, factory: ClientFactory) -> None:
        """A new factory (tests swap in a faulty CA): the next operation builds its client."""
        self._factory = factory
        self._made_for = None

    def client(self, settings: Settings, account: Account) -> AcmeClientLike:
        """The long-lived client for `account` at `settings`' directory; a new one (the old one
        closed in the background) when any of them changed since the last call."""
        made_for = (self._factory, settings.directory_url, settings.ca_bundle, account.key,
                    account.url)
        # (tuple equality tries identity first: the common case costs a few pointer compares,
        # and this runs for every renewalInfo fetch)
        if self._client is not None and made_for == self._made_for:
            return self._client
        old, self._client = self._client, None
        if old is not None:  # the directory or account changed: the old client goes
            task = asyncio.get_running_loop().create_task(close_client(old))
            self._closing.add(task)
            task.add_done_callback(self._closing.discard)
        self._client = self._factory(settings.directory_url, account.key, account.url,
                                     settings.ca_bundle or None)
        self._made_for = made_for
        return self._client

    def temporary(self, settings: Settings, key: PrivateKey,
                  account_url: str | None = None) -> AcmeClientLike:
        """A client for one operation outside the current account (registration, linking a
        key, checking a directory); the caller closes it with `close_client`."""
        return self._factory(settings.directory_url, key, account_url,
                             settings.ca_bundle or None)

    async def close(self) -> None:
        """Close the long-lived client (at stop, or when the directory changed)."""
        client, self._client, self._made_for = self._client, None, None
        if client is not None:
            await close_client(client)
        if self._closing:
            await asyncio.gather(*self._closing, return_exceptions=True)

    async def check_directory(self, url: str, ca_bundle: str) -> None:
        """Fetch the directory at `url` once (raises what acmeclient raises, or TimeoutError)."""
        probe = self._factory(url, await new_key(KeyType.EC_P256), None, ca_bundle or None)
        try:
            async with asyncio.timeout(DIRECTORY_TIMEOUT):
                await probe.directory()
        finally:
            await close_client(probe)

    async def renewal_info(self, settings: Settings, account: Account,
                           chain_pem: str) -> RenewalInfo | None:
        async with asyncio.timeout(DIRECTORY_TIMEOUT):
            return await self.client(settings, account).fetch_renewal_info(chain_pem)

    async def order(self, settings: Settings, account: Account, names: Sequence[str],
                    key: PrivateKey, responder: Any, *, subject: CsrSubject | None,
                    replaces: str | None) -> str:
        """One order to its end (the chain PEM); TimeoutError after ORDER_TIMEOUT."""
        client = self.client(settings, account)
        async with asyncio.timeout(ORDER_TIMEOUT):
            return await client.obtain_certificate(names, key, responder, subject=subject,
                                                   replaces=replaces)


__all__ = ["CLOSE_TIMEOUT", "DIRECTORY_TIMEOUT", "ORDER_TIMEOUT", "AcmeClientLike",
           "ClientFactory", "Issuer", "close_client", "default_client_factory",
           "new_cert_key", "new_key"]
