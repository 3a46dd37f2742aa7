"""The `[letsencrypt.dns]` table (RFC 2136 dns-01 provider): a good table parses to its settings,
every bad key is reported by name with what is wrong, and the TSIG secret file is read or refused
naming the file."""

from __future__ import annotations

import base64
import re
import tomllib
from pathlib import Path

import pytest

from lbproxy.config.dnsconfig import (
    DnsServer,
    Rfc2136Settings,
    dns_name,
    dns_server,
    dns_settings,
    dns_settings_problems,
    read_tsig_secret,
)
from lbproxy.errors import ConfigError

GOOD = """
[letsencrypt.dns]
server = "192.0.2.53"
tsig_key_name = "Acme-Update"
tsig_secret_file = "keys/acme.key"
"""


def table(text: str) -> object:
    return tomllib.loads(text)["letsencrypt"]["dns"]


def test_minimal_table_and_defaults(tmp_path: Path) -> None:
    s = dns_settings(table(GOOD), base=tmp_path)
    assert s == Rfc2136Settings(server="192.0.2.53", tsig_key_name="acme-update.",
                                tsig_secret_file=str(tmp_path / "keys/acme.key"))
    assert (s.tsig_algorithm, s.zone, s.ttl, s.propagation_timeout) == ("hmac-sha256", "", 60,
                                                                        120.0)
    assert s.checked_servers == (DnsServer("192.0.2.53", 53),)


def test_every_key() -> None:
    s = dns_settings(table("""
[letsencrypt.dns]
provider = "rfc2136"
server = "2001:db8::53"
port = 5353
zone = "Example.TEST."
tsig_key_name = "acme."
tsig_algorithm = "HMAC-SHA512"
tsig_secret_file = "/etc/lbproxy/acme.key"
ttl = 30
propagation_timeout = 300
poll_interval = 0.5
timeout = 3
nameservers = ["192.0.2.1", "192.0.2.2:5300", "[2001:db8::2]:53", "2001:db8::3"]
"""))
    assert s.update_server == DnsServer("2001:db8::53", 5353)
    assert str(s.update_server) == "[2001:db8::53]:5353"
    assert (s.zone, s.tsig_key_name, s.tsig_algorithm) == ("example.test.", "acme.",
                                                           "hmac-sha512")
    assert (s.ttl, s.propagation_timeout, s.poll_interval, s.timeout) == (30, 300.0, 0.5, 3.0)
    assert s.checked_servers == (DnsServer("192.0.2.1"), DnsServer("192.0.2.2", 5300),
                                 DnsServer("2001:db8::2"), DnsServer("2001:db8::3"))
    assert s.nameservers == ("192.0.2.1:53", "192.0.2.2:5300", "[2001:db8::2]:53",
                             "[2001:db8::3]:53")


BAD = [
    # (extra or replaced TOML, where, words of the message)
    ('server = "ns1.example.test"', "server", "not an IP address"),
    ('server = 53', "server", "expected a string"),
    ('server = "192.0.2.53:5353"', "server", "the port, if not 53, goes in port"),
    ('port = 70000', "port", "between 1 and 65535"),
    ('port = 0', "port", "between 1 and 65535"),
    ('port = "53"', "port", "expected an integer"),
    ('nameservers = ["[2001:db8::1"]', "nameservers[0]", "[IPv6]:port"),
    ('nameservers = ["192.0.2.1:0"]', "nameservers[0]", "between 1 and 65535"),
    ('zone = "exa mple.test"', "zone", "not a DNS name"),
    ('zone = "-x.test"', "zone", "not a DNS name"),
    (f'zone = "{"a" * 64}.test"', "zone", "1-63"),
    ('tsig_key_name = ""', "tsig_key_name", "empty"),
    ('tsig_algorithm = "hmac-md5"', "tsig_algorithm", "deprecated"),
    ('tsig_algorithm = "hmac-sha265"', "tsig_algorithm", "did you mean 'hmac-sha256'"),
    ('tsig_secret_file = ""', "tsig_secret_file", "is required"),
    ('tsig_secret_file = 1', "tsig_secret_file", "expected a string"),
    ('ttl = 0', "ttl", "between 1 and 86400"),
    ('ttl = "60s"', "ttl", "expected an integer"),
    ('ttl = true', "ttl", "got a boolean"),
    ('propagation_timeout = 0', "propagation_timeout", "between 1 and 3600"),
    ('propagation_timeout = "2m"', "propagation_timeout", "expected a number"),
    ('poll_interval = 30\npropagation_timeout = 10', "poll_interval", "longer than"),
    ('timeout = 0', "timeout", "between 0.1 and 120"),
    ('nameservers = "192.0.2.1"', "nameservers", "expected a list"),
    ('nameservers = ["192.0.2.1", 7]', "nameservers[1]", "expected a string"),
    ('nameservers = ["ns2.example.test"]', "nameservers[0]", "not an IP address"),
    ('nameservers = ["192.0.2.1", "192.0.2.1:53"]', "nameservers[1]", "listed twice"),
    ('provider = "route53"', "provider", "unknown DNS provider"),
    ('tsig_secret = "c2VjcmV0"', "tsig_secret", "name the file in tsig_secret_file"),
    ('sever = "192.0.2.1"', "sever", "did you mean 'server'"),
]


