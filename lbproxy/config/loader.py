"""TOML text -> validated Config, collecting every problem with its table path (pure, no I/O
except `load_file`)."""

from __future__ import annotations

import dataclasses
import importlib.util
import ipaddress
import re
import tomllib
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlsplit

from acmeclient.challenges import CHALLENGE_TYPES, DNS01, HTTP01, TLS_ALPN01

from ..errors import ConfigError, ConfigProblem
from .dnsconfig import dns_settings_problems, read_tsig_secret
from .headers import header_rules
from .hints import closest, did_you_mean, table_header, unit_hint
from .lint import names_of, routing_warnings
from .locate import label_of, locate, syntax_line
from .model import (
    DEFAULT_RULE,
    LETS_ENCRYPT_PRODUCTION,
    MAX_FLAG,
    MAX_PATTERN_LENGTH,
    MAX_RULES,
    MAX_SANS,
    MAX_WORKERS,
    AccessLogFormat,
    AccessLogSettings,
    Address,
    AdminSettings,
    CertificateRequest,
    ClusterSettings,
    Compression,
    Config,
    ContentRule,
    EventSettings,
    HealthCheck,
    HealthCheckType,
    HTTP2Limits,
    LetsEncryptSettings,
    Limits,
    MatchOn,
    MatchType,
    NotAvailable,
    Protocol,
    ProxyProtocol,
    RateLimit,
    RealServer,
    Scheduler,
    SubVS,
    Timeouts,
    TLSSettings,
    VirtualService,
    VSKind,
)

T = TypeVar("T")
# Validation patterns are used with fullmatch only: `$` also matches before a trailing newline.
_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
_HEADER_NAME_RE = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")
_MISSING = object()
_VISIBLE_ASCII_RE = re.compile(r"[\x21-\x7e]*")
_DEFAULT_TLS = TLSSettings()
_DEFAULT_REDIRECT = "https://{host}{path}"


