"""Restoring a backup: run-time certificate assignments (`cert assign`) travel with `--certs` and
are restored, so the HTTPS VS serves the certificate again after a restore on a fresh state
directory (a real TLS handshake against the data plane); an assignment that cannot be restored is
named in the answer and in the System Message File (code 102); a refused restore (wrong
passphrase, damaged file, crafted entry) leaves one line with code 101; restored certificates are
shared through the storage's `issued/` records like ordered ones."""

from __future__ import annotations

import asyncio
import dataclasses
import datetime as dt
import io
import json
import logging
import re
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
import trustme

from lbproxy.admin.cli import main as cert_cli
from lbproxy.certs import CertStore
from lbproxy.config.model import Config
from lbproxy.errors import StoreError
from lbproxy.letsencrypt import LEManager, MemoryStorage, Template
from lbproxy.letsencrypt.backup import BackupError, seal, unseal
from lbproxy.letsencrypt.storage import issued_key
from lbproxy.runtime import RuntimeStore
from tests.certs.helpers import handshake, https_vs, issue, serial_of
from tests.e2e.le_node import Node, cli, https_vs_table, start_node, web_config
from tests.letsencrypt.le_fakes import FakeCA, FakeClock
from tests.letsencrypt.le_fakes import ManagerEnv as Env
from tests.letsencrypt.test_le_manager import CONFIG, T0
from tests.support.pebble import free_port

PASSPHRASE = "correct horse"
FAST_N = 1 << 10  # a cheap scrypt cost for crafted backups (the header says which was used)
RESTORE_FAILED, NOT_RESTORED = 101, 102


def coded_lines(path: Path, code: int) -> list[str]:
    """The lines of a log file that end in `(code: N)`."""
    if not path.exists():
        return []
    return [ln for ln in path.read_text().splitlines()
            if re.search(rf"\(code: {code}(, sub-code: \d+)?\)$", ln)]


# -- a real instance: cert assign -> backup --vs --certs -> restore on a fresh state dir ----------

async def cert_assign(node: Node, *argv: str) -> tuple[int, str]:
    """`lbproxy cert ...` (the admin CLI, synchronous urllib) in a thread."""
    out = io.StringIO()
    code = await asyncio.to_thread(cert_cli, ["cert", *argv, *node.cli_args()], out=out, err=out)
    return code, out.getvalue()


async def test_a_run_time_assignment_is_served_again_after_a_restore_on_a_fresh_state_dir(
        tmp_path: Path) -> None:
    ca = FakeCA(FakeClock(dt.datetime.now(dt.UTC)))
    boot = issue(trustme.CA(), "boot.invalid")
    text = web_config(https_vs_table("shop", free_port(), ("boot",), "boot"))
    backup, pw = tmp_path / "le.backup", tmp_path / "pw"
    pw.write_text(PASSPHRASE)
    a = await start_node(tmp_path / "a", text, client_factory=ca.factory, bootstrap=boot)
    try:
        for argv in (("le", "register"), ("le", "request", "--id", "blog", "--cn", "blog.test",
                                          "--vs", "web")):
            rc, out = await cli(a, *argv)
            assert rc == 0, out
        a.store.import_pem("imp", *issue(trustme.CA(), "imp.test"))  # not Let's Encrypt
        for cid in ("blog", "imp"):
            rc, out = await cert_assign(a, "assign", cid, "shop")
            assert rc == 0, out
        port = a.dataplane.listening_ports()["shop"][1]
        blog = a.store.require("blog").serial
        assert await handshake(port, "blog.test") == blog
        rc, out = await cli(a, "backup", "-o", str(backup), "--vs", "--certs",
                            "--passphrase-file", str(pw))
        assert rc == 0, out
    finally:
        await a.stop()

    b = await start_node(tmp_path / "b", text, client_factory=ca.factory, bootstrap=boot)
    try:
        port = b.dataplane.listening_ports()["shop"][1]
        assert await handshake(port, "blog.test") == serial_of(boot[0])
        rc, out = await cli(b, "restore", str(backup), "--certs", "--passphrase-file", str(pw),
                            "--json")
        assert rc == 0, out
        # the handshake the issue saw fail: shop serves blog's certificate again
        assert await handshake(port, "blog.test") == blog
        answer = json.loads(out)
        assert answer["certificates"] == ["blog"]
        assert answer["assignments"] == [{"certificate": "blog", "target": "shop",
                                          "default": False}]
        assert b.store.users("blog") == ("shop",)
        # the imported certificate is not in a backup: the answer and the log say so
        [missing] = answer["not_restored"]
        assert missing["certificate"] == "imp" and missing["target"] == "shop"
        assert "not in the certificate store here" in missing["reason"]
        [line] = coded_lines(b.state / "system-messages.log", NOT_RESTORED)
        assert "'imp'" in line and "'shop'" in line
        assert len(ca.orders) == 1  # nothing re-ordered
    finally:
        await b.stop()


