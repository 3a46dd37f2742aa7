"""The validated, frozen configuration model: what a TOML file means once every check has passed."""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path

from .dnsconfig import Rfc2136Settings


class Protocol(StrEnum):
    HTTP = "http"
    HTTPS = "https"


class AccessLogFormat(StrEnum):
    LBPROXY = "lbproxy"
    COMBINED = "combined"
    JSON = "json"


class VSKind(StrEnum):
    PROXY = "proxy"
    REDIRECT = "redirect"


class ProxyProtocol(StrEnum):
    """The PROXY protocol header (HAProxy's) sent first on each new connection to a real server."""

    OFF = "off"
    V1 = "v1"
    V2 = "v2"


class Scheduler(StrEnum):
    ROUND_ROBIN = "rr"
    WEIGHTED_ROUND_ROBIN = "wrr"
    LEAST_CONNECTIONS = "lc"
    WEIGHTED_LEAST_CONNECTIONS = "wlc"
    SOURCE_IP_HASH = "src-hash"
    URL_HASH = "url-hash"


class HealthCheckType(StrEnum):
    NONE = "none"
    TCP = "tcp"
    HTTP = "http"


class MatchType(StrEnum):
    REGEX = "regex"
    PREFIX = "prefix"
    POSTFIX = "postfix"


class MatchOn(StrEnum):
    """What part of the request a content rule looks at."""

    URL = "url"
    HOST = "host"
    METHOD = "method"
    SRC_IP = "src-ip"
    BODY = "body"
    HEADER = "header"


# LoadMaster's limits: a rule pattern is at most 250 characters, at most 1024 rules.
MAX_PATTERN_LENGTH = 250
MAX_RULES = 1024
# LoadMaster's content rules look at the first 50 KiB of a body.
BODY_MATCH_LIMIT = 50 * 1024
# LoadMaster numbers its rule flags 1..9.
MAX_FLAG = 9
DEFAULT_RULE = "default"


@dataclass(frozen=True, slots=True)
class Address:
    host: str
    port: int

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


@dataclass(frozen=True, slots=True)
class RealServer:
    address: Address
    weight: int = 1
    enabled: bool = True
    # Resolved by the loader: the server's own setting, else its SubVS's, else its VS's.
    send_proxy_protocol: ProxyProtocol = ProxyProtocol.OFF


@dataclass(frozen=True, slots=True)
class HealthCheck:
    type: HealthCheckType = HealthCheckType.TCP
    path: str = "/"
    host: str = ""
    expect_status: tuple[int, ...] = (200,)
    interval: float = 5.0
    timeout: float = 2.0
    rise: int = 2
    fall: int = 3


@dataclass(frozen=True, slots=True)
class NotAvailable:
    """The answer given when no real server can take a request (LoadMaster's error page)."""

    status: int = 503
    body: bytes = b"Service Unavailable\n"
    content_type: str = "text/plain; charset=utf-8"


@dataclass(frozen=True, slots=True)
class ContentRule:
    name: str
    match_type: MatchType
    pattern: str
    on: MatchOn = MatchOn.URL
    header: str = ""
    negate: bool = False
    ignore_case: bool = False
    include_host: bool = False
    include_query: bool = False
    fail_on_match: bool = False
    set_flag: int = 0
    only_if_flag: int = 0
    only_if_not_flag: int = 0


@dataclass(frozen=True, slots=True)
class Timeouts:
    """Seconds. head: read a request head (slowloris); idle: client keep-alive; body: between two
    reads of a request body (like nginx's client_body_timeout); connect/first_byte: upstream;
    request: a whole exchange; upstream_idle: pooled connections; websocket_idle: an upgraded
    connection (WebSocket) with no bytes either way."""

    head: float = 10.0
    idle: float = 60.0
    body: float = 30.0
    connect: float = 3.0
    first_byte: float = 30.0
    request: float = 300.0
    upstream_idle: float = 30.0
    websocket_idle: float = 3600.0


@dataclass(frozen=True, slots=True)
class Limits:
    # 16 KiB request line + headers in total, like HAProxy's default buffer (tune.bufsize).
    max_header_bytes: int = 16 * 1024
    max_headers: int = 100
    # 0 = no limit on request bodies (they are streamed, never buffered).
    max_body: int = 0
    max_connections: int = 10_000


@dataclass(frozen=True, slots=True)
class RateLimit:
    """Requests per second per client address, with a burst (proxy/ratelimit.py): a VS's applies
    to every request it sends to a pool, a SubVS's to those its rules send there. Addresses are
    tracked in a table of at most `table_size` entries (IPv6 ones by their /`ipv6_prefix`)."""

    rate: float
    burst: int = 0  # 0: the rate rounded up (at least 1)
    table_size: int = 65_536
    ipv6_prefix: int = 64


