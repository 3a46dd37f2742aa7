"""The config file's other tables: `[[certificate]]` requests (names, challenge types), `[events]`
and `[cluster]`."""

from __future__ import annotations

import re
from pathlib import Path
from urllib.parse import urlsplit

from acmeclient.challenges import CHALLENGE_TYPES, DNS01, HTTP01, TLS_ALPN01

from .hints import did_you_mean
from .model import (
    MAX_SANS,
    CertificateRequest,
    ClusterSettings,
    EventSettings,
    LetsEncryptSettings,
    Protocol,
    VirtualService,
)
from .reader import (
    _HEADER_NAME_RE,
    _NAME_RE,
    _Reader,
)

_FQDN_RE = re.compile(r"(?=.{1,253}\Z)(?!-)[a-z0-9-]{1,63}(?<!-)(\.(?!-)[a-z0-9-]{1,63}(?<!-))*")


def is_fqdn(name: str) -> bool:
    return _FQDN_RE.fullmatch(name.lower()) is not None


def _cert_name(t: _Reader, key: str, name: str, challenge: str) -> None:
    """A certificate name: an FQDN, or a wildcard (`*.example.com`) proved by dns-01 (no check
    of that when `challenge` is "": unknown, already reported)."""
    if name.startswith("*.") and is_fqdn(name[2:]):
        if challenge and challenge != DNS01:
            t.error(f"the wildcard name {name!r} can only be proved by dns-01: set challenge = "
                    f"\"dns-01\" (and a [letsencrypt.dns] section), not {challenge!r}", key)
    elif name and not is_fqdn(name):
        t.error(f"{name!r} is not a fully qualified domain name", key)


def _cert_request(t: _Reader, vs_names: dict[str, str]) -> CertificateRequest | None:
    cid = t.text("id", required=True)
    if cid and not _NAME_RE.fullmatch(cid):
        t.error(f"certificate id {cid!r} must be 1-64 letters, digits, '.', '_' or '-'", "id")
    challenge = t.text("challenge", HTTP01).lower()
    if challenge not in CHALLENGE_TYPES:
        known = ", ".join(repr(c) for c in CHALLENGE_TYPES)
        hint = did_you_mean(challenge, CHALLENGE_TYPES)
        t.error(f"unknown challenge type {challenge!r}; expected one of {known}{hint}",
                "challenge")
        challenge = ""   # no second problem about the names: this one says it
    cn = t.text("common_name", required=True).lower()
    _cert_name(t, "common_name", cn, challenge)
    # A name's VS answers its http-01 or tls-alpn-01 challenge; dns-01 uses none, so may name none.
    needs_vs = challenge != DNS01
    vs = t.text("vs", required=True) if needs_vs else t.text("vs", "")
    if needs_vs and not vs and "vs" in t.data:
        t.error(f"is empty; {challenge or HTTP01} needs the VS that answers the challenge", "vs")
    if vs and vs not in vs_names:
        t.error(f"unknown virtual service {vs!r}{did_you_mean(vs, vs_names)}", "vs")
    sans: list[tuple[str, str]] = []
    for s in t.tables("sans"):
        name = s.text("name", required=True).lower()
        svs = s.text("vs", required=True) if needs_vs else s.text("vs", "")
        if needs_vs and not svs and "vs" in s.data:
            s.error(f"is empty; {challenge or HTTP01} needs the VS that answers the challenge",
                    "vs")
        _cert_name(s, "name", name, challenge)
        if svs and svs not in vs_names:
            s.error(f"unknown virtual service {svs!r}{did_you_mean(svs, vs_names)}", "vs")
        if name == cn or any(name == n for n, _ in sans):
            s.error(f"{name!r} is listed twice", "name")
        s.finish()
        sans.append((name, svs))
    if len(sans) > MAX_SANS:
        t.error(f"{len(sans)} SANs; the limit is {MAX_SANS}", "sans")
    key_type = t.text("key_type", "ec").lower()
    if key_type not in ("ec", "rsa"):
        t.error(f"unknown value {key_type!r}; expected 'ec' or 'rsa'", "key_type")
    key_size = t.integer("key_size", 2048, 2048, 4096)
    if key_type == "rsa" and key_size not in (2048, 3072, 4096):
        t.error(f"RSA key size must be 2048, 3072 or 4096, got {key_size}", "key_size")
    country = t.text("country", "")
    if country and not re.fullmatch(r"[A-Za-z]{2}", country):
        t.error(f"{country!r} is not a two-letter country code", "country")
    req = CertificateRequest(
        id=cid, common_name=cn, vs=vs, sans=tuple(sans), key_type=key_type, key_size=key_size,
        country=country.upper(), state=t.text("state", ""), city=t.text("city", ""),
        company=t.text("company", ""), unit=t.text("unit", ""), email=t.text("email", ""),
        challenge=challenge or HTTP01)
    t.finish()
    return req if cid and cn and (vs or not needs_vs) else None


