"""The ACME client of the Let's Encrypt feature: one long-lived client for the current account
and directory, reused by every order and renewalInfo fetch (one aiohttp session, one directory
fetch, a warm nonce pool), replaced when the account or directory changes and closed at stop;
plus the short-lived clients of account registration and the directory check."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, Protocol, TypeVar

from acmeclient import AcmeClient, CsrSubject, KeyType, RenewalInfo
from acmeclient import cert_id as ari_cert_id
from acmeclient.crypto import PrivateKey, generate_key, private_key_to_pem
from acmeclient.errors import AcmeError

from ..certs.store import CertStore
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


T = TypeVar("T")


class ServedCertIds:
    """The ARI CertID (RFC 9773 §4.1) of the certificate a store serves under an id, or None
    (none served, or it has no Authority Key Identifier): parsed once per certificate, not at
    each renewalInfo fetch (every six hours per certificate) or each renewal (`replaces`)."""

    def __init__(self, store: CertStore) -> None:
        self.store = store
        self._known: dict[str, tuple[int, str | None]] = {}   # id -> (serial, CertID)

    def __call__(self, cert_id: str) -> str | None:
        info = self.store.get(cert_id)
        if info is None:
            return None
        known = self._known.get(cert_id)
        if known is not None and known[0] == info.serial:
            return known[1]
        material = self.store.material(cert_id)
        if material is None:
            return None
        try:
            ident: str | None = ari_cert_id(material.chain_pem)
        except (AcmeError, ValueError):
            ident = None
        self._known[cert_id] = (info.serial, ident)
        return ident

    def forget(self, cert_id: str) -> None:
        self._known.pop(cert_id, None)


class CallBound:
    """Bounds each call awaited through `run` to `limit` seconds (TimeoutError past it), like
    `asyncio.timeout(limit)` around each, but with one timer for a run of calls instead of one
    armed and cancelled per call: a call only notes its deadline; the timer, when it fires,
    cancels the call then running if it is past its own deadline, else waits for that one.
    (asyncio.timeout costs ~6 us per call: 1.5 million renewalInfo fetches a year for 1,000
    certificates.) One task at a time; a call from a second task while one runs gets its own
    asyncio.timeout."""

    def __init__(self, limit: float) -> None:
        self.limit = limit
        self._task: asyncio.Task[Any] | None = None   # the task whose call runs
        self._deadline = 0.0                           # of that call, loop time
        self._timer: asyncio.TimerHandle | None = None
        self._loop: asyncio.AbstractEventLoop | None = None   # the timer's
        self._expired = False

    async def run(self, call: Awaitable[T]) -> T:
        task = asyncio.current_task()
        if task is None or self._task is not None:
            async with asyncio.timeout(self.limit):
                return await call
        self._task, self._expired = task, False
        loop = asyncio.get_running_loop()
        self._deadline = loop.time() + self.limit
        if self._timer is None or self._loop is not loop:
            self._loop = loop
            self._timer = loop.call_at(self._deadline, self._check)
        try:
            result = await call
        except asyncio.CancelledError:
            # ours, and no other cancellation pending: a timeout (else the cancel goes on)
            if self._expired and task.uncancel() == 0:
                raise TimeoutError(f"no answer within {self.limit:.0f} s") from None
            raise
        finally:
            self._task = None
        if self._expired:   # the call swallowed our cancellation: take it back
            task.uncancel()
        return result

    def _check(self) -> None:
        self._timer = None
        task = self._task
        if task is None:
            return   # no call runs: the next one arms the timer
        loop = asyncio.get_running_loop()
        if loop.time() >= self._deadline:
            self._expired = True
            task.cancel()
        else:
            self._timer = loop.call_at(self._deadline, self._check)

    def close(self) -> None:
        """Drop the timer when no call runs (one that runs keeps its bound)."""
        if self._timer is not None and self._task is None:
            self._timer.cancel()
            self._timer = None


class Issuer:
    """Holds the one ACME client of the current (directory, CA bundle, account)."""

    def __init__(self, factory: ClientFactory) -> None:
        self._factory = factory
        self._client: AcmeClientLike | None = None
        self._made_for: tuple[object, ...] | None = None
        self._closing: set[asyncio.Task[None]] = set()
        self._ari_bound = CallBound(DIRECTORY_TIMEOUT)

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
        self._ari_bound.close()
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

    def renewal_info(self, settings: Settings, account: Account,
                     chain_pem: str) -> Awaitable[RenewalInfo | None]:
        """The CA's renewalInfo for a certificate (PEM or CertID), to await; TimeoutError
        after DIRECTORY_TIMEOUT (the scheduler's passes make these calls one after another, so
        one timer bounds them all: see CallBound). Not a coroutine itself: one frame less on a
        path taken 1.5 million times a year for 1,000 certificates."""
        return self._ari_bound.run(self.client(settings, account).fetch_renewal_info(chain_pem))

    async def order(self, settings: Settings, account: Account, names: Sequence[str],
                    key: PrivateKey, responder: Any, *, subject: CsrSubject | None,
                    replaces: str | None) -> str:
        """One order to its end (the chain PEM); TimeoutError after ORDER_TIMEOUT."""
        client = self.client(settings, account)
        async with asyncio.timeout(ORDER_TIMEOUT):
            return await client.obtain_certificate(names, key, responder, subject=subject,
                                                   replaces=replaces)


__all__ = ["CLOSE_TIMEOUT", "DIRECTORY_TIMEOUT", "ORDER_TIMEOUT", "AcmeClientLike",
           "CallBound", "ClientFactory", "Issuer", "ServedCertIds", "close_client",
           "default_client_factory", "new_cert_key", "new_key"]
