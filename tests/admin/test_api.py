"""The admin API: bearer token, certificate import/list/show/replace/delete/assign, VS views,
status, and bad input answered with a clear error and the store left as it was."""

from __future__ import annotations

import base64
import datetime as dt
import stat
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.serialization import pkcs12

from lbproxy.admin import load_or_create_token
from lbproxy.config.model import ContentRule, MatchType, NotAvailable, SubVS
from lbproxy.runtime import Injection
from tests.admin.conftest import Admin
from tests.certs.helpers import issue, serial_of, tree_digest


def test_token_created_once_with_mode_0600(tmp_path: Path) -> None:
    t1 = load_or_create_token(tmp_path / "s")
    assert len(t1) >= 43  # 32 random bytes, base64url
    path = tmp_path / "s" / "admin.token"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert load_or_create_token(tmp_path / "s") == t1
    assert load_or_create_token(tmp_path / "other") != t1


@pytest.mark.parametrize("headers", [
    {},
    {"Authorization": "Bearer wrong-token-wrong-token-wrong-token"},
    {"Authorization": "Basic dXNlcjpwYXNz"},
    {"Authorization": "Bearer "},
])
@pytest.mark.parametrize(("method", "path"), [
    ("GET", "/api/status"), ("GET", "/api/certs"), ("POST", "/api/certs"),
    ("DELETE", "/api/certs/base"), ("GET", "/api/vs"), ("GET", "/api/nope"),
])
async def test_missing_or_wrong_token_is_refused(admin: Admin, headers: dict[str, str],
                                                 method: str, path: str) -> None:
    before = tree_digest(admin.state)
    status, body = await admin.call(method, path, {"id": "x"}, headers=headers)
    assert status == 401
    assert "token" in body["error"]
    assert tree_digest(admin.state) == before


async def test_right_token_with_other_case_scheme(admin: Admin) -> None:
    status, body = await admin.call("GET", "/api/status",
                                    headers={"Authorization": f"bearer {admin.token}"})
    assert status == 200 and body["ok"] and body["certificates"] == 1


async def test_import_list_show_assign_delete(admin: Admin) -> None:
    chain, key = issue(admin.ca, "new.example.com")
    status, body = await admin.call("POST", "/api/certs",
                                    {"id": "new", "cert": chain.decode(), "key": key.decode()})
    assert status == 201, body
    assert body["certificate"]["names"] == ["new.example.com"]
    assert body["certificate"]["serial"] == f"{serial_of(chain):x}"
    assert body["warnings"] == [] and body["replaced"] is False

    status, body = await admin.call("GET", "/api/certs")
    assert [(c["id"], c["used_by"]) for c in body["certificates"]] == [
        ("base", ["shop"]), ("new", [])]
    status, body = await admin.call("GET", "/api/certs/new")
    assert status == 200 and "PRIVATE" not in str(body) and body["chain_pem"].startswith("-----")

    assert admin.tls.choose("shop", "new.example.com") == "base"
    status, body = await admin.call("POST", "/api/certs/new/assign", {"target": "shop"})
    assert status == 200 and body["certificate"]["used_by"] == ["shop"]
    assert admin.tls.choose("shop", "new.example.com") == "new"

    status, body = await admin.call("DELETE", "/api/certs/new")
    assert status == 409 and "in use by shop" in body["error"]
    status, _ = await admin.call("POST", "/api/certs/new/unassign", {"target": "shop"})
    assert status == 200
    status, body = await admin.call("DELETE", "/api/certs/new")
    assert status == 200 and body == {"deleted": "new"}
    status, body = await admin.call("GET", "/api/certs/new")
    assert status == 404


async def test_assign_to_admin_counts_as_in_use(admin: Admin) -> None:
    chain, key = issue(admin.ca, "admin.example.com")
    await admin.call("POST", "/api/certs", {"id": "adm", "cert": chain.decode(),
                                            "key": key.decode()})
    status, body = await admin.call("POST", "/api/certs/adm/assign", {"target": "admin"})
    assert status == 200 and body["certificate"]["used_by"] == ["admin"]
    status, body = await admin.call("DELETE", "/api/certs/adm")
    assert status == 409 and "admin" in body["error"]


@pytest.mark.parametrize(("target", "status", "message"), [
    ("nope", 404, "no virtual service"),
    ("plain", 409, "not HTTPS"),
    ("", 400, "'target' is required"),
])
async def test_assign_to_a_bad_target(admin: Admin, target: str, status: int,
                                      message: str) -> None:
    before = tree_digest(admin.state)
    got, body = await admin.call("POST", "/api/certs/base/assign", {"target": target})
    assert got == status and message in body["error"]
    assert tree_digest(admin.state) == before


