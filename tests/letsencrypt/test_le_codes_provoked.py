"""Codes provoked end to end through the manager and the admin API, with the exact System Message
File line and API answer: 14 (an order status not understood), 15 (a broken issued chain), 18 (no
domain), 3 for a CA whose TLS certificate is not trusted (not 5), 10 only for newAccount itself,
6 for `upload-key` over a linked account unless replace; and what the account view shows."""

from __future__ import annotations

import datetime as dt
import io
import ssl
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import trustme
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from acmeclient.crypto import generate_key, private_key_to_pem
from acmeclient.errors import MalformedResponseError, Problem, ValidationError
from lbproxy.admin import le_cli
from lbproxy.admin.client import ClientError
from lbproxy.admin.le_api import add_routes
from lbproxy.config.model import Address, Config, SubVS, VirtualService
from lbproxy.letsencrypt import LeError, Template
from lbproxy.letsencrypt.issuer import default_client_factory
from tests.letsencrypt.le_fakes import FakeClient
from tests.letsencrypt.le_fakes import ManagerEnv as Env
from tests.support.pebble import free_port

T0 = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)
STAMP = "2026-01-01T00:00:00+00:00 h Acme: "
CONFIG = Config(virtual_services=(
    VirtualService("web", Address("127.0.0.1", 1), subvs=(SubVS("rest", rules=("default",)),)),))


@pytest.fixture
async def env(tmp_path: Path) -> AsyncIterator[Env]:
    e = await Env.start(tmp_path, CONFIG, T0)
    yield e
    await e.manager.stop()


@pytest.fixture
async def api(env: Env) -> AsyncIterator[TestClient[Any, Any]]:
    app = web.Application()
    add_routes(app, env.manager)
    async with TestClient(TestServer(app, host="127.0.0.1")) as client:
        yield client


def last_line(env: Env) -> str:
    return env.messages().splitlines()[-1]


async def answer(api: TestClient[Any, Any], method: str, path: str,
                 body: dict[str, Any]) -> tuple[int, Any]:
    async with api.request(method, path, json=body) as r:
        return r.status, await r.json()


# -- 14, 15, 18: provoked, with the exact line and answer ------------------------------------------

async def test_code_14_an_order_that_ends_invalid_at_finalize(
        env: Env, api: TestClient[Any, Any]) -> None:
    # What acmeclient raises when the order itself (not a name's challenge) ends invalid.
    env.ca.fail_with = ValidationError("order https://fake.test/order/1 is invalid", Problem(
        "urn:ietf:params:acme:error:badCSR", "key too weak", 400))
    text = ("request certificate c14: order status not understood: order "
            "https://fake.test/order/1 is invalid: urn:ietf:params:acme:error:badCSR: key too weak")
    status, body = await answer(api, "POST", "/api/le/certs",
                                {"id": "c14", "common_name": "a.test", "vs": "web"})
    assert (status, body) == (502, {"error": f"{text} (code: 14)", "code": 14})
    assert last_line(env) == f"{STAMP}{text} (code: 14)"
    # a valid order without a certificate URL: the same code
    env.ca.fail_with = ValidationError("valid order without certificate URL", None)
    status, body = await answer(api, "POST", "/api/le/certs",
                                {"id": "c14b", "common_name": "a.test", "vs": "web"})
    assert status == 502 and body["code"] == 14
    assert last_line(env) == (f"{STAMP}request certificate c14b: order status not understood: "
                              "valid order without certificate URL (code: 14)")


async def test_code_13_stays_a_name_whose_challenge_failed(env: Env) -> None:
    env.ca.fail_with = ValidationError("challenge for a.test is invalid", Problem(
        "urn:ietf:params:acme:error:connection", "refused", 400), identifier="a.test")
    with pytest.raises(LeError) as e:
        await env.manager.request("c13", Template("a.test", "web"))
    assert e.value.code == 13
    assert last_line(env) == (
        f'{STAMP}request certificate c13: validation failed for a.test: {{"detail": "refused", '
        '"status": 400, "type": "urn:ietf:params:acme:error:connection"} (code: 13)')


async def test_code_15_a_chain_that_cannot_be_parsed(env: Env, api: TestClient[Any, Any]) -> None:
    env.ca.chain_override = ("-----BEGIN CERTIFICATE-----\nbm90IGEgY2VydA==\n"
                             "-----END CERTIFICATE-----\n")
    status, body = await answer(api, "POST", "/api/le/certs",
                                {"id": "c15", "common_name": "a.test", "vs": "web"})
    assert status == 502 and body["code"] == 15, body
    # the parser's own words at the end depend on the cryptography version
    prefix = ("request certificate c15: the issued certificate cannot be used: the certificate "
              "holds a damaged certificate: ")
    assert body["error"].startswith(prefix) and body["error"].endswith(" (code: 15)")
    assert last_line(env) == f"{STAMP}{body['error']}"
    assert "BEGIN" not in env.messages()
    assert env.store.get("c15") is None


async def test_code_18_no_domain(env: Env, api: TestClient[Any, Any]) -> None:
    status, body = await answer(api, "POST", "/api/le/certs",
                                {"id": "nocn", "common_name": "", "vs": "web"})
    assert (status, body) == (400, {"error": "certificate nocn: no domain to sign (code: 18)",
                                    "code": 18})
    assert last_line(env) == f"{STAMP}certificate nocn: no domain to sign (code: 18)"
    assert env.ca.orders == []


# -- 17: the sub-code is text, the line ends in the code -------------------------------------------

