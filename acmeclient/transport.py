"""HTTP to the CA: verified TLS, per-request deadlines, the nonce pool, badNonce retries, and
problem+json / Retry-After / Link parsing into typed values and errors."""

from __future__ import annotations

import asyncio
import collections
import email.utils
import json
import logging
import re
import ssl
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import urljoin

import aiohttp

from acmeclient.errors import (
    AcmeError,
    AcmeTimeoutError,
    BadNonceError,
    MalformedResponseError,
    NetworkError,
    Problem,
    UnexpectedStatusError,
    problem_error,
)

logger = logging.getLogger(__name__)

DEFAULT_REQUEST_TIMEOUT = 30.0  # seconds per HTTP exchange; LE answers in well under 1 s
DEFAULT_BAD_NONCE_RETRIES = 10  # Pebble rejects ~5 % (or as configured) of nonces, twice in a row
NONCE_POOL_LIMIT = 128  # bounded: nonces are cheap to refetch, memory is not free
CONNECTION_LIMIT = 64  # bounded fan-out to one CA; 20 concurrent orders fit with room
JOSE_JSON = "application/jose+json"
USER_AGENT = "acmeclient/0.1 (python asyncio)"

_LINK = re.compile(r"<([^>]*)>\s*((?:;\s*[^;,]+)*)")
_REL = re.compile(r'rel\s*=\s*"?([^";]+)"?')


@dataclass(frozen=True, slots=True)
class Response:
    """An HTTP answer reduced to what ACME needs."""

    status: int
    body: bytes
    content_type: str
    location: str | None
    links: tuple[tuple[str, str], ...]  # (url, rel)
    retry_after: float | None  # seconds from receipt

    def json(self) -> Any:
        try:
            return json.loads(self.body)
        except ValueError:
            raise MalformedResponseError(
                f"expected JSON, got {self.content_type or 'no content type'}"
            ) from None

    def link(self, rel: str) -> list[str]:
        return [url for url, r in self.links if r == rel]


def parse_retry_after(value: str | None, now: float) -> float | None:
    """Retry-After as seconds from now: delta-seconds or an HTTP-date (RFC 9110 §10.2.3)."""
    if value is None:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - now)


def parse_links(values: list[str], base: str) -> tuple[tuple[str, str], ...]:
    """Link headers (RFC 8288) as (absolute url, rel) pairs."""
    out: list[tuple[str, str]] = []
    for value in values:
        for m in _LINK.finditer(value):
            rel = _REL.search(m.group(2))
            if rel is not None:
                for r in rel.group(1).split():
                    out.append((urljoin(base, m.group(1)), r))
    return tuple(out)


def make_ssl_context(ca_bundle: str | None) -> ssl.SSLContext:
    """Verified TLS: the system store, or exactly the given CA bundle. There is no off switch."""
    ctx = ssl.create_default_context(cafile=ca_bundle)
    ctx.check_hostname = True
    ctx.verify_mode = ssl.CERT_REQUIRED
    return ctx


Signer = Callable[[str | None], dict[str, Any]]
"""Given a nonce, returns the flattened JWS body to POST."""


class Transport:
    """One aiohttp session to one CA, with a nonce pool."""

    def __init__(
        self,
        *,
        ca_bundle: str | None = None,
        timeout: float = DEFAULT_REQUEST_TIMEOUT,
        bad_nonce_retries: int = DEFAULT_BAD_NONCE_RETRIES,
        user_agent: str = USER_AGENT,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._ssl = make_ssl_context(ca_bundle)
        self._timeout = timeout
        self._bad_nonce_retries = bad_nonce_retries
        self._user_agent = user_agent
        self._clock = clock
        self._nonces: collections.deque[str] = collections.deque(maxlen=NONCE_POOL_LIMIT)
        self._session: aiohttp.ClientSession | None = None
        self.new_nonce_url: str | None = None
        self.bad_nonce_count = 0  # badNonce answers absorbed by retries (observability, tests)

    def _get_session(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(ssl=self._ssl, limit=CONNECTION_LIMIT),
                headers={"User-Agent": self._user_agent},
            )
        return self._session

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def _request(
        self, method: str, url: str, *, body: dict[str, Any] | None = None
    ) -> Response:
        session = self._get_session()
        data = None
        headers = {}
        if body is not None:
            data = json.dumps(body).encode()
            headers["Content-Type"] = JOSE_JSON
        try:
            async with asyncio.timeout(self._timeout):
                async with session.request(
                    method, url, data=data, headers=headers, allow_redirects=False
                ) as resp:
                    payload = await resp.read()
        except TimeoutError:
            raise AcmeTimeoutError(f"{method} {url}: no answer within {self._timeout} s") from None
        except aiohttp.ClientError as exc:
            raise NetworkError(f"{method} {url}: {exc}") from exc
        nonce = resp.headers.get("Replay-Nonce")
        if nonce:
            self._nonces.append(nonce)
        response = Response(
            status=resp.status,
            body=payload,
            content_type=resp.headers.get("Content-Type", "").split(";")[0].strip().lower(),
            location=resp.headers.get("Location"),
            links=parse_links(resp.headers.getall("Link", []), url),
            retry_after=parse_retry_after(resp.headers.get("Retry-After"), self._clock()),
        )
        if response.status >= 400:
            raise self._problem(response, method, url)
        return response

    def _problem(self, response: Response, method: str, url: str) -> AcmeError:
        problem: Problem | None = None
        if response.content_type in ("application/problem+json", "application/json"):
            try:
                problem = Problem.from_json(json.loads(response.body))
            except (ValueError, MalformedResponseError):
                problem = None
        if problem is None:
            text = response.body[:200].decode("utf-8", "replace")
            return UnexpectedStatusError(
                f"{method} {url}: HTTP {response.status} without a problem document: {text!r}",
                status=response.status,
                retry_after=response.retry_after,
            )
        return problem_error(problem, status=response.status, retry_after=response.retry_after)

    async def get(self, url: str) -> Response:
        """Unauthenticated GET (directory, renewalInfo)."""
        return await self._request("GET", url)

    async def _nonce(self) -> str:
        if self._nonces:
            return self._nonces.popleft()
        if self.new_nonce_url is None:
            raise MalformedResponseError("no newNonce URL known (directory not loaded)")
        await self._request("HEAD", self.new_nonce_url)
        if not self._nonces:
            raise MalformedResponseError("newNonce answered without a Replay-Nonce header")
        return self._nonces.popleft()

    async def post(self, url: str, sign: Signer, *, needs_nonce: bool = True) -> Response:
        """POST a JWS with a fresh nonce per try; badNonce is retried at once (its answer carries
        a new nonce, RFC 8555 §6.5) up to the configured count, then raised."""
        attempt = 0
        while True:
            nonce = await self._nonce() if needs_nonce else None
            try:
                return await self._request("POST", url, body=sign(nonce))
            except BadNonceError:
                attempt += 1
                self.bad_nonce_count += 1
                if attempt > self._bad_nonce_retries:
                    raise
                logger.debug("badNonce on %s, retry %d", url, attempt)
