"""Two managers (two hosts, each with its own certificate store and runtime) on one shared
storage, the in-memory one and the state directory: a fake CA counting new orders sees exactly one
per certificate (issue and renewal), and both managers serve it. Also: one long-lived ACME client
per account, and the blocking work of an order and a backup off the event loop's thread."""

from __future__ import annotations

import asyncio
import dataclasses
import datetime as dt
import threading
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from acmeclient.crypto import PrivateKey
from lbproxy.certs import CertStore
from lbproxy.config.model import CertificateRequest, Config
from lbproxy.letsencrypt import FileStorage, LEManager, MemoryStorage, Template
from lbproxy.letsencrypt.backup import unseal
from lbproxy.letsencrypt.storage import Locker, Storage
from lbproxy.runtime import RuntimeStore
from tests.letsencrypt.le_fakes import FakeCA, FakeClient, FakeClock
from tests.letsencrypt.test_le_manager import CONFIG, T0

DECLARED = dataclasses.replace(CONFIG, certificates=(
    CertificateRequest("site", "a.test", "web", sans=(("b.test", "web"),)),
    CertificateRequest("other", "c.test", "web")))
POLL = 0.01  # the file locker's poll in these tests (a waiter looks this often)


@dataclass
class Host:
    store: CertStore
    manager: LEManager


async def host(root: Path, config: Config, clock: FakeClock, ca: FakeCA,
               storage: Storage, locker: Locker) -> Host:
    store = CertStore(root, clock=clock)
    m = LEManager(root, RuntimeStore(config), store, clock=clock, client_factory=ca.factory,
                  storage=storage, locker=locker, hostname=root.name)
    await m.start()
    await m.scheduler.stop()  # driven by hand: run_due() at chosen instants
    return Host(store, m)


SharedFactory = Callable[[Path], tuple[Storage, Locker]]


@pytest.fixture(params=["memory", "state-dir"])
def shared(request: pytest.FixtureRequest, tmp_path: Path) -> SharedFactory:
    """Each host's handle on the one storage: the same MemoryStorage object, or its own
    FileStorage on the same directory (its own lock owner, as another process would be)."""
    if request.param == "memory":
        mem = MemoryStorage()
        return lambda _root: (mem, mem)

    def files(_root: Path) -> tuple[Storage, Locker]:
        fs = FileStorage(tmp_path / "shared", poll=POLL)
        return fs, fs
    return files


@pytest.fixture
async def pair(tmp_path: Path, shared: SharedFactory) -> AsyncIterator[tuple[Host, Host, FakeCA]]:
    clock = FakeClock(T0)
    ca = FakeCA(clock)
    a = await host(tmp_path / "a", DECLARED, clock, ca, *shared(tmp_path / "a"))
    await a.manager.register("ops@example.test")
    b = await host(tmp_path / "b", DECLARED, clock, ca, *shared(tmp_path / "b"))
    yield a, b, ca
    for h in (a, b):
        await h.manager.stop()


async def both_run(a: Host, b: Host) -> None:
    await asyncio.gather(a.manager.run_due(), b.manager.run_due())
    await asyncio.gather(a.manager.wait_idle(), b.manager.wait_idle())


async def test_one_order_per_certificate_and_both_serve_it(
        pair: tuple[Host, Host, FakeCA]) -> None:
    a, b, ca = pair
    assert b.manager.account is not None  # the account came through the storage
    await both_run(a, b)
    assert sorted(o["names"][0] for o in ca.orders) == ["a.test", "c.test"]
    for cid in ("site", "other"):
        assert a.store.require(cid).serial == b.store.require(cid).serial
        assert a.store.material(cid) is not None and b.store.material(cid) is not None
    assert a.manager.orders_placed + b.manager.orders_placed == 2
    # the renewal window of a 90-day certificate (30-day period): again one order each
    ca.clock.advance(dt.timedelta(days=61))
    before = {cid: a.store.require(cid).serial for cid in ("site", "other")}
    await both_run(a, b)
    assert len(ca.orders) == 4
    for cid in ("site", "other"):
        assert a.store.require(cid).serial == b.store.require(cid).serial != before[cid]
        assert b.manager.view(cid)["status"] == "valid"
    # nothing more is due on either host
    await both_run(a, b)
    assert len(ca.orders) == 4