async def test_code_17_line_and_answer_carry_the_sub_code_in_the_text(
        env: Env, api: TestClient[Any, Any]) -> None:
    status, body = await answer(api, "POST", "/api/le/certs",
                                {"id": "c17", "common_name": "a.test", "vs": "nope"})
    text = "certificate c17: VS 'nope' does not exist: Unknown VS, sub-code 1"
    assert (status, body) == (400, {"error": f"{text} (code: 17)", "code": 17, "sub_code": 1})
    assert last_line(env) == f"{STAMP}{text} (code: 17)"
    assert env.manager.log.codes()[-1] == (17, 1)


# -- 3, not 5: the CA's TLS certificate is not trusted ---------------------------------------------

async def test_an_untrusted_ca_certificate_is_code_3(env: Env, tmp_path: Path) -> None:
    tls = trustme.CA()
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    tls.issue_cert("127.0.0.1").configure_cert(ctx)
    bundle = tmp_path / "ca.pem"
    tls.cert_pem.write_to_path(str(bundle))
    base = f"https://127.0.0.1:{free_port()}"

    async def directory(_: web.Request) -> web.Response:
        return web.json_response({"newNonce": base + "/nonce", "newAccount": base + "/acct",
                                  "newOrder": base + "/order", "revokeCert": base + "/rev",
                                  "keyChange": base + "/kc"})

    app = web.Application()
    app.router.add_get("/dir", directory)
    runner = web.AppRunner(app)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", int(base.rsplit(":", 1)[1]), ssl_context=ctx).start()
    env.manager.client_factory = default_client_factory
    try:
        with pytest.raises(LeError) as e:
            await env.manager.set_directory(base + "/dir", "")
        assert e.value.code == 3 and e.value.status == 502
        line = last_line(env)
        assert line.startswith(f"{STAMP}cannot fetch the directory {base}/dir: ")
        assert "CERTIFICATE_VERIFY_FAILED" in line and line.endswith(" (code: 3)")
        # trusted through the CA bundle, the same directory is accepted
        settings = await env.manager.set_directory(base + "/dir", str(bundle))
        assert settings.directory_url == base + "/dir"
    finally:
        await runner.cleanup()


# -- 10 only for the newAccount answer itself ------------------------------------------------------

class BrokenDirectoryClient(FakeClient):
    async def directory(self) -> Any:
        raise MalformedResponseError("expected JSON, got text/html")


class NoLocationClient(FakeClient):
    async def new_account(self, **kw: Any) -> Any:
        raise MalformedResponseError("newAccount answer without Location")


async def test_code_10_is_newaccount_without_location_not_a_broken_directory(env: Env) -> None:
    env.manager.account = None
    env.manager.client_factory = lambda url, key, acct, bundle: BrokenDirectoryClient(env.ca, acct)
    with pytest.raises(LeError) as e:
        await env.manager.register()
    assert e.value.code == 14
    assert last_line(env) == (f"{STAMP}register account: unexpected CA answer: expected JSON, "
                              "got text/html (code: 14)")
    env.manager.client_factory = lambda url, key, acct, bundle: NoLocationClient(env.ca, acct)
    with pytest.raises(LeError) as e:
        await env.manager.register()
    assert e.value.code == 10
    assert last_line(env) == (f"{STAMP}register account: the CA's answer gives no usable account "
                              "URL: newAccount answer without Location (code: 10)")


# -- upload-key refuses to replace a linked account (6) unless asked -------------------------------

async def test_upload_key_refuses_a_linked_account_unless_replace(
        env: Env, api: TestClient[Any, Any]) -> None:
    before = env.manager.account
    assert before is not None
    pem = private_key_to_pem(generate_key()).decode()
    status, body = await answer(api, "POST", "/api/le/account/key", {"key": pem})
    text = (f"an account is already registered: {before.url}; to link another one in its "
            "place, upload the key with replace (lbproxy le upload-key FILE --replace)")
    assert (status, body) == (409, {"error": f"{text} (code: 6)", "code": 6})
    assert last_line(env) == f"{STAMP}{text} (code: 6)"
    assert env.manager.account is before
    status, body = await answer(api, "POST", "/api/le/account/key",
                                {"key": pem, "replace": True})
    assert status == 200 and body["registered"] is True, body
    assert env.manager.account is not before
    assert private_key_to_pem(env.manager.account.key).decode() == pem
    assert (env.state / "audit.log").read_text().splitlines()[-1] == (
        f"{STAMP}account linked by key upload: {before.url}")


# -- what the account view and the CLI show --------------------------------------------------------

async def test_the_settings_email_is_the_account_email(env: Env) -> None:
    view = env.manager.account_view()
    assert view["email"] == "ops@example.test"
    assert view["settings"]["email"] == "ops@example.test"
    await env.restart()   # stored, not only shown
    assert env.manager.account_view()["settings"]["email"] == "ops@example.test"


@pytest.mark.parametrize(("days", "shown"), [(1, "Renew period:  1 day"),
                                              (2, "Renew period:  2 days")])
def test_renew_period_singular_and_plural(days: int, shown: str) -> None:
    out = io.StringIO()
    le_cli.show_account({"account_id": "u", "settings": {"renew_period_days": days}}, out)
    assert shown in out.getvalue().splitlines()


class Refusing:
    def get(self, path: str) -> Any:
        raise ClientError("bad directory at https://x.test/dir: expected JSON (code: 5)", 502)


def test_the_cli_prints_the_code_last_without_the_http_status(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(le_cli, "connect", lambda *a: Refusing())
    out, err = io.StringIO(), io.StringIO()
    assert le_cli.main(["le", "account"], out=out, err=err) == 1
    assert err.getvalue() == ("lbproxy: bad directory at https://x.test/dir: expected JSON "
                              "(code: 5)\n")
