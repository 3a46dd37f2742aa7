"""The `[letsencrypt.dns]` table: the settings of the dns-01 provider (RFC 2136 dynamic update with
a TSIG key), parsed and validated into a frozen `Rfc2136Settings`, and the reading of its TSIG
secret file.

The table, with its defaults::

    [letsencrypt.dns]
    provider = "rfc2136"              # the only provider so far
    server = "192.0.2.53"             # the primary that takes the updates: its IP address
    port = 53                         # its port
    zone = ""                         # "" = found by an SOA lookup at `server`, walking up the name
    tsig_key_name = "acme-update"     # as the server knows it
    tsig_algorithm = "hmac-sha256"    # hmac-sha1/224/256/384/512
    tsig_secret_file = "acme.key"     # base64 secret, or a BIND/Knot key file; relative to the
                                      # config file's directory
    ttl = 60                          # of the TXT record, seconds
    propagation_timeout = 120         # seconds to wait until every checked server answers it
    poll_interval = 2                 # seconds between two rounds of checks
    timeout = 10                      # seconds for one DNS request (update or query)
    nameservers = []                  # checked for the record: "ip" or "ip:port" ("[v6]:port");
                                      # [] = the update server alone

Parsing is pure (`dns_settings`, `dns_settings_problems`): the secret is not read then, so a config
parsed in another process carries no key material. `read_tsig_secret(path)` reads it where it is
used (and where `lbproxy check` wants to prove it readable), raising a ConfigError that names the
key and the file.
"""

from __future__ import annotations

import base64
import binascii
import ipaddress
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import ConfigError, ConfigProblem
from .hints import did_you_mean

WHERE = "letsencrypt.dns"
PROVIDERS = ("rfc2136",)
# RFC 8945 §6 algorithms Knot, BIND and dnspython all speak; hmac-md5 is deprecated there.
TSIG_ALGORITHMS = ("hmac-sha1", "hmac-sha224", "hmac-sha256", "hmac-sha384", "hmac-sha512")
DEFAULT_PORT = 53
MAX_TTL = 86400            # a challenge record lives minutes; a day is already far too long
MAX_PROPAGATION = 3600.0   # an order's authorizations expire long after, but an hour is plenty
MAX_SECRET_FILE = 65536    # bytes: a key file is a few hundred
_KEYS = ("provider", "server", "port", "zone", "tsig_key_name", "tsig_algorithm",
         "tsig_secret_file", "ttl", "propagation_timeout", "poll_interval", "timeout",
         "nameservers")
# A DNS name in presentation form, without escapes: labels of letters, digits, '-', '_'.
_LABEL = re.compile(r"[A-Za-z0-9_](?:[A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?")
# BIND (`secret "..."`) and Knot (`secret: ...`) key files.
_SECRET_IN_KEYFILE = re.compile(
    r"""\bsecret\s*(?::\s*["']?|["'])([A-Za-z0-9+/=\s]+?)(?:["';\n]|$)""")