class _Reader:
    """Reads one TOML table, recording problems under its path instead of raising."""

    def __init__(self, data: Any, path: str, problems: list[ConfigProblem], base: Path,
                 parent: _Reader | None = None) -> None:
        self.path = path
        self.problems = problems
        self.base = base
        self.parent = parent
        # Unknown keys of this reader and its children: (index in problems, reader, key).
        self.unknown: list[tuple[int, _Reader, str]] = parent.unknown if parent else []
        if not isinstance(data, dict):
            self.error(f"expected a table, got {type(data).__name__}")
            data = {}
        self.data: dict[str, Any] = data
        self.used: set[str] = set()

    def at(self, key: str) -> str:
        return f"{self.path}.{key}" if self.path else key

    def error(self, message: str, key: str | None = None) -> None:
        where = self.at(key) if key else (self.path or "<top>")
        self.problems.append(ConfigProblem(where, message))

    def _get(self, key: str, default: T, kinds: tuple[type, ...], kind_name: str) -> Any:
        self.used.add(key)
        value = self.data.get(key, _MISSING)
        if value is _MISSING:
            return default
        if isinstance(value, bool) and bool not in kinds:
            self.error(f"expected {kind_name}, got a boolean", key)
            return default
        if not isinstance(value, kinds):
            self.error(f"expected {kind_name}, got {type(value).__name__}"
                       f"{unit_hint(key, value, kinds)}", key)
            return default
        return value

    def text(self, key: str, default: str = "", *, required: bool = False) -> str:
        if required and key not in self.data:
            self.used.add(key)
            self.error("is required", key)
            return default
        v: str = self._get(key, default, (str,), "a string")
        return v

    def flag(self, key: str, default: bool) -> bool:
        v: bool = self._get(key, default, (bool,), "true or false")
        return v

    def integer(self, key: str, default: int, lo: int, hi: int) -> int:
        v: int = self._get(key, default, (int,), "an integer")
        if not lo <= v <= hi:
            self.error(f"must be between {lo} and {hi}, got {v}", key)
            return default
        return v

    def count_or_auto(self, key: str, lo: int, hi: int) -> int:
        """An integer in [lo, hi], or "auto" (the default), read as 0 (so lo = 0 means auto)."""
        v = self._get(key, "auto", (int, str), 'an integer or "auto"')
        if isinstance(v, str):
            if v.lower() != "auto":
                self.error(f'expected an integer or "auto", got {v!r}', key)
            return 0
        if not lo <= v <= hi:
            self.error(f"must be between {lo} and {hi} (or \"auto\"), got {v}", key)
            return 0
        return int(v)

    def number(self, key: str, default: float, lo: float, hi: float) -> float:
        v = self._get(key, default, (int, float), "a number")
        if not lo <= v <= hi:
            self.error(f"must be between {lo} and {hi}, got {v}", key)
            return default
        return float(v)

    def enum(self, key: str, default: Any, enum_type: Callable[[str], T], names: str) -> T:
        raw = self._get(key, None, (str,), "a string")
        if raw is None:
            return default  # type: ignore[no-any-return]
        try:
            return enum_type(raw.lower())
        except ValueError:
            members = getattr(enum_type, "__members__", {})
            # Member names too: "round_robin" -> 'rr'.
            known = {**{n.lower(): m.value for n, m in members.items()},
                     **{m.value: m.value for m in members.values()}}
            close = closest(raw.replace("-", "_"), known)
            hint = f"; did you mean {known[close]!r}? (one of {names})" if close else ""
            self.error(f"unknown value {raw!r}" + (hint or f"; expected one of {names}"), key)
            return default  # type: ignore[no-any-return]

    def str_list(self, key: str) -> tuple[str, ...]:
        raw = self._get(key, [], (list,), "a list of strings")
        out = []
        for i, item in enumerate(raw):
            if not isinstance(item, str):
                self.error(f"expected a string, got {type(item).__name__}", f"{key}[{i}]")
            else:
                out.append(item)
        return tuple(out)

    def tables(self, key: str) -> list[_Reader]:
        raw = self._get(key, [], (list,), "an array of tables")
        return [_Reader(item, f"{self.at(key)}[{i}]", self.problems, self.base, self)
                for i, item in enumerate(raw)]

    def table(self, key: str) -> _Reader:
        raw = self._get(key, {}, (dict,), "a table")
        return _Reader(raw, self.at(key), self.problems, self.base, self)

    def finish(self) -> None:
        for key in self.data:
            if key not in self.used:
                hint = did_you_mean(key, self.used)
                self.unknown.append((len(self.problems), self, key))
                self.error(f"unknown key{hint}" if hint else "unknown key (typo?)", key)

    def explain_unknown(self) -> None:
        """Once every table is read (on the top-level reader): an unknown key that the parent
        table knows (or nearly: a typo) was most likely written after a [header] that took it,
        TOML's one trap; say so."""
        for index, reader, key in self.unknown:
            parent = reader.parent
            if parent is None or key in reader.used:
                continue
            p = self.problems[index]
            owner = label_of(parent.path, self.data) or parent.path or "the top level"
            trap = (f"a key after a {table_header(reader.path)} header belongs to that table; "
                    "move it above the header")
            if key in parent.used:
                message = f"unknown key here, but a key of {owner}: {trap}"
            elif "did you mean" not in p.message and (hint := did_you_mean(
                    key, parent.used - {reader.path.rpartition(".")[2].split("[")[0]}, 0.8)):
                message = f"unknown key{hint} (a key of {owner}: {trap})"
            else:
                continue
            self.problems[index] = dataclasses.replace(p, message=message)


def _enum_names(enum_type: Any) -> str:
    return ", ".join(repr(m.value) for m in enum_type)


def parse_address(text: str) -> Address:
    """'host:port' or '[v6]:port' -> Address; raises ValueError with a plain message."""
    if text.startswith("["):
        host, sep, port = text[1:].partition("]:")
        if not sep:
            raise ValueError(f"{text!r} is not [address]:port")
    else:
        host, sep, port = text.rpartition(":")
        if not sep:
            raise ValueError(f"{text!r} has no port; expected address:port")
    if not host:
        raise ValueError(f"{text!r} has no address")
    if not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"port {port!r} in {text!r} is not between 1 and 65535")
    if not re.fullmatch(r"[A-Za-z0-9.\-]+", host):
        try:
            ipaddress.ip_address(host)
        except ValueError:
            raise ValueError(f"{host!r} is neither an IP address nor a host name") from None
    return Address(host, int(port))