def _challenge_needs(t: _Reader, req: CertificateRequest, le: LetsEncryptSettings,
                     vss: dict[str, VirtualService], *, dns_table: bool) -> None:
    """What the certificate's challenge type needs: dns-01 a `[letsencrypt.dns]` section,
    tls-alpn-01 HTTPS VSs (the CA's TLS handshake on port 443 is the proof)."""
    if req.challenge == DNS01 and le.dns is None and not dns_table:
        t.error('"dns-01" needs a [letsencrypt.dns] section (the DNS server lbproxy updates '
                "with a TSIG key: docs/config.md); there is none", "challenge")
    if req.challenge == TLS_ALPN01:
        for name, vs_name in ((req.common_name, req.vs), *req.sans):
            vs = vss.get(vs_name)
            if vs is not None and vs.protocol is not Protocol.HTTPS:
                t.error(f'"tls-alpn-01" is answered by an HTTPS VS on port 443, and {name!r} '
                        f"names VS {vs_name!r}, an {vs.protocol.value.upper()} VS", "challenge")


_DEFAULT_EVENTS = EventSettings()


def _events(r: _Reader) -> EventSettings:
    t = r.table("events")
    d = _DEFAULT_EVENTS
    url = t.text("webhook_url", "")
    if url and not url.startswith(("https://", "http://")):
        t.error(f"{url!r} is not an http(s) URL", "webhook_url")
    raw = t._get("webhook_headers", {}, (dict,), "a table of strings")
    headers: list[tuple[str, str]] = []
    for name, value in raw.items():
        where = f"webhook_headers.{name}"
        if not _HEADER_NAME_RE.fullmatch(name):
            t.error(f"{name!r} is not a valid header name", where)
        elif not isinstance(value, str):
            t.error(f"expected a string, got {type(value).__name__}", where)
        elif "\r" in value or "\n" in value:
            t.error("must not contain line breaks", where)
        else:
            headers.append((name, value))
    ev = EventSettings(
        webhook_url=url,
        webhook_timeout=t.number("webhook_timeout", d.webhook_timeout, 0.1, 300),
        webhook_retries=t.integer("webhook_retries", d.webhook_retries, 0, 100),
        webhook_backoff=t.number("webhook_backoff", d.webhook_backoff, 0.01, 3600),
        webhook_backoff_cap=t.number("webhook_backoff_cap", d.webhook_backoff_cap, 0.01, 86400),
        webhook_queue=t.integer("webhook_queue", d.webhook_queue, 1, 1_000_000),
        webhook_headers=tuple(headers),
        expiry_warning_days=t.integer("expiry_warning_days", d.expiry_warning_days, 1, 365),
        check_interval=t.number("check_interval", d.check_interval, 1, 86400),
    )
    if ev.webhook_backoff_cap < ev.webhook_backoff:
        t.error(f"must be at least webhook_backoff ({ev.webhook_backoff})",
                "webhook_backoff_cap")
    t.finish()
    return ev


_NODE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,62}")
# No ':' (the separator of lbproxy's own keys): "lb" and "lb:lock" would overlap.
_KEY_PREFIX = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,62}")


def _redis_url_problem(url: str) -> str | None:
    """What in a redis(s):// URL would fail at start-up, or be read as database 0 unnoticed
    (the URL itself is not repeated: it may hold a password)."""
    parts = urlsplit(url)
    try:
        parts.port  # noqa: B018 - raises ValueError for a bad port
    except ValueError:
        return "the port must be a number from 0 to 65535"
    db = parts.path.strip("/")
    if db and not db.isdigit():
        return f"the database after the host must be a number, got {db!r}"
    return None


def _cluster(r: _Reader) -> ClusterSettings | None:
    if "cluster" not in r.data:
        r.used.add("cluster")
        return None
    t = r.table("cluster")
    url = t.text("redis_url", required=True)
    if isinstance(t.data.get("redis_url"), str) and not url.startswith(
            ("redis://", "rediss://", "unix://")):
        scheme = url.split("://", 1)[0] + "://" if "://" in url else repr(url[:20])
        t.error(f"{scheme}...: not a redis://, rediss:// or unix:// URL (the rest is not "
                "repeated: it may hold a password)", "redis_url")
    elif url.startswith(("redis://", "rediss://")) and (problem := _redis_url_problem(url)):
        t.error(problem, "redis_url")
    key_file = t.text("encryption_key_file", required=True)
    if isinstance(t.data.get("encryption_key_file"), str) and not key_file:
        t.error("must name a file", "encryption_key_file")
    prefix = t.text("key_prefix", "lbproxy")
    if not _KEY_PREFIX.fullmatch(prefix):
        t.error(f"{prefix!r}: use 1-63 letters, digits, '.', '_' or '-'", "key_prefix")
    node = t.text("node_name", "")
    if node and not _NODE_NAME.fullmatch(node):
        t.error(f"{node!r}: use 1-63 letters, digits, '.', '_' or '-'", "node_name")

    def path(key: str) -> str:
        value = t.text(key, "")
        return str(r.base / value) if value and not Path(value).is_absolute() else value
    c = ClusterSettings(
        redis_url=url, encryption_key_file=path("encryption_key_file") if key_file else "",
        key_prefix=prefix, node_name=node, password_file=path("password_file"),
        tls_ca_file=path("tls_ca_file"),
        lock_lease=t.number("lock_lease", 20.0, 2, 600),
        poll_interval=t.number("poll_interval", 30.0, 1, 3600))
    if c.tls_ca_file and not url.startswith("rediss://"):
        t.error("applies to rediss:// URLs only", "tls_ca_file")
    t.finish()
    return c
