"""The dns-01 provider by RFC 2136 dynamic update: a responder (acmeclient's responder shape, with
`challenge_type = "dns-01"`) that adds and removes `_acme-challenge` TXT records on the zone's
primary with a TSIG-signed UPDATE (dnspython's asyncio API), waits until every checked server
answers the value, and proves the key before an order (`check`); and `Dns01Error`, which names the
server, zone, key and rcode of every failure.

What a failure says, and why it is one: the update's answer code (RFC 2136 §2.2, RFC 8945 §5.3:
NOTAUTH, REFUSED, NOTZONE, or the TSIG errors BADSIG/BADKEY/BADTIME that dnspython raises for an
answer carrying them), an unsigned answer to a signed request, a server that does not answer within
`timeout`, no zone found for a name, and a record that some checked server did not show within
`propagation_timeout`. The secret is never logged nor put in a message.

`Rfc2136Factory` is what the composition root plugs into the manager (`LEManager(dns01=...)`):
one responder per order, built from the running config's `[letsencrypt.dns]` at that moment.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
import weakref
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass

import dns.asyncquery
import dns.exception
import dns.flags
import dns.message
import dns.name
import dns.opcode
import dns.rcode
import dns.rdataclass
import dns.rdatatype
import dns.rdtypes.ANY.TXT
import dns.tsig
import dns.update

from acmeclient.challenges import DNS01, dns01_record_name, dns01_txt_value

from ..config.dnsconfig import DnsServer, Rfc2136Settings, dns_name, read_tsig_secret
from ..errors import ConfigError
from .codes import AcmeCode, LeError
from .model import Template

logger = logging.getLogger(__name__)

_ALGORITHMS: dict[str, dns.name.Name] = {
    "hmac-sha1": dns.tsig.HMAC_SHA1, "hmac-sha224": dns.tsig.HMAC_SHA224,
    "hmac-sha256": dns.tsig.HMAC_SHA256, "hmac-sha384": dns.tsig.HMAC_SHA384,
    "hmac-sha512": dns.tsig.HMAC_SHA512,
}
# What each refusal usually means, for the operator who reads it.
_RCODE_HINTS: dict[str, str] = {
    "NOTAUTH": "the server is not authoritative for the zone, or refused the TSIG key",
    "REFUSED": "the server refuses updates to this zone with this key (its ACL or update-policy)",
    "NOTZONE": "the record's name is not inside the zone",
    "BADSIG": "the TSIG signature does not verify there: a wrong secret or algorithm",
    "BADKEY": "the server does not know this TSIG key name and algorithm, or does not allow "
              "this key for the zone",
    "BADTIME": "the clocks of this host and the server differ by more than the allowed fudge",
    "BADTRUNC": "the server refused the truncated TSIG MAC",
    "SERVFAIL": "the server failed to apply the update (see its log)",
    "YXRRSET": "a prerequisite failed",
    "NXRRSET": "a prerequisite failed: the zone has no SOA there",
}
_PEER_ERRORS: tuple[tuple[type[dns.tsig.PeerError], str], ...] = (
    (dns.tsig.PeerBadKey, "BADKEY"), (dns.tsig.PeerBadSignature, "BADSIG"),
    (dns.tsig.PeerBadTime, "BADTIME"), (dns.tsig.PeerBadTruncation, "BADTRUNC"),
)


class Dns01Error(LeError):
    """A dns-01 step failed; `server`, `zone`, `key_name` and `rcode` say where and how."""

    def __init__(self, code: int, text: str, *, server: str, zone: str = "",
                 key_name: str = "", rcode: str = "") -> None:
        super().__init__(code, text)
        self.server = server
        self.zone = zone
        self.key_name = key_name
        self.rcode = rcode


@dataclass(frozen=True, slots=True)
class _Record:
    """One TXT value this responder put (or may have put) in a zone."""

    zone: dns.name.Name
    name: dns.name.Name
    value: str


class Rfc2136Responder:
    """Answers dns-01 challenges by RFC 2136 dynamic update to `settings.update_server`.

    `present(domain, token, key_authorization)` adds the TXT value at `_acme-challenge.<domain>.`
    and returns once every server of `settings.checked_servers` answers it; `cleanup(domain,
    token)` deletes that value alone (the two names of one order, `example.test` and
    `*.example.test`, share the record name with two values). `clock` and `sleep` pace the
    propagation wait (injected by tests).
    """

    challenge_type = DNS01

    def __init__(self, settings: Rfc2136Settings, secret: bytes, *,
                 clock: Callable[[], float] = time.monotonic,
                 sleep: Callable[[float], Awaitable[None]] = asyncio.sleep) -> None:
        self.settings = settings
        self._key = dns.tsig.Key(settings.tsig_key_name, secret,
                                 _ALGORITHMS[settings.tsig_algorithm])
        self._clock = clock
        self._sleep = sleep
        self._zones: dict[str, dns.name.Name] = {}       # domain -> its zone
        self._records: dict[tuple[str, str], _Record] = {}  # (domain, token) -> its value

    @classmethod
    def from_settings(cls, settings: Rfc2136Settings, *,
                      clock: Callable[[], float] = time.monotonic,
                      sleep: Callable[[float], Awaitable[None]] = asyncio.sleep
                      ) -> Rfc2136Responder:
        """Read the TSIG secret file (a ConfigError naming it if it cannot be used), then build."""
        return cls(settings, read_tsig_secret(settings.tsig_secret_file), clock=clock,
                   sleep=sleep)

    @property
    def pending(self) -> tuple[tuple[str, str], ...]:
        """(record name, value) of every record present() added that cleanup() has not removed."""
        return tuple((r.name.to_text(), r.value) for r in self._records.values())

    @property
    def challenges(self) -> tuple[tuple[str, str], ...]:
        """(domain, TXT record name without the final dot) of the same records: the answers of
        this order that are being published or are in the zone now."""
        return tuple((host, r.name.to_text(omit_final_dot=True))
                     for (host, _), r in self._records.items())

    async def present(self, domain: str, token: str, key_authorization: str) -> None:
        host = _host(domain)
        zone = await self.zone_for(host)
        record = _Record(zone, dns.name.from_text(dns01_record_name(host)),
                         dns01_txt_value(key_authorization))
        # Kept before sending: an update applied whose answer was lost is still cleaned up.
        self._records[(host, token)] = record
        update = self._update(zone)
        update.add(record.name, self.settings.ttl, _txt(record.value))
        try:
            await self._send_update(update, zone, f"add TXT {record.name}")
        except Dns01Error as exc:
            if exc.code == AcmeCode.DNS_UPDATE_REFUSED:  # answered: certainly not applied
                del self._records[(host, token)]
            raise
        logger.info("dns-01 for %s: TXT %s added in zone %s on %s", host, record.name, zone,
                    self.settings.update_server)
        await self.wait_visible(record.name, record.value, zone)

    async def cleanup(self, domain: str, token: str) -> None:
        record = self._records.pop((_host(domain), token), None)
        if record is None:
            return
        update = self._update(record.zone)
        update.delete(record.name, _txt(record.value))  # that value only (RFC 2136 §2.5.4)
        await self._send_update(update, record.zone, f"delete TXT {record.name}")
        logger.info("dns-01 TXT %s removed from zone %s on %s", record.name, record.zone,
                    self.settings.update_server)

    async def check(self, domains: Iterable[str] = ()) -> None:
        """Prove, before ordering, that the server takes this key's updates of the records
        present() will change: per zone, one signed UPDATE that changes nothing, its
        prerequisite the zone's SOA and its updates the deletion of a TXT value no record holds
        at each `_acme-challenge.<domain>` (RFC 2136 §3.4.2.4: deleting an absent RR is no
        change), so an ACL or update-policy that names owners and types is checked too. Without
        `domains`, the configured zone alone (the key, not the names). Raises Dns01Error
        (BADKEY, BADSIG, NOTAUTH, REFUSED, unreachable, no zone)."""
        names: dict[dns.name.Name, list[dns.name.Name]] = {}
        for domain in domains:
            host = _host(domain)
            zone = await self.zone_for(host)
            name = dns.name.from_text(dns01_record_name(host))
            if name not in names.setdefault(zone, []):
                names[zone].append(name)
        if not names:
            if not self.settings.zone:
                raise ValueError("check(): no domain given and no zone configured")
            names[dns.name.from_text(self.settings.zone)] = []
        absent = _txt(f"lbproxy-check-{secrets.token_hex(8)}")
        for zone, owners in names.items():
            update = self._update(zone)
            update.present(zone, dns.rdatatype.SOA)
            for name in owners:
                update.delete(name, absent)
            await self._send_update(update, zone, "check the TSIG key (no change)")

    async def zone_for(self, domain: str) -> dns.name.Name:
        """The zone that holds `_acme-challenge.<domain>.`: the configured one, or found by SOA
        queries to the update server, from the record's name up (an authoritative server gives
        the zone in one answer: the SOA of its negative answer's authority section)."""
        host = _host(domain)
        known = self._zones.get(host)
        if known is not None:
            return known
        name = dns.name.from_text(dns01_record_name(host))
        server = self.settings.update_server
        if self.settings.zone:
            zone = dns.name.from_text(self.settings.zone)
            if not name.is_subdomain(zone):
                raise Dns01Error(AcmeCode.DNS_NO_ZONE,
                                 f"dns-01 for {host}: {name} is not inside the configured zone "
                                 f"{zone}", server=str(server), zone=zone.to_text())
            self._zones[host] = zone
            return zone
        candidate, answered = name, "no answer"
        while candidate != dns.name.root:
            query = dns.message.make_query(candidate, dns.rdatatype.SOA)
            response = await self._exchange(query, server, f"find the zone of {name}", None)
            rcode = dns.rcode.to_text(response.rcode())
            answered = f"{candidate} SOA: {rcode}"
            if response.rcode() in (dns.rcode.NOERROR, dns.rcode.NXDOMAIN):
                for rrset in (*response.answer, *response.authority):
                    if rrset.rdtype == dns.rdatatype.SOA and name.is_subdomain(rrset.name):
                        self._zones[host] = rrset.name
                        return rrset.name
            candidate = candidate.parent()
        raise Dns01Error(AcmeCode.DNS_NO_ZONE,
                         f"dns-01 for {host}: {server} serves no zone holding {name} (last "
                         f"answer {answered}); set [letsencrypt.dns] zone or server",
                         server=str(server), rcode=answered.rsplit(" ", 1)[-1])

    async def wait_visible(self, name: dns.name.Name, value: str, zone: dns.name.Name) -> None:
        """Return once every checked server answers `value` among the TXT records of `name`;
        raise Dns01Error (DNS_NOT_PROPAGATED) naming the laggards after `propagation_timeout`."""
        settings = self.settings
        deadline = self._clock() + settings.propagation_timeout
        waiting = {ns: "not asked yet" for ns in settings.checked_servers}
        while True:
            for ns in list(waiting):
                seen = await self._shows(ns, name, value, deadline)
                if seen is None:
                    del waiting[ns]
                else:
                    waiting[ns] = seen
            if not waiting:
                return
            left = deadline - self._clock()
            if left <= 0:
                lag = "; ".join(f"{ns}: {why}" for ns, why in waiting.items())
                raise Dns01Error(AcmeCode.DNS_NOT_PROPAGATED,
                                 f"dns-01: TXT {name} not answered by every checked server "
                                 f"within {settings.propagation_timeout:g} s ({lag})",
                                 server=", ".join(str(ns) for ns in waiting),
                                 zone=zone.to_text(), key_name=settings.tsig_key_name)
            await self._sleep(min(settings.poll_interval, left))

    async def _shows(self, ns: DnsServer, name: dns.name.Name, value: str,
                     deadline: float) -> str | None:
        """None when `ns` answers `value` for `name`, else what it answered instead."""
        query = dns.message.make_query(name, dns.rdatatype.TXT)
        query.flags &= ~dns.flags.RD  # an authoritative server's own data, not a resolver's
        timeout = max(0.1, min(self.settings.timeout, deadline - self._clock()))
        try:
            response, _ = await dns.asyncquery.udp_with_fallback(
                query, ns.host, timeout=timeout, port=ns.port)
        except (dns.exception.DNSException, OSError, EOFError) as exc:
            return _failure(exc)
        if response.rcode() != dns.rcode.NOERROR:
            return dns.rcode.to_text(response.rcode())
        values = {b"".join(rd.strings).decode("ascii", "replace")
                  for rrset in response.answer if rrset.rdtype == dns.rdatatype.TXT
                  and rrset.name == name for rd in rrset}
        return None if value in values else f"{len(values)} TXT value(s), not this one"

    def _update(self, zone: dns.name.Name) -> dns.update.UpdateMessage:
        return dns.update.UpdateMessage(zone, keyring=self._key, keyname=self._key.name,
                                        keyalgorithm=self._key.algorithm)

    async def _send_update(self, update: dns.update.UpdateMessage, zone: dns.name.Name,
                           what: str) -> None:
        """Send a signed UPDATE over TCP; raise Dns01Error unless it answers NOERROR, signed."""
        server = self.settings.update_server
        response = await self._exchange(update, server, what, zone)
        if response.rcode() != dns.rcode.NOERROR:
            raise self._refused(dns.rcode.to_text(response.rcode()), what, zone)
        if not response.had_tsig:
            raise self._refused("unsigned", what, zone, "the answer carries no TSIG signature: "
                                "not trusted")

    def _where(self, zone: dns.name.Name | None) -> str:
        s = self.settings
        return (f"zone {_text(zone) or '?'}, TSIG key {s.tsig_key_name} ({s.tsig_algorithm}), "
                f"server {s.update_server}")

    def _refused(self, rcode: str, what: str, zone: dns.name.Name | None,
                 hint: str = "") -> Dns01Error:
        hint = hint or _RCODE_HINTS.get(rcode, "see the server's log")
        server = self.settings.update_server
        return Dns01Error(AcmeCode.DNS_UPDATE_REFUSED,
                          f"dns-01 {what}: {server} answered {rcode} ({hint}); "
                          f"{self._where(zone)}",
                          server=str(server), zone=_text(zone),
                          key_name=self.settings.tsig_key_name, rcode=rcode)

    async def _exchange(self, message: dns.message.Message, server: DnsServer, what: str,
                        zone: dns.name.Name | None) -> dns.message.Message:
        """One request and its answer: TCP for an UPDATE, UDP (TCP if truncated) for a query,
        within `timeout`. A TSIG error in the answer becomes Dns01Error with its rcode."""
        timeout = self.settings.timeout
        try:
            if message.opcode() == dns.opcode.UPDATE:
                return await dns.asyncquery.tcp(message, server.host, timeout=timeout,
                                                port=server.port)
            response, _ = await dns.asyncquery.udp_with_fallback(
                message, server.host, timeout=timeout, port=server.port)
            return response
        except dns.tsig.PeerError as exc:
            rcode = next((n for t, n in _PEER_ERRORS if isinstance(exc, t)), "TSIG error")
            raise self._refused(rcode, what, zone) from None
        except dns.tsig.BadSignature:
            raise self._refused("bad answer signature", what, zone,
                                "the answer's TSIG signature does not verify") from None
        except (dns.exception.DNSException, OSError, EOFError) as exc:
            raise Dns01Error(AcmeCode.DNS_UNREACHABLE,
                             f"dns-01 {what}: {server} did not answer: {_failure(exc)} (limit "
                             f"{timeout:g} s); {self._where(zone)}",
                             server=str(server), zone=_text(zone),
                             key_name=self.settings.tsig_key_name, rcode="no answer") from None