def is_loopback(host: str) -> bool:
    """True for a loopback IP address (127.0.0.0/8, ::1, ::ffff:127.x.y.z) or "localhost"; no
    name is resolved, so every other host name counts as reachable from the network."""
    if host.lower().rstrip(".") == "localhost":
        return True
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return False
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return ip.is_loopback


def config_warnings(cfg: Config, path: str | Path | None = None) -> list[ConfigProblem]:
    """What a valid config allows but `lbproxy check` should point out: named like the loader's
    problems, and with lines when `path` (the file `cfg` was loaded from) is given."""
    out = []
    admin = cfg.admin
    if admin.enabled and admin.insecure:
        if is_loopback(admin.listen.host):
            out.append(ConfigProblem("admin.insecure", f"has no effect: {admin.listen} is a "
                                     "loopback address"))
        else:
            out.append(ConfigProblem("admin.insecure", f"the admin API serves plain HTTP on "
                                     f"{admin.listen}, a non-loopback address: the bearer token "
                                     "and uploaded keys cross the network in clear"))
    out += routing_warnings(cfg)
    if cfg.letsencrypt.dns is not None:
        # A warning, not an error: `check` may run as another user than lbproxy's.
        try:
            read_tsig_secret(cfg.letsencrypt.dns.tsig_secret_file)
        except ConfigError as exc:
            out += [dataclasses.replace(p, message=f"{p.message} (dns-01 orders will fail with "
                                        "code 104 until it can be read)") for p in exc.problems]
    text = ""
    if path is not None:
        try:
            text = Path(path).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError):
            pass
    located = locate(out, text, data=names_of(cfg), source=str(path) if path else None)
    located.sort(key=lambda p: (p.line is None, p.line or 0))
    return located


def _address(r: _Reader, key: str, *, required: bool = True) -> Address | None:
    text = r.text(key, required=required)
    if not text:
        return None
    try:
        return parse_address(text)
    except ValueError as e:
        r.error(str(e), key)
        return None


def _name(r: _Reader, what: str) -> str:
    name = r.text("name", required=True)
    if name and not _NAME_RE.fullmatch(name):
        r.error(f"{what} name {name!r} must be 1-64 letters, digits, '.', '_' or '-'", "name")
    return name


def _health_check(r: _Reader, default: HealthCheck) -> HealthCheck:
    if "health_check" not in r.data:
        r.used.add("health_check")
        return default
    t = r.table("health_check")
    expect = t._get("expect_status", list(default.expect_status), (int, list), "a status or list")
    codes = (expect,) if isinstance(expect, int) else tuple(expect)
    for c in codes:
        if not isinstance(c, int) or not 100 <= c <= 599:
            t.error(f"{c!r} is not an HTTP status code", "expect_status")
            codes = default.expect_status
            break
    hc = HealthCheck(
        type=t.enum("type", default.type, HealthCheckType, _enum_names(HealthCheckType)),
        path=t.text("path", default.path),
        host=t.text("host", default.host),
        expect_status=codes,
        interval=t.number("interval", default.interval, 0.05, 3600),
        timeout=t.number("timeout", default.timeout, 0.01, 600),
        rise=t.integer("rise", default.rise, 1, 100),
        fall=t.integer("fall", default.fall, 1, 100),
    )
    if hc.type is HealthCheckType.HTTP and not hc.path.startswith("/"):
        t.error(f"must start with '/', got {hc.path!r}", "path")
    for key, value in (("path", hc.path), ("host", hc.host)):
        if not _VISIBLE_ASCII_RE.fullmatch(value):
            t.error(f"{value!r} must be visible ASCII with no spaces", key)
    t.finish()
    return hc


def _not_available(r: _Reader, default: NotAvailable) -> NotAvailable:
    if "not_available" not in r.data:
        r.used.add("not_available")
        return default
    t = r.table("not_available")
    status = t.integer("status", default.status, 200, 599)
    body_text = t.text("body", "")
    body_file = t.text("body_file", "")
    body = body_text.encode()
    if body_text and body_file:
        t.error("give either body or body_file, not both", "body_file")
    elif body_file:
        path = Path(body_file)
        if not path.is_absolute():
            path = r.base / path
        try:
            body = path.read_bytes()
        except OSError as e:
            t.error(f"cannot read {str(path)!r}: {e.strerror}", "body_file")
    elif "body" not in t.data:
        body = default.body if status == default.status else b""
    ctype = t.text("content_type", default.content_type)
    if "\r" in ctype or "\n" in ctype:
        t.error("must not contain line breaks", "content_type")
        ctype = default.content_type
    t.finish()
    return NotAvailable(status=status, body=body, content_type=ctype)


