"""Let's Encrypt requests and restores are checked whole before anything is written or sent to
the CA: an invalid or taken id, a bad name, VS, key or subject places no order (the fake CA counts
them) and writes nothing; a crafted backup with `../` ids (or any entry that cannot be restored)
is refused naming the entry, with nothing written inside or outside the state directory; ids
that are not valid are never loaded from disk."""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import trustme

from lbproxy.certs.errors import CertInputError, InputProblem
from lbproxy.config.model import Address, Config, SubVS, VirtualService, VSKind
from lbproxy.errors import AdminError, StoreError
from lbproxy.letsencrypt import Template
from lbproxy.letsencrypt.backup import BackupError, seal, unseal
from lbproxy.letsencrypt.codes import AUDIT_LOG_FILE, SYSTEM_MESSAGE_FILE, LeError
from tests.certs.helpers import issue, tree_digest
from tests.letsencrypt.le_fakes import ManagerEnv as Env

T0 = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)
CONFIG = Config(virtual_services=(
    VirtualService("web", Address("127.0.0.1", 1), subvs=(SubVS("rest", rules=("default",)),)),
    VirtualService("redir", Address("127.0.0.1", 2), kind=VSKind.REDIRECT)))
PASSPHRASE = "correct horse"
LOG_FILES = (SYSTEM_MESSAGE_FILE, AUDIT_LOG_FILE)  # a refused restore appends its line there
FAST_N = 1 << 10  # a cheap scrypt cost for crafted backups (the header says which was used)


def named_evil(root: Path) -> list[Path]:
    """Files the crafted id would have created, wherever they landed under `root`."""
    return list(root.rglob("evil*"))


@pytest.fixture
async def env(tmp_path: Path) -> AsyncIterator[Env]:
    # The state two levels down: a `../../..` id aims at tmp_path, which the digests cover.
    e = await Env.start(tmp_path / "n" / "state", CONFIG, T0)
    yield e
    await e.manager.stop()


def le_entries(env: Env) -> list[str]:
    return sorted(p.name for p in (env.state / "letsencrypt" / "certs").iterdir())


BAD_IDS = ["my cert", "../x", "../../../outside", "trail\n", "", "a" * 65, ".hidden", "-dash",
           "a/b", "x\0y", "/abs", "caf\u00e9", "\n"]


@pytest.mark.parametrize("cert_id", BAD_IDS, ids=repr)
async def test_an_invalid_id_is_refused_before_anything_is_written_or_ordered(
        env: Env, tmp_path: Path, cert_id: str) -> None:
    before = tree_digest(tmp_path)
    with pytest.raises(CertInputError) as e:
        await env.manager.request(cert_id, Template("a.test", "web"))
    assert e.value.reason is InputProblem.BAD_ID and e.value.status == 400
    assert repr(cert_id) in str(e.value)
    assert env.ca.orders == [] and env.manager.orders_placed == 0
    assert tree_digest(tmp_path) == before and cert_id not in env.manager.entries


async def test_a_taken_id_is_refused_before_the_ca(env: Env, tmp_path: Path) -> None:
    env.store.import_pem("imported", *issue(trustme.CA(), "imp.test"))
    with pytest.raises(LeError) as e:  # LoadMaster's code for an id taken by an import
        await env.manager.request("imported", Template("a.test", "web"))
    assert e.value.code == 16 and e.value.status == 409 and "choose another id" in e.value.text
    assert "(code: 16)" in env.messages()
    await env.manager.request("mine", Template("a.test", "web"))
    assert len(env.ca.orders) == 1
    with pytest.raises(StoreError, match="already exists") as s:
        await env.manager.request("mine", Template("b.test", "web"))
    assert s.value.status == 409
    # a damaged entry on disk is never overwritten by a new request for its id
    damaged = env.state / "letsencrypt" / "certs" / "broken.json"
    damaged.write_text("{trunc")
    await env.restart(scheduler=False)
    with pytest.raises(StoreError, match="damaged") as s:
        await env.manager.request("broken", Template("c.test", "web"))
    assert s.value.status == 409 and damaged.read_text() == "{trunc"
    assert len(env.ca.orders) == 1


BAD_TEMPLATES: list[tuple[str, Template, type[Exception]]] = [
    ("space in a name", Template("a b.test", "web"), AdminError),
    ("trailing newline in a name", Template("a.test\n", "web"), AdminError),
    ("trailing newline in a SAN", Template("a.test", "web", (("b.test\n", "web"),)), AdminError),
    # a wildcard is proved by dns-01 only: code 11 (solvers.check_challenge)
    ("wildcard", Template("*.a.test", "web"), LeError),
    ("name listed twice", Template("a.test", "web", (("A.test", "web"),)), AdminError),
    ("no common name", Template("", "web"), LeError),
    ("SAN without a VS", Template("a.test", "web", (("b.test", ""),)), LeError),
    ("unknown VS", Template("a.test", "nope"), LeError),
    ("VS not eligible", Template("a.test", "redir"), LeError),
    ("RSA 1024", Template("a.test", "web", key_type="rsa", key_size=1024), AdminError),
    ("DSA", Template("a.test", "web", key_type="dsa"), AdminError),
    ("country", Template("a.test", "web", country="USA"), AdminError),
    ("email", Template("a.test", "web", email="nobody"), AdminError),
    # Only building the CSR finds it: before, the order was placed and failed with code 15.
    ("lone surrogate", Template("a.test", "web", company="\ud800"), AdminError),
]