# What [vs.compression] compresses when it names no types (text and other formats that shrink).
COMPRESS_TYPES = ("text/html", "text/plain", "text/css", "text/javascript", "text/xml",
                  "application/javascript", "application/json", "application/xml",
                  "application/xhtml+xml", "application/rss+xml", "application/atom+xml",
                  "application/manifest+json", "application/wasm", "image/svg+xml")


@dataclass(frozen=True, slots=True)
class Compression:
    """Response compression (proxy/compress.py): `encodings` in order of preference, for the
    `types` given (exact, or "text/*"), bodies of at least `min_length` bytes when announced."""

    encodings: tuple[str, ...] = ("gzip",)
    types: tuple[str, ...] = COMPRESS_TYPES
    min_length: int = 1024
    level: int = 5  # gzip, 1-9
    brotli_level: int = 4  # 0-11


@dataclass(frozen=True, slots=True)
class HTTP2Limits:
    """HTTP/2 to clients (an HTTPS VS with `http2 = true`): what one connection may hold or do
    (docs/config.md, "HTTP/2"). Rates are leaky buckets: `max_resets` / `max_control_frames` at
    once, draining at a tenth of that per second."""

    max_concurrent_streams: int = 100
    # Decoded header list (HPACK: name + value + 32 per field), and the compressed header block
    # across HEADERS and CONTINUATION frames.
    max_header_list_size: int = 32 * 1024
    max_header_block: int = 32 * 1024
    stream_window: int = 256 * 1024
    connection_window: int = 1024 * 1024
    # Streams the client resets (RST_STREAM) before their response ended (CVE-2023-44487).
    max_resets: int = 200
    # SETTINGS, PING, PRIORITY, WINDOW_UPDATE and empty DATA frames.
    max_control_frames: int = 1000


# Header rules (proxy/headerrules.py): at most this many per list, names and values this long.
MAX_HEADER_RULES = 64
MAX_HEADER_NAME = 256
MAX_HEADER_VALUE = 4096


@dataclass(frozen=True, slots=True)
class Hsts:
    """Strict-Transport-Security on every relayed response of an HTTPS VS (RFC 6797)."""

    max_age: int = 31_536_000
    include_subdomains: bool = False
    preload: bool = False


@dataclass(frozen=True, slots=True)
class HeaderRules:
    """Header rules of a VS or SubVS ([vs.headers], [vs.subvs.headers]): names as written, values
    as templates ($client_ip, $remote_addr, $scheme, $host, $server_port; $$ for a "$"). `set`
    replaces every field of that name, `add` appends one, `remove` drops them; a SubVS's rules
    apply after its VS's."""

    request_add: tuple[tuple[str, str], ...] = ()
    request_set: tuple[tuple[str, str], ...] = ()
    request_remove: tuple[str, ...] = ()
    response_add: tuple[tuple[str, str], ...] = ()
    response_set: tuple[tuple[str, str], ...] = ()
    response_remove: tuple[str, ...] = ()
    hsts: Hsts | None = None
    forwarded: bool = False
    x_forwarded_proto: bool = False


NO_HEADER_RULES = HeaderRules()


@dataclass(frozen=True, slots=True)
class SubVS:
    name: str
    real_servers: tuple[RealServer, ...] = ()
    scheduler: Scheduler = Scheduler.ROUND_ROBIN
    rules: tuple[str, ...] = ()
    health_check: HealthCheck = field(default_factory=HealthCheck)
    not_available: NotAvailable = field(default_factory=NotAvailable)
    rate_limit: RateLimit | None = None
    send_proxy_protocol: ProxyProtocol = ProxyProtocol.OFF
    headers: HeaderRules = NO_HEADER_RULES


@dataclass(frozen=True, slots=True)
class TLSSettings:
    certificates: tuple[str, ...] = ()
    default_certificate: str = ""
    # A modern policy: TLS 1.2 AEAD suites with forward secrecy (TLS 1.3 suites are always on).
    ciphers: str = "ECDHE+AESGCM:ECDHE+CHACHA20"