async def test_a_request_on_one_host_is_picked_up_by_the_other(
        pair: tuple[Host, Host, FakeCA], tmp_path: Path) -> None:
    a, b, ca = pair
    await both_run(a, b)
    orders = len(ca.orders)
    t = Template("d.test", "web")
    await asyncio.gather(a.manager.request("new", t), b.manager.request("new", t))
    assert len(ca.orders) == orders + 1
    assert a.store.require("new").serial == b.store.require("new").serial


async def test_a_dead_holders_lock_is_taken_over(tmp_path: Path) -> None:
    mem = MemoryStorage(lease=60.0)
    await mem.lock("cert-x")
    mem.expire("cert-x")  # its holder died: the lease is never extended again
    async with asyncio.timeout(5):
        await mem.lock("cert-x")
    await mem.unlock("cert-x")

    fs, other = FileStorage(tmp_path, poll=POLL), FileStorage(tmp_path, poll=POLL)
    lock = tmp_path / "locks" / "cert-y.lock"
    lock.parent.mkdir()
    # a holder of this host that no longer exists (kill -9): taken over at once
    proc = await asyncio.create_subprocess_exec("true")
    await proc.wait()
    lock.write_text(f'{{"owner": "gone", "host": "{fs._host}", "pid": {proc.pid}}}')
    async with asyncio.timeout(5):
        await fs.lock("cert-y")
    # a live holder keeps it until it unlocks
    waiter = asyncio.create_task(other.lock("cert-y"))
    await asyncio.sleep(20 * POLL)
    assert not waiter.done()
    await fs.unlock("cert-y")
    async with asyncio.timeout(5):
        await waiter
    await other.unlock("cert-y")
    assert not lock.exists()
    # a lock nobody refreshed for a whole lease (its holder on another host died)
    lock.write_text('{"owner": "elsewhere", "host": "another-host", "pid": 1}')
    stale = FileStorage(tmp_path, poll=POLL, lease=0.05)
    async with asyncio.timeout(5):
        await stale.lock("cert-y")
    await stale.unlock("cert-y")


async def test_one_client_per_account_reused_across_orders(tmp_path: Path) -> None:
    clock = FakeClock(T0)
    ca = FakeCA(clock)
    made: list[str | None] = []

    def factory(url: str, key: PrivateKey, acct: str | None, bundle: str | None) -> FakeClient:
        made.append(acct)
        return ca.factory(url, key, acct, bundle)

    m = LEManager(tmp_path, RuntimeStore(CONFIG), CertStore(tmp_path, clock=clock), clock=clock,
                  client_factory=factory)
    await m.start()
    try:
        await m.register("ops@example.test")
        for i in range(3):
            await m.request(f"c{i}", Template(f"c{i}.test", "web"))
        await m.renew("c0")
        assert len(ca.orders) == 4
        # one for the registration (a new key), one for every order of the account
        assert made == [None, "https://fake.test/acct/1"]
        # a new directory: the old client goes, the next order makes one
        m.settings = dataclasses.replace(m.settings, directory_url="https://other.test/dir")
        await m.renew("c1")
        assert len(made) == 3
    finally:
        await m.stop()


async def test_blocking_work_runs_off_the_loop_thread(tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    from lbproxy.letsencrypt import backup, filestore, issuer

    loop_thread = threading.get_ident()
    seen: dict[str, set[bool]] = {"keygen": set(), "write": set(), "scrypt": set()}

    def spy(what: str, real: Callable[..., Any]) -> Callable[..., Any]:
        def wrapped(*a: Any, **k: Any) -> Any:
            seen[what].add(threading.get_ident() == loop_thread)
            return real(*a, **k)
        return wrapped

    monkeypatch.setattr(issuer, "generate_key", spy("keygen", issuer.generate_key))
    monkeypatch.setattr(filestore, "write_atomic", spy("write", filestore.write_atomic))
    monkeypatch.setattr(backup, "_kdf", spy("scrypt", backup._kdf))
    clock = FakeClock(T0)
    ca = FakeCA(clock)
    m = LEManager(tmp_path, RuntimeStore(CONFIG), CertStore(tmp_path, clock=clock), clock=clock,
                  client_factory=ca.factory)
    await m.start()
    try:
        await m.register("ops@example.test")
        await m.request("c", Template("c.test", "web", key_type="rsa", key_size=2048))
        blob = await m.backup("correct horse", include_certs=True)
    finally:
        await m.stop()
    # each ran, and never on the loop's thread
    assert seen == {"keygen": {False}, "write": {False}, "scrypt": {False}}
    assert unseal(blob, "correct horse").certificates