# -- what cannot be restored is reported -----------------------------------------------------------

TWO_HTTPS = dataclasses.replace(CONFIG, virtual_services=(
    *CONFIG.virtual_services, https_vs("shop", 1, ()), https_vs("shop2", 1, ())))
ONE_HTTPS = dataclasses.replace(CONFIG, virtual_services=(
    *CONFIG.virtual_services, https_vs("shop", 1, ())))


@pytest.fixture
async def env(tmp_path: Path) -> AsyncIterator[Env]:
    e = await Env.start(tmp_path / "a", TWO_HTTPS, T0)
    yield e
    await e.manager.stop()


async def fresh(root: Path, config: Config, clock: FakeClock, ca: FakeCA) -> LEManager:
    """A manager on an empty state directory, no account: a new machine."""
    m = LEManager(root, RuntimeStore(config), CertStore(root, clock=clock), clock=clock,
                  client_factory=ca.factory, hostname="h")
    await m.start()
    return m


async def test_assignments_that_cannot_be_restored_are_named_and_logged(
        env: Env, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    await env.manager.request("good", Template("good.test", "web"))
    env.store.import_pem("imp", *issue(trustme.CA(), "imp.test"))
    env.store.assign("good", "shop", default=True)
    env.store.assign("good", "shop2")
    env.store.assign("imp", "shop")
    env.store.assign("good", "admin")
    data = await env.manager.backup(PASSPHRASE, include_certs=True)

    m = await fresh(tmp_path / "b", ONE_HTTPS, env.clock, env.ca)  # no VS shop2 here
    try:
        with caplog.at_level(logging.WARNING):
            restored = await m.restore(data, PASSPHRASE, restore_certs=True)
        assert restored["assignments"] == [{"certificate": "good", "target": "shop",
                                            "default": True}]
        assert m.store.assignment("shop").default == "good"
        reasons = {(n["certificate"], n["target"]): n["reason"]
                   for n in restored["not_restored"]}
        assert set(reasons) == {("good", "shop2"), ("imp", "shop"), ("good", "admin")}
        assert "VS 'shop2' does not exist here" in reasons[("good", "shop2")]
        assert "not in the certificate store here" in reasons[("imp", "shop")]
        assert "cert assign good admin" in reasons[("good", "admin")]
        lines = coded_lines(m.state_dir / "system-messages.log", NOT_RESTORED)
        assert len(lines) == 3 and any("'shop2'" in ln for ln in lines)
        assert sum("(code: 102)" in r.getMessage() for r in caplog.records
                   if r.levelno == logging.WARNING) == 3
        audit = (m.state_dir / "audit.log").read_text()
        assert "1 assignments" in audit and "3 not restored" in audit
    finally:
        await m.stop()


async def test_a_certificate_held_here_by_an_imported_one_is_reported_not_skipped(
        env: Env, tmp_path: Path) -> None:
    await env.manager.request("good", Template("good.test", "web"))
    env.store.assign("good", "shop")
    data = await env.manager.backup(PASSPHRASE, include_certs=True)
    m = await fresh(tmp_path / "b", ONE_HTTPS, env.clock, env.ca)
    try:
        m.store.import_pem("good", *issue(trustme.CA(), "other.test"))
        restored = await m.restore(data, PASSPHRASE, restore_certs=True)
        assert restored["certificates"] == [] and restored["assignments"] == []
        reasons = {(n["certificate"], n["target"]) for n in restored["not_restored"]}
        assert reasons == {("good", ""), ("good", "shop")}
        assert m.store.users("good") == ()  # the imported "good" is not assigned in its place
        assert len(coded_lines(m.state_dir / "system-messages.log", NOT_RESTORED)) == 2
    finally:
        await m.stop()


# -- a refused restore leaves a line ------------------------------------------------------------

def _crafted_cert(contents: Any) -> Any:
    evil = {**contents.certificates[0], "chain_pem": None, "key_pem": None}
    evil["entry"] = {**evil["entry"], "id": "../evil"}
    return dataclasses.replace(contents, certificates=[*contents.certificates, evil])


def _crafted_assignment(contents: Any) -> Any:
    return dataclasses.replace(contents, assignments=[
        {"certificate": "../evil", "target": "shop", "default": False}])


Refusal = Callable[[bytes, Any], tuple[bytes, str]]
REFUSALS: list[tuple[str, Refusal, str]] = [
    ("wrong passphrase", lambda data, _c: (data, "wrong horse!"), "wrong passphrase"),
    ("not a backup", lambda _d, _c: (b"hello", PASSPHRASE), "not an lbproxy"),
    ("damaged", lambda data, _c: (data[: len(data) // 2], PASSPHRASE), "not JSON"),
    ("crafted certificate", lambda _d, c: (seal(_crafted_cert(c), PASSPHRASE, scrypt_n=FAST_N),
                                          PASSPHRASE), "certificates[1] (id '../evil')"),
    ("crafted assignment", lambda _d, c: (seal(_crafted_assignment(c), PASSPHRASE,
                                               scrypt_n=FAST_N), PASSPHRASE),
     "assignments[0]"),
]


@pytest.mark.parametrize(("what", "make", "named"), REFUSALS, ids=[r[0] for r in REFUSALS])
async def test_a_refused_restore_leaves_a_line_with_its_code(
        env: Env, what: str, make: Refusal, named: str) -> None:
    await env.manager.request("good", Template("good.test", "web"))
    good = await env.manager.backup(PASSPHRASE, include_certs=True)
    data, passphrase = make(good, unseal(good, PASSPHRASE))
    audit = (env.state / "audit.log").read_text()
    with pytest.raises(BackupError) as e:
        await env.manager.restore(data, passphrase, restore_certs=True)
    assert named in str(e.value)
    [line] = coded_lines(env.state / "system-messages.log", RESTORE_FAILED)
    assert "backup not restored" in line and named in line
    assert (env.state / "audit.log").read_text() == audit  # nothing changed: no audit line


async def test_a_restore_that_fails_part_way_says_so_with_its_code(
        env: Env, monkeypatch: pytest.MonkeyPatch) -> None:
    await env.manager.request("good", Template("good.test", "web"))
    data = await env.manager.backup(PASSPHRASE, include_certs=True)
    real = env.manager.storage.store

    async def full(key: str, value: bytes) -> None:
        if key == issued_key("good"):
            raise OSError(28, "No space left on device", key)
        await real(key, value)

    monkeypatch.setattr(env.manager.storage, "store", full)
    with pytest.raises(StoreError, match="No space left"):
        await env.manager.restore(data, PASSPHRASE, restore_certs=True)
    [line] = coded_lines(env.state / "system-messages.log", RESTORE_FAILED)
    assert "stopped part way" in line and "No space left" in line


# -- restored certificates are shared like issued ones --------------------------------------------

async def test_a_restored_certificate_is_picked_up_by_another_holder_of_the_storage(
        env: Env, tmp_path: Path) -> None:
    await env.manager.request("good", Template("good.test", "web"))
    serial = env.store.require("good").serial
    data = await env.manager.backup(PASSPHRASE, include_certs=True)
    shared = MemoryStorage()

    def holder(name: str) -> LEManager:
        root = tmp_path / name
        return LEManager(root, RuntimeStore(CONFIG), CertStore(root, clock=env.clock),
                         clock=env.clock, client_factory=env.ca.factory, storage=shared,
                         locker=shared, hostname=name)

    a = holder("a2")
    await a.start()
    try:
        await a.restore(data, PASSPHRASE, restore_certs=True)
        assert await shared.exists(issued_key("good"))
    finally:
        await a.stop()
    orders = len(env.ca.orders)
    b = holder("b2")  # another host on the same storage
    await b.start()
    try:
        await b.scheduler.stop()
        await b.run_due()
        await b.wait_idle()
        assert len(env.ca.orders) == orders and b.orders_placed == 0
        assert b.store.require("good").serial == serial
        assert b.view("good")["status"] == "valid"
    finally:
        await b.stop()
