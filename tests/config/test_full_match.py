"""Every identifier and name pattern is a full match: a trailing newline (which `$` accepts) is
refused in config names, header names, health-check paths and hosts, FQDNs, certificate ids of
the config, the store and Let's Encrypt requests, challenge tokens and CSR country codes. Each
case also passes without the newline, so the newline is what is refused."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import trustme

from acmeclient.crypto import CsrSubject
from acmeclient.errors import CryptoError
from acmeclient.http01 import StandaloneHttp01Responder
from lbproxy.certs import CertInputError, CertStore, InputProblem
from lbproxy.config import parse_config
from lbproxy.config.loader import is_fqdn
from lbproxy.config.model import Address, Config, SubVS, VirtualService
from lbproxy.errors import ConfigError
from lbproxy.letsencrypt.challenge import build_injection
from lbproxy.letsencrypt.codes import LeError
from lbproxy.runtime import Runtime
from tests.certs.helpers import issue

# Every value below is substituted (JSON-quoted, which TOML basic strings accept) into one valid
# config; `where` is the table path the loader's problem must name.
FIELDS: dict[str, tuple[str, str]] = {
    "vs_name": ("web", "vs[0].name"),
    "subvs_name": ("rest", "vs[0].subvs[0].name"),
    "rule_name": ("by-agent", "rule[0].name"),
    "rule_header": ("User-Agent", "rule[0].header"),
    "check_path": ("/healthz", "vs[0].subvs[0].health_check.path"),
    "check_host": ("shop.test", "vs[0].subvs[0].health_check.host"),
    "cert_id": ("shop", "certificate[0].id"),
    "common_name": ("shop.test", "certificate[0].common_name"),
    "san_name": ("www.shop.test", "certificate[0].sans[0].name"),
    "webhook_header": ("X-Team", "events.webhook_headers.X-Team"),
}

TEMPLATE = """
[[rule]]
name = {rule_name}
match = "prefix"
pattern = "curl"
on = "header"
header = {rule_header}

[[vs]]
name = {vs_name}
listen = "127.0.0.1:8080"
  [[vs.subvs]]
  name = {subvs_name}
  rules = [{rule_name}, "default"]
  health_check = {{ type = "http", path = {check_path}, host = {check_host} }}

[[certificate]]
id = {cert_id}
common_name = {common_name}
vs = {vs_name}
sans = [ {{ name = {san_name}, vs = {vs_name} }} ]

[events]
webhook_url = "https://hooks.test/x"
webhook_headers = {{ {webhook_header} = "ops" }}
"""


def config_text(**override: str) -> str:
    values = {k: v for k, (v, _) in FIELDS.items()} | override
    return TEMPLATE.format(**{k: json.dumps(v) for k, v in values.items()})


def test_the_base_config_is_valid() -> None:
    cfg = parse_config(config_text())
    assert cfg.virtual_services[0].name == "web" and cfg.certificates[0].id == "shop"


@pytest.mark.parametrize("field", sorted(FIELDS))
def test_a_trailing_newline_is_refused_in_the_config(field: str) -> None:
    value, where = FIELDS[field]
    with pytest.raises(ConfigError) as e:
        parse_config(config_text(**{field: value + "\n"}))
    places = [p.where for p in e.value.problems]
    # where the value is also a key (a header name), the path carries the newline too
    assert any(w.replace("\n", "") == where for w in places), places


@pytest.mark.parametrize("name", ["a.test", "xn--bcher-kva.example", "a-b.c"])
def test_is_fqdn_full_match(name: str) -> None:
    assert is_fqdn(name) and not is_fqdn(name + "\n") and not is_fqdn(name + "\n\n")


def test_the_store_refuses_a_trailing_newline_in_an_id(tmp_path: Path) -> None:
    store = CertStore(tmp_path)
    chain, key = issue(trustme.CA(), "a.test")
    with pytest.raises(CertInputError) as e:
        store.import_pem("trail\n", chain, key)
    assert e.value.reason is InputProblem.BAD_ID
    assert store.list() == () and sorted(p.name for p in store.root.iterdir()) == []
    store.import_pem("trail", chain, key)
    assert [i.id for i in store.list()] == ["trail"]


def test_a_challenge_token_with_a_trailing_newline_is_refused() -> None:
    cfg = Config(virtual_services=(VirtualService(
        "web", Address("127.0.0.1", 1), subvs=(SubVS("rest", rules=("default",)),)),))
    token = "t" * 43
    build_injection(Runtime(1, cfg), "web", "a.test", token, f"{token}.thumb")
    with pytest.raises(LeError) as e:
        build_injection(Runtime(1, cfg), "web", "a.test", token + "\n", f"{token}.thumb")
    assert e.value.code == 20 and "base64url" in e.value.text


async def test_acmeclient_refuses_a_trailing_newline_in_a_token_and_a_country() -> None:
    responder = StandaloneHttp01Responder("127.0.0.1", 0)  # never started: present() only stores
    await responder.present("a.test", "tok", "tok.thumb")
    with pytest.raises(ValueError, match="base64url"):
        await responder.present("a.test", "tok\n", "tok.thumb")
    CsrSubject(country="US")
    with pytest.raises(CryptoError, match="country"):
        CsrSubject(country="US\n")