@pytest.mark.parametrize(("what", "template", "error"), BAD_TEMPLATES,
                         ids=[b[0] for b in BAD_TEMPLATES])
async def test_every_part_of_a_request_is_checked_before_the_ca(
        env: Env, tmp_path: Path, what: str, template: Template, error: type[Exception]) -> None:
    before = le_entries(env)
    with pytest.raises(error):
        await env.manager.request("c", template)
    assert env.ca.orders == [] and env.manager.orders_placed == 0
    assert le_entries(env) == before and "c" not in env.manager.entries


# -- restore ---------------------------------------------------------------------------------------

async def crafted(env: Env, edit: Any) -> bytes:
    """A backup of `env` (one issued certificate "good") whose certificate list `edit` changed,
    sealed again with the same passphrase: what an attacker with the passphrase could build."""
    await env.manager.request("good", Template("good.test", "web"))
    contents = unseal(await env.manager.backup(PASSPHRASE, include_certs=True), PASSPHRASE)
    certs = json.loads(json.dumps(contents.certificates))
    edit(certs)
    return seal(dataclasses.replace(contents, certificates=certs), PASSPHRASE, scrypt_n=FAST_N)


def with_id(cert_id: str, *, pem: bool) -> Any:
    def edit(certs: list[dict[str, Any]]) -> None:
        c = json.loads(json.dumps(certs[0]))
        c["entry"]["id"] = cert_id
        if not pem:
            c["chain_pem"] = c["key_pem"] = None
        certs.append(c)
    return edit


HOSTILE_BACKUPS: list[tuple[str, Any, str]] = [
    ("../ id with PEM", with_id("../../../evil", pem=True), "'../../../evil'"),
    ("../ id without PEM", with_id("../../../evil", pem=False), "'../../../evil'"),
    ("absolute id", with_id("/tmp/evil", pem=False), "'/tmp/evil'"),
    ("trailing newline", with_id("trail\n", pem=False), "'trail\\n'"),
    ("space", with_id("my cert", pem=True), "'my cert'"),
    ("listed twice", with_id("good", pem=True), "listed twice"),
    ("not an object", lambda certs: certs.append("../evil"), "not a certificate entry"),
    ("no entry", lambda certs: certs.append({"chain_pem": "x"}), "not a certificate entry"),
    ("garbage PEM", lambda certs: certs[0].update(chain_pem="-----BEGIN CERTIFICATE-----\nx"),
     "certificates[0] (id 'good')"),
]


@pytest.mark.parametrize(("what", "edit", "named"), HOSTILE_BACKUPS,
                         ids=[h[0] for h in HOSTILE_BACKUPS])
async def test_a_crafted_backup_is_refused_naming_the_entry_and_writes_nothing(
        env: Env, tmp_path: Path, what: str, edit: Any, named: str) -> None:
    data = await crafted(env, edit)
    await env.manager.delete("good")
    settings = env.manager.settings
    before = tree_digest(tmp_path, skip=LOG_FILES)
    with pytest.raises(BackupError) as e:
        await env.manager.restore(data, PASSPHRASE, restore_certs=True)
    assert named in str(e.value) and "certificates[" in str(e.value)
    assert tree_digest(tmp_path, skip=LOG_FILES) == before, "something was written"
    assert env.messages().splitlines()[-1].endswith("(code: 101)")  # but the refusal is logged
    assert not named_evil(tmp_path)
    assert env.manager.settings == settings and "good" not in env.manager.entries


async def test_a_clean_backup_still_restores(env: Env, tmp_path: Path) -> None:
    data = await crafted(env, lambda certs: None)
    serial = env.store.require("good").serial
    await env.manager.delete("good")
    restored = await env.manager.restore(data, PASSPHRASE, restore_certs=True)
    assert restored["certificates"] == ["good"] and env.store.require("good").serial == serial
    assert le_entries(env) == ["good.json"]


async def test_ids_that_are_not_valid_are_not_loaded_from_disk(env: Env) -> None:
    """State written by hand or by an older version: reported damaged, never used (so no path
    is built from it and `cert list` never shows it as a certificate)."""
    await env.manager.request("good", Template("good.test", "web"))
    le_certs, store = env.state / "letsencrypt" / "certs", env.state / "certs"
    entry = json.loads((le_certs / "good.json").read_text())
    entry["id"] = "trail\n"
    (le_certs / "trail\n.json").write_text(json.dumps(entry))
    (store / "good").rename(store / "trail\n")
    await env.restart(scheduler=False)
    assert "trail\n" not in env.manager.entries and "trail\n" in env.manager.damaged
    assert "is not a valid certificate id" in env.manager.damaged["trail\n"]
    assert env.store.get("trail\n") is None
    assert "is not a valid certificate id" in env.store.problems["trail\n"]