def _real_servers(r: _Reader, send_pp: ProxyProtocol = ProxyProtocol.OFF
                  ) -> tuple[RealServer, ...]:
    out = []
    seen: set[Address] = set()
    for t in r.tables("real_servers"):
        addr = _address(t, "address")
        weight = t.integer("weight", 1, 0, 65535)
        enabled = t.flag("enabled", True)
        pp = _send_proxy_protocol(t, send_pp)
        t.finish()
        if addr is None:
            continue
        if addr in seen:
            t.error(f"real server {addr} is listed twice", "address")
        seen.add(addr)
        out.append(RealServer(addr, weight, enabled, pp))
    return tuple(out)


def _send_proxy_protocol(t: _Reader, default: ProxyProtocol) -> ProxyProtocol:
    return t.enum("send_proxy_protocol", default, ProxyProtocol, _enum_names(ProxyProtocol))


def _proxy_protocol_from(t: _Reader) -> tuple[str, ...]:
    """[[vs]] proxy_protocol_from: addresses or networks, normalized ("10.0.0.0/8")."""
    out = []
    for i, text in enumerate(t.str_list("proxy_protocol_from")):
        try:
            out.append(str(ipaddress.ip_network(text)))
        except ValueError as e:
            t.error(f"{text!r} is not an IP address or network ({e})",
                    f"proxy_protocol_from[{i}]")
    return tuple(out)


def _timeouts(r: _Reader, default: Timeouts) -> Timeouts:
    t = r.table("timeouts")
    out = Timeouts(
        head=t.number("head", default.head, 0.01, 3600),
        idle=t.number("idle", default.idle, 0.01, 86400),
        body=t.number("body", default.body, 0.01, 86400),
        connect=t.number("connect", default.connect, 0.01, 600),
        first_byte=t.number("first_byte", default.first_byte, 0.01, 86400),
        request=t.number("request", default.request, 0.01, 86400),
        upstream_idle=t.number("upstream_idle", default.upstream_idle, 0.01, 86400),
        websocket_idle=t.number("websocket_idle", default.websocket_idle, 0.01, 7 * 86400),
    )
    t.finish()
    return out


def _limits(r: _Reader, default: Limits) -> Limits:
    t = r.table("limits")
    out = Limits(
        max_header_bytes=t.integer("max_header_bytes", default.max_header_bytes, 1024, 1 << 20),
        max_headers=t.integer("max_headers", default.max_headers, 1, 10_000),
        max_body=t.integer("max_body", default.max_body, 0, 1 << 62),
        max_connections=t.integer("max_connections", default.max_connections, 1, 1_000_000),
    )
    t.finish()
    return out


def _rate_limit(r: _Reader) -> RateLimit | None:
    """[...rate_limit]: absent, no limit."""
    if "rate_limit" not in r.data:
        return None
    t = r.table("rate_limit")
    if "rate" not in t.data:
        t.error("is required", "rate")
    rate = t.number("rate", 1.0, 0.001, 1_000_000)
    out = RateLimit(
        rate=rate,
        burst=t.integer("burst", 0, 0, 1_000_000),
        table_size=t.integer("table_size", 65_536, 16, 10_000_000),
        ipv6_prefix=t.integer("ipv6_prefix", 64, 16, 128),
    )
    t.finish()
    return out


# Media types already compressed: listing one in [vs.compression] types is refused.
_COMPRESSED_TYPES = re.compile(
    r"(image/(?!svg\+xml|bmp|x-icon|vnd\.microsoft\.icon).*|video/.*|audio/(?!wav).*"
    r"|application/(zip|gzip|x-gzip|zstd|x-bzip2|x-xz|x-7z-compressed|x-rar-compressed|pdf"
    r"|octet-stream|font-woff2?)|font/woff2?)")
