"""`[[certificate]]` challenge = "http-01" | "tls-alpn-01" | "dns-01" and `[letsencrypt.dns]` in the
loader: the type is carried into the template the manager builds, a wildcard name is accepted with
dns-01 only, dns-01 needs the DNS section, tls-alpn-01 HTTPS VSs, and `lbproxy check` names every
refusal with its file:line (the run-time side: tests/letsencrypt/test_dns01_e2e.py)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from lbproxy.config import parse_config
from lbproxy.config.model import Rfc2136Settings
from lbproxy.errors import ConfigError
from lbproxy.letsencrypt import Template

HEAD = """
[[vs]]
name = "web"
listen = "127.0.0.1:8080"
  [[vs.subvs]]
  name = "rest"
  rules = ["default"]

[[vs]]
name = "secure"
listen = "127.0.0.1:8443"
protocol = "https"
tls = { certificates = ["boot"] }
  [[vs.subvs]]
  name = "rest"
  rules = ["default"]
"""
DNS = """
[letsencrypt.dns]
server = "192.0.2.53"
tsig_key_name = "acme-update"
tsig_secret_file = "keys/acme.key"
"""


def cert(challenge: str | None, cn: str = "*.example.test", vs: str = "web",
         sans: tuple[tuple[str, str], ...] = ()) -> str:
    line = "" if challenge is None else f'challenge = "{challenge}"\n'
    text = f'\n[[certificate]]\nid = "c"\ncommon_name = "{cn}"\nvs = "{vs}"\n{line}'
    for name, svs in sans:
        text += f'  [[certificate.sans]]\n  name = "{name}"\n  vs = "{svs}"\n'
    return text


def problems(text: str) -> list[tuple[str, str]]:
    with pytest.raises(ConfigError) as info:
        parse_config(text)
    return [(p.where, p.message) for p in info.value.problems]


def test_dns01_wildcard_is_accepted_and_carried_into_the_template(tmp_path: Path) -> None:
    cfg = parse_config(HEAD + DNS + cert("dns-01", sans=(("example.test", "web"),)),
                       base=tmp_path)
    (req,) = cfg.certificates
    assert (req.common_name, req.challenge) == ("*.example.test", "dns-01")
    t = Template.from_request(req)
    assert t.challenge == "dns-01" and t.names == ["*.example.test", "example.test"]
    dns = cfg.letsencrypt.dns
    assert isinstance(dns, Rfc2136Settings)
    assert (dns.server, dns.tsig_key_name) == ("192.0.2.53", "acme-update.")
    assert dns.tsig_secret_file == str(tmp_path / "keys/acme.key")  # relative to the file


def test_dns01_names_no_vs_where_the_others_must(tmp_path: Path) -> None:
    """dns-01 writes TXT records, so its [[certificate]] and SANs may leave out `vs`; http-01
    (and tls-alpn-01) still name the VS that answers, each missing one reported where it is."""
    text = ('\n[[certificate]]\nid = "c"\ncommon_name = "*.example.test"\nchallenge = "dns-01"\n'
            '  [[certificate.sans]]\n  name = "example.test"\n')
    (req,) = parse_config(HEAD + DNS + text, base=tmp_path).certificates
    assert (req.vs, req.sans) == ("", (("example.test", ""),))
    t = Template.from_request(req)
    assert t.names == ["*.example.test", "example.test"] and t.challenge == "dns-01"
    bad = problems(HEAD + text.replace('"dns-01"', '"http-01"').replace("*.example.test",
                                                                         "www.example.test"))
    assert [w for w, _ in bad] == ["certificate[0].vs", "certificate[0].sans[0].vs"], bad
    # An empty VS is no VS: said so, not a certificate silently left out.
    empty = problems(HEAD + cert(None, cn="www.example.test", vs="",
                                 sans=(("api.example.test", ""),)))
    assert [(w, m.startswith("is empty; http-01 needs")) for w, m in empty] == [
        ("certificate[0].vs", True), ("certificate[0].sans[0].vs", True)], empty


def test_the_default_is_http01_and_no_dns_section_is_none() -> None:
    cfg = parse_config(HEAD + cert(None, cn="www.example.test"))
    assert cfg.certificates[0].challenge == "http-01"
    assert Template.from_request(cfg.certificates[0]).challenge == "http-01"
    assert cfg.letsencrypt.dns is None
    tls = parse_config(HEAD + cert("TLS-ALPN-01", cn="www.example.test", vs="secure"))
    assert tls.certificates[0].challenge == "tls-alpn-01"


@pytest.mark.parametrize("challenge", [None, "http-01", "tls-alpn-01"])
def test_a_wildcard_without_dns01_is_refused(challenge: str | None) -> None:
    vs = "secure" if challenge == "tls-alpn-01" else "web"
    got = problems(HEAD + DNS + cert(challenge, vs=vs))
    assert got == [("certificate[0].common_name",
                    "the wildcard name '*.example.test' can only be proved by dns-01: set "
                    f'challenge = "dns-01" (and a [letsencrypt.dns] section), not '
                    f"'{challenge or 'http-01'}'")]
    # a wildcard SAN too
    got = problems(HEAD + cert(None, cn="example.test", sans=(("*.example.test", "web"),)))
    assert [w for w, _ in got] == ["certificate[0].sans[0].name"]


def test_a_bad_wildcard_is_still_not_a_name() -> None:
    got = problems(HEAD + DNS + cert("dns-01", cn="*.*.example.test"))
    assert got == [("certificate[0].common_name",
                    "'*.*.example.test' is not a fully qualified domain name")]


def test_an_unknown_challenge_names_the_allowed_values_alone() -> None:
    got = problems(HEAD + DNS + cert("dns01"))
    # one problem: not a second one about the wildcard under an unknown type
    assert got == [("certificate[0].challenge",
                    "unknown challenge type 'dns01'; expected one of 'http-01', 'dns-01', "
                    "'tls-alpn-01'; did you mean 'dns-01'?")]
    got = problems(HEAD + cert("", cn="www.example.test"))
    assert [w for w, _ in got] == ["certificate[0].challenge"]


def test_dns01_without_the_dns_section_is_refused_at_load() -> None:
    got = problems(HEAD + cert("dns-01"))
    assert got == [("certificate[0].challenge",
                    '"dns-01" needs a [letsencrypt.dns] section (the DNS server lbproxy updates '
                    "with a TSIG key: docs/config.md); there is none")]
    # a section with problems: its own problems, not this one as well
    got = problems(HEAD + DNS.replace('"192.0.2.53"', '"ns1.example.test"') + cert("dns-01"))
    assert [w for w, _ in got] == ["letsencrypt.dns.server"]


def test_tls_alpn01_needs_https_vss() -> None:
    got = problems(HEAD + cert("tls-alpn-01", cn="www.example.test", vs="secure",
                               sans=(("api.example.test", "web"),)))
    assert got == [("certificate[0].challenge",
                    '"tls-alpn-01" is answered by an HTTPS VS on port 443, and '
                    "'api.example.test' names VS 'web', an HTTP VS")]


def test_dns_section_problems_carry_their_place() -> None:
    got = problems(HEAD + DNS + "port = 0\nsecret = \"abc\"\n")
    assert sorted(got) == [
        ("letsencrypt.dns.port", "must be between 1 and 65535, got 0"),
        ("letsencrypt.dns.secret", "unknown key: the secret is not written in the config; put "
                                   "it in a file and name the file in tsig_secret_file")]


def run_check(path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "lbproxy", "check", "-c", str(path)],
                          capture_output=True, text=True, timeout=60, check=False)


def test_lbproxy_check_accepts_a_dns01_wildcard_and_refuses_a_bad_type(tmp_path: Path) -> None:
    keys = tmp_path / "keys"
    keys.mkdir()
    (keys / "acme.key").write_text("c2VjcmV0LXNlY3JldC1zZWNyZXQ=\n")
    path = tmp_path / "lbproxy.toml"
    path.write_text(HEAD + DNS + cert("dns-01", sans=(("example.test", "web"),)))
    ok = run_check(path)
    assert ok.returncode == 0, ok.stderr
    assert "OK (2 virtual services" in ok.stdout and ok.stderr == ""

    text = HEAD + DNS + cert("dns-1")
    path.write_text(text)
    bad = run_check(path)
    line = text.splitlines().index('challenge = "dns-1"') + 1
    assert bad.returncode == 1
    assert (f'{path}:{line}: certificate "c" (certificate[0]).challenge: unknown challenge type '
            "'dns-1'; expected one of 'http-01', 'dns-01', 'tls-alpn-01'") in bad.stderr

    text = HEAD + cert("dns-01")
    path.write_text(text)
    bad = run_check(path)
    line = text.splitlines().index('challenge = "dns-01"') + 1
    assert bad.returncode == 1
    assert f'{path}:{line}: certificate "c" (certificate[0]).challenge: "dns-01" needs a ' \
           "[letsencrypt.dns] section" in bad.stderr


def test_check_warns_when_the_secret_file_cannot_be_read(tmp_path: Path) -> None:
    path = tmp_path / "lbproxy.toml"
    text = HEAD + DNS
    path.write_text(text)
    out = run_check(path)
    assert out.returncode == 0   # a warning: lbproxy's user may read what check's cannot
    line = text.splitlines().index('tsig_secret_file = "keys/acme.key"') + 1
    assert (f"warning: {path}:{line}: letsencrypt.dns.tsig_secret_file: "
            f"{tmp_path / 'keys/acme.key'}: cannot read the TSIG secret") in out.stderr
    assert "code 104" in out.stderr
