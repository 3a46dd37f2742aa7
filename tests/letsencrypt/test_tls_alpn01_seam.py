"""The Solver seam on the fake CA: the challenge type kept in the template (and its JSON, old
entries reading as http-01), tls-alpn-01 validations injected into the runtime and taken away
(code 103 when they cannot be), and the dns-01 plug point (`Solvers.dns01`): a provider is given
each answer and its cleanup, a wildcard is accepted with it, its preflight failure places no
order, a failure without a code is 103."""

from __future__ import annotations

import datetime as dt
from collections.abc import AsyncIterator, Sequence
from pathlib import Path

import pytest

from lbproxy.config.model import Address, Config, Protocol, SubVS, TLSSettings, VirtualService
from lbproxy.letsencrypt import Template
from lbproxy.letsencrypt.codes import AcmeCode, LeError
from lbproxy.runtime import Runtime
from tests.letsencrypt.le_fakes import ManagerEnv as Env

T0 = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)
CONFIG = Config(virtual_services=(
    VirtualService("web", Address("127.0.0.1", 1), subvs=(SubVS("rest", rules=("default",)),)),
    VirtualService("secure", Address("127.0.0.1", 2), protocol=Protocol.HTTPS,
                   tls=TLSSettings(), subvs=(SubVS("rest", rules=("default",)),))))


@pytest.fixture
async def env(tmp_path: Path) -> AsyncIterator[Env]:
    e = await Env.start(tmp_path / "state", CONFIG, T0)
    yield e
    await e.manager.stop()


def test_the_template_keeps_its_challenge_type() -> None:
    t = Template("a.test", "secure", challenge="tls-alpn-01")
    assert t.to_json()["challenge"] == "tls-alpn-01"
    assert Template.from_json(t.to_json()) == t
    old = Template("a.test", "web").to_json()
    del old["challenge"]   # an entry stored before the field
    assert Template.from_json(old).challenge == "http-01"
    assert Template("a.test", "web", challenge="TLS-ALPN-01").normalized().challenge == \
        "tls-alpn-01"


async def test_tls_alpn01_is_served_through_the_runtime_and_taken_away(env: Env) -> None:
    seen: list[Runtime] = []

    async def record(rt: Runtime) -> None:
        seen.append(rt)
    env.runtime.subscribe(record)
    view = await env.manager.request("c", Template("a.test", "secure", (("b.test", "secure"),),
                                                   challenge="tls-alpn-01"))
    assert view["challenge"] == "tls-alpn-01" and view["status"] == "valid"
    served = [v for rt in seen for v in rt.validations]
    assert {(v.vs, v.host) for v in served} == {("secure", "a.test"), ("secure", "b.test")}
    assert all(b"BEGIN CERTIFICATE" in v.cert_pem and b"PRIVATE KEY" in v.key_pem
               for v in served)
    assert "PRIVATE" not in repr(served[0])   # never shown
    assert env.runtime.current.validations == () and env.runtime.current.injections == ()
    assert not any(rt.injections for rt in seen)   # no http-01 SubVS
    # the renewal (a restart in between: the entry on disk) proves it the same way
    await env.restart()
    seen.clear()
    await env.manager.renew("c")
    assert {v.host for rt in seen for v in rt.validations} == {"a.test", "b.test"}
    assert env.manager.entries["c"].template.challenge == "tls-alpn-01"


async def test_a_validation_that_cannot_be_served_is_103(env: Env) -> None:
    env.manager.fault_codes = {AcmeCode.CHALLENGE_PUBLISH}
    with pytest.raises(LeError) as info:
        await env.manager.request("c", Template("a.test", "secure", challenge="tls-alpn-01"))
    assert info.value.code == 103 and "tls-alpn-01 certificate of a.test" in str(info.value)
    assert env.runtime.current.validations == ()
    assert "(code: 103)" in env.messages()