_MEDIA_TYPE = re.compile(r"[a-z0-9][a-z0-9!#$&^_.+-]*/(\*|[a-z0-9][a-z0-9!#$&^_.+-]*)")
_ENCODINGS = ("gzip", "br")


def _compression(r: _Reader) -> Compression | None:
    """[vs.compression]: absent, no compression."""
    if "compression" not in r.data:
        return None
    t = r.table("compression")
    d = Compression()
    encodings = t.str_list("encodings") if "encodings" in t.data else d.encodings
    for i, e in enumerate(encodings):
        if e not in _ENCODINGS:
            t.error(f"unknown encoding {e!r}; expected one of {', '.join(_ENCODINGS)}",
                    f"encodings[{i}]")
        elif e == "br" and importlib.util.find_spec("brotli") is None:
            t.error("'br' needs the brotli package, which is not installed", f"encodings[{i}]")
    if not encodings:
        t.error("must name at least one encoding", "encodings")
    if len(set(encodings)) != len(encodings):
        t.error("names an encoding twice", "encodings")
    types = tuple(x.lower() for x in t.str_list("types")) if "types" in t.data else d.types
    for i, mt in enumerate(types):
        if not _MEDIA_TYPE.fullmatch(mt):
            t.error(f"{mt!r} is not a media type (type/subtype or type/*)", f"types[{i}]")
        elif _COMPRESSED_TYPES.fullmatch(mt):
            t.error(f"{mt!r} is already compressed; compressing it again gains nothing",
                    f"types[{i}]")
    out = Compression(
        encodings=encodings, types=types,
        min_length=t.integer("min_length", d.min_length, 0, 1 << 30),
        level=t.integer("level", d.level, 1, 9),
        brotli_level=t.integer("brotli_level", d.brotli_level, 0, 11),
    )
    t.finish()
    return out


def _http2_limits(r: _Reader) -> HTTP2Limits:
    t = r.table("http2_limits")
    d = HTTP2Limits()
    out = HTTP2Limits(
        max_concurrent_streams=t.integer("max_concurrent_streams", d.max_concurrent_streams,
                                         1, 10_000),
        max_header_list_size=t.integer("max_header_list_size", d.max_header_list_size,
                                       1024, 1 << 20),
        max_header_block=t.integer("max_header_block", d.max_header_block, 1024, 1 << 20),
        stream_window=t.integer("stream_window", d.stream_window, 65_535, (1 << 31) - 1),
        connection_window=t.integer("connection_window", d.connection_window, 65_535,
                                    (1 << 31) - 1),
        max_resets=t.integer("max_resets", d.max_resets, 10, 1_000_000),
        max_control_frames=t.integer("max_control_frames", d.max_control_frames, 10, 1_000_000),
    )
    t.finish()
    return out


def _rule(t: _Reader) -> ContentRule | None:
    name = _name(t, "rule")
    if name == DEFAULT_RULE:
        t.error(f"{DEFAULT_RULE!r} is the built-in rule that matches everything", "name")
    match_type = t.enum("match", MatchType.PREFIX, MatchType, _enum_names(MatchType))
    pattern = t.text("pattern", required=True)
    on = t.enum("on", MatchOn.URL, MatchOn, _enum_names(MatchOn))
    header = t.text("header", "")
    rule = ContentRule(
        name=name,
        match_type=match_type,
        pattern=pattern,
        on=on,
        header=header,
        negate=t.flag("negate", False),
        ignore_case=t.flag("ignore_case", False),
        include_host=t.flag("include_host", False),
        include_query=t.flag("include_query", False),
        fail_on_match=t.flag("fail_on_match", False),
        set_flag=t.integer("set_flag", 0, 0, MAX_FLAG),
        only_if_flag=t.integer("only_if_flag", 0, 0, MAX_FLAG),
        only_if_not_flag=t.integer("only_if_not_flag", 0, 0, MAX_FLAG),
    )
    if len(pattern) > MAX_PATTERN_LENGTH:
        t.error(f"is {len(pattern)} characters; the limit is {MAX_PATTERN_LENGTH}", "pattern")
    if match_type is MatchType.REGEX and pattern:
        try:
            re.compile(pattern)
        except re.error as e:
            t.error(f"is not a valid regular expression: {e}", "pattern")
    if on is MatchOn.HEADER:
        if not header:
            t.error("is required when on = 'header'", "header")
        elif not _HEADER_NAME_RE.fullmatch(header):
            t.error(f"{header!r} is not a valid header name", "header")
    elif header:
        t.error("only applies when on = 'header'", "header")
    if (rule.include_host or rule.include_query) and on is not MatchOn.URL:
        t.error("include_host / include_query only apply when on = 'url'")
    t.finish()
    return rule if name and pattern else None


