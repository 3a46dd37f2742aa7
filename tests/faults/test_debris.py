"""What a crash in the middle of an atomic write leaves (`.tmp-*` files and directories, the
store's `.trash-*`) is removed at the next start in every directory lbproxy writes atomically
into: the state root (admin token), the Let's Encrypt state and its certs/, the certificate
folder. Nothing else is touched, a debris symlink is not followed, and the certificates, account
and settings are the same after the restart. (The names are those `files.write_atomic` leaves
when killed before its rename: tests/certs/test_files.py checks that with a real os._exit.)"""

from __future__ import annotations

import datetime as dt
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from lbproxy.certs.files import TMP_PREFIX
from tests.e2e.le_node import Node, cli, start_node, web_config
from tests.letsencrypt.le_fakes import FakeCA, FakeClock


@pytest.fixture
async def node(tmp_path: Path) -> AsyncIterator[tuple[Node, FakeCA]]:
    ca = FakeCA(FakeClock(dt.datetime.now(dt.UTC)))
    n = await start_node(tmp_path / "n", web_config(), client_factory=ca.factory)
    yield n, ca
    await n.stop()


def listing(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


async def test_debris_of_a_crash_is_removed_at_start_everywhere(
        node: tuple[Node, FakeCA], tmp_path: Path) -> None:
    n, _ca = node
    for argv in (["le", "register"],
                 ["le", "request", "--id", "c", "--cn", "c.test", "--vs", "web"]):
        rc, out = await cli(n, *argv)
        assert rc == 0, out
    await n.stop()
    state, le = n.state, n.state / "letsencrypt"
    clean = listing(state)
    serial, account = n.store.require("c").serial, n.manager.account_view()
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "keep").write_text("precious")
    debris = [
        state / f"{TMP_PREFIX}admin.token.0a1b2c3d",          # the state root (admin token)
        le / f"{TMP_PREFIX}settings.json.1b2c3d4e",           # the Let's Encrypt state
        le / f"{TMP_PREFIX}account.key.2c3d4e5f",
        le / "certs" / f"{TMP_PREFIX}c.json.3d4e5f60",        # its certificate entries
        state / "certs" / f"{TMP_PREFIX}.assignments.json.4e5f6071",  # the certificate folder
    ]
    for p in debris:
        p.write_text("half written")
    tmp_dir = state / "certs" / f"{TMP_PREFIX}d.5f607182"     # a new certificate's directory
    tmp_dir.mkdir()
    (tmp_dir / "meta.json").write_text("{}")
    (state / "certs" / ".trash-old.60718293").mkdir()       # a delete cut short
    (le / f"{TMP_PREFIX}link").symlink_to(outside)
    assert listing(state) != clean

    await n.start()
    assert listing(state) == clean
    assert (outside / "keep").read_text() == "precious"
    assert n.store.require("c").serial == serial and n.manager.account_view() == account
    assert n.manager.damaged == {} and n.store.problems == {}