@dataclass(frozen=True, slots=True)
class DnsServer:
    """A DNS server's address: an IP literal and a port."""

    host: str
    port: int = DEFAULT_PORT

    def __str__(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"


@dataclass(frozen=True, slots=True, kw_only=True)
class Rfc2136Settings:
    """The dns-01 provider by RFC 2136 dynamic update: where updates go, with which TSIG key,
    and how long to wait for the record to show on the checked servers. One field per TOML key
    of `[letsencrypt.dns]`, values normalized (names absolute and lower case, paths absolute)."""

    provider: str = "rfc2136"
    server: str               # the primary's IP address
    port: int = DEFAULT_PORT
    zone: str = ""            # absolute, lower case ("example.test."); "" = found by SOA lookup
    tsig_key_name: str        # absolute, lower case: "acme-update."
    tsig_algorithm: str = "hmac-sha256"
    tsig_secret_file: str     # absolute path
    ttl: int = 60
    propagation_timeout: float = 120.0
    poll_interval: float = 2.0
    timeout: float = 10.0     # one DNS request
    nameservers: tuple[str, ...] = ()  # "ip:port" / "[v6]:port"; () = the update server

    @property
    def update_server(self) -> DnsServer:
        return DnsServer(self.server, self.port)

    @property
    def checked_servers(self) -> tuple[DnsServer, ...]:
        """The servers that must answer the record before the CA is told: the configured list,
        or the update server itself."""
        if not self.nameservers:
            return (self.update_server,)
        return tuple(dns_server(ns) for ns in self.nameservers)


def dns_name(text: str) -> str:
    """`text` as an absolute, lower-case DNS name ("Example.TEST" -> "example.test."); raises
    ValueError saying what is wrong with it."""
    name = text.strip().lower().rstrip(".")
    if not name:
        raise ValueError("is empty (a DNS name is needed)")
    if len(name) > 253:
        raise ValueError(f"{text!r} is longer than 253 characters")
    for label in name.split("."):
        if not _LABEL.fullmatch(label):
            raise ValueError(f"{text!r} is not a DNS name (label {label!r}: 1-63 letters, "
                             "digits, '-' or '_', not starting or ending with '-')")
    return name + "."


def dns_server(text: str, default_port: int = DEFAULT_PORT) -> DnsServer:
    """"192.0.2.1", "192.0.2.1:5353", "2001:db8::1" or "[2001:db8::1]:5353"; raises ValueError."""
    host, port = text.strip(), default_port
    if host.startswith("["):
        end = host.find("]")
        if end < 0 or (host[end + 1:] and not host[end + 1:].startswith(":")):
            raise ValueError(f"{text!r}: expected [IPv6]:port")
        host, rest = host[1:end], host[end + 2:]
        port = _port(rest, text) if rest else default_port
    elif host.count(":") == 1:
        host, rest = host.split(":")
        port = _port(rest, text)
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        raise ValueError(f"{text!r} is not an IP address (a name is not resolved here: "
                         "write the server's address)") from None
    return DnsServer(str(ip), port)


def _port(text: str, whole: str) -> int:
    if not text.isdigit() or not 1 <= int(text) <= 65535:
        raise ValueError(f"{whole!r}: port {text!r} is not a number between 1 and 65535")
    return int(text)


class _Table:
    """Reads the table's keys, recording each problem under `where.key`."""

    def __init__(self, data: dict[str, Any], where: str, problems: list[ConfigProblem]) -> None:
        self.data, self.where, self.problems = data, where, problems

    def error(self, key: str, message: str) -> None:
        self.problems.append(ConfigProblem(f"{self.where}.{key}", message))

    def get(self, key: str, default: Any, kinds: tuple[type, ...], kind_name: str) -> Any:
        value = self.data.get(key, default)
        if value is default:
            return default
        if isinstance(value, bool) or not isinstance(value, kinds):
            got = "a boolean" if isinstance(value, bool) else type(value).__name__
            self.error(key, f"expected {kind_name}, got {got}")
            return default
        return value

    def number(self, key: str, default: float, lo: float, hi: float) -> float:
        value = self.get(key, default, (int, float), "a number of seconds")
        if not lo <= value <= hi:
            self.error(key, f"must be between {lo:g} and {hi:g} seconds, got {value}")
            return default
        return float(value)


def dns_settings_problems(raw: object, *, where: str = WHERE, base: Path | None = None
                          ) -> tuple[Rfc2136Settings | None, list[ConfigProblem]]:
    """The settings of the `[letsencrypt.dns]` table `raw` (as tomllib gives it), or None and
    every problem found, each named by its key (`letsencrypt.dns.port: ...`). A relative
    `tsig_secret_file` is taken from `base` (the config file's directory)."""
    problems: list[ConfigProblem] = []
    if not isinstance(raw, dict):
        return None, [ConfigProblem(where, f"expected a table, got {type(raw).__name__}")]
    t = _Table(raw, where, problems)
    for key in raw:
        if key in ("tsig_secret", "secret"):
            t.error(key, "unknown key: the secret is not written in the config; put it in a file "
                         "and name the file in tsig_secret_file")
        elif key not in _KEYS:
            hint = did_you_mean(key, _KEYS)
            t.error(key, f"unknown key{hint}" if hint else "unknown key (typo?)")
    provider = t.get("provider", "rfc2136", (str,), "a string")
    if provider.lower() not in PROVIDERS:
        t.error("provider", f"unknown DNS provider {provider!r}; expected one of "
                            f"{', '.join(PROVIDERS)}")
    port = t.get("port", DEFAULT_PORT, (int,), "an integer")
    if not 1 <= port <= 65535:
        t.error("port", f"must be between 1 and 65535, got {port}")
        port = DEFAULT_PORT
    server = ""
    server_text = t.get("server", None, (str,), "a string (the primary's IP address)")
    if server_text is None:
        if "server" not in raw:
            t.error("server", "is required: the IP address of the primary DNS server that takes "
                              "the dynamic updates")
    else:
        try:
            ip = ipaddress.ip_address(server_text.strip())
        except ValueError:
            t.error("server", f"{server_text!r} is not an IP address (a name is not resolved "
                              "here; the port, if not 53, goes in port)")
        else:
            server = str(ip)
    zone = ""
    zone_text = t.get("zone", "", (str,), "a string")
    if zone_text:
        try:
            zone = dns_name(zone_text)
        except ValueError as exc:
            t.error("zone", str(exc))
    key_name = ""
    key_text = t.get("tsig_key_name", None, (str,), "a string")
    if key_text is None:
        if "tsig_key_name" not in raw:
            t.error("tsig_key_name", "is required: the TSIG key's name, as the DNS server knows "
                                     "it")
    else:
        try:
            key_name = dns_name(key_text)
        except ValueError as exc:
            t.error("tsig_key_name", str(exc))
    algorithm = t.get("tsig_algorithm", "hmac-sha256", (str,), "a string").lower()
    if algorithm not in TSIG_ALGORITHMS:
        hint = did_you_mean(algorithm, TSIG_ALGORITHMS)
        old = " (hmac-md5 is deprecated: RFC 8945 §6)" if algorithm == "hmac-md5" else ""
        t.error("tsig_algorithm", f"unknown TSIG algorithm {algorithm!r}{old}"
                                  + (hint or f"; expected one of {', '.join(TSIG_ALGORITHMS)}"))
    secret_file = t.get("tsig_secret_file", None, (str,), "a string (a file path)")
    if not secret_file:
        if secret_file is not None or "tsig_secret_file" not in raw:
            t.error("tsig_secret_file", "is required: the file holding the TSIG key's base64 "
                                        "secret (the secret itself never goes in this file)")
        secret_file = ""
    elif not Path(secret_file).is_absolute():
        secret_file = str((base or Path.cwd()) / secret_file)
    ttl = t.get("ttl", 60, (int,), "an integer (seconds)")
    if not 1 <= ttl <= MAX_TTL:
        t.error("ttl", f"must be between 1 and {MAX_TTL} seconds, got {ttl}")
    propagation = t.number("propagation_timeout", 120.0, 1.0, MAX_PROPAGATION)
    poll = t.number("poll_interval", 2.0, 0.05, 60.0)
    if "poll_interval" in raw and poll > propagation:
        t.error("poll_interval", f"{poll:g} s is longer than propagation_timeout ({propagation:g}"
                                 " s): the record would be checked once")
    timeout = t.number("timeout", 10.0, 0.1, 120.0)
    servers: list[str] = []
    listed = t.get("nameservers", [], (list,), "a list of IP addresses (\"ip\" or \"ip:port\")")
    for i, item in enumerate(listed):
        if not isinstance(item, str):
            t.error(f"nameservers[{i}]", f"expected a string, got {type(item).__name__}")
            continue
        try:
            ns = dns_server(item)
        except ValueError as exc:
            t.error(f"nameservers[{i}]", str(exc))
            continue
        if str(ns) in servers:
            t.error(f"nameservers[{i}]", f"{ns} is listed twice")
        servers.append(str(ns))
    if problems:
        return None, problems
    return Rfc2136Settings(
        provider=provider.lower(), server=server, port=port, zone=zone, tsig_key_name=key_name,
        tsig_algorithm=algorithm, tsig_secret_file=secret_file, ttl=ttl,
        propagation_timeout=propagation, poll_interval=poll, timeout=timeout,
        nameservers=tuple(servers)), []


def dns_settings(raw: object, *, where: str = WHERE, base: Path | None = None
                 ) -> Rfc2136Settings:
    """`dns_settings_problems`, raising a ConfigError with every problem."""
    settings, problems = dns_settings_problems(raw, where=where, base=base)
    if settings is None:
        raise ConfigError(problems)
    return settings


def read_tsig_secret(path: str | Path, *, where: str = f"{WHERE}.tsig_secret_file") -> bytes:
    """The TSIG secret in the file at `path`: its base64 text alone (whitespace ignored), or the
    one `secret` of a BIND (`tsig-keygen`) or Knot (`keymgr -t`) key file. Raises a ConfigError
    naming `where` and the file, never showing the file's content."""
    def fail(message: str) -> ConfigError:
        return ConfigError([ConfigProblem(where, f"{path}: {message}")])

    try:
        with open(path, "rb") as f:
            data = f.read(MAX_SECRET_FILE + 1)
    except OSError as exc:
        raise fail(f"cannot read the TSIG secret: {exc.strerror or exc}") from None
    if len(data) > MAX_SECRET_FILE:
        raise fail(f"larger than {MAX_SECRET_FILE} bytes: not a TSIG secret file")
    try:
        text = data.decode("ascii")
    except UnicodeDecodeError:
        raise fail("not text: expected the base64 TSIG secret") from None
    found = _SECRET_IN_KEYFILE.findall(text)
    if len(found) > 1:
        raise fail(f"holds {len(found)} secrets: keep the one key lbproxy uses")
    b64 = "".join((found[0] if found else text).split())
    if not b64:
        raise fail("is empty: expected the base64 TSIG secret")
    try:
        secret = base64.b64decode(b64, validate=True)
    except (binascii.Error, ValueError):
        raise fail("not valid base64: expected the TSIG secret as base64 (as tsig-keygen or "
                   "keymgr -t print it)") from None
    if not secret:
        raise fail("the TSIG secret is empty")
    return secret


__all__ = ["DEFAULT_PORT", "PROVIDERS", "TSIG_ALGORITHMS", "WHERE", "DnsServer",
           "Rfc2136Settings", "dns_name", "dns_server", "dns_settings", "dns_settings_problems",
           "read_tsig_secret"]
