"""Damaged state files are detected at start, reported with their path (process log, System
Message File, status), never silently used and never overwritten; the rest keeps working.

Damage done: a truncated meta.json, garbage inside a stored chain PEM, a key file of another
certificate, a truncated Let's Encrypt entry, settings.json / account.json / account.key /
challenges.json / .assignments.json that are not what they should be."""

from __future__ import annotations

import datetime as dt
import logging
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from lbproxy.config.model import Address, CertificateRequest, Config, SubVS, VirtualService
from lbproxy.errors import StoreError
from lbproxy.letsencrypt import Template
from tests.certs.helpers import tree_digest
from tests.letsencrypt.le_fakes import ManagerEnv as Env

CONFIG = Config(
    virtual_services=(VirtualService("web", Address("127.0.0.1", 1),
                                     subvs=(SubVS("rest", rules=("default",)),)),),
    certificates=(CertificateRequest("decl", "decl.test", "web"),))


@pytest.fixture
async def env(tmp_path: Path) -> AsyncIterator[Env]:
    e = await Env.start(tmp_path, CONFIG, dt.datetime.now(dt.UTC))
    m, store = e.manager, e.store
    await m.run_due()  # the declared certificate
    await m.wait_idle()
    for cid in ("a", "b", "c", "good"):
        await m.request(cid, Template(f"{cid}.test", "web"))
    assert store.get("decl") is not None
    yield e
    await e.manager.stop()


async def test_damaged_certificate_files_are_reported_not_served_not_overwritten(
        env: Env, caplog: pytest.LogCaptureFixture) -> None:
    certs = env.state / "certs"
    good_material = env.store.material("good")
    assert good_material is not None
    gb, gc = (env.store.require(c).generation for c in "bc")
    # a: truncated meta.json; b: garbage in the chain; c: a key of another certificate
    meta_a = certs / "a" / "meta.json"
    meta_a.write_bytes(meta_a.read_bytes()[:40])
    chain_b = certs / "b" / f"fullchain-{gb}.pem"
    pem = chain_b.read_bytes()
    chain_b.write_bytes(pem[:100] + b"!!garbage!!" + pem[111:])
    other = ec.generate_private_key(ec.SECP256R1()).private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption())
    (certs / "c" / f"key-{gc}.pem").write_bytes(other)
    # the run-time assignments file
    (certs / ".assignments.json").write_bytes(b'{"vs": {"web": ')
    before = {c: tree_digest(certs / c) for c in "abc"}
    before_assign = (certs / ".assignments.json").read_bytes()

    caplog.set_level(logging.ERROR)
    await env.restart(scheduler=False)

    # detected: not loaded, not served
    for cid in "abc":
        assert env.store.get(cid) is None and env.store.material(cid) is None, cid
        assert str(certs / cid) in env.store.problems[cid]
    assert f"fullchain-{gb}.pem" in env.store.problems["b"]
    assert "does not match" in env.store.problems["c"]
    assert str(certs / ".assignments.json") in env.store.problems[".assignments.json"]
    # reported with the path: process log, System Message File, status
    msgs = env.messages()
    for cid in "abc":
        assert str(certs / cid) in msgs, cid
        assert any(str(certs / cid) in r.getMessage() for r in caplog.records), cid
    status = {s.id: s for s in env.manager.cert_statuses()}
    for cid in "abc":
        assert status[cid].state in ("pending", "damaged", "backoff"), status[cid]
    # the rest of the store keeps working
    assert env.store.material("good") == good_material
    assert env.store.material("decl") is not None
    # nothing overwritten: a renewal refuses before ordering, an import is refused (409)
    orders = len(env.ca.orders)
    for cid in "abc":
        await env.manager.renew(cid, wait=False)
    await env.manager.wait_idle()
    assert len(env.ca.orders) == orders, "an order was placed for a certificate it cannot store"
    for cid in "abc":
        assert "damaged" in env.manager.view(cid)["last_error"]
        assert tree_digest(certs / cid) == before[cid], cid
    good_chain = good_material.chain_pem
    with pytest.raises(StoreError) as exc:
        env.store.import_pem("a", good_chain, good_material.key_pem)
    assert exc.value.status == 409 and str(certs / "a") in str(exc.value)
    assert tree_digest(certs / "a") == before["a"]
    assert (certs / ".assignments.json").read_bytes() == before_assign


async def test_damaged_letsencrypt_state_is_reported_and_kept(env: Env) -> None:
    le = env.state / "letsencrypt"
    (le / "certs" / "decl.json").write_bytes(b'{"id": "decl", "templ')
    (le / "settings.json").write_bytes(b"not json at all")
    (le / "challenges.json").write_bytes(b"[{\"cert\": ")
    damaged = {p: p.read_bytes() for p in (le / "certs" / "decl.json", le / "settings.json")}
    await env.restart(scheduler=False)
    msgs = env.messages()
    for p in damaged:
        assert str(p) in msgs, p
    assert str(le / "challenges.json") in msgs
    # the journal is kept aside for the operator, not overwritten
    assert (le / "challenges.json.damaged").read_bytes() == b"[{\"cert\": "
    # the damaged entry is not re-created from the config file and not renewed
    assert "decl" not in env.manager.entries and "decl" in env.manager.damaged
    await env.manager.sync_config(CONFIG)
    assert (await env.manager.run_due()) == 0
    status = {s.id: s for s in env.manager.cert_statuses()}
    assert status["decl"].state == "imported" or status["decl"].managed_by == "letsencrypt"
    assert env.store.material("decl") is not None  # the certificate itself still serves
    for p, data in damaged.items():
        assert p.read_bytes() == data, p
    # the rest keeps working: a healthy certificate renews
    serial = env.store.require("good").serial
    await env.manager.renew("good")
    assert env.store.require("good").serial != serial


@pytest.mark.parametrize("what", ["account.key", "account.json"])
async def test_damaged_account_is_reported_with_its_path(env: Env, what: str) -> None:
    path = env.state / "letsencrypt" / what
    path.write_bytes(b"-----BEGIN PRIVATE KEY-----\nAAAA\n" if what == "account.key"
                     else b"{\"url\": ")
    data = path.read_bytes()
    await env.restart(scheduler=False)
    code = 9 if what == "account.key" else 10
    line = [ln for ln in env.messages().splitlines() if f"(code: {code})" in ln][-1]
    assert str(path) in line
    assert env.manager.account is None and what in env.manager.damaged
    assert env.manager.account_view()["problem"]
    orders = len(env.ca.orders)
    env.clock.advance(dt.timedelta(days=365))
    assert (await env.manager.run_due()) == 0 and len(env.ca.orders) == orders
    assert path.read_bytes() == data
