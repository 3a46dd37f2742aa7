"""Hostile certificate ids through the admin API and the CLI of a running instance (fake CA):
`lbproxy le request --id "my cert"`, a `../` id posted to /api/le/certs and an id taken by an
imported certificate are refused with a clear error (and LoadMaster's code 16 for the taken
id) before any order; `lbproxy restore` of a crafted backup with a `../` id names the entry and
writes nothing, inside the state directory or outside it."""

from __future__ import annotations

import dataclasses
import datetime as dt
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import trustme

from lbproxy.letsencrypt.backup import seal, unseal
from lbproxy.letsencrypt.codes import AUDIT_LOG_FILE, SYSTEM_MESSAGE_FILE
from tests.certs.helpers import issue, tree_digest
from tests.e2e.le_node import Node, cli, start_node, web_config
from tests.letsencrypt.le_fakes import FakeCA, FakeClock

PASSPHRASE = "correct horse"
FAST_N = 1 << 10  # a cheap scrypt cost for the crafted backup


def named_evil(root: Path) -> list[Path]:
    """Files the crafted id would have created, wherever they landed under `root`."""
    return list(root.rglob("evil*"))


@pytest.fixture
async def node(tmp_path: Path) -> AsyncIterator[tuple[Node, FakeCA]]:
    ca = FakeCA(FakeClock(dt.datetime.now(dt.UTC)))
    # Two levels below tmp_path: a `../../..` id aims at tmp_path, which the digest covers.
    n = await start_node(tmp_path / "a" / "n", web_config(), client_factory=ca.factory)
    rc, out = await cli(n, "le", "register")
    assert rc == 0, out
    yield n, ca
    await n.stop()


async def test_bad_and_taken_ids_are_refused_before_any_order(
        node: tuple[Node, FakeCA]) -> None:
    n, ca = node
    rc, out = await cli(n, "le", "request", "--id", "my cert", "--cn", "a.test", "--vs", "web")
    assert rc == 4 and "certificate id 'my cert' must be 1-64 letters" in out and "(400)" in out
    st, ans = await n.api("POST", "/api/le/certs",
                          {"id": "../../x", "common_name": "a.test", "vs": "web"})
    assert st == 400 and ans["reason"] == "bad-id" and "'../../x'" in ans["error"]
    n.store.import_pem("imported", *issue(trustme.CA(), "imp.test"))
    rc, out = await cli(n, "le", "request", "--id", "imported", "--cn", "a.test", "--vs", "web")
    assert rc == 4 and "the id is taken" in out and "(code: 16)" in out and "(409)" not in out
    assert ca.orders == [] and n.manager.orders_placed == 0
    assert list((n.state / "letsencrypt" / "certs").iterdir()) == []


async def test_restore_of_a_crafted_backup_names_the_entry_and_writes_nothing(
        node: tuple[Node, FakeCA], tmp_path: Path) -> None:
    n, ca = node
    rc, out = await cli(n, "le", "request", "--id", "good", "--cn", "good.test", "--vs", "web")
    assert rc == 0, out
    contents = unseal(await n.manager.backup(PASSPHRASE, include_certs=True), PASSPHRASE)
    assert contents.certificates
    evil = {**contents.certificates[0], "chain_pem": None, "key_pem": None}
    evil["entry"] = {**evil["entry"], "id": "../../../../evil"}
    data = seal(dataclasses.replace(contents, certificates=[*contents.certificates, evil]),
                PASSPHRASE, scrypt_n=FAST_N)
    backup, pw = tmp_path / "crafted.backup", tmp_path / "pw"
    backup.write_bytes(data)
    pw.write_text(PASSPHRASE)
    logs = (SYSTEM_MESSAGE_FILE, AUDIT_LOG_FILE)  # the refusal's line goes there
    before = tree_digest(tmp_path, skip=logs)
    rc, out = await cli(n, "restore", str(backup), "--certs", "--passphrase-file", str(pw))
    assert rc == 4, out  # 4: refused (400)
    assert "certificates[1] (id '../../../../evil')" in out and "must be 1-64 letters" in out
    assert tree_digest(tmp_path, skip=logs) == before and not named_evil(tmp_path)
    last = (n.state / SYSTEM_MESSAGE_FILE).read_text().splitlines()[-1]
    assert "backup not restored" in last and last.endswith("(code: 101)")
    assert len(ca.orders) == 1