def _subvs(t: _Reader, vs_defaults: VirtualService) -> SubVS:
    name = _name(t, "SubVS")
    pp = _send_proxy_protocol(t, vs_defaults.send_proxy_protocol)
    s = SubVS(
        name=name,
        real_servers=_real_servers(t, pp),
        scheduler=t.enum("scheduler", vs_defaults.scheduler, Scheduler, _enum_names(Scheduler)),
        rules=t.str_list("rules"),
        health_check=_health_check(t, vs_defaults.health_check),
        not_available=_not_available(t, vs_defaults.not_available),
        rate_limit=_rate_limit(t),
        send_proxy_protocol=pp,
        headers=header_rules(t, vs_defaults.protocol),
    )
    t.finish()
    return s


def _vs(t: _Reader, rule_names: set[str]) -> VirtualService | None:
    name = _name(t, "virtual service")
    listen = _address(t, "listen")
    protocol = t.enum("protocol", Protocol.HTTP, Protocol, _enum_names(Protocol))
    kind = t.enum("kind", VSKind.PROXY, VSKind, _enum_names(VSKind))
    scheduler = t.enum("scheduler", Scheduler.ROUND_ROBIN, Scheduler, _enum_names(Scheduler))
    hc = _health_check(t, HealthCheck())
    na = _not_available(t, NotAvailable())
    pp = _send_proxy_protocol(t, ProxyProtocol.OFF)
    base = VirtualService(name=name, listen=listen or Address("0.0.0.0", 1), scheduler=scheduler,
                          health_check=hc, not_available=na, protocol=protocol,
                          send_proxy_protocol=pp)
    subvs = tuple(_subvs(s, base) for s in t.tables("subvs"))
    real_servers = _real_servers(t, pp)
    tls_t = t.table("tls")
    tls = TLSSettings(
        certificates=tls_t.str_list("certificates"),
        default_certificate=tls_t.text("default_certificate", ""),
        ciphers=tls_t.text("ciphers", _DEFAULT_TLS.ciphers),
    )
    tls_t.finish()
    if tls.default_certificate and tls.default_certificate not in tls.certificates:
        tls = TLSSettings((*tls.certificates, tls.default_certificate), tls.default_certificate,
                          tls.ciphers)
    vs = VirtualService(
        name=name,
        listen=base.listen,
        protocol=protocol,
        kind=kind,
        content_switching=t.flag("content_switching", bool(subvs)),
        real_servers=real_servers,
        subvs=subvs,
        precedence=t.str_list("precedence"),
        scheduler=scheduler,
        health_check=hc,
        not_available=na,
        timeouts=_timeouts(t, Timeouts()),
        limits=_limits(t, Limits()),
        tls=tls,
        redirect_status=t.integer("redirect_status", 301, 300, 399),
        redirect_to=t.text("redirect_to", _DEFAULT_REDIRECT),
        add_forwarded_headers=t.flag("add_forwarded_headers", True),
        http2=t.flag("http2", True),
        http2_limits=_http2_limits(t),
        rate_limit=_rate_limit(t),
        compression=_compression(t),
        proxy_protocol_from=_proxy_protocol_from(t),
        send_proxy_protocol=pp,
        headers=header_rules(t, protocol),
    )
    t.finish()
    if vs.redirect_status not in (301, 302, 303, 307, 308):
        t.error(f"must be 301, 302, 303, 307 or 308, got {vs.redirect_status}", "redirect_status")
    if kind is VSKind.REDIRECT:
        if subvs or real_servers:
            t.error("a redirect VS answers every request itself; remove its real servers/SubVSs")
        for key in ("rate_limit", "compression"):
            if key in t.data:
                t.error("a redirect VS sends no request to a real server: nothing to apply it to",
                        key)
        try:
            vs.redirect_to.format(host="h", hostname="h", path="/", port="1")
        except (KeyError, IndexError, ValueError) as e:
            t.error(f"bad placeholder {e}; use {{host}}, {{hostname}}, {{port}}, {{path}}",
                    "redirect_to")
    if subvs and real_servers:
        t.error("a VS has either real servers or SubVSs, not both; move the real servers "
                "into a SubVS")
    seen_subvs: set[str] = set()
    rule_owner: dict[str, str] = {}
    for i, s in enumerate(subvs):
        if s.name in seen_subvs:
            t.error(f"SubVS {s.name!r} is defined twice", f"subvs[{i}].name")
        seen_subvs.add(s.name)
        for j, rn in enumerate(s.rules):
            where = f"subvs[{i}].rules[{j}]"
            if rn != DEFAULT_RULE and rn not in rule_names:
                t.error(f"unknown content rule {rn!r}"
                        f"{did_you_mean(rn, [*rule_names, DEFAULT_RULE])}", where)
            if rn in rule_owner:
                t.error(f"rule {rn!r} is already assigned to SubVS {rule_owner[rn]!r} "
                        "in this VS", where)
            rule_owner[rn] = s.name
    if vs.precedence:
        for j, rn in enumerate(vs.precedence):
            if rn not in rule_owner:
                t.error(f"rule {rn!r} is not assigned to any SubVS of this VS"
                        f"{did_you_mean(rn, rule_owner)}", f"precedence[{j}]")
        listed = set(vs.precedence)  # not `in` the tuple: quadratic at 10,000 rules
        missing = [rn for rn in rule_owner if rn not in listed]
        if missing:
            t.error(f"precedence must list every rule of the VS; missing {missing}",
                    "precedence")
    if protocol is Protocol.HTTPS and not tls.certificates:
        t.error("an https VS needs at least one certificate in tls.certificates")
    if protocol is Protocol.HTTP and tls.certificates:
        t.error("certificates only apply to protocol = 'https'", "tls")
    return vs if name and listen else None


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
    vs = t.text("vs", required=True)
    if vs and vs not in vs_names:
        t.error(f"unknown virtual service {vs!r}{did_you_mean(vs, vs_names)}", "vs")
    sans: list[tuple[str, str]] = []
    for s in t.tables("sans"):
        name = s.text("name", required=True).lower()
        svs = s.text("vs", required=True)
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
    return req if cid and cn and vs else None


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