class FakeDns:
    """A dns-01 provider recording what it is told."""

    challenge_type = "dns-01"

    def __init__(self, *, fail: Exception | None = None,
                 preflight_error: Exception | None = None) -> None:
        self.fail = fail
        self.preflight_error = preflight_error
        self.log: list[tuple[str, str, str]] = []

    async def preflight(self, names: Sequence[str]) -> None:
        self.log.append(("preflight", ",".join(names), ""))
        if self.preflight_error is not None:
            raise self.preflight_error

    async def present(self, domain: str, token: str, key_authorization: str) -> None:
        self.log.append(("present", domain, token))
        if self.fail is not None:
            raise self.fail

    async def cleanup(self, domain: str, token: str) -> None:
        self.log.append(("cleanup", domain, token))


async def test_dns01_plugs_in_and_takes_a_wildcard(env: Env) -> None:
    dns = FakeDns()
    made: list[str] = []

    def factory(cert_id: str, t: Template) -> FakeDns:
        made.append(cert_id)
        return dns
    env.manager.solvers.dns01 = factory
    view = await env.manager.request("w", Template("*.a.test", "web", (("a.test", "web"),),
                                                   challenge="dns-01"))
    assert view["status"] == "valid" and view["challenge"] == "dns-01"
    assert made == ["w"]
    kinds = [k for k, _, _ in dns.log]
    assert kinds[0] == "preflight" and dns.log[0][1] == "*.a.test,a.test"
    assert kinds.count("present") == 2 and kinds.count("cleanup") == 2
    assert env.runtime.current.injections == () and env.runtime.current.validations == ()


async def test_dns01_preflight_failure_places_no_order(env: Env) -> None:
    env.manager.solvers.dns01 = lambda cid, t: FakeDns(
        preflight_error=LeError(105, "the DNS server refused the TSIG key"))
    with pytest.raises(LeError) as info:
        await env.manager.request("w", Template("*.a.test", "web", challenge="dns-01"))
    assert info.value.code == 105
    assert env.ca.orders == [] and env.manager.orders_placed == 0


async def test_dns01_failure_without_a_code_is_103_and_cleaned(env: Env) -> None:
    dns = FakeDns(fail=OSError("connection refused"))
    env.manager.solvers.dns01 = lambda cid, t: dns
    with pytest.raises(LeError) as info:
        await env.manager.request("w", Template("*.a.test", "web", challenge="dns-01"))
    assert info.value.code == 103 and "connection refused" in str(info.value)
    # the half-presented answer is removed
    assert [k for k, _, _ in dns.log] == ["preflight", "present", "cleanup"]


async def test_dns01_without_a_provider_is_104_before_any_order(env: Env) -> None:
    with pytest.raises(LeError) as info:
        await env.manager.request("w", Template("*.a.test", "web", challenge="dns-01"))
    assert info.value.code == 104 and info.value.status == 400
    assert env.ca.orders == [] and "w" not in env.manager.entries



class CheckingDns:
    """A provider whose early check is named `check` (dns01.Rfc2136Responder's name)."""

    challenge_type = "dns-01"

    def __init__(self) -> None:
        self.log: list[tuple[str, str]] = []

    async def check(self, domains: Sequence[str] = ()) -> None:
        self.log.append(("check", ",".join(domains)))
        raise LeError(105, "BADKEY")

    async def present(self, domain: str, token: str, key_authorization: str) -> None:
        self.log.append(("present", domain))

    async def cleanup(self, domain: str, token: str) -> None:
        self.log.append(("cleanup", domain))


async def test_dns01_check_is_the_preflight_too_and_a_broken_factory_is_104(env: Env) -> None:
    dns = CheckingDns()
    env.manager.solvers.dns01 = lambda cid, t: dns
    with pytest.raises(LeError) as info:
        await env.manager.request("w", Template("*.a.test", "web", challenge="dns-01"))
    assert info.value.code == 105 and dns.log == [("check", "*.a.test")]

    def broken(cid: str, t: Template) -> CheckingDns:
        raise OSError("cannot read /etc/lbproxy/tsig.key")
    env.manager.solvers.dns01 = broken
    with pytest.raises(LeError) as info:
        await env.manager.request("w", Template("*.a.test", "web", challenge="dns-01"))
    assert info.value.code == 104 and "tsig.key" in str(info.value)
    assert env.ca.orders == []
