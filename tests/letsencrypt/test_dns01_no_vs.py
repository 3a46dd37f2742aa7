"""dns-01 needs no Virtual Service (on the fake CA, with a fake DNS provider): a certificate whose
names name no VS is checked, ordered and stored with `"vs": ""`, and keeps it through a restart,
a scheduled renewal, a manual one and a backup restored on a fresh state directory; a
`[[certificate]]` declaration without a VS is ordered too. http-01 and tls-alpn-01 still refuse a
name without its VS with code 16, before anything is stored or ordered."""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from lbproxy.config.model import CertificateRequest, Config
from lbproxy.letsencrypt import Template
from lbproxy.letsencrypt.codes import AcmeCode, LeError
from lbproxy.letsencrypt.solvers import needs_vs
from tests.letsencrypt.le_fakes import ManagerEnv as Env
from tests.letsencrypt.test_tls_alpn01_seam import CONFIG, T0

PASSPHRASE = "correct horse"
NO_VS = Template("*.a.test", sans=(("a.test", ""),), challenge="dns-01")


class RecordingDns:
    """A dns-01 provider recording the names it is asked to publish."""

    challenge_type = "dns-01"

    def __init__(self) -> None:
        self.presented: list[str] = []

    async def present(self, domain: str, token: str, key_authorization: str) -> None:
        self.presented.append(domain)

    async def cleanup(self, domain: str, token: str) -> None:
        pass


def plug_dns(env: Env) -> RecordingDns:
    dns = RecordingDns()
    env.manager.solvers.dns01 = lambda cert_id, t: dns
    return dns


@pytest.fixture
async def env(tmp_path: Path) -> AsyncIterator[Env]:
    e = await Env.start(tmp_path / "state", CONFIG, T0)
    yield e
    await e.manager.stop()


def stored_template(env: Env, cert_id: str) -> dict[str, object]:
    entry = json.loads((env.state / "letsencrypt" / "certs" / f"{cert_id}.json").read_text())
    template: dict[str, object] = entry["template"]
    return template


def test_only_dns01_goes_without_a_vs() -> None:
    assert not needs_vs("dns-01")
    assert needs_vs("http-01") and needs_vs("tls-alpn-01")
    assert Template("a.test").vs == ""   # none named
    assert Template.from_json(NO_VS.to_json()) == NO_VS
    assert NO_VS.to_json()["vs"] == "" and NO_VS.to_json()["sans"] == [{"name": "a.test",
                                                                          "vs": ""}]


async def test_a_dns01_certificate_without_a_vs_is_issued_and_kept_so(env: Env) -> None:
    dns = plug_dns(env)
    view = await env.manager.request("w", NO_VS)
    assert view["status"] == "valid" and view["challenge"] == "dns-01"
    assert view["http_challenge_vs"] == ["*.a.test: (dns-01: none)", "a.test: (dns-01: none)"]
    assert view["sans"] == [{"name": "a.test", "vs": ""}]
    assert dns.presented == ["*.a.test", "a.test"]
    assert env.runtime.current.injections == () and env.runtime.current.validations == ()
    t = stored_template(env, "w")
    assert (t["vs"], t["sans"], t["challenge"]) == ("", [{"name": "a.test", "vs": ""}], "dns-01")
    first = env.store.require("w").serial

    # a restart reads it back as it was, and the scheduled renewal orders it again
    await env.restart()
    dns = plug_dns(env)
    assert env.manager.entries["w"].template == NO_VS
    await env.step(dt.timedelta(days=61))   # 90-day certificate, 30-day period
    assert len(env.ca.orders) == 2 and env.store.require("w").serial != first
    assert env.manager.view("w")["last_code"] is None
    # and a manual renewal
    await env.manager.renew("w")
    assert len(env.ca.orders) == 3 and len(dns.presented) == 4
    assert stored_template(env, "w")["vs"] == ""


async def test_a_backup_restores_a_dns01_certificate_without_a_vs(env: Env,
                                                                  tmp_path: Path) -> None:
    plug_dns(env)
    await env.manager.request("w", NO_VS)
    blob = await env.manager.backup(PASSPHRASE, include_certs=True)
    other = await Env.start(tmp_path / "other", CONFIG, T0)
    try:
        restored = await other.manager.restore(blob, PASSPHRASE, restore_certs=True)
        assert restored["certificates"] == ["w"] and restored["not_restored"] == []
        assert other.manager.entries["w"].template == NO_VS
        assert stored_template(other, "w")["vs"] == ""
        # the restored template passes the checks of its next order
        plug_dns(other)
        await other.manager.renew("w")
        assert len(other.ca.orders) == 1
        assert other.store.require("w").serial != env.store.require("w").serial
    finally:
        await other.manager.stop()


async def test_a_vs_named_with_dns01_is_kept_and_a_san_may_go_without(env: Env) -> None:
    plug_dns(env)
    t = Template("a.test", "web", (("b.test", ""),), challenge="dns-01")
    view = await env.manager.request("m", t)
    assert view["status"] == "valid"
    assert env.manager.entries["m"].template.routes == (("a.test", "web"), ("b.test", ""))


async def test_a_declared_dns01_certificate_without_a_vs_is_ordered(env: Env) -> None:
    dns = plug_dns(env)
    declared = CertificateRequest(id="decl", common_name="*.d.test", vs="",
                                  challenge="dns-01")
    await env.manager.sync_config(Config(virtual_services=CONFIG.virtual_services,
                                         certificates=(declared,)))
    await env.manager.run_due()
    await env.manager.wait_idle()
    assert env.store.require("decl").names == ("*.d.test",)
    assert env.manager.entries["decl"].template.vs == "" and dns.presented == ["*.d.test"]


@pytest.mark.parametrize("template", [
    Template("a.test", challenge="http-01"),
    Template("a.test", challenge="tls-alpn-01"),
    Template("a.test", "web", (("b.test", ""),)),
    Template("a.test", "secure", (("b.test", ""),), challenge="tls-alpn-01"),
], ids=["http-01", "tls-alpn-01", "http-01 SAN", "tls-alpn-01 SAN"])
async def test_http01_and_tls_alpn01_still_need_a_vs_for_every_name(
        env: Env, template: Template) -> None:
    plug_dns(env)
    with pytest.raises(LeError) as info:
        await env.manager.request("c", template)
    assert info.value.code == AcmeCode.NAMES_VS_MISMATCH and info.value.status == 400
    assert "certificate c: names and VSs do not match" in str(info.value)
    assert "c" not in env.manager.entries and env.ca.orders == []
    assert "(code: 16)" in env.messages()