@dataclass(frozen=True, slots=True)
class VirtualService:
    name: str
    listen: Address
    protocol: Protocol = Protocol.HTTP
    kind: VSKind = VSKind.PROXY
    content_switching: bool = False
    real_servers: tuple[RealServer, ...] = ()
    subvs: tuple[SubVS, ...] = ()
    # Rule names in precedence order (first match wins); derived from the SubVSs when not given.
    precedence: tuple[str, ...] = ()
    scheduler: Scheduler = Scheduler.ROUND_ROBIN
    health_check: HealthCheck = field(default_factory=HealthCheck)
    not_available: NotAvailable = field(default_factory=NotAvailable)
    timeouts: Timeouts = field(default_factory=Timeouts)
    limits: Limits = field(default_factory=Limits)
    tls: TLSSettings = field(default_factory=TLSSettings)
    redirect_status: int = 301
    # Placeholders: {host} (as sent, with port), {hostname}, {path} (with query).
    redirect_to: str = "https://{host}{path}"
    add_forwarded_headers: bool = True
    # HTTP/2 offered by ALPN on an HTTPS VS (HTTP/1.1 stays the fallback); ignored for HTTP.
    http2: bool = True
    http2_limits: HTTP2Limits = field(default_factory=HTTP2Limits)
    rate_limit: RateLimit | None = None
    compression: Compression | None = None
    # PROXY protocol (v1 or v2, told apart by the header) accepted from these addresses or
    # networks only (normalized: "10.0.0.0/8", "192.0.2.7/32"); empty: none expected.
    proxy_protocol_from: tuple[str, ...] = ()
    send_proxy_protocol: ProxyProtocol = ProxyProtocol.OFF
    headers: HeaderRules = NO_HEADER_RULES

    def subvs_by_name(self, name: str) -> SubVS | None:
        for s in self.subvs:
            if s.name == name:
                return s
        return None


@dataclass(frozen=True, slots=True)
class AdminSettings:
    listen: Address = Address("127.0.0.1", 8444)
    enabled: bool = True
    # Serve /metrics without the bearer token (only on a trusted management network).
    metrics_public: bool = False
    # Serve only HTTPS: start is refused while no certificate is assigned to "admin", and the
    # last admin assignment cannot be removed. Required (or `insecure`) off loopback.
    tls: bool = False
    # Allow plain HTTP on a non-loopback `listen` (`lbproxy check` warns about it).
    insecure: bool = False


@dataclass(frozen=True, slots=True)
class AccessLogSettings:
    enabled: bool = True
    # A file path; "-" = the lbproxy.access logger (stderr); "" = $LOGS_DIRECTORY/access.log
    # under systemd (LogsDirectory=), else stderr (lbproxy.accesslog.access_log_path).
    path: str = ""
    # The line format (lbproxy.proxy.accesslog): lbproxy, combined (Apache/nginx) or json.
    format: AccessLogFormat = AccessLogFormat.LBPROXY


LETS_ENCRYPT_PRODUCTION = "https://acme-v02.api.letsencrypt.org/directory"


@dataclass(frozen=True, slots=True)
class LetsEncryptSettings:
    """Account-wide Let's Encrypt (ACME) settings; the admin API can change them at run time."""

    directory_url: str = LETS_ENCRYPT_PRODUCTION
    # PEM bundle trusted for the CA's own TLS (private CAs, Pebble); "" = the system store.
    ca_bundle: str = ""
    email: str = ""
    # Renew this many days before expiry (LoadMaster: 1-60, default 30), clamped to 1/3 of the
    # certificate's lifetime so short-lived certificates do not renew forever.
    renew_period_days: int = 30
    # `[letsencrypt.dns]`: the dns-01 provider (RFC 2136), read at each dns-01 order; None: no
    # dns-01 (a `[[certificate]]` with challenge = "dns-01" is refused at load).
    dns: Rfc2136Settings | None = None


@dataclass(frozen=True, slots=True)
class CertificateRequest:
    """A Let's Encrypt certificate declared in the config: requested and renewed automatically."""

    id: str
    common_name: str
    vs: str
    # (name, VS answering its challenge), at most 10.
    sans: tuple[tuple[str, str], ...] = ()
    key_type: str = "ec"  # "ec" (P-256) or "rsa"
    key_size: int = 2048
    country: str = ""
    state: str = ""
    city: str = ""
    company: str = ""
    unit: str = ""
    email: str = ""
    # How the CA checks the names: "http-01" (the VSs above, port 80), "tls-alpn-01" (HTTPS VSs,
    # port 443) or "dns-01" (`[letsencrypt.dns]`; the only one for a wildcard name).
    challenge: str = "http-01"


MAX_SANS = 10


@dataclass(frozen=True, slots=True)
class ClusterSettings:
    """`[cluster]`: hosts sharing one Let's Encrypt account, its certificates, challenge answers
    and locks through Redis (lbproxy.letsencrypt.redisstore). Absent: the state directory."""

    # redis://[user[:password]@]host[:port][/db] or rediss:// (TLS).
    redis_url: str
    # A file holding the 32-byte key (base64) every value is encrypted with before it reaches
    # Redis; the same file on every node (`lbproxy cluster new-key FILE` makes one).
    encryption_key_file: str
    key_prefix: str = "lbproxy"
    node_name: str = ""          # "" = the host name
    password_file: str = ""      # the Redis password, instead of one in the URL
    tls_ca_file: str = ""        # CA bundle for rediss:// ("" = the system store)
    # A lock's lease: extended every third of it while its order runs, taken over by another
    # node once a whole lease passes without extension (the holder died).
    lock_lease: float = 20.0
    # The bounded fallback to pub/sub: every node reads the shared state this often.
    poll_interval: float = 30.0

    def node(self) -> str:
        return self.node_name or socket.gethostname()