async def test_replace_through_put_and_pkcs12(admin: Admin) -> None:
    chain, key_pem = issue(admin.ca, "shop.example.com")
    cert = x509.load_pem_x509_certificates(chain)
    key = serialization.load_pem_private_key(key_pem, None)
    p12 = pkcs12.serialize_key_and_certificates(
        b"x", key, cert[0], cert[1:],  # type: ignore[arg-type]
        serialization.BestAvailableEncryption(b"pw"))
    status, body = await admin.call("PUT", "/api/certs/base", {
        "pkcs12": base64.b64encode(p12).decode(), "passphrase": "pw"})
    assert status == 200, body
    assert body["replaced"] and body["certificate"]["generation"] == 2
    assert admin.tls.choose("shop", "shop.example.com") == "base"
    m = admin.store.material("base")
    assert m is not None and m.serial == serial_of(chain)


async def test_bad_input_answers_400_and_changes_nothing(admin: Admin) -> None:
    chain, key = issue(admin.ca, "a.example.com")
    _, other = issue(admin.ca, "b.example.com")
    now = dt.datetime.now(dt.UTC)
    old_chain, old_key = issue(admin.ca, "old.example.com",
                               not_before=now - dt.timedelta(days=9),
                               not_after=now - dt.timedelta(days=1))
    cases = [
        ({"id": "x", "cert": chain.decode(), "key": other.decode()}, "key-mismatch"),
        ({"id": "x", "cert": "not a cert", "key": key.decode()}, "not-a-certificate"),
        ({"id": "x", "cert": old_chain.decode(), "key": old_key.decode(), "strict": True},
         "expired"),
        ({"id": "x", "pkcs12": base64.b64encode(b"0garbage").decode(), "passphrase": "p"},
         "bad-passphrase"),
        ({"id": "../../x", "cert": chain.decode(), "key": key.decode()}, "bad-id"),
    ]
    before = tree_digest(admin.state)
    for body, reason in cases:
        status, answer = await admin.call("POST", "/api/certs", body)
        assert (status, answer.get("reason")) == (400, reason), answer
        assert answer["error"]
    for body, reason in cases[:4]:
        body = {k: v for k, v in body.items() if k != "id"}  # the path names the certificate
        status, answer = await admin.call("PUT", "/api/certs/base", body)
        assert (status, answer.get("reason")) == (400, reason), answer
    status, answer = await admin.call("POST", "/api/certs", {"id": "x"})
    assert status == 400 and "give 'cert'" in answer["error"]
    status, answer = await admin.call("POST", "/api/certs", ["not", "an", "object"])
    assert status == 400
    assert tree_digest(admin.state) == before


async def test_expired_import_warns(admin: Admin) -> None:
    now = dt.datetime.now(dt.UTC)
    chain, key = issue(admin.ca, "old.example.com", not_before=now - dt.timedelta(days=9),
                       not_after=now - dt.timedelta(days=1))
    status, body = await admin.call("POST", "/api/certs",
                                    {"id": "old", "cert": chain.decode(), "key": key.decode()})
    assert status == 201 and "expired" in body["warnings"][0]
    status, body = await admin.call("GET", "/api/status")
    assert [c["id"] for c in body["certificates_expiring"] if c["expired"]] == ["old"]


async def test_vs_views_show_rules_in_precedence_with_injections(admin: Admin) -> None:
    rule = ContentRule("acme-x", MatchType.PREFIX, "/.well-known/acme-challenge/x")
    await admin.runtime.inject(Injection("shop", SubVS("acme-x", rules=("acme-x",),
                                                       not_available=NotAvailable(200)), rule))
    status, body = await admin.call("GET", "/api/vs/shop")
    assert status == 200
    assert [(r["rule"], r["subvs"], r["injected"]) for r in body["rules"]] == [
        ("acme-x", "acme-x", True), ("api", "api", False), ("default", "web", False)]
    assert body["tls"]["certificates"] == ["base"]
    web = next(s for s in body["subvs"] if s["name"] == "web")
    assert [(r["address"], r["health"]) for r in web["real_servers"]] == [
        ("127.0.0.1:19002", {"address": "127.0.0.1:19002", "healthy": True}),
        ("127.0.0.1:19003", {"address": "127.0.0.1:19003", "healthy": False})]
    status, body = await admin.call("GET", "/api/vs")
    assert [v["name"] for v in body["virtual_services"]] == ["shop", "plain"]
    assert "tls" not in body["virtual_services"][1]
    status, body = await admin.call("GET", "/api/vs/none")
    assert status == 404
