"""GET /api/le/certs/{id} "validating" (an LEManager on a fake CA behind the real admin API):
while an order's challenges are answered it names each one's type, name and where the answer is
(http-01 the injected SubVS, tls-alpn-01 the validation certificate on the name's VS, dns-01 the
TXT record, published on a real Knot DNS server); [] before the order and once it ended."""

from __future__ import annotations

import datetime as dt
from collections.abc import AsyncIterator, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from acmeclient import CsrSubject
from acmeclient.crypto import PrivateKey
from lbproxy.admin.le_api import le_routes
from lbproxy.config import parse_config
from lbproxy.letsencrypt.dns01 import Rfc2136Factory
from tests.admin.conftest import CONFIG, Admin, running_admin
from tests.letsencrypt.le_fakes import FakeClient, ManagerEnv
from tests.support.knot import KnotInstance, knot_available, start_knot

T0 = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)


class PeekingClient(FakeClient):
    """The fake CA, which also asks the API for the certificate once every name's answer is
    in place (before the first cleanup), as the page polls it."""

    def __init__(self, rig: Rig, account_url: str | None) -> None:
        super().__init__(rig.le.ca, account_url)
        self.rig = rig

    async def obtain_certificate(self, names: Sequence[str], cert_key: PrivateKey,
                                 responder: Any, *, subject: CsrSubject | None = None,
                                 replaces: str | None = None) -> str:
        rig = self.rig

        class Peek:
            challenge_type = responder.challenge_type
            present = responder.present

            async def cleanup(self, domain: str, token: str) -> None:
                if len(rig.during) < len(rig.le.ca.orders):
                    rig.during.append(await rig.validating(rig.cert_id))
                await responder.cleanup(domain, token)

        return await super().obtain_certificate(names, cert_key, Peek(), subject=subject,
                                                replaces=replaces)


@dataclass
class Rig:
    admin: Admin
    le: ManagerEnv
    cert_id: str = ""
    during: list[list[dict[str, str]]] = field(default_factory=list)

    async def validating(self, cert_id: str) -> list[dict[str, str]]:
        st, view = await self.admin.call("GET", f"/api/le/certs/{cert_id}")
        assert st == 200, view
        return list(view["validating"])

    async def request(self, cert_id: str, body: dict[str, Any]) -> dict[str, Any]:
        self.cert_id = cert_id
        st, view = await self.admin.call("POST", "/api/le/certs", {"id": cert_id, **body})
        assert st == 201, view
        return dict(view)


@pytest.fixture
async def rig(tmp_path: Path) -> AsyncIterator[Rig]:
    le = await ManagerEnv.start(tmp_path / "le", parse_config(CONFIG, base=tmp_path), T0)
    try:
        async with running_admin(tmp_path, extra_routes=[le_routes(le.manager)]) as admin:
            r = Rig(admin, le)
            le.manager.client_factory = lambda url, key, acct, bundle: PeekingClient(r, acct)
            yield r
    finally:
        await le.manager.stop()


@pytest.fixture
def knot(tmp_path: Path) -> Iterator[KnotInstance]:
    if not knot_available():
        pytest.skip("knotd is not installed")
    with start_knot(tmp_path / "knot") as k:
        yield k


async def test_http01_names_each_injected_subvs(rig: Rig) -> None:
    view = await rig.request("site", {"common_name": "a.test", "vs": "shop",
                                      "sans": [{"name": "b.test", "vs": "shop"}]})
    assert view["validating"] == [] and view["status"] == "valid"
    assert rig.during == [[
        {"challenge": "http-01", "name": "a.test", "where": "SubVS acme-tok0xxxxxxxx on VS shop"},
        {"challenge": "http-01", "name": "b.test", "where": "SubVS acme-tok1xxxxxxxx on VS shop"},
    ]]
    assert await rig.validating("site") == []
    # another certificate's challenge SubVS on the same VS is not this one's
    await rig.request("other", {"common_name": "c.test", "vs": "shop"})
    assert rig.during[-1] == [{"challenge": "http-01", "name": "c.test",
                               "where": "SubVS acme-tok0xxxxxxxx on VS shop"}]
    assert await rig.validating("site") == []


async def test_tls_alpn01_names_the_vs_serving_the_validation_certificate(rig: Rig) -> None:
    view = await rig.request("alpn", {"common_name": "a.test", "vs": "shop",
                                      "challenge": "tls-alpn-01"})
    assert view["validating"] == [] and view["status"] == "valid"
    assert rig.during == [[{"challenge": "tls-alpn-01", "name": "a.test",
                            "where": "tls-alpn-01 certificate on VS shop"}]]
    assert rig.le.runtime.current.validations == ()


async def test_dns01_names_the_txt_record_once_for_a_wildcard_and_its_base(
        rig: Rig, knot: KnotInstance) -> None:
    factory = Rfc2136Factory(knot.settings)
    rig.le.manager.solvers.dns01 = factory   # what LEManager(dns01=factory) plugs in
    view = await rig.request("wild", {"common_name": "*.example.test", "challenge": "dns-01",
                                      "sans": [{"name": "example.test"}]})
    assert view["validating"] == [] and view["status"] == "valid"
    assert rig.during == [[{"challenge": "dns-01", "name": "example.test",
                            "where": "TXT record _acme-challenge.example.test"}]]
    assert knot.txt("_acme-challenge.example.test.") == set()
    assert factory.in_progress("wild") == ()