@dataclass(frozen=True, slots=True)
class EventSettings:
    """Where certificate events go (the log always) and when expiry is warned about."""

    # "" = no webhook; else every event is POSTed to it as JSON.
    webhook_url: str = ""
    # Seconds one webhook attempt may take (connect, send, answer).
    webhook_timeout: float = 5.0
    # Further attempts after a failed one (network error, timeout, 408/425/429/5xx).
    webhook_retries: int = 5
    # Seconds before the first retry, doubling up to webhook_backoff_cap.
    webhook_backoff: float = 2.0
    webhook_backoff_cap: float = 300.0
    # Events waiting for the webhook; when full the oldest is dropped (with a log line).
    webhook_queue: int = 1000
    # Extra request headers, e.g. Authorization for the receiver.
    webhook_headers: tuple[tuple[str, str], ...] = ()
    # `expiring` is raised when a certificate has fewer days left than this.
    expiry_warning_days: int = 14
    # Seconds between expiry checks (each check also repeats the renewal-failing warning).
    check_interval: float = 3600.0


# More worker processes than this is a typo, not a host (nginx's largest configs use ~128).
MAX_WORKERS = 256


@dataclass(frozen=True, slots=True)
class Config:
    virtual_services: tuple[VirtualService, ...] = ()
    rules: tuple[ContentRule, ...] = ()
    # "": the default, $STATE_DIRECTORY (systemd's StateDirectory=) when set, else "state".
    state_dir: str = ""
    admin: AdminSettings = field(default_factory=AdminSettings)
    access_log: AccessLogSettings = field(default_factory=AccessLogSettings)
    drain_timeout: float = 30.0
    # A file with no VS is refused (an editor's truncate-then-write must not close every
    # listener); true lets `lbproxy run` start with none. A reload to no VS is always refused.
    allow_empty: bool = False
    # Apply the file as soon as a change to it has settled (polled every second), as `lbproxy
    # run --watch` does. Off: only `lbproxy reload`, POST /api/reload and SIGHUP apply it.
    watch_config: bool = False
    letsencrypt: LetsEncryptSettings = field(default_factory=LetsEncryptSettings)
    certificates: tuple[CertificateRequest, ...] = ()
    events: EventSettings = field(default_factory=EventSettings)
    # Worker processes serving traffic (lbproxy.workers); 0 = "auto", one per core. 1 = one
    # process that also serves, as before workers existed.
    workers: int = 0
    # Debug: each worker adds "X-Lbproxy-Worker: <n>" to the requests it forwards with
    # X-Forwarded-* headers, so a test or an operator can see which worker served a request.
    worker_id_header: bool = False
    cluster: ClusterSettings | None = None

    def worker_count(self) -> int:
        """How many worker processes `workers` asks for on this host."""
        return self.workers or max(1, len(os.sched_getaffinity(0)))

    def state_path(self, config_path: str | os.PathLike[str]) -> Path:
        """The state directory; a relative `state_dir` is relative to the config file's folder.
        Unset, it is the first directory of $STATE_DIRECTORY (set by systemd for a unit with
        StateDirectory=, e.g. /var/lib/lbproxy) or else "state" beside the config file."""
        if not self.state_dir:
            env = os.environ.get("STATE_DIRECTORY", "").split(":")[0]
            if env:
                return Path(env)
        state = Path(self.state_dir or "state")
        return state if state.is_absolute() else Path(config_path).parent / state

    def vs_by_name(self, name: str) -> VirtualService | None:
        for vs in self.virtual_services:
            if vs.name == name:
                return vs
        return None

    def rule_by_name(self, name: str) -> ContentRule | None:
        for r in self.rules:
            if r.name == name:
                return r
        return None


def rule_order(vs: VirtualService) -> tuple[tuple[str, str], ...]:
    """(rule name, SubVS name) pairs in precedence order: the first match wins.

    An explicit `precedence` list wins; otherwise SubVS order, then each SubVS's rule order, with
    the built-in `default` rule moved last (it matches everything).
    """
    owner = {rn: s.name for s in vs.subvs for rn in s.rules}
    if vs.precedence:
        return tuple((rn, owner[rn]) for rn in vs.precedence if rn in owner)
    pairs = [(rn, s.name) for s in vs.subvs for rn in s.rules]
    return tuple([p for p in pairs if p[0] != DEFAULT_RULE] +
                 [p for p in pairs if p[0] == DEFAULT_RULE])
