"""The `[[vs]]` tables and everything inside them: SubVSs, content rules, real servers, health
checks, timeouts, limits, rate limits, compression, HTTP/2 limits, "not available" pages."""

from __future__ import annotations

import importlib.util
import ipaddress
import re
from pathlib import Path

from .headers import header_rules
from .hints import did_you_mean
from .model import (
    DEFAULT_RULE,
    MAX_FLAG,
    MAX_PATTERN_LENGTH,
    Address,
    Compression,
    ContentRule,
    HealthCheck,
    HealthCheckType,
    HTTP2Limits,
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
from .reader import (
    _DEFAULT_REDIRECT,
    _DEFAULT_TLS,
    _HEADER_NAME_RE,
    _VISIBLE_ASCII_RE,
    _address,
    _enum_names,
    _name,
    _Reader,
)


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