Dns01Settings = Callable[[], Rfc2136Settings | None]


class Rfc2136Factory:
    """The dns-01 provider factory (solvers.Dns01Factory) of a running lbproxy: at each order, a
    responder for the settings `current()` gives then (the running config's `[letsencrypt.dns]`,
    so a reload that changes the section is used by the next order), its TSIG secret read from
    its file then and gone with the responder when the order ends. No section (a reload removed
    it), or a secret file that cannot be used: LeError 104 saying what to fix, before any order.
    `available()` lets a request be refused before its entry is saved; `in_progress(cert_id)`
    tells what the responder of that certificate's order is answering now (for the views)."""

    def __init__(self, current: Dns01Settings, *,
                 clock: Callable[[], float] = time.monotonic,
                 sleep: Callable[[float], Awaitable[None]] = asyncio.sleep) -> None:
        self._current = current
        self._clock = clock
        self._sleep = sleep
        # Each certificate's responder while its order holds it (weak: the secret goes with it).
        self._orders: weakref.WeakValueDictionary[str, Rfc2136Responder] = (
            weakref.WeakValueDictionary())

    def available(self) -> bool:
        return self._current() is not None

    def in_progress(self, cert_id: str) -> tuple[tuple[str, str], ...]:
        """(domain, TXT record name) of each dns-01 answer of `cert_id`'s order that is being
        published or is in the zone now; () when no order of it has one."""
        responder = self._orders.get(cert_id)
        return () if responder is None else responder.challenges

    def __call__(self, cert_id: str, template: Template) -> Rfc2136Responder:
        settings = self._current()
        if settings is None:
            raise LeError(AcmeCode.CHALLENGE_UNAVAILABLE,
                          f"certificate {cert_id}: dns-01 needs a DNS provider, and the config "
                          "has no [letsencrypt.dns] section; add one (docs/config.md) or choose "
                          "http-01 or tls-alpn-01")
        try:
            responder = Rfc2136Responder.from_settings(settings, clock=self._clock,
                                                       sleep=self._sleep)
        except ConfigError as exc:
            raise LeError(AcmeCode.CHALLENGE_UNAVAILABLE,
                          f"certificate {cert_id}: the dns-01 provider cannot be set up: "
                          f"{'; '.join(str(p) for p in exc.problems)}") from None
        self._orders[cert_id] = responder
        return responder


def _host(domain: str) -> str:
    """The authorization's name, checked and in one spelling ("*." and a final dot dropped)."""
    host = domain.strip().lower().rstrip(".")
    if host.startswith("*."):
        host = host[2:]
    try:
        dns_name(host)
    except ValueError as exc:
        raise ValueError(f"dns-01: domain {exc}") from None
    return host


def _txt(value: str) -> dns.rdtypes.ANY.TXT.TXT:
    return dns.rdtypes.ANY.TXT.TXT(dns.rdataclass.IN, dns.rdatatype.TXT, [value.encode("ascii")])


def _text(zone: dns.name.Name | None) -> str:
    return "" if zone is None else zone.to_text()


def _failure(exc: BaseException) -> str:
    if isinstance(exc, dns.exception.Timeout):
        return "timeout"
    if isinstance(exc, ConnectionRefusedError):
        return "connection refused"
    if isinstance(exc, OSError):
        return exc.strerror or type(exc).__name__
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__


__all__ = ["Dns01Error", "Rfc2136Factory", "Rfc2136Responder"]