@pytest.mark.parametrize(("line", "key", "words"), BAD)
def test_a_bad_key_is_named_with_its_problem(line: str, key: str, words: str) -> None:
    text = GOOD
    for assignment in line.split("\n"):
        name = assignment.split(" = ")[0]
        lines = [x for x in text.splitlines() if not x.startswith(f"{name} = ")]
        text = "\n".join([*lines, assignment]) + "\n"
    settings, problems = dns_settings_problems(table(text))
    assert settings is None
    assert [p.where for p in problems] == [f"letsencrypt.dns.{key}"], problems
    assert words in problems[0].message
    with pytest.raises(ConfigError, match=re.escape(f"letsencrypt.dns.{key}: ")):
        dns_settings(table(text))


def test_required_keys_and_every_problem_at_once() -> None:
    _, problems = dns_settings_problems({"ttl": -1})
    assert {p.where for p in problems} == {
        "letsencrypt.dns.server", "letsencrypt.dns.tsig_key_name",
        "letsencrypt.dns.tsig_secret_file", "letsencrypt.dns.ttl"}
    _, problems = dns_settings_problems("rfc2136", where="x.dns")
    assert [(p.where, p.message) for p in problems] == [("x.dns", "expected a table, got str")]


def test_names_and_addresses() -> None:
    assert dns_name("Example.Test") == "example.test."
    assert dns_name("_acme-challenge.a-b.test.") == "_acme-challenge.a-b.test."
    for bad in ("", ".", "a..b", "a-.b", "x" * 254, "é.test"):
        with pytest.raises(ValueError):
            dns_name(bad)
    assert dns_server("::1") == DnsServer("::1", 53)
    assert dns_server("[::1]:5353") == DnsServer("::1", 5353)
    assert dns_server("127.0.0.1:5353", 99) == DnsServer("127.0.0.1", 5353)
    assert dns_server("127.0.0.1", 99) == DnsServer("127.0.0.1", 99)
    for bad in ("localhost", "127.0.0.1:x", "[::1]x", "1.2.3.4:99999"):
        with pytest.raises(ValueError):
            dns_server(bad)


def test_read_tsig_secret(tmp_path: Path) -> None:
    raw = bytes(range(32))
    b64 = base64.b64encode(raw).decode()
    forms = {
        "plain": f"{b64}\n",
        "wrapped": f"  {b64[:20]}\n{b64[20:]}  \n",
        "bind": f'key "acme" {{\n\talgorithm hmac-sha256;\n\tsecret "{b64}";\n}};\n',
        "knot": f"# hmac-sha256:acme:{b64}\nkey:\n  - id: acme\n    algorithm: hmac-sha256\n"
                f"    secret: {b64}\n",
        "knot-no-newline": f"key:\n  - id: acme\n    secret: {b64}",
    }
    for name, text in forms.items():
        (tmp_path / name).write_text(text)
        assert read_tsig_secret(tmp_path / name) == raw, name
    bad = {
        "missing": None,
        "empty": "",
        "spaces": " \n\t",
        "not-base64": "c2VjcmV0!!\n",
        "padding": "c2VjcmV0=x\n",
        "binary": b"\xff\xfe\x00",
        "two": f'secret "{b64}";\nsecret "{b64}";\n',
        "huge": "A" * 70000,
    }
    for name, content in bad.items():
        path = tmp_path / f"bad-{name}"
        if isinstance(content, bytes):
            path.write_bytes(content)
        elif content is not None:
            path.write_text(content)
        with pytest.raises(ConfigError) as err:
            read_tsig_secret(path)
        (problem,) = err.value.problems
        assert problem.where == "letsencrypt.dns.tsig_secret_file", name
        assert problem.message.startswith(f"{path}: "), name
        if isinstance(content, str) and content.strip() and name != "two":
            assert content.strip()[:8] not in problem.message  # the content is never shown
