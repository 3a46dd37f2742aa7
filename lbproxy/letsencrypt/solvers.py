"""The Solver seam: how a certificate's names are proved, and by what. The challenge type is chosen
per certificate and kept in its template, so every renewal proves the names the same way (http-01
by default, as LoadMaster). Here: the checks each type needs before an order (a wildcard name
only with dns-01, code 11; tls-alpn-01 only through an HTTPS VS, code 17 sub-code 4; dns-01 only
with a DNS provider, code 104), and the solver of one order: http-01 is challenge.py's runtime
responder, tls-alpn-01 serves a validation certificate on the name's HTTPS VS through the
runtime (proxy/tls.py answers it, in every worker; in a cluster on every node, cluster.py),
dns-01 is a provider plugged in from outside (`Dns01Factory`, given to `Solvers`: the one place
it plugs in).
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Container, Iterable, Sequence
from typing import Protocol

from acmeclient.challenges import CHALLENGE_TYPES, DNS01, HTTP01, TLS_ALPN01
from acmeclient.challenges import tls_alpn01_certificate as make_validation_certificate

from ..config.model import Config
from ..config.model import Protocol as VSProtocol
from ..errors import AdminError
from ..runtime import AlpnValidation, RuntimeStore
from .challenge import (
    AnswerShare,
    ChallengeJournal,
    ObservedResponder,
    RuntimeSolver,
    existing_vs,
    verify_vs,
)
from .codes import AcmeCode, LeError, VSSubCode
from .model import Entry, Template

logger = logging.getLogger(__name__)

DEFAULT_CHALLENGE = HTTP01


class Solver(Protocol):
    """What answers one order's challenges (acmeclient's responder seam, with its type), and
    takes away whatever is left when the order ends, in any way."""

    challenge_type: str

    async def present(self, domain: str, token: str, key_authorization: str) -> None: ...

    async def cleanup(self, domain: str, token: str) -> None: ...

    async def cleanup_all(self) -> None: ...


class Dns01Provider(Protocol):
    """A dns-01 answer publisher (lbproxy/letsencrypt/dns01.py: RFC 2136). `present` returns
    once the TXT record `_acme-challenge.<domain>` holding acmeclient.challenges.dns01_txt_value
    (key authorization) is visible where the CA will look (the zone's authoritative servers);
    `cleanup` removes that one value (idempotent). `domain` is the authorization's identifier:
    a wildcard's "*." is already gone. A failure it can name raises LeError with its code;
    anything else becomes code 103.

    Optional: `async def preflight(self, names: Sequence[str]) -> None` (or, by the name
    dns01.py gives it, `async def check(self, domains: Iterable[str]) -> None`), awaited before
    the order is placed (names as requested, wildcards with their "*."): a provider that can
    tell early that it will fail (a TSIG key the server rejects, no zone for a name) raises
    LeError there, and no order is left behind at the CA."""

    challenge_type: str

    async def present(self, domain: str, token: str, key_authorization: str) -> None: ...

    async def cleanup(self, domain: str, token: str) -> None: ...


# (certificate id, its template) -> the provider answering that one order's dns-01 challenges.
Dns01Factory = Callable[[str, Template], Dns01Provider]

# Tells the obtainer that an answer is in place (a line for its events).
Announce = Callable[[str], None]


# -- checks before an order -----------------------------------------------------------------------

def check_challenge(cert_id: str, t: Template) -> None:
    """The challenge type is known, and a wildcard name is proved by dns-01 only (code 11,
    LoadMaster's "the CA offered no http-01 challenge", here before any order is placed)."""
    if t.challenge not in CHALLENGE_TYPES:
        raise AdminError(f"certificate {cert_id}: challenge must be one of "
                         f"{', '.join(CHALLENGE_TYPES)}, got {t.challenge!r}")
    wild = [n for n in t.names if n.startswith("*.")]
    if wild and t.challenge != DNS01:
        raise LeError(AcmeCode.NO_HTTP01,
                      f"certificate {cert_id}: the wildcard name {wild[0]} can only be proved "
                      f"by dns-01, not {t.challenge}; request it with --challenge dns-01 "
                      "(refused before ordering)", status=400)


def needs_vs(challenge: str) -> bool:
    """Whether each name of a certificate proved by `challenge` must name a VS: http-01 and
    tls-alpn-01 are answered through one; dns-01 writes TXT records and needs none (a VS named
    anyway is kept in the template and not checked)."""
    return challenge != DNS01


def verify_alpn_vs(config: Config, vs_name: str, *, known_before: bool) -> None:
    """tls-alpn-01 is answered by the TLS handshake of an HTTPS VS: the VS must exist (17.1,
    17.2) and be HTTPS (17.4). The CA dials the name on port 443: the VS must be what the
    name's port 443 reaches."""
    vs = existing_vs(config, vs_name, known_before=known_before)
    if vs.protocol is not VSProtocol.HTTPS:
        raise LeError(AcmeCode.VS_VERIFY,
                      f"VS {vs_name!r} cannot answer tls-alpn-01: it is a "
                      f"{vs.protocol.value} VS, not HTTPS (tls-alpn-01 is answered by the TLS "
                      "handshake on the name's port 443)", subcode=VSSubCode.NOT_HTTPS)


def verify_routes(config: Config, cert_id: str, t: Template, known: Iterable[str]) -> None:
    """Each name's VS can answer the template's challenge type (dns-01 uses none)."""
    seen = set(known)
    for _, vs in t.routes:
        try:
            if t.challenge == TLS_ALPN01:
                verify_alpn_vs(config, vs, known_before=vs in seen)
            elif t.challenge == HTTP01:
                verify_vs(config, vs, known_before=vs in seen)
        except LeError as err:
            err.text = f"certificate {cert_id}: {err.text}"
            raise


# -- the solvers ----------------------------------------------------------------------------------

class TlsAlpnSolver(RuntimeSolver[AlpnValidation]):
    """tls-alpn-01 for one order: a validation certificate per name, served by the name's HTTPS
    VS through the runtime (every worker has it when `present` returns). In a cluster (`share`)
    the key authorization goes to the other nodes too, and `present` returns once they serve
    their own validation certificate (or ACK_WAIT passed); withdrawn when the order ends."""

    challenge_type = TLS_ALPN01
    share_failure_code = AcmeCode.CHALLENGE_PUBLISH

    def __init__(self, runtime: RuntimeStore, cert_id: str, routes: dict[str, str], *,
                 announce: Announce | None = None, fail_at: Container[int] = (),
                 share: AnswerShare | None = None) -> None:
        super().__init__(runtime, cert_id, routes, fail_at=fail_at, share=share)
        self._announce = announce

    async def present(self, domain: str, token: str, key_authorization: str) -> None:
        await super().present(domain, token, key_authorization)
        if self._announce is not None:
            host = domain.lower().rstrip(".")
            self._announce(f"tls-alpn-01 answer for {host} served by VS {self._routes[host]}")

    async def _serve(self, host: str, vs: str, token: str,
                     key_authorization: str) -> AlpnValidation:
        verify_alpn_vs(self._runtime.current.config, vs, known_before=True)
        if AcmeCode.CHALLENGE_PUBLISH in self._fail_at:
            raise LeError(AcmeCode.CHALLENGE_PUBLISH, f"cannot serve the tls-alpn-01 "
                          f"certificate of {host} on VS {vs} (fault injection)")
        try:
            cert_pem, key_pem = make_validation_certificate(host, key_authorization)
        except ValueError as exc:
            raise LeError(AcmeCode.CHALLENGE_PUBLISH,
                          f"cannot make the tls-alpn-01 certificate of {host}: {exc}") from None
        validation = AlpnValidation(vs, host, token, cert_pem, key_pem)
        try:
            await self._runtime.add_validation(validation)
        except Exception as exc:
            raise LeError(AcmeCode.CHALLENGE_PUBLISH,
                          f"cannot serve the tls-alpn-01 certificate of {host} on VS {vs}: "
                          f"{exc}") from exc
        logger.info("tls-alpn-01 for %s: validation certificate on VS %s", host, vs)
        return validation

    def _serving(self, host: str, vs: str, served: AlpnValidation) -> str:
        return f"serve the tls-alpn-01 certificate of {host}"

    async def _unserve(self, v: AlpnValidation) -> None:
        await self._runtime.remove_validation(v.vs, v.host, v.token)
        logger.info("tls-alpn-01 certificate of %s removed from VS %s", v.host, v.vs)


class TrackedSolver:
    """A provider's solver for one order (dns-01): remembers what it presented, so that what
    is left when the order ends is cleaned up; a provider failure without a code is 103."""

    def __init__(self, provider: Dns01Provider, *, announce: Announce | None = None) -> None:
        self.provider = provider
        self.challenge_type = str(getattr(provider, "challenge_type", DNS01))
        self._announce = announce
        self._live: set[tuple[str, str]] = set()

    async def present(self, domain: str, token: str, key_authorization: str) -> None:
        self._live.add((domain, token))   # before: a present that fails half-way is cleaned
        try:
            await self.provider.present(domain, token, key_authorization)
        except LeError:
            raise
        except Exception as exc:
            raise LeError(AcmeCode.CHALLENGE_PUBLISH, f"cannot publish the "
                          f"{self.challenge_type} answer for {domain}: {exc}") from exc
        if self._announce is not None:
            self._announce(f"{self.challenge_type} answer for {domain} published")

    async def cleanup(self, domain: str, token: str) -> None:
        if (domain, token) in self._live:
            self._live.discard((domain, token))
            await self.provider.cleanup(domain, token)

    async def preflight(self, names: Sequence[str]) -> None:
        check: Callable[[Sequence[str]], Awaitable[None]] | None = (
            getattr(self.provider, "preflight", None) or getattr(self.provider, "check", None))
        if check is None:
            return
        try:
            await check(names)
        except LeError:
            raise
        except Exception as exc:
            raise LeError(AcmeCode.CHALLENGE_PUBLISH, f"the {self.challenge_type} provider "
                          f"cannot answer for {', '.join(names)}: {exc}") from exc

    async def cleanup_all(self) -> None:
        for domain, token in sorted(self._live):
            try:
                await self.cleanup(domain, token)
            except Exception as exc:   # best effort: the order's outcome is what is reported
                logger.error("%s cleanup for %s failed: %s", self.challenge_type, domain, exc)


class Solvers:
    """Makes the solver of each order from its template's challenge type. `dns01` is where a
    dns-01 provider plugs in (the composition root passes it to LEManager); without one, a
    dns-01 certificate is refused before ordering (code 104)."""

    def __init__(self, runtime: RuntimeStore, journal: ChallengeJournal, *,
                 fault_codes: Callable[[], Container[int]] = lambda: (),
                 share: AnswerShare | None = None, dns01: Dns01Factory | None = None) -> None:
        self.runtime = runtime
        self.journal = journal
        self.fault_codes = fault_codes
        self.share = share
        self.dns01 = dns01

    def check_available(self, cert_id: str, t: Template) -> None:
        """Code 104 when the template's challenge type has no solver here."""
        if t.challenge == DNS01 and (self.dns01 is None or not getattr(
                self.dns01, "available", lambda: True)()):
            raise LeError(AcmeCode.CHALLENGE_UNAVAILABLE,
                          f"certificate {cert_id}: dns-01 needs a DNS provider, and the config "
                          "has no [letsencrypt.dns] section; add one (docs/config.md) or choose "
                          "http-01 or tls-alpn-01",
                          status=400)

    def dns01_answers(self, cert_id: str) -> tuple[tuple[str, str], ...]:
        """(name, TXT record) of each dns-01 answer `cert_id`'s order publishes now, where the
        provider can tell (dns01.py's `in_progress`); () otherwise."""
        in_progress: Callable[[str], tuple[tuple[str, str], ...]] | None = getattr(
            self.dns01, "in_progress", None)
        return in_progress(cert_id) if in_progress is not None else ()

    async def preflight(self, solver: Solver, names: Sequence[str]) -> None:
        """The solver's own checks before the order is placed (see Dns01Provider), if any."""
        check: Callable[[Sequence[str]], Awaitable[None]] | None = getattr(
            solver, "preflight", None)
        if check is not None:
            await check(names)

    def make(self, entry: Entry, announce: Announce) -> Solver:
        """The solver of one order for `entry` (checked: code 104 if none)."""
        t = entry.template
        self.check_available(entry.id, t)
        if t.challenge == TLS_ALPN01:
            return TlsAlpnSolver(self.runtime, entry.id, dict(t.routes), announce=announce,
                                 fail_at=self.fault_codes(), share=self.share)
        if t.challenge == DNS01:
            assert self.dns01 is not None   # check_available
            try:
                provider = self.dns01(entry.id, t)
            except LeError:
                raise
            except Exception as exc:   # e.g. its key file cannot be read
                raise LeError(AcmeCode.CHALLENGE_UNAVAILABLE, f"certificate {entry.id}: the "
                              f"dns-01 provider cannot be set up: {exc}") from exc
            return TrackedSolver(provider, announce=announce)
        return ObservedResponder(
            self.runtime, entry.id, dict(t.routes), self.journal, fail_at=self.fault_codes(),
            share=self.share,
            on_present=lambda domain, vs: announce(f"http-01 answer for {domain} served by "
                                                   f"VS {vs}"))


__all__ = ["DEFAULT_CHALLENGE", "Announce", "Dns01Factory", "Dns01Provider", "Solver",
           "Solvers", "TlsAlpnSolver", "TrackedSolver", "check_challenge", "needs_vs",
           "verify_alpn_vs", "verify_routes"]