def parse_config(text: str, *, base: Path | None = None, source: str = "<config>") -> Config:
    """Parse and validate; raises ConfigError listing every problem found."""
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError([ConfigProblem(source, f"TOML syntax: {e}", syntax_line(str(e)),
                                         None if source == "<config>" else source)]) from None
    problems: list[ConfigProblem] = []
    r = _Reader(data, "", problems, base or Path.cwd())

    rules: list[ContentRule] = []
    rule_names: set[str] = set()
    rule_tables = r.tables("rule")
    if len(rule_tables) > MAX_RULES:
        r.error(f"{len(rule_tables)} rules; the limit is {MAX_RULES}", "rule")
    for t in rule_tables:
        rule = _rule(t)
        if rule is None:
            continue
        if rule.name in rule_names:
            t.error(f"rule {rule.name!r} is defined twice", "name")
        rule_names.add(rule.name)
        rules.append(rule)

    vss: list[VirtualService] = []
    names: dict[str, str] = {}
    listeners: dict[Address, str] = {}
    vs_tables = r.tables("vs")
    for t in vs_tables:
        vs = _vs(t, rule_names)
        if vs is None:
            continue
        if vs.name in names:
            t.error(f"virtual service {vs.name!r} is already defined at {names[vs.name]}", "name")
        names[vs.name] = t.path
        if vs.listen in listeners:
            t.error(f"{vs.listen} is already the address of {listeners[vs.listen]!r}", "listen")
        listeners[vs.listen] = vs.name
        vss.append(vs)

    admin_t = r.table("admin")
    admin = AdminSettings(
        listen=_address(admin_t, "listen", required=False) or AdminSettings().listen,
        enabled=admin_t.flag("enabled", True),
        metrics_public=admin_t.flag("metrics_public", False),
        tls=admin_t.flag("tls", False),
        insecure=admin_t.flag("insecure", False),
    )
    if admin.enabled and not (admin.tls or admin.insecure or is_loopback(admin.listen.host)):
        admin_t.error(f"{admin.listen} is not a loopback address and the admin API would serve "
                      "plain HTTP (the bearer token and uploaded keys in clear): set tls = true "
                      "(HTTPS only, with the certificate assigned to \"admin\") or, on a trusted "
                      "network, insecure = true", "listen")
    if admin.tls and admin.insecure:
        admin_t.error("cannot be true together with tls = true; keep one", "insecure")
    admin_t.finish()
    log_t = r.table("access_log")
    access_log = AccessLogSettings(enabled=log_t.flag("enabled", True),
                                   path=log_t.text("path", ""),
                                   format=log_t.enum("format", AccessLogFormat.LBPROXY,
                                                     AccessLogFormat,
                                                     _enum_names(AccessLogFormat)))
    log_t.finish()
    le_t = r.table("letsencrypt")
    le = LetsEncryptSettings(
        directory_url=le_t.text("directory_url", LETS_ENCRYPT_PRODUCTION),
        ca_bundle=le_t.text("ca_bundle", ""),
        email=le_t.text("email", ""),
        renew_period_days=le_t.integer("renew_period_days", 30, 1, 60),
    )
    if not le.directory_url.startswith(("https://", "http://")):
        le_t.error(f"{le.directory_url!r} is not an http(s) URL", "directory_url")
    if le.ca_bundle and not Path(le.ca_bundle).is_absolute():
        le = dataclasses.replace(le, ca_bundle=str(r.base / le.ca_bundle))
    if "dns" in le_t.data:   # [letsencrypt.dns]: dnsconfig.py reads it, names its problems
        le_t.used.add("dns")
        dns, dns_problems = dns_settings_problems(le_t.data["dns"], where=le_t.at("dns"),
                                                  base=r.base)
        problems.extend(dns_problems)
        le = dataclasses.replace(le, dns=dns)
    le_t.finish()
    certs: list[CertificateRequest] = []
    by_name = {vs.name: vs for vs in vss}
    for t in r.tables("certificate"):
        req = _cert_request(t, names)
        if req is None:
            continue
        if any(c.id == req.id for c in certs):
            t.error(f"certificate {req.id!r} is declared twice", "id")
        _challenge_needs(t, req, le, by_name, dns_table="dns" in le_t.data)
        certs.append(req)
    events = _events(r)
    cfg = Config(
        letsencrypt=le,
        events=events,
        certificates=tuple(certs),
        virtual_services=tuple(vss),
        rules=tuple(rules),
        state_dir=r.text("state_dir", ""),
        admin=admin,
        access_log=access_log,
        drain_timeout=r.number("drain_timeout", 30.0, 0, 3600),
        allow_empty=r.flag("allow_empty", False),
        watch_config=r.flag("watch_config", False),
        workers=r.count_or_auto("workers", 0, MAX_WORKERS),
        worker_id_header=r.flag("worker_id_header", False),
        cluster=_cluster(r),
    )
    if admin.enabled and admin.listen in listeners:
        problems.append(ConfigProblem("admin.listen",
                                      f"{admin.listen} is also VS {listeners[admin.listen]!r}"))
    r.finish()
    if problems:
        r.explain_unknown()
        located = locate(problems, text, data=data,
                         source=None if source == "<config>" else source)
        # In file order (a problem with no line last), as an editor would walk them.
        located.sort(key=lambda p: (p.line is None, p.line or 0))
        raise ConfigError(located)
    return cfg


def load_file(path: str | Path, *, to_run: bool = False) -> Config:
    """`parse_config` of a file. `to_run` (`run`, reloads, `check`): a file that defines no
    virtual service is refused unless it says `allow_empty = true` (an empty or half-written file
    must not be mistaken for "close every listener"); readers of `[admin]` alone pass False."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError([ConfigProblem(str(p), f"cannot read: {e}")]) from None
    cfg = parse_config(text, base=p.parent.resolve(), source=str(p))
    if to_run and not cfg.virtual_services and not cfg.allow_empty:
        what = "is empty" if not text.strip() else "defines no virtual service ([[vs]])"
        raise ConfigError([ConfigProblem(str(p), f"{what}; refused (set allow_empty = true to "
                                                 "start without one)")])
    return cfg
