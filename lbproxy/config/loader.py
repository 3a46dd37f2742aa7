"""The config file as a whole: TOML text -> validated Config, collecting every problem with its
table path (pure, no I/O except `load_file`): the top-level tables and the checks across them, and
`lbproxy check`'s warnings. The table reader is reader.py's, the `[[vs]]` tables vsparse.py's,
`[[certificate]]`, `[events]` and `[cluster]` sections.py's."""

from __future__ import annotations

import dataclasses
import tomllib
from pathlib import Path

from ..errors import ConfigError, ConfigProblem
from .dnsconfig import dns_settings_problems, read_tsig_secret
from .lint import names_of, routing_warnings
from .locate import locate, syntax_line
from .model import (
    LETS_ENCRYPT_PRODUCTION,
    MAX_RULES,
    MAX_WORKERS,
    AccessLogFormat,
    AccessLogSettings,
    Address,
    AdminSettings,
    CertificateRequest,
    Config,
    ContentRule,
    LetsEncryptSettings,
    VirtualService,
)
from .reader import (
    _address,
    _enum_names,
    _Reader,
    is_loopback,
    parse_address,
)
from .sections import _cert_request, _challenge_needs, _cluster, _events, is_fqdn
from .vsparse import _rule, _vs

# What other modules import from here (some defined in reader.py and sections.py).
__all__ = ["config_warnings", "is_fqdn", "is_loopback", "load_file", "parse_address",
           "parse_config"]


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
